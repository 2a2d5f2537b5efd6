"""DVC experiments on the real pipeline: ``dvc exp run --queue`` + ``dvc queue start``.

Queued experiments run in DVC's temporary workspaces (``.dvc/tmp/exps/...``), each a fresh
checkout of HEAD with the experiment's ``-S`` values written into its params.yaml. The test
queues two experiments that differ in ``train.max_steps`` on the tiny project of
tests/test_dvc_pipeline.py, runs them with one worker, and checks what ``dvc exp show`` lists
(their params and the headline metrics of evaluate) and that the workspace's own outputs did
not move. With tracking on, their MLflow runs land in the project's own sqlite store, not in the
temporary workspace DVC deletes afterwards (``vaepipe.cli.experiment_tracking_uri``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vaepipe.cli import experiment_tracking_uri

from test_dvc_pipeline import STAGES, _tree_bytes, dvc, git, lock, make_project, ran_stages

HEADLINE = {"iw_nll", "lm_nll", "elbo", "kl", "mi", "active_units"}
# train.max_steps of the two experiments: below the 10 steps the tiny baseline trains (2 epochs
# of 5 batches), so each experiment trains a different model and reports its own metrics
STEPS = (3, 6)


@pytest.fixture(scope="module")
def committed_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project after one ``dvc repro``, with dvc.lock and the metrics committed, so
    an experiment starts from a reproduced baseline (ingest and tokenize come from the cache)."""
    root = tmp_path_factory.mktemp("dvc-exp")
    proj = make_project(root / "project", root / "remote")
    r = dvc(["repro"], proj)
    assert ran_stages(r.stdout) == list(STAGES), r.stdout
    git(["add", "-A"], proj)
    git(["commit", "-qm", "baseline run"], proj)
    return proj


def _outputs(proj: Path) -> dict[str, dict[str, bytes]]:
    return {out["path"]: _tree_bytes(proj / out["path"])
            for stage in lock(proj).values() for out in stage.get("outs", [])}


def _wait_for_queue(proj: Path, timeout: float) -> str:
    """Poll ``dvc queue status`` until nothing is queued or running; returns its last output."""
    deadline = time.monotonic() + timeout
    while True:
        out = dvc(["queue", "status"], proj).stdout
        if not any(word in out for word in ("Queued", "Running")):
            return out
        assert time.monotonic() < deadline, f"queue still busy after {timeout:.0f} s:\n{out}"
        time.sleep(5)


def _experiments(shown: list[dict]) -> list[dict]:
    """The experiments of ``dvc exp show --json`` (dvc 3.x: revs, each with ``experiments``)."""
    found = []
    for rev in shown:
        for exp in rev.get("experiments") or []:
            found.extend(exp.get("revs") or [])
    return found


@pytest.mark.slow
def test_queued_experiments_run_and_show_their_metrics(committed_project: Path) -> None:
    proj = committed_project
    before = _outputs(proj)
    params_before = (proj / "params.yaml").read_bytes()
    names = [f"steps-{n}" for n in STEPS]
    for name, steps in zip(names, STEPS):
        dvc(["exp", "run", "--queue", "-n", name, "-S", f"train.max_steps={steps}",
             "-S", "tracking.enabled=true"], proj)
    dvc(["queue", "start", "-j", "1"], proj)
    status = _wait_for_queue(proj, timeout=600)
    assert "Failed" not in status, status + "\n" + dvc(["queue", "logs", names[0]], proj, check=False).stdout

    shown = json.loads(dvc(["exp", "show", "--json"], proj).stdout)
    exps = {e["name"]: e for e in _experiments(shown)}
    assert set(names) <= set(exps), list(exps)
    iw_nll = {}
    for name, steps in zip(names, STEPS):
        data = exps[name]["data"]
        params = data["params"]["params.yaml"]["data"]
        assert params["train"]["max_steps"] == steps
        metrics = data["metrics"]["reports/metrics.json"]["data"]
        assert HEADLINE <= set(metrics), sorted(metrics)
        assert metrics["latent_dim"] == 8
        iw_nll[name] = metrics["iw_nll"]
    # each experiment's own evaluation, not the baseline's metrics.json carried along
    baseline = json.loads((proj / "reports/metrics.json").read_text())["iw_nll"]
    assert len({baseline, *iw_nll.values()}) == 3, (baseline, iw_nll)
    # the workspace is untouched: same params.yaml, same outputs byte for byte
    assert (proj / "params.yaml").read_bytes() == params_before
    assert _outputs(proj) == before
    # the experiments' MLflow runs (train_lm, train, evaluate's are train's) are in the
    # project's store, the relative sqlite:///mlflow.db of params.yaml
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vaepipe")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 * len(STEPS), [r.info.run_name for r in runs]
    # the table a person reads lists the headline metrics beside the changed param
    table = dvc(["exp", "show", "--no-pager", "--md"], proj).stdout
    for column in ("iw_nll", "lm_nll", "train.max_steps", *names):
        assert column in table, table


@pytest.mark.parametrize(("uri", "env", "expected"), [
    # a temporary experiment workspace: DVC_ROOT is the project, the cwd is elsewhere
    ("sqlite:///mlflow.db", {"DVC_ROOT": "/proj"}, "sqlite:////proj/mlflow.db"),
    ("sqlite:///db/mlflow.db", {"DVC_ROOT": "/proj"}, "sqlite:////proj/db/mlflow.db"),
    # absolute databases, servers and runs outside DVC stay as they are
    ("sqlite:////abs/mlflow.db", {"DVC_ROOT": "/proj"}, "sqlite:////abs/mlflow.db"),
    ("http://127.0.0.1:5000", {"DVC_ROOT": "/proj"}, "http://127.0.0.1:5000"),
    ("sqlite:///mlflow.db", {}, "sqlite:///mlflow.db"),
])
def test_experiment_tracking_uri(uri: str, env: dict[str, str], expected: str, tmp_path: Path) -> None:
    assert experiment_tracking_uri(uri, env, cwd=tmp_path) == expected


def test_experiment_tracking_uri_unchanged_in_the_project_itself(tmp_path: Path) -> None:
    # dvc repro and dvc exp run in the workspace: DVC_ROOT is the cwd, run.json keeps the value
    env = {"DVC_ROOT": str(tmp_path)}
    assert experiment_tracking_uri("sqlite:///mlflow.db", env, cwd=tmp_path) == "sqlite:///mlflow.db"
