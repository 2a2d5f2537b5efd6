"""How long the shared servers take to start, restart and stop, and what a REST call costs.

    python bench/bench_services.py [--auth] [--no-s3] [--calls 30]

Runs infra/services.py in a fresh temporary state folder on free ports (the stack is purged at
the end) and prints, in seconds: a cold ``up`` (initdb, migrations of both databases), a warm
``up`` (everything already running: the idempotent no-op), ``restart mlflow``, ``restart
postgres``, ``down``, a second ``up`` on existing data, and the median latency of MLflow
``experiments/search`` and Prefect ``flows/filter`` calls. With ``--auth`` the first
authenticated MLflow call (a scrypt password check) is reported apart from the cached ones.
Needs the project venv (mlflow, prefect) and PostgreSQL's server binaries.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def timed(env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    # cwd: neither the checkout nor the state folder (purge refuses to delete its cwd)
    r = subprocess.run([sys.executable, "-m", "infra.services", *args], env=env, capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"services.py {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return dt


def latencies(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = fn()
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text[:200]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--auth", action="store_true", help="MLflow basic auth + Prefect auth string on")
    ap.add_argument("--calls", type=int, default=30, help="REST calls per latency figure")
    ap.add_argument("--no-s3", action="store_true", help="without the object store (VAEPIPE_S3=0)")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="vaepipe-bench-services-"))
    os.chmod(state, 0o711)  # the postgres user must reach it when we are root
    pg, mlflow, prefect = free_ports(3)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "VAEPIPE_"))},
           "VAEPIPE_STATE_DIR": str(state), "VAEPIPE_ENV_FILE": str(state / "local.env"),
           "VAEPIPE_PG_PORT": str(pg), "VAEPIPE_MLFLOW_PORT": str(mlflow), "VAEPIPE_PREFECT_PORT": str(prefect),
           "VAEPIPE_AUTH": "1" if args.auth else "0", "VAEPIPE_START_TIMEOUT": "400",
           "VAEPIPE_S3": "0" if args.no_s3 else "1", "VAEPIPE_S3_PORT": str(free_ports(1)[0])}
    fig: dict[str, float] = {}
    try:
        fig["up_cold_s"] = timed(env, "up")
        fig["up_warm_s"] = timed(env, "up")
        exports = dict(line[len("export "):].split("=", 1) for line in (state / "local.env").read_text().splitlines()
                       if line.startswith("export "))
        mauth = (exports["MLFLOW_TRACKING_USERNAME"], exports["MLFLOW_TRACKING_PASSWORD"]) if args.auth else None
        pauth = tuple(exports["PREFECT_API_AUTH_STRING"].split(":", 1)) if args.auth else None
        search = f"{exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
        flows = f"{exports['PREFECT_API_URL']}/flows/filter"
        first = latencies(lambda: requests.get(search, params={"max_results": 10}, auth=mauth, timeout=120), 1)
        fig["mlflow_first_call_s"] = first[0]
        fig["mlflow_call_median_s"] = statistics.median(
            latencies(lambda: requests.get(search, params={"max_results": 10}, auth=mauth, timeout=120), args.calls))
        fig["prefect_call_median_s"] = statistics.median(
            latencies(lambda: requests.post(flows, json={}, auth=pauth, timeout=120), args.calls))
        fig["restart_mlflow_s"] = timed(env, "restart", "mlflow")
        fig["restart_postgres_s"] = timed(env, "restart", "postgres")
        fig["down_s"] = timed(env, "down")
        fig["up_existing_data_s"] = timed(env, "up")
    finally:
        r = subprocess.run([sys.executable, "-m", "infra.services", "purge", "--yes"], env=env, capture_output=True,
                           text=True, cwd=tempfile.gettempdir())
        if r.returncode:
            print(f"purge of {state} failed (stop it by hand):\n{r.stderr}", file=sys.stderr)
    print(json.dumps({"auth": args.auth, "s3": not args.no_s3, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                      **{k: round(v, 3) for k, v in fig.items()}}, indent=2))


if __name__ == "__main__":
    main()
