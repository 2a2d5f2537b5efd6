"""Bulk latent export (``vaepipe embed``): the shard format, its metadata and provenance checks.

``run(params)`` encodes every record of ``embed.splits`` with the trained encoder and writes
the posterior means (and log-variances when ``embed.logvar``) as Parquet under
``paths.embeddings``: ``part-00000.parquet ...`` (at most ``embed.shard_rows`` rows each, row
groups of ``embed.row_group_rows``), ``_manifest.json``, and with ``embed.npy`` a float32
``_mu.npy`` (N, Z) plus ``_doc_ids.txt`` in the same row order. Side files start with "_" so
that ``pyarrow.parquet.read_table(dir)`` / ``pandas.read_parquet(dir)`` / DuckDB's
``read_parquet('dir')`` skip them. Every page carries a CRC (``write_page_checksum``), and every
read here verifies it: a damaged token file or shard is an error naming the file, never wrong
vectors or ids. Columns the token files carry beyond their own (``ingest.keep_columns``) are
copied into the shards in the same row order, after the vectors, with their types, so an export
joins to the user's data on them.

How it stays fast, flat in memory and restartable:
- The token Parquet is streamed in corpus order, one row group's worth of records at a time;
  inside that chunk records are batched by length (``data.token_batches``) and the vectors are
  scattered back to their row, so the output keeps the token Parquet's order.
- Shards are built in a staging directory beside the output, named after a fingerprint of
  the model checkpoint, the token files and the layout parameters. Each shard is written to a
  temporary name and renamed when complete, so a rerun after an interruption reuses finished
  shards of the *same* fingerprint and never sees a half-written file under a final name;
  staging directories of other fingerprints (another model, other tokens) are deleted, and a
  shard is reused only if all its page checksums hold. An export that is "up to date" is read
  once to check its checksums, so that rerunning ``vaepipe embed`` repairs a damaged shard.
- The active-unit mask is a property of the whole export (variance over *all* exported
  posterior means > 0.01, unbiased, as ``estimators.active_units``), not known until the last
  shard. Each shard records its own float64 moments; at the end they are merged (Chan et al.,
  ``ml.moments``) and every shard's footer is rewritten with the final metadata, one row group
  at a time. We compute the mask from the exported vectors rather than reading
  reports/metrics.json because it then describes exactly the vectors in the file and does not
  depend on whether (or on which split) ``vaepipe evaluate`` ran.
- Finally the staging directory replaces ``paths.embeddings`` in one rename
  (``core.io.replace_dir``), so readers see the previous complete export or the new one,
  never a mix; a failed export leaves the previous one as it was.

Nearest-neighbour lookup over an export (``vaepipe neighbors``) is ``vaepipe.stages.search``.

Nothing here imports vaepipe.core.config at run time (only for typing), so ``export_embeddings``
runs where only torch/numpy/pyarrow are installed (bench/bench_embed.py on a GPU box).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vaepipe import __version__
from vaepipe.core.constants import AU_THRESHOLD, TOKEN_COLUMNS
from vaepipe.core.errors import InputError
from vaepipe.core.io import atomic_file, replace_dir, sha256_file, sha256_tree, write_json
from vaepipe.core.outputs import output_locks, remove_leftover, stage_outputs
from vaepipe.core.storage import staged
from vaepipe.core.run_info import read_run_info
from vaepipe.ml.data import (
    PAD_ID,
    RERUN_TOKENIZE,
    VERIFY_PAGES,
    WRITE_PAGE_CHECKSUMS,
    check_tokens_tokenizer,
    open_parquet,
    reading_parquet,
    token_batches,
    token_files,
)
from vaepipe.ml.device import resolve_device, torch_threads
from vaepipe.ml.moments import Moments

if TYPE_CHECKING:
    from vaepipe.core.config import Params

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META = "vaepipe."  # prefix of our Parquet key-value metadata keys
BSS_LEAVES = {"mu": "mu.list.element", "logvar": "logvar.list.element"}  # Parquet leaf paths
READ_COLUMNS = ["doc_id", "split", "ids"]  # what the export reads of a token file (plus the kept columns)
EMBED_OWN = ("doc_id", "split", "mu", "n_tokens", "logvar")  # a shard's own columns
# side files start with "_": pyarrow/pandas read the directory as a dataset and skip them
MANIFEST, NPY, NPY_IDS = "_manifest.json", "_mu.npy", "_doc_ids.txt"
RERUN_EMBED = "vaepipe embed"  # what remakes a damaged shard


@dataclass
class EmbedResult:
    out_dir: Path
    rows: int
    n_tokens: int
    shards: int
    shards_reused: int
    latent_dim: int
    active_units: int
    byte_stream_split: bool
    seconds: float


# ---------------------------------------------------------------------------------------
# Entry points


def run(params: Params, *, wait: bool = False, encoded: EncodeRows | None = None) -> EmbedResult:
    """Export the latent vectors of ``embed.splits`` to ``paths.embeddings``.

    Holds the write lock of ``paths.embeddings`` while it runs. ``encoded``: where the encoder
    runs (default: here; see ``export_embeddings``).
    """
    cfg = params.embed
    with staged(params, "embed") as params, output_locks(stage_outputs(params, "embed"), wait=wait), \
            torch_threads(cfg.num_threads):
        device = resolve_device(cfg.device, "embed.device")
        model, meta = load_checked_model(params, device)
        check_tokens_tokenizer(params.paths.tokens, meta[META + "tokenizer_sha256"], "the model")
        return export_embeddings(
            model, params.paths.tokens, params.paths.embeddings, meta=meta, splits=cfg.splits,
            batch_tokens=cfg.batch_tokens, shard_rows=cfg.shard_rows, row_group_rows=cfg.row_group_rows,
            logvar=cfg.logvar, npy=cfg.npy, device=device, encoded=encoded,
        )


# ---------------------------------------------------------------------------------------
# Model, tokenizer and provenance checks


def load_checked_model(params: Params, device: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """The trained VAE in eval mode and the provenance metadata every shard carries.

    Refuses a missing model, an LM baseline (no encoder), and a tokenizer in
    ``paths.tokenizer`` other than the one the model was trained with.
    """
    from vaepipe.ml import checkpoint
    from vaepipe.stages import tokenize

    model_dir = Path(params.paths.model)
    if not (model_dir / checkpoint.CONFIG_FILE).is_file():
        raise InputError(f"{model_dir}: no trained model (config.json missing; run `vaepipe train` first)")
    model, config = checkpoint.load_model(model_dir, which="best", device=device)
    vcfg = config["model"]
    if vcfg["kind"] != "vae":
        raise InputError(f"{model_dir}/config.json: model kind {vcfg['kind']!r} has no encoder; "
                         "embed needs a VAE (paths.model)")
    tokenizer = tokenize.load_tokenizer(params.paths.tokenizer)
    tok_hash = tokenize.tokenizer_hash(params.paths.tokenizer)
    trained_hash = config.get("tokenizer_hash")
    if trained_hash and trained_hash != tok_hash:
        raise InputError(f"{params.paths.tokenizer}: tokenizer sha256 {tok_hash[:12]} differs from the one "
                         f"the model was trained with ({trained_hash[:12]}, {model_dir}/config.json)")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab != vcfg["vocab_size"]:
        raise InputError(f"{params.paths.tokenizer}: vocabulary size {vocab} differs from the model's "
                         f"vocab_size {vcfg['vocab_size']} ({model_dir}/config.json)")
    meta = {
        META + "model_sha256": sha256_file(model_dir / checkpoint.BEST),
        META + "mlflow_run_id": read_run_info(model_dir).get("run_id") or "",
        META + "tokenizer_sha256": tok_hash,
        META + "latent_dim": str(int(vcfg["latent_dim"])),
        META + "version": __version__,
    }
    return model, meta


# ---------------------------------------------------------------------------------------
# Export


class TakesEncoded(Protocol):
    def take(self, n: int) -> Encoded: ...
    def skip(self, n: int) -> None: ...


# (token files, splits, rows per chunk, kept columns) -> encoded records in export order
EncodeRows = Callable[[list[Path], list[str], int, list[str]], TakesEncoded]


def export_embeddings(
    model: torch.nn.Module,
    tokens_dir: str | Path,
    out_dir: str | Path,
    *,
    meta: dict[str, str],
    splits: list[str],
    batch_tokens: int,
    shard_rows: int,
    row_group_rows: int,
    logvar: bool = False,
    npy: bool = False,
    device: str = "cpu",
    encoded: EncodeRows | None = None,
) -> EmbedResult:
    """Encode the token Parquet under ``tokens_dir`` into sharded Parquet under ``out_dir``.

    ``meta`` (string -> string) goes into every file's key-value metadata and must hold
    ``vaepipe.latent_dim`` and ``vaepipe.model_sha256``; the fingerprint that guards resume
    is derived from it, the token files and the layout parameters. ``encoded``: where the
    encoder runs (default: here, ``model`` on ``device``; the Ray engine passes an actor pool);
    the shards are written here, in order, whatever runs it.
    """
    t0 = time.perf_counter()

    def _local_rows(files: list[Path], splits: list[str], read_rows: int, kept: list[str]) -> EncodedRows:
        return EncodedRows(RowStream(files, splits, read_rows, kept), model, batch_tokens, device, z)

    tokens_dir, out_dir = Path(tokens_dir), Path(out_dir)
    files = token_files(tokens_dir)
    counts = count_rows(files, splits)
    total = sum(counts.values())
    z = int(meta[META + "latent_dim"])
    kept = kept_columns(files)
    spec = {"format": FORMAT_VERSION, "meta": meta, "tokens_sha256": sha256_tree(tokens_dir),
            "splits": list(splits), "logvar": logvar, "shard_rows": shard_rows,
            "row_group_rows": row_group_rows, "batch_tokens": batch_tokens,
            "device": torch.device(device).type}
    if len(kept):  # only then: an export without kept columns keeps the fingerprint it had
        spec["columns"] = [f"{f.name}: {f.type}" for f in kept]
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    n_shards = math.ceil(total / shard_rows)

    done = read_manifest(out_dir, missing_ok=True)
    if (isinstance(done, dict) and done.get("fingerprint") == fingerprint and _shards_present(out_dir, done)
            and _shards_intact(out_dir, done)):
        log.info("%s is up to date (fingerprint %s)", out_dir, fingerprint[:12])
        if npy and not (out_dir / NPY).is_file():
            write_npy(out_dir, [out_dir / s["file"] for s in done["shards"]], total, z)
        n = len(done["shards"])
        return EmbedResult(out_dir, total, done["n_tokens"], n, n, z,
                           int(sum(done["active_mask"])), done["encoding"]["byte_stream_split"],
                           time.perf_counter() - t0)

    staging = _staging_dir(out_dir, fingerprint)
    base_meta = {**meta, META + "fingerprint": fingerprint, META + "splits": json.dumps(list(splits))}
    writer = _ShardWriter(model, z, base_meta, batch_tokens=batch_tokens, row_group_rows=row_group_rows,
                          logvar=logvar, device=device, kept=kept)
    stream = (encoded or _local_rows)(files, splits, row_group_rows, kept.names)
    moments: list[Moments] = []
    reused, n_tokens = 0, 0
    for s in range(n_shards):
        rows = min(shard_rows, total - s * shard_rows)
        path = staging / f"part-{s:05d}.parquet"
        old = _reusable_shard(path, fingerprint, rows)
        if old is not None:
            stream.skip(rows)
            writer.adopt_encoding(old)
            reused += 1
            log.info("reusing %s (%d rows)", path.name, rows)
        else:
            old = writer.write(path, stream, rows, shard=s)
            log.info("wrote %s (%d rows)", path.name, rows)
        moments.append(Moments.from_dict(json.loads(old[META + "mu_moments"])))
        n_tokens += int(old[META + "n_tokens"])

    var = [float(v) for v in Moments.merge_all(moments, z).variance()]
    mask = [bool(v > AU_THRESHOLD) for v in var]
    final_meta = {META + "active_mask": json.dumps(mask), META + "mu_variance": json.dumps(var),
                  META + "rows_total": str(total)}
    shard_files = [staging / f"part-{s:05d}.parquet" for s in range(n_shards)]
    for path in shard_files:
        _finalize_shard(path, final_meta, row_group_rows)
    if npy:
        write_npy(staging, shard_files, total, z)
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": fingerprint, "rows": total, "n_tokens": n_tokens,
        "splits": counts, "latent_dim": z, "active_mask": mask, "mu_variance": var,
        "encoding": writer.encoding, "meta": meta,
        "shards": [{"file": p.name, "rows": pq.ParquetFile(p).metadata.num_rows, "bytes": p.stat().st_size}
                   for p in shard_files],
    }
    write_json(staging / MANIFEST, manifest)
    replace_dir(staging, out_dir)
    seconds = time.perf_counter() - t0
    log.info("exported %d vectors (%d active of %d dims) to %s in %.1f s (%d shards, %d reused)",
             total, sum(mask), z, out_dir, seconds, n_shards, reused)
    return EmbedResult(out_dir, total, n_tokens, n_shards, reused, z, sum(mask),
                       writer.encoding["byte_stream_split"], seconds)


def count_rows(files: list[Path], splits: list[str]) -> dict[str, int]:
    """Rows per requested split, reading only the ``split`` column; empty splits are errors."""
    counts = dict.fromkeys(splits, 0)
    for f in files:
        pf = _open_tokens(f)
        with reading_parquet(f, RERUN_TOKENIZE):
            for batch in pf.iter_batches(columns=["split"], batch_size=1 << 20):
                for item in pc.value_counts(batch.column(0).cast(pa.string())).to_pylist():
                    if item["values"] in counts:
                        counts[item["values"]] += item["counts"]
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        where = files[0].parent if files else "token Parquet"
        raise InputError(f"{where}: split(s) {', '.join(map(repr, empty))} have no records "
                         "(embed.splits names a split the corpus does not have)")
    return counts


def kept_columns(files: list[Path]) -> pa.Schema:
    """The token columns beyond their own (``ingest.keep_columns``), the same in every file."""
    from vaepipe.stages.tokenize import same_kept_columns  # here: export itself needs no tokenizers

    return same_kept_columns(files, lambda f: _open_tokens(f).schema_arrow, TOKEN_COLUMNS, RERUN_TOKENIZE)


def _open_tokens(path: Path) -> pq.ParquetFile:
    """A token file opened with page checksums verified; InputError if it is none."""
    pf = open_parquet(path, RERUN_TOKENIZE)
    missing = [c for c in READ_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (not a token Parquet?)")
    return pf


class RowBuffer:
    """Tables (or record batches) from ``parts``, in order, handed out ``take(n)`` rows at a time.

    Holds at most one part plus what is left over from the last ``take``: memory does not grow
    with the stream. ``short`` makes the error raised when ``take`` finds nothing left.
    """

    def __init__(self, parts: Iterator[pa.Table | pa.RecordBatch], short: Callable[[], Exception]) -> None:
        self._parts, self._short = parts, short
        self._buf: list[pa.Table] = []
        self._buffered = 0

    def _pull(self) -> bool:
        """Buffer the next part; False at the end of the stream."""
        part = next(self._parts, None)
        if part is None:
            return False
        self._buf.append(part if isinstance(part, pa.Table) else pa.Table.from_batches([part]))
        self._buffered += part.num_rows
        return True

    def take(self, n: int) -> pa.Table:
        """The next ``n`` rows (fewer at the end of the stream; an error when none are left)."""
        while self._buffered < n and self._pull():
            pass
        if not self._buf:
            raise self._short()
        table = pa.concat_tables(self._buf)
        head, rest = table.slice(0, n), table.slice(n)
        self._buf, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        return head

    def skip(self, n: int) -> None:
        while n > 0:
            n -= self.take(min(n, 1 << 16)).num_rows

    def chunks(self, n: int) -> Iterator[pa.Table]:
        """Every remaining row, ``n`` rows at a time (the last chunk may be shorter)."""
        while True:
            more = self._pull()
            while self._buffered >= n or (not more and self._buffered):
                yield self.take(n)
            if not more:
                return


class RowStream(RowBuffer):
    """The records of ``splits`` in file and row order, handed out ``take(n)`` rows at a time.

    Holds at most one read batch plus what is buffered for the next ``take``: memory does not
    grow with the corpus.
    """

    def __init__(self, files: list[Path], splits: list[str], read_rows: int, kept: list[str] | None = None) -> None:
        self._splits = pa.array(list(splits), type=pa.string())
        self._kept = list(kept or [])  # kept columns, carried along after READ_COLUMNS
        super().__init__(self._read(files, read_rows), lambda: InputError(
            "token Parquet changed while it was being read (fewer rows than counted)"))

    def _read(self, files: list[Path], read_rows: int) -> Iterator[pa.RecordBatch]:
        for f in files:
            batches = _open_tokens(f).iter_batches(batch_size=read_rows, columns=READ_COLUMNS + self._kept)
            while True:
                with reading_parquet(f, RERUN_TOKENIZE):  # a damaged page fails here, naming f
                    batch = next(batches, None)
                if batch is None:
                    break
                split = batch.column("split").cast(pa.string())
                batch = pa.RecordBatch.from_arrays(
                    [batch.column("doc_id").cast(pa.string()), split, batch.column("ids"),
                     *(batch.column(c) for c in self._kept)],
                    names=READ_COLUMNS + self._kept).filter(pc.is_in(split, value_set=self._splits))
                if batch.num_rows and pc.min(pc.list_value_length(batch.column("ids"))).as_py() < 1:
                    raise InputError(f"{f}: a record has no tokens (token records must have n >= 1)")
                if batch.num_rows:
                    yield batch


Encoded = tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]  # (rows, mu, logvar, lengths)


class EncodedRows:
    """Encoded records in export order, handed out ``take(n)`` rows at a time; ``skip(n)``
    passes over rows a reused shard already holds. This one encodes here, one chunk at a time;
    ``EncodedTables`` serves records encoded elsewhere (the Ray engine's actor pool)."""

    def __init__(self, stream: RowStream, model: torch.nn.Module, batch_tokens: int, device: str, z: int) -> None:
        self.stream, self.model, self.batch_tokens, self.device, self.z = stream, model, batch_tokens, device, z

    def take(self, n: int) -> Encoded:
        chunk = self.stream.take(n)
        return (chunk, *encode_chunk(self.model, chunk, self.batch_tokens, self.device, self.z))

    def skip(self, n: int) -> None:
        self.stream.skip(n)


ENCODED_COLUMNS = ("_mu", "_lv", "_len")  # what encoded_table appends to a chunk's rows


def encoded_table(chunk: pa.Table, mu: np.ndarray, lv: np.ndarray, lengths: np.ndarray, z: int) -> pa.Table:
    """``chunk``'s rows (less ``ids``) with their encodings as columns: how an encoder running
    elsewhere (the Ray engine's actors) hands its results back; ``EncodedTables`` reads them."""
    return chunk.drop_columns(["ids"]).append_column(
        "_mu", pa.FixedSizeListArray.from_arrays(pa.array(mu.reshape(-1)), z)
    ).append_column(
        "_lv", pa.FixedSizeListArray.from_arrays(pa.array(lv.reshape(-1)), z)
    ).append_column("_len", pa.array(lengths.astype(np.int64)))


class EncodedTables:
    """Records encoded elsewhere (``encoded_table``'s tables, in export order), handed out
    ``take(n)`` rows at a time like ``EncodedRows``; ``short`` makes the error raised when
    the tables hold fewer rows than the token files."""

    def __init__(self, tables: Iterator[pa.Table], z: int, short: Callable[[], Exception]) -> None:
        self.rows, self.z = RowBuffer(tables, short), z

    def take(self, n: int) -> Encoded:
        head = self.rows.take(n)
        mu = fixed_list_to_numpy(head.column("_mu"), self.z)
        lv = fixed_list_to_numpy(head.column("_lv"), self.z)
        lengths = head.column("_len").to_numpy()
        return head.drop_columns(list(ENCODED_COLUMNS)), mu, lv, lengths

    def skip(self, n: int) -> None:
        self.rows.skip(n)


def encode_chunk(model: torch.nn.Module, table: pa.Table, batch_tokens: int, device: str,
                 z: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu (N, Z) float32, logvar (N, Z) float32, lengths (N,)) for the records of ``table``.

    Length-bucketed batches for speed; results are scattered back to the table's row order.
    Padded id matrices are gathered straight from the Arrow offsets and values (no Python
    loop per record), which matters once the encoder runs on a GPU.
    """
    col = table.column("ids").combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)  # absolute positions in col.values
    values = col.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    order, mus, lvs = [], [], []
    with torch.inference_mode():
        for idx in token_batches(lengths, batch_tokens, shuffle=False):
            lens = lengths[idx]
            steps = np.arange(int(lens.max()))
            pos = offsets[idx, None] + steps  # (B, T)
            ids = np.where(steps < lens[:, None], values[np.minimum(pos, len(values) - 1)], PAD_ID)
            # lengths stay on the host (packing wants them there); outputs stay on the device
            # until the chunk is done, so a GPU is never made to wait for a copy back per batch
            m, v = model.encode(torch.from_numpy(ids.astype(np.int64)).to(device, non_blocking=True),
                                torch.from_numpy(lens))
            order.append(idx)
            mus.append(m.float())  # (B, Z)
            lvs.append(v.float())
    mu = np.empty((len(lengths), z), dtype=np.float32)
    lv = np.empty((len(lengths), z), dtype=np.float32)
    if order:
        rows = np.concatenate(order)
        mu[rows] = torch.cat(mus).cpu().numpy()
        lv[rows] = torch.cat(lvs).cpu().numpy()
    return mu, lv, lengths


class _ShardWriter:
    """Encodes ``rows`` records from a RowStream into one Parquet shard (tmp name, then rename)."""

    def __init__(self, model: torch.nn.Module, z: int, meta: dict[str, str], *, batch_tokens: int,
                 row_group_rows: int, logvar: bool, device: str, kept: pa.Schema | None = None) -> None:
        self.model, self.z, self.meta = model, z, meta
        self.batch_tokens, self.row_group_rows = batch_tokens, row_group_rows
        self.logvar, self.device = logvar, device
        self.encoding: dict[str, Any] | None = None  # byte_stream_split choice + measurement
        self.kept = kept if kept is not None else pa.schema([])
        self.schema = output_schema(z, logvar, self.kept)

    def adopt_encoding(self, meta: dict[str, str]) -> None:
        """A reused shard fixes the encoding choice for the shards written after it."""
        if self.encoding is None:
            self.encoding = json.loads(meta[META + "encoding"])

    def _table(self, chunk: pa.Table, mu: np.ndarray, lv: np.ndarray, lengths: np.ndarray) -> pa.Table:
        cols = [chunk.column("doc_id"), chunk.column("split"),
                pa.FixedSizeListArray.from_arrays(pa.array(mu.reshape(-1)), self.z),
                pa.array(lengths.astype(np.int32))]
        if self.logvar:
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(lv.reshape(-1)), self.z))
        cols += [chunk.column(name) for name in self.kept.names]
        return pa.Table.from_arrays(cols, schema=self.schema)

    def _measure(self, table: pa.Table) -> dict[str, Any]:
        """zstd size of the first row group with and without BYTE_STREAM_SPLIT; keep the smaller."""
        sizes = {}
        for bss in (False, True):
            buf = io.BytesIO()
            pq.write_table(table, buf, **parquet_options(self.logvar, bss))
            sizes[bss] = buf.tell()
        return {"byte_stream_split": sizes[True] < sizes[False], "measured_rows": table.num_rows,
                "bytes_plain": sizes[False], "bytes_byte_stream_split": sizes[True]}

    def write(self, path: Path, stream: TakesEncoded, rows: int, shard: int) -> dict[str, str]:
        """Encode the next ``rows`` records of ``stream`` into ``path``; the shard's metadata."""
        acc = Moments.empty(self.z)
        n_tokens, writer = 0, None
        with atomic_file(path) as tmp:
            try:
                left = rows
                while left > 0:
                    chunk, mu, lv, lengths = stream.take(min(left, self.row_group_rows))
                    table = self._table(chunk, mu, lv, lengths)
                    if self.encoding is None:
                        self.encoding = self._measure(table)
                        log.info("BYTE_STREAM_SPLIT on the float columns: %s", self.encoding)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, self.schema,
                                                  **parquet_options(self.logvar, self.encoding["byte_stream_split"]))
                    writer.write_table(table, row_group_size=self.row_group_rows)
                    acc = acc.merge(Moments.of(mu))
                    n_tokens += int(lengths.sum())
                    left -= chunk.num_rows
                meta = {**self.meta, META + "shard": str(shard), META + "n_tokens": str(n_tokens),
                        META + "encoding": json.dumps(self.encoding),
                        META + "mu_moments": json.dumps(acc.to_dict())}
                for key, value in meta.items():
                    writer.add_key_value_metadata({key: value})
            finally:
                if writer is not None:  # the footer is written before atomic_file renames
                    writer.close()
        return meta


