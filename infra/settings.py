"""Settings of the shared servers: environment variables, the recorded config, secret files.

Part of ``infra/services.py`` (see its docstring for the variables); standard library only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.safety import ServiceError, adoptable_state_folder, os_environ_path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Config:
    state_dir: str
    host: str = "127.0.0.1"
    auth: bool = False
    pg_port: int = 5455
    mlflow_port: int = 5055
    prefect_port: int = 4255
    artifacts: str = ""
    mlflow_workers: int = 2
    pool: str = "vaepipe-process"
    timeout: float = 180.0
    env_file: str = ""
    # the object store (infra/objstore.py): our own SeaweedFS, or the user's S3 when s3_endpoint is set
    s3: bool = True
    s3_endpoint: str = ""
    s3_bucket: str = "vaepipe"
    s3_port: int = 8355

    ENV = {"host": "VAEPIPE_BIND_HOST", "auth": "VAEPIPE_AUTH", "pg_port": "VAEPIPE_PG_PORT",
           "mlflow_port": "VAEPIPE_MLFLOW_PORT", "prefect_port": "VAEPIPE_PREFECT_PORT",
           "artifacts": "VAEPIPE_MLFLOW_ARTIFACTS", "mlflow_workers": "VAEPIPE_MLFLOW_WORKERS",
           "pool": "VAEPIPE_WORK_POOL", "timeout": "VAEPIPE_START_TIMEOUT",
           "env_file": "VAEPIPE_ENV_FILE", "s3": "VAEPIPE_S3", "s3_endpoint": "VAEPIPE_S3_ENDPOINT",
           "s3_bucket": "VAEPIPE_S3_BUCKET", "s3_port": "VAEPIPE_S3_PORT"}

    @classmethod
    def resolve(cls) -> Config:
        """Environment over the recorded config over defaults."""
        # absolute paths only: a relative one would follow the current directory, and purge
        # deletes the state folder (how the checkout was lost on 2026-11-27)
        default_state = (os_environ_path("XDG_STATE_HOME") or Path.home() / ".local/state") / "vaepipe"
        state = (os_environ_path("VAEPIPE_STATE_DIR") or default_state).resolve()
        cfg = cls(state_dir=str(state))
        record = state / "services.json"
        if record.exists():
            saved = json.loads(record.read_text())
            for k, v in saved.items():
                if k in cls.ENV:
                    setattr(cfg, k, v)
        for key, var in cls.ENV.items():
            raw = os.environ.get(var)
            if raw is None or raw == "":
                continue
            current = getattr(cls, key)
            try:
                if isinstance(current, bool):
                    value: object = raw.strip().lower() in ("1", "true", "yes", "on")
                elif isinstance(current, int):
                    value = int(raw)
                elif isinstance(current, float):
                    value = float(raw)
                else:
                    value = raw
            except ValueError:
                raise ServiceError(f"{var}={raw!r}: expected a number") from None
            setattr(cfg, key, value)
        if cfg.s3_endpoint and "://" not in cfg.s3_endpoint:
            raise ServiceError(f"VAEPIPE_S3_ENDPOINT={cfg.s3_endpoint!r}: expected a URL (https://host[:port])")
        if not cfg.artifacts:
            # recorded at the first up: a stack keeps where its runs' artifacts already are
            cfg.artifacts = (f"s3://{cfg.s3_bucket}/mlartifacts" if cfg.s3
                             else str(state / "mlflow" / "artifacts"))
        if not cfg.env_file:
            cfg.env_file = str(REPO / "infra" / "local.env")
        for key in ("artifacts", "env_file"):
            value = getattr(cfg, key)
            if "://" not in value and not Path(value).expanduser().is_absolute():
                raise ServiceError(f"{cls.ENV[key]}={value!r}: must be an absolute path (or a URI)")
            if "://" not in value:
                setattr(cfg, key, str(Path(value).expanduser()))
        return cfg

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def client_host(self) -> str:
        """Where clients on this machine connect (a wildcard bind is reachable on loopback)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    @property
    def mlflow_url(self) -> str:
        return f"http://{_url_host(self.client_host)}:{self.mlflow_port}"

    @property
    def s3_url(self) -> str:
        """The S3 endpoint clients use: the user's (VAEPIPE_S3_ENDPOINT) or our SeaweedFS, which
        listens on loopback only (infra/objstore.py says why)."""
        return self.s3_endpoint or f"http://127.0.0.1:{self.s3_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{_url_host(self.client_host)}:{self.prefect_port}/api"

    def save(self) -> None:
        """Record the settings; this also marks the folder as a state folder, the marker that
        lets ``purge`` delete it. A folder holding anything else is never adopted."""
        if not adoptable_state_folder(self.state):
            raise ServiceError(f"{self.state} (VAEPIPE_STATE_DIR) holds files that are not a vaepipe "
                               "stack's; choose a new or empty folder")
        self.state.mkdir(parents=True, exist_ok=True)
        record = self.state / "services.json"
        tmp = record.with_name(f".services.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, record)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


# ------------------------------------------------------------------------------------------
# secrets and private files


def secret(cfg: Config, name: str, make=lambda: secrets.token_urlsafe(24)) -> str:
    """A generated secret kept in ``$STATE/secrets/NAME`` (mode 0600), made on first use."""
    d = cfg.state / "secrets"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    f = d / name
    if not f.exists():
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(make() + "\n")
    return f.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically (it holds passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
