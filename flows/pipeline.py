"""The Prefect flow ``vae-pipeline``: the DVC pipeline run stage by stage, with retries and a report.

    python -m flows.pipeline [--params P] [--set section.key=value]... [--no-push] [--pull]
                             [--project-dir D] [--remote NAME]

DVC (dvc.yaml + dvc.lock) is the one authority on what is up to date: each task runs
``dvc repro --single-item STAGE`` and DVC decides whether the stage runs, is restored from the
run-cache or is skipped. Prefect adds what DVC lacks: retries on the steps that touch I/O
(ingest reads the inputs; ``dvc push`` talks to the remote), logs streamed line by line, a
schedule (flows/deploy.py) and a markdown report. No Prefect caching: a second cache could only
disagree with DVC's.

Overrides reach DVC through params.yaml (flows/runparams.py), validated before any stage runs.
After train, the MLflow run named by the model's run.json is tagged with the dvc.lock md5s of
train's deps and outs, so the run says which data and code made it.

Ctrl-C (``make run``): each dvc command runs in its own process group, so the command line
(``main``) decides what an interrupt does: it passes SIGINT on to that group, waits for it to end
(``CHILD_GRACE_S``, then SIGKILL), stops Prefect's temporary API, prints one line naming the
interrupted step and exits 130 at once -- without reporting the flow's end to an API that the
same Ctrl-C has just stopped (Prefect would wait minutes on it). A second Ctrl-C skips the wait.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from vaepipe.core.run_info import read_run_info

from flows.runparams import RunSettings, apply_run_params, resolve_run_params
from flows.summary import format_metric, probe_markdown, run_summary, write_summary

STAGES = ("ingest", "tokenize", "train_lm", "train", "evaluate", "embed")
ARTIFACT_KEY = "vaepipe-metrics"
EPHEMERAL_TIMEOUT_S = 180  # seconds Prefect's temporary local API may take to start
CONFIG_EXIT = 2  # vaepipe's exit code for a configuration error (vaepipe.core.errors.ConfigError)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C
CHILD_GRACE_S = 15.0  # how long an interrupted stage may take to stop (save, log) before SIGKILL
# metrics shown in the report, in this order (the rest of metrics.json stays in the file)
HEADLINE = ("iw_nll", "elbo", "recon", "kl", "ppl", "ppl_elbo", "ppl_word", "bits_per_byte", "mi",
            "active_units", "latent_dim", "lm_nll", "gap_vs_lm", "recon_token_acc")


class StageFailed(RuntimeError):
    """A dvc command failed; ``returncode`` is the stage command's exit code when DVC names it."""

    def __init__(self, what: str, returncode: int, tail: str) -> None:
        super().__init__(f"{what} failed (exit {returncode}): {tail}")
        self.returncode = returncode


@dataclass
class Running:
    """The dvc command running now, for the Ctrl-C handler (the flow runs one at a time).

    No lock: the handler runs on the main thread, possibly inside run_streaming itself."""

    proc: subprocess.Popen[str] | None = None
    what: str | None = None


RUNNING = Running()


@dataclass
class StageReport:
    stage: str
    outcome: str  # ran | restored from run-cache | up to date
    seconds: float


# the Prefect context a stage's MLflow run is tagged with (vaepipe's MLflow tracker reads these)
PREFECT_ENV = ("VAEPIPE_PREFECT_FLOW_RUN_ID", "VAEPIPE_PREFECT_FLOW_RUN_NAME", "VAEPIPE_PREFECT_DEPLOYMENT",
               "VAEPIPE_PREFECT_FLOW_RUN_URL")
# DVC's reminder after every stage ("To track the changes with git, run: ... / To enable auto
# staging, run: dvc config core.autostage true"): `dvc repro` has no switch for it short of
# --quiet, which would also drop the "Running stage" lines outcome_of reads, so the flow drops
# it from the log (its summary says what to commit, once)
GIT_HINT_START = ("To track the changes with git, run:", "To enable auto staging, run:")
GIT_HINT_END = "dvc config core.autostage true"


