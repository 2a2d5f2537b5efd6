#!/usr/bin/env python3
"""Start, stop and report the shared servers: an S3 object store, PostgreSQL, MLflow, Prefect
server and worker.

    python infra/services.py up [SERVICE...]      # start (idempotent), write infra/local.env
    python infra/services.py down [SERVICE...]    # stop (idempotent), worker first
    python infra/services.py restart SERVICE...
    python infra/services.py status               # exit 0 when everything is healthy, else 3
    python infra/services.py env                  # print the shell exports
    python infra/services.py purge --yes          # stop and delete the state folder (safety.py guards;
                                                  # run it from outside that folder)

SERVICE is s3, postgres, mlflow, prefect or worker (default: all, in that order). Run it with the
project's venv python (``make services-up`` does): MLflow and Prefect come from there.

Everything is configured by environment variables (``up`` records what it used in
``$VAEPIPE_STATE_DIR/services.json``; later ``down``/``status`` read that record):

    VAEPIPE_STATE_DIR       ~/.local/state/vaepipe   data, logs, pid files, secrets (0600)
    VAEPIPE_BIND_HOST       127.0.0.1                every server binds here
    VAEPIPE_AUTH            0                        1: MLflow basic auth + Prefect API auth
    VAEPIPE_PG_PORT         5455   VAEPIPE_MLFLOW_PORT 5055   VAEPIPE_PREFECT_PORT 4255
    VAEPIPE_MLFLOW_ARTIFACTS  s3://BUCKET/mlartifacts with the object store, else
                            $STATE/mlflow/artifacts (a folder, or an s3:// URI)
    VAEPIPE_S3              1      0: no object store
    VAEPIPE_S3_ENDPOINT     (none) your own S3/GCS/MinIO URL: nothing is started
    VAEPIPE_S3_BUCKET       vaepipe                  created at the first up when missing
    VAEPIPE_S3_PORT         8355   our SeaweedFS's S3 API (internal parts: the 7 ports after it)
    VAEPIPE_S3_ACCESS_KEY_ID, VAEPIPE_S3_SECRET_ACCESS_KEY  keys for VAEPIPE_S3_ENDPOINT
                            (else AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; kept in secrets/)
    VAEPIPE_MLFLOW_WORKERS  2      VAEPIPE_WORK_POOL vaepipe-process
    VAEPIPE_START_TIMEOUT   180    seconds each health check may take
    VAEPIPE_PROJECT_DIR     this checkout            where the worker runs deployments
    VAEPIPE_ENV_FILE        infra/local.env          where the shell exports go
    VAEPIPE_PG_DATA         $STATE/postgres/data     the PostgreSQL data folder, if elsewhere

Every path must be absolute: a relative one would follow the current directory.

The ports are not the tools' defaults (5432/5000/4200) so that the stack does not collide
with a system PostgreSQL or someone's ad-hoc ``mlflow ui``. Binding beyond loopback without
VAEPIPE_AUTH=1 is refused: an open MLflow or Prefect API lets anyone run code on the workers.
Our SeaweedFS stays on 127.0.0.1 whatever the bind host (objstore.py says why).

Modules beside it: settings.py (the variables, secrets), procs.py (pid files, health checks,
stopping), pgcluster.py (PostgreSQL), objstore.py (the S3 store), safety.py (the guards every
deletion goes through).
Standard library only, apart from the servers themselves and boto3 (objstore.py's requests).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from infra import objstore
from infra.pgcluster import Cluster, ServiceError, find_bindir
from infra.procs import http, managed_pid, port_taken, spawn, stop_pid, wait_healthy
from infra.safety import (ENV_FILE_HEADER, STATE_RECORD, check_deletable, is_our_env_file,
                    is_state_folder, may_overwrite_env_file, remove_file, remove_tree)
from infra.settings import REPO, Config, is_loopback, secret, write_private

SERVICES = ("s3", "postgres", "mlflow", "prefect", "worker")
MLFLOW_ADMIN = "admin"
LEGACY_ADMIN_PASSWORD = "password1234"  # what older MLflow 3.x releases created admin with
OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "MLFLOW_ENABLE_TELEMETRY": "false", "PYTHONUNBUFFERED": "1"}


def cluster(cfg: Config) -> Cluster:
    bindir = find_bindir()
    if bindir is None:
        raise ServiceError("PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin "
                           "and PATH): apt-get install -y postgresql, or set VAEPIPE_PG_BIN")
    return Cluster(data_dir=Cluster.locate(cfg.state), log_file=cfg.state / "logs" / "postgres.log",
                   host=cfg.host, port=cfg.pg_port, password=secret(cfg, "postgres.password"),
                   bindir=bindir)


def prefect_auth_string(cfg: Config) -> str | None:
    if not cfg.auth:
        return None
    given = os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    return given or f"admin:{secret(cfg, 'prefect-auth.password')}"


def client_env(cfg: Config) -> dict[str, str]:
    """What a client of the stack needs: also what goes into local.env."""
    env = {"VAEPIPE_STATE_DIR": cfg.state_dir, "MLFLOW_TRACKING_URI": cfg.mlflow_url,
           "PREFECT_API_URL": cfg.prefect_api_url, **objstore.client_env(cfg)}
    if cfg.auth:
        env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN
        env["MLFLOW_TRACKING_PASSWORD"] = secret(cfg, "mlflow-admin.password")
        env["PREFECT_API_AUTH_STRING"] = prefect_auth_string(cfg) or ""
    return env


def write_env_file(cfg: Config) -> str:
    import shlex

    env_file = Path(cfg.env_file)
    if not may_overwrite_env_file(env_file):
        raise ServiceError(f"{env_file} (VAEPIPE_ENV_FILE) exists and was not written by infra/services.py; "
                           "refusing to overwrite it")
    # the header is the marker purge checks before deleting the file (safety.is_our_env_file)
    lines = [f"{ENV_FILE_HEADER}: `source infra/local.env` (holds secrets; not in git)"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in client_env(cfg).items()]
    text = "\n".join(lines) + "\n"
    write_private(cfg.state / "local.env", text)
    write_private(env_file, text)
    return text


def purge(cfg: Config) -> None:
    """Stop everything, delete the PostgreSQL data, the state folder and our env file.

    Every guard runs before anything is stopped or deleted (safety.py): the state folder must
    be absolute, resolved, recorded as itself in its services.json, and neither hold nor be the
    cwd, the checkout, home or the temporary folder.
    """
    state_marker = dict(marker=is_state_folder, marker_text=f"{STATE_RECORD} naming this folder")
    check_deletable(cfg.state, what="state folder", **state_marker)
    for name in reversed(SERVICES):
        print(f"{name}: {timed_down(cfg, name)}", flush=True)
    pg = cluster(cfg) if find_bindir() else None
    if pg:
        pg.remove(cfg.state)
    env_file = Path(cfg.env_file)
    if env_file.is_absolute() and env_file.exists() and is_our_env_file(env_file, cfg.state):
        # it points at the stack about to be deleted; another stack's file is left alone
        remove_file(env_file, what="env file", marker=lambda p: is_our_env_file(p, cfg.state),
                    marker_text="services.py header naming this state folder")
    remove_tree(cfg.state, what="state folder", **state_marker)
    print(f"removed {cfg.state}")


# ------------------------------------------------------------------------------------------
# the services


def python_tool(module: str) -> list[str]:
    # -P: the cwd (the state folder, which has mlflow/ and prefect/ sub-folders) stays off
    # sys.path, so nothing there can shadow the tools' packages
    return [sys.executable, "-P", "-m", module]


def s3_healthy(cfg: Config) -> bool:
    return objstore.bucket_status(cfg) in (200, 404)  # signed requests answered; 404: no bucket yet


def up_s3(cfg: Config) -> str:
    if not cfg.s3:
        return "off (VAEPIPE_S3=0)"
    if cfg.s3_endpoint:
        made = objstore.ensure_bucket(cfg)
        objstore.remember_external_keys(cfg)
        return f"using {cfg.s3_endpoint} (VAEPIPE_S3_ENDPOINT; nothing started), bucket {cfg.s3_bucket} {made}"
    pid = managed_pid(cfg, "s3", "weed")
    if pid is not None:
        wait_healthy(cfg, "s3", pid, lambda: s3_healthy(cfg))
        objstore.ensure_bucket(cfg)
        wait_healthy(cfg, "s3", pid, lambda: objstore.round_trip(cfg))
        return f"already running (pid {pid})"
    for name, port in objstore.ports(cfg).items():
        if port_taken("127.0.0.1", port) or port_taken(cfg.client_host, port):
            raise ServiceError(f"port {port} (VAEPIPE_S3_PORT{'' if name == 's3' else ' + ' + str(port - cfg.s3_port)}"
                               f", SeaweedFS {name}) is taken by another process")
    (cfg.state / "s3" / "data").mkdir(parents=True, exist_ok=True)
    # the keys reach SeaweedFS in a 0600 file, never in argv (ps shows argv)
    proc = spawn(cfg, "s3", objstore.weed_command(cfg), objstore.weed_env(cfg))
    wait_healthy(cfg, "s3", proc, lambda: s3_healthy(cfg))
    made = objstore.ensure_bucket(cfg)
    # reads and writes work only once the volume server is registered with the master again
    wait_healthy(cfg, "s3", proc, lambda: objstore.round_trip(cfg))
    note = "" if is_loopback(cfg.host) else (
        f"; on 127.0.0.1 only, not {cfg.host}: other hosts need a TLS proxy to it, or VAEPIPE_S3_ENDPOINT")
    return (f"started (pid {proc.pid}, {cfg.s3_url}, bucket {cfg.s3_bucket} {made}, "
            f"data {cfg.state / 's3' / 'data'}{note})")


def up_postgres(cfg: Config) -> str:
    pg = cluster(cfg)
    if pg.running():
        pg.ensure_databases()
        return f"already running (pid {pg.pid()})"
    if port_taken(cfg.client_host, cfg.pg_port):
        raise ServiceError(f"port {cfg.pg_port} (VAEPIPE_PG_PORT) is taken by another process")
    pg.start(cfg.timeout)
    return f"started (pid {pg.pid()}, data {pg.data_dir})"


def mlflow_auth_tuple(cfg: Config) -> tuple[str, str] | None:
    return (MLFLOW_ADMIN, secret(cfg, "mlflow-admin.password")) if cfg.auth else None


def mlflow_healthy(cfg: Config) -> bool:
    return http(f"{cfg.mlflow_url}/health")[0] == 200


def up_mlflow(cfg: Config) -> str:
    pid = managed_pid(cfg, "mlflow", "mlflow")
    if pid is not None:
        wait_healthy(cfg, "mlflow", pid, lambda: mlflow_healthy(cfg))
        return f"already running (pid {pid})"
    if port_taken(cfg.client_host, cfg.mlflow_port):
        raise ServiceError(f"port {cfg.mlflow_port} (VAEPIPE_MLFLOW_PORT) is taken by another process")
    pg = cluster(cfg)
    artifacts = cfg.artifacts
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    # the database URL carries a password: hand it over in the environment, not argv (ps)
    env = {**os.environ, **OFFLINE_ENV, "MLFLOW_BACKEND_STORE_URI": pg.url("mlflow", "psycopg"),
           "MLFLOW_ARTIFACTS_DESTINATION": artifacts}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    if artifacts.startswith("s3://") and cfg.s3:
        # the server reads and writes the bucket itself (clients go through it: mlflow-artifacts:/)
        env.update(objstore.client_env(cfg))
    cmd = [*python_tool("mlflow"), "server", "--serve-artifacts", "--host", cfg.host,
           "--port", str(cfg.mlflow_port), "--workers", str(cfg.mlflow_workers)]
    if cfg.auth:
        ini = cfg.state / "mlflow" / "basic_auth.ini"
        password = secret(cfg, "mlflow-admin.password")
        write_private(ini, "[mlflow]\n"
                      "default_permission = READ\n"
                      f"database_uri = {pg.url('mlflow_auth', 'psycopg').replace('%', '%%')}\n"
                      f"admin_username = {MLFLOW_ADMIN}\n"
                      f"admin_password = {password}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      # each request's password check is a deliberately slow hash (scrypt):
                      # cache a verified credential for a minute per worker, as MLflow suggests
                      # for busy servers (a changed password reaches other workers within 60 s)
                      "auth_cache_ttl_seconds = 60\n")
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        # CSRF tokens are signed with this key: one stable secret for every worker and restart
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret(cfg, "mlflow-flask.key")
        cmd += ["--app-name", "basic-auth"]
    if not is_loopback(cfg.host):
        env.setdefault("MLFLOW_SERVER_ALLOWED_HOSTS", "*")
    proc = spawn(cfg, "mlflow", cmd, env)
    wait_healthy(cfg, "mlflow", proc, lambda: mlflow_healthy(cfg))
    if cfg.auth:
        ensure_admin_password(cfg)
    return f"started (pid {proc.pid}, {cfg.mlflow_url}, artifacts {artifacts})"


def ensure_admin_password(cfg: Config) -> None:
    """The admin must log in with our generated password, never a default.

    MLflow 3.17 creates the admin from ``admin_password`` in the ini; older 3.x releases made
    it with the well-known ``password1234``, which must be changed through the API.
    """
    user, password = mlflow_auth_tuple(cfg) or ("", "")
    url = f"{cfg.mlflow_url}/api/2.0/mlflow/users/get?username={user}"
    # the password hash is slow by design; on a loaded machine a check takes seconds
    if http(url, auth=(user, password), timeout=120)[0] == 200:
        return
    if http(url, auth=(user, LEGACY_ADMIN_PASSWORD), timeout=120)[0] == 200:
        status, text = http(f"{cfg.mlflow_url}/api/2.0/mlflow/users/update-password", method="PATCH",
                            body={"username": user, "password": password},
                            auth=(user, LEGACY_ADMIN_PASSWORD), timeout=120)
        if status == 200:
            return
        raise ServiceError(f"mlflow: changing the default admin password failed ({status}): {text[:200]}")
    raise ServiceError(f"mlflow: admin cannot log in with {cfg.state}/secrets/mlflow-admin.password "
                       "(was the password changed elsewhere?)")


def prefect_env(cfg: Config) -> dict[str, str]:
    home = cfg.state / "prefect" / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(home)}
    for k in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(k, None)
    return env


def prefect_healthy(cfg: Config) -> bool:
    return http(f"{cfg.prefect_api_url}/health", auth=prefect_auth_string(cfg))[0] == 200


def up_prefect(cfg: Config) -> str:
    pid = managed_pid(cfg, "prefect", "prefect")
    if pid is not None:
        wait_healthy(cfg, "prefect", pid, lambda: prefect_healthy(cfg))
        return f"already running (pid {pid})"
    if port_taken(cfg.client_host, cfg.prefect_port):
        raise ServiceError(f"port {cfg.prefect_port} (VAEPIPE_PREFECT_PORT) is taken by another process")
    pg = cluster(cfg)
    env = prefect_env(cfg)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = pg.url("prefect", "asyncpg")
    auth = prefect_auth_string(cfg)
    if auth:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    if not is_loopback(cfg.host):
        # the UI in a remote browser must call the API by a reachable name, not 127.0.0.1
        env.setdefault("PREFECT_UI_API_URL", f"http://{socket.getfqdn()}:{cfg.prefect_port}/api")
    else:
        # the UI calls the API at PREFECT_UI_API_URL, which defaults to port 4200, not --port
        env.setdefault("PREFECT_UI_API_URL", cfg.prefect_api_url)
    cmd = [*python_tool("prefect"), "server", "start", "--host", cfg.host,
           "--port", str(cfg.prefect_port)]
    proc = spawn(cfg, "prefect", cmd, env)
    wait_healthy(cfg, "prefect", proc, lambda: prefect_healthy(cfg))
    return f"started (pid {proc.pid}, {cfg.prefect_api_url})"


def worker_env(cfg: Config) -> dict[str, str]:
    """The worker's environment, inherited by every flow run it starts: the servers' URLs and
    credentials, and VAEPIPE_PROJECT_DIR, which prefect.yaml's pull step runs deployments in."""
    env = {**prefect_env(cfg), **client_env(cfg)}
    env.pop("VAEPIPE_STATE_DIR", None)
    env.setdefault("VAEPIPE_PROJECT_DIR", str(REPO))
    return env


