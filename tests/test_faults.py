"""Faults injected for real around the outputs: concurrent runs, killed runs, full and read-only disks.

Every test here drives real ``python -m vaepipe`` processes. A "holder" is a second real
process that takes an output's write lock exactly as a running stage does and keeps it until
the test kills it; full and read-only filesystems are real tmpfs mounts inside a private
mount namespace (``unshare -rm``), so nothing on the machine is touched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import make_tiny_params, tiny_overrides
from vaepipe.core.io import sha256_tree
from vaepipe.core.outputs import OutputError, lock_path, remove_leftover, stage_outputs

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _cli(root: Path, stage: str, *extra: str) -> list[str]:
    sets = [a for o in tiny_overrides(root) for a in ("--set", o)]
    return [sys.executable, "-m", "vaepipe", "-q", stage, *sets, *extra]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT, **kw)


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def _holder(output: Path, key: str) -> subprocess.Popen[str]:
    """A real process holding ``output``'s write lock until it is killed."""
    code = textwrap.dedent(f"""
        import time
        from vaepipe.core.outputs import output_locks
        with output_locks([({key!r}, {str(output)!r})]):
            print("locked", flush=True)
            time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def _stop(p: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    p.send_signal(sig)
    p.wait(timeout=30)


def _big_corpus(folder: Path, lines: int) -> Path:
    """A folder of text files of distinct, valid sentences (ingest takes seconds on it)."""
    folder.mkdir(parents=True)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
    for f in range(4):
        with open(folder / f"part{f}.txt", "w", encoding="utf-8") as out:
            for i in range(lines // 4):
                n = f * lines + i
                out.write(f"Sentence number {n} speaks of {words[n % 13]} and {words[(n // 13) % 13]} today.\n")
    return folder


# ---------------------------------------------------------------------------------------
# One writer per output


@pytest.mark.parametrize("stage", ["ingest", "tokenize", "train", "evaluate", "embed"])
def test_second_writer_fails_at_once_naming_the_holder(tmp_path: Path, stage: str) -> None:
    key, output = stage_outputs(make_tiny_params(tmp_path), stage)[-1]
    holder = _holder(output, key)
    try:
        r = _run(_cli(tmp_path, stage))
    finally:
        _stop(holder)
    assert r.returncode == 1, r.stderr
    assert _one_line(r.stderr) == (
        f"vaepipe {stage}: error: {key} {output} is being written by another vaepipe process "
        f"(pid {holder.pid}); wait for it, or run with --wait")
    assert not output.exists()


def test_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    corpus = tmp_path / "data/corpus"
    holder = _holder(corpus, "paths.corpus")
    _stop(holder, signal.SIGKILL)  # no clean-up code runs: the kernel drops the lock
    r = _run(_cli(tmp_path, "ingest"))
    assert r.returncode == 0, r.stderr
    assert pq.read_table(corpus).num_rows > 0
    assert lock_path(corpus).is_file()  # the lock file stays, unlocked


def test_wait_queues_behind_the_holder(tmp_path: Path) -> None:
    corpus = tmp_path / "data/corpus"
    holder = _holder(corpus, "paths.corpus")
    waiter = subprocess.Popen(_cli(tmp_path, "ingest", "--wait"), stderr=subprocess.PIPE, text=True, env=_env())
    try:
        # the waiter is blocked on the lock: still running, and nothing written, well past
        # the few seconds an unblocked ingest of the fixture corpus takes
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=8)
        assert not corpus.exists()
    finally:
        _stop(holder, signal.SIGTERM)
    _, err = waiter.communicate(timeout=TIMEOUT)
    assert waiter.returncode == 0, err
    assert pq.read_table(corpus).num_rows > 0


@pytest.mark.slow
def test_two_real_ingests_at_once_leave_one_complete_corpus(tmp_path: Path) -> None:
    inputs = _big_corpus(tmp_path / "in", 60_000)
    cmd = _cli(tmp_path, "ingest", "--set", f"ingest.inputs=[{inputs}]", "--set", "ingest.max_chars=200")
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    results = [(p.wait(timeout=TIMEOUT), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 1]), results
    for rc, err in results:
        if rc == 1:
            assert "is being written by another vaepipe process" in _one_line(err)
    corpus = tmp_path / "data/corpus"
    assert pq.read_table(corpus).num_rows == 60_000
    assert (corpus / "_stats.json").is_file() or (corpus / "stats.json").is_file()

    # with --wait both succeed, one after the other, and the corpus is the same
    before = _shards_digest(corpus)
    procs = [subprocess.Popen([*cmd, "--wait"], stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    assert [p.wait(timeout=TIMEOUT) for p in procs] == [0, 0]
    assert pq.read_table(corpus).num_rows == 60_000
    assert _shards_digest(corpus) == before


def _shards_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for t in sorted(folder.glob("*.parquet")):
        h.update(pq.read_table(t).to_string().encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# What a killed run leaves behind


@pytest.mark.slow
def test_leftovers_of_a_killed_ingest_are_removed_by_the_next_run(tmp_path: Path) -> None:
    inputs = _big_corpus(tmp_path / "in", 200_000)
    data = tmp_path / "data"
    p = subprocess.Popen(_cli(tmp_path, "ingest", "--set", f"ingest.inputs=[{inputs}]"),
                         stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 120
    while not list(data.glob(".corpus.tmp-*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _stop(p, signal.SIGKILL)
    left = list(data.glob(".corpus.tmp-*"))
    assert left, "the killed ingest had not started writing"
    r = _run(_cli(tmp_path, "ingest"))
    assert r.returncode == 0, r.stderr
    assert sorted(q.name for q in data.iterdir() if q.name.startswith(".")) == [".corpus.lock"]
    assert pq.read_table(data / "corpus").num_rows > 0


def test_leftover_removal_refuses_anything_but_a_working_copy(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    victims = [tmp_path / "tokens", tmp_path / ".tokens.tmp-1", tmp_path / "sub" / ".corpus.tmp-1",
               lock_path(out), tmp_path]
    for v in victims[:3]:
        v.mkdir(parents=True)
    lock_path(out).write_text("")
    for v in victims:
        with pytest.raises(OutputError, match="refusing to delete"):
            remove_leftover(out, v)
        assert v.exists()
    mine = tmp_path / ".corpus.tmp-abc"
    mine.mkdir()
    (mine / "part.parquet").write_bytes(b"x")
    remove_leftover(out, mine)
    assert not mine.exists()


def test_gitignore_covers_locks_and_working_copies() -> None:
    names = ["data/.corpus.lock", "data/.corpus.tmp-k3j2", "data/.tokens.tmp-abc", "reports/../.reports.tmp-x1",
             "models/.vae.partial", "models/.vae.old-123", "data/.embeddings.partial-0123abcd",
             ".mycorpus.tmp-1", ".mycorpus.lock"]
    r = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert sorted(r.stdout.split()) == sorted(names), r.stdout


# ---------------------------------------------------------------------------------------
# Full and read-only filesystems (real tmpfs mounts in a private mount namespace)


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="needs user and mount namespaces (unshare -rm)")

# run inside the namespace: mount a tmpfs, copy the previous output onto it, run the stage,
# report the stage's exit code, stderr, and whether the previous output is unchanged
_IN_NAMESPACE = textwrap.dedent("""
    import json, shutil, subprocess, sys
    from vaepipe.core.io import sha256_tree
    mount, size, prev, dest, mode = sys.argv[1:6]
    cmd = sys.argv[6:]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
    before = None
    if prev != "-":
        shutil.copytree(prev, dest)
        before = sha256_tree(dest)
    if mode == "ro":
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    after = sha256_tree(dest) if before is not None else None
    print(json.dumps({"rc": r.returncode, "stderr": r.stderr, "intact": before == after}))
""")


def _in_namespace(mount: Path, size: str, prev: Path | None, dest: Path, mode: str, cmd: list[str]) -> dict:
    import json

    mount.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["unshare", "-rm", sys.executable, "-c", _IN_NAMESPACE, str(mount), size,
                        str(prev) if prev else "-", str(dest), mode, *cmd],
                       capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tmpfs_kib(path: Path) -> int:
    """What a copy of ``path`` takes on a tmpfs: whole 4 KiB pages per file."""
    return sum(-(-f.stat().st_size // 4096) * 4 for f in path.rglob("*") if f.is_file())


@needs_unshare
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ingest", "tokenize", "train", "evaluate", "embed"])
def test_disk_full_is_one_line_naming_the_filesystem(trained_model, tmp_path: Path, stage: str) -> None:
    from vaepipe.stages import embed, evaluate

    built = trained_model
    root = Path(built.paths.corpus).parent.parent
    if stage == "evaluate" and not Path(built.paths.reports).exists():
        evaluate.run(built)
    if stage == "embed" and not Path(built.paths.embeddings).exists():
        embed.run(built)
    key, output = stage_outputs(built, stage)[-1]
    mount = tmp_path / "small"
    dest = mount / output.name
    # room for the previous output and one more page: the new one cannot fit beside it
    size = f"{_tmpfs_kib(output) + 4}k"
    # an export that is up to date is not rewritten: ask for one more column
    extra = ["--set", "embed.logvar=true"] if stage == "embed" else []
    if stage == "evaluate":  # the fixture corpus is too small to probe: no warning lines beside the error
        extra = ["--set", "evaluate.probe_labels=[]"]
    cmd = [*_cli(root, stage), "--set", f"{key}={dest}", *extra]
    res = _in_namespace(mount, size, output, dest, "rw", cmd)
    assert res["rc"] == 1, res["stderr"]
    assert _one_line(res["stderr"]).startswith(f"vaepipe {stage}: error: no space left on {mount} (writing ")
    assert res["intact"]


@needs_unshare
def test_read_only_parent_is_one_line(built_corpus, tmp_path: Path) -> None:
    root = Path(built_corpus.paths.corpus).parent.parent
    mount = tmp_path / "ro"
    dest = mount / "corpus"
    res = _in_namespace(mount, "64k", Path(built_corpus.paths.corpus), dest, "ro",
                        [*_cli(root, "ingest"), "--set", f"paths.corpus={dest}"])
    assert res["rc"] == 1, res["stderr"]
    assert _one_line(res["stderr"]) == (
        f"vaepipe ingest: error: paths.corpus {dest}: cannot write in {mount} (Read-only file system)")
    assert res["intact"]
