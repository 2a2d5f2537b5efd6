"""``ingest.workers > 1``: ingest and ``workers - 1`` more processes read and transform the files.

The input is cut into parts (a file, or a range of a big file's batches) taken in input order.
ingest itself streams the part at the head of the input order whenever nobody has taken it (no
copy at all); a spawned worker is sent a part ahead of the head, never its data, reads it with
readers of its own, runs ``ingest.transform_batch`` and writes the outputs as Arrow IPC files in
a working folder beside the corpus (a ``.NAME.tmp-*`` sibling, which the next run removes if this
one is killed). While the head's worker is still busy, ingest takes the next part that nobody
has taken into that folder too, so no core waits. ingest maps those files in input order, so
de-duplication and the shards see exactly the batches of ``workers: 1``, and the output is the
same bytes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vaepipe.stages.ingest import GivenSplits, TransformedStream, TransformOptions, raw_batches, transform_batch
from vaepipe.stages.readers import BLOCK, InputFile, Readers, ReadOptions

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PARTS_IN_FLIGHT = 2  # per worker: parts submitted ahead of the one the parent consumes


@dataclass(frozen=True)
class Part:
    """Batches ``first`` up to ``stop`` (None: the end) of ``files[index]``."""

    index: int
    first: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class PartOutput:
    """What a worker hands back for a part: its IPC files (each holding some of its batches, in
    order), per batch the transform counts and the columns that carried a validity bitmap, and
    what reading the part counted (reader stats and ``text_bytes_in``)."""

    files: list[tuple[str, int]]  # (path, number of batches)
    counts: list[dict[str, int]]
    validity: list[tuple[str, ...]]
    read: dict[str, int]


def plan_parts(sizes: list[int], workers: int, splittable: list[bool]) -> list[Part]:
    """The parts the workers take, in input order: a file each, except that a file holding more
    than its share of the input (over 1/``workers`` of the bytes; ``splittable``: its batches
    can be counted from its size) is cut into ``workers`` ranges of about ``BLOCK``-sized
    batches, so one huge file still keeps every worker busy.

    A range's worker reads the file from its start and transforms only its own batches: the
    reader's batch boundaries (which the shards' row groups follow) need everything before them.
    """
    total = sum(sizes)
    parts: list[Part] = []
    for i, (size, split) in enumerate(zip(sizes, splittable, strict=True)):
        batches = size // BLOCK  # at least this many: a batch is one block of a text file at most
        n = min(workers, batches) if split and size * workers > total else 1
        if n <= 1:
            parts.append(Part(i))
            continue
        cuts = [round(k * batches / n) for k in range(n)]
        parts += [Part(i, a, b) for a, b in zip(cuts, [*cuts[1:], None])]
    return parts


def _splittable(f: InputFile, unit: str) -> bool:
    """Whether ``f``'s size tells how many batches it has (not compressed; more than one record)."""
    return f.compression is None and unit != "document"


def part_batches(f: InputFile, part: Part, read_opts: ReadOptions, opts: TransformOptions,
                 given: GivenSplits | None, read: Counter[str]) -> TransformedStream:
    """``part`` of ``f`` read and transformed, batch by batch; once exhausted, ``read`` holds what
    reading the part counted (reader stats and ``text_bytes_in``)."""
    readers, seen = Readers(read_opts), Counter[str]()

    def counted() -> Counter[str]:
        return Counter({**readers.stats.as_dict(), **seen})

    start = counted() if part.first == 0 else None
    end = None
    for i, rb in enumerate(raw_batches([f], readers, seen, given)):
        if i >= part.first:
            yield transform_batch(rb, opts)
        if i == part.first - 1:  # what was read up to here is the parts' before this one
            start = counted()
        if part.stop is not None and i == part.stop - 1:
            end = counted()
            break
    end = end if end is not None else counted()
    read.update(end - (start if start is not None else end))  # after the file's last batch: nothing