def output_schema(z: int, logvar: bool, kept: pa.Schema | None = None) -> pa.Schema:
    """A shard's columns; the ``kept`` ones (``ingest.keep_columns``) come last."""
    fixed = pa.list_(pa.float32(), z)
    fields = [pa.field("doc_id", pa.string()), pa.field("split", pa.string()),
              pa.field("mu", fixed), pa.field("n_tokens", pa.int32())]
    return pa.schema(fields + ([pa.field("logvar", fixed)] if logvar else []) + list(kept or []))


def parquet_options(logvar: bool, byte_stream_split: bool) -> dict[str, Any]:
    leaves = [BSS_LEAVES["mu"]] + ([BSS_LEAVES["logvar"]] if logvar else [])
    # dictionary encoding would shadow BYTE_STREAM_SPLIT on the floats; only `split` profits from it
    return {"compression": "zstd", "use_dictionary": ["split"],
            "use_byte_stream_split": leaves if byte_stream_split else False, "write_statistics": ["n_tokens", "split"],
            **WRITE_PAGE_CHECKSUMS}


def _reusable_shard(path: Path, fingerprint: str, rows: int) -> dict[str, str] | None:
    """The metadata of a finished shard of this fingerprint with ``rows`` rows whose page
    checksums hold, else None (it is then written again)."""
    if not path.is_file():
        return None
    try:
        md = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException):
        return None
    meta = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
    if meta.get(META + "fingerprint") != fingerprint or md.num_rows != rows:
        return None
    problem = _damage(path)
    if problem:
        log.warning("%s: not reused, %s", path, problem)
        return None
    return meta


