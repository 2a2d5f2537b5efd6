"""engine.submit: a data stage submitted as a Ray job (vaepipe.adapters.ray_jobs).

Unit tests with a fake job client (entrypoint, job server address, streamed lines, the failed
job's last error line), and a real one: a Ray head with its job server (``ray start --head
--include-dashboard=true``) in a temp dir, tokenize on the fixture corpus submitted through the
CLI, the token files equal to the local engine's, a failing job's error line on the CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vaepipe.core.config import EngineConfig, load_params
from vaepipe.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("ray")
ray_jobs = pytest.importorskip("vaepipe.adapters.ray_jobs")


def test_job_server_is_the_address_host_at_8265_unless_named():
    assert ray_jobs.dashboard_url(EngineConfig(address="10.0.0.5:6379")) == "http://10.0.0.5:8265"
    assert ray_jobs.dashboard_url(EngineConfig(address="ray://head.example:10001")) == "http://head.example:8265"
    assert ray_jobs.dashboard_url(EngineConfig(address="auto", dashboard="h:9000")) == "http://h:9000"
    assert ray_jobs.dashboard_url(EngineConfig(address="a:1", dashboard="https://h/ray")) == "https://h/ray"
    with pytest.raises(ConfigError, match="engine.dashboard"):
        ray_jobs.dashboard_url(EngineConfig(address="auto"))


def test_submit_needs_a_cluster_to_submit_to():
    with pytest.raises(ConfigError, match="engine.submit"):
        load_params(None, ["engine.kind=ray", "engine.submit=true"])
    with pytest.raises(ConfigError, match="engine.dashboard"):
        load_params(None, ["engine.kind=ray", "engine.submit=true", "engine.address=auto"])
    load_params(None, ["engine.kind=ray", "engine.submit=true", "engine.address=10.0.0.5:6379"])


def test_entrypoint_runs_the_same_stage_on_the_cluster_it_lands_on():
    cmd = ray_jobs.job_entrypoint("tokenize", "params.yaml", ["tokenize.vocab_size=300", "paths.tokens=a b"],
                                  "/work/my project", wait=True)
    assert cmd.startswith("cd '/work/my project' && vaepipe tokenize --wait --params ")
    assert f"--params {os.path.abspath('params.yaml')}" in cmd
    assert "--set tokenize.vocab_size=300 --set 'paths.tokens=a b'" in cmd
    # the job's own driver runs Ray Data in the job's cluster, and never submits again
    assert cmd.endswith("--set engine.kind=ray --set engine.submit=false --set engine.address=auto")


class FakeClient:
    def __init__(self, logs: list[str], status: str, message: str = "") -> None:
        self.logs, self.status, self.message = logs, status, message
        self.submitted: list[dict] = []
        self.stopped: list[str] = []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return "raysubmit_1"

    async def tail_job_logs(self, job_id):
        for chunk in self.logs:
            yield chunk

    def get_job_status(self, job_id):
        return self.status

    def get_job_info(self, job_id):
        return type("Info", (), {"message": self.message})()

    def stop_job(self, job_id):
        self.stopped.append(job_id)


def test_job_logs_are_streamed_line_by_line():
    client = FakeClient(["one\ntwo\n", "three\n"], "SUCCEEDED")
    lines: list[str] = []
    job = ray_jobs.submit_stage("ingest", EngineConfig(kind="ray", address="h:6379", submit=True),
                                params_file=None, overrides=[], on_line=lines.append, client=client)
    assert job == "raysubmit_1" and lines == ["one", "two", "three"]
    assert client.submitted[0]["entrypoint"].split(" && ", 1)[1].startswith("vaepipe ingest --set engine.kind=ray")


def test_a_failed_job_is_an_error_with_its_last_error_line():
    logs = ["12:00:01 vaepipe.stages.tokenize: training\n",
            "vaepipe tokenize: error: /data/corpus: no corpus Parquet files (run `vaepipe ingest` first)\n"]
    client = FakeClient(logs, "FAILED", "Job entrypoint command failed with exit code 1")
    with pytest.raises(ray_jobs.JobFailed, match=r"raysubmit_1 \(tokenize\) failed: vaepipe tokenize: error: "
                                                 r"/data/corpus: no corpus"):
        ray_jobs.submit_stage("tokenize", EngineConfig(kind="ray", address="h:6379", submit=True),
                              params_file=None, overrides=[], on_line=lambda _: None, client=client)
    tb = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: bad thing"]
    assert ray_jobs.last_error_line(tb) == "ValueError: bad thing"
    assert ray_jobs.last_error_line(["all fine"]) is None


# ---------------------------------------------------------------------------------------
# A real job server


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_node(temp_dir: Path) -> None:
    """Kill the processes of the node whose --temp-dir is ``temp_dir`` (by PID, found in /proc)."""
    import time

    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmd:
            try:
                os.kill(int(pid_dir.name), 9)
            except ProcessLookupError:
                pass
    time.sleep(0.5)


@pytest.mark.slow
def test_tokenize_submitted_as_a_ray_job_equals_local(tmp_path):
    from conftest import make_tiny_params, tiny_overrides
    from vaepipe.stages import ingest, tokenize

    # the dashboard (the job server) gets 60 s to start by default: too few on a loaded 2-core box
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `vaepipe`
    deps = subprocess.run([sys.executable, "-c", "import ray.dashboard.optional_deps"], env=env,
                          capture_output=True, text=True, timeout=120)
    if deps.returncode:
        pytest.skip("the Ray job server needs ray[default]'s dashboard packages (aiohttp-cors, opencensus, "
                    f"grpcio, opentelemetry-exporter-prometheus): {deps.stderr.strip().splitlines()[-1]}")
    local = make_tiny_params(tmp_path / "local", [])
    ingest.run(local)
    tokenize.run(local)
    root = tmp_path / "job"
    shutil.copytree(local.paths.corpus, root / "data/corpus")
    port, dport = _free_port(), _free_port()
    head_tmp = Path(tempfile.mkdtemp(prefix="vrj", dir="/tmp"))  # short: Ray's socket paths
    ray_bin = Path(sys.executable).parent / "ray"
    try:
        head = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                               str(dport), "--num-cpus", "2", "--disable-usage-stats", f"--temp-dir={head_tmp}"],
                              env=env, capture_output=True, text=True, timeout=420)
        assert head.returncode == 0, head.stderr[-3000:]
        sets = [*tiny_overrides(root), "engine.kind=ray", f"engine.address=127.0.0.1:{port}", "engine.submit=true",
                f"engine.dashboard=http://127.0.0.1:{dport}"]
        cli = [sys.executable, "-m", "vaepipe.cli", "tokenize", *[x for o in sets for x in ("--set", o)]]
        r = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        assert "encoded" in r.stdout  # the job's log lines, streamed
        files = {str(p.relative_to(root / "data/tokens")): p.read_bytes()
                 for p in sorted((root / "data/tokens").rglob("*")) if p.is_file()}
        want = {str(p.relative_to(local.paths.tokens)): p.read_bytes()
                for p in sorted(Path(local.paths.tokens).rglob("*")) if p.is_file()}
        assert files == want
        # a job that fails: its last error line is the CLI's one-line error
        r = subprocess.run([*cli, "--set", f"paths.corpus={tmp_path / 'nothing'}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "Ray job" in last and "failed" in last and "no corpus Parquet files" in last, r.stderr[-2000:]
    finally:
        _stop_node(head_tmp)
        shutil.rmtree(head_tmp, ignore_errors=True)
