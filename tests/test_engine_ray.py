"""engine.kind: ray (vaepipe.adapters.engine_ray) against the local engine.

Equivalence is the contract: on the fixture corpus and on a multi-file corpus with duplicates
across files, Ray Data gives the local engine's corpus (rows in shard-name order, all columns;
stats but for the shard layout: Ray's workers write ``part-ITEM-K.parquet`` shards), token ids
and embeddings (same order, mu within 1e-6); a second Ray run gives the same bytes and names;
a batch that raises once and a worker killed mid-stage (in ingest's read or write phase) are
retried with the output unchanged. A real two-node cluster (``ray start``) runs the three
stages through the CLI.

One local Ray instance (2 CPUs) serves the module. Its workers see the fault-injection env
vars (set before it starts), which are armed by creating the marker file they name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_tiny_params
from vaepipe.core.config import Params
from vaepipe.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ray = pytest.importorskip("ray")
engine_ray = pytest.importorskip("vaepipe.adapters.engine_ray")


# ---------------------------------------------------------------------------------------
# No Ray instance needed


def test_actor_resources_one_gpu_per_actor_on_cuda():
    args = engine_ray.actor_args(4, "cuda", cluster_cpus=32)
    assert args["num_gpus"] == 1 and args["num_cpus"] == 1
    assert args["compute"].min_size == args["compute"].max_size == 4


def test_actor_resources_on_cpu_leave_room_for_the_feeding_tasks():
    assert "num_gpus" not in engine_ray.actor_args(1, "cpu", cluster_cpus=8)
    assert engine_ray.actor_args(2, "cpu", cluster_cpus=8)["num_cpus"] == 1.0
    small = engine_ray.actor_args(2, "cpu", cluster_cpus=2)["num_cpus"]
    assert 2 * small < 2  # 2 x 1 CPU on 2 CPUs would starve the rest and hang


def test_embed_actor_threads_are_its_share_of_the_cluster_unless_set():
    # Ray's OMP_NUM_THREADS=1 (the actor's CPU request) must not leave a lone actor one thread
    assert engine_ray.actor_threads(0, actors=1, cluster_cpus=2) == 2
    assert engine_ray.actor_threads(0, actors=2, cluster_cpus=2) == 1
    assert engine_ray.actor_threads(0, actors=3, cluster_cpus=2) == 1
    assert engine_ray.actor_threads(0, actors=4, cluster_cpus=32) == 8
    assert engine_ray.actor_threads(3, actors=1, cluster_cpus=2) == 3  # embed.num_threads wins


def test_token_writers_are_handed_the_largest_corpus_files_first(tmp_path):
    # a pool that ends on a big file leaves its other actors idle for that file's time
    files = []
    for name, size in (("a", 10), ("b", 30), ("c", 5), ("d", 30)):
        (tmp_path / name).write_bytes(b"x" * size)
        files.append(tmp_path / name)
    assert engine_ray.largest_first(files) == [1, 3, 0, 2]  # ties in file order
    assert engine_ray.largest_first([]) == []


def test_token_writer_takes_its_share_of_the_encoding_threads_unless_set(monkeypatch, tmp_path):
    from vaepipe.stages import tokenize

    def writer(threads: int) -> None:
        engine_ray._TokenWriter(tokenize.new_tokenizer().to_str(), [], tmp_path, tmp_path, pa.schema([]),
                                make_tiny_params(tmp_path), threads)

    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    writer(1)
    assert os.environ["RAYON_NUM_THREADS"] == "1"  # not one thread per core of the node per actor
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")
    writer(1)
    assert os.environ["RAYON_NUM_THREADS"] == "3"  # the user's setting stays


def test_items_are_runs_of_consecutive_files_of_about_shard_max_bytes(tmp_path):
    from vaepipe.stages.ingest import file_runs
    from vaepipe.stages.readers import InputFile

    files = []
    for i, size in enumerate([300, 300, 300, 2000, 100, 100]):
        (tmp_path / f"f{i}.txt").write_bytes(b"x" * size)
        files.append(InputFile(tmp_path / f"f{i}.txt", f"f{i}.txt", "txt", None))
    assert file_runs(files, 700) == [(0, 2), (2, 3), (3, 4), (4, 6)]  # a big file is an item alone
    assert file_runs(files, 1) == [(i, i + 1) for i in range(6)]
    assert file_runs([], 700) == []


def test_shard_names_sort_in_input_order():
    names = [engine_ray.shard_name(item).format(k) for item in (0, 1, 12) for k in (0, 1, 10)]
    assert names == sorted(names) and names[0] == "part-00000-000.parquet"


def test_shuffle_partitions_one_per_cpu_at_least():
    assert engine_ray.shuffle_partitions(10, 2.0) == 2
    many = 10 * engine_ray.SHUFFLE_PARTITION_BYTES // 16
    assert engine_ray.shuffle_partitions(many, 2.0) == 10


def test_embed_device_follows_the_cluster_gpus():
    assert engine_ray.embed_device("auto", 0) == "cpu"
    assert engine_ray.embed_device("auto", 2) == "cuda"
    assert engine_ray.embed_device("cpu", 2) == "cpu"
    assert engine_ray.embed_device("cuda", 0) == "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_a_one_line_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "vaepipe.cli", "ingest", "--set", "engine.kind=ray",
                        "--set", f"engine.address=127.0.0.1:{_free_port()}",
                        "--set", f"paths.corpus={tmp_path / 'corpus'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "engine.address" in lines[0] and "127.0.0.1" in lines[0], r.stderr
    assert not (tmp_path / "corpus").exists()


def test_bad_address_form_is_a_config_error():
    with pytest.raises(ConfigError, match="engine.address"):
        engine_ray.check_reachable("no-port-here")


def test_ray_missing_is_a_one_line_error_saying_how_to_install():
    code = ("import sys; sys.modules['ray'] = None\n"  # as if ray were not installed
            "from vaepipe.cli import main; sys.exit(main(['ingest', '--set', 'engine.kind=ray']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "pip install 'vaepipe[ray]'" in r.stderr


# ---------------------------------------------------------------------------------------
# One local Ray instance for the rest


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    """Marker files of the fault hooks: their env vars are set before Ray starts (so every
    worker sees them); creating a file arms its fault once."""
    d = tmp_path_factory.mktemp("faults")
    paths = {"fail": d / "fail-once", "kill": d / "kill-once"}
    saved = {k: os.environ.get(k) for k in (engine_ray.FAIL_ONCE_ENV, engine_ray.KILL_ONCE_ENV)}
    os.environ[engine_ray.FAIL_ONCE_ENV] = str(paths["fail"])
    os.environ[engine_ray.KILL_ONCE_ENV] = str(paths["kill"])
    yield paths
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def local_ray(markers):
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _params(root: Path, *extra: str) -> Params:
    return make_tiny_params(root, list(extra))


def _files(d: str | Path) -> dict[str, bytes]:
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _rows(d: str | Path) -> pa.Table:
    """All rows of the Parquet files under ``d``, files in name order (what the stages read)."""
    from vaepipe.stages.tokenize import corpus_files

    return pa.concat_tables([pq.read_table(f) for f in corpus_files(d)])


LAYOUT = ("shards", "bytes_out", "dedup_index_bytes")  # where a Ray corpus differs from a local one


def _stats(d: str | Path) -> dict:
    stats = json.loads((Path(d) / "_stats.json").read_text())
    return {k: v for k, v in stats.items() if k not in LAYOUT}


def _assert_same_corpus(ours: str | Path, theirs: str | Path) -> None:
    a, b = _rows(ours), _rows(theirs)
    assert a.schema == b.schema
    assert a.to_pydict() == b.to_pydict()
    assert _stats(ours) == _stats(theirs)
    shards = json.loads((Path(ours) / "_stats.json").read_text())["shards"]
    assert [s["name"] for s in shards] == sorted(p for p in _files(ours) if p != "_stats.json")
    assert sum(s["rows"] for s in shards) == a.num_rows


@pytest.fixture(scope="module")
def local_built(tmp_path_factory) -> Params:
    """The fixture corpus through the local engine (ingest, tokenize, train, embed)."""
    from vaepipe.stages import embed, ingest, tokenize, train

    params = _params(tmp_path_factory.mktemp("local"))
    ingest.run(params)
    tokenize.run(params)
    train.run(params)
    embed.run(params)
    return params


def _ray_params(root: Path, local: Params, *extra: str) -> Params:
    """Params for a Ray run under ``root`` that reuses the local run's trained model."""
    params = _params(root, "engine.kind=ray", *extra)
    if not Path(params.paths.model).exists():
        shutil.copytree(local.paths.model, params.paths.model)
    return params


