"""Who may write an output, what a killed run left beside it, and how an OS error reads.

Every stage writes its outputs (``paths.corpus``, ``paths.model``, ...) by building them
beside the final place and renaming them in (``core.io``). Two runs on one output would
still race over those sibling folders, so a stage holds an exclusive lock on each output
for its whole run: ``output_locks``. The lock is ``flock`` on a file ``.NAME.lock`` beside
the output; the kernel releases it when the process ends, however it ends, so a killed run
never leaves a stale lock behind. The lock file itself stays (deleting it would let a
waiting process and a new one hold locks on two different files).

While the lock is held, nothing else writes that output, so whatever a killed run left
beside it (``.NAME.tmp-*``, ``.NAME.old-*``) is garbage: ``output_locks`` removes it. Those
deletions go through ``remove_leftover``, which refuses anything that is not such a
sibling.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vaepipe.core.errors import VaepipeError

if TYPE_CHECKING:
    from vaepipe.core.config import Params

log = logging.getLogger(__name__)

# the outputs each stage writes, as paths.* keys ("model" means paths.baseline for model.kind=lm)
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "ingest": ("corpus",),
    "tokenize": ("tokenizer", "tokens"),
    "train": ("model",),
    "evaluate": ("reports",),
    "embed": ("embeddings",),
}

# what a killed run of a stage can leave beside its output NAME (core.io and the stages make these)
LEFTOVER_PATTERNS = (".{name}.tmp-*", ".{name}.old-*")


class BusyError(VaepipeError):
    """Another vaepipe process is writing the same output."""


class OutputError(VaepipeError):
    """An output cannot be written: read-only or missing parent folder, full disk, ..."""


def stage_outputs(params: Params, stage: str) -> list[tuple[str, Path]]:
    """``[("paths.KEY", path), ...]``: the outputs ``stage`` writes under ``params``."""
    out = []
    for key in STAGE_OUTPUTS.get(stage, ()):
        if key == "model" and params.model.kind == "lm":
            key = "baseline"
        out.append((f"paths.{key}", Path(getattr(params.paths, key))))
    return out


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of ``output``: ``.NAME.lock`` in the same folder."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def output_locks(outputs: Sequence[tuple[str, str | os.PathLike[str]]], *, wait: bool = False) -> Iterator[None]:
    """Hold the write lock of every ``(key, path)`` in ``outputs`` for the block.

    Raises ``BusyError`` naming the key, the path and the holder's pid when another process
    holds one, unless ``wait``: then it blocks until the holder ends. Locks are taken in path
    order, so two waiting runs with overlapping outputs cannot deadlock. On entry the
    leftovers of killed runs beside each output are removed.
    """
    with contextlib.ExitStack() as stack:
        for key, path in sorted(outputs, key=lambda kp: str(Path(kp[1]).absolute())):
            stack.enter_context(_output_lock(key, Path(path), wait))
        yield


@contextlib.contextmanager
def _output_lock(key: str, output: Path, wait: bool) -> Iterator[None]:
    lock = lock_path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OutputError(f"{key} {output}: cannot write in {output.parent} ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            if not wait:
                raise BusyError(f"{key} {output} is being written by another vaepipe process (pid {holder}); "
                                "wait for it, or run with --wait") from None
            log.info("%s %s is being written by pid %s; waiting for it", key, output, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_leftovers(output)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
    except OSError:
        return "unknown"


def remove_leftovers(output: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed runs left beside ``output`` (the caller holds its lock); return it."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    removed = []
    for pattern in LEFTOVER_PATTERNS:
        for p in sorted(output.parent.glob(pattern.format(name=output.name))):
            log.info("removing %s, left by an interrupted run", p)
            remove_leftover(output, p)
            removed.append(p)
    return removed


def remove_leftover(output: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Delete ``path``, a working copy a run made beside ``output`` (file or folder).

    Refuses (``OutputError``, nothing deleted) anything that is not a direct sibling of
    ``output`` named ``.NAME.<something>`` with NAME the output's own name, or that is a
    symlink: a mistake in a caller must not be able to delete an output, an input or a
    folder above them.
    """
    output, path = Path(output).absolute(), Path(path).absolute()
    if (path.parent != output.parent or not path.name.startswith(f".{output.name}.")
            or path.name == lock_path(output).name or output.name in ("", ".", "..")):
        raise OutputError(f"refusing to delete {path}: not a working copy of {output}")
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path)


def filesystem_of(path: str | os.PathLike[str]) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would hold it)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def describe_os_error(e: OSError, outputs: Sequence[tuple[str, str | os.PathLike[str]]]) -> str | None:
    """One line for an OS error a user can act on (full disk, read-only place), else None.

    ``outputs`` are the ``(key, path)`` the failing command writes: a full disk is reported
    as the filesystem of the file the error names or, when it names none (pyarrow's errors),
    of the output with the least free space.
    """
    where = e.filename if e.filename else _fullest(outputs)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left" if e.errno == errno.ENOSPC else "disk quota exceeded"
        if where is None:
            return what
        return f"{what} on {filesystem_of(where)} (writing {where})"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and where is not None:
        return f"cannot write {where}: {e.strerror}"
    return None


def _fullest(outputs: Sequence[tuple[str, str | os.PathLike[str]]]) -> str | None:
    """The output whose filesystem has the least space left (None when there are none)."""
    def free(path: str | os.PathLike[str]) -> int:
        st = os.statvfs(filesystem_of(path))
        return st.f_bavail * st.f_frsize

    paths = [str(p) for _, p in outputs]
    return min(paths, key=free) if paths else None
