"""The Ray Data engine (``engine.kind: ray``): ingest, tokenize and embed past one machine.

All Ray code of vaepipe lives here. The stages stay engine-agnostic: each takes the step
that does the heavy per-batch work as a parameter, and this module passes one that runs it
on Ray Data while the stage's own driver code (locks, de-duplication, shard writers, stats,
the atomic output swap) stays exactly the local engine's. So outputs are byte-identical to
the local engine's wherever the work is cut into the same batches (ingest, tokenize) and the
embeddings equal within float rounding (embed: bit-equal at the same chunking).

    ingest    files ─(tasks: read)→ raw batches ─(tasks: transform_batch)→ driver: dedup + shards
    tokenize  BPE trained on the driver; corpus files ─(actor pool: encode, write token files)→ driver: stats
    embed     token files ─(actor pool, one GPU each on CUDA: encode_chunk)→ driver: shards + moments

Every Ray Data pipeline here runs with ``preserve_order``: results reach the driver in input
order, which is what makes "first occurrence wins" de-duplication and the output order the
local engine's. A batch that raises (a bug, a flaky disk) is retried ``MAX_RETRIES`` times; a
worker process that dies is replaced and its work redone. A user error (``VaepipeError``:
a bad input file) is not retried: it comes back as a row and is raised on the driver as the
same one-line error the local engine gives.

Inputs (and the corpus and tokens that the later stages read) must be readable at the same
path on every node: a shared file system or object store. Outputs are written by the driver,
except the token files, which tokenize's actors write into the driver's staging directory (so
that must be shared storage too on a cluster of several nodes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
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
READ_CPUS = 0.25  # an ingest read task: mostly I/O, so it never starves a transform task
# test hooks: an env var naming a marker file; the first batch that finds the file deletes it
# and raises (FAIL) or kills its own worker process with SIGKILL (KILL)
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


def _test_hooks() -> None:
    """The fault-injection hooks of the tests (FAIL_ONCE_ENV, KILL_ONCE_ENV); no-ops otherwise."""
    for env, kill in ((FAIL_ONCE_ENV, False), (KILL_ONCE_ENV, True)):
        marker = os.environ.get(env)
        if not marker:
            continue
        try:
            os.remove(marker)  # only one worker wins the marker: the fault happens once
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


def _as_batch(table: pa.Table) -> pa.RecordBatch:
    """``table`` as one record batch (a 0-row one too)."""
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


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


def _items(n: int) -> Any:
    import ray.data

    return ray.data.from_items([{"item": i} for i in range(n)], override_num_blocks=max(n, 1))


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


def _read_files(batch: pa.Table, files: list[Any], read_opts: Any, given: Any) -> Iterator[pa.Table]:
    """Ray task: each item (a file index) -> its raw record batches, then a row of read stats."""
    from vaepipe.stages import ingest
    from vaepipe.stages.readers import Readers

    for item in batch.column("item").to_pylist():
        _test_hooks()
        readers, counts = Readers(read_opts), Counter[str]()
        try:
            for part, rb in enumerate(ingest.raw_batches([files[item]], readers, counts, given)):
                yield _row(item, part, to_ipc(rb), {"raw": True})
        except VaepipeError as e:
            yield _error_row(item, e)
            continue
        yield _row(item, 0, b"", {"stats": {**counts, **readers.stats.as_dict()}})


def _transform_rows(batch: pa.Table, opts: Any) -> Iterator[pa.Table]:
    """Ray task: raw record batch rows -> transform_batch's rows and counts (others pass)."""
    from vaepipe.stages import ingest

    for row in batch.to_pylist():
        info = json.loads(row["info"])
        if not info.get("raw"):
            yield pa.Table.from_pylist([row], schema=_ROW_SCHEMA)
            continue
        _test_hooks()
        out, counts = ingest.transform_batch(_as_batch(from_ipc(row["data"])), opts)
        yield _row(row["item"], row["part"], to_ipc(out), {"counts": counts})


def ray_transform(params: Params) -> Callable[..., Iterator[tuple[pa.RecordBatch, dict[str, int]]]]:
    """ingest's ``transform_files`` on Ray Data: read tasks per file, transform tasks per batch."""

    def transform(files: list[Any], readers: Any, opts: Any, counts: Counter[str], given: Any
                  ) -> Iterator[tuple[pa.RecordBatch, dict[str, int]]]:
        with _data_context():
            ds = _map_batches(
                _items(len(files)), _read_files,
                fn_kwargs={"files": files, "read_opts": readers.opts, "given": given}, **task_args(READ_CPUS))
            ds = _map_batches(ds, _transform_rows, fn_kwargs={"opts": opts}, **task_args(1.0))
            for row, info in _ordered_rows(ds):
                if "stats" in info:  # a file's read stats, after its batches
                    counts.update(info["stats"])
                else:
                    yield _as_batch(from_ipc(row["data"])), info["counts"]

    return transform


def _run_ingest(params: Params, wait: bool) -> Any:
    from vaepipe.stages import ingest

    return ingest.run(params, wait=wait, transform_files=ray_transform(params))


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
                 params: Params) -> None:
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
    """tokenize's ``write_files`` on Ray Data: an actor pool of ``engine.actors`` token writers.
    The driver receives each file's counters, in file order: its memory does not grow with
    the corpus. The staging directory must be on storage every node can write."""

    def write(tok: Any, files: list[Path], corpus_root: Path, out_dir: Path,
              schema: pa.Schema) -> Iterator[dict[str, Any]]:
        with _data_context():
            ds = _map_batches(
                _items(len(files)), _TokenWriter,
                fn_constructor_kwargs={"tokenizer_json": tok.to_str(), "files": files, "corpus_root": corpus_root,
                                       "out_dir": out_dir, "schema": schema, "params": params},
                **actor_args(params.engine.actors, "cpu", _cluster_cpus()))
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
    """torch threads of an embed actor: ``embed.num_threads`` when set, else its share of the
    cluster's CPUs (``cluster_cpus / actors``, at least 1; the actor caps it at its node's
    cores). Not Ray's CPU request of the actor, which is a bookkeeping figure that leaves room
    for the tasks feeding the pool: the local engine runs a thread per core, and so does a
    lone actor."""
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
