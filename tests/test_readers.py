"""Readers (vaepipe/stages/readers.py): one reader per input kind, each counting what it read.

The counts are checked against a second computation on the same bytes (the standard library's
json/csv, Arrow's Parquet reader, plain splitting), and against what ingest writes to _stats.json.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_tiny_params
from vaepipe.core.config import IngestConfig
from vaepipe.core.errors import InputError
from vaepipe.stages import ingest
from vaepipe.stages.readers import (
    KINDS,
    READERS,
    CsvReader,
    InputFile,
    JsonlReader,
    ParquetReader,
    Readers,
    ReadOptions,
    ReadStats,
    TextReader,
    resolve_inputs,
)

TXT = (b"\nA good first line.\n\n   \nBad \xff\xfe bytes in this one.\nAnother good line.\r\n"
       b"Also \xc3 bad.\n\nLast line, no newline")
JSONL = (b'{"text": "Hello there."}\n\n{"text": "raw \xff byte"}\n{"text": null}\n'
         b'{"text": "escaped \\udc80 surrogate"}\n   \n{"text": "Fine."}\n')
CSV = (b'id,text\n1,"Line one, quoted."\n2,"Two\nlines \xfe here."\n3,\n4,Plain text.\n'
       b'5,"bad \xff\xff again"\n')


def _parquet(path: Path) -> None:
    pq.write_table(pa.table({"text": pa.array([b"ok bytes", b"bad \xff bytes", None, b"", b"also ok"],
                                              pa.binary())}), path)


def _fixture(root: Path) -> Path:
    d = root / "in"
    d.mkdir()
    (d / "a.txt").write_bytes(TXT)
    (d / "b.txt.gz").write_bytes(gzip.compress(TXT))
    (d / "c.jsonl").write_bytes(JSONL)
    (d / "d.csv").write_bytes(CSV)
    (d / "e.tsv").write_bytes(CSV.replace(b",", b"\t"))
    _parquet(d / "f.parquet")
    (d / "g.txt").write_bytes(b"")
    (d / "h.csv").write_bytes(b"  \n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "i.parquet")
    return d


def _opts(**kw: object) -> ReadOptions:
    return ReadOptions.from_config(IngestConfig(**kw))  # type: ignore[arg-type]


def _bad(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _expected(path: Path) -> tuple[int, int]:
    """(records, records with invalid UTF-8) of one file of the fixture, computed without vaepipe."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes() \
        if path.suffix != ".parquet" else b""
    kind = KINDS[Path(path.name.removesuffix(".gz")).suffix]
    if kind == "txt":  # unit line: every non-blank line
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        return len(lines), sum(map(_bad, lines))
    if kind == "jsonl":
        texts = [json.loads(ln.decode("utf-8", "surrogateescape")).get("text") or ""
                 for ln in data.split(b"\n") if ln.strip()]
        return len(texts), sum(any("\udc80" <= c <= "\udcff" for c in t) for t in texts)
    if kind in ("csv", "tsv"):
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""),
                                   delimiter="\t" if kind == "tsv" else ","))
        return len(rows), sum(_bad(r["text"].encode("utf-8", "surrogateescape")) for r in rows)
    values = pq.read_table(path).column("text").to_pylist()
    return len(values), sum(_bad(v or b"") for v in values)


@pytest.mark.parametrize("policy", ["replace", "drop"])
def test_each_reader_counts_records_and_bad_bytes_like_a_second_count(tmp_path: Path, policy: str) -> None:
    d = _fixture(tmp_path)
    readers = Readers(_opts(unit="line", on_decode_error=policy))
    seen: dict[str, int] = {}
    for f in resolve_inputs([str(d)]):
        reader = readers.reader(f.kind)
        before = ReadStats(**reader.stats.as_dict())
        records = sum(len(texts) for texts, _ in readers.read(f))
        n, bad = _expected(f.path)
        got = reader.stats.as_dict()
        delta = {k: got[k] - v for k, v in before.as_dict().items()}
        assert delta["records_in"] == n, f.label
        assert (delta["undecodable"], delta["decode_replaced"]) == ((bad, 0) if policy == "drop" else (0, bad))
        assert records == n - delta["undecodable"], f.label
        assert delta["empty_files"] == (n == 0), f.label
        seen[f.kind] = seen.get(f.kind, 0) + n
    assert set(readers.by_kind) == {"txt", "jsonl", "csv", "tsv", "parquet"}
    assert {k: r.stats.records_in for k, r in readers.by_kind.items()} == seen
    assert readers.stats == sum((r.stats for r in readers.by_kind.values()), ReadStats())
    assert readers.stats.empty_files == 3


