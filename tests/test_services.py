"""The pipeline against real shared servers: PostgreSQL, MLflow server, Prefect server + worker.

A module fixture starts the whole stack through ``infra/services.py`` (the script behind
``make services-up``) in a temporary state folder on free ports, with authentication on, and
purges it at the end. Everything is checked from the outside: the MLflow REST API, the Prefect
REST API, a pyfunc load by ``models:/`` URI in a fresh process, and a real headless browser.

Skipped only when the PostgreSQL server binaries are absent (``.ci/run`` installs them).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from conftest import tiny_overrides

pytestmark = [pytest.mark.services, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# where the browser screenshots are kept (a CI artifact); .ci/run sets it
ARTIFACTS = Path(os.environ.get("VAEPIPE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "services"
EXPERIMENT = "vaepipe-services-test"
MODEL_NAME = "vaepipe-services-test-text-vae"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _pg_binaries() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) or shutil.which("pg_ctl") is not None


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


STATE_PREFIX = "vaepipe-services-"


def _state_root() -> Path:
    root = os.environ.get("VAEPIPE_TEST_STATE_ROOT")
    if root:
        path = Path(root)
        assert path.is_absolute(), f"VAEPIPE_TEST_STATE_ROOT={root!r} must be absolute"
        path.mkdir(parents=True, exist_ok=True)
        return path.resolve()
    return Path(tempfile.gettempdir()).resolve()


def _state_dir() -> Path:
    """A fresh state folder the postgres user can reach when we are root (0711, like a home)."""
    d = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir=_state_root()))
    os.chmod(d, 0o711)
    return d


def _remove_state_dir(state: Path) -> None:
    """Delete a folder ``_state_dir`` made, and nothing else (what purge left, if anything)."""
    if not state.exists():
        return
    assert state.is_absolute() and not state.is_symlink() and state.parent == _state_root() \
        and state.name.startswith(STATE_PREFIX), f"not a test state folder: {state}"
    assert state not in (REPO, *REPO.parents) and state != Path.cwd() and state not in Path.cwd().parents
    shutil.rmtree(state, ignore_errors=True)


def services(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # cwd: neither the checkout nor the state folder (purge refuses to delete the cwd, and
    # nothing the script does may touch the tree)
    return subprocess.run([sys.executable, "-m", "infra.services", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=_state_root())


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


@dataclass
class Stack:
    env: dict[str, str]  # VAEPIPE_* for services.py, plus the client exports of local.env
    state: Path

    @property
    def mlflow(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def prefect(self) -> str:
        return self.env["PREFECT_API_URL"]

    @property
    def mlflow_auth(self) -> tuple[str, str]:
        return self.env["MLFLOW_TRACKING_USERNAME"], self.env["MLFLOW_TRACKING_PASSWORD"]

    @property
    def prefect_auth(self) -> tuple[str, str]:
        user, _, password = self.env["PREFECT_API_AUTH_STRING"].partition(":")
        return user, password

    def api(self, endpoint: str, **params: str) -> dict:
        """GET an MLflow REST endpoint as the admin; assert it answered 200."""
        r = requests.get(f"{self.mlflow}/api/2.0/mlflow/{endpoint}", params=params, auth=self.mlflow_auth,
                         timeout=60)
        assert r.status_code == 200, f"{endpoint}: {r.status_code} {r.text[:300]}"
        return r.json()

    def cli(self, stage: str, overrides: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**self.env, "OMP_NUM_THREADS": "1"}
        args = [a for o in overrides for a in ("--set", o)]
        return subprocess.run([sys.executable, "-m", "vaepipe", "-q", stage, "--params", str(REPO / "params.yaml"),
                               *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _base_env(state: Path) -> dict[str, str]:
    pg, mlflow, prefect = _free_ports(3)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "VAEPIPE_"))}
    env.update({"VAEPIPE_STATE_DIR": str(state), "VAEPIPE_ENV_FILE": str(state / "local.env"),
                "VAEPIPE_PG_PORT": str(pg), "VAEPIPE_MLFLOW_PORT": str(mlflow),
                "VAEPIPE_PREFECT_PORT": str(prefect), "VAEPIPE_MLFLOW_WORKERS": "1",
                "VAEPIPE_START_TIMEOUT": "300",
                # artifacts on the MLflow server's disk, as before the object store; the store
                # (on by default) is covered by tests/test_services_s3.py
                "VAEPIPE_S3": "0",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "MLFLOW_ENABLE_TELEMETRY": "false"})
    return env


@pytest.fixture(scope="module")
def stack() -> Stack:
    if not _pg_binaries():
        pytest.skip("PostgreSQL server binaries absent (apt-get install postgresql; .ci/run does)")
    state = _state_dir()
    # the worker runs deployments in VAEPIPE_PROJECT_DIR (prefect.yaml's pull step): a scratch
    # project that test_scheduled_deployment_runs_on_the_worker creates there
    env = {**_base_env(state), "VAEPIPE_AUTH": "1", "VAEPIPE_PROJECT_DIR": str(state / "project")}
    try:
        r = services(env, "up")
        assert r.returncode == 0, f"services up failed:\n{r.stdout}\n{r.stderr}\n{_logs(state)}"
        env.update(read_env_file(state / "local.env"))
        yield Stack(env, state)
    finally:
        r = services(env, "purge", "--yes")
        assert r.returncode == 0, r.stderr
        _remove_state_dir(state)


def _logs(state: Path) -> str:
    out = []
    for f in sorted((state / "logs").glob("*.log")):
        out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# the script itself (no servers needed)


def test_refuses_public_bind_without_auth() -> None:
    state = _state_dir()
    try:
        env = {**_base_env(state), "VAEPIPE_BIND_HOST": "0.0.0.0", "VAEPIPE_AUTH": "0"}
        r = services(env, "up", timeout=60)
        assert r.returncode == 2
        assert "refusing to bind 0.0.0.0" in r.stderr and "VAEPIPE_AUTH=1" in r.stderr
        # nothing was started or initialised
        assert not (state / "postgres").exists() and not (state / "run").exists()
        for var in ("VAEPIPE_PG_PORT", "VAEPIPE_MLFLOW_PORT", "VAEPIPE_PREFECT_PORT"):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", int(env[var]))) != 0
    finally:
        _remove_state_dir(state)


def test_status_of_a_stack_never_started_is_down() -> None:
    state = _state_dir()
    try:
        r = services(_base_env(state), "status", timeout=60)
        assert r.returncode == 3
        assert all(f"{name}" in r.stdout for name in ("postgres", "mlflow", "prefect", "worker"))
        assert " up " not in r.stdout
    finally:
        _remove_state_dir(state)


def test_purge_refuses_a_folder_that_is_not_a_state_folder(tmp_path: Path) -> None:
    keep = tmp_path / "precious.txt"
    keep.write_text("do not delete")
    env = {**_base_env(tmp_path)}
    r = services(env, "purge", "--yes", timeout=60)
    assert r.returncode == 2 and "not a vaepipe state folder" in r.stderr
    assert keep.read_text() == "do not delete"


# ------------------------------------------------------------------------------------------
# the stack


def test_up_is_idempotent_and_secrets_are_private(stack: Stack) -> None:
    r = services(stack.env, "up")
    assert r.returncode == 0, r.stderr
    for name in ("postgres", "mlflow", "prefect", "worker"):
        assert f"{name}: already running" in r.stdout
    r = services(stack.env, "status")
    assert r.returncode == 0, r.stdout
    assert r.stdout.count(" up ") == 4
    for f in [stack.state / "local.env", *(stack.state / "secrets").iterdir()]:
        assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"
    exports = read_env_file(stack.state / "local.env")
    assert exports["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert exports["PREFECT_API_URL"].endswith("/api")
    assert (stack.state / "postgres" / "LOCATION").read_text().strip() == str(stack.state / "postgres" / "data")
    # the database password reaches the servers by environment, never by argv (ps shows argv)
    password = (stack.state / "secrets/postgres.password").read_text().strip()
    cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().decode() for pid in _pids(stack)]
    assert len(cmdlines) == 3 and not any(password in c for c in cmdlines)


def _pids(stack: Stack) -> list[str]:
    return [f.read_text().strip() for f in (stack.state / "run").glob("*.pid")]


def test_unauthenticated_requests_are_refused(stack: Stack) -> None:
    url = f"{stack.mlflow}/api/2.0/mlflow/experiments/search"
    assert requests.get(url, params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(url, params={"max_results": 1}, auth=("admin", "password1234"), timeout=30).status_code == 401
    assert requests.get(url, params={"max_results": 1}, auth=stack.mlflow_auth, timeout=30).status_code == 200
    flows = f"{stack.prefect}/flows/filter"
    assert requests.post(flows, json={}, timeout=30).status_code == 401
    assert requests.post(flows, json={}, auth=stack.prefect_auth, timeout=30).status_code == 200


# ------------------------------------------------------------------------------------------
# the pipeline against the servers


@pytest.fixture(scope="module")
def pipeline(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ingest -> tokenize -> train -> evaluate by the CLI, tracking to the server."""
    root = tmp_path_factory.mktemp("services-pipeline")
    overrides = [*tiny_overrides(root), "tracking.enabled=true", f"tracking.uri={stack.mlflow}",
                 f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={MODEL_NAME}",
                 "train.num_threads=1"]
    for stage in ("ingest", "tokenize", "train", "evaluate"):
        r = stack.cli(stage, overrides)
        assert r.returncode == 0, f"vaepipe {stage}:\n{r.stderr[-3000:]}"
    run_info = json.loads((root / "models/vae/run.json").read_text())
    assert run_info["tracking_uri"] == stack.mlflow
    return {"root": root, "run_id": run_info["run_id"], "overrides": overrides}


