"""Ingest: raw text files -> normalised, de-duplicated, split corpus Parquet + _stats.json.

    inputs ─resolve→ files ─read→ raw record batches ─transform_batch→ units (normalised,
    segmented, filtered, hashed) ─dedup (driver)→ zstd Parquet shards + _stats.json

``transform_batch`` is a pure function from an Arrow batch of raw records to an Arrow batch
of corpus rows (plus drop counts): the part that would run as Ray Data ``map_batches`` on a
bigger corpus, and the part ``ingest.workers`` spreads over processes (``ingest_workers``). The
only state is the de-duplication index in the driver, 8 bytes per kept record (``HashIndex``).
An engine that writes the corpus elsewhere (Ray: ``write_corpus``) gets the run's
``IngestPlan`` and a staging folder, and returns its counts and shards; the stats and the swap
stay here.

``doc_id`` is the BLAKE2b-128 hash of the normalised UTF-8 text (32 hex digits); its first 8
bytes are the de-duplication key and its last 8 bytes pick the split, so a document keeps its
id and its split whatever else is added to the corpus. With ``ingest.split_by: paragraph`` a
sentence's split is picked by its paragraph's hash instead (the paragraph's text as the
paragraph unit normalises it), so a sentence corpus and a paragraph corpus of the same inputs
agree on which text is held out.

Splits as given (``ingest.split_from``, for reproducing published numbers): ``files`` takes each
file's split from its name (``ingest.split_files`` patterns, or a name whose parts hold train,
valid or test: ``ptb.train.txt``), ``column:NAME`` from a column of the input records. Either
way the split travels beside the record as the raw column ``_split`` (``GIVEN_SPLIT``) through
``transform_batch``, like a kept column, and replaces the hashed split in the driver.
``ingest.dedup: false`` keeps repeated records; ``ingest.max_chars: null`` keeps long ones.

Kept columns (``ingest.keep_columns``) follow the text: each corpus row carries the values of
the input record it came from (a record split into sentences gives each sentence its
record's values; de-duplication keeps the first occurrence's), after ``source``, with the
types ``readers.kept_schema`` decided.

The stats file is ``_stats.json``: pyarrow, pandas and DuckDB skip names that start with ``_``
or ``.``, so they read the corpus folder as one dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vaepipe.core.config import IngestConfig, Params
from vaepipe.core.constants import SPLITS
from vaepipe.core.errors import InputError
from vaepipe.core.io import atomic_dir, write_json
from vaepipe.core.outputs import output_locks, stage_outputs
from vaepipe.core.storage import staged
from vaepipe.core.text import (PLAIN_NON_ASCII, ascii_sentence_cuts, fold_ascii_whitespace, normalize_text,
                               split_sentences)
from vaepipe.stages.readers import InputFile, Readers, ReadOptions, find_inputs, kept_schema, kind_of

log = logging.getLogger(__name__)

DROP_REASONS = ("empty", "too_short", "too_long", "duplicate", "undecodable")
SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()),
                    ("split", pa.string()), ("source", pa.string())])  # then the kept columns, if any
RAW_COLUMNS = ("text", "source")  # a raw record batch: these, then the kept columns
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n\s*")
STATS_FILE = "_stats.json"  # "_": dataset readers skip it and read the folder as a whole
GIVEN_SPLIT = "_split"  # the raw column carrying a given split (split_from: files | column:NAME)
_NAME_PARTS = re.compile(r"[._-]")
_HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
# The batch path joins a batch's ASCII records with _RECORD_SEP and cuts their blank lines
# (segment's _BLANK_LINE, ASCII whitespace only) into _PIECE_SEP: bytes no ASCII text holds.
_RECORD_SEP, _PIECE_SEP = 0xFE, 0xFF
_BLANK_LINE_ASCII = re.compile(rb"\n[ \t\x0b\x0c\r\x1c-\x1f]*\n[ \t\n\x0b\x0c\r\x1c-\x1f]*")
_BATCH_UNITS = ("paragraph", "sentence", "document")  # line: per record (segment)
_NOT_PLAIN = f"[^\\x00-\\x7f{PLAIN_NON_ASCII}]"  # RE2: a character that sends a record to segment


@dataclass(frozen=True)
class TransformOptions:
    """What ``transform_batch`` needs from the params: small and picklable for workers."""

    unit: str
    min_chars: int
    max_chars: int
    lowercase: bool
    valid_fraction: float
    test_fraction: float
    split_by: str = "record"

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> TransformOptions:
        max_chars = sys.maxsize if cfg.max_chars is None else cfg.max_chars  # null: no upper limit
        return cls(cfg.unit, cfg.min_chars, max_chars, cfg.lowercase,
                   cfg.valid_fraction, cfg.test_fraction, cfg.split_by)


def _paragraphs(text: str) -> list[str]:
    """A raw record's paragraphs (blank-line separated), not yet normalised."""
    return _BLANK_LINE.split(text) if "\n" in text else [text]