def worker_online(cfg: Config, name: str) -> bool:
    status, text = http(f"{cfg.prefect_api_url}/work_pools/{cfg.pool}/workers/filter", method="POST",
                        body={}, auth=prefect_auth_string(cfg))
    if status != 200:
        return False
    try:
        workers = json.loads(text)
    except ValueError:
        return False
    return any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers)


def up_worker(cfg: Config) -> str:
    name = f"vaepipe-worker-{socket.gethostname()}"
    pid = managed_pid(cfg, "worker", "worker")
    if pid is not None:
        wait_healthy(cfg, "worker", pid, lambda: worker_online(cfg, name))
        return f"already running (pid {pid})"
    env = worker_env(cfg)
    auth = prefect_auth_string(cfg)
    if http(f"{cfg.prefect_api_url}/work_pools/{cfg.pool}", auth=auth)[0] == 404:
        r = subprocess.run([*python_tool("prefect"), "work-pool", "create", cfg.pool, "--type", "process"],
                           env=env, capture_output=True, text=True, cwd=cfg.state)
        if r.returncode:
            raise ServiceError(f"prefect work-pool create {cfg.pool}: {(r.stderr or r.stdout).strip()[-300:]}")
    cmd = [*python_tool("prefect"), "worker", "start", "--pool", cfg.pool, "--type", "process",
           "--name", name, "--install-policy", "never"]
    proc = spawn(cfg, "worker", cmd, env)
    wait_healthy(cfg, "worker", proc, lambda: worker_online(cfg, name))
    return f"started (pid {proc.pid}, pool {cfg.pool})"


