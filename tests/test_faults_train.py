"""Faults in training replayed for real (issue #15): concurrent runs on one model directory,
a diverged run, a resume onto another run's checkpoint, tokens made with another tokenizer.

Real processes, real signals (SIGSTOP/SIGCONT/SIGKILL via os.kill), real files with damaged
bytes; nothing here patches the code under test.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from vaepipe import cli
from vaepipe.core.config import Params
from vaepipe.core.errors import ConfigError, InputError, VaepipeError
from vaepipe.core.outputs import lock_path, output_locks, stage_outputs
from vaepipe.core.run_info import RUN_FILE
from vaepipe.ml import checkpoint as ckpt
from vaepipe.ml.data import token_files
from vaepipe.stages import train

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = (ckpt.CONFIG_FILE, ckpt.BEST, ckpt.LAST, RUN_FILE)
DEADLINE_S = 300  # only guards against a hang; no test asserts on time


def local(params: Params, root: Path, **train_kw: Any) -> Params:
    """The session's tiny token data, with this test's own model directories and settings."""
    return params.replace(paths={"model": str(root / "vae"), "baseline": str(root / "lm")},
                          train={"num_threads": 1, **train_kw})


def params_file(p: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(p.to_dict()))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x),
            **extra}


def start_train(pfile: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m vaepipe train --params pfile ARGS` in the background, stderr to ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "vaepipe", "train", "--params", str(pfile), *args],
                                stdout=subprocess.DEVNULL, stderr=err, env=env or subprocess_env(),
                                cwd=pfile.parent)


def wait_for(what: str, cond, proc: subprocess.Popen | None = None) -> None:
    """Poll ``cond()`` until true; fail (not hang) if ``proc`` ends first or after DEADLINE_S."""
    end = time.monotonic() + DEADLINE_S
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def lock_held(output: Path) -> bool:
    """Whether some process holds the write lock of ``output`` (a real non-blocking flock)."""
    lock = lock_path(output)
    if not lock.exists():
        return False
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def stopped_holding_lock(proc: subprocess.Popen, output: Path) -> Iterator[None]:
    """Catch ``proc`` (SIGSTOP) while it holds the lock of ``output``; SIGCONT on exit."""
    def caught() -> bool:
        os.kill(proc.pid, signal.SIGSTOP)
        if lock_path(output).exists() and lock_path(output).read_text().strip() == str(proc.pid) \
                and lock_held(output):
            return True
        os.kill(proc.pid, signal.SIGCONT)
        return False

    try:
        wait_for("the first run to hold the lock", caught, proc)
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def assert_complete_model(model_dir: Path) -> None:
    for f in MODEL_FILES:
        assert (model_dir / f).is_file(), f
    ckpt.load_model(model_dir)


# -- 1. two runs on one paths.model ----------------------------------------------------------


@pytest.mark.slow
def test_second_concurrent_train_fails_at_once_first_completes(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=40, eval_every=10)
    pfile, model = params_file(p, tmp_path / "params.yaml"), tmp_path / "vae"
    first = start_train(pfile, tmp_path / "first.log")
    with stopped_holding_lock(first, model):
        second = subprocess.run([sys.executable, "-m", "vaepipe", "train", "--params", str(pfile)],
                                capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
                                timeout=DEADLINE_S)
    assert second.returncode == 1, second.stderr[-2000:]
    assert (f"vaepipe train: error: paths.model {model} is being written by another vaepipe process "
            f"(pid {first.pid})") in second.stderr
    assert "Traceback" not in second.stderr
    assert finish(first) == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert_complete_model(model)
    assert not (tmp_path / ".vae.partial").exists()


@pytest.mark.slow
def test_wait_queues_the_second_train_and_both_succeed(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=20, eval_every=10)
    pfile, model = params_file(p, tmp_path / "params.yaml"), tmp_path / "vae"
    first = start_train(pfile, tmp_path / "first.log")
    with stopped_holding_lock(first, model):
        second = start_train(pfile, tmp_path / "second.log", "--wait")
        wait_for("the second run to wait", lambda: "waiting for it" in (tmp_path / "second.log").read_text(),
                 second)
        assert "is being written by pid" in (tmp_path / "second.log").read_text()
    assert finish(first) == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert finish(second) == 0, (tmp_path / "second.log").read_text()[-2000:]
    assert_complete_model(model)
    assert not (tmp_path / ".vae.partial").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_busy_model_dir_under_ddp_fails_every_rank(built_tokens: Params, tmp_path: Path) -> None:
    """Two ranks started by hand (no torchrun to tear the group down): while another process
    holds the lock, rank 0 fails with BusyError and rank 1 must fail too, not wait at a barrier."""
    p = local(built_tokens, tmp_path, max_steps=2, batch_tokens=256)
    pfile = params_file(p, tmp_path / "params.yaml")
    port = str(free_port())
    with output_locks(stage_outputs(p, "train")):  # this test process is the other writer
        ranks = [start_train(pfile, tmp_path / f"rank{r}.log",
                             env=subprocess_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for r in range(2)]
        codes = [finish(r) for r in ranks]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [1, 1], logs
    assert f"is being written by another vaepipe process (pid {os.getpid()})" in logs[0]
    assert "rank 0 could not take the write lock" in logs[1]
    assert not (tmp_path / "vae").exists()


# -- 3. a diverged run -----------------------------------------------------------------------


# the skipped-step limit stops it; with a limit too high to reach, the checks at saving and at
# the end do (never a finite validation: nothing to install)
@pytest.mark.parametrize("limit", [10, 1000])
def test_diverged_run_fails_and_keeps_the_previous_model(built_tokens: Params, tmp_path: Path, limit: int,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    p = local(built_tokens, tmp_path, max_steps=3)
    train.run(p)
    before = {f: (tmp_path / "vae" / f).read_bytes() for f in MODEL_FILES}
    pfile = params_file(p.replace(train={"max_steps": 40, "max_epochs": 20, "eval_every": 5}), tmp_path / "params.yaml")
    # the reported case: exit 0 and a NaN best.pt before
    rc = cli.main(["train", "--params", str(pfile), "--set", "train.lr=1e6", "--set", "train.grad_clip=0",
                   "--set", f"train.max_nonfinite_steps={limit}"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "vaepipe train: error: train: " in err and "not finite" in err and "train.lr (now 1e+06)" in err
    if limit == 10:
        assert "after 10 skipped steps (train.max_nonfinite_steps)" in err
    else:
        assert "validation ELBO is not finite" in err or "the weights are not finite" in err
    assert {f: (tmp_path / "vae" / f).read_bytes() for f in MODEL_FILES} == before
    assert "Traceback" not in err


def test_nonfinite_steps_are_skipped_then_stop(built_tokens: Params, tmp_path: Path) -> None:
    """At the train.max_nonfinite_steps-th skipped step: the error names the step and the values."""
    p = local(built_tokens, tmp_path, max_steps=40, eval_every=1000, lr=1e6, grad_clip=0.0,
              max_nonfinite_steps=3)
    with pytest.raises(VaepipeError, match=r"is not finite at step \d+ \(loss \S+, grad norm \S+\) "
                                           r"after 3 skipped steps \(train.max_nonfinite_steps\); lower train.lr .*train.grad_clip"):
        train.run(p)
    assert not (tmp_path / "vae").exists()
    assert not (tmp_path / ".vae.partial" / ckpt.BEST).exists()  # nothing non-finite was saved
    last = tmp_path / ".vae.partial" / ckpt.LAST
    assert not last.exists() or ckpt.nonfinite_entry(ckpt.load_state(last)["model"]) is None


def poisoned_model(src: Path, dest: Path) -> str:
    """A copy of the model directory ``src`` whose best.pt has one NaN; the tensor's name."""
    shutil.copytree(src, dest)
    state = torch.load(dest / ckpt.BEST, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][name].view(-1)[1] = float("nan")
    torch.save(state, dest / ckpt.BEST)
    return name


