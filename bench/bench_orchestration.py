"""What DVC and the Prefect flow cost around the stages, on the tiny test project.

    python bench/bench_orchestration.py [--repeat N] [--keep DIR]

Builds tests/test_dvc_pipeline.make_project (fixture corpus, tiny params) in a temporary
folder and times, N times each (medians printed; the first full repro once):
  1. the first full ``dvc repro`` (all six stages run),
  2. ``dvc repro`` when everything is up to date (one DVC process),
  3. the six ``dvc repro --single-item STAGE`` calls the flow's tasks make, up to date,
  4. ``python -m flows.pipeline --no-push`` up to date on Prefect's temporary local API,
  5. the same against a running ``prefect server`` (PREFECT_API_URL), started here.
Prints a markdown table for BENCHMARKS.md ("## orchestration").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_dvc_pipeline import STAGES, make_project, ran_stages, tool_env  # noqa: E402

from flows.deploy import local_server  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return seconds, r.stdout + r.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each no-op measurement (default: 3)")
    ap.add_argument("--keep", type=Path, default=None, help="build the project here and keep it")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="vaepipe-bench-orch-"))
    proj = make_project(root / "project", root / "remote")
    # a Prefect home of its own: the temporary API and the server keep their SQLite database
    # there, away from anyone else's ~/.prefect
    os.environ["PREFECT_HOME"] = str(root / "prefect-home")
    env = {**tool_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PYTHONPATH": str(REPO), "PREFECT_HOME": os.environ["PREFECT_HOME"]}
    env.pop("PREFECT_API_URL", None)
    dvc = [sys.executable, "-m", "dvc"]
    flow = [sys.executable, "-m", "flows.pipeline", "--no-push", "--project-dir", str(proj)]
    rows: list[tuple[str, float]] = []

    first, out = timed([*dvc, "repro"], proj, env)
    assert ran_stages(out) == list(STAGES), out[-2000:]
    rows.append(("first full `dvc repro` (all six stages run, tiny params)", first))

    def median(label: str, fn) -> None:
        times = [fn() for _ in range(args.repeat)]
        rows.append((label, statistics.median(times)))
        print(f"{label}: {', '.join(f'{t:.1f}' for t in times)} s", flush=True)

    def noop_repro() -> float:
        t, out = timed([*dvc, "repro"], proj, env)
        assert ran_stages(out) == [], out[-2000:]
        return t

    def six_single() -> float:
        return sum(timed([*dvc, "repro", "--single-item", s], proj, env)[0] for s in STAGES)

    median("`dvc repro`, up to date (one DVC process)", noop_repro)
    median("six `dvc repro --single-item STAGE`, up to date (what the flow's tasks run)", six_single)
    median("`python -m flows.pipeline --no-push`, up to date, Prefect's temporary API",
           lambda: timed(flow, REPO, env)[0])
    with local_server() as url:
        served = {**env, "PREFECT_API_URL": url}
        median("the same against a running `prefect server` (`PREFECT_API_URL`)",
               lambda: timed(flow, REPO, served)[0])

    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {os.cpu_count()} CPUs; "
          f"medians of {args.repeat}; project {proj}\n")
    print("| what | wall s |\n|---|---:|")
    for label, t in rows:
        print(f"| {label} | {t:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