UP = {"s3": up_s3, "postgres": up_postgres, "mlflow": up_mlflow, "prefect": up_prefect, "worker": up_worker}
NEEDS = {"s3": (), "postgres": (), "mlflow": ("postgres", "s3"), "prefect": ("postgres",), "worker": ("prefect",)}
# services in one tier need only earlier tiers: MLflow and Prefect start side by side (each
# spends most of its start-up importing and migrating its database; together they take little
# more than the slower one)
TIERS = (("s3", "postgres"), ("mlflow", "prefect"), ("worker",))


def start_tier(cfg: Config, names: list[str]) -> None:
    """Start ``names`` concurrently; print each outcome in order; raise the first failure."""
    from concurrent.futures import ThreadPoolExecutor

    if not names:
        return
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = {name: pool.submit(UP[name], cfg) for name in names}
    failure = None
    for name, fut in futures.items():
        try:
            print(f"{name}: {fut.result()}", flush=True)
        except ServiceError as e:
            failure = failure or e
    if failure:
        raise failure


def down_one(cfg: Config, name: str) -> str:
    if name == "postgres":
        if find_bindir() is None:
            return "not running (no PostgreSQL binaries here)"
        pg = cluster(cfg)
        if not pg.running():
            return "not running"
        pg.stop(cfg.timeout)
        return "stopped"
    if name == "s3":
        # SeaweedFS's filer takes up to 15 s to close its streams on SIGTERM
        return "stopped" if stop_pid(cfg, "s3", "weed", grace=60.0) else "not running"
    return "stopped" if stop_pid(cfg, name, name) else "not running"


