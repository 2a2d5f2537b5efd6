"""Faults in ingest's input and output, replayed for real (issue #15): unreadable folders,
symlink loops, unclosed CSV quotes, binary files, a 50 MB line, a killed parent with workers,
a corpus folder that other tools must read as a whole, flipped bytes in a shard.

Every case makes the real thing (damaged bytes, links, permission bits, a SIGKILL) and runs
the real code, most through the CLI; none mocks the part that fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import make_tiny_params
from vaepipe import cli
from vaepipe.core.config import Params
from vaepipe.stages import ingest

ROOT = Path(__file__).resolve().parents[1]


def _params_file(root: Path, inputs: list[Path], *extra: str) -> Path:
    params = make_tiny_params(root, [f"ingest.inputs={json.dumps([str(i) for i in inputs])}",
                                     "ingest.min_chars=1", *extra])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict()), encoding="utf-8")
    return path


def _cli(root: Path, capsys: pytest.CaptureFixture[str], inputs: list[Path], *sets: str) -> tuple[int, str]:
    args = ["-q", "ingest", "--params", str(_params_file(root, inputs))]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    rc = cli.main(args)
    return rc, capsys.readouterr().err


def _one_error(err: str, *fragments: str) -> None:
    assert err.count("\n") == 1 and err.startswith("vaepipe ingest: error: "), err
    for frag in fragments:
        assert frag in err, err


def _stats(root: Path) -> dict:
    return json.loads((root / "data/corpus/_stats.json").read_text())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}


# ---------------------------------------------------------------------------------------
# Unreadable folders and symlinks inside an input folder


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _without_root_read_override() -> None:
    """preexec_fn: root reads any folder whatever its bits (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH); dropped from the bounding set, the exec'd child has them no more."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
            if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                os._exit(99)


def _run_restricted(root: Path, inputs: list[Path], *sets: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "vaepipe", "-q", "ingest", "--params", str(_params_file(root, inputs))]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=root, env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_without_root_read_override)


def _skip_unless_bits_bind(locked: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])", str(locked)],
                           capture_output=True, timeout=60, preexec_fn=_without_root_read_override)
    if probe.returncode == 0 or probe.returncode == 99:
        pytest.skip("cannot make a folder unreadable here: root keeps its read override "
                    "(no CAP_SETPCAP to drop it)")


def _tree_with_locked_folder(root: Path) -> tuple[Path, Path]:
    src = root / "in"
    (src / "locked").mkdir(parents=True)
    for i in range(4):
        (src / f"f{i}.txt").write_text(f"Readable file number {i}.\n", encoding="utf-8")
    (src / "locked" / "f4.txt").write_text("The fifth file, in a folder nobody may list.\n", encoding="utf-8")
    os.chmod(src / "locked", 0o000)
    return src, src / "locked"


def test_unreadable_subfolder_is_an_error_naming_it(tmp_path: Path) -> None:
    src, locked = _tree_with_locked_folder(tmp_path)
    _skip_unless_bits_bind(locked)
    proc = _run_restricted(tmp_path, [src])
    assert proc.returncode == 1, proc.stderr
    _one_error(proc.stderr, f"{locked}: cannot read folder: Permission denied", "ingest.on_unreadable")
    assert not (tmp_path / "data/corpus").exists()
    os.chmod(locked, 0o755)  # so that pytest can remove it


def test_unreadable_subfolder_skipped_and_counted_when_asked(tmp_path: Path) -> None:
    src, locked = _tree_with_locked_folder(tmp_path)
    _skip_unless_bits_bind(locked)
    proc = _run_restricted(tmp_path, [src], "ingest.on_unreadable=skip")
    os.chmod(locked, 0o755)  # so that pytest can remove it
    assert proc.returncode == 0, proc.stderr
    assert f"{locked}: cannot read folder: Permission denied; skipped" in proc.stderr  # the warning
    stats = _stats(tmp_path)
    assert stats["unreadable"] == 1 and stats["files"] == 4 and stats["records_out"] == 4


def test_symlink_loop_to_a_parent_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Some text to read.\n", encoding="utf-8")
    (src / "sub" / "back").symlink_to("..")
    rc, err = _cli(tmp_path, capsys, [src])
    assert rc == 1
    _one_error(err, f"{src / 'sub' / 'back'}: cannot read folder: symlink loop")
    assert not (tmp_path / "data/corpus").exists()

    rc, err = _cli(tmp_path, capsys, [src], "ingest.on_unreadable=skip")
    assert rc == 0, err
    assert _stats(tmp_path)["unreadable"] == 1 and _stats(tmp_path)["files"] == 1