@pytest.mark.slow
def test_fixture_corpus_ray_equals_local(local_ray, local_built, tmp_path):
    params = _ray_params(tmp_path, local_built)
    engine_ray.run_stage("ingest", params)
    _assert_same_corpus(params.paths.corpus, local_built.paths.corpus)
    engine_ray.run_stage("tokenize", params)
    assert _files(params.paths.tokenizer) == _files(local_built.paths.tokenizer)
    assert _rows(params.paths.tokens).to_pydict() == _rows(local_built.paths.tokens).to_pydict()
    engine_ray.run_stage("embed", params)
    ours, theirs = (pq.read_table(p.paths.embeddings) for p in (params, local_built))
    assert ours.column("doc_id").to_pylist() == theirs.column("doc_id").to_pylist()
    mu = np.array(ours.column("mu").to_pylist())
    assert mu.shape[0] > 0
    np.testing.assert_allclose(mu, np.array(theirs.column("mu").to_pylist()), rtol=0, atol=1e-6)
    manifests = [json.loads((Path(p.paths.embeddings) / "_manifest.json").read_text()) for p in (params, local_built)]
    assert manifests[0]["active_mask"] == manifests[1]["active_mask"]


def _multi_file_corpus(d: Path) -> Path:
    """Five files of two kinds; lines repeated within and across files, in varied order."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(7)
    words = "the a budget nation people state union congress year law war peace trade".split()
    pool = [" ".join(rng.choice(words, size=rng.integers(5, 14))).capitalize() + f" number {i}."
            for i in range(300)]
    for f in range(5):
        picks = rng.choice(len(pool), size=150)  # draws with replacement: duplicates everywhere
        lines = [pool[i] for i in picks]
        if f % 2:
            (d / f"part{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
        else:
            (d / f"part{f}.txt").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def multi_corpus(tmp_path_factory) -> tuple[Path, Params]:
    from vaepipe.stages import ingest

    root = tmp_path_factory.mktemp("multi")
    inputs = _multi_file_corpus(root / "inputs")
    params = _params(root / "local", f"ingest.inputs=[{inputs}]", "ingest.unit=line")
    result = ingest.run(params)
    assert result.stats["dropped"]["duplicate"] > 0  # the corpus does exercise de-duplication
    return inputs, params


def _ray_ingest_per_file(params: Params):
    """engine=ray ingest with each input file an item of its own (so duplicates cross items)."""
    from vaepipe.stages import ingest

    return ingest.run(params, write_corpus=engine_ray.ray_write_corpus(params, item_bytes=1))


@pytest.mark.slow
def test_multi_file_duplicates_across_files_first_occurrence_wins(local_ray, multi_corpus, tmp_path):
    inputs, local = multi_corpus
    params = _params(tmp_path / "a", f"ingest.inputs=[{inputs}]", "ingest.unit=line", "engine.kind=ray")
    result = _ray_ingest_per_file(params)
    assert len(result.shards) == 5  # one item per file: first occurrences decided across items
    _assert_same_corpus(params.paths.corpus, local.paths.corpus)
    assert result.stats["dedup_index_bytes"] == 0  # the driver holds no index
    # a second Ray run: the same names and bytes
    again = _params(tmp_path / "b", f"ingest.inputs=[{inputs}]", "ingest.unit=line", "engine.kind=ray")
    _ray_ingest_per_file(again)
    assert _files(again.paths.corpus) == _files(params.paths.corpus)


@pytest.mark.slow
def test_split_by_paragraph_ray_equals_local(local_ray, tmp_path):
    """ingest.split_by: paragraph travels to the read tasks: the Ray engine gives the local rows."""
    from vaepipe.stages import ingest

    local = _params(tmp_path / "local", "ingest.split_by=paragraph")
    ingest.run(local)
    params = _params(tmp_path / "ray", "ingest.split_by=paragraph", "engine.kind=ray")
    _ray_ingest_per_file(params)
    _assert_same_corpus(params.paths.corpus, local.paths.corpus)
    hashed = _params(tmp_path / "hashed")
    ingest.run(hashed)
    assert _rows(hashed.paths.corpus).column("split") != _rows(local.paths.corpus).column("split")


@pytest.mark.slow
def test_reproduction_mode_given_splits_no_dedup_word_vocabulary_ray_equals_local(local_ray, tmp_path):
    """Splits from file names, duplicates kept and a word vocabulary: the Ray engine reads the
    split of each file in its read tasks and gives the local engine's bytes."""
    from vaepipe.stages import ingest, tokenize

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for split, n in (("train", 120), ("valid", 30), ("test", 30)):
        lines = [f"the {split} line number {i % 40} of the union" for i in range(n)]  # repeats
        (inputs / f"{split}.txt").write_text("\n".join(lines) + "\n")
    extra = (f"ingest.inputs=[{inputs}]", "ingest.unit=line", "ingest.split_from=files", "ingest.dedup=false",
             "tokenize.kind=word", "tokenize.vocab_size=30")
    local = _params(tmp_path / "local", *extra)
    ingest.run(local)
    tokenize.run(local)
    params = _params(tmp_path / "ray", *extra, "engine.kind=ray")
    result = _ray_ingest_per_file(params)
    assert result.stats["splits"] == {"train": 120, "valid": 30, "test": 30}
    _assert_same_corpus(params.paths.corpus, local.paths.corpus)
    engine_ray.run_stage("tokenize", params)
    assert _files(params.paths.tokenizer) == _files(local.paths.tokenizer)
    assert _rows(params.paths.tokens).to_pydict() == _rows(local.paths.tokens).to_pydict()