def transform_part(f: InputFile, part: Part, read_opts: ReadOptions, opts: TransformOptions,
                   given: GivenSplits | None, out: str) -> PartOutput:
    """Read ``part`` of ``f``, transform its batches into IPC files ``out``-N.arrow (in a
    worker, or in ingest for a part ahead of the one it is writing)."""
    files: list[tuple[str, int]] = []
    counts: list[dict[str, int]] = []
    validity: list[tuple[str, ...]] = []
    read = Counter[str]()
    writer: pa.ipc.RecordBatchFileWriter | None = None
    schema: pa.Schema | None = None
    try:
        for batch, c in part_batches(f, part, read_opts, opts, given, read):
            if writer is None or batch.schema != schema:  # a schema of its own: a new file
                if writer is not None:
                    writer.close()
                files.append((f"{out}-{len(files)}.arrow", 0))
                schema = batch.schema
                writer = pa.ipc.new_file(files[-1][0], schema)
            writer.write_batch(batch)
            files[-1] = (files[-1][0], files[-1][1] + 1)
            counts.append(c)
            validity.append(tuple(n for n, col in zip(batch.schema.names, batch.columns)
                                  if col.buffers()[0] is not None))
    finally:
        if writer is not None:
            writer.close()
    return PartOutput(files, counts, validity, dict(read))


def _warm() -> int:
    """Worker: nothing; submitted once per worker to start them all while the parent lists inputs."""
    return os.getpid()


class _NoPandas:
    """A meta path finder that refuses pandas: pyarrow imports it (~0.3 CPU-s) on its first
    conversion of a numpy array only to ask whether that is a pandas object, and a worker,
    which reads and transforms, never needs it."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"no module named {name!r} in an ingest worker", name=name)
        return None


def _init_worker(parent: int) -> None:
    """Worker initializer: die with the parent; no pandas; one Arrow thread (the pool is the
    parallelism)."""
    _die_with_parent(parent)
    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _NoPandas())
    pa.set_cpu_count(1)


def with_validity(batch: pa.RecordBatch, names: tuple[str, ...]) -> pa.RecordBatch:
    """``batch`` with an all-valid bitmap on each column of ``names`` that lost its own in IPC
    (Arrow writes none where nothing is null): the same ``nbytes`` as the worker's batch, which
    the shards' row groups are cut by."""
    if not any(batch.column(n).buffers()[0] is None for n in names):
        return batch
    n = batch.num_rows
    ones = pa.py_buffer(np.packbits(np.ones(n, dtype=bool), bitorder="little"))
    rows = pa.Array.from_buffers(pa.int64(), n, [ones, pa.py_buffer(np.arange(n, dtype=np.int64))], null_count=0)
    cols = [c.take(rows) if name in names and c.buffers()[0] is None else c  # take: a bitmap of valid indices
            for name, c in zip(batch.schema.names, batch.columns)]
    return pa.record_batch(cols, schema=batch.schema)