def _damage(path: Path) -> str | None:
    """What is wrong with the shard ``path`` (a page whose checksum fails, ...), or None.

    Reads every page: the price of never reusing or keeping a damaged shard.
    """
    try:
        for _ in pq.ParquetFile(path, **VERIFY_PAGES).iter_batches(batch_size=1 << 16):
            pass
    except (OSError, pa.ArrowException) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _shards_intact(out_dir: Path, manifest: dict[str, Any]) -> bool:
    """Whether every shard of the finished export reads with its page checksums intact."""
    for s in manifest["shards"]:
        problem = _damage(out_dir / s["file"])
        if problem:
            log.warning("%s: %s; exporting again", out_dir / s["file"], problem)
            return False
    return True


def _finalize_shard(path: Path, final_meta: dict[str, str], row_group_rows: int) -> None:
    """Rewrite ``path`` with the export-wide metadata (active mask), one row group at a time."""
    pf = open_parquet(path, RERUN_EMBED)
    meta = {k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items()
            if k.decode().startswith(META)}
    if all(meta.get(k) == v for k, v in final_meta.items()):
        return  # finalized by an earlier, interrupted run
    enc = json.loads(meta[META + "encoding"])
    meta.update(final_meta)
    logvar = "logvar" in pf.schema_arrow.names
    kept = pa.schema([f for f in pf.schema_arrow if f.name not in EMBED_OWN])
    # as Arrow schema metadata, the keys reach both the Parquet footer and pq.read_schema/read_table
    schema = output_schema(int(meta[META + "latent_dim"]), logvar, kept).with_metadata(dict(sorted(meta.items())))
    with (atomic_file(path) as tmp,
          pq.ParquetWriter(tmp, schema, **parquet_options(logvar, enc["byte_stream_split"])) as writer):
        for i in range(pf.num_row_groups):
            with reading_parquet(path, RERUN_EMBED):  # checked: the pages are copied with new CRCs
                group = pf.read_row_group(i)
            writer.write_table(group.cast(schema), row_group_size=row_group_rows)


