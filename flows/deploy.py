"""The nightly deployment of ``vae-pipeline``: schedule, serving and work-pool registration.

    python -m flows.deploy serve  [--cron C] [--timezone TZ] [--project-dir D]   # make serve
    python -m flows.deploy deploy [--cron C] [--timezone TZ] [--pool P] [--project-dir D]
    python -m flows.deploy show   [--cron C] [--timezone TZ] [-n N]

The schedule is a ``prefect.schedules.Cron`` with an explicit time zone, so 03:00 stays 03:00
local time across daylight-saving changes, and a slug, so a redeploy updates the schedule in
place instead of adding a second one (PrefectHQ/prefect#19302). Defaults ``0 3 * * *`` in UTC;
``--cron``/``--timezone`` or ``$VAEPIPE_CRON``/``$VAEPIPE_TIMEZONE`` change them.

``serve`` runs the deployment from this process. Prefect's temporary local API cannot
schedule, so without ``PREFECT_API_URL`` it starts a real ``prefect server`` on a free loopback
port for as long as it serves and stops it on exit; ``pause_on_shutdown=False`` keeps the
schedule active when serving stops (#16363). ``deploy`` registers the deployment on a process
work pool (default ``vaepipe-process``, infra/services.py's) with this checkout as its source;
prefect.yaml holds the same deployment for ``prefect deploy``. ``show`` prints the next run
times, computed by the Prefect server's own schedule code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vaepipe.core.errors import ConfigError

DEFAULT_CRON = "0 3 * * *"
DEFAULT_TIMEZONE = "UTC"
DEPLOYMENT = "nightly"
SLUG = "vaepipe-nightly"  # the schedule's stable identity across redeploys
POOL = "vaepipe-process"
ENTRYPOINT = "flows/pipeline.py:vae_pipeline"
SERVER_START_TIMEOUT_S = 180


def nightly_schedule(cron: str | None = None, timezone: str | None = None, *, active: bool = True) -> Any:
    """The validated ``prefect.schedules.Cron``; ConfigError (one line) on a bad cron or zone."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    cron = cron or os.environ.get("VAEPIPE_CRON") or DEFAULT_CRON
    timezone = timezone or os.environ.get("VAEPIPE_TIMEZONE") or DEFAULT_TIMEZONE
    try:
        CronSchedule(cron=cron, timezone=timezone)  # the checks the server applies
    except ValidationError as e:
        err = e.errors()[0]
        what = "--cron" if err["loc"] and err["loc"][0] == "cron" else "--timezone"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{what}: {' '.join(msg.split())}") from None
    return Cron(cron, timezone=timezone, slug=SLUG, active=active)


def next_runs(schedule: Any, n: int = 5, after: dt.datetime | None = None) -> list[dt.datetime]:
    """The next ``n`` run times (aware, in the schedule's zone) as the Prefect server computes
    them (``prefect.server.schemas.schedules.CronSchedule.get_dates``)."""
    from prefect.server.schemas.schedules import CronSchedule

    s = CronSchedule(cron=schedule.cron, timezone=schedule.timezone, day_or=schedule.day_or)
    start = after or dt.datetime.now(dt.timezone.utc)
    return list(asyncio.run(s.get_dates(n=n, start=start)))


def build_deployment(project_dir: str | Path = ".", cron: str | None = None, timezone: str | None = None,
                     parameters: dict[str, Any] | None = None) -> Any:
    """The ``nightly`` RunnerDeployment served by ``serve`` (no work pool: this process runs it)."""
    from flows.pipeline import vae_pipeline

    return vae_pipeline.to_deployment(
        name=DEPLOYMENT,
        schedules=[nightly_schedule(cron, timezone)],
        parameters={"project_dir": str(Path(project_dir).resolve()), **(parameters or {})},
        description="vaepipe: dvc repro stage by stage, MLflow tags, dvc push, metrics artifact",
        tags=["vaepipe"],
    )


# ------------------------------------------------------------------------------------------
# a real Prefect server for `serve` when none is configured


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def local_server(timeout: float = SERVER_START_TIMEOUT_S) -> Iterator[str]:
    """``prefect server start`` on a free loopback port (its SQLite database under
    $PREFECT_HOME); yields the API URL and stops the server (its process group) on exit."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
                raise ConfigError(f"prefect server exited ({proc.returncode}): {err[-1] if err else ''}")
            if time.monotonic() > deadline:
                raise ConfigError(f"prefect server did not answer at {url} within {timeout:.0f} s")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # its own session: the server and the workers it spawned
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def serve(project_dir: str | Path = ".", cron: str | None = None, timezone: str | None = None) -> None:
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment = build_deployment(project_dir, cron, timezone)  # validate before starting anything
    with contextlib.ExitStack() as stack:
        if not PREFECT_API_URL.value():
            url = stack.enter_context(local_server())
            print(f"started a Prefect server at {url} (stopped when serving stops)", flush=True)
            stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
        prefect_serve(deployment, pause_on_shutdown=False)


def deploy(project_dir: str | Path = ".", cron: str | None = None, timezone: str | None = None,
           pool: str = POOL) -> Any:
    """Register ``nightly`` on a process work pool; its source (pull step) is this checkout."""
    from flows.pipeline import vae_pipeline

    project = str(Path(project_dir).resolve())
    return vae_pipeline.from_source(source=project, entrypoint=ENTRYPOINT).deploy(
        name=DEPLOYMENT, work_pool_name=pool, schedules=[nightly_schedule(cron, timezone)],
        parameters={"project_dir": project}, tags=["vaepipe"], print_next_steps=False, build=False, push=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "serve the nightly deployment from this process"),
                       ("deploy", "register the nightly deployment on a process work pool"),
                       ("show", "print the next run times")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--cron", default=None, help=f"cron expression (default: $VAEPIPE_CRON or {DEFAULT_CRON!r})")
        s.add_argument("--timezone", default=None,
                       help=f"IANA time zone of the cron (default: $VAEPIPE_TIMEZONE or {DEFAULT_TIMEZONE})")
        s.add_argument("--project-dir", default=".", metavar="D", help="the DVC project (default: .)")
        if name == "deploy":
            s.add_argument("--pool", default=POOL, help=f"process work pool (default: {POOL})")
        if name == "show":
            s.add_argument("-n", type=int, default=5, help="how many runs (default: 5)")
    args = p.parse_args(argv)
    try:
        if args.command == "show":
            schedule = nightly_schedule(args.cron, args.timezone)
            print(f"{schedule.cron} ({schedule.timezone}), next runs:")
            for t in next_runs(schedule, args.n):
                print(f"  {t.isoformat()}  ({t.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)")
        elif args.command == "serve":
            serve(args.project_dir, args.cron, args.timezone)
        else:
            dep_id = deploy(args.project_dir, args.cron, args.timezone, args.pool)
            print(f"deployment vae-pipeline/{DEPLOYMENT} ({dep_id}) on pool {args.pool}")
    except ConfigError as e:
        print(f"flows.deploy: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
