"""Small filesystem helpers shared by the stages: atomic writes and content hashes.

Every stage writes its output next to the final location and renames it into place only
when it is complete, so a failed or interrupted run never destroys earlier output. This
module is the one home for those swaps: ``atomic_dir`` / ``replace_dir`` for directories,
``atomic_file`` / ``durable_replace`` / ``atomic_write_bytes`` for files. A replaced file is
fsynced before its rename and its directory after it, so after a crash or power loss the
final name holds the whole new file or the whole old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``final`` on success.

    The temporary directory is a sibling of ``final`` (same filesystem, so the rename is
    atomic). On an exception it is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are shared like any mkdir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(work: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Put the finished directory ``work`` in place of ``final`` (renames on one filesystem).

    The old ``final`` is moved aside first and removed only after the new one is in place,
    and the parent directory is fsynced so that the swap itself survives a crash. Files
    inside ``work`` should already be durable (written with ``atomic_file`` & co.).
    """
    work, final = Path(work), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(work, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; what the block wrote there replaces ``final``.

    The block creates the file (any writer that takes a path: Parquet, numpy memmaps) and
    must close it. On success it is put in place with ``durable_replace``; on an exception
    it is deleted and ``final`` is left untouched. The name is ``.NAME.tmp-PID``, so a
    directory's leftovers of a killed run match the glob ``.*.tmp-*``.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        durable_replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def durable_replace(src: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename the finished file ``src`` over ``final`` so that the result survives a crash.

    fsync the file, rename it (atomic on one filesystem), fsync the directory: after a crash
    or power loss ``final`` holds the whole new file or the whole old one, never a part.
    """
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _replace_synced(src, final)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic, durable rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp rather than atomic_file: a unique name even for two threads of one process
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file open()'s mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace_synced(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _replace_synced(src: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """``os.replace`` of an already fsynced file, then fsync of the directory holding the new name."""
    os.replace(src, final)
    _fsync_dir(Path(final).parent)


def _fsync_dir(path: Path) -> None:
    # a rename is only durable once the directory entry is: fsync the directory itself
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    # the umask can only be read by setting it; put it back at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as pretty, key-sorted JSON (stable diffs for DVC/git)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike[str]) -> str:
    """Content hash of a file or a directory tree (relative paths and bytes, sorted)."""
    root = Path(root)
    if root.is_file():
        return sha256_file(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()
