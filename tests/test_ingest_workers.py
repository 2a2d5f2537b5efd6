"""ingest.workers > 1 (vaepipe/stages/ingest_workers.py, ``WorkerPool``): workers read their own files (or
batch ranges of a big one) and hand back Arrow IPC files; the corpus is the same bytes as with
``workers: 1``, bad input gives the same one-line error, and no working file is left behind."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

import vaepipe.stages.readers as readers
from conftest import make_tiny_params
from vaepipe import cli
from vaepipe.core.config import IngestConfig, Params
from vaepipe.core.io import sha256_tree
from vaepipe.stages import ingest
from vaepipe.stages.ingest import TransformOptions, _transformed, raw_batches
from vaepipe.stages.ingest_workers import Part, WorkerPool, plan_parts, transform_part, with_validity
from vaepipe.stages.readers import BLOCK, InputFile, Readers, ReadOptions

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "light", "paper", "Mr.", "U.S.", "café"]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randrange(3, 14))).capitalize() + rng.choice([".", "!", "?"])


def _records(rng: random.Random, n: int, shared: list[str]) -> list[dict]:
    """Records of a few sentences; about one in five repeats a text every file draws from."""
    out = []
    for i in range(n):
        text = rng.choice(shared) if rng.random() < 0.2 else " ".join(_sentence(rng) for _ in range(4))
        out.append({"text": text, "title": f"t{rng.randrange(50)}", "n": i if i % 7 else None})
    return out


def _multi_file_corpus(d: Path) -> list[Path]:
    """Four .jsonl files named by split, with duplicates within and across files."""
    rng = random.Random(7)
    shared = [" ".join(_sentence(rng) for _ in range(3)) for _ in range(40)]
    d.mkdir()
    paths = []
    for name in ("a-train", "b-train", "c-valid", "d-test"):
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in _records(rng, 900, shared)), encoding="utf-8")
        paths.append(p)
    return paths


def _params(root: Path, inputs: list[Path], workers: int, *extra: str) -> Params:
    # small shards: several row groups, whose cuts follow the batches' nbytes
    return make_tiny_params(root, [f"ingest.inputs={json.dumps([str(i) for i in inputs])}", "ingest.min_chars=1",
                                   "ingest.shard_max_bytes=1000000", f"ingest.workers={workers}", *extra])


def _same_for_workers(tmp_path: Path, inputs: list[Path], *extra: str) -> dict:
    trees, stats = [], []
    for w in (1, 2):
        res = ingest.run(_params(tmp_path / f"w{w}", inputs, w, *extra))
        trees.append(sha256_tree(res.corpus))
        stats.append(res.stats)
    assert stats[0] == stats[1]
    assert trees[0] == trees[1]
    assert not list((tmp_path / "w2/data").glob(".corpus.tmp-*")), "working files left behind"
    return stats[0]


# ---------------------------------------------------------------------------------------
# The plan: a file per part, a big file cut into batch ranges


def test_plan_gives_a_part_per_file_when_files_are_even() -> None:
    parts = plan_parts([10 * BLOCK] * 4, 2, [True] * 4)
    assert parts == [Part(i) for i in range(4)]


def test_plan_cuts_a_file_larger_than_its_share_into_ranges() -> None:
    assert plan_parts([9 * BLOCK], 2, [True]) == [Part(0, 0, 4), Part(0, 4, None)]
    assert plan_parts([BLOCK // 2, 20 * BLOCK, BLOCK], 4, [True] * 3) == [
        Part(0), Part(1, 0, 5), Part(1, 5, 10), Part(1, 10, 15), Part(1, 15, None), Part(2)]


def test_plan_keeps_small_compressed_or_single_record_files_whole() -> None:
    assert plan_parts([BLOCK + 1], 2, [True]) == [Part(0)]  # one batch's worth: nothing to share
    assert plan_parts([9 * BLOCK], 2, [False]) == [Part(0)]


# ---------------------------------------------------------------------------------------
# Batch ranges of one file: together, exactly the file's batches and counts


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "BLOCK", 997)
    monkeypatch.setattr(readers, "BATCH_CHARS", 300)


def _text_file(path: Path) -> InputFile:
    rng = random.Random(3)
    paras = [" ".join(_sentence(rng) for _ in range(rng.randrange(1, 6))) for _ in range(400)]
    data = "\n\n".join(paras).encode()
    data = data[:5000] + b"\xff\x00" + data[5000:12000] + b"\0" + data[12000:]  # a bad byte and NULs
    path.write_bytes(data)
    return InputFile(path, path.name, "txt", None)


@pytest.mark.parametrize("cuts", [[0, 1, 3], [0, 5, 6, 30], [0, 2, 500, 900], [0]])
def test_batch_ranges_add_up_to_the_whole_file(tmp_path: Path, small_batches: None, cuts: list[int]) -> None:
    f = _text_file(tmp_path / "big.txt")
    cfg = IngestConfig(unit="sentence")
    read_opts, opts = ReadOptions.from_config(cfg), TransformOptions.from_config(cfg)
    whole_readers, whole_counts = Readers(read_opts), Counter[str]()
    whole = list(_transformed(raw_batches([f], whole_readers, whole_counts, None), opts))
    whole_counts.update(whole_readers.stats.as_dict())
    assert len(whole) > 10 and whole_counts["decode_replaced"] == 1 and whole_counts["nul_bytes"] == 2
    batches: list[pa.RecordBatch] = []
    counts = Counter[str]()
    for k, (a, b) in enumerate(zip(cuts, [*cuts[1:], None])):
        out = transform_part(f, Part(0, a, b), read_opts, opts, None, str(tmp_path / f"p{k}"))
        counts.update(out.read)
        for path, n in out.files:
            reader = pa.ipc.open_file(pa.memory_map(path))
            batches += [reader.get_batch(j) for j in range(n)]
        for c in out.counts:
            counts.update(c)
    assert [b.to_pydict() for b in batches] == [b.to_pydict() for b, _ in whole]
    for _, c in whole:
        whole_counts.update(c)
    assert +counts == +whole_counts


def test_with_validity_restores_nbytes() -> None:
    n = 37
    src = pa.array(["x"] * n).take(pa.array(list(range(n))))  # take: an all-valid bitmap
    batch = pa.record_batch([src, pa.array(range(n))], names=["source", "i"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    back = pa.ipc.open_file(sink.getvalue()).get_batch(0)
    assert src.buffers()[0] is not None and back.column(0).buffers()[0] is None  # what IPC does
    fixed = with_validity(back, ("source",))
    assert fixed.nbytes == batch.nbytes and fixed.equals(batch)


# ---------------------------------------------------------------------------------------
# The whole stage, workers 2 against workers 1 (spawned processes: slow)


@pytest.mark.slow
def test_fixture_corpus_same_bytes_with_workers(tmp_path: Path) -> None:
    trees = [sha256_tree(ingest.run(make_tiny_params(tmp_path / f"w{w}", [f"ingest.workers={w}"])).corpus)
             for w in (1, 2, 3)]
    assert trees[0] == trees[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["ingest.keep_columns=[title, n]"],
    ["ingest.keep_columns=[title, n]", "ingest.split_from=files"],
    ["ingest.keep_columns=[title]", "ingest.dedup=false"],
    ["ingest.split_from=files", "ingest.dedup=false", "ingest.unit=paragraph"],
    ["ingest.split_by=paragraph"],
])
def test_multi_file_corpus_same_bytes_with_workers(tmp_path: Path, extra: list[str]) -> None:
    stats = _same_for_workers(tmp_path, _multi_file_corpus(tmp_path / "in"), *extra)
    assert len(stats["shards"]) >= 1 and stats["records_out"] > 1000
    if "ingest.dedup=false" not in extra:
        assert stats["dropped"]["duplicate"] > 100  # within and across files


@pytest.mark.slow
def test_one_big_file_is_shared_and_gives_the_same_bytes(tmp_path: Path) -> None:
    rng = random.Random(5)
    big = tmp_path / "big.txt"
    with big.open("w", encoding="utf-8") as fh:
        while fh.tell() < 2 * BLOCK + 4096:
            fh.write(" ".join(_sentence(rng) for _ in range(rng.randrange(1, 8))) + "\n\n")
    assert len(plan_parts([big.stat().st_size], 2, [True])) == 2
    _same_for_workers(tmp_path, [big])


# ---------------------------------------------------------------------------------------
# Errors: the same one line as workers 1, nothing left behind


def _cli_err(root: Path, capsys: pytest.CaptureFixture[str], inputs: list[Path], workers: int) -> tuple[int, str]:
    root.mkdir()
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(root, inputs, workers).to_dict()), encoding="utf-8")
    capsys.readouterr()
    rc = cli.main(["-q", "ingest", "--params", str(params_file)])
    return rc, capsys.readouterr().err


@pytest.mark.slow
def test_bad_file_gives_the_same_error_with_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _multi_file_corpus(tmp_path / "in")
    bad = tmp_path / "in" / "e-train.jsonl"
    bad.write_text('{"text": "A good line."}\n{"text": broken}\n', encoding="utf-8")
    errs = [_cli_err(tmp_path / f"w{w}", capsys, [*good, bad], w) for w in (1, 2)]
    assert errs[0][0] == errs[1][0] == 1
    assert errs[0][1] == errs[1][1] and errs[1][1].count("\n") == 1
    assert "e-train.jsonl:2: not valid JSON" in errs[1][1]
    assert not list((tmp_path / "w2/data").glob(".corpus.*tmp*")) and not (tmp_path / "w2/data/corpus").exists()


@pytest.mark.slow
def test_failure_in_the_parent_leaves_no_working_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _multi_file_corpus(tmp_path / "in")

    def full(self: ingest.ShardWriter, batch: pa.RecordBatch) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest.ShardWriter, "write", full)
    with pytest.raises(OSError, match="No space left"):
        ingest.run(_params(tmp_path / "w2", inputs, 2))
    assert not [p.name for p in (tmp_path / "w2/data").iterdir() if p.name != ".corpus.lock"]


# ---------------------------------------------------------------------------------------
# Who takes a part: ingest itself while its worker is busy


def _small_files(d: Path, n: int) -> list[InputFile]:
    rng = random.Random(11)
    shared = [" ".join(_sentence(rng) for _ in range(3)) for _ in range(20)]
    d.mkdir()
    out = []
    for k in range(n):
        p = d / f"f{k:02d}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in _records(rng, 60, shared)), encoding="utf-8")
        out.append(InputFile(p, p.name, "jsonl", None))
    return out


def _busy_pool(tmp_path: Path, seconds: float) -> WorkerPool:
    """A pool of ``workers: 2`` (this process and one spawned worker) whose worker first sleeps."""
    pool = WorkerPool(2, tmp_path / "data" / "corpus", keep_validity=False)
    pool.pool.submit(time.sleep, seconds)
    return pool


@pytest.mark.slow
def test_ingest_takes_parts_ahead_while_its_worker_is_busy(tmp_path: Path) -> None:
    files = _small_files(tmp_path / "in", 12)
    cfg = IngestConfig(unit="sentence")
    read_opts, opts = ReadOptions.from_config(cfg), TransformOptions.from_config(cfg)
    alone_counts = Counter[str]()
    alone_readers = Readers(read_opts)
    alone = list(_transformed(raw_batches(files, alone_readers, alone_counts, None), opts))
    alone_counts.update(alone_readers.stats.as_dict())
    pool = _busy_pool(tmp_path, 3)
    try:
        counts = Counter[str]()
        got = list(pool.transform(files, Readers(read_opts), opts, counts, None))
    finally:
        pool.close()
    # part 0 streamed here, parts 1-2 sent to the sleeping worker, parts 3-4 made here meanwhile
    assert pool.here[:3] == [0, 3, 4], pool.here
    assert [b.to_pydict() for b, _ in got] == [b.to_pydict() for b, _ in alone]
    for _, c in got:
        counts.update(c)
    for _, c in alone:
        alone_counts.update(c)
    assert +counts == +alone_counts
    assert not list((tmp_path / "data").glob(".corpus.tmp-*")), "working files left behind"


@pytest.mark.slow
def test_an_error_in_a_part_made_ahead_waits_for_its_turn(tmp_path: Path) -> None:
    files = _small_files(tmp_path / "in", 6)
    for k in (1, 4):  # part 1 goes to the sleeping worker, part 4 is made here meanwhile
        files[k].path.write_text('{"text": "A good line."}\n{"text": broken}\n', encoding="utf-8")
    cfg = IngestConfig(unit="sentence")
    read_opts, opts = ReadOptions.from_config(cfg), TransformOptions.from_config(cfg)
    pool = _busy_pool(tmp_path, 3)
    try:
        with pytest.raises(Exception, match=r"f01\.jsonl:2: not valid JSON"):
            list(pool.transform(files, Readers(read_opts), opts, Counter[str](), None))
    finally:
        pool.close()
    assert 4 in pool.here