def segment(text: str, opts: TransformOptions) -> list[str]:
    """One raw record -> its normalised units (lines, paragraphs, sentences or the whole)."""
    if opts.unit == "line":
        pieces = [p for p in text.split("\n") if p and not p.isspace()] or [""]
    elif opts.unit in ("paragraph", "sentence"):
        pieces = _paragraphs(text)
    else:
        pieces = [text]
    if opts.unit != "sentence":
        return [normalize_text(p, opts.lowercase) for p in pieces]
    out: list[str] = []
    for p in pieces:
        norm = normalize_text(p)
        if not norm:
            out.append("")  # counted as empty, like any other unit
            continue
        sents = split_sentences(norm)  # before lowercasing: capitals mark sentence starts
        if opts.lowercase:
            sents = [unicodedata.normalize("NFC", s.lower()) for s in sents]
        out.extend(sents)
    return out


def hash_texts(texts: list[str] | pa.StringArray) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
    """(doc_id hex strings, uint64 dedup keys, uniform floats in [0, 1) for the split).

    ``texts`` may be an Arrow string array: its UTF-8 bytes are hashed where they lie.
    """
    n = len(texts)
    if isinstance(texts, pa.Array):
        data, offs = _utf8_buffer(texts)
        bounds = offs.tolist()
        blank = hashlib.blake2b(digest_size=16)
        parts = []
        for a, b in zip(bounds, bounds[1:]):
            h = blank.copy()  # a copy is cheaper than a new hasher (no keyword parsing)
            h.update(data[a:b])
            parts.append(h.digest())
        digests = b"".join(parts)
    else:
        digests = b"".join([hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts])
    words = np.frombuffer(digests, dtype=">u8").reshape(n, 2)
    hexbytes = _HEX[np.frombuffer(digests, dtype=np.uint8)].tobytes()
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    doc_id = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(hexbytes))
    u = (words[:, 1] >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return doc_id, words[:, 0].astype(np.uint64), u


def _utf8_buffer(arr: pa.StringArray) -> tuple[memoryview, np.ndarray]:
    """(the UTF-8 bytes of ``arr``'s values, back to back, not copied; n + 1 offsets into them)."""
    if arr.null_count:
        raise ValueError("text values must not be null")
    if not len(arr):
        return b"", np.zeros(1, dtype=np.int64)
    _, off_buf, data_buf = arr.buffers()
    offs = np.frombuffer(off_buf, dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1].astype(np.int64)
    data = memoryview(data_buf)[offs[0]: offs[-1]] if data_buf is not None else memoryview(b"")
    return data, offs - offs[0]


def assign_split(u: np.ndarray, valid_fraction: float, test_fraction: float) -> pa.Array:
    """test below test_fraction, valid at the top (u >= 1 - valid_fraction), train between:
    growing either fraction only moves train docs into that split (a valid window stacked on
    the test one would shift, and move train docs to valid, whenever test_fraction grew)."""
    code = np.where(u < test_fraction, 2, np.where(u >= 1.0 - valid_fraction, 1, 0))
    return pa.DictionaryArray.from_arrays(pa.array(code.astype(np.int8)), pa.array(SPLITS)).cast(pa.string())


def corpus_schema(kept: pa.Schema) -> pa.Schema:
    """The corpus columns: ``SCHEMA``'s, then the kept columns."""
    return pa.schema([*SCHEMA, *kept])


def transform_batch(batch: pa.RecordBatch, opts: TransformOptions) -> tuple[pa.RecordBatch, dict[str, int]]:
    """Raw records (``text``, ``source``, kept columns) -> corpus rows + ``_key`` (uint64), and
    drop counts. Each unit carries its record's ``source`` and kept values.

    Pure: no state, same output for the same input wherever it runs. ASCII records go through
    the batch path (one pass of C loops and one sentence scan over all their bytes); the others
    through ``segment`` one by one; the units come out in record order either way.
    """
    texts = batch.column("text").cast(pa.string())
    if opts.split_by == "paragraph":
        pieces, piece_owner = paragraph_pieces(texts)
        units, piece = _units(pieces, opts)  # a record's units are its paragraphs' units, in order
        owner = piece_owner[piece]
    else:
        units, owner = _units(texts, opts)
    lens = pc.utf8_length(units).to_numpy(zero_copy_only=False)
    empty = lens == 0
    short = ~empty & (lens < opts.min_chars)
    long = lens > opts.max_chars
    keep = ~(empty | short | long)
    counts = {"units": len(units), "empty": int(empty.sum()), "too_short": int(short.sum()),
              "too_long": int(long.sum())}
    kept = units.filter(pa.array(keep))
    doc_id, key, u = hash_texts(kept)
    if opts.split_by == "paragraph":  # the split of the paragraph's own text, as at unit paragraph
        paragraphs = pa.array([normalize_text(p, opts.lowercase) for p in pieces.to_pylist()], pa.string())
        u = hash_texts(paragraphs)[2][piece[keep]]
    rows = pa.array(owner[keep])
    extra = [n for n in batch.schema.names if n not in RAW_COLUMNS]
    out = pa.record_batch([doc_id, kept,
                           assign_split(u, opts.valid_fraction, opts.test_fraction),
                           *(batch.column(n).take(rows) for n in ["source", *extra]),
                           pa.array(key, pa.uint64())],
                          names=[*SCHEMA.names, *extra, "_key"])
    return out, counts


def paragraph_pieces(texts: pa.StringArray) -> tuple[pa.StringArray, np.ndarray]:
    """Each record's paragraphs, cut as ``segment`` cuts them (not yet normalised), and the record
    each comes from: the units of ingest.split_by: paragraph."""
    pieces: list[str] = []
    owner: list[int] = []
    for i, t in enumerate(texts.to_pylist()):
        ps = _paragraphs(t)
        pieces.extend(ps)
        owner.extend([i] * len(ps))
    return pa.array(pieces, pa.string()), np.asarray(owner, dtype=np.int64)


def _units(texts: pa.StringArray, opts: TransformOptions) -> tuple[pa.StringArray, np.ndarray]:
    """The units of every record (as ``segment`` gives them), and the record each comes from."""
    ascii_mask = (pc.string_is_ascii(texts).to_numpy(zero_copy_only=False) if opts.unit in _BATCH_UNITS
                  else np.zeros(len(texts), dtype=bool))
    if not ascii_mask.all() and opts.unit in _BATCH_UNITS:  # plain punctuation beyond ASCII is fine too
        other = np.flatnonzero(~ascii_mask)
        found = pc.match_substring_regex(texts.take(pa.array(other)), _NOT_PLAIN)
        ascii_mask[other[~found.to_numpy(zero_copy_only=False)]] = True
    if ascii_mask.all():
        return _ascii_units(texts, opts)
    rest = np.flatnonzero(~ascii_mask)
    py_units: list[str] = []
    py_owner: list[int] = []
    for i, t in zip(rest.tolist(), texts.take(pa.array(rest)).to_pylist()):
        us = segment(t, opts)
        py_units.extend(us)
        py_owner.extend([i] * len(us))
    if not ascii_mask.any():
        return pa.array(py_units, pa.string()), np.asarray(py_owner, dtype=np.int64)
    where = np.flatnonzero(ascii_mask)
    a_units, a_owner = _ascii_units(texts.filter(pa.array(ascii_mask)), opts)
    owner = np.concatenate([where[a_owner], np.asarray(py_owner, dtype=np.int64)])
    order = np.argsort(owner, kind="stable")  # both parts are in record order: a merge
    units = pa.concat_arrays([a_units, pa.array(py_units, pa.string())]).take(pa.array(order))
    return units, owner[order]


def _ascii_units(texts: pa.StringArray, opts: TransformOptions) -> tuple[pa.StringArray, np.ndarray]:
    """``segment`` for ASCII records of a paragraph, sentence or document unit, over the whole
    batch at once: the records' bytes joined, pieces cut, normalised and split by C loops and
    one regex scan, then cut into units by offset arithmetic (no Python str per unit)."""
    if not len(texts):
        return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
    joined = bytes([_RECORD_SEP]).join(texts.cast(pa.binary()).to_pylist())
    if opts.unit != "document":
        joined = _BLANK_LINE_ASCII.sub(bytes([_PIECE_SEP]), joined)
    folded = fold_ascii_whitespace(joined)
    arr = np.frombuffer(folded, dtype=np.uint8)
    seps = np.flatnonzero(arr >= _RECORD_SEP)
    record_of_piece = np.concatenate([[0], np.cumsum(arr[seps] == _RECORD_SEP)])
    cuts = seps
    if opts.unit == "sentence":
        spaces = ascii_sentence_cuts(folded)
        cuts = np.sort(np.concatenate([seps, spaces]), kind="stable")  # two sorted runs: a merge
    removed = np.sort(np.concatenate([cuts, _edge_spaces(arr, seps)]), kind="stable")
    keep = np.ones(len(arr), dtype=bool)
    keep[removed] = False
    out = arr[keep]
    if opts.lowercase:
        out = np.frombuffer(out.tobytes().lower(), dtype=np.uint8)  # ASCII: normalize_text's lowercasing
    offsets = np.concatenate([[0], cuts - np.searchsorted(removed, cuts), [len(out)]]).astype(np.int32)
    starts = np.concatenate([[0], cuts + 1])  # each unit's first byte in arr
    owner = record_of_piece[np.searchsorted(seps, starts)]
    units = pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(out))
    return units, owner.astype(np.int64)