@pytest.fixture(scope="module")
def ray_multi(local_ray, multi_corpus, tmp_path_factory) -> Params:
    """The multi-file corpus through engine=ray, no fault: what a faulted run must equal."""
    inputs, _ = multi_corpus
    params = _params(tmp_path_factory.mktemp("ray-multi"), f"ingest.inputs=[{inputs}]", "ingest.unit=line",
                     "engine.kind=ray")
    _ray_ingest_per_file(params)
    return params


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["fail", "kill"])
@pytest.mark.parametrize("phase", ["read", "write"])
def test_ingest_fault_in_one_task_is_retried_output_unchanged(markers, ray_multi, multi_corpus, tmp_path, fault,
                                                              phase):
    inputs, local = multi_corpus
    params = _params(tmp_path, f"ingest.inputs=[{inputs}]", "ingest.unit=line", "engine.kind=ray")
    marker = markers[fault] if phase == "read" else Path(f"{markers[fault]}.{phase}")
    marker.touch()
    _ray_ingest_per_file(params)
    assert not marker.exists()  # the fault did happen
    assert _files(params.paths.corpus) == _files(ray_multi.paths.corpus)
    _assert_same_corpus(params.paths.corpus, local.paths.corpus)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["fail", "kill"])
def test_tokenize_actor_fault_is_retried_output_unchanged(local_ray, markers, local_built, tmp_path, fault):
    params = _ray_params(tmp_path, local_built)
    shutil.copytree(local_built.paths.corpus, params.paths.corpus)
    markers[fault].touch()
    engine_ray.run_stage("tokenize", params)
    assert not markers[fault].exists()
    assert _files(params.paths.tokens) == _files(local_built.paths.tokens)