def timed_down(cfg: Config, name: str) -> str:
    import time

    t0 = time.monotonic()
    what = down_one(cfg, name)
    return f"{what} ({time.monotonic() - t0:.1f} s)" if what == "stopped" else what


def status_lines(cfg: Config) -> tuple[list[str], bool]:
    s3_line, ok = s3_status(cfg)
    lines = [s3_line]
    pg = cluster(cfg) if find_bindir() else None
    pg_ok = bool(pg and pg.running() and pg.ready())
    lines.append(f"postgres  {'up' if pg_ok else 'down':5} {cfg.client_host}:{cfg.pg_port}"
                 + (f"  pid {pg.pid()}  data {pg.data_dir}" if pg_ok and pg else ""))
    checks = {"mlflow": (lambda: mlflow_healthy(cfg), cfg.mlflow_url),
              "prefect": (lambda: prefect_healthy(cfg), cfg.prefect_api_url),
              "worker": (lambda: worker_online(cfg, f"vaepipe-worker-{socket.gethostname()}"),
                         f"pool {cfg.pool}")}
    ok &= pg_ok
    for name, (check, where) in checks.items():
        pid = managed_pid(cfg, name, name)
        healthy = pid is not None and pg_ok and check()
        state = "up" if healthy else ("sick" if pid else "down")
        ok &= healthy
        lines.append(f"{name:9} {state:5} {where}" + (f"  pid {pid}" if pid else ""))
    lines.append(f"state {cfg.state}   logs {cfg.state / 'logs'}   auth {'on' if cfg.auth else 'off'}")
    return lines, ok