def _edge_spaces(arr: np.ndarray, seps: np.ndarray) -> np.ndarray:
    """The spaces at the ends of the pieces (normalize_text strips them), in order, once each."""
    ends = np.concatenate([[0], (seps[:, None] + [-1, 1]).ravel(), [len(arr) - 1]])  # sorted
    ends = ends[(ends >= 0) & (ends < len(arr))]
    ends = ends[arr[ends] == 0x20]
    return ends[np.concatenate([[True], ends[1:] != ends[:-1]])] if len(ends) else ends


class HashIndex:
    """A set of uint64 keys kept as a few sorted numpy runs (a log-structured merge).

    8 bytes per key, amortised O(log n) per insert: a Python set of ints would cost ~70
    bytes per key, which is what bounds ingest memory on a large corpus.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """Insert ``keys``; True where a key is seen for the first time (first in batch order)."""
        first = np.zeros(len(keys), dtype=bool)
        if not len(keys):
            return first
        uniq, idx = np.unique(keys, return_index=True)
        new = np.ones(len(uniq), dtype=bool)
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, uniq), len(run) - 1)
            new &= run[pos] != uniq
        first[idx[new]] = True
        if new.any():
            self.runs.append(uniq[new])
        # merge while the newest run is at least half the size of the one before it
        while len(self.runs) > 1 and 2 * len(self.runs[-1]) >= len(self.runs[-2]):
            b, a = self.runs.pop(), self.runs.pop()
            self.runs.append(np.sort(np.concatenate([a, b]), kind="stable"))  # two runs: timsort merges
        return first


class ShardWriter:
    """zstd Parquet shards ``part-00000.parquet``... each kept under ``max_bytes``.

    Rows are buffered into row groups of ``row_group_bytes`` (uncompressed); a shard is
    closed before a row group that could push it past the limit (the uncompressed size
    bounds the compressed one: no dictionary on the unique columns).
    """

    def __init__(self, out_dir: Path, max_bytes: int, schema: pa.Schema = SCHEMA,
                 name: str = "part-{:05d}.parquet") -> None:
        """``name``: the shard file names, formatted with the shard's number (0, 1, ...)."""
        self.out_dir, self.max_bytes, self.schema, self.name = out_dir, max_bytes, schema, name
        self.row_group_bytes = min(32 << 20, max_bytes // 4)
        self.margin = min(256 << 10, max_bytes // 16)  # footer and page headers
        self.buf: list[pa.RecordBatch] = []
        self.buf_bytes = 0
        self.shards: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self.buf.append(batch)
            self.buf_bytes += batch.nbytes
            if self.buf_bytes >= self.row_group_bytes:
                self._flush()

    def _flush(self) -> None:
        table = pa.Table.from_batches(self.buf, self.schema)
        self.buf, self.buf_bytes = [], 0
        step = max(1, int(table.num_rows * self.row_group_bytes / max(table.nbytes, 1)))
        for start in range(0, table.num_rows, step):
            piece = table.slice(start, step)
            if self._sink is not None and self._sink.tell() + piece.nbytes + self.margin > self.max_bytes:
                self._close_shard()
            if self._writer is None:
                path = self.out_dir / self.name.format(len(self.shards))
                self._sink = pa.OSFile(str(path), "wb")
                # page checksums (CRC32): a flipped bit in a shard fails the read instead of passing
                self._writer = pq.ParquetWriter(self._sink, self.schema, compression="zstd",
                                                use_dictionary=["split"], write_statistics=["split"],
                                                write_page_checksum=True)
                self.shards.append({"name": path.name})
            self._writer.write_table(piece, row_group_size=piece.num_rows)
            self._rows += piece.num_rows

    def _close_shard(self) -> None:
        assert self._writer is not None and self._sink is not None
        self._writer.close()
        self.shards[-1].update(rows=self._rows, bytes=self._sink.tell())
        self._sink.close()
        self._writer, self._sink, self._rows = None, None, 0

    def close(self) -> list[dict[str, Any]]:
        if self.buf:
            self._flush()
        if self._writer is not None:
            self._close_shard()
        return self.shards


class GivenSplits:
    """The splits of ``split_from: files | column:NAME``: the ``_split`` column of each raw batch.

    Built (and every file checked) before anything is read: a file that no pattern or name
    places, or a .txt file where a column is asked for, is an error naming it.
    """

    def __init__(self, cfg: IngestConfig, files: list[InputFile]) -> None:
        self.column = cfg.split_column
        self.drop_column = self.column is not None and self.column not in cfg.keep_columns
        self.by_file: dict[Path, str] = {}
        for f in files:
            if self.column is not None and f.kind == "txt":
                raise InputError(f"{f.label}: .txt inputs have no columns; ingest.split_from: "
                                 f"column:{self.column} needs .jsonl, .csv, .tsv or .parquet inputs")
            if self.column is None:
                self.by_file[f.path] = file_split(f, cfg.split_files)

    def read_keep(self, keep: tuple[str, ...]) -> tuple[str, ...]:
        """What the readers must read: the kept columns, plus the split column."""
        return keep if self.column is None or self.column in keep else (*keep, self.column)

    def split_array(self, f: InputFile, sources: pa.StringArray, names: list[str],
                    kept: list[pa.Array]) -> pa.Array:
        """The given split of each record of one raw batch (strings train | valid | test)."""
        if self.column is None:
            return pa.array([self.by_file[f.path]] * len(sources), pa.string())
        values = kept[names.index(self.column)]
        if pa.types.is_dictionary(values.type) or pa.types.is_large_string(values.type):
            values = values.cast(pa.string())
        ok = pc.fill_null(pc.is_in(values, pa.array(SPLITS)), False) if pa.types.is_string(values.type) \
            else pa.array([False] * len(values))
        if not pc.all(ok).as_py() and len(values):
            i = ok.to_pylist().index(False)
            raise InputError(f"{sources[i].as_py()}: ingest.split_from column:{self.column}: value "
                             f"{values[i].as_py()!r} is not train, valid or test")
        return values.cast(pa.string())


def file_split(f: InputFile, patterns: dict[str, list[str]]) -> str:
    """The split of a whole file (``split_from: files``): the split whose ``split_files``
    pattern matches its name (or its path as ``ingest.inputs`` names it); with no patterns,
    the one of train/valid/test among the parts of its name (``ptb.train.txt``: train)."""
    name = f.path.name
    if patterns:
        hits = {s for s, pats in patterns.items() for p in pats if fnmatchcase(name, p) or fnmatchcase(f.label, p)}
        how = "matches ingest.split_files patterns of"
    else:
        kind, comp = kind_of(name)
        stem = name.lower()
        for _ in range((comp is not None) + (kind is not None)):
            stem = os.path.splitext(stem)[0]  # ptb.train.txt.gz -> ptb.train
        hits = {p for p in _NAME_PARTS.split(stem) if p in SPLITS}
        how = "names"
    if len(hits) != 1:
        found = f"{how} {' and '.join(sorted(hits))}" if hits else f"{how} no split"
        raise InputError(f"{f.label}: ingest.split_from: files: the file {found}; name it *train*, "
                         "*valid* or *test*, or list it under one split in ingest.split_files")
    return hits.pop()


def corpus_batch(out: pa.RecordBatch, splits: dict[str, int], counts: Counter[str]) -> pa.RecordBatch:
    """``transform_batch``'s rows that survived de-duplication -> corpus rows (the given split
    in place of the hashed one, ``_key`` dropped); ``splits`` and ``counts["text_bytes_out"]``
    grow by them."""
    out = _use_given_split(out).drop_columns(["_key"])
    for vc in pc.value_counts(out.column("split")).to_pylist():
        splits[vc["values"]] += vc["counts"]
    counts["text_bytes_out"] += _utf8_bytes(out.column("text"))
    return out


def file_runs(files: list[InputFile], max_bytes: int) -> list[tuple[int, int]]:
    """``files`` cut into runs of consecutive files of about ``max_bytes`` each, as
    ``(start, stop)`` indices: the work items of an engine that writes shards per item (10k
    tiny files do not make 10k shards; one file larger than ``max_bytes`` is a run alone)."""
    runs: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, f in enumerate(files):
        n = f.path.stat().st_size
        if i > start and size + n > max_bytes:
            runs.append((start, i))
            start, size = i, 0
        size += n
    if files:
        runs.append((start, len(files)))
    return runs


def _use_given_split(out: pa.RecordBatch) -> pa.RecordBatch:
    """``split`` replaced by the given ``_split``, when the raw records carried one."""
    if GIVEN_SPLIT not in out.schema.names:
        return out
    out = out.set_column(out.schema.get_field_index("split"), "split", out.column(GIVEN_SPLIT))
    return out.drop_columns([GIVEN_SPLIT])


@dataclass(frozen=True)
class IngestResult:
    corpus: Path
    shards: list[Path]
    stats: dict[str, Any]

    @property
    def records(self) -> int:
        return int(self.stats["records_out"])


def _utf8_bytes(arr: pa.Array) -> int:
    return int(pc.sum(pc.binary_length(arr)).as_py() or 0)


def raw_batches(files: list[InputFile], readers: Readers, counts: Counter[str],
                given: GivenSplits | None = None) -> Iterator[pa.RecordBatch]:
    """Raw record batches of ``files``: ``text``, ``source``, then the kept columns (and
    ``_split`` with ``given`` splits); ``readers`` count what they read, ``counts["text_bytes_in"]``
    grows by their text bytes."""
    names = [*RAW_COLUMNS, *readers.opts.keep]
    for f in files:
        for text, sources, kept in readers.read_arrays(f):
            counts["text_bytes_in"] += _utf8_bytes(text)
            cols, col_names = [text, sources, *kept], names
            if given is not None:
                cols, col_names = [*cols, given.split_array(f, sources, names[2:], kept)], [*names, GIVEN_SPLIT]
                if given.drop_column:  # read for the split only, not a kept column
                    i = col_names.index(given.column)  # type: ignore[arg-type]
                    cols, col_names = cols[:i] + cols[i + 1:], col_names[:i] + col_names[i + 1:]
            yield pa.record_batch(cols, names=col_names)


def _transformed(raw: Iterator[pa.RecordBatch], opts: TransformOptions) -> TransformedStream:
    """transform_batch over ``raw``, in order, here (``ingest.workers: 1``)."""
    for rb in raw:
        yield transform_batch(rb, opts)


TransformedStream = Iterator[tuple[pa.RecordBatch, dict[str, int]]]
# (files, readers, options, counts, given splits) -> transform_batch's outputs over the files' records,
# in input order
TransformFiles = Callable[[list[InputFile], Readers, TransformOptions, Counter[str], "GivenSplits | None"],
                          TransformedStream]


@dataclass(frozen=True)
class IngestPlan:
    """What a run reads, and how: the input files in order and the options of every step."""

    files: list[InputFile]
    skipped: list[Any]
    opts: TransformOptions
    given: GivenSplits | None
    read_opts: ReadOptions
    kept: pa.Schema  # the kept columns of the corpus

    @property
    def schema(self) -> pa.Schema:
        return corpus_schema(self.kept)


@dataclass
class Written:
    """What writing the corpus shards gave: ``counts`` (read, transform and drop counts,
    ``text_bytes_in``/``text_bytes_out``), records per split, the shards (name, rows, bytes)
    in corpus order, and the bytes of the driver's de-duplication index."""

    counts: Counter[str]
    splits: dict[str, int]
    shards: list[dict[str, Any]]
    dedup_index_bytes: int


# (plan, staging directory) -> the shards written there and their counts
WriteCorpus = Callable[[IngestPlan, Path], Written]


def run(params: Params, *, wait: bool = False, transform_files: TransformFiles | None = None,
        write_corpus: WriteCorpus | None = None) -> IngestResult:
    """Read ``ingest.inputs``, write the corpus to ``paths.corpus`` (atomically), return stats.

    Holds the write lock of ``paths.corpus`` while it runs (``--wait``: ``wait=True``).
    ``transform_files``: where reading and ``transform_batch`` run (default: here, with
    ``ingest.workers`` processes). Its counts hold what it read (``text_bytes_in`` and, where
    it used readers of its own, their stats); de-duplication and the shards are then this
    process's. ``write_corpus``: all of it elsewhere (the Ray engine: its workers read,
    de-duplicate and write the shards into the staging directory it is given); the stats
    file and the atomic swap stay here.
    """
    with staged(params, "ingest") as params, output_locks(stage_outputs(params, "ingest"), wait=wait):
        if write_corpus is not None:
            return _run(params, write_corpus)
        if transform_files is not None:
            return _run(params, _write_stream(transform_files, params))
        with _local_transform(params) as local:  # workers start here, while _run lists the inputs
            return _run(params, _write_stream(local, params))


@contextmanager
def _local_transform(params: Params) -> Iterator[TransformFiles]:
    """The ``TransformFiles`` of this machine: here with ``ingest.workers: 1``, else a pool of
    that many worker processes (0: one per CPU), started now and ended on leaving."""
    workers = params.ingest.workers or (os.cpu_count() or 1)
    if workers <= 1:
        def transform(files: list[InputFile], readers: Readers, opts: TransformOptions,
                      counts: Counter[str], given: GivenSplits | None) -> TransformedStream:
            return _transformed(raw_batches(files, readers, counts, given), opts)

        yield transform
        return
    from vaepipe.stages.ingest_workers import WorkerPool  # the worker processes import this module

    pool = WorkerPool(workers, Path(params.paths.corpus), keep_validity=not params.ingest.dedup)
    try:
        yield pool.transform
    finally:
        pool.close()


def read_options(params: Params, files: list[InputFile], given: GivenSplits | None = None) -> ReadOptions:
    """The read options of a run over ``files`` (with ``given`` splits' column, if any), kept
    columns' types decided (and missing columns refused) up front."""
    read_opts = ReadOptions.from_config(params.ingest)
    if given is not None:
        read_opts = dataclasses.replace(read_opts, keep=given.read_keep(read_opts.keep))
    return dataclasses.replace(read_opts, keep_schema=kept_schema(files, read_opts))


def plan(params: Params) -> IngestPlan:
    """The plan of a run of ``params``: inputs found (minus any inside ``paths.corpus``) and
    checked, given splits placed, kept columns' types decided."""
    cfg = params.ingest
    final = Path(params.paths.corpus)
    found, skipped = find_inputs(cfg.inputs, cfg.on_unreadable)
    files = [f for f in found if not f.path.resolve().is_relative_to(final.resolve())]
    given = GivenSplits(cfg, files) if cfg.split_from != "hash" else None
    read_opts = read_options(params, files, given)
    kept = pa.schema([fld for fld in read_opts.keep_schema or [] if fld.name in cfg.keep_columns])
    return IngestPlan(files, skipped, TransformOptions.from_config(cfg), given, read_opts, kept)


def _write_stream(transform_files: TransformFiles, params: Params) -> WriteCorpus:
    """The corpus written here from ``transform_files``' stream: de-duplicated in input order
    with a ``HashIndex``, cut into ``part-00000.parquet``... by one ``ShardWriter``."""
    cfg = params.ingest

    def write(p: IngestPlan, tmp: Path) -> Written:
        counts: Counter[str] = Counter()
        readers = Readers(p.read_opts)
        index = HashIndex()
        splits = dict.fromkeys(SPLITS, 0)
        writer = ShardWriter(tmp, cfg.shard_max_bytes, p.schema)
        for out, c in transform_files(p.files, readers, p.opts, counts, p.given):
            counts.update(c)
            if cfg.dedup:
                first = index.add_new(out.column("_key").to_numpy())
                counts["duplicate"] += int(len(first) - first.sum())
                out = out.filter(pa.array(first))
            writer.write(corpus_batch(out, splits, counts))
        shards = writer.close()
        counts.update(readers.stats.as_dict())  # too_long adds to transform_batch's count
        return Written(counts, splits, shards, index.nbytes)

    return write


def _run(params: Params, write_corpus: WriteCorpus) -> IngestResult:
    cfg = params.ingest
    final = Path(params.paths.corpus)
    p = plan(params)
    files, skipped = p.files, p.skipped
    t0 = time.perf_counter()
    with atomic_dir(final) as tmp:
        written = write_corpus(p, tmp)
        counts, splits, shards = written.counts, written.splits, written.shards
        records_out = sum(splits.values())
        stats = {
            "unit": cfg.unit,
            "inputs": list(cfg.inputs),
            "files": len(files),
            "empty_files": counts["empty_files"],
            "records_in": counts["records_in"],
            "units": counts["units"],
            "records_out": records_out,
            "splits": splits,
            "dropped": {r: counts[r] for r in DROP_REASONS},
            "decode_replaced": counts["decode_replaced"],
            "nul_bytes": counts["nul_bytes"],
            "unreadable": len(skipped),
            "bytes_in": sum(f.path.stat().st_size for f in files),
            "text_bytes_in": counts["text_bytes_in"],
            "text_bytes_out": counts["text_bytes_out"],
            "bytes_out": sum(s["bytes"] for s in shards),
            "dedup_index_bytes": written.dedup_index_bytes,
            "shards": shards,
        }
        if records_out == 0:
            raise InputError(f"ingest: no records left from {len(files)} file(s) (dropped: "
                             + ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v)
                             + "); check ingest.inputs, ingest.unit, ingest.min_chars, ingest.max_chars")
        write_json(tmp / STATS_FILE, stats)
    secs = time.perf_counter() - t0
    log.info("ingest: %d files, %.1f MB of text -> %d records (%s) in %.1f s; dropped %s",
             len(files), stats["text_bytes_in"] / 1e6, records_out, splits, secs, stats["dropped"])
    return IngestResult(final, [final / s["name"] for s in shards], stats)
