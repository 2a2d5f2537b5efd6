"""Fault injection for the dataset stages (issue #15): damaged shards, concurrent and killed runs.

Every fault here is real: Parquet files with flipped bits, cut short or emptied on disk, two
`python -m vaepipe` processes on one output (the first held in place with SIGSTOP while it holds
its lock, which /proc/locks confirms), and a SIGKILL in the middle of an export. Nothing in the
failing path is mocked. The session fixture ``trained_model`` is only read: each test copies the
artifacts it damages into its own tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from vaepipe.cli import main
from vaepipe.core.config import Params
from vaepipe.core.io import sha256_file, sha256_tree
from vaepipe.core.outputs import lock_path, stage_outputs
from vaepipe.stages import embed, tokenize

from conftest import make_tiny_params

REPO = Path(__file__).resolve().parents[1]
QUERY = "the state of the union"


# ---------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def base(trained_model: Params) -> Params:
    return trained_model


def copy_pipeline(base: Params, root: Path, extra: tuple[str, ...] = ()) -> Params:
    """Params under ``root`` holding copies of base's corpus, tokenizer, tokens and models."""
    params = make_tiny_params(root, list(extra))
    for key in ("corpus", "tokenizer", "tokens", "model", "baseline"):
        shutil.copytree(getattr(base.paths, key), getattr(params.paths, key))
    return params


def write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict()))
    return path


def cli(params: Params, tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    rc = main([argv[0], "--params", str(write_params(params, tmp_path / "params.yaml")), *argv[1:]])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def flip_page_bit(path: Path, column: str) -> int:
    """Flip one bit inside a data page of ``column`` so that a read WITHOUT checksum checks
    silently returns other values (the dangerous damage); return the byte offset."""
    original = pq.read_table(path)
    data = path.read_bytes()
    md = pq.ParquetFile(path).metadata
    chunk = next(md.row_group(0).column(j) for j in range(md.num_columns)
                 if md.row_group(0).column(j).path_in_schema == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    lo, hi = chunk.data_page_offset + 16, start + chunk.total_compressed_size  # past the page header
    mid = (lo + hi) // 2
    for pos in sorted(range(lo, hi), key=lambda p: abs(p - mid)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        path.write_bytes(damaged)
        try:
            if not pq.read_table(path, page_checksum_verification=False).equals(original):
                return pos
        except (OSError, pa.ArrowException):
            pass
    path.write_bytes(data)
    raise AssertionError(f"{path}: no bit in {column}'s pages changes the data silently")


def damage_file(path: Path, how: str) -> None:
    """Make ``path`` an empty, a truncated or a corrupted (footer scrambled) Parquet file."""
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size and magic bytes, the footer's metadata overwritten
        footer_len = int.from_bytes(data[-8:-4], "little")
        path.write_bytes(data[: -8 - footer_len] + bytes([0xA5]) * footer_len + data[-8:])


def first_shard(folder: str | os.PathLike[str]) -> Path:
    return sorted(Path(folder).glob("*.parquet"))[0]


def leftovers(output: str | os.PathLike[str]) -> list[str]:
    """Names beside ``output`` that belong to it (``.NAME.*``) other than its lock file."""
    output = Path(output)
    return sorted(p.name for p in output.parent.glob(f".{output.name}.*") if p != lock_path(output))


def env() -> dict[str, str]:
    """This checkout first on the path of a child process, one torch thread, no colour."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def spawn(stage: str, params_file: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vaepipe", stage, "--params", str(params_file)],
                            env=env(), cwd=params_file.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def holds_flock(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds an flock on ``path`` (/proc/locks: the kernel's own table)."""
    ino = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and f[1] == "FLOCK" and f[4] == str(pid) and f[5].rsplit(":", 1)[-1] == str(ino):
            return True
    return False


def wait_for(cond, proc: subprocess.Popen[str], what: str, limit_s: float = 300.0) -> None:
    """Poll ``cond()`` until true; fail (with the child's stderr) if ``proc`` ends first."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after {limit_s} s")
        time.sleep(0.005)


def scaled_copy(src: Path, dest: Path, copies: int) -> None:
    """Each Parquet file of ``src`` repeated ``copies`` times (doc ids made unique) into ``dest``;
    schema metadata (the tokenizer stamp) kept. More rows: a run long enough to catch mid-way."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.parquet")):
        t = pq.read_table(f)
        i = t.schema.get_field_index("doc_id")
        parts = [t.set_column(i, "doc_id", pc.binary_join_element_wise(t.column(i), f"-{k}", ""))
                 for k in range(copies)]
        pq.write_table(pa.concat_tables(parts), dest / f.name, compression="zstd")


# ---------------------------------------------------------------------------------------
# Dataset folders read whole


def test_tokens_and_embeddings_folders_read_whole_without_a_glob(base: Params, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    embed.run(base.replace(paths={"embeddings": str(out)}))
    tokens = Path(base.paths.tokens)
    assert (tokens / tokenize.STATS_FILE).is_file() and not (tokens / "stats.json").exists()
    for folder in (tokens, out):
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))
        assert rows > 0
        assert pq.read_table(folder).num_rows == rows
        assert len(pd.read_parquet(folder)) == rows
        assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}')").fetchall() == [(rows,)]


