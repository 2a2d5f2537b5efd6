"""The Ray Data engine (``engine.kind: ray``): ingest, tokenize and embed past one machine.

All Ray code of vaepipe lives here. The stages stay engine-agnostic: each takes the step
that does the heavy work as a parameter, and this module passes one that runs it on Ray Data
while the stage's own driver code (locks, stats, the atomic output swap) stays the local
engine's. tokenize's token files are byte-identical to the local engine's (for the same corpus
files), embed's vectors equal within float rounding (bit-equal at the same chunking). ingest
gives the local engine's rows and counts, cut into shards per item (``part-ITEM-K.parquet``):
its workers write the corpus, and no row passes through the driver.

    ingest    items of files ─(tasks: read + transform_batch)→ work files ─(hash shuffle on the key:
              first positions)→ ─(tasks: filter + write)→ part-ITEM-K.parquet; driver: counts, stats
    tokenize  BPE trained on the driver; corpus files ─(actor pool: encode, write token files)→ driver: stats
    embed     token files ─(actor pool, one GPU each on CUDA: encode_chunk)→ driver: shards + moments

Every Ray Data pipeline here runs with ``preserve_order``: results reach the driver in input
order, which keeps the output order the local engine's. A batch that raises (a bug, a
flaky disk) is retried ``MAX_RETRIES`` times; a worker process that dies is replaced and its
work redone. A user error (``VaepipeError``: a bad input file) is not retried: it comes back
as a row and is raised on the driver as the same one-line error the local engine gives.

Inputs (and the corpus and tokens that the later stages read) must be readable at the same
path on every node: a shared file system or object store. embed's outputs are written by the
driver; ingest's shards and tokenize's token files by the workers, into the stage's staging
folder beside its output, which must be shared storage too on a cluster of several nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vaepipe.core import errors
from vaepipe.core.config import EngineConfig, Params
from vaepipe.core.errors import ConfigError, VaepipeError

log = logging.getLogger(__name__)

STAGES = ("ingest", "tokenize", "embed")  # what runs on Ray; train and evaluate stay local
MAX_RETRIES = 3  # per batch, for exceptions; a dead worker's work is redone regardless
CONNECT_TIMEOUT_S = 10.0
BLOCK_BYTES = 8 << 20  # Ray Data block size: about one batch (ingest: 2 MB of raw text) or a few
# test hooks: an env var naming a marker file; the first batch that finds the file deletes it
# and raises (FAIL) or kills its own worker process with SIGKILL (KILL). The file MARKER.PHASE
# does the same in the named phase only (ingest: "write", its third phase)
FAIL_ONCE_ENV = "VAEPIPE_RAY_FAIL_ONCE"
KILL_ONCE_ENV = "VAEPIPE_RAY_KILL_ONCE"
PARTIAL = ".partial-"  # a token file being written by a worker: ".NAME.partial-PID"
_ROW_SCHEMA = pa.schema([("item", pa.int64()), ("part", pa.int64()), ("data", pa.binary()),
                         ("info", pa.string())])


class EngineError(VaepipeError):
    """The Ray cluster cannot be reached or cannot run the stage."""


# ---------------------------------------------------------------------------------------
# Entry point and the Ray session


def run_stage(stage: str, params: Params, *, wait: bool = False) -> Any:
    """Run ``stage`` (ingest, tokenize or embed) with Ray Data; the stage's result."""
    if stage not in STAGES:
        raise ConfigError(f"engine.kind: ray runs {', '.join(STAGES)}; {stage} runs locally")
    with ray_session(params.engine):
        if stage == "ingest":
            return _run_ingest(params, wait)
        if stage == "tokenize":
            return _run_tokenize(params, wait)
        return _run_embed(params, wait)