def flow_run_url(flow_run_id: str | None, ui_url: str | None, api_url: str | None) -> str | None:
    """The flow run's page in the Prefect UI: under ``ui_url`` (PREFECT_UI_URL) when set, else
    under the API URL less its ``/api`` (a Prefect server serves both); None when neither is known."""
    if not flow_run_id:
        return None
    base = ui_url or (api_url.rstrip("/").removesuffix("/api") if api_url else None)
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else None


def prefect_env() -> dict[str, str]:
    """``VAEPIPE_PREFECT_*`` for the stages, from the flow run this is called in; only the known
    values (outside a flow run, or on Prefect's temporary API without a UI, some are absent)."""
    from prefect.runtime import deployment, flow_run
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    run_id = flow_run.id
    values = (run_id, flow_run.name, deployment.name,
              flow_run_url(run_id, PREFECT_UI_URL.value(), PREFECT_API_URL.value()))
    return {key: str(value) for key, value in zip(PREFECT_ENV, values) if value}


def tool_env(context: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the dvc subprocesses: this interpreter's bin first, so dvc.yaml's
    ``vaepipe`` command is the one installed beside this Prefect (a worker's PATH may lack it),
    and the flow run's ``VAEPIPE_PREFECT_*`` (``context``; inherited ones are dropped, so a
    stage never names another flow run)."""
    env = {k: v for k, v in os.environ.items() if k not in PREFECT_ENV}
    env.update(context or {})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")  # the stage's log lines arrive as they are written
    return env


class GitHintFilter:
    """Drops DVC's "To track the changes with git" / "autostage" reminder from a stream of lines."""

    def __init__(self) -> None:
        self.inside = False

    def keep(self, line: str) -> bool:
        """Whether ``line`` is to be shown (called on every line, in order)."""
        text = line.strip()
        if text in GIT_HINT_START:
            self.inside = True
        if not self.inside:
            return True
        if text == GIT_HINT_END:
            self.inside = False
        return False


def run_streaming(args: Sequence[str], cwd: Path, what: str) -> str:
    """Run ``python -m dvc ARGS`` in ``cwd``, each output line to the Prefect logger as it comes.

    Returns the whole output; raises StageFailed on a non-zero exit, with the exit code of the
    stage command when DVC reports one (``... exited with 2``).
    """
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", *args]
    logger.info("$ dvc %s", " ".join(args))
    lines: list[str] = []
    env = tool_env(prefect_env())
    hints = GitHintFilter()
    # its own process group: a Ctrl-C reaches it through the flow's handler (main), which then
    # knows which step was interrupted and that the step has ended
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1, start_new_session=True) as proc:
        RUNNING.what, RUNNING.proc = what, proc
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                if hints.keep(line) and line.strip():
                    logger.info("%s", line)
            rc = proc.wait()
        finally:
            RUNNING.proc = RUNNING.what = None
    output = "\n".join(lines)
    if rc:
        m = re.findall(r"exited with (\d+)", output)
        code = int(m[-1]) if m else rc
        errors = [ln for ln in lines if ln.startswith("ERROR") or ": error:" in ln]
        tail = " ".join((errors[-1] if errors else (lines[-1] if lines else "")).split())
        raise StageFailed(what, code, tail)
    return output


def outcome_of(stage: str, output: str) -> str:
    """What DVC did, from its own messages."""
    if f"Running stage '{stage}'" in output:
        return "ran"
    if f"Stage '{stage}' is cached" in output:
        return "restored from run-cache"
    return "up to date"


