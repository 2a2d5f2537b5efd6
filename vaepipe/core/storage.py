"""``s3://bucket/prefix`` outputs and inputs: versions, a pointer, and a local cache.

Any ``paths.*`` may be an S3 URI. An object store has no rename, so the local recipe
(build beside, rename into place) becomes:

1. The stage writes exactly as it does locally, into a local folder that stands for the
   URI (its *mirror*, in the cache; the usual ``.NAME.lock`` beside it serialises runs on
   one machine).
2. ``publish`` uploads that folder under a new, never reused prefix
   ``s3://bucket/prefix/.v/<version>/`` and only then replaces the pointer object
   ``s3://bucket/prefix/_CURRENT.json`` (a manifest naming the version and each file's size
   and sha256). One PUT of a small object is atomic: a reader sees the old manifest or the
   new one, never a mix.
3. Readers resolve the pointer first and then read only the files it names.
   ``materialise`` downloads the current version into the cache (checked against the
   manifest) and hands the stage a local folder; ``current_urls`` and ``open_dataset``
   give other tools (pyarrow, DuckDB) the files of the current version.
4. After the switch, versions that are neither current nor the one it replaced are deleted,
   once they are older than ``ORPHAN_GRACE_S`` (a concurrent writer may still be uploading
   one), through ``remove_version``, which refuses anything but a version folder.

Concurrent writers on different machines: each writes its own version; the pointer switch
is last-writer-wins, and both versions are complete. ``flock`` cannot lock an object store,
so nothing stronger is promised there.

Credentials come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``) or pyarrow's default chain;
the endpoint from ``VAEPIPE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``.
Secrets are never logged. The cache is ``VAEPIPE_S3_CACHE`` (default
``~/.cache/vaepipe/s3``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vaepipe.core.errors import ConfigError, InputError, VaepipeError
from vaepipe.core.io import atomic_dir, sha256_file, write_json

if TYPE_CHECKING:
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from vaepipe.core.config import Params

log = logging.getLogger(__name__)

SCHEME = "s3://"
POINTER = "_CURRENT.json"  # "_": dataset readers skip it when they list the prefix
VERSIONS = ".v"  # ".": dataset readers skip the version folders too
FORMAT = "vaepipe-s3-version/1"
ORPHAN_GRACE_S = 3600.0  # an unreferenced version younger than this may be a writer's upload in progress
_VERSION = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)-[0-9a-f]{8}$")
_THREADS = 8  # parallel transfers; S3 latency, not bandwidth, bounds small files

# what each stage reads ("?" marks an input the stage can do without); outputs: core.outputs
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "tokenize": ("corpus",),
    "train": ("tokens", "tokenizer?"),
    "evaluate": ("model", "baseline?", "tokens", "tokenizer", "corpus?"),  # corpus: the probe labels
    "embed": ("model", "tokens", "tokenizer"),
    "search": ("embeddings", "corpus", "model", "tokenizer"),  # `vaepipe neighbors`
}


class StorageError(VaepipeError):
    """The object store refused a request or is unreachable."""


# ---------------------------------------------------------------------------------------
# URIs


@dataclass(frozen=True)
class Location:
    """An ``s3://bucket/prefix`` URI taken apart (``prefix`` without slashes at either end)."""

    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def key(self, *parts: str) -> str:
        """``bucket/prefix/parts...``: the path pyarrow's S3FileSystem takes."""
        return "/".join((self.bucket, self.prefix, *parts))

    @property
    def pointer(self) -> str:
        return self.key(POINTER)

    def version_key(self, version: str) -> str:
        return self.key(VERSIONS, version)

    @property
    def posix(self) -> PurePosixPath:
        """``/bucket/prefix``: compare two locations as paths (overlap checks)."""
        return PurePosixPath("/", self.bucket, self.prefix)


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``s3://...`` (what this module handles); any other string is a local path."""
    return isinstance(path, str) and path.startswith(SCHEME)