@pytest.mark.slow
def test_tokenize_workers_write_the_token_files_rerun_identical(local_ray, local_built, tmp_path, monkeypatch):
    """The actors write the token files; the driver sees only each file's counters (no token
    batch travels to it), and a second run writes the same bytes."""
    from vaepipe.stages import tokenize

    seen: list[dict] = []
    writer = engine_ray.ray_writer

    def spying(params):
        write = writer(params)

        def wrapped(*args):
            for stats in write(*args):
                seen.append(stats)
                yield stats
        return wrapped

    monkeypatch.setattr(engine_ray, "ray_writer", spying)
    outs = []
    for name in ("a", "b"):
        params = _ray_params(tmp_path / name, local_built)
        shutil.copytree(local_built.paths.corpus, params.paths.corpus)
        engine_ray.run_stage("tokenize", params)
        outs.append(_files(params.paths.tokens))
    assert outs[0] == outs[1] == _files(local_built.paths.tokens)
    corpus_files = tokenize.corpus_files(local_built.paths.corpus)
    assert len(seen) == 2 * len(corpus_files)
    assert all(isinstance(st, tokenize.SplitStats) for stats in seen for st in stats.values())


@pytest.mark.slow
def test_user_error_in_a_worker_is_the_local_one_line_error(local_ray, tmp_path):
    from vaepipe.core.errors import InputError

    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "ok.txt").write_text("A perfectly good sentence of text here.\n")
    (bad / "bad.jsonl").write_text('{"text": "fine line of text here"}\n{not json\n')
    params = _params(tmp_path, f"ingest.inputs=[{bad}]", "engine.kind=ray")
    with pytest.raises(InputError, match="bad.jsonl"):
        engine_ray.run_stage("ingest", params)
    assert not Path(params.paths.corpus).exists()