@pytest.mark.parametrize("stage, out_key", [("embed", "embeddings"), ("evaluate", "reports")])
def test_embed_and_evaluate_refuse_nonfinite_weights(trained_model: Params, tmp_path: Path, stage: str,
                                                     out_key: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "vae"
    name = poisoned_model(Path(trained_model.paths.model), bad)
    pfile = params_file(trained_model, tmp_path / "params.yaml")
    rc = cli.main([stage, "--params", str(pfile), "--set", f"paths.model={bad}",
                   "--set", f"paths.{out_key}={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"vaepipe {stage}: error: {bad / ckpt.BEST}: non-finite weights in {name}; retrain" in err
    assert not (tmp_path / "out").exists()


# -- 4. resume onto another run's checkpoint -------------------------------------------------


@pytest.mark.slow
def test_resume_after_a_killed_fresh_run_refuses_the_finished_model(built_tokens: Params, tmp_path: Path) -> None:
    """A finished run; a fresh run with another seed and lr SIGKILLed before its first
    checkpoint; then train.resume=true with the fresh run's settings must not continue (and
    relabel) the finished model."""
    p = local(built_tokens, tmp_path, max_steps=3)
    train.run(p)
    model = tmp_path / "vae"
    before = {f: (model / f).read_bytes() for f in MODEL_FILES}
    fresh = p.replace(seed=p.seed + 1, train={"lr": 1e-3, "max_steps": 0, "max_epochs": 50, "eval_every": 100000})
    proc = start_train(params_file(fresh, tmp_path / "fresh.yaml"), tmp_path / "fresh.log")
    partial = tmp_path / ".vae.partial"
    wait_for("the fresh run to start training", lambda: (partial / ckpt.CONFIG_FILE).is_file(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    assert not (partial / ckpt.LAST).exists()  # killed before its first checkpoint

    with pytest.raises(ConfigError) as e:
        train.run(fresh.replace(train={"resume": True}))
    msg = str(e.value)
    assert msg.startswith(f"train.resume: {model / ckpt.LAST} was trained with ")
    assert f"seed={p.seed}" in msg and f"train.lr={p.train.lr}" in msg and "run without train.resume" in msg
    assert {f: (model / f).read_bytes() for f in MODEL_FILES} == before
    # the finished run's own settings still continue it (resume from a finished model)
    res = train.run(p.replace(train={"resume": True, "max_steps": 6}))
    assert res.steps == 6 and ckpt.read_config(model)["params"]["seed"] == p.seed


def test_resume_may_change_bounds_and_cadence_only(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=3, eval_every=3)
    train.run(p)
    with pytest.raises(ConfigError, match=r"model.hidden_dim=64, train.batch_tokens=1024, not 48/512"):
        train.run(p.replace(model={"hidden_dim": 48}, train={"resume": True, "batch_tokens": 512}))
    res = train.run(p.replace(train={"resume": True, "max_steps": 6, "max_epochs": 3, "patience": 5,
                                     "eval_every": 2, "log_every": 1, "num_threads": 1, "device": "cpu",
                                     "max_nonfinite_steps": 4}))
    assert res.steps == 6
    assert ckpt.read_config(tmp_path / "vae")["params"]["train"]["max_steps"] == 6


def test_resume_on_other_token_data_is_refused(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=3)
    train.run(p)
    tokens = tmp_path / "tokens"
    shutil.copytree(p.paths.tokens, tokens)
    shard = token_files(tokens)[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)  # one record fewer, same tokenizer stamp
    old_hash = ckpt.read_config(tmp_path / "vae")["data_hash"]
    assert old_hash and len(old_hash) == 64
    with pytest.raises(ConfigError, match=rf"was trained with data_hash={old_hash[:12]}, not [0-9a-f]{{12}}; "
                                          "run without train.resume"):
        train.run(p.replace(paths={"tokens": str(tokens)}, train={"resume": True, "max_steps": 6}))


# -- 7. tokens made with another tokenizer ---------------------------------------------------


def test_train_refuses_tokens_of_another_tokenizer(built_tokens: Params, tmp_path: Path) -> None:
    """paths.tokenizer replaced by a tokenizer of the same size that maps two tokens the other
    way round: the token ids mean other words, so train must refuse, as evaluate/embed do."""
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    data = json.loads((Path(built_tokens.paths.tokenizer) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok_dir / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    p = local(built_tokens, tmp_path, max_steps=2).replace(paths={"tokenizer": str(tok_dir)})
    with pytest.raises(InputError, match=r"\.parquet: token ids were made with tokenizer [0-9a-f]{12}, but "
                                         rf"paths.tokenizer {tok_dir / 'tokenizer.json'} uses [0-9a-f]{{12}}"):
        train.run(p)
    assert not (tmp_path / "vae").exists() and not (tmp_path / ".vae.partial").exists()
