"""A data stage as a Ray job (``engine.submit: true``): submitted to the cluster's job server.

``vaepipe ingest|tokenize|embed`` with ``engine.kind: ray``, ``engine.submit: true`` and
``engine.address`` naming a cluster does not run Ray Data here: it submits the same command
to the cluster's job server (``JobSubmissionClient(engine.dashboard).submit_job``), with
``--set engine.submit=false --set engine.address=auto`` appended so that the job's driver runs
the stage on the cluster it lands on, streams the job's log lines back as they come
(``tail_job_logs``) and fails, when the job fails, with the job's last error line. The
machine that submits needs no Ray Data workers, only network access to the job server; a
Prefect flow task (``dvc repro`` -> ``vaepipe STAGE``) thus streams the job's logs and fails
with that line.

The job runs ``cd <this directory> && vaepipe STAGE --params <file> --set ...`` on the head
node: the project directory, the params file and every input and output path must be at the
same path there (shared storage), and ``vaepipe`` installed on the cluster's nodes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from vaepipe.core.config import EngineConfig
from vaepipe.core.errors import ConfigError, VaepipeError

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265  # Ray's default job server (dashboard) port
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailed(VaepipeError):
    """The stage's Ray job failed or was stopped; the message ends with its last error line."""


def dashboard_url(engine: EngineConfig) -> str:
    """The job server to submit to: ``engine.dashboard``, else ``engine.address``'s host at
    port 8265 (the job server listens beside the cluster's head, not at the GCS port)."""
    if engine.dashboard:
        url = engine.dashboard
        return url if "://" in url else f"http://{url}"
    if not engine.address or engine.address == "auto":
        raise ConfigError("engine.submit: set engine.dashboard (the cluster's job server, http://HOST:8265) "
                          "or engine.address (host:port or ray://host:port)")
    host = urlsplit("//" + engine.address.removeprefix("ray://")).hostname
    if not host:
        raise ConfigError(f"engine.address: {engine.address!r} names no host to find the job server at")
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{DASHBOARD_PORT}"


def job_entrypoint(stage: str, params_file: str | None, overrides: Sequence[str], cwd: str,
                   wait: bool = False) -> str:
    """The shell command the job runs: this stage, these params, from this directory, on the
    cluster it runs in (never submitted again)."""
    cmd = ["vaepipe", stage, *(["--wait"] if wait else [])]
    if params_file is not None:
        cmd += ["--params", os.path.abspath(params_file)]
    for item in [*overrides, "engine.kind=ray", "engine.submit=false", "engine.address=auto"]:
        cmd += ["--set", item]
    return f"cd {shlex.quote(cwd)} && {shlex.join(cmd)}"


def submit_stage(stage: str, engine: EngineConfig, *, params_file: str | None, overrides: Sequence[str],
                 on_line: Callable[[str], None], wait: bool = False, client: Any = None) -> str:
    """Run ``stage`` as a Ray job and wait for it: each log line to ``on_line`` as it comes.

    Returns the job id; raises JobFailed (the job's last error line) when the job fails or is
    stopped, EngineError when the job server cannot be reached. Ctrl-C stops the job.
    ``wait``: the job waits for the outputs' locks (``--wait``). ``client``: a
    ``JobSubmissionClient`` (tests pass a fake one).
    """
    from vaepipe.adapters.engine_ray import EngineError

    url = dashboard_url(engine)
    if client is None:
        try:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(url)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise EngineError(f"engine.dashboard {url}: no Ray job server there ({_first_line(e)})") from None
    entrypoint = job_entrypoint(stage, params_file, overrides, os.getcwd(), wait)
    job_id = client.submit_job(entrypoint=entrypoint, metadata={"vaepipe_stage": stage})
    log.info("submitted %s as Ray job %s to %s", stage, job_id, url)
    lines: list[str] = []
    try:
        asyncio.run(_tail(client, job_id, lines, on_line))
        status = _final_status(client, job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        raise
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        raise JobFailed(f"Ray job {job_id} ({stage}) {status.lower()}: "
                        f"{last_error_line(lines) or _first_line(info.message or status)}")
    return job_id


async def _tail(client: Any, job_id: str, lines: list[str], on_line: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        for line in chunk.splitlines():
            lines.append(line)
            on_line(line)


def _final_status(client: Any, job_id: str, timeout: float = 30.0) -> str:
    """The job's status once final (the log stream may end a moment before it is)."""
    deadline = time.monotonic() + timeout
    while True:
        got = client.get_job_status(job_id)
        status = str(getattr(got, "value", got))
        if status in FINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def last_error_line(lines: Sequence[str]) -> str | None:
    """The line that says what went wrong: the last ``...: error: ...`` line (vaepipe's own
    one-line errors), else the last line of a traceback (``SomeError: ...``), else None."""
    texts = [ln.strip() for ln in lines if ln.strip()]
    for line in reversed(texts):
        if ": error:" in line:
            return line
    for line in reversed(texts):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return None


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
