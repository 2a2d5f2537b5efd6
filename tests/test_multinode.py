"""Multi-node training: two torchrun agents on this machine stand for two nodes (gloo on CPU).

One node is lost mid-training (its agent and workers SIGKILLed, as when a machine dies) and a
replacement node joins; torchrun's elastic agent restarts the worker group (``--max-restarts``),
which resumes from the last checkpoint in the shared model folder and ends with the same
weights, bit for bit, as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from vaepipe.core.config import Params
from vaepipe.core.run_info import read_run_info
from vaepipe.ml import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
EVAL_EVERY = 8  # last.pt is written at each validation: the checkpoint cadence
# The node that dies is rank 0 (it holds the model folder's lock and writes the checkpoints):
# the rendezvous ranks nodes by address, so it gets the lower one. The other node hosts the
# rendezvous endpoint, which must outlive the job (as on a cluster).
SURVIVOR_ADDR, DOOMED_ADDR = "127.0.0.2", "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    """torchrun agents on this machine, one per "node", sharing a rendezvous endpoint and a model folder."""

    def __init__(self, params_file: Path, workdir: Path, run_id: str) -> None:
        self.params_file, self.workdir, self.run_id = params_file, workdir, run_id
        self.port = free_port()
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOGLEVEL": "INFO",
                    # each rendezvous round publishes its own worker store: needed when a node is replaced
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

    def start(self, name: str, addr: str) -> None:
        """Start node ``name``'s agent; the first one started hosts the rendezvous endpoint."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", self.run_id,
               "--rdzv-conf", "join_timeout=120", "--max-restarts", "1", "--monitor-interval", "0.5",
               "--local-addr", addr, "-m", "vaepipe.cli", "train", "--params", str(self.params_file)]
        with open(self.log(name), "wb") as out:
            self.agents[name] = subprocess.Popen(cmd, env=self.env, cwd=self.workdir, stdout=out,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
        if len(self.agents) == 1:
            wait_for(lambda: listening(self.port), 60, "the rendezvous endpoint")

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def text(self, name: str) -> str:
        return self.log(name).read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL node ``name``: its agent's process group and its workers' (torchrun starts
        each worker in a session of its own, so killing the agent alone would leave them running)."""
        agent = self.agents[name]
        workers = children(agent.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        agent.wait(timeout=30)

    def wait(self, timeout: float) -> dict[str, int]:
        """Every agent's exit status, once all have exited."""
        deadline = time.monotonic() + timeout
        return {name: a.wait(timeout=max(deadline - time.monotonic(), 1)) for name, a in self.agents.items()}

    def close(self) -> None:
        for name, agent in self.agents.items():
            if agent.poll() is None:
                self.kill(name)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat: the field after the name)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def cluster(params_file: Path, workdir: Path, run_id: str) -> Iterator[Cluster]:
    workdir.mkdir(parents=True, exist_ok=True)
    c = Cluster(params_file, workdir, run_id)
    try:
        yield c
    finally:
        c.close()


def steps_logged(text: str) -> list[int]:
    """The steps of rank 0's progress lines ("step 7/60 loss ...")."""
    return [int(m) for m in re.findall(r"step (\d+)/\d+ loss", text)]


def write_params(built_tokens: Params, root: Path, *, tracking: bool = False) -> Path:
    p = built_tokens.replace(
        paths={"model": str(root / "vae"), "baseline": str(root / "lm")},
        train={"max_epochs": 6, "max_steps": 0, "batch_tokens": 256, "eval_every": EVAL_EVERY, "log_every": 1,
               "num_threads": 1},
        tracking={"enabled": tracking, "uri": f"sqlite:///{root / 'mlflow.db'}"},
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(p.to_dict()))
    return root / "params.yaml"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="two loopback addresses and /proc: Linux only")