def test_one_reader_per_kind_compressed_files_share_it(tmp_path: Path) -> None:
    d = _fixture(tmp_path)
    assert set(READERS) == set(KINDS.values())
    assert (READERS["txt"], READERS["jsonl"], READERS["csv"], READERS["tsv"], READERS["parquet"]) == \
        (TextReader, JsonlReader, CsvReader, CsvReader, ParquetReader)
    readers = Readers(_opts(unit="line"))
    plain, packed = (InputFile(d / n, n, "txt", c) for n, c in (("a.txt", None), ("b.txt.gz", "gzip")))
    a = list(readers.read(plain))
    b = list(readers.read(packed))
    assert a[0][0] == b[0][0] and list(readers.by_kind) == ["txt"]
    assert readers.stats.records_in == 2 * _expected(d / "a.txt")[0]


def test_long_document_is_dropped_while_read_and_counted(tmp_path: Path) -> None:
    f = tmp_path / "long.txt"
    f.write_bytes(b"A line of a very long document.\n" * 40000)  # over the 1 MB read-ahead limit
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"A line with a bad \xff byte.\n" * 50000)
    reader = TextReader(_opts(unit="document", max_chars=300))
    assert list(reader.read(InputFile(f, f.name, "txt", None))) == []
    assert reader.stats == ReadStats(records_in=1, too_long=1)
    drop = TextReader(_opts(unit="document", max_chars=300, on_decode_error="drop"))
    assert list(drop.read(InputFile(bad, bad.name, "txt", None))) == []
    assert drop.stats == ReadStats(records_in=1, undecodable=1)


@pytest.mark.parametrize("policy", ["replace", "drop"])
def test_ingest_stats_are_the_readers_stats(tmp_path: Path, policy: str) -> None:
    d = _fixture(tmp_path)
    readers = Readers(_opts(unit="line", on_decode_error=policy))
    for f in resolve_inputs([str(d)]):
        for _ in readers.read(f):
            pass
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{json.dumps(str(d))}]", "ingest.min_chars=1",
                                         "ingest.unit=line", f"ingest.on_decode_error={policy}"])
    stats = ingest.run(params).stats
    want = readers.stats
    assert (stats["records_in"], stats["empty_files"], stats["decode_replaced"], stats["dropped"]["undecodable"]) \
        == (want.records_in, want.empty_files, want.decode_replaced, want.undecodable)


def _gzip_corrupt(p: Path, body: bytes) -> None:
    data = bytearray(gzip.compress(body))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    p.write_bytes(bytes(data[:-8]))


BAD = {
    "csv_column": ("t.csv", lambda p: p.write_bytes(b"id,body\n1,hello\n"), r"t\.csv:1: no column 'text' "
                   r"\(ingest\.text_column\); header: id, body$"),
    "csv_parse": ("q.csv", lambda p: p.write_bytes(b"text,b\n1,2,3\n"), r"q\.csv: cannot parse CSV: "),
    "csv_gzip": ("c.csv.gz", lambda p: _gzip_corrupt(p, b"text\n" + b"A line of text that compresses.\n" * 200000),
                 r"c\.csv\.gz: cannot read gzip data: "),
    "txt_gzip": ("c.txt.gz", lambda p: _gzip_corrupt(p, b"A line of text that compresses.\n" * 20000),
                 r"c\.txt\.gz: cannot read gzip data: "),
    "parquet": ("p.parquet", lambda p: p.write_bytes(b"PAR1 not really"), r"p\.parquet: not a readable Parquet file: "),
    "parquet_type": ("i.parquet", lambda p: pq.write_table(pa.table({"text": [1]}), p),
                     r"i\.parquet: column 'text' is int64, not text$"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_arrow_errors_become_one_line_input_errors(tmp_path: Path, case: str) -> None:
    name, make, pattern = BAD[case]
    make(tmp_path / name)
    (f,) = resolve_inputs([str(tmp_path / name)])
    with pytest.raises(InputError, match=pattern) as e:
        for _ in Readers(_opts()).read(f):
            pass
    assert "\n" not in str(e.value).strip()