def parse_uri(uri: str, key: str = "path") -> Location:
    """``s3://bucket/prefix`` -> Location; ConfigError naming ``key`` for a malformed URI.

    The prefix must be non-empty (an output replaces what lies under it: never a whole
    bucket) and made of plain segments: no empty, ``.`` or ``..`` ones, and no hidden
    ``.name`` ones (the version folders are ``.v``) or ``_CURRENT.json``.
    """
    if not is_uri(uri):
        raise ConfigError(f"{key} {uri}: not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[len(SCHEME):].partition("/")
    prefix = prefix.strip("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"{key} {uri}: {bucket!r} is not a valid bucket name")
    if not prefix:
        raise ConfigError(f"{key} {uri}: name a prefix inside the bucket (s3://{bucket}/PREFIX); "
                          "an output replaces what lies under it")
    for part in prefix.split("/"):
        if part in ("", ".", "..") or part.startswith(".") or part == POINTER:
            raise ConfigError(f"{key} {uri}: {part!r} cannot be part of the prefix "
                              "(empty, '.', '..', hidden names and _CURRENT.json are vaepipe's)")
    return Location(bucket, prefix)


# ---------------------------------------------------------------------------------------
# The filesystem


def endpoint_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The S3 endpoint URL the environment names, or None for AWS itself."""
    env = os.environ if env is None else env
    for name in ("VAEPIPE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if env.get(name):
            return env[name]
    return None


def s3_filesystem(env: Mapping[str, str] | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3FileSystem configured from the environment (see the module docstring).

    Explicit keys in the environment are passed on; without them pyarrow's default chain
    (profile files, instance metadata) applies. Only the endpoint and region are logged.
    """
    import pyarrow.fs as pafs

    env = os.environ if env is None else env
    kwargs: dict[str, Any] = {
        "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": 10.0,
        "request_timeout": 60.0,
    }
    endpoint = endpoint_from_env(env)
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"S3 endpoint {endpoint!r}: expected http(s)://HOST[:PORT]")
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                      session_token=env.get("AWS_SESSION_TOKEN") or None)
    log.debug("S3 endpoint %s, region %s", endpoint or "AWS", kwargs["region"])
    return pafs.S3FileSystem(**kwargs)


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """pyarrow's OSError from an S3 request -> StorageError naming ``what`` (FileNotFoundError passes)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(f"{what}: {first}") from None


# ---------------------------------------------------------------------------------------
# Versions and the pointer


def new_version_id(now: dt.datetime | None = None) -> str:
    """A version name that sorts by creation time and never repeats: ``UTCTIME-RANDOM``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(4)}"


def version_age_s(version: str, now: dt.datetime | None = None) -> float | None:
    """Seconds since ``version`` was created (from its name), None if it is not a version name."""
    m = _VERSION.match(version)
    if not m:
        return None
    born = dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=dt.timezone.utc)
    return ((now or dt.datetime.now(dt.timezone.utc)) - born).total_seconds()


def read_pointer(fs: pafs.S3FileSystem, loc: Location, attempts: int = 5) -> dict[str, Any] | None:
    """The manifest ``_CURRENT.json`` names, or None when nothing was published there.

    pyarrow reads an object with a HEAD and ranged GETs, so a read that overlaps a switch
    can mix the old and the new pointer; the manifest's own checksum catches that, and the
    pointer is read again.
    """
    problem = ""
    for attempt in range(attempts):
        with _s3_errors(f"{loc.uri}: cannot read {POINTER}"):
            try:
                with fs.open_input_stream(loc.pointer) as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
        manifest, problem = _parse_pointer(raw)
        if manifest is not None:
            return manifest
        log.debug("%s/%s: %s (read %d); reading it again", loc.uri, POINTER, problem, attempt + 1)
        time.sleep(0.05 * (attempt + 1))
    raise InputError(f"{loc.uri}/{POINTER}: not a vaepipe version pointer ({problem})")