def test_losing_a_node_resumes_to_the_same_weights(built_tokens: Params, tmp_path: Path) -> None:
    root = tmp_path / "lost"
    with cluster(write_params(built_tokens, tmp_path / "ref"), tmp_path / "ref", "ref") as ref, \
            cluster(write_params(built_tokens, root, tracking=True), root, "lost") as c:
        # the reference, side by side: the same two nodes, never interrupted
        ref.start("a", SURVIVOR_ADDR)
        ref.start("b", DOOMED_ADDR)
        c.start("a", SURVIVOR_ADDR)
        c.start("b", DOOMED_ADDR)
        # kill node b (rank 0) between two checkpoints, once one has been written
        wait_for(lambda: any(s > EVAL_EVERY and s % EVAL_EVERY in (1, 2) for s in steps_logged(c.text("b"))),
                 180, "rank 0 to pass its first checkpoint")
        c.kill("b")
        lost_at = max(steps_logged(c.text("b")))
        # the survivor's agent sees its worker fail and restarts the group; a new node takes b's place
        wait_for(lambda: "will restart worker group" in c.text("a"), 60, "node a to restart its worker group")
        c.start("b2", DOOMED_ADDR)
        assert c.wait(240) == {"a": 0, "b": -signal.SIGKILL, "b2": 0}, c.text("a")[-3000:] + c.text("b2")[-3000:]
        assert ref.wait(240) == {"a": 0, "b": 0}, ref.text("a")[-3000:] + ref.text("b")[-3000:]

    # the new rank 0 (on the replacement node) resumed from the last checkpoint the dead rank 0 wrote
    resumed = re.findall(r"resumed from (\S+) at step (\d+) .*torchrun restarted", c.text("b2"))
    assert len(resumed) == 1, c.text("b2")[-3000:]
    path, step = resumed[0][0], int(resumed[0][1])
    assert Path(path) == root / ".vae.partial" / ckpt.LAST
    assert step > 0 and step % EVAL_EVERY == 0 and step < lost_at  # a real checkpoint; the steps after it were lost
    assert min(steps_logged(c.text("b2"))) == step + 1  # ... and trained again

    # same final weights, optimizer state and best model as the uninterrupted run, bit for bit
    for name in (ckpt.LAST, ckpt.BEST):
        want, got = ckpt.load_state(tmp_path / "ref" / "vae" / name), ckpt.load_state(root / "vae" / name)
        assert got["step"] == want["step"] > step
        assert want["model"].keys() == got["model"].keys()
        assert all(torch.equal(want["model"][k], got["model"][k]) for k in want["model"]), name
    opt_want = ckpt.load_state(tmp_path / "ref" / "vae" / ckpt.LAST)["optimizer"]["state"]
    opt_got = ckpt.load_state(root / "vae" / ckpt.LAST)["optimizer"]["state"]
    assert all(torch.equal(opt_want[i][k], opt_got[i][k]) for i in opt_want for k in opt_want[i])

    # only rank 0 logged the end of the run; no partial run or half-written checkpoint is left
    assert sum(c.text(n).count("train vae done") for n in ("a", "b", "b2")) == 1
    assert not (root / ".vae.partial").exists()
    assert not [p.name for p in (root / "vae").iterdir() if ".tmp-" in p.name]

    # one MLflow run: the dead rank 0's, which the new rank 0 continued and finished (the
    # metrics that the dead one had not yet sent, at most its tracker's flush interval, are lost)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(built_tokens.tracking.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [read_run_info(root / "vae")["run_id"]]
    assert runs[0].info.status == "FINISHED"
    logged = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert logged >= set(range(step + 1, got["step"] + 1))


# -- the restart rule, in one process (torchrun's variable set by hand) ---------------------


def local(params: Params, root: Path, **train_kw: object) -> Params:
    return params.replace(paths={"model": str(root / "vae"), "baseline": str(root / "lm")},
                          train={"num_threads": 1, "eval_every": 3, **train_kw})


def test_setup_reads_the_restart_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from vaepipe.ml import distributed as D

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert not D.restarted(D.setup("cpu"), torch.device("cpu"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    info = D.setup("cpu")
    assert info.restart_count == 2 and not info.enabled and D.restarted(info, torch.device("cpu"))


def test_a_restarted_group_resumes_the_partial_run(built_tokens: Params, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from vaepipe.stages import train

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    full = train.run(local(built_tokens, tmp_path / "full", max_steps=8))

    def crash(step: int, metrics: dict[str, float]) -> None:
        if step == 5:
            raise RuntimeError("worker lost")  # a failure, not a stop: no last.pt is written for it

    p = local(built_tokens, tmp_path / "cut", max_steps=8)
    with pytest.raises(RuntimeError, match="worker lost"):
        train.run(p, on_step=crash)
    partial = tmp_path / "cut" / ".vae.partial"
    assert ckpt.load_state(partial / ckpt.LAST)["step"] == 3  # the last validation's checkpoint
    (partial / ".last.pt.tmp-123").write_bytes(b"half a checkpoint")  # a write the failure cut short

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun sets in a restarted group
    steps: list[int] = []
    resumed = train.run(p, on_step=lambda step, m: steps.append(step))  # train.resume is not set
    assert steps[0] == 4 and resumed.steps == full.steps == 8
    for name in (ckpt.LAST, ckpt.BEST):
        want, got = ckpt.load_state(full.model_dir / name)["model"], ckpt.load_state(resumed.model_dir / name)["model"]
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert sorted(p.name for p in resumed.model_dir.iterdir()) == ["best.pt", "config.json", "last.pt", "run.json"]


def test_a_restarted_group_never_resumes_the_finished_model(built_tokens: Params, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from vaepipe.stages import train

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    p = local(built_tokens, tmp_path, max_steps=4)
    train.run(p)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    steps: list[int] = []
    train.run(p.replace(train={"max_steps": 6}), on_step=lambda step, m: steps.append(step))
    assert steps[0] == 1  # a fresh run: the earlier run's model is not this job's