def s3_status(cfg: Config) -> tuple[str, bool]:
    """The object store's status line, and whether it is healthy (or off)."""
    if not cfg.s3:
        return "s3        off   (VAEPIPE_S3=0)", True
    where = f"{cfg.s3_url}  bucket {cfg.s3_bucket}"
    if cfg.s3_endpoint:
        healthy = objstore.bucket_status(cfg) == 200
        return f"s3        {'up' if healthy else 'down':5} {where}  (yours: VAEPIPE_S3_ENDPOINT)", healthy
    pid = managed_pid(cfg, "s3", "weed")
    healthy = pid is not None and objstore.bucket_status(cfg) == 200
    state = "up" if healthy else ("sick" if pid else "down")
    line = f"s3        {state:5} {where}" + (f"  pid {pid}  data {cfg.state / 's3' / 'data'}" if pid else "")
    return line, healthy


def never_started(cfg: Config) -> tuple[list[str], bool]:
    """Status of a state folder ``up`` never ran in, without creating anything there."""
    lines = [f"s3        {'down' if cfg.s3 else 'off'}  {cfg.s3_url if cfg.s3 else '(VAEPIPE_S3=0)'}",
             f"postgres  down  {cfg.client_host}:{cfg.pg_port}", f"mlflow    down  {cfg.mlflow_url}",
             f"prefect   down  {cfg.prefect_api_url}", f"worker    down  pool {cfg.pool}",
             f"state {cfg.state} (never started: no {STATE_RECORD})"]
    return lines, False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="infra/services.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "restart", "status", "env", "purge"))
    ap.add_argument("services", nargs="*", choices=[[], *SERVICES], metavar="SERVICE",
                    help="s3, postgres, mlflow, prefect, worker (default: all)")
    ap.add_argument("--yes", action="store_true", help="confirm purge")
    args = ap.parse_args(argv)
    chosen = [s for s in SERVICES if s in args.services] or list(SERVICES)
    try:
        cfg = Config.resolve()
        if args.command in ("up", "restart") and not is_loopback(cfg.host) and not cfg.auth:
            raise ServiceError(f"refusing to bind {cfg.host} (VAEPIPE_BIND_HOST) without authentication: "
                               "set VAEPIPE_AUTH=1 (MLflow basic auth + Prefect API auth string) "
                               "or bind 127.0.0.1")
        if args.command == "status":
            lines, ok = status_lines(cfg) if (cfg.state / STATE_RECORD).exists() else never_started(cfg)
            print("\n".join(lines))
            return 0 if ok else 3
        if args.command == "env":
            print(write_env_file(cfg) if (cfg.state / "services.json").exists() else "", end="")
            return 0
        if args.command == "purge" and not args.yes:
            raise ServiceError("purge deletes every database and artifact: add --yes")
        recorded = (cfg.state / STATE_RECORD).exists()
        if args.command == "purge":
            if not recorded:
                raise ServiceError(f"{cfg.state}: no {STATE_RECORD}, not a vaepipe state folder; nothing purged")
            purge(cfg)
            return 0
        if args.command in ("down", "restart"):
            for name in reversed(chosen):
                # a folder never started holds nothing to stop: do not create files in it
                print(f"{name}: {timed_down(cfg, name) if recorded else 'not running'}", flush=True)
        if args.command in ("up", "restart"):
            cfg.save()
            todo: list[str] = []
            for name in chosen:
                for dep in (*NEEDS[name], name):
                    for d in (*NEEDS[dep], dep):
                        if d not in todo:
                            todo.append(d)
            for tier in TIERS:
                start_tier(cfg, [name for name in tier if name in todo])
            write_env_file(cfg)
            print(f"exports in {cfg.env_file}: source it, then e.g. "
                  f"vaepipe train --set tracking.uri=$MLFLOW_TRACKING_URI")
        return 0
    except ServiceError as e:
        print(f"vaepipe services: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
