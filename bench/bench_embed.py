"""Benchmark of the latent export (vaepipe/stages/embed.py): documents/s, tokens/s and peak RSS.

For each scale (default 1x and 10x: the token Parquet replicated ten times into --work) it
runs, each in a fresh child process so that the peak RSS (VmHWM) is that run's alone:

  export   embed.export_embeddings: streamed, sharded Parquet + metadata, the real stage core
  raw      the floor: the whole token table read into memory and encoded as one chunk
           (same length-bucketed batches), vectors kept in one numpy array, nothing written

and prints one line per run plus the export/raw throughput ratio. The export's RSS should
stay flat from 1x to 10x (it is set by embed.row_group_rows); the raw floor's grows with the
corpus. Documents per CPU-second are printed too: steadier than wall time on a shared machine.

Needs only torch, numpy and pyarrow (no mlflow/prefect/yaml/tokenizers), so it runs on a GPU box:

    python3 bench/bench_embed.py                                  # data/tokens, CPU
    python3 bench/bench_embed.py --tokens /tmp/embbench/data/tokens --threads 2
    python3 bench/bench_embed.py --synthetic 64000 --device cuda  # no corpus at hand
    python3 bench/bench_embed.py --docs 5000 --scales 1           # a slice, on a slow CPU

The model is a randomly initialised TextVAE with the params.yaml default sizes (embed 128,
hidden 256, z 32; the speed does not depend on the weights) unless --model names a trained
model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(args: argparse.Namespace, vocab_size: int):
    import torch

    from vaepipe.ml.model import TextVAE, VAEConfig

    if args.model:
        from vaepipe.ml.checkpoint import load_model

        model, config = load_model(args.model, device=args.device)
        return model, int(config["model"]["latent_dim"])
    torch.manual_seed(0)
    cfg = VAEConfig(kind="vae", vocab_size=vocab_size, embed_dim=args.embed_dim, hidden_dim=args.hidden_dim,
                    latent_dim=args.latent_dim, num_layers=1, num_heads=4, encoder="lstm", decoder="lstm",
                    dropout=0.2, bn_gamma=0.0)
    return TextVAE(cfg).to(args.device).eval(), args.latent_dim


def vocab_of(tokens: Path) -> int:
    stats = tokens / "_stats.json"
    return int(json.loads(stats.read_text())["vocab_size"]) if stats.is_file() else 8000


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss on Linux keeps the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def child(args: argparse.Namespace) -> None:
    """One measured run; prints a JSON line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from vaepipe.stages import embed

    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = Path(args.tokens)
    model, z = build_model(args, vocab_of(tokens))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = u0.ru_utime + u0.ru_stime
    t0 = time.perf_counter()
    if args.mode == "export":
        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        res = embed.export_embeddings(
            model, tokens, out, meta={"vaepipe.latent_dim": str(z), "vaepipe.model_sha256": "bench"},
            splits=["train", "valid", "test"], batch_tokens=args.batch_tokens, shard_rows=args.shard_rows,
            row_group_rows=args.row_group_rows, device=args.device)
        rows, n_tokens = res.rows, res.n_tokens
        extra = {"shards": res.shards, "bytes": sum(p.stat().st_size for p in out.glob("part-*.parquet")),
                 "byte_stream_split": json.loads((out / embed.MANIFEST).read_text())["encoding"]}
    else:
        files = sorted(tokens.rglob("*.parquet"))
        table = pa.concat_tables(pq.read_table(f, columns=["ids"]) for f in files)
        mu, _, lengths = embed.encode_chunk(model, table, args.batch_tokens, args.device, z)
        sync()
        rows, n_tokens, extra = len(mu), int(lengths.sum()), {}
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                      "mode": args.mode, "rows": rows, "tokens": n_tokens, "seconds": seconds,
                      "cpu_s": usage.ru_utime + usage.ru_stime - cpu0,
                      "docs_per_s": rows / seconds, "tokens_per_s": n_tokens / seconds,
                      "peak_rss_mb": peak_rss_mb(), **extra}))


def replicate(tokens: Path, dest: Path, times: int) -> Path:
    """``times`` copies of every token file under ``dest`` (same doc ids; fine for timing)."""
    if dest.is_dir() and len(list(dest.glob("*.parquet"))) == times * len(list(tokens.rglob("*.parquet"))):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for r in range(times):
        for f in sorted(tokens.rglob("*.parquet")):
            shutil.copyfile(f, dest / f"r{r:03d}-{f.name}")
    if (tokens / "_stats.json").is_file():
        shutil.copyfile(tokens / "_stats.json", dest / "_stats.json")
    return dest