# ---------------------------------------------------------------------------------------
# A real cluster: a head and a second node, the three stages through the CLI


def _ray_cli(*args: str, env: dict[str, str]) -> None:
    ray_bin = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_bin), *args], env=env, check=True, capture_output=True, timeout=120)


@pytest.mark.slow
def test_two_node_cluster_runs_the_three_stages(local_built, tmp_path):
    port = _free_port()
    # token authentication, the token shared by the nodes and the CLI through the environment
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    for k in (engine_ray.FAIL_ONCE_ENV, engine_ray.KILL_ONCE_ENV):
        env.pop(k, None)
    # short paths: Ray's socket names must fit in 107 bytes
    head_tmp = Path(tempfile.mkdtemp(prefix="vrh", dir="/tmp"))
    node_tmp = Path(tempfile.mkdtemp(prefix="vrn", dir="/tmp"))
    address = f"127.0.0.1:{port}"
    try:
        _ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                 "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={head_tmp}", env=env)
        _ray_cli("start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                 "--disable-usage-stats", f"--temp-dir={node_tmp}", env=env)
        code = f"import ray; ray.init(address='{address}'); print(len([n for n in ray.nodes() if n['Alive']]))"
        nodes = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr
        root = tmp_path / "out"
        shutil.copytree(local_built.paths.model, root / "models/vae")
        from conftest import tiny_overrides

        sets = [x for o in [*tiny_overrides(root), "engine.kind=ray", f"engine.address={address}"]
                for x in ("--set", o)]
        for stage in ("ingest", "tokenize", "embed"):
            r = subprocess.run([sys.executable, "-m", "vaepipe.cli", stage, *sets], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
        _assert_same_corpus(root / "data/corpus", local_built.paths.corpus)
        assert _rows(root / "data/tokens").to_pydict() == _rows(local_built.paths.tokens).to_pydict()
        ours, theirs = (pq.read_table(p, columns=["doc_id", "mu"]) for p in
                        (root / "data/embeddings", local_built.paths.embeddings))
        assert ours.column("doc_id").to_pylist() == theirs.column("doc_id").to_pylist()
        np.testing.assert_allclose(np.array(ours.column("mu").to_pylist()),
                                   np.array(theirs.column("mu").to_pylist()), rtol=0, atol=1e-6)
    finally:
        for t in (node_tmp, head_tmp):  # each node's own processes, by their temp dir
            _stop_node(t)
            shutil.rmtree(t, ignore_errors=True)


def _stop_node(temp_dir: Path) -> None:
    """Kill the processes of the node whose --temp-dir is ``temp_dir`` (by PID, found in
    /proc by that argument), so the module's own Ray instance is left alone."""
    mine = f"{temp_dir}"
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mine in cmd and int(pid_dir.name) != os.getpid():
            try:
                os.kill(int(pid_dir.name), 9)
            except ProcessLookupError:
                pass
    time.sleep(0.5)