def _not_a_config_error(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: a configuration error (exit 2) fails the same way every time."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and exc.returncode == CONFIG_EXIT)


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=NO_CACHE)
def repro_stage(stage: str, project_dir: str, pull: bool = False) -> StageReport:
    start = time.perf_counter()
    args = ["repro", "--single-item", stage, *(["--pull"] if pull else [])]
    output = run_streaming(args, Path(project_dir), f"dvc repro {stage}")
    return StageReport(stage, outcome_of(stage, output), round(time.perf_counter() - start, 1))


# ingest reads inputs that may sit on a flaky share: retried, unless its params are wrong
repro_ingest = repro_stage.with_options(retries=2, retry_delay_seconds=10, retry_condition_fn=_not_a_config_error)


@task(name="dvc-push", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[10, 30, 60])
def push(project_dir: str, remote: str | None = None) -> None:
    run_streaming(["push", "--run-cache", *(["--remote", remote] if remote else [])], Path(project_dir),
                  "dvc push")


@task(name="dvc-pull", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[10, 30, 60])
def pull_all(project_dir: str, remote: str | None = None) -> None:
    # --allow-missing: a remote that lacks some outputs (never pushed) is not an error; those
    # stages simply run
    run_streaming(["pull", "--run-cache", "--allow-missing", *(["--remote", remote] if remote else [])],
                  Path(project_dir), "dvc pull")


# ------------------------------------------------------------------------------------------
# lineage: MLflow run <-> dvc.lock


def absolute_tracking_uri(uri: str, project_dir: Path) -> str:
    """A relative ``sqlite:///mlflow.db`` names a file in the project, wherever the flow runs."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((project_dir / uri[len(prefix):]).resolve())
    return uri


def lock_tags(project_dir: Path, stage: str = "train") -> dict[str, str]:
    """``dvc.dep.<path>`` / ``dvc.out.<path>`` -> md5 of the stage's entries in dvc.lock."""
    entry = yaml.safe_load((project_dir / "dvc.lock").read_text())["stages"][stage]
    tags = {}
    for kind in ("deps", "outs"):
        for item in entry.get(kind, []):
            tags[f"dvc.{kind[:-1]}.{item['path']}"] = item.get("md5", "")
    return tags


@task(name="tag-mlflow-run", cache_policy=NO_CACHE)
def tag_mlflow_run(project_dir: str, model_path: str) -> dict[str, Any]:
    """Tag the model's MLflow run with the dvc.lock md5s of train's deps and outs."""
    proj = Path(project_dir)
    info = read_run_info(proj / model_path)
    if not info.get("run_id"):
        get_run_logger().info("no MLflow run in %s/run.json (tracking disabled): no tags", model_path)
        return info
    from mlflow import MlflowClient  # lazy: the flow runs without MLflow when tracking is off

    uri = absolute_tracking_uri(info["tracking_uri"], proj)
    client = MlflowClient(tracking_uri=uri)
    tags = lock_tags(proj)
    for key, value in tags.items():
        client.set_tag(info["run_id"], key, value)
    info["experiment_id"] = client.get_run(info["run_id"]).info.experiment_id
    get_run_logger().info("tagged MLflow run %s with %d dvc.lock md5s", info["run_id"], len(tags))
    return info


def run_link(info: dict[str, Any]) -> str:
    run_id, uri = info.get("run_id"), info.get("tracking_uri") or ""
    if not run_id:
        return "no MLflow run (tracking disabled)"
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/#/experiments/{info.get('experiment_id', '0')}/runs/{run_id}"
        return f"[{run_id}]({url})"
    return f"`{run_id}` in `{uri}` (browse: `mlflow ui --backend-store-uri {uri}`)"


