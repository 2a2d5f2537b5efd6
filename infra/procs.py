"""The server processes we start: pid files, health checks with deadlines, stopping, HTTP.

Part of ``infra/services.py``; standard library only. Each server runs in its own session
(process group), so stopping it stops its worker processes too; a pid file is trusted only
while that process is alive, not a zombie, still runs the expected program and carries, in
the environment it was started with, the tag naming this service of this state folder (no
pid reuse, and one stack never stops another's servers).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from infra.safety import ServiceError
from infra.settings import Config

TAG_VAR = "VAEPIPE_SERVICE_TAG"


def _pidfile(cfg: Config, name: str) -> Path:
    return cfg.state / "run" / f"{name}.pid"


def service_tag(cfg: Config, name: str) -> str:
    return f"{name}@{cfg.state_dir}"


def _alive(pid: int, marker: str, tag: str | None = None) -> bool:
    """Running, not a zombie, its command line still names ``marker`` and, given ``tag``, its
    environment holds ``VAEPIPE_SERVICE_TAG=tag`` (no pid reuse, not another stack's server)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if tag else []
    except OSError:
        return False
    if tag and f"{TAG_VAR}={tag}".encode() not in environ:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and marker in cmdline


def managed_pid(cfg: Config, name: str, marker: str) -> int | None:
    f = _pidfile(cfg, name)
    try:
        pid = int(f.read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid, marker, service_tag(cfg, name)) else None


def spawn(cfg: Config, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    log = cfg.state / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        out.flush()
        # a new session: the server and its worker processes form one group we can stop
        # cwd: the state folder, never the checkout (a server writing a relative path must
        # not land in the git tree); the worker runs deployments where their pull step says
        proc = subprocess.Popen(cmd, env={**env, TAG_VAR: service_tag(cfg, name)}, cwd=cfg.state,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _pidfile(cfg, name).parent.mkdir(parents=True, exist_ok=True)
    _pidfile(cfg, name).write_text(f"{proc.pid}\n")
    return proc


def wait_healthy(cfg: Config, name: str, proc: subprocess.Popen | int, check) -> None:
    """Poll ``check`` until it passes; fail early when the process dies, or at the deadline."""
    if isinstance(proc, int):
        pid = proc
        tag = service_tag(cfg, name)
        alive = lambda: _alive(pid, name, tag)  # noqa: E731  (a server started by an earlier call)
    else:
        alive = lambda: proc.poll() is None  # noqa: E731  (ours: no /proc race right after fork)
    deadline = time.monotonic() + cfg.timeout
    while time.monotonic() < deadline:
        if not alive():
            raise ServiceError(f"{name} exited during start-up; see {log_tail(cfg, name)}")
        if check():
            return
        time.sleep(0.5)
    raise ServiceError(f"{name} not healthy after {cfg.timeout:.0f}s (VAEPIPE_START_TIMEOUT); "
                       f"see {log_tail(cfg, name)}")


def log_tail(cfg: Config, name: str) -> str:
    log = cfg.state / "logs" / f"{name}.log"
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    # the exception line says more than the traceback's last advice line
    errors = [ln for ln in lines[-40:] if "Error" in ln or "Exception" in ln or "FATAL" in ln]
    last = (errors or lines or [""])[-1].strip()
    return f"{log}" + (f" (last line: {last[:200]})" if last else "")


def _signal(pid: int, sig: int) -> None:
    """The whole group when ``pid`` leads one (``spawn`` made it so), else the process only."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_pid(cfg: Config, name: str, marker: str, grace: float = 30.0) -> bool:
    # the pid file is state/run/NAME.pid: absolute by construction (Config.resolve refuses a
    # relative state folder) and a name from a fixed set, so this unlink cannot go astray
    pidfile = _pidfile(cfg, name)
    pid = managed_pid(cfg, name, marker)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    tag = service_tag(cfg, name)
    try:
        leader = os.getpgid(pid) == pid  # checked while the tagged process is alive
    except ProcessLookupError:
        leader = False
    _signal(pid, signal.SIGTERM)

    def running() -> bool:  # the server, or (it leads a group) any of its workers
        return _alive(pid, marker, tag) or (leader and _group_exists(pid))

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and running():
        time.sleep(0.2)
    if running():
        if leader:
            try:
                os.killpg(pid, signal.SIGKILL)  # a group id is not reused while members live
            except ProcessLookupError:
                pass
        else:
            _signal(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return True


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def port_taken(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def http(url: str, *, method: str = "GET", body: dict | None = None,
         auth: tuple[str, str] | str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """(status, text); status 0 when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if auth:
        raw = auth if isinstance(auth, str) else f"{auth[0]}:{auth[1]}"
        req.add_header("Authorization", "Basic " + base64.b64encode(raw.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""