def test_looping_and_dangling_file_links_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("Some text to read.\n", encoding="utf-8")
    (src / "x.txt").symlink_to("y.txt")
    (src / "y.txt").symlink_to("x.txt")
    rc, err = _cli(tmp_path, capsys, [src])
    assert rc == 1
    _one_error(err, f"{src / 'x.txt'}: cannot follow symlink: symlink loop")
    rc, err = _cli(tmp_path, capsys, [src / "x.txt"])  # named, not found in a folder
    assert rc == 1
    _one_error(err, "x.txt: symlink loop")

    for link in ("x.txt", "y.txt"):
        (src / link).unlink()
    (src / "gone.txt").symlink_to("nowhere.txt")
    rc, err = _cli(tmp_path, capsys, [src])
    assert rc == 1
    _one_error(err, f"{src / 'gone.txt'}: cannot follow symlink: No such file or directory")


def test_symlinked_folder_is_read(tmp_path: Path) -> None:
    """A linked folder inside an input folder is followed (it used to be left out silently)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.txt").write_text("Text behind a link.\n", encoding="utf-8")
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("Text in the folder.\n", encoding="utf-8")
    (src / "linked").symlink_to(elsewhere)
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{src}]", "ingest.min_chars=1", "ingest.unit=line"])
    res = ingest.run(params)
    texts = pq.read_table(res.corpus).column("text").to_pylist()
    assert sorted(texts) == ["Text behind a link.", "Text in the folder."]


# ---------------------------------------------------------------------------------------
# CSV: a quote that is never closed


NEVER_CLOSED = b'id,text\n1,"A fine row."\n2,"This quote is never closed.\n3,Another row.\n4,Last row.\n'
CLOSED_BY_NEXT = b'id,text\n1,"A fine row."\n2,"This quote is not closed.\n3,Another row.\n4,"Fine."\n5,Last.\n'


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("last_column.csv", NEVER_CLOSED, "last_column.csv:3: the quoted field that opens on this line is never closed"),
    ("first_column.csv", b'text,id\n"Fine.",1\n"Unclosed,2\nMore,3\n',
     "first_column.csv:3: the quoted field that opens on this line is never closed"),
    ("compressed.csv.gz", gzip.compress(NEVER_CLOSED), "compressed.csv.gz:3: the quoted field that opens on this"),
    ("tabs.tsv", NEVER_CLOSED.replace(b",", b"\t"), "tabs.tsv:3: the quoted field that opens on this line is"),
    ("middle.csv", CLOSED_BY_NEXT,
     "middle.csv:3: the quoted field that opens on this line closes on line 5 with text after the quote"),
])
def test_csv_unclosed_quote_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           name: str, data: bytes, expected: str) -> None:
    f = tmp_path / name
    f.write_bytes(data)
    rc, err = _cli(tmp_path, capsys, [f])
    assert rc == 1
    _one_error(err, expected, "a missing closing quote?")


def test_csv_quote_that_swallows_many_rows_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unclosed quote closed by chance much later: a field over 1000 x max_chars (1 MB here)."""
    f = tmp_path / "long.csv"
    rows = b"".join(b"%d,Plain row number %d.\n" % (i, i) for i in range(3, 60_000))
    f.write_bytes(b'id,text\n1,"ok"\n2,"opens here\n' + rows + b'70000,"closes here"\n')
    rc, err = _cli(tmp_path, capsys, [f])
    assert rc == 1
    _one_error(err, "long.csv:3: the quoted field that opens on this line runs for over 1048576 bytes")


def test_csv_closed_multiline_last_field_is_fine(tmp_path: Path) -> None:
    f = tmp_path / "ok.csv"
    f.write_bytes(b'id,text\n1,"He said ""hi"" and\nleft."\n2,"Two\nlines, closed at the end."')
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{f}]", "ingest.min_chars=1", "ingest.unit=document"])
    texts = pq.read_table(ingest.run(params).corpus).column("text").to_pylist()
    assert sorted(texts) == ['He said "hi" and left.', "Two lines, closed at the end."]


# ---------------------------------------------------------------------------------------
# Binary files: decided on the share of bad bytes, not on one NUL


def test_garbage_without_nul_bytes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "noise.txt"
    f.write_bytes(bytes(b for b in random.Random(0).randbytes(20_000) if b))
    rc, err = _cli(tmp_path, capsys, [f])
    assert rc == 1
    _one_error(err, "noise.txt: looks binary (", "control bytes or invalid UTF-8, over 10%")