# ---------------------------------------------------------------------------------------
# Flipped bits inside a page: page checksums


@pytest.mark.parametrize("stage", ["train", "evaluate", "embed"])
def test_a_flipped_bit_in_a_token_page_is_an_error_naming_the_file(
        base: Params, tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: str) -> None:
    p = copy_pipeline(base, tmp_path / "w")
    shard = first_shard(p.paths.tokens)
    # doc_id: the reported case (embed exported 32 "ffff..." ids with exit 0); ids: what train reads
    flip_page_bit(shard, "doc_id" if stage == "embed" else "ids.list.element")
    model_before = sha256_tree(p.paths.model)
    rc, _, err = cli(p, tmp_path, capsys, stage)
    assert rc == 1, err
    assert re.fullmatch(rf"vaepipe {stage}: error: {re.escape(str(shard))}: a damaged Parquet page "
                        r"\(page checksum mismatch: .*\); rerun `vaepipe tokenize`", error_line(err)), err
    assert sha256_tree(p.paths.model) == model_before
    assert not Path(p.paths.reports).exists() and not Path(p.paths.embeddings).exists()


def test_a_flipped_bit_in_an_embeddings_page_fails_neighbors_and_embed_repairs_it(
        base: Params, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = copy_pipeline(base, tmp_path / "w")
    embed.run(p)
    shard = first_shard(p.paths.embeddings)
    flip_page_bit(shard, "mu.list.element")
    rc, out, err = cli(p, tmp_path, capsys, "neighbors", QUERY)
    assert rc == 1 and out == "", err
    assert re.fullmatch(rf"vaepipe neighbors: error: {re.escape(str(shard))}: a damaged Parquet page "
                        r"\(page checksum mismatch: .*\); rerun `vaepipe embed`", error_line(err)), err
    # the export's manifest and sizes still match: embed must not call it "up to date"
    rc, _, err = cli(p, tmp_path, capsys, "embed")
    assert rc == 0, err
    assert pq.read_table(shard, page_checksum_verification=True).num_rows > 0
    rc, out, err = cli(p, tmp_path, capsys, "neighbors", QUERY)
    assert rc == 0 and len(out.splitlines()) == 10, err


def test_a_flipped_bit_in_a_corpus_page_fails_tokenize_and_neighbors(
        base: Params, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = copy_pipeline(base, tmp_path / "w")
    embed.run(p)
    shard = first_shard(p.paths.corpus)
    # a corpus whose pages carry checksums (readers check them wherever a writer put them)
    pq.write_table(pq.read_table(shard), shard, compression="zstd", write_page_checksum=True)
    flip_page_bit(shard, "text")
    tokens_before = sha256_tree(p.paths.tokens)
    for stage, argv in (("tokenize", ()), ("neighbors", (QUERY,))):
        rc, out, err = cli(p, tmp_path, capsys, stage, *argv)
        assert rc == 1 and out == "", err
        assert re.fullmatch(rf"vaepipe {stage}: error: {re.escape(str(shard))}: a damaged Parquet page "
                            r"\(page checksum mismatch: .*\); rerun `vaepipe ingest`", error_line(err)), err
    assert sha256_tree(p.paths.tokens) == tokens_before


def test_token_and_embedding_pages_carry_checksums(base: Params, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    embed.run(base.replace(paths={"embeddings": str(out)}))
    for i, shard in enumerate((first_shard(base.paths.tokens), first_shard(out))):
        copy = tmp_path / f"{i}.parquet"
        shutil.copyfile(shard, copy)
        flip_page_bit(copy, "doc_id")  # read back wrong without a check ...
        with pytest.raises(OSError, match="CRC checksum verification failed"):  # ... caught with one
            pq.read_table(copy, page_checksum_verification=True)


# ---------------------------------------------------------------------------------------
# Empty, truncated and corrupted shards


@pytest.mark.parametrize("how", ["empty", "truncated", "corrupted"])
@pytest.mark.parametrize(("stage", "dataset", "producer"), [
    ("train", "tokens", "tokenize"), ("evaluate", "tokens", "tokenize"), ("embed", "tokens", "tokenize"),
    ("neighbors", "embeddings", "embed"), ("neighbors", "corpus", "ingest")])
def test_an_invalid_shard_is_one_line_naming_the_file(
        base: Params, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        stage: str, dataset: str, producer: str, how: str) -> None:
    p = copy_pipeline(base, tmp_path / "w")
    if stage == "neighbors":
        embed.run(p)
    shard = first_shard(getattr(p.paths, dataset))
    damage_file(shard, how)
    model_before = sha256_file(Path(p.paths.model) / "best.pt")
    rc, out, err = cli(p, tmp_path, capsys, stage, *((QUERY,) if stage == "neighbors" else ()))
    assert rc == 1 and out == "", err
    assert re.fullmatch(rf"vaepipe {stage}: error: {re.escape(str(shard))}: not a valid Parquet file "
                        rf"\(.+\); rerun `vaepipe {producer}`", error_line(err)), err
    assert sha256_file(Path(p.paths.model) / "best.pt") == model_before


# ---------------------------------------------------------------------------------------
# Two runs on one output; a run killed mid-way


def busy_setup(base: Params, root: Path, stage: str) -> Params:
    """A copy of the pipeline where ``stage`` runs for seconds (more rows), not milliseconds."""
    if stage == "embed":
        p = copy_pipeline(base, root, ("embed.shard_rows=200", "embed.row_group_rows=100"))
        shutil.rmtree(p.paths.tokens)
        scaled_copy(Path(base.paths.tokens), Path(p.paths.tokens), 15)
    elif stage == "tokenize":
        tok = Path(base.paths.tokenizer) / tokenize.TOKENIZER_FILE
        p = copy_pipeline(base, root, (f"tokenize.tokenizer_path={tok}", "tokenize.batch_size=512"))
        shutil.rmtree(p.paths.corpus)
        shutil.rmtree(p.paths.tokens)
        shutil.rmtree(p.paths.tokenizer)
        scaled_copy(Path(base.paths.corpus), Path(p.paths.corpus), 100)
    else:
        p = copy_pipeline(base, root)
    return p


def check_complete(p: Params, stage: str) -> None:
    if stage == "embed":
        manifest = embed.read_manifest(Path(p.paths.embeddings))
        rows = pq.read_table(p.paths.tokens).num_rows
        assert manifest["rows"] == rows == pq.read_table(p.paths.embeddings).num_rows
    elif stage == "tokenize":
        stats = json.loads((Path(p.paths.tokens) / tokenize.STATS_FILE).read_text())
        assert pq.read_table(p.paths.tokens).num_rows == sum(s["kept"] for s in stats["splits"].values())
        assert (Path(p.paths.tokenizer) / tokenize.TOKENIZER_FILE).is_file()
    else:
        assert json.loads((Path(p.paths.reports) / "metrics.json").read_text())["n_docs"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tokenize", "evaluate", "embed"])
def test_two_concurrent_runs_one_succeeds_the_other_is_told_who_holds_the_output(
        base: Params, tmp_path: Path, stage: str) -> None:
    p = busy_setup(base, tmp_path / "w", stage)
    params_file = write_params(p, tmp_path / "params.yaml")
    outputs = stage_outputs(p, stage)
    first = spawn(stage, params_file)
    try:
        # the first run holds every lock of the stage: stop it right there (SIGSTOP) ...
        wait_for(lambda: all(lock_path(o).is_file() and holds_flock(first.pid, lock_path(o)) for _, o in outputs),
                 first, "the first run's locks")
        os.kill(first.pid, signal.SIGSTOP)
        assert all(holds_flock(first.pid, lock_path(o)) for _, o in outputs)
        # ... and start the second: it must fail at once, naming the output and the holder
        second = subprocess.run([sys.executable, "-m", "vaepipe", stage, "--params", str(params_file)],
                                env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        key, path = outputs[0] if stage != "tokenize" else sorted(outputs, key=lambda kp: str(kp[1]))[0]
        assert second.returncode == 1, second.stderr
        assert error_line(second.stderr) == (
            f"vaepipe {stage}: error: {key} {path} is being written by another vaepipe process "
            f"(pid {first.pid}); wait for it, or run with --wait")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    check_complete(p, stage)
    for _, output in outputs:
        assert leftovers(output) == []


def kill_then_rerun(stage: str, p: Params, tmp_path: Path, out: Path, pattern: str, what: str) -> None:
    """Run ``stage``, SIGKILL it once ``pattern`` exists beside ``out``, rerun it: the rerun
    succeeds and nothing the killed run left is still there."""
    pfile = write_params(p, tmp_path / "params.yaml")
    run = spawn(stage, pfile)
    wait_for(lambda: any(out.parent.glob(pattern)), run, what)
    os.kill(run.pid, signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert not out.exists() and leftovers(out), f"the kill came after {stage} finished"
    rerun = subprocess.run([sys.executable, "-m", "vaepipe", stage, "--params", str(pfile)],
                           env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(out) == []


@pytest.mark.slow
def test_an_embed_killed_mid_export_leaves_nothing_after_the_next_run(base: Params, tmp_path: Path) -> None:
    p = busy_setup(base, tmp_path / "w", "embed")
    out = Path(p.paths.embeddings)
    # SIGKILL once the first shard of the staging folder is complete: mid-export, for real
    kill_then_rerun("embed", p, tmp_path, out, f".{out.name}.partial-*/part-00000.parquet", "a first shard")
    assert not [q.name for q in out.iterdir() if q.name.startswith(".")]
    check_complete(p, "embed")
    # the resumed export equals one made in one go
    ref = tmp_path / "ref"
    embed.run(p.replace(paths={"embeddings": str(ref)}))
    assert pq.read_table(out).equals(pq.read_table(ref))


@pytest.mark.slow
def test_a_tokenize_killed_mid_encoding_leaves_nothing_after_the_next_run(base: Params, tmp_path: Path) -> None:
    p = busy_setup(base, tmp_path / "w", "tokenize")
    tokens = Path(p.paths.tokens)
    kill_then_rerun("tokenize", p, tmp_path, tokens, f".{tokens.name}.tmp-*/*.parquet", "a token file being written")
    assert leftovers(p.paths.tokenizer) == []
    check_complete(p, "tokenize")