def _checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _parse_pointer(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") or (None, what is wrong with ``raw``)."""
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT or not _VERSION.match(manifest["version"]):
            return None, "unknown format"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, str(e)
    if manifest.get("checksum") != _checksum(manifest):
        return None, "checksum mismatch"
    return manifest, ""


def tree_files(root: Path) -> list[dict[str, Any]]:
    """``[{"path", "bytes", "sha256"}]`` of every file under ``root``, sorted by path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files]


def publish(local_dir: str | os.PathLike[str], uri: str, *, fs: pafs.S3FileSystem | None = None,
            unchanged_from: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Upload the finished folder ``local_dir`` as a new version of ``uri`` and switch to it.

    Returns the manifest now in ``_CURRENT.json``. When ``unchanged_from`` (a manifest this
    folder was published as before) is still the current version and the files are the
    same, nothing is uploaded and that manifest is returned.
    """
    loc = parse_uri(uri)
    fs = fs or s3_filesystem()
    local_dir = Path(local_dir)
    files = tree_files(local_dir)
    before = read_pointer(fs, loc)
    if (before is not None and unchanged_from is not None
            and before["version"] == unchanged_from.get("version") and before["files"] == files):
        log.info("%s: already current (version %s)", uri, before["version"])
        return before
    version = new_version_id()
    root = loc.version_key(version)
    _transfer([(local_dir / f["path"], f"{root}/{f['path']}") for f in files], fs, upload=True,
              what=f"{uri}: upload of version {version}")
    manifest = {
        "format": FORMAT, "uri": loc.uri, "version": version, "root": f"{VERSIONS}/{version}",
        "previous": before["version"] if before else None, "files": files,
        "written_by": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    manifest["checksum"] = _checksum(manifest)
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    with _s3_errors(f"{uri}: cannot write {POINTER}"), fs.open_output_stream(loc.pointer) as out:
        out.write(data)  # the switch: one small object, replaced as a whole
    log.info("%s: published version %s (%d files, %d bytes)", uri, version, len(files),
             sum(f["bytes"] for f in files))
    remove_old_versions(fs, loc, keep={version, manifest["previous"]})
    return manifest


def remove_old_versions(fs: pafs.S3FileSystem, loc: Location, keep: set[str | None],
                        grace_s: float | None = None) -> list[str]:
    """Delete the versions of ``loc`` not in ``keep`` and older than ``grace_s`` (default
    ``ORPHAN_GRACE_S``); return them.

    Keeping the version just replaced lets a reader that resolved the pointer a moment
    before the switch finish; the grace spares a concurrent writer's upload in progress.
    Failures are logged, not raised: the new version is already current.
    """
    import pyarrow.fs as pafs

    grace_s = ORPHAN_GRACE_S if grace_s is None else grace_s
    removed = []
    try:
        infos = fs.get_file_info(pafs.FileSelector(loc.key(VERSIONS), allow_not_found=True))
    except OSError as e:
        log.warning("%s: cannot list old versions (%s)", loc.uri, str(e).splitlines()[0])
        return removed
    for info in infos:
        name = info.base_name
        age = version_age_s(name)
        if name in keep or age is None or age < grace_s:
            continue
        try:
            remove_version(fs, loc, name, keep)
            removed.append(name)
        except (OSError, StorageError) as e:
            log.warning("%s: cannot remove old version %s (%s)", loc.uri, name, str(e).splitlines()[0])
    return removed


def remove_version(fs: pafs.S3FileSystem, loc: Location, version: str, keep: set[str | None]) -> None:
    """Delete ``s3://bucket/prefix/.v/<version>/``; refuses (StorageError, nothing deleted) a
    name that is not a version's, one in ``keep``, and the one the pointer names now."""
    if not _VERSION.match(version) or version in keep:
        raise StorageError(f"refusing to delete {loc.uri}/{VERSIONS}/{version}: not an old version")
    current = read_pointer(fs, loc)
    if current is not None and current["version"] == version:
        raise StorageError(f"refusing to delete {loc.uri}/{VERSIONS}/{version}: it is the current version")
    log.info("removing old version %s/%s/%s", loc.uri, VERSIONS, version)
    fs.delete_dir(loc.version_key(version))


def _transfer(pairs: Sequence[tuple[Path, str]], fs: pafs.S3FileSystem, *, upload: bool, what: str) -> None:
    """Copy ``(local, key)`` pairs up (``upload``) or down, a few at a time."""
    def one(pair: tuple[Path, str]) -> None:
        local, key = pair
        if upload:
            with local.open("rb") as src, fs.open_output_stream(key) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(key) as src, local.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())

    with _s3_errors(what), ThreadPoolExecutor(max_workers=_THREADS) as pool:
        for _ in pool.map(one, pairs):
            pass


# ---------------------------------------------------------------------------------------
# Reading: the local cache and other readers


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """Where local copies of S3 locations live: ``VAEPIPE_S3_CACHE`` or ``~/.cache/vaepipe/s3``."""
    env = os.environ if env is None else env
    if env.get("VAEPIPE_S3_CACHE"):
        return Path(env["VAEPIPE_S3_CACHE"]).absolute()
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return (base / "vaepipe" / "s3").absolute()


def local_home(loc: Location, root: Path | None = None) -> Path:
    """The cache folder of one location: ``ROOT/bucket/LASTPART-HASH`` (the hash keeps nested
    prefixes apart). It holds ``output/`` (the mirror a stage writes) and ``v/<version>/``."""
    last = loc.prefix.rsplit("/", 1)[-1]
    digest = hashlib.sha256(loc.uri.encode()).hexdigest()[:12]
    return (root or cache_root()) / loc.bucket / f"{last}-{digest}"


def mirror_dir(loc: Location, root: Path | None = None) -> Path:
    """The local folder a stage writes for the output ``loc`` before it is published."""
    return local_home(loc, root) / "output"


@contextlib.contextmanager
def materialised(uri: str, *, fs: pafs.S3FileSystem | None = None, root: Path | None = None,
                 key: str = "path", attempts: int = 3) -> Iterator[Path | None]:
    """The current version of ``uri`` as a local folder for the block; None if none is published.

    The folder is ``v/<version>`` in the cache, downloaded once per version and checked
    against the manifest (sizes and sha256). A shared ``flock`` on it lasts for the block, so
    that another process's clean-up of old cached versions skips it. If the version is
    deleted while it downloads (a newer one replaced it), the pointer is read again.
    """
    loc = parse_uri(uri, key)
    fs = fs or s3_filesystem()
    home = local_home(loc, root)
    for attempt in range(attempts):
        manifest = read_pointer(fs, loc)
        if manifest is None:
            yield None
            return
        vdir = home / "v" / manifest["version"]
        try:
            fd = _fetch_locked(fs, loc, manifest, vdir)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise InputError(f"{key} {uri}: version {manifest['version']} vanished while it was read; "
                                 "is another writer replacing it faster than it can be read?") from None
            log.info("%s: version %s was replaced while downloading; reading the pointer again",
                     uri, manifest["version"])
            continue
        try:
            _evict_other_versions(home / "v", keep=vdir.name)
            yield vdir
        finally:
            os.close(fd)
        return


def _fetch_locked(fs: pafs.S3FileSystem, loc: Location, manifest: Mapping[str, Any], vdir: Path) -> int:
    """Download ``manifest``'s files into ``vdir`` unless present; return an fd holding LOCK_SH on it."""
    fd = _version_lock(vdir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one download per version, whoever comes first
        if not vdir.is_dir():
            root = f"{loc.bucket}/{loc.prefix}/{manifest['root']}"
            with atomic_dir(vdir) as tmp:
                _transfer([(tmp / f["path"], f"{root}/{f['path']}") for f in manifest["files"]], fs,
                          upload=False, what=f"{loc.uri}: download of version {manifest['version']}")
                _verify(tmp, manifest, loc)
            log.info("%s: downloaded version %s to %s", loc.uri, manifest["version"], vdir)
        fcntl.flock(fd, fcntl.LOCK_SH)  # readers share; eviction needs it exclusive
        return fd
    except BaseException:
        os.close(fd)
        raise


def _version_lock(vdir: Path) -> int:
    """An open fd on ``.VERSION.lock`` beside the cached version ``vdir`` (not locked yet)."""
    vdir.parent.mkdir(parents=True, exist_ok=True)
    return os.open(vdir.parent / f".{vdir.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def _verify(folder: Path, manifest: Mapping[str, Any], loc: Location) -> None:
    got = tree_files(folder)
    if got != manifest["files"]:
        want = {f["path"]: f for f in manifest["files"]}
        bad = next((g["path"] for g in got if want.get(g["path"]) != g), None) or "a missing file"
        raise InputError(f"{loc.uri}: version {manifest['version']} does not match its manifest ({bad})")


def _evict_other_versions(versions: Path, keep: str) -> None:
    """Remove cached versions other than ``keep`` that no process is reading (non-blocking)."""
    for lock in versions.glob(".*.lock"):
        name = lock.name[1:-len(".lock")]
        if name == keep or not _VERSION.match(name) or not (versions / name).is_dir():
            continue
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being read
        else:
            log.info("removing cached version %s", versions / name)
            shutil.rmtree(versions / name, ignore_errors=True)
        finally:
            os.close(fd)


def current_urls(uri: str, *, fs: pafs.S3FileSystem | None = None, suffix: str = ".parquet") -> list[str]:
    """``s3://`` URLs of the current version's files ending in ``suffix``, as a dataset reader
    sees them (names starting with "." or "_" skipped): hand them to DuckDB or pyarrow."""
    loc = parse_uri(uri)
    manifest = read_pointer(fs or s3_filesystem(), loc)
    if manifest is None:
        raise InputError(f"{uri}: nothing published there ({POINTER} missing)")
    return [f"{SCHEME}{loc.bucket}/{loc.prefix}/{manifest['root']}/{f['path']}" for f in manifest["files"]
            if f["path"].endswith(suffix) and not any(p.startswith((".", "_")) for p in f["path"].split("/"))]


def open_dataset(uri: str, *, fs: pafs.S3FileSystem | None = None) -> pads.Dataset:
    """The Parquet files of ``uri``'s current version as one pyarrow dataset, streamed from S3."""
    import pyarrow.dataset as pads

    fs = fs or s3_filesystem()
    keys = [u[len(SCHEME):] for u in current_urls(uri, fs=fs)]
    return pads.dataset(keys, filesystem=fs, format="parquet")


# ---------------------------------------------------------------------------------------
# The stage hook


def _is_main_process() -> bool:
    # torchrun sets RANK; only rank 0 writes outputs
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def staged(params: Params, stage: str) -> Iterator[Params]:
    """``params`` with this stage's ``s3://`` paths replaced by local folders, for the block.

    Inputs (``STAGE_INPUTS``) become the cached current version (a missing required input is
    an InputError naming the key and URI); outputs (``core.outputs.STAGE_OUTPUTS``) become
    their mirrors, which the stage locks and writes as usual. When the block succeeds, each
    output mirror is published (under its lock again, by rank 0 only); when it fails,
    nothing is published and the previous version stays current. Without any ``s3://``
    path, ``params`` is yielded unchanged and nothing else happens.
    """
    from vaepipe.core.outputs import stage_outputs

    out_keys = [k.removeprefix("paths.") for k, _ in stage_outputs(params, stage)]
    in_keys = [(k.rstrip("?"), not k.endswith("?")) for k in STAGE_INPUTS.get(stage, ())]
    uris = {k: getattr(params.paths, k) for k in [*out_keys, *(k for k, _ in in_keys)]
            if is_uri(getattr(params.paths, k))}
    if not uris:
        yield params
        return
    fs = s3_filesystem()
    root = cache_root()
    mapped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for key, required in in_keys:
            if key not in uris or key in out_keys:
                continue
            local = stack.enter_context(materialised(uris[key], fs=fs, root=root, key=f"paths.{key}"))
            if local is None and required:
                raise InputError(f"paths.{key} {uris[key]}: nothing published there ({POINTER} missing; "
                                 f"run the stage that writes paths.{key} first)")
            mapped[key] = str(local if local is not None else local_home(parse_uri(uris[key]), root) / "absent")
        outputs = {k: mirror_dir(parse_uri(uris[k], f"paths.{k}"), root) for k in out_keys if k in uris}
        for key in outputs:  # before the work: a missing bucket or refused keys show now, not after training
            check_writable_place(fs, uris[key], key=f"paths.{key}")
        mapped.update({k: str(p) for k, p in outputs.items()})
        yield dataclasses.replace(params, paths=dataclasses.replace(params.paths, **mapped))
        if _is_main_process():
            for key, mirror in outputs.items():
                publish_mirror(mirror, uris[key], key=f"paths.{key}", fs=fs)


def check_writable_place(fs: pafs.S3FileSystem, uri: str, *, key: str) -> None:
    """StorageError naming ``key`` and ``uri`` unless its bucket exists and its pointer can be read."""
    import pyarrow.fs as pafs

    loc = parse_uri(uri, key)
    with _s3_errors(f"{key} {uri}: cannot reach the bucket {loc.bucket}"):
        info = fs.get_file_info(loc.bucket)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{key} {uri}: the bucket {loc.bucket} does not exist "
                           "(or these credentials cannot see it)")
    try:
        read_pointer(fs, loc)
    except StorageError as e:
        raise StorageError(f"{key} {e}") from None


def publish_mirror(mirror: Path, uri: str, *, key: str, fs: pafs.S3FileSystem | None = None) -> dict[str, Any] | None:
    """Publish the output mirror of ``uri`` while holding its lock; remember what was
    published (``published.json`` beside it) so that an unchanged rerun uploads nothing."""
    from vaepipe.core.outputs import output_locks

    with output_locks([(key, mirror)], wait=True):
        if not mirror.is_dir():
            log.warning("%s %s: the stage wrote nothing; nothing published", key, uri)
            return None
        record = mirror.parent / "published.json"
        before = _read_json(record)
        manifest = publish(mirror, uri, fs=fs, unchanged_from=before)
        if manifest != before:
            write_json(record, manifest)
            _seed_cache(mirror, mirror.parent / "v" / manifest["version"])
        return manifest


def _seed_cache(mirror: Path, vdir: Path) -> None:
    """Hard-link the just-published files as that version's cache entry (readers on this
    machine skip the download). Stages replace files by rename, so the links stay intact."""
    fd = _version_lock(vdir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if vdir.exists():
            return
        with contextlib.suppress(OSError), atomic_dir(vdir) as tmp:  # no links (another filesystem): download later
            for p in sorted(mirror.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    (tmp / p.relative_to(mirror)).parent.mkdir(parents=True, exist_ok=True)
                    os.link(p, tmp / p.relative_to(mirror))
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
