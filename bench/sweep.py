"""Quality sweep: train VAE/LM variants side by side, score each VAE against its LM baseline.

    python3 bench/sweep.py bench/sweeps/cpu_size.txt --out bench/out/sweep --workers 8 \
        --set train.device=cuda --set train.bf16=false --set evaluate.device=cuda --set evaluate.bf16=false

A jobs file has one variant per line: ``NAME [lm=LMNAME] KEY=VALUE ...`` (``#`` starts a comment).
A line with ``model.kind=lm`` trains an LM baseline (into models/sweep/NAME, its paths.baseline);
any other line trains a VAE (paths.model models/sweep/NAME) and then evaluates it on the first
``evaluate.max_docs`` test documents with K = ``evaluate.iw_samples`` beside the LM named by
``lm=`` -- which must come earlier in the file. Every run is params.yaml + ``--set`` overrides
given on the command line (all jobs) + the line's own, with tracking off (``--params`` names
another file, e.g. params-gpu.yaml).

Jobs run ``--workers`` at a time, in file order (put the longest first), each with
``cpu_count // workers`` torch threads. Several small models share one GPU well: each one's
step is bound by kernel-launch latency, not by the GPU. Results: ``OUT/results.jsonl``
(appended as each job ends, so a run cut short keeps what finished; a rerun adds its rows after
the old ones), ``OUT/results.md`` (this run's table, with the gap's paired bootstrap 95%
interval), ``OUT/logs/NAME.{train,evaluate}.log``.
Needs only what ``vaepipe train/evaluate`` need (no MLflow: the no-op tracker).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DONE = re.compile(r"done: (\d+) steps in \d+ s .*best val_elbo ([\d.]+) at step (\d+)")  # train's last line


@dataclass
class Job:
    name: str
    overrides: list[str]
    lm: str | None = None
    is_lm: bool = False
    line: int = 0


def parse_jobs(path: Path) -> list[Job]:
    jobs: list[Job] = []
    seen: set[str] = set()
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        job = Job(name=words[0], overrides=[], line=n)
        for w in words[1:]:
            if w.startswith("lm="):
                job.lm = w[3:]
            elif "=" in w:
                job.overrides.append(w)
            else:
                raise SystemExit(f"{path}:{n}: expected KEY=VALUE or lm=NAME, got {w!r}")
        job.is_lm = "model.kind=lm" in job.overrides
        if job.name in seen:
            raise SystemExit(f"{path}:{n}: duplicate job name {job.name!r}")
        if job.lm is not None and job.lm not in seen:
            raise SystemExit(f"{path}:{n}: lm={job.lm} must name an LM job on an earlier line")
        seen.add(job.name)
        jobs.append(job)
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jobs", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/sweep")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--models", type=Path, default=ROOT / "models/sweep", help="where models go")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="what every job starts from")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    args.out, args.models = args.out.resolve(), args.models.resolve()  # jobs run in the checkout

    jobs = parse_jobs(args.jobs)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    lock = threading.Lock()
    futures: dict[str, Future] = {}
    t0 = time.time()

    def sets(job: Job) -> list[str]:
        # a job writes models/NAME (paths.model, or paths.baseline for an LM); the other path
        # names a folder never written (outputs may not share one)
        unused = args.models / "_none"
        own = [f"paths.model={unused if job.is_lm else args.models / job.name}",
               f"paths.baseline={args.models / job.name if job.is_lm else (args.models / job.lm if job.lm else unused)}",
               f"paths.reports={args.out / 'reports' / job.name}"]
        kv = ["tracking.enabled=false", f"train.num_threads={threads}", "evaluate.splits=[test]",
              "evaluate.num_examples=0", *args.common, *own, *job.overrides]
        return [a for s in kv for a in ("--set", s)]

    def vaepipe(stage: str, job: Job) -> float:
        start = time.time()
        with open(logs / f"{job.name}.{stage}.log", "w") as log:
            cmd = [sys.executable, "-m", "vaepipe", stage, "--params", str(args.params.resolve()), *sets(job)]
            rc = subprocess.run(cmd, cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            raise RuntimeError(f"{job.name}: vaepipe {stage} exited {rc} (see {log.name})")
        return time.time() - start

    def run(job: Job) -> dict:
        row: dict = {"name": job.name, "lm": job.lm, "overrides": " ".join(job.overrides)}
        try:
            row["train_s"] = round(vaepipe("train", job), 1)
            m = DONE.search((logs / f"{job.name}.train.log").read_text())
            if m:
                row.update(steps=int(m[1]), best_val=float(m[2]), best_step=int(m[3]))
            if not job.is_lm:
                if job.lm:
                    futures[job.lm].result()  # the LM was submitted earlier: no deadlock
                row["eval_s"] = round(vaepipe("evaluate", job), 1)
                metrics = json.loads((args.out / "reports" / job.name / "metrics.json").read_text())
                row.update({k: metrics[k] for k in ("iw_nll", "lm_nll", "elbo", "recon", "kl", "mi",
                                                    "mi_minibatch", "active_units", "n_docs",
                                                    "gap_vs_lm_ci95") if k in metrics})
                if "lm_nll" in row:
                    row["gap"] = row["iw_nll"] - row["lm_nll"]
        except Exception as e:  # one failed variant must not stop the sweep
            row["error"] = str(e)
        row["done_at_s"] = round(time.time() - t0, 1)
        with lock, open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(args.workers) as pool:
        for job in jobs:
            futures[job.name] = pool.submit(run, job)
    write_table(args.out / "results.md", [futures[j.name].result() for j in jobs])
    print(f"sweep done: {len(jobs)} jobs in {time.time() - t0:.0f} s -> {args.out}")
    return 0


def write_table(path: Path, rows: list[dict]) -> None:
    def f(v: float | None, digits: int = 2) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    lines = ["| job | overrides | steps | train s | best val | test IW-NLL | LM NLL | gap | gap 95% CI | -ELBO | KL "
             "| MI agg / mb | AU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['name']} | {r['overrides']} | error: {r['error']} ||||||||||")
            continue
        mi = f"{f(r.get('mi'))} / {f(r.get('mi_minibatch'))}" if "mi" in r else ""
        gap = f"{r['gap']:+.2f}" if "gap" in r else ""
        ci = "[{:+.2f}, {:+.2f}]".format(*r["gap_vs_lm_ci95"]) if r.get("gap_vs_lm_ci95") else ""
        lines.append(f"| {r['name']} | {r['overrides']} | {r.get('steps', '')} | {f(r.get('train_s'), 0)} | "
                     f"{f(r.get('best_val'))} | {f(r.get('iw_nll'))} | {f(r.get('lm_nll'))} | "
                     f"{gap} | {ci} | {f(r.get('elbo'))} | {f(r.get('kl'))} | "
                     f"{mi} | {r.get('active_units', '')} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