def head(tokens: Path, dest: Path, n: int) -> Path:
    """The first ``n`` records of the token Parquet (a slice of the corpus, for slow CPUs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(f) for f in sorted(tokens.rglob("*.parquet"))).slice(0, n)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    pq.write_table(table, dest / "part-00000.parquet", compression="zstd")
    if (tokens / "_stats.json").is_file():
        shutil.copyfile(tokens / "_stats.json", dest / "_stats.json")
    return dest


def synthesize(dest: Path, n: int, vocab: int = 8000, seed: int = 0) -> Path:
    """n records with sotu-sentence-like lengths (1..64 tokens, mean ~28) and random ids."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.gamma(3.0, 9.5, size=n).astype(np.int64), 1, 64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = rng.integers(4, vocab, size=int(offsets[-1])).astype(np.uint16)
    split = rng.choice(np.array(["train", "valid", "test"]), size=n, p=[0.9, 0.05, 0.05])
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "doc_id": [f"{i:016x}" for i in range(n)], "split": split.tolist(),
        "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "n_tokens": pa.array(lengths.astype(np.int32))}), dest / "part-00000.parquet", compression="zstd")
    (dest / "_stats.json").write_text(json.dumps({"vocab_size": vocab}))
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="data/tokens", help="token Parquet directory (default: data/tokens)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="use N synthetic records instead")
    p.add_argument("--docs", type=int, default=0, metavar="N", help="use only the first N records as the 1x corpus")
    p.add_argument("--model", default=None, help="trained model directory (default: random init)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--scales", default="1,10", help="corpus multiples to run (default: 1,10)")
    p.add_argument("--modes", default="export,raw", help="export and/or raw (default: both)")
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--shard-rows", type=int, default=1_000_000)
    p.add_argument("--row-group-rows", type=int, default=131_072)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--work", default="/tmp/vaepipe-bench-embed", help="scratch directory")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="export", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    work = Path(args.work)
    tokens = synthesize(work / "synthetic", args.synthetic) if args.synthetic else Path(args.tokens)
    if not tokens.is_dir() or not any(tokens.rglob("*.parquet")):
        sys.exit(f"{tokens}: no token Parquet (run `vaepipe ingest && vaepipe tokenize`, or pass --synthetic N)")
    if args.docs:
        tokens = head(tokens, work / f"tokens-first{args.docs}", args.docs)
    results = {}
    for scale in (int(s) for s in args.scales.split(",")):
        src = tokens if scale == 1 else replicate(tokens, work / f"tokens-x{scale}", scale)
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--tokens", str(src),
                   "--out", str(work / f"emb-x{scale}"), "--device", args.device,
                   "--threads", str(args.threads), "--batch-tokens", str(args.batch_tokens),
                   "--shard-rows", str(args.shard_rows), "--row-group-rows", str(args.row_group_rows),
                   "--embed-dim", str(args.embed_dim), "--hidden-dim", str(args.hidden_dim),
                   "--latent-dim", str(args.latent_dim)] + (["--model", args.model] if args.model else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = results[scale, mode] = json.loads(out)
            if len(results) == 1:  # torch is imported in the children only
                print(f"# torch {r['torch']}, device {args.device} {r['gpu'] or ''}, {r['threads']} threads, "
                      f"{os.cpu_count()} cpus")
            print(f"x{scale:<3} {mode:<6} {r['rows']:>9} docs {r['tokens']:>10} tokens  {r['seconds']:7.1f} s  "
                  f"{r['docs_per_s']:9.0f} docs/s  {r['tokens_per_s']:10.0f} tokens/s  "
                  f"({r['rows'] / max(r['cpu_s'], 1e-9):7.0f} docs/CPU-s)  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB" + (f"  {r['bytes'] / 1e6:.1f} MB on disk, "
                                                          f"{r['shards']} shard(s), BSS {r['byte_stream_split']}"
                                                          if mode == "export" else ""), flush=True)
        if (scale, "export") in results and (scale, "raw") in results:
            ratio = results[scale, "export"]["docs_per_s"] / results[scale, "raw"]["docs_per_s"]
            print(f"x{scale:<3} export/raw throughput: {ratio:.2f}")


if __name__ == "__main__":
    main()