def report_markdown(metrics: dict[str, Any], reports: list[StageReport], info: dict[str, Any],
                    changes: dict[str, tuple[Any, Any]], pushed: str) -> str:
    lines = ["# vaepipe run", "", f"MLflow run: {run_link(info)}", "", "## Metrics (headline split)", "",
             "| metric | value |", "|---|---:|"]
    for key in [k for k in HEADLINE if k in metrics] + sorted(set(metrics) - set(HEADLINE)):
        text = format_metric(key, metrics)  # e.g. gap_vs_lm with its interval beside it
        if text is not None:
            lines.append(f"| {key} | {text} |")
    lines += probe_markdown(metrics)
    lines += ["", "## What DVC did", "", "| stage | outcome | seconds |", "|---|---|---:|"]
    lines += [f"| {r.stage} | {r.outcome} | {r.seconds} |" for r in reports]
    if changes:
        lines += ["", "## Parameters written to params.yaml", ""]
        lines += [f"- `{k}`: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
    lines += ["", f"DVC remote: {pushed}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# the flow


@flow(name="vae-pipeline")
def vae_pipeline(project_dir: str = ".", params_file: str | None = None, overrides: list[str] | None = None,
                 push_artifacts: bool = True, pull: bool = False, remote: str | None = None,
                 settings: RunSettings | None = None) -> dict[str, Any]:
    """ingest -> tokenize -> train_lm -> train -> evaluate -> embed through ``dvc repro``.

    ``params_file``, then ``settings`` (the typed fields people change most), then the free-form
    ``overrides`` (``section.key=value``) are written into the project's params.yaml first
    (validated: a bad key fails here, before any stage); DVC then runs only the stages they
    affect. ``pull`` fetches outputs and the run-cache from the remote first (a fresh clone);
    ``push_artifacts`` pushes everything at the end. The result's ``summary`` is the end-of-run
    report, also written to ``<paths.reports>/run_summary.md``.
    """
    logger = get_run_logger()
    proj = Path(project_dir).resolve()
    all_overrides = [*(settings.to_overrides() if settings else []), *(overrides or [])]
    changes = apply_run_params(proj, params_file, all_overrides)
    for key, (old, new) in changes.items():
        logger.info("params.yaml: %s: %r -> %r", key, old, new)
    params = resolve_run_params(proj)
    if pull:
        pull_all(str(proj), remote)
    reports: list[StageReport] = []
    info: dict[str, Any] = {"run_id": None, "tracking_uri": None}
    for stage in STAGES:
        runner = repro_ingest if stage == "ingest" else repro_stage
        reports.append(runner(stage, str(proj), pull))
        if stage == "train" and params.tracking.enabled:
            info = tag_mlflow_run(str(proj), params.paths.model)
    pushed = "not pushed (--no-push)"
    if push_artifacts:
        push(str(proj), remote)
        pushed = f"pushed to `{remote or 'the default remote'}` (with the run-cache)"
    metrics_file = proj / params.paths.reports / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    create_markdown_artifact(markdown=report_markdown(metrics, reports, info, changes, pushed), key=ARTIFACT_KEY,
                             description="vaepipe: headline metrics, MLflow run, what DVC did")
    outputs = {"model": params.paths.model, "reports": params.paths.reports, "embeddings": params.paths.embeddings}
    summary = run_summary(reports, metrics, info, outputs, pushed)
    logger.info("run summary written to %s", write_summary(summary, proj / params.paths.reports))
    return {"stages": {r.stage: r.outcome for r in reports}, "run_id": info.get("run_id"),
            "metrics": metrics, "changed_params": {k: v[1] for k, v in changes.items()}, "summary": summary}


# ------------------------------------------------------------------------------------------
# Ctrl-C


def interrupted_message(what: str | None) -> str:
    """The one line printed when Ctrl-C ends the flow."""
    where = f"during {what}" if what else "between steps"
    return (f"flows.pipeline: interrupted {where}; run `make run` (or this command) again to resume: "
            "DVC reruns only the stages that did not finish")


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process, from Linux's /proc (none elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ')'
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            out.append((int(stat.parent.name), state, int(ppid), int(pgrp)))
    return out


def _reap(pid: int) -> bool:
    """Collect ``pid`` if it is our child and has ended; whether it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


def _group_alive(pgid: int) -> bool:
    """Does process group ``pgid`` have a running member (zombies left to PID 1 do not count)?"""
    if Path("/proc/self/stat").is_file():
        return any(pgrp == pgid and state != "Z" for _, state, _, pgrp in _processes())
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int, grace: float) -> None:
    """SIGINT to process group ``pgid`` (led by our child ``pgid``); wait up to ``grace`` s for
    every member to end, then SIGKILL the rest.

    ``os.waitpid`` rather than ``Popen.wait``: this runs in a signal handler, maybe inside a
    ``Popen.wait`` of the same thread, whose lock it must not take."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGINT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pgid)
        if not _group_alive(pgid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    while not _reap(pgid):
        time.sleep(0.05)


def stop_children(grace: float = 5.0) -> None:
    """SIGTERM this process's other children (Prefect's temporary API), SIGKILL after ``grace`` s."""
    pids = [pid for pid, state, ppid, _ in _processes() if ppid == os.getpid() and state != "Z"]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        while not _reap(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)


class InterruptHandler:
    """SIGINT handler of ``main``: stop the running step, say which, exit 130 without Prefect.

    ``os._exit``: the flow engine would otherwise report the crash to its API (gone with the
    same Ctrl-C) and retry for minutes; nothing of the pipeline's lives in this process (every
    stage writes its outputs in its own process, atomically, and DVC records a stage only when
    it has finished).
    """

    def __init__(self, grace: float = CHILD_GRACE_S) -> None:
        self.grace = grace
        self.interrupted = False

    def __call__(self, signum: int, frame: Any) -> None:
        proc, what = RUNNING.proc, RUNNING.what
        if self.interrupted:  # a second Ctrl-C: no more waiting
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            self._exit(what)
        self.interrupted = True
        if proc is not None:
            stop_group(proc.pid, self.grace)
        stop_children()
        self._exit(what)

    @staticmethod
    def _exit(what: str | None) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # e.g. a reentrant call: the signal came mid-write
                stream.flush()
        # os.write, not print: the interrupted code may hold sys.stderr's buffer
        with contextlib.suppress(OSError):
            os.write(sys.stderr.fileno(), (interrupted_message(what) + "\n").encode())
        os._exit(INTERRUPTED_EXIT)


# ------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", metavar="PATH", default=None,
                   help="parameters file written into the project's params.yaml (default: params.yaml itself)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter for this run, value parsed as YAML (repeatable)")
    p.add_argument("--no-push", dest="push", action="store_false", help="skip dvc push at the end")
    p.add_argument("--pull", action="store_true", help="dvc pull (outputs and run-cache) before the stages")
    p.add_argument("--project-dir", default=".", metavar="D", help="the DVC project (default: .)")
    p.add_argument("--remote", default=None, metavar="NAME", help="DVC remote (default: the core.remote)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from vaepipe.core.errors import VaepipeError

    args = build_parser().parse_args(argv)
    params_file = args.params
    proj = Path(args.project_dir).resolve()
    if params_file is not None and Path(params_file).resolve() == (proj / "params.yaml"):
        params_file = None  # `--params params.yaml` (make run): the file DVC reads already
    try:
        # fail on a bad key in a second, before Prefect starts its API
        resolve_run_params(proj, params_file, args.overrides)
    except VaepipeError as e:
        print(f"flows.pipeline: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    previous = signal.signal(signal.SIGINT, InterruptHandler())
    try:
        # without PREFECT_API_URL Prefect starts a temporary API; its 20 s default start-up
        # timeout is too short on a loaded machine
        with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_TIMEOUT_S}):
            result = vae_pipeline(project_dir=str(proj), params_file=params_file, overrides=args.overrides,
                                  push_artifacts=args.push, pull=args.pull, remote=args.remote)
    except (StageFailed, VaepipeError) as e:
        print(f"flows.pipeline: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    # last on the terminal, after Prefect's "Finished in state Completed()"
    print("\n" + result["summary"], end="", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