class WorkerPool:
    """``ingest.workers`` processes: this one and ``workers - 1`` spawned ones, started when made
    (so that they boot while ingest lists and checks the inputs); ``transform`` is a
    ``TransformFiles``."""

    def __init__(self, workers: int, final: Path, keep_validity: bool) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers, self.final, self.keep_validity = workers, final, keep_validity
        self.work: Path | None = None  # the working folder of the IPC files, made by transform
        self.here: list[int] = []  # the parts this process transformed, in the order it took them
        spawned = max(1, workers - 1)
        # spawn, not fork: forking a process that holds Arrow's thread pools can deadlock
        self.pool = ProcessPoolExecutor(spawned, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(os.getpid(),))
        self.in_flight = _PARTS_IN_FLIGHT * spawned  # parts submitted and not yet consumed, at most
        for _ in range(spawned):  # with spawn each submit starts a worker while none is idle
            self.pool.submit(_warm)

    def close(self) -> None:
        """End the workers, then remove the working folder (a part still running when ingest
        failed may have written into it after ``transform`` let go)."""
        import shutil

        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)

    def transform(self, files: list[InputFile], readers: Readers, opts: TransformOptions,
                  counts: Counter[str], given: GivenSplits | None) -> TransformedStream:
        """The parts' batches in input order. Parts are taken in input order, each by the first
        process free: the spawned workers are kept ``in_flight`` parts ahead; this process streams
        the head part when nobody has taken it, and otherwise, while the head's worker is busy,
        takes the next free part into the working folder. Parts taken and not yet written stay
        within ``in_flight`` + ``workers`` of the head, so memory and the working folder stay
        bounded."""
        import shutil
        import tempfile

        parts = plan_parts([f.path.stat().st_size for f in files], self.workers,
                           [_splittable(f, opts.unit) for f in files])
        self.final.parent.mkdir(parents=True, exist_ok=True)
        work = self.work = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-workers-", dir=self.final.parent))
        taken: dict[int, Future[PartOutput] | PartOutput | Exception] = {}  # by a worker, or here
        ahead = self.in_flight + self.workers  # how far past the head a part may be taken
        nxt = 0  # every part before this one is taken

        def out(k: int) -> str:
            return str(work / f"part-{k:06d}")

        def submit(head: int) -> None:
            """Give the workers the next free parts, up to ``in_flight`` not yet consumed."""
            nonlocal nxt
            submitted = sum(isinstance(t, Future) for t in taken.values())
            while submitted < self.in_flight and nxt < len(parts) and nxt < head + ahead:
                taken[nxt] = self.pool.submit(transform_part, files[parts[nxt].index], parts[nxt],
                                              readers.opts, opts, given, out(nxt))
                submitted, nxt = submitted + 1, nxt + 1

        try:
            for head, part in enumerate(parts):
                if nxt == head:  # nobody took the head: stream it from here
                    nxt += 1
                    submit(head)  # the workers go on ahead
                    self.here.append(head)
                    read = Counter[str]()
                    yield from part_batches(files[part.index], part, readers.opts, opts, given, read)
                    counts.update(read)
                    continue
                got = taken.pop(head)
                if isinstance(got, Future):  # a worker's
                    while not got.done() and nxt < len(parts) and nxt < head + ahead:  # work meanwhile
                        self.here.append(nxt)
                        try:
                            taken[nxt] = transform_part(files[parts[nxt].index], parts[nxt], readers.opts,
                                                        opts, given, out(nxt))
                        except Exception as e:  # raised at its turn: an earlier part's error comes first
                            taken[nxt] = e
                        nxt += 1
                    got = got.result()
                elif isinstance(got, Exception):
                    raise got
                counts.update(got.read)
                yield from self._batches(got)
                submit(head)
        finally:
            for fut in taken.values():
                if isinstance(fut, Future):
                    fut.cancel()
            shutil.rmtree(work, ignore_errors=True)

    def _batches(self, done: PartOutput) -> TransformedStream:
        """A part's batches, mapped from its IPC files (removed once open), with their counts."""
        k = 0
        for path, n in done.files:
            reader = pa.ipc.open_file(pa.memory_map(path))
            os.unlink(path)  # the mapping stays valid; the disk space goes with the last batch
            for j in range(n):
                batch = reader.get_batch(j)
                if self.keep_validity:
                    batch = with_validity(batch, done.validity[k])
                yield batch, done.counts[k]
                k += 1


def _die_with_parent(parent: int) -> None:
    """Worker initializer: the kernel kills this worker when its parent ends, even by SIGKILL
    (``PR_SET_PDEATHSIG``; Linux), so no orphan keeps running; a parent already gone ends it now.

    The signal follows the parent *thread* that started the worker: the pool lives and ends
    in the one thread that runs ingest.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's own checks remain
        log.debug("PR_SET_PDEATHSIG unavailable; workers may outlive a killed parent")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
