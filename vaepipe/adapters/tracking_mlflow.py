"""``MlflowTracker``: the ``Tracker`` protocol on MLflow 3, built so tracking never stops training.

One MLflow run per training in ``tracking.experiment``; evaluation reopens it by id. The
default store is ``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/`` beside the database
file, so ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` browses it with no server; an
``http://`` URI (``mlflow server``, artifacts proxied) works the same way.

Metrics never touch the network on the training thread. ``log_metrics`` appends to an
in-memory buffer; a daemon thread sends it with ``MlflowClient.log_batch`` (1000 points per
request) every ``flush_interval`` seconds. MLflow's own async logging is not used because a
batch that fails there is logged as an error and lost; here a failed send keeps the points,
warns once, and retries with exponential backoff, dropping the oldest points only past
``max_buffer``. Every other call (params, tags, artifacts, the model, ending the run) catches
errors, warns, and carries on: a tracking server that goes away costs the run some records,
never the training. Only ``start`` raises, before any compute is spent, when the store cannot be
reached at all.

How long a call to a dead server blocks is MLflow's HTTP policy (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``, read per request). MLflow's
defaults retry one request for about 4 minutes; ``start`` sets each of those variables the user
left unset to ``HTTP_DEFAULTS`` (about 30 s per request at worst, 3 s when the connection is
refused). Once a call fails the server counts as away: synchronous calls are skipped without
touching the network (only the sender thread, in the background, keeps trying) and ``end``
waits at most ``end_timeout`` seconds for the last metrics.

Nothing is lost silently: every record that did not reach the store is kept in ``not_logged``
and ``end`` logs one warning that lists them (metrics by step range, params, artifacts, the
model and its registered version, the run's end) with the command that uploads the trained
model later, ``vaepipe log-model --model DIR`` (``log_trained_model``).

System metrics (``tracking.system_metrics``) reuse MLflow's samplers (psutil; NVIDIA GPUs via
pynvml, silently skipped when it is missing) but go through the same buffer, so they obey the
same failure policy (MLflow's own monitor stops for good at the first failed request).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import math
import os
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from vaepipe.core.config import Params, TrackingConfig
from vaepipe.core.errors import ConfigError, InputError, VaepipeError
from vaepipe.core.outputs import lock_path
from vaepipe.core.provenance import git_info

log = logging.getLogger(__name__)

# Registry alias set on each new version. "latest" is reserved by MLflow (models:/name@latest
# already resolves to the highest version); "candidate" marks the newest trained model, which a
# reviewer or an evaluation gate may promote to another alias such as "champion".
MODEL_ALIAS = "candidate"
TRUNCATED = "...[truncated]"
# error codes after which resending the same request cannot succeed: drop it, do not retry
_FAILED = object()  # _call's result when the store could not be reached (worth retrying)
_REFUSED = object()  # _call's result when the store (or our side) refused the request
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
              "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}
# MLflow's HTTP retry policy unless the user set it: 3 tries, 0 + 2 s (+ jitter) apart, 10 s
# timeout each -- a refused connection fails in ~3 s, a hung server in ~33 s (MLflow's own
# defaults, 8 tries up to 64 s apart with a 120 s timeout, block about 4 minutes per request)
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
LOG_MODEL_HINT = "vaepipe log-model --model {model_dir}"
# the Prefect flow run a stage runs in (set by the flow, unset outside one) -> the run's tags
PREFECT_ENV = {
    "VAEPIPE_PREFECT_FLOW_RUN_ID": "prefect.flow_run_id",
    "VAEPIPE_PREFECT_FLOW_RUN_NAME": "prefect.flow_run_name",
    "VAEPIPE_PREFECT_DEPLOYMENT": "prefect.deployment",
    "VAEPIPE_PREFECT_FLOW_RUN_URL": "prefect.flow_run_url",
}
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description
DIGEST_LEN = 36  # MLflow stores a dataset digest in 36 characters (a DVC dir md5 is 32 + ".dir")
DVC_LOCK = "dvc.lock"


def _clip(value: str, limit: int) -> str:
    """A param or tag value every store keeps: NUL characters (which PostgreSQL refuses in text,
    and an untrained model's samples can hold) shown as U+FFFD, then cut to ``limit``."""
    value = value.replace("\x00", "\ufffd")
    return value if len(value) <= limit else value[: limit - len(TRUNCATED)] + TRUNCATED


def param_value(value: Any) -> str:
    """A params value as MLflow stores it: lists/dicts as JSON, clipped to MLflow's limit."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return _clip(text, MAX_PARAM_VAL_LENGTH)


def artifact_root_for(uri: str) -> str | None:
    """Where a new experiment keeps artifacts, as a file URI: ``mlartifacts/`` beside a sqlite
    database, or in the working directory for another database; None lets a server decide."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    if uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        return Path("mlartifacts").resolve().as_uri()
    return None


def git_tags(project_dir: str | Path | None = None) -> dict[str, str]:
    """The commit the code ran from (MLflow's own tag names, so the UI's Source field shows the
    checkout and its commit) and whether the tree was dirty.

    Read by ``vaepipe.core.provenance.git_info`` -- the project checkout (the working
    directory by default), else the package's -- the same answer as training's
    ``git_commit`` tag. No tags outside git.
    """
    info = git_info(project_dir)
    if info.commit is None:
        return {}
    tags = {"mlflow.source.git.commit": info.commit, "mlflow.source.type": "LOCAL"}
    if info.root is not None:
        tags["mlflow.source.name"] = str(info.root)
    if info.dirty is not None:
        tags["vaepipe.git_dirty"] = str(info.dirty).lower()
    return tags


def prefect_tags(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``prefect.*`` tags naming the Prefect flow run the stage runs in, from the
    ``VAEPIPE_PREFECT_*`` variables the flow sets; none outside a flow (or for unset ones)."""
    env = os.environ if environ is None else environ
    return {tag: env[var] for var, tag in PREFECT_ENV.items() if env.get(var)}


def prefect_link(tags: dict[str, str]) -> str | None:
    """A markdown line linking the Prefect flow run of ``prefect_tags`` (None without its URL)."""
    url = tags.get("prefect.flow_run_url")
    if not url:
        return None
    return f"Prefect flow run: [{tags.get('prefect.flow_run_name') or tags.get('prefect.flow_run_id', url)}]({url})"


def dvc_lock_out(path: str | Path, lock_file: str | Path = DVC_LOCK) -> dict[str, Any] | None:
    """The entry DVC recorded in ``lock_file`` (dvc.lock in the working directory) for the
    output ``path`` when it has an md5, else None (no such file, or it does not name ``path``)."""
    import yaml

    lock_file = Path(lock_file)
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    target = os.path.normpath(Path(path).resolve())
    base = lock_file.resolve().parent
    for stage in (lock.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("md5") and \
                    os.path.normpath(base / str(out.get("path", ""))) == target:
                return out
    return None


def dvc_lock_digest(path: str | Path, lock_file: str | Path = DVC_LOCK) -> str | None:
    """The md5 DVC recorded for the output ``path`` in ``lock_file`` (dvc.lock in the working
    directory), or None when there is no such file or it does not name ``path``."""
    out = dvc_lock_out(path, lock_file)
    return str(out["md5"]) if out else None


def dvc_default_remote(project_dir: str | Path = ".") -> str | None:
    """The URL of the project's default DVC remote (``core.remote``), or None without one.

    Read from ``.dvc/config`` and ``.dvc/config.local`` (which overrides it) -- no network and
    no DVC import; a relative local URL is resolved against ``.dvc/``, as DVC does. User- and
    system-level DVC configs are not consulted.
    """
    import configparser

    dvc_dir = Path(project_dir) / ".dvc"
    sections: dict[str, dict[str, str]] = {}
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser(interpolation=None, strict=False, inline_comment_prefixes=("#", ";"))
        try:
            parser.read(dvc_dir / name, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            log.debug("%s: not a readable DVC config", dvc_dir / name)
            continue
        for section in parser.sections():
            # DVC (configobj) writes ['remote "NAME"']; a hand-written [remote "NAME"] reads the same
            key = " ".join(section.strip("'").replace('"', " ").split())
            sections.setdefault(key, {}).update({k: v.strip().strip("'\"") for k, v in parser[section].items()})
    remote = sections.get("core", {}).get("remote")
    url = sections.get(f"remote {remote}", {}).get("url") if remote else None
    if not url:
        return None
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" not in url:  # a local folder; DVC keeps relative ones relative to .dvc/
        url = os.path.normpath((dvc_dir / url).resolve())
    return url


# MLflow's dataset source type for the URL schemes of DVC remotes it has a source for
REMOTE_SOURCE_TYPES = {"s3": "s3", "gs": "gs", "hdfs": "hdfs", "http": "http", "https": "http"}


def dvc_remote_source(out: dict[str, Any], remote_url: str) -> tuple[str, str]:
    """(source type, URI) of the object DVC pushes for the dvc.lock entry ``out`` to the remote
    at ``remote_url``: ``files/md5/xx/rest`` under it (DVC 3, ``hash: md5``), ``xx/rest`` for an
    entry of DVC 2 (a folder's ``.dir`` listing, for a folder)."""
    md5 = str(out["md5"])
    key = f"{md5[:2]}/{md5[2:]}"
    if out.get("hash") == "md5":
        key = f"files/md5/{key}"
    if "://" not in remote_url:
        return "local", (Path(remote_url) / key).as_uri()
    scheme = remote_url.split("://", 1)[0].lower()
    return REMOTE_SOURCE_TYPES.get(scheme, "dvc"), f"{remote_url.rstrip('/')}/{key}"


def parquet_facts(path: str | Path) -> tuple[list[dict[str, str]], int]:
    """The columns (MLflow colspec dicts) and the record count of the Parquet files under
    ``path``, from their footers only."""
    import pyarrow.parquet as pq

    from vaepipe.ml.data import parquet_files

    files = parquet_files(path)
    if not files:
        return [], 0
    schema = pq.read_schema(files[0])
    columns = [{"name": f.name, "type": _colspec_type(str(f.type))} for f in schema]
    return columns, sum(pq.read_metadata(f).num_rows for f in files)


def _colspec_type(arrow_type: str) -> str:
    names = {"string": "string", "large_string": "string", "int64": "long", "int32": "integer",
             "int16": "integer", "int8": "integer", "double": "double", "float": "float", "bool": "boolean"}
    return names.get(arrow_type, arrow_type)


def dataset_entity(name: str, path: str | Path, *, digest: str | None, rows: int | None,
                   lock_file: str | Path = DVC_LOCK) -> DatasetEntity:
    """An MLflow dataset for the Parquet folder ``path``; the schema and the record count
    (``rows``, or every record in the folder) come from the footers.

    When ``lock_file`` (dvc.lock in the working directory) names ``path``: digest = its md5,
    and, when the project has a default DVC remote, source = where ``dvc push`` puts that md5
    in the remote (``dvc_remote_source``; type ``s3`` for ``s3://``, ``local`` for a folder).
    Otherwise digest = ``digest`` (our hash; computed when None) and source = the local path.
    """
    from vaepipe.core.io import sha256_tree

    if not Path(path).is_dir():
        raise InputError(f"{path}: no such folder")
    columns, total = parquet_facts(path)
    out = dvc_lock_out(path, lock_file)
    chosen = str(out["md5"]) if out else (digest or sha256_tree(path))
    profile = {"num_rows": total if rows is None else rows, "digest_from": "dvc.lock" if out else "vaepipe"}
    remote = dvc_default_remote(Path(lock_file).parent) if out else None
    if out and remote:
        source_type, uri = dvc_remote_source(out, remote)
    else:
        source_type, uri = "local", Path(path).resolve().as_uri()
    return DatasetEntity(name=name, digest=chosen[:DIGEST_LEN], source_type=source_type,
                         source=json.dumps({"uri": uri}),
                         schema=json.dumps({"mlflow_colspec": columns}), profile=json.dumps(profile))


def bound_http_retries() -> dict[str, str]:
    """Set MLflow's HTTP retry variables that are unset to ``HTTP_DEFAULTS``; those it set.

    MLflow reads them on every request, so this bounds the calls of every client in the
    process; a variable the user exported (even to MLflow's default) is left alone.
    """
    chosen = {k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ}
    os.environ.update(chosen)
    return chosen


def open_client(uri: str) -> MlflowClient:
    """An MlflowClient for ``uri``. Opening a sqlite store creates its tables, or upgrades them,
    when they are missing, and MLflow does that without a lock: two commands that open a new
    store at the same moment (two stages of a flow, a sweep's workers) both run the migrations
    and one of them dies of the other's ("duplicate column name", "Online migration expected to
    match one row"). So the opening holds an flock beside the database file: the first command
    creates the tables, the others wait for it (a second or two, once) and find them there."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    lock = lock_path(Path(uri[len("sqlite:///"):]))
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise ConfigError(f"tracking.uri: cannot create the lock file {lock} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _error_code(e: BaseException) -> str | None:
    return getattr(e, "error_code", None) if isinstance(e, MlflowException) else None


class MlflowTracker:
    """Logs one training (or reopened evaluation) run to MLflow; see the module docstring."""

    def __init__(self, cfg: TrackingConfig, *, flush_interval: float = 2.0, max_buffer: int = 200_000,
                 end_timeout: float = 30.0, max_backoff: float = 60.0,
                 system_interval: float | None = None) -> None:
        self.cfg = cfg
        self.uri = cfg.uri
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.end_timeout = end_timeout
        self.max_backoff = max_backoff
        # MLflow's own knob for its system-metrics monitor, honoured here too (default 10 s)
        self.system_interval = system_interval or float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10)
        self.client: MlflowClient | None = None
        self._run_id: str | None = None
        # (key, value, timestamp ms, step) waiting to be sent; the flusher owns the sending
        self._buffer: deque[tuple[str, float, int, int]] = deque()
        self._head = 0  # how many points ever left the front of the buffer (sent or dropped)
        self._pending: list[Param | RunTag] = []  # params/tags that failed to send: retried
        self._pending_inputs: list[DatasetInput] = []  # datasets that failed to send: retried
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._down = False  # the store failed the last request
        self._warned = False
        self.dropped = 0  # metric points lost (buffer overflow or a rejected batch)
        self.failed_calls = 0  # synchronous calls skipped or failed
        self.not_logged: list[str] = []  # what never reached the store, in words (see end())
        self.model_dir: Path | None = None  # the trained model folder, seen in log_artifact
        self.model_uri: str | None = None  # what log_text_model logged or registered last
        self._unreachable = False  # something was lost because the store was away
        self._model_lost = False  # ... and it was part of the trained model (log-model can redo it)
        self.last_run_id: str | None = None  # the run of the last start(), kept after end()

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def unsent(self) -> int:
        """Metric points waiting in the buffer (not yet accepted by the store)."""
        return len(self._buffer)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, run_name: str | None = None, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> None:
        """Create a run in ``tracking.experiment`` (or reopen ``run_id``) and start the senders.

        Raises ConfigError when the store cannot be reached, InputError when ``run_id`` is not
        a run of that store: both before any training time is spent.
        """
        chosen = bound_http_retries()
        if chosen:
            log.debug("MLflow HTTP retry policy: %s", chosen)
        self.not_logged, self.model_dir, self.model_uri = [], None, None
        self._unreachable = self._model_lost = False
        if self.uri.startswith(("http://", "https://")) and not self._healthy(timeout=10.0):
            raise ConfigError(f"tracking.uri: no MLflow server answers at {self.uri} "
                              "(start it, fix the URI, or set tracking.enabled=false)")
        if self.uri.startswith("sqlite:///"):
            folder = Path(self.uri[len("sqlite:///"):]).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"tracking.uri: cannot create {folder} for the sqlite store "
                                  f"({e.strerror or e})") from None
        all_tags = {**git_tags(), "mlflow.user": _user(), **prefect_tags(), **(tags or {})}
        try:
            self.client = open_client(self.uri)
            if run_id is not None:
                run = self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self._run_id = run_id
                self.set_tags({**prefect_tags(), **(tags or {})})
            else:
                exp_id = self._experiment_id()
                run = self.client.create_run(exp_id, run_name=run_name,
                                             tags={k: _clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in all_tags.items()})
                self._run_id = run.info.run_id
            self.last_run_id = self._run_id
        except VaepipeError:
            raise
        except Exception as e:  # noqa: BLE001 - MlflowException, or the database driver's own
            if run_id is not None and _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                raise InputError(f"run.json: MLflow run {run_id} not found at {self.uri}") from None
            raise ConfigError(f"tracking.uri: MLflow at {self.uri} failed: {_first_line(e)}") from None
        log.info("MLflow run %s in experiment %r at %s", self._run_id, self.cfg.experiment, self.uri)
        # fresh events per run: a sender still stuck in a request of the previous run stays stopped
        self._stop, self._wake = threading.Event(), threading.Event()
        self._spawn(self._flush_loop, "vaepipe-mlflow-flush", self._run_id, self._stop, self._wake)
        if self.cfg.system_metrics:
            # a reopened run continues the system-metric steps where the last phase stopped
            first = 0
            if run_id is not None and "system/cpu_utilization_percentage" in run.data.metrics:
                hist = self._call("read metrics", self.client.get_metric_history, run_id,
                                  "system/cpu_utilization_percentage")
                if isinstance(hist, list):
                    first = 1 + max((m.step for m in hist), default=-1)
            self._spawn(self._system_loop, "vaepipe-mlflow-system", first, self._stop)

    def end(self, status: str = "FINISHED") -> None:
        """Send what is buffered (at most ``end_timeout`` s), mark the run ``status``, and warn
        once, listing everything that did not reach the store (``not_logged``)."""
        if self._run_id is None:
            return
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + self.end_timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = []
        with self._lock:
            rows = list(self._buffer)
            pending = list(self._pending)
            inputs = list(self._pending_inputs)
            self._buffer.clear()
            self._pending.clear()
            self._pending_inputs.clear()
        if inputs:
            self.not_logged.append("datasets " + ", ".join(d.dataset.name for d in inputs))
            self._unreachable = self._unreachable or self._down
        lost = self.dropped + len(rows)
        if lost or pending:
            self.not_logged[:0] = _describe_unsent(rows, self.dropped, pending)
            self._unreachable = self._unreachable or self._down
            self._call("tag the run", self.client.set_tag, self._run_id, "vaepipe.metrics_lost", str(lost))
        if self._call("end the run", self.client.set_terminated, self._run_id, status) is _FAILED:
            self.not_logged.append(f"the run's end (it stays RUNNING, not {status}, on the server)")
        if self.not_logged:
            log.warning("%s", self.summary())
        self._run_id = None

    def summary(self) -> str:
        """What did not reach the store and how to upload it later ('' when all did)."""
        if not self.not_logged:
            return ""
        text = (f"MLflow run {self.last_run_id} at {self.uri}: NOT logged: " + "; ".join(self.not_logged) + ".")
        if self._unreachable and self._model_lost:
            model_dir = self.model_dir if self.model_dir is not None else "<paths.model>"
            text += (" The trained model itself is saved. To log and register it once the server is back: "
                     + LOG_MODEL_HINT.format(model_dir=model_dir)
                     + " (with this run's --params/--set; metrics cannot be sent later)")
        return text

    # -- logging -------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params as strings (clipped to MLflow's limit); keys already logged are skipped.

        MLflow refuses to change a logged param; on a resumed or reopened run an equal value is
        skipped silently and a different one is reported once, not sent.
        """
        if self._run_id is None:
            return
        existing = self._call("read params", lambda: self.client.get_run(self._run_id).data.params)
        existing = existing if isinstance(existing, dict) else {}
        values = {k: param_value(v) for k, v in params.items()}
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("MLflow run %s already has different values for %s; keeping the logged ones",
                        self._run_id, ", ".join(changed[:10]))
        self._send("log params", [Param(k, v) for k, v in values.items() if k not in existing])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue metrics for the sender thread; never blocks on the network, never raises."""
        if self._run_id is None:
            return
        ts = int(time.time() * 1000)
        step = 0 if step is None else int(step)
        rows = []
        for k, v in metrics.items():
            try:
                rows.append((str(k), float(v), ts, step))
            except (TypeError, ValueError):
                log.warning("metric %s: %r is not a number; not logged", k, v)
        with self._lock:
            self._buffer.extend(rows)
            over = max(0, len(self._buffer) - self.max_buffer)
            for _ in range(over):
                self._buffer.popleft()  # the oldest go first: recent values matter most
            self._head += over
            self.dropped += over
            full = len(self._buffer) >= MAX_METRICS_PER_BATCH
        if full:
            self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._run_id is None or not tags:
            return
        self._send("set tags", [RunTag(k, _clip(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()])

    def log_dataset(self, name: str, path: str | Path, *, context: str, digest: str | None = None,
                    rows: int | None = None) -> None:
        """The Parquet folder ``path`` as an input of the run (``dataset_entity``), tagged with its
        ``context``; retried by the sender while the store is away, listed in ``not_logged`` if
        it never gets there. A folder that cannot be read is warned about and skipped."""
        if self._run_id is None:
            return
        try:
            entity = dataset_entity(name, path, digest=digest, rows=rows)
        except (OSError, ValueError, VaepipeError) as e:
            log.warning("dataset %s (%s) not logged: %s", name, path, _first_line(e))
            self.not_logged.append(f"dataset {name}")
            return
        item = DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        if self._call(f"log dataset {name}", self.client.log_inputs, self._run_id, [item]) is _FAILED:
            with self._lock:
                self._pending_inputs.append(item)

    def set_description(self, markdown: str) -> None:
        """The run's description (MLflow's ``mlflow.note.content`` tag), clipped to a tag's limit.

        Inside a Prefect flow run whose page is known, a line linking to it comes first (MLflow
        shows tag values as plain text; the description is where a link can be clicked).
        """
        link = prefect_link(prefect_tags())
        self.set_tags({DESCRIPTION_TAG: f"{link}\n\n{markdown}" if link else markdown})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a whole directory under the run's artifacts (recorded in ``not_logged``
        when it does not get there)."""
        if self._run_id is None:
            return
        path = Path(path)
        if artifact_path == "model" and self.model_dir is None:
            self.model_dir = path.parent if path.is_file() else path  # for the log-model hint
        if path.is_dir():
            out = self._call(f"log {path}", self.client.log_artifacts, self._run_id, str(path), artifact_path)
        elif path.is_file():
            out = self._call(f"log {path}", self.client.log_artifact, self._run_id, str(path), artifact_path)
        else:
            log.warning("artifact %s does not exist; not logged", path)
            return
        if out is _FAILED or out is _REFUSED:
            self.not_logged.append(f"artifact {path}")
            self._model_lost = self._model_lost or artifact_path in ("model", "tokenizer")

    def log_text_model(self, package_dir: str | Path, *, registered_name: str | None) -> str | None:
        """Upload a packaged text model (``vaepipe.stages.package``) as the run's pyfunc
        (vaepipe/adapters/mlflow_model.py), register it, alias it ``candidate``.

        Returns ``models:/<name>/<version>`` when registered, else the logged model's URI;
        None when the store is away or the upload failed (warned, and in ``not_logged``).
        """
        if self._run_id is None:
            return None
        from vaepipe.adapters.mlflow_model import log_text_model

        uri = self._call("log the text model", log_text_model, self._run_id, package_dir,
                         registered_name=registered_name, alias=MODEL_ALIAS, client=self.client)
        if uri is _FAILED or uri is _REFUSED or uri is None:
            what = "the text model"
            if registered_name:
                what += (f" and its new version of registered model {registered_name!r} "
                         f"(alias {MODEL_ALIAS!r} still points to an older version, if any)")
            self.not_logged.append(what)
            self._model_lost = True
            return None
        self.model_uri = uri
        return uri

    # -- internals -----------------------------------------------------------------------

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            try:
                return self.client.create_experiment(self.cfg.experiment,
                                                     artifact_location=artifact_root_for(self.uri))
            except MlflowException as e:
                if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(self.cfg.experiment)  # another run made it meanwhile
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted; restoring it", self.cfg.experiment)
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=target, name=name, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def _is_http(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    def _healthy(self, timeout: float = 2.0) -> bool:
        """Does an http(s) server answer /health? (sqlite stores: whether the last call worked)."""
        if not self.uri.startswith(("http://", "https://")):
            return not self._down
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False

    def _warn_down(self, what: str, e: BaseException) -> None:
        self._down = True
        if not self._warned:
            self._warned = True
            log.warning("MLflow at %s failed to %s (%s); training goes on, metrics are buffered "
                        "and retried, other calls are skipped while it is away (listed when the run ends)",
                        self.uri, what, _first_line(e))

    def _send(self, what: str, items: list[Param | RunTag]) -> None:
        """Params/tags now, in batches of MLflow's limit; what fails is left for the flusher."""
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i: i + MAX_PARAMS_TAGS_PER_BATCH]
            if self._call(what, self._log_entities, chunk) is _FAILED:
                with self._lock:
                    self._pending.extend(chunk)

    def _log_entities(self, items: list[Param | RunTag], run_id: str | None = None) -> None:
        self.client.log_batch(run_id or self._run_id, params=[e for e in items if isinstance(e, Param)],
                              tags=[e for e in items if isinstance(e, RunTag)], synchronous=True)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One synchronous MLflow call. Failures warn (once) and return ``_FAILED`` (store away,
        worth retrying) or ``_REFUSED`` (the store or our side refused the request).

        While the store is away (a call failed and the sender thread has not got through since)
        the call is skipped at once: a dead server costs one request's retry budget, not one
        per call.
        """
        if self._down and self._is_http:
            self.failed_calls += 1
            self._unreachable = True
            log.debug("skipped %s: MLflow at %s is away", what, self.uri)
            return _FAILED
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.failed_calls += 1
            if _error_code(e) in _PERMANENT or isinstance(e, (VaepipeError, ValueError, OSError)) \
                    and not _is_connection_error(e):
                log.warning("could not %s: %s", what, _first_line(e))
                return _REFUSED
            self._unreachable = True
            self._warn_down(what, e)
            return _FAILED
        self._down = False
        return out

    def _flush_loop(self, run_id: str, stop: threading.Event, wake: threading.Event) -> None:
        """Send buffered metrics until stopped; on failure keep them and back off exponentially."""
        backoff = self.flush_interval
        while True:
            stopping = stop.is_set()
            if self._down and self._is_http and not self._healthy():
                # a 2 s probe instead of a request with the whole retry budget
                if stopping:
                    return  # end() counts what is left
                stop.wait(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            with self._lock:
                head = self._head
                batch = [self._buffer[i] for i in range(min(len(self._buffer), MAX_METRICS_PER_BATCH))]
                other = self._pending[:MAX_PARAMS_TAGS_PER_BATCH]
                inputs = list(self._pending_inputs)
            if batch or other or inputs:
                try:
                    if inputs:
                        self._send_inputs(run_id, inputs)
                    if other:  # a separate request: a refused param must not cost the metrics
                        self._send_or_drop(lambda: self._log_entities(other, run_id), "params/tags",
                                           self._pending, len(other))
                    if batch:
                        self.client.log_batch(run_id, metrics=[Metric(*row) for row in batch],
                                              synchronous=True)
                except Exception as e:  # noqa: BLE001 - see the module docstring
                    if _error_code(e) in _PERMANENT:
                        log.warning("MLflow refused %d metric points: %s", len(batch), _first_line(e))
                        self._pop(head + len(batch), lost=True)
                        continue
                    self._warn_down("log metrics", e)
                    if stopping:
                        return  # end() counts what is left
                    stop.wait(backoff)
                    backoff = min(self.max_backoff, backoff * 2)
                    continue
                self._pop(head + len(batch))
                if self._down:
                    log.warning("MLflow at %s is reachable again; sending buffered metrics", self.uri)
                self._down = self._warned = False  # the next outage warns again
                backoff = self.flush_interval
                if len(self._buffer) >= MAX_METRICS_PER_BATCH or self._pending or self._pending_inputs:
                    continue
            elif self._down and self._is_http:  # /health answered and nothing waits: back
                log.warning("MLflow at %s is reachable again", self.uri)
                self._down = self._warned = False
            if stopping and not self._buffer and not self._pending and not self._pending_inputs:
                return
            wake.wait(self.flush_interval)
            wake.clear()

    def _send_inputs(self, run_id: str, inputs: list[DatasetInput]) -> None:
        """Datasets that failed earlier (raises while the store is away; refused ones are dropped)."""
        self._send_or_drop(lambda: self.client.log_inputs(run_id, inputs), "datasets",
                           self._pending_inputs, len(inputs))

    def _send_or_drop(self, send: Callable[[], object], what: str, pending: list[Any], n: int) -> None:
        """Call ``send`` for the first ``n`` items of ``pending``, then drop them from it.

        An error the store will give again (``_PERMANENT``: a refused value) is warned and the
        items dropped; any other error (the store is away) propagates and keeps them for a retry.
        """
        try:
            send()
        except Exception as e:  # noqa: BLE001
            if _error_code(e) not in _PERMANENT:
                raise
            log.warning("MLflow refused %d %s: %s", n, what, _first_line(e))
        with self._lock:
            del pending[:n]

    def _pop(self, upto: int, lost: bool = False) -> None:
        """Remove the points before absolute position ``upto`` (some may be gone already:
        overflow trimming in log_metrics removes the same oldest points)."""
        with self._lock:
            n = max(0, min(upto - self._head, len(self._buffer)))
            for _ in range(n):
                self._buffer.popleft()
            self._head += n
            if lost:
                self.dropped += n

    def _system_loop(self, step: int, stop: threading.Event) -> None:
        """Sample CPU, memory, disk, network (and NVIDIA GPUs) every ``system_interval`` s."""
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            monitors.append(GPUMonitor())
        except Exception:  # noqa: BLE001 - no pynvml or no NVIDIA driver: no GPU metrics
            log.debug("no GPU metrics (pynvml or an NVIDIA driver is missing)")
        while not stop.wait(self.system_interval):
            values: dict[str, float] = {}
            for m in monitors:
                try:
                    m.collect_metrics()
                    values.update(m.aggregate_metrics())
                    m.clear_metrics()
                except Exception as e:  # noqa: BLE001 - a sampler failing must not end the others
                    log.debug("system metrics sampler %s failed: %s", type(m).__name__, e)
            values = {f"system/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            if values:
                self.log_metrics(values, step=step)
                step += 1


def _describe_unsent(rows: list[tuple[str, float, int, int]], dropped: int,
                     pending: list[Param | RunTag]) -> list[str]:
    """``not_logged`` entries for metric points (key, value, ms, step) and params/tags never sent."""
    out = []
    train = [r for r in rows if not r[0].startswith("system/")]
    if train:
        steps = [r[3] for r in train]
        out.append(f"{len(train)} metric points of steps {min(steps)}-{max(steps)} "
                   f"({', '.join(sorted({r[0] for r in train})[:8])})")
    if len(train) < len(rows):
        out.append(f"{len(rows) - len(train)} system metric points")
    if dropped:
        out.append(f"{dropped} older metric points (dropped: buffer full or refused)")
    params = sorted(p.key for p in pending if isinstance(p, Param))
    tags = sorted(t.key for t in pending if isinstance(t, RunTag))
    if params:
        out.append(f"{len(params)} params ({', '.join(params[:8])}{', ...' if len(params) > 8 else ''})")
    if tags:
        out.append(f"{len(tags)} tags ({', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''})")
    return out


def _is_connection_error(e: BaseException) -> bool:
    """Network trouble (worth retrying), as opposed to a bad file or value on our side."""
    import requests

    return isinstance(e, (ConnectionError, TimeoutError, requests.exceptions.RequestException))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ---------------------------------------------------------------------------------------
# `vaepipe log-model`: what train's end logs, for a model trained while the store was away


def log_trained_model(params: Params, model_dir: str | Path, *, wait: bool = False) -> MlflowTracker:
    """Log and register the trained model in ``model_dir`` as the end of ``vaepipe train`` does.

    The MLflow run named by the model's run.json is reopened when it exists in
    ``tracking.uri`` (a training whose server went away), else a new run is made (and run.json
    rewritten to name it). Then the same steps as train's end: params, the tokenizer, config.json
    and best.pt as artifacts, the text -> vector model registered as ``tracking.registered_model``
    with the ``candidate`` alias. ``tracking.enabled`` is not consulted: this command only tracks.

    Holds the ``paths.model`` lock meanwhile (a train writing that folder fails it, or is waited
    for). Raises InputError for a folder without a trained model or a ``paths.tokenizer`` that is
    not the model's, VaepipeError when something did not reach the store. Returns the ended
    tracker (``model_uri``: the registered version).
    """
    from vaepipe.core.io import sha256_file
    from vaepipe.core.outputs import output_locks
    from vaepipe.core.run_info import read_run_info
    from vaepipe.ml import checkpoint as ckpt
    from vaepipe.stages.train import finish_tracking

    model_dir = Path(model_dir)
    config = ckpt.read_config(model_dir)
    if not (model_dir / ckpt.BEST).is_file():
        raise InputError(f"{model_dir / ckpt.BEST}: not found (train a model first: `vaepipe train`)")
    tok_file: Path | None = Path(params.paths.tokenizer) / "tokenizer.json"
    if not tok_file.is_file():
        tok_file = None
    elif config.get("tokenizer_hash") and sha256_file(tok_file) != config["tokenizer_hash"]:
        raise InputError(f"{tok_file}: not the tokenizer {model_dir} was trained with (its hash differs "
                         f"from {model_dir / ckpt.CONFIG_FILE}); set paths.tokenizer to the model's")
    with output_locks([("paths.model", model_dir)], wait=wait):
        info = read_run_info(model_dir)
        tracker = MlflowTracker(params.tracking)
        run_id = info.get("run_id") if info.get("tracking_uri") == params.tracking.uri else None
        try:
            tracker.start(run_name=f"train-{params.model.kind}", run_id=run_id,
                          tags={"vaepipe.logged_by": "log-model"})
        except InputError:  # run.json names a run this store does not have
            log.warning("MLflow run %s is not in %s; logging to a new run", run_id, params.tracking.uri)
            tracker.start(run_name=f"train-{params.model.kind}", tags={"vaepipe.logged_by": "log-model"})
        try:
            tracker.log_params(params.flat())
            finish_tracking(tracker, params, model_dir, tok_file)
        except BaseException:
            tracker.end("FAILED")
            raise
        tracker.end("FINISHED")
    if tracker.not_logged:
        raise VaepipeError(f"{model_dir}: not everything reached MLflow at {tracker.uri}: "
                           + "; ".join(tracker.not_logged))
    return tracker