@contextlib.contextmanager
def ray_session(engine: EngineConfig) -> Iterator[None]:
    """Ray connected for the block: a running instance is reused (and left running); otherwise
    ``engine.address`` is joined, or a local instance started, and shut down afterwards."""
    try:
        import ray
    except ImportError:
        raise ConfigError("engine.kind: ray needs Ray Data, which is not installed; "
                          "pip install 'vaepipe[ray]'") from None
    if ray.is_initialized():
        yield
        return
    check_reachable(engine.address)
    env = {k: os.environ[k] for k in (FAIL_ONCE_ENV, KILL_ONCE_ENV) if k in os.environ}
    try:
        ray.init(address=engine.address, num_cpus=engine.num_cpus if engine.address is None else None,
                 include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": env} if env else None)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
        where = f"engine.address {engine.address}: cannot join the Ray cluster" if engine.address \
            else "engine.address null: cannot start a local Ray instance"
        raise EngineError(f"{where} ({_first_line(e)})") from None
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A one-line ConfigError, within ``timeout`` seconds, when nothing listens at a
    ``host:port`` or ``ray://host:port`` address (``None`` and ``auto`` are Ray's to resolve)."""
    if address is None or address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"engine.address: {address!r} is not auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__ if not isinstance(e, TimeoutError) else f"no answer in {timeout:.0f} s"
        raise ConfigError(f"engine.address: no Ray cluster at {address} ({why})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------
# The ordered map every stage uses: items in, (item, part, data, info) rows out, in order


def _row(item: int, part: int, data: bytes, info: dict[str, Any]) -> pa.Table:
    return pa.table([[item], [part], [data], [json.dumps(info)]], schema=_ROW_SCHEMA)


def _error_row(item: int, e: VaepipeError) -> pa.Table:
    return _row(item, -1, b"", {"error": type(e).__name__, "message": str(e)})


def _test_hooks(phase: str | None = None) -> None:
    """The fault-injection hooks of the tests (FAIL_ONCE_ENV, KILL_ONCE_ENV); no-ops otherwise.
    ``phase``: the marker file MARKER.PHASE arms this call instead of MARKER."""
    for env, kill in ((FAIL_ONCE_ENV, False), (KILL_ONCE_ENV, True)):
        marker = os.environ.get(env)
        if not marker:
            continue
        try:
            os.remove(f"{marker}.{phase}" if phase else marker)  # one worker wins: the fault happens once
        except FileNotFoundError:
            continue
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injected by {env}")


def to_ipc(batch: pa.RecordBatch | pa.Table) -> bytes:
    """An Arrow batch as IPC stream bytes (schema included): how batches travel in a row."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write(batch)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def _raise_if_error(row: dict[str, Any], info: dict[str, Any]) -> None:
    if row["part"] == -1:
        cls = getattr(errors, info["error"], None)
        if not (isinstance(cls, type) and issubclass(cls, VaepipeError)):
            cls = EngineError
        raise cls(info["message"])


def _ordered_rows(ds: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """The rows of ``ds`` in input order as (row, info); a user error from a worker is raised."""
    import ray
    import ray.data.exceptions

    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            # columns converted once per block; ``data`` stays a zero-copy view of the block
            # (pa.Buffer: from_ipc reads it in place), not a bytes copy of every row
            items, parts = table.column("item").to_pylist(), table.column("part").to_pylist()
            infos, data = table.column("info").to_pylist(), table.column("data").combine_chunks()
            for i, (item, part, text) in enumerate(zip(items, parts, infos, strict=True)):
                row, info = {"item": item, "part": part, "data": data[i].as_buffer(), "info": text}, json.loads(text)
                _raise_if_error(row, info)
                yield row, info
    except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as e:  # retries spent, or the cluster went away
        raise EngineError(f"Ray Data gave up after {MAX_RETRIES} retries: {_first_line(e)}") from e


@contextlib.contextmanager
def _data_context() -> Iterator[Any]:
    """Ray Data options for one stage: ordered results, retried actor tasks, no progress bars."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.actor_task_retry_on_errors, ctx.enable_progress_bars,
             ctx.target_max_block_size)
    ctx.execution_options.preserve_order = True  # first occurrence wins, output order is input order
    ctx.actor_task_retry_on_errors = True
    ctx.enable_progress_bars = False
    # the driver holds a block or two at a time: small blocks keep its memory flat (Ray's 128 MB
    # default would let a task's outputs pile up into one block on the driver)
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield ctx
    finally:
        (ctx.execution_options.preserve_order, ctx.actor_task_retry_on_errors,
         ctx.enable_progress_bars, ctx.target_max_block_size) = saved


def _map_batches(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """``ds.map_batches(fn, batch_size=1, batch_format="pyarrow", **kwargs)``: one item per call.

    Retry counts go through ``ray_remote_args_fn``, which Ray 2.60 marks deprecated (to go in
    2.64) without a named replacement yet; hence the extra's ``ray<2.64`` pin and the silenced
    warning.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(fn, batch_size=1, batch_format="pyarrow", **kwargs)


def _items(n: int | list[int]) -> Any:
    """A dataset of work items, one block each: ``0..n-1``, or the given item numbers in that
    order (the order the pool is handed them, and the order of the results)."""
    import ray.data

    items = list(range(n)) if isinstance(n, int) else n
    return ray.data.from_items([{"item": i} for i in items], override_num_blocks=max(len(items), 1))


def largest_first(files: list[Path]) -> list[int]:
    """The indices of ``files``, largest first (ties in file order): a pool that takes the big
    files first ends with small ones, so its actors finish close together."""
    sizes = [f.stat().st_size for f in files]
    return sorted(range(len(files)), key=lambda i: (-sizes[i], i))


def task_args(num_cpus: float) -> dict[str, Any]:
    """map_batches arguments of a task stage: its CPUs, and retries for exceptions too."""
    return {"num_cpus": num_cpus, "ray_remote_args_fn": _task_retries}


def _task_retries() -> dict[str, Any]:
    return {"max_retries": MAX_RETRIES, "retry_exceptions": True}


def _actor_task_retries() -> dict[str, Any]:
    return {"max_task_retries": MAX_RETRIES}


def actor_args(actors: int, device: str, cluster_cpus: float) -> dict[str, Any]:
    """map_batches arguments of an actor pool of ``actors``: one GPU per actor on CUDA; on CPU,
    1 CPU each when the cluster has a CPU to spare beyond the pool, else a fraction (a pool of
    2 x 1 CPU on 2 CPUs leaves nothing for the tasks that feed it and hangs)."""
    import ray.data

    args: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=actors),
                            "ray_remote_args_fn": _actor_task_retries}
    if device == "cuda":
        args.update(num_gpus=1, num_cpus=1)
    else:
        args["num_cpus"] = 1.0 if cluster_cpus >= actors + 1 else round(cluster_cpus / (actors + 1), 3)
    return args


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


# ---------------------------------------------------------------------------------------
# ingest


# Three phases, no row through the driver. Items are runs of consecutive input files
# (``ingest.file_runs``, about ``ingest.shard_max_bytes`` of input each); a row's position is
# ``item << POS_BITS | row`` (its row number in its item's transformed rows), so the smallest
# position of a key is its first occurrence in input order, the one the local engine keeps.
#   1. tasks per item: read + transform_batch -> ``rows-ITEM.arrow`` (all rows, with _key) and,
#      with ingest.dedup, ``keys-ITEM.parquet`` (_key, _pos); the driver gets counts only
#   2. (ingest.dedup) Ray Data hash shuffle: groupby(_key).min(_pos), then groupby(item) ->
#      ``win-ITEM.npy``, each item's winning positions, sorted
#   3. tasks per item: rows-ITEM.arrow minus the losers -> ``part-ITEM-K.parquet`` shards
# The work files live in ``.ray-work/`` inside the staging directory, which every node must
# reach at the same path (shared storage); it is removed before the atomic swap.

POS_BITS = 40  # rows per item below 2**40; items below 2**23
WORK_DIR = ".ray-work"
SHUFFLE_PARTITION_BYTES = 64 << 20


def _rows_path(work: Path, item: int) -> Path:
    return work / f"rows-{item:05d}.arrow"


def _keys_path(work: Path, item: int) -> Path:
    return work / f"keys-{item:05d}.parquet"


def _winners_path(work: Path, item: int) -> Path:
    return work / f"win-{item:05d}.npy"


def shard_name(item: int) -> str:
    """The shard names of an item, for ``ShardWriter``: ``part-{item:05d}-{k:03d}.parquet``;
    sorted by name, the shards are in input order (deterministic: a rerun gives the same)."""
    return f"part-{item:05d}-{{:03d}}.parquet"


@contextlib.contextmanager
def _replacing(final: Path) -> Iterator[Path]:
    """A temporary name beside ``final`` that becomes ``final`` when the block ends without
    error: a retried task never leaves a half-written work file under the final name."""
    tmp = final.with_name(final.name + f".{os.getpid()}.part")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _ingest_read(batch: pa.Table, files: list[Any], runs: list[tuple[int, int]], read_opts: Any,
                 given: Any, opts: Any, work: str, dedup: bool) -> Iterator[pa.Table]:
    """Phase 1 task: each item's files read and transformed into its work files; one row of
    counts per item (or its user error)."""
    from vaepipe.stages import ingest
    from vaepipe.stages.readers import Readers

    for item in batch.column("item").to_pylist():
        _test_hooks()
        start, stop = runs[item]
        readers, counts = Readers(read_opts), Counter[str]()
        try:
            rows = _write_item_rows(Path(work), item,
                                    ingest.raw_batches(files[start:stop], readers, counts, given), opts, counts,
                                    dedup)
        except VaepipeError as e:
            yield _error_row(item, e)
            continue
        counts.update(readers.stats.as_dict())  # adds: too_long is both the readers' and the transform's
        yield _row(item, 0, b"", {"counts": counts, "rows": rows})


def _write_item_rows(work: Path, item: int, raw: Iterator[pa.RecordBatch], opts: Any, counts: Counter[str],
                     dedup: bool) -> int:
    """transform_batch over ``raw`` into ``rows-ITEM.arrow`` (no file when no row is left) and,
    with ``dedup``, the rows' keys and positions into ``keys-ITEM.parquet``; the rows written."""
    import pyarrow.parquet as pq

    from vaepipe.stages import ingest

    keys: list[pa.Array] = []
    row = 0
    with contextlib.ExitStack() as stack:
        writer = None
        for rb in raw:
            out, c = ingest.transform_batch(rb, opts)
            counts.update(c)
            if not out.num_rows:
                continue
            if writer is None:
                tmp = stack.enter_context(_replacing(_rows_path(work, item)))
                writer = stack.enter_context(pa.ipc.new_file(str(tmp), out.schema))
            writer.write_batch(out)
            if dedup:
                keys.append(out.column("_key"))
            row += out.num_rows
    if dedup and row:
        pos = (np.int64(item) << POS_BITS) | np.arange(row, dtype=np.int64)
        table = pa.table({"_key": pa.concat_arrays(keys), "_pos": pa.array(pos)})
        with _replacing(_keys_path(work, item)) as tmp:
            pq.write_table(table, tmp, compression="none")
    return row


def _with_item(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.append_column("item", pc.shift_right(batch.column("_pos"), POS_BITS))


def _write_winners(group: pa.Table, work: str) -> pa.Table:
    """Phase 2 (map_groups by item): the item's first-occurrence positions, sorted, to
    ``win-ITEM.npy``."""
    item = int(group.column("item")[0].as_py())
    pos = np.sort(group.column("_pos").to_numpy())
    with _replacing(_winners_path(Path(work), item)) as tmp, open(tmp, "wb") as f:
        np.save(f, pos)
    return pa.table({"item": [item], "winners": [len(pos)]})


def shuffle_partitions(rows: int, cluster_cpus: float) -> int:
    """Partitions of the de-duplication shuffle: one per ``SHUFFLE_PARTITION_BYTES`` of keys and
    positions (16 bytes a row), and at least one per CPU (Ray's default, 200, costs more in
    start-up than a small corpus takes to shuffle)."""
    return max(1, int(cluster_cpus), -(-rows * 16 // SHUFFLE_PARTITION_BYTES))


def _first_occurrences(work: Path, items: list[int], rows: int) -> int:
    """Phase 2: a hash shuffle on the keys of ``items`` keeping each key's smallest position,
    routed back to the items as ``win-ITEM.npy``; the number of distinct keys."""
    import ray.data
    from ray.data.aggregate import Min

    paths = [str(_keys_path(work, i)) for i in items]
    if not paths:
        return 0
    n = shuffle_partitions(rows, _cluster_cpus())
    firsts = (ray.data.read_parquet(paths)
              .groupby("_key", num_partitions=n).aggregate(Min("_pos", alias_name="_pos"))
              .map_batches(_with_item, batch_format="pyarrow"))
    done = _map_groups(firsts.groupby("item", num_partitions=min(n, len(items))), _write_winners,
                       fn_kwargs={"work": str(work)})
    return sum(int(r["winners"]) for r in done.take_all())


def _map_groups(grouped: Any, fn: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return grouped.map_groups(fn, batch_format="pyarrow", **kwargs, **task_args(1.0))


def _ingest_write(batch: pa.Table, work: str, out: str, max_bytes: int, schema: pa.Schema,
                  dedup: bool) -> Iterator[pa.Table]:
    """Phase 3 task: each item's rows minus the later occurrences, as corpus shards; one row
    per item with its shards, splits and counts."""
    from vaepipe.core.constants import SPLITS
    from vaepipe.stages import ingest

    for item in batch.column("item").to_pylist():
        _test_hooks("write")
        counts, splits = Counter[str](), dict.fromkeys(SPLITS, 0)
        writer = ingest.ShardWriter(Path(out), max_bytes, schema, name=shard_name(item))
        rows = _rows_path(Path(work), item)
        if rows.exists():
            winners = _load_winners(Path(work), item) if dedup else None
            with pa.memory_map(str(rows)) as source:
                reader = pa.ipc.open_file(source)
                first = 0
                for i in range(reader.num_record_batches):
                    rb = reader.get_batch(i)
                    if winners is not None:
                        pos = (np.int64(item) << POS_BITS) | np.arange(first, first + rb.num_rows, dtype=np.int64)
                        keep = _is_in_sorted(pos, winners)
                        counts["duplicate"] += int(rb.num_rows - keep.sum())
                        first += rb.num_rows
                        rb = rb.filter(pa.array(keep))
                    writer.write(ingest.corpus_batch(rb, splits, counts))
        yield _row(item, 0, b"", {"counts": counts, "splits": splits, "shards": writer.close()})


def _load_winners(work: Path, item: int) -> np.ndarray:
    path = _winners_path(work, item)
    return np.load(path) if path.exists() else np.zeros(0, dtype=np.int64)  # none: all its rows repeat


def _is_in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def ray_write_corpus(params: Params, item_bytes: int | None = None) -> Callable[..., Any]:
    """ingest's ``write_corpus`` on Ray Data: the three phases above; the driver sees counts.

    ``item_bytes``: the input bytes per item (default ``ingest.shard_max_bytes``; 1 makes each
    file an item).
    """
    from vaepipe.core.constants import SPLITS
    from vaepipe.stages import ingest

    cfg = params.ingest

    def write(plan: Any, tmp: Path) -> Any:
        runs = ingest.file_runs(plan.files, item_bytes or cfg.shard_max_bytes)
        work = tmp / WORK_DIR
        work.mkdir()
        counts, splits, shards = Counter[str](), dict.fromkeys(SPLITS, 0), []
        try:
            with _data_context():
                t0 = time.perf_counter()
                ds = _map_batches(_items(len(runs)), _ingest_read,
                                  fn_kwargs={"files": plan.files, "runs": runs, "read_opts": plan.read_opts,
                                             "given": plan.given, "opts": plan.opts, "work": str(work),
                                             "dedup": cfg.dedup}, **task_args(1.0))
                items, rows = [], 0  # the items with rows, and their rows
                for row, info in _ordered_rows(ds):
                    counts.update(info["counts"])
                    if info["rows"]:
                        items.append(row["item"])
                        rows += info["rows"]
                t1 = time.perf_counter()
                if cfg.dedup:
                    _shuffle_errors(_first_occurrences, work, items, rows)
                t2 = time.perf_counter()
                ds = _map_batches(_items(len(runs)), _ingest_write,
                                  fn_kwargs={"work": str(work), "out": str(tmp), "max_bytes": cfg.shard_max_bytes,
                                             "schema": plan.schema, "dedup": cfg.dedup}, **task_args(1.0))
                for _, info in _ordered_rows(ds):
                    counts.update(info["counts"])
                    for split, n in info["splits"].items():
                        splits[split] += n
                    shards.extend(info["shards"])
                log.info("ingest on Ray: %d item(s); read+transform %.1f s, dedup %.1f s, write %.1f s",
                         len(runs), t1 - t0, t2 - t1, time.perf_counter() - t2)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return ingest.Written(counts, splits, shards, 0)

    return write


def _shuffle_errors(fn: Callable[..., Any], *args: Any) -> Any:
    import ray
    import ray.data.exceptions

    try:
        return fn(*args)
    except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as e:
        raise EngineError(f"Ray Data gave up on the de-duplication shuffle: {_first_line(e)}") from e


def _run_ingest(params: Params, wait: bool) -> Any:
    from vaepipe.stages import ingest

    return ingest.run(params, wait=wait, write_corpus=ray_write_corpus(params))


# ---------------------------------------------------------------------------------------
# tokenize


def _stats_to_json(stats: dict[str, Any]) -> dict[str, Any]:
    return {s: {**{f.name: getattr(st, f.name) for f in dataclasses.fields(st) if f.name != "hist"},
                "hist": st.hist.tolist()} for s, st in stats.items()}


def _stats_from_json(info: dict[str, Any]) -> dict[str, Any]:
    from vaepipe.stages.tokenize import SplitStats

    return {s: SplitStats(**{**d, "hist": np.asarray(d["hist"], dtype=np.int64)}) for s, d in info.items()}


class _TokenWriter:
    """Ray actor: a tokenizer that encodes whole corpus files (item = file index) and writes
    each one's token file into the stage's staging directory itself, under the local engine's
    name and with its bytes (``tokenize.encode_file``, ``tokenize.write_token_file``); only
    the file's counters go back to the driver. A file is written under a temporary name and
    renamed when complete, so a retried item never leaves half a file under the final name."""

    def __init__(self, tokenizer_json: str, files: list[Path], corpus_root: Path, out_dir: Path, schema: pa.Schema,
                 params: Params, threads: int) -> None:
        # tokenizers encodes on a thread pool as large as the node (read once, at its first
        # use): N actors on a node would run N x cores threads. Each takes its share, unless
        # the user set the pool's size.
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.encode_special_tokens = True  # not saved in tokenizer.json (see stages.tokenize)
        self.files, self.corpus_root, self.out_dir = files, corpus_root, out_dir
        self.schema, self.cfg = schema, params.tokenize

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        from vaepipe.stages import tokenize

        cfg = self.cfg
        for item in batch.column("item").to_pylist():
            final = tokenize.token_file(self.out_dir, self.corpus_root, self.files[item])
            tmp = final.with_name(f".{final.name}{PARTIAL}{os.getpid()}")
            try:
                batches = tokenize.encode_file(self.tok, self.files[item], self.schema, cfg.batch_size,
                                               cfg.max_tokens, cfg.overlong)
                stats = tokenize.write_token_file(tmp, self.schema, _faulty(batches))
                os.replace(tmp, final)
            except VaepipeError as e:
                yield _error_row(item, e)
                continue
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            yield _row(item, 0, b"", _stats_to_json(stats))


def _faulty(batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, the test hooks run after the first one (a fault in the middle of a file)."""
    for i, batch in enumerate(batches):
        yield batch
        if i == 0:
            _test_hooks()


def _remove_partial_files(out_dir: Path) -> None:
    """The half-written token files of workers that died (their retries wrote the files)."""
    for leftover in sorted(out_dir.rglob(f".*{PARTIAL}*")):
        log.info("removing %s, left by a worker that died", leftover)
        leftover.unlink(missing_ok=True)


def ray_writer(params: Params) -> Callable[..., Iterator[dict[str, Any]]]:
    """tokenize's ``write_files`` on Ray Data: an actor pool of ``engine.actors`` token writers,
    handed the corpus files largest first. The driver receives each file's counters (summed,
    so their order does not matter): its memory does not grow with the corpus. The staging
    directory must be on storage every node can write."""

    def write(tok: Any, files: list[Path], corpus_root: Path, out_dir: Path,
              schema: pa.Schema) -> Iterator[dict[str, Any]]:
        cpus, actors = _cluster_cpus(), params.engine.actors
        with _data_context():
            ds = _map_batches(
                _items(largest_first(files)), _TokenWriter,
                fn_constructor_kwargs={"tokenizer_json": tok.to_str(), "files": files, "corpus_root": corpus_root,
                                       "out_dir": out_dir, "schema": schema, "params": params,
                                       "threads": actor_threads(0, actors, cpus)},
                **actor_args(actors, "cpu", cpus))
            for _, info in _ordered_rows(ds):
                yield _stats_from_json(info)
        _remove_partial_files(out_dir)

    return write


def _run_tokenize(params: Params, wait: bool) -> Any:
    from vaepipe.stages import tokenize

    return tokenize.run(params, wait=wait, write_files=ray_writer(params))


# ---------------------------------------------------------------------------------------
# embed


class _Embedder:
    """Ray actor: the trained encoder on its device, encoding whole token files (item = file
    index) ``row_group_rows`` records at a time with ``embed.encode_chunk``, on ``threads``
    torch threads."""

    def __init__(self, params: Params, device: str, files: list[Path], splits: list[str], read_rows: int,
                 kept: list[str], threads: int) -> None:
        import torch

        from vaepipe.stages import embed

        # Ray sets OMP_NUM_THREADS to the actor's CPU request (1, or 1 for a fraction too):
        # torch would run one thread where the local engine runs one per core
        torch.set_num_threads(threads if params.embed.num_threads else min(threads, len(os.sched_getaffinity(0))))
        self.model, meta = embed.load_checked_model(params, device)
        self.z = int(meta[embed.META + "latent_dim"])
        self.params, self.device, self.files = params, device, files
        self.splits, self.read_rows, self.kept = splits, read_rows, kept

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        from vaepipe.stages import embed

        for item in batch.column("item").to_pylist():
            _test_hooks()
            try:
                stream = embed.RowStream([self.files[item]], self.splits, self.read_rows, self.kept)
                for part, chunk in enumerate(stream.chunks(self.read_rows)):
                    mu, lv, lengths = embed.encode_chunk(self.model, chunk, self.params.embed.batch_tokens,
                                                         self.device, self.z)
                    yield _row(item, part, to_ipc(embed.encoded_table(chunk, mu, lv, lengths, self.z)), {})
            except VaepipeError as e:
                yield _error_row(item, e)


def actor_threads(num_threads: int, actors: int, cluster_cpus: float) -> int:
    """Threads of an actor (embed: torch's; tokenize: tokenizers' encoding pool):
    ``num_threads`` when set (``embed.num_threads``), else its share of the cluster's CPUs
    (``cluster_cpus / actors``, at least 1; an embed actor caps it at its node's cores). Not
    Ray's CPU request of the actor, which is a bookkeeping figure that leaves room for the
    tasks feeding the pool: the local engine runs a thread per core, and so does a lone actor."""
    if num_threads:
        return num_threads
    return max(1, int(cluster_cpus // actors))


def embed_device(cfg_device: str, cluster_gpus: float) -> str:
    """The encoders' device: the cluster's GPUs decide ``auto``, not the driver's."""
    if cfg_device == "auto":
        return "cuda" if cluster_gpus > 0 else "cpu"
    return cfg_device


def _run_embed(params: Params, wait: bool) -> Any:
    import ray

    from vaepipe.core.outputs import output_locks, stage_outputs
    from vaepipe.ml.data import check_tokens_tokenizer
    from vaepipe.stages import embed

    cfg = params.embed
    device = embed_device(cfg.device, float(ray.cluster_resources().get("GPU", 0)))
    with output_locks(stage_outputs(params, "embed"), wait=wait), _data_context():
        model, meta = embed.load_checked_model(params, "cpu")  # the driver checks, the actors encode
        check_tokens_tokenizer(params.paths.tokens, meta[embed.META + "tokenizer_sha256"], "the model")
        z = int(meta[embed.META + "latent_dim"])

        cpus, actors = _cluster_cpus(), params.engine.actors
        threads = actor_threads(cfg.num_threads, actors, cpus)

        def encoded(files: list[Path], splits: list[str], read_rows: int, kept: list[str]) -> embed.EncodedTables:
            ds = _map_batches(
                _items(len(files)), _Embedder,
                fn_constructor_kwargs={"params": params, "device": device, "files": files, "splits": splits,
                                       "read_rows": read_rows, "kept": kept, "threads": threads},
                **actor_args(actors, device, cpus))
            return embed.EncodedTables((from_ipc(row["data"]) for row, _ in _ordered_rows(ds)), z, lambda: EngineError(
                "embed: the actor pool returned fewer rows than the token files hold"))

        t0 = time.perf_counter()
        result = embed.export_embeddings(
            model, params.paths.tokens, params.paths.embeddings, meta=meta, splits=cfg.splits,
            batch_tokens=cfg.batch_tokens, shard_rows=cfg.shard_rows, row_group_rows=cfg.row_group_rows,
            logvar=cfg.logvar, npy=cfg.npy, device=device, encoded=encoded)
        log.info("embed on Ray (%s, %d actor(s), %d torch thread(s) each): %.1f s", device, actors, threads,
                 time.perf_counter() - t0)
        return result