def test_training_and_evaluation_land_in_one_server_run(stack: Stack, pipeline: dict) -> None:
    run = stack.api("runs/get", run_id=pipeline["run_id"])["run"]
    assert run["info"]["status"] == "FINISHED"
    exp = stack.api("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert run["info"]["experiment_id"] == exp["experiment_id"]
    # artifacts are proxied by the server (mlflow-artifacts:), not written to a client folder
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.latent_dim"] == "8" and params["tracking.experiment"] == EXPERIMENT
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    # evaluation added its figures to the training run; they match reports/metrics.json
    report = json.loads((pipeline["root"] / "reports/metrics.json").read_text())
    assert metrics["test_iw_nll"] == pytest.approx(report["iw_nll"], rel=1e-6)
    # a training metric has a history: one point every train.log_every (5) steps
    history = stack.api("metrics/get-history", run_id=pipeline["run_id"], metric_key="loss")["metrics"]
    steps = sorted(m["step"] for m in history)
    assert len(steps) >= 2 and len(set(steps)) == len(steps) and all(s % 5 == 0 for s in steps)


def test_artifacts_download_through_the_server(stack: Stack, pipeline: dict) -> None:
    run_id = pipeline["run_id"]
    listed = {f["path"] for f in stack.api("artifacts/list", run_id=run_id, path="evaluation")["files"]}
    assert "evaluation/metrics.json" in listed and any(p.endswith(".png") for p in listed)
    r = requests.get(f"{stack.mlflow}/get-artifact", params={"run_uuid": run_id, "path": "evaluation/metrics.json"},
                     auth=stack.mlflow_auth, timeout=30)
    assert r.status_code == 200
    assert r.content == (pipeline["root"] / "reports/metrics.json").read_bytes()
    # and the bytes sit in the server's artifact store, under the state folder
    stored = list((stack.state / "mlflow/artifacts").rglob("evaluation/metrics.json"))
    assert len(stored) == 1 and run_id in str(stored[0])


def test_registered_model_serves_vectors_by_models_uri(stack: Stack, pipeline: dict) -> None:
    reg = stack.api("registered-models/get", name=MODEL_NAME)["registered_model"]
    version = max(reg["latest_versions"], key=lambda v: int(v["version"]))
    assert version["run_id"] == pipeline["run_id"] and version["status"] == "READY"
    # a fresh process, knowing only the server and the URI, embeds new text
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "v = m.predict(pd.DataFrame({'text': ['We the people.', 'The union is strong.', 'Peace.']}))\n"
        "print(json.dumps({'shape': list(v.shape), 'finite': bool(pd.DataFrame(v).notna().all().all())}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, f"models:/{MODEL_NAME}/{version['version']}"],
                       env={**stack.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300, cwd=pipeline["root"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"shape": [3, 8], "finite": True}


def test_run_and_registry_survive_restarts(stack: Stack, pipeline: dict) -> None:
    before = stack.api("runs/get", run_id=pipeline["run_id"])["run"]
    for service in ("mlflow", "postgres"):
        r = services(stack.env, "restart", service)
        assert r.returncode == 0, f"restart {service}: {r.stderr}\n{_logs(stack.state)}"
    # MLflow must reconnect to the restarted database by itself
    after = _retry(lambda: stack.api("runs/get", run_id=pipeline["run_id"])["run"])
    assert after["info"] == before["info"]
    assert sorted(after["data"]["metrics"], key=lambda m: m["key"]) == \
        sorted(before["data"]["metrics"], key=lambda m: m["key"])
    reg = stack.api("registered-models/get", name=MODEL_NAME)["registered_model"]
    assert any(v["run_id"] == pipeline["run_id"] for v in reg["latest_versions"])
    assert services(stack.env, "status").returncode == 0


def _retry(fn, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except (AssertionError, requests.RequestException):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


# ------------------------------------------------------------------------------------------
# the MLflow UI in a real browser

needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="Debian chromium + chromium-driver absent (apt-get install chromium chromium-driver; .ci/run does)")


@contextlib.contextmanager
def chromium(basic_auth: tuple[str, str] | None = None):
    """Headless Debian chromium; with ``basic_auth`` on every request the pages make (the UI's
    own API calls included), as a browser does once the user has answered the login prompt."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1600,1200"):
        opts.add_argument(flag)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        if basic_auth:
            token = base64.b64encode(":".join(basic_auth).encode()).decode()
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
        yield driver
    finally:
        driver.quit()


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver, what: str, shot: str, until, timeout: float = 120):
    """Wait until ``until(driver)`` is truthy (its value is returned); the screenshot ``shot``
    is saved either way, and a timeout names ``what`` and shows the page's text."""
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def probe(d):
        try:
            return until(d)
        except WebDriverException:  # the page is still rendering (stale or missing element)
            return False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=1).until(probe)
    except TimeoutException:
        pytest.fail(f"{what}: not on {driver.current_url} after {timeout:.0f} s; the page shows:\n"
                    + body_text(driver)[-3000:])
    finally:
        driver.save_screenshot(str(ARTIFACTS / shot))


def page_shows(driver, url: str, *texts: str, shot: str) -> str:
    driver.get(url)
    wait_for(driver, " + ".join(texts), shot, lambda d: all(t in body_text(d) for t in texts))
    return body_text(driver)


def link_to(driver, href: str):
    """The first link on the page whose target is ``href`` (None while there is none)."""
    from selenium.webdriver.common.by import By

    return next((a for a in driver.find_elements(By.TAG_NAME, "a") if a.get_attribute("href") == href), None)


@needs_chromium
def test_mlflow_ui_shows_the_run_and_a_metric(stack: Stack, pipeline: dict) -> None:
    run = stack.api("runs/get", run_id=pipeline["run_id"])["run"]
    exp_id, run_name = run["info"]["experiment_id"], run["info"]["run_name"]
    with chromium(stack.mlflow_auth) as driver:
        page_shows(driver, f"{stack.mlflow}/#/experiments/{exp_id}/runs", EXPERIMENT, run_name,
                   shot="mlflow-experiment.png")
        body = page_shows(driver, f"{stack.mlflow}/#/experiments/{exp_id}/runs/{pipeline['run_id']}",
                          pipeline["run_id"], "test_iw_nll", shot="mlflow-run.png")
        assert "Finished" in body
    assert (ARTIFACTS / "mlflow-run.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------
# the scheduled deployment, run by the worker


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> dict:
    """``prefect deploy`` of prefect.yaml from a scratch project, then one run of the deployment
    on the stack's worker (the whole pipeline, tracked to the stack's MLflow); what the
    deployment, its flow run and the flow's MLflow run look like on the servers."""
    from test_dvc_pipeline import git, make_project

    project = Path(stack.env["VAEPIPE_PROJECT_DIR"])
    make_project(project, stack.state / "dvc-remote",
                 extra=["tracking.enabled=true", f"tracking.uri={stack.mlflow}", "tracking.experiment=vaepipe-deployed",
                        "tracking.registered_model=vaepipe-deployed-text-vae", "tracking.system_metrics=false"])
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    git(["add", "-A"], project)
    git(["commit", "-qm", "flows"], project)

    r = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "nightly"],
                       env=stack.env, cwd=project, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"prefect deploy:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    api, auth = stack.prefect, stack.prefect_auth
    dep = requests.get(f"{api}/deployments/name/vae-pipeline/nightly", auth=auth, timeout=30).json()

    # run it now rather than at 03:00; no DVC remote to push to here
    run = requests.post(f"{api}/deployments/{dep['id']}/create_flow_run", auth=auth, timeout=30,
                        json={"parameters": {"push_artifacts": False}}).json()
    deadline = time.monotonic() + 900
    while True:
        state = requests.get(f"{api}/flow_runs/{run['id']}", auth=auth, timeout=30).json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(3)
    if state["type"] != "COMPLETED":
        logs = requests.post(f"{api}/logs/filter", auth=auth, timeout=30,
                             json={"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_DESC",
                                   "limit": 30}).json()
        pytest.fail(f"flow run ended {state['type']}: {state.get('message')}\n"
                    + "\n".join(entry["message"][-500:] for entry in reversed(logs)) + "\n" + _logs(stack.state))
    artifacts = requests.post(f"{api}/artifacts/filter", auth=auth, timeout=30,
                              json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    run_id = json.loads((project / "models/vae/run.json").read_text())["run_id"]
    return {"project": project, "deployment": dep, "flow_run": run, "artifacts": artifacts, "run_id": run_id,
            "mlflow_run": stack.api("runs/get", run_id=run_id)["run"]}


def test_scheduled_deployment_runs_on_the_worker(stack: Stack, deployed: dict) -> None:
    dep, run = deployed["deployment"], deployed["flow_run"]
    assert dep["work_pool_name"] == "vaepipe-process"  # infra/services.py's pool, named in prefect.yaml
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"] and dep["schedules"][0]["active"]
    assert run["work_pool_name"] == "vaepipe-process"
    # its metrics artifact links the MLflow run the flow trained, on our server
    report = next(a for a in deployed["artifacts"] if a["key"] == "vaepipe-metrics")
    assert f"{stack.mlflow}/#/experiments/" in report["data"] and deployed["run_id"] in report["data"]
    assert deployed["mlflow_run"]["info"]["status"] == "FINISHED"


def test_the_deployed_runs_mlflow_run_names_its_flow_run(stack: Stack, deployed: dict) -> None:
    flow_run = requests.get(f"{stack.prefect}/flow_runs/{deployed['flow_run']['id']}", auth=stack.prefect_auth,
                            timeout=30).json()
    tags = {t["key"]: t["value"] for t in deployed["mlflow_run"]["data"]["tags"]}
    ui = stack.prefect.removesuffix("/api")
    assert tags["prefect.flow_run_id"] == flow_run["id"] and tags["prefect.flow_run_name"] == flow_run["name"]
    assert tags["prefect.deployment"] == "nightly"
    assert tags["prefect.flow_run_url"] == f"{ui}/runs/flow-run/{flow_run['id']}"
    assert tags["mlflow.note.content"].startswith(f"Prefect flow run: [{flow_run['name']}]({ui}/runs/flow-run/")
    inputs = {d["dataset"]["name"]: d["dataset"] for d in deployed["mlflow_run"]["inputs"]["dataset_inputs"]}
    assert {"corpus", "tokens/train", "tokens/valid"} <= set(inputs)
    # the project has a default DVC remote: the data's source is where `dvc push` puts it
    remote = (stack.state / "dvc-remote").as_uri()
    assert json.loads(inputs["tokens/train"]["source"])["uri"].startswith(f"{remote}/files/md5/")


# ------------------------------------------------------------------------------------------
# both UIs in a real browser, on the deployed run: each links to the other


@needs_chromium
def test_mlflow_run_page_shows_datasets_description_and_the_flow_run_link(stack: Stack, deployed: dict) -> None:
    from selenium.webdriver.common.by import By

    info, run_id = deployed["mlflow_run"]["info"], deployed["run_id"]
    flow_run_url = f"{stack.prefect.removesuffix('/api')}/runs/flow-run/{deployed['flow_run']['id']}"
    names = sorted({d["dataset"]["name"] for d in deployed["mlflow_run"]["inputs"]["dataset_inputs"]})
    with chromium(stack.mlflow_auth) as driver:
        page_shows(driver, f"{stack.mlflow}/#/experiments/{info['experiment_id']}/runs/{run_id}",
                   run_id, "Datasets", "Description", "Evaluation on", shot="mlflow-run-lineage.png")
        # the description's first line is a link to the flow run in the Prefect UI
        assert wait_for(driver, f"a link to {flow_run_url}", "mlflow-run-lineage.png",
                        lambda d: link_to(d, flow_run_url)) is not None
        # the headline table, once the long description is unfolded
        unfold = [e for e in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']")]
        if unfold:
            unfold[0].click()
        rows = ("IW-NLL (nats/doc)", "LM NLL (nats/doc)", "gap vs LM (nats/doc)", "95% CI", "Reconstructions")
        wait_for(driver, " + ".join(rows), "mlflow-run-description.png",
                 lambda d: all(t in body_text(d) for t in rows))
        body = body_text(driver)
        # the Datasets box shows the first dataset; "+N" opens the others
        shown = [n for n in names if f"{n} (" in body]
        assert shown, f"no dataset of {names} on the page"
        if len(shown) < len(names):
            more = [b for b in driver.find_elements(By.TAG_NAME, "button") if re.fullmatch(r"\+\d+", b.text.strip())]
            assert more, "the Datasets box neither shows every dataset nor offers the rest"
            more[0].click()
        wait_for(driver, f"datasets {names}", "mlflow-run-datasets.png",
                 lambda d: all(f"{n} (" in body_text(d) for n in names))
    assert (ARTIFACTS / "mlflow-run-datasets.png").stat().st_size > 10_000


@needs_chromium
def test_prefect_flow_run_page_links_the_mlflow_run(stack: Stack, deployed: dict) -> None:
    from selenium.webdriver.common.by import By

    ui = stack.prefect.removesuffix("/api")
    settings = requests.get(f"{ui}/ui-settings", timeout=30).json()
    # the UI must call the stack's API, not Prefect's default port (else: "Can't connect to Server API")
    assert settings["api_url"] == stack.prefect
    flow_run = deployed["flow_run"]
    info = deployed["mlflow_run"]["info"]
    mlflow_run_url = f"{stack.mlflow}/#/experiments/{info['experiment_id']}/runs/{deployed['run_id']}"
    with chromium() as driver:
        # what the UI's login prompt stores: the API auth string, sent by the UI on each API call
        driver.get(f"{ui}/api/health")
        driver.execute_script("localStorage.setItem('prefect-password', arguments[0])",
                              base64.b64encode(stack.env["PREFECT_API_AUTH_STRING"].encode()).decode())
        page_shows(driver, f"{ui}/runs/flow-run/{flow_run['id']}", flow_run["name"], "Completed", "Artifacts",
                   shot="prefect-flow-run.png")
        tab = wait_for(driver, "the Artifacts tab", "prefect-flow-run.png",
                       lambda d: next(iter(d.find_elements(By.XPATH, "//li[normalize-space(.)='Artifacts']")), None))
        tab.click()
        cards = "//a[contains(@href, '/artifacts/artifact/')]"
        card = wait_for(driver, "the vaepipe-metrics artifact", "prefect-flow-run-artifacts.png",
                        lambda d: next((a for a in d.find_elements(By.XPATH, cards) if "vaepipe-metrics" in a.text),
                                       None))
        card.click()
        # the flow's markdown report, rendered: the MLflow run is a link
        link = wait_for(driver, f"a link to {mlflow_run_url}", "prefect-artifact.png",
                        lambda d: link_to(d, mlflow_run_url))
        assert link.text == deployed["run_id"]
        assert "iw_nll" in body_text(driver)
    assert (ARTIFACTS / "prefect-artifact.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------
# last, because it leaves the MLflow server stopped (the module fixture purges the stack)


def test_training_survives_the_tracking_server_going_away(stack: Stack, pipeline: dict) -> None:
    root = pipeline["root"]
    model_dir = root / "models/vae-lost-server"
    overrides = [*pipeline["overrides"], f"paths.model={model_dir}", "train.max_steps=200",
                 "train.max_epochs=100", "train.patience=0", "tracking.system_metrics=false"]
    env = {**stack.env, "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    args = [a for o in overrides for a in ("--set", o)]
    log_file = root / "train-lost-server.log"
    with open(log_file, "w") as log:  # a file, not a pipe nobody reads while we wait
        proc = subprocess.Popen([sys.executable, "-m", "vaepipe", "-q", "train", "--params", str(REPO / "params.yaml"),
                                 *args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        # wait until the run exists on the server and has received training metrics
        exp_id = stack.api("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
        deadline = time.monotonic() + 300
        run_id = None
        while run_id is None:
            assert proc.poll() is None, "training ended before the server could be stopped:\n" + log_file.read_text()
            assert time.monotonic() < deadline, "the training run never reported metrics"
            runs = requests.post(f"{stack.mlflow}/api/2.0/mlflow/runs/search", auth=stack.mlflow_auth, timeout=30,
                                 json={"experiment_ids": [exp_id], "filter": "attributes.status = 'RUNNING'"}).json()
            for run in runs.get("runs", []):
                if any(m["key"] == "loss" for m in run["data"].get("metrics", [])):
                    run_id = run["info"]["run_id"]
            time.sleep(1)
        r = services(stack.env, "down", "mlflow")
        assert r.returncode == 0 and "mlflow: stopped" in r.stdout
        proc.wait(timeout=600)
        out = log_file.read_text()
        assert proc.returncode == 0, out[-3000:]
        # the tracker noticed the outage while training ran, and training finished anyway
        assert "training goes on" in out, out[-3000:]
        assert (model_dir / "best.pt").exists() and (model_dir / "last.pt").exists()
        assert json.loads((model_dir / "run.json").read_text())["run_id"] == run_id
    finally:
        if proc.poll() is None:
            proc.kill()