def write_npy(out_dir: Path, shard_files: list[Path], total: int, z: int) -> None:
    """``_mu.npy`` (N, Z) float32 and ``_doc_ids.txt`` (one id a line, same order), for FAISS & co."""
    # the ids are renamed into place before the matrix (inner block first): a rerun that finds
    # ``_mu.npy`` present assumes ``_doc_ids.txt`` is too
    with atomic_file(out_dir / NPY) as npy_tmp, atomic_file(out_dir / NPY_IDS) as ids_tmp:
        mat = np.lib.format.open_memmap(npy_tmp, mode="w+", dtype=np.float32, shape=(total, z))
        row = 0
        with open(ids_tmp, "w", encoding="utf-8") as ids:
            for path in shard_files:
                with reading_parquet(path, RERUN_EMBED):
                    for batch in open_parquet(path, RERUN_EMBED).iter_batches(columns=["doc_id", "mu"]):
                        n = batch.num_rows
                        mat[row:row + n] = fixed_list_to_numpy(batch.column("mu"), z)
                        ids.write("\n".join(batch.column("doc_id").to_pylist()) + "\n")
                        row += n
        mat.flush()
        del mat


def fixed_list_to_numpy(arr: pa.Array | pa.ChunkedArray, z: int) -> np.ndarray:
    """A fixed_size_list<float32>[z] column -> (N, z) float32 (``flatten`` honours slices)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, z)


def read_manifest(out_dir: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        if missing_ok:
            return None
        raise InputError(f"{out_dir}: no embeddings export ({MANIFEST} missing; run `vaepipe embed` first)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e}); rerun `vaepipe embed`") from None


def _shards_present(out_dir: Path, manifest: dict[str, Any]) -> bool:
    return all((out_dir / s["file"]).is_file() and (out_dir / s["file"]).stat().st_size == s["bytes"]
               for s in manifest["shards"])


def _staging_dir(out_dir: Path, fingerprint: str) -> Path:
    """``.NAME.partial-FP`` beside ``out_dir``; other fingerprints' leftovers are removed.

    The caller holds the write lock of ``out_dir``, so no other run is using any of them.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{fingerprint[:16]}"
    for other in sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*")):
        if other != staging:
            log.info("removing stale partial export %s", other)
            remove_leftover(out_dir, other)
    staging.mkdir(exist_ok=True)
    for tmp in sorted(staging.glob(".*.tmp-*")):  # ".part-00003.parquet.tmp-PID", left by a killed run
        remove_leftover(staging / tmp.name[1:].rsplit(".tmp-", 1)[0], tmp)
    return staging