@pytest.mark.parametrize(("name", "data"), [
    ("nul.txt", b"A good line\0 with one NUL in it.\nAnother good line.\n"),
    ("nul.csv", b'id,text\n1,"A good line\0 with one NUL in it."\n2,Another good line.\n'),
    ("nul.jsonl", b'{"text": "A good line with one NUL in it."}\0\n{"text": "Another good line."}\n'),
])
def test_one_nul_byte_is_stripped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              name: str, data: bytes) -> None:
    f = tmp_path / name
    f.write_bytes(data)
    rc, err = _cli(tmp_path, capsys, [f], "ingest.unit=line")
    assert rc == 0, err
    texts = pq.read_table(tmp_path / "data/corpus").column("text").to_pylist()
    assert texts == ["A good line with one NUL in it.", "Another good line."]
    assert _stats(tmp_path)["nul_bytes"] == 1


# ---------------------------------------------------------------------------------------
# One 50 MB line


@pytest.mark.slow
def test_50mb_line_as_document_is_dropped_in_bounded_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    with big.open("wb") as fh:
        # 1 MB, no line break anywhere; not Latin-1 and not NFC, so every copy of it is costly
        block = ("sl\u00f6w\u0301 " * 125_000).encode()
        for _ in range(50):
            fh.write(block)
    small = tmp_path / "small.txt"
    small.write_text("A small document that fits.\n", encoding="utf-8")
    params = _params_file(tmp_path, [big, small], "ingest.unit=document")
    # the child's peak RSS, measured by a parent that has no other children
    probe = ("import resource, subprocess, sys; "
             "rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "vaepipe", "-q", "ingest",
                          "--params", str(params)], env=_env(), capture_output=True, text=True, timeout=300)
    rc, peak_kib = map(int, out.stdout.split())
    assert rc == 0, out.stderr
    assert peak_kib < 600 * 1024, f"peak RSS {peak_kib // 1024} MB"
    stats = _stats(tmp_path)
    assert stats["dropped"]["too_long"] == 1 and stats["records_out"] == 1


def test_long_document_with_spaces_at_block_ends_keeps_its_words(tmp_path: Path) -> None:
    """Blocks of a document are cut anywhere; a space cut off one still parts two words."""
    f = tmp_path / "doc.txt"
    f.write_bytes(b" " * (3 << 20) + b"one" + b" " * (2 << 20) + b"two\n")
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{f}]", "ingest.min_chars=1", "ingest.unit=document"])
    assert pq.read_table(ingest.run(params).corpus).column("text").to_pylist() == ["one two"]


# ---------------------------------------------------------------------------------------
# Workers die with a killed parent


def _write_big_corpus(d: Path) -> None:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "river", "stone", "cloud", "light", "paper"]
    d.mkdir()
    for n in range(8):
        lines = [" ".join(rng.choices(words, k=12)).capitalize() + "." for _ in range(60_000)]
        (d / f"part{n}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_sigkill_of_parent_leaves_no_workers(tmp_path: Path) -> None:
    src = tmp_path / "in"
    _write_big_corpus(src)
    params = _params_file(tmp_path, [src], "ingest.workers=3", "ingest.unit=line")  # two spawned
    proc = subprocess.Popen([sys.executable, "-m", "vaepipe", "-q", "ingest", "--params", str(params)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: list[psutil.Process] = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while len(children) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            children = [c for c in parent.children() if "multiprocessing" in " ".join(c.cmdline())]
        assert len(children) >= 2 and proc.poll() is None, "no workers seen while ingest ran"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=30)
        alive = [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"orphaned workers: {[c.pid for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in children:  # what this test started must not outlive it, even when it fails
            with contextlib.suppress(psutil.Error):
                c.kill()


# ---------------------------------------------------------------------------------------
# The corpus folder read as a whole; flipped bytes in a shard


def test_corpus_folder_reads_as_one_dataset(built_corpus: Params) -> None:
    corpus = Path(built_corpus.paths.corpus)
    assert (corpus / "_stats.json").is_file() and not (corpus / "stats.json").exists()
    rows = json.loads((corpus / "_stats.json").read_text())["records_out"]
    assert pq.read_table(corpus).num_rows == rows
    assert len(pd.read_parquet(corpus)) == rows
    assert duckdb.sql(f"select count(*) from read_parquet('{corpus}')").fetchall() == [(rows,)]


def test_flipped_byte_in_a_shard_fails_checksum_verification(tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path)
    shard = ingest.run(params).shards[0]
    col = pq.ParquetFile(shard).metadata.row_group(0).column(0)  # doc_id: plain, no dictionary
    data = bytearray(shard.read_bytes())
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.read_table(shard, page_checksum_verification=True)
