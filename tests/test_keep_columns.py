"""ingest.keep_columns: input columns carried through corpus and tokens into the embeddings.

The round trips reuse the session's tiny trained model (``trained_model``, read only): each
test ingests its own inputs, tokenizes them with the model's tokenizer (tokenize.tokenizer_path)
and exports them with the model, all under tmp_path.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from vaepipe.core.config import Params, load_params
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.core.text import normalize_text
from vaepipe.stages import embed, ingest, tokenize

from conftest import FIXTURE_CORPUS, make_tiny_params

DOCS = Path(__file__).resolve().parents[1] / "docs"


def records(n: int = 60) -> list[dict[str, Any]]:
    """Paragraphs of the fixture speeches (several sentences each) with metadata of many types."""
    paras: list[str] = []
    for f in sorted(FIXTURE_CORPUS.glob("*.txt")):
        paras += [p.replace("\n", " ") for p in re.split(r"\n\s*\n", f.read_text()) if len(p) > 80]
    return [{"text": p, "article_id": 1000 + i, "title": f"title {i}", "score": i / 4,
             "tags": [f"t{i % 3}"], "flag": i % 2 == 0} for i, p in enumerate(paras[:n])]


def write_jsonl(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def write_csv(path: Path, recs: list[dict[str, Any]]) -> Path:
    cols = ["text", "article_id", "title"]
    pcsv.write_csv(pa.table({c: [str(r[c]) for r in recs] for c in cols}), path)
    return path


def write_parquet(path: Path, recs: list[dict[str, Any]]) -> Path:
    table = pa.table({
        "text": [r["text"] for r in recs],
        "article_id": pa.array([r["article_id"] for r in recs], pa.int32()),
        "title": [r["title"] for r in recs],
        "date": pa.array([dt.date(2020, 1, 1) + dt.timedelta(days=r["article_id"]) for r in recs], pa.date32()),
    })
    pq.write_table(table, path)
    return path


def corpus_table(params: Params) -> pa.Table:
    return pq.read_table(params.paths.corpus)


def ingest_params(root: Path, inputs: list[Path], keep: list[str], *extra: str) -> Params:
    return make_tiny_params(root, [f"ingest.inputs={json.dumps([str(p) for p in inputs])}",
                                   f"ingest.keep_columns={json.dumps(keep)}", *extra])


def source_row(source: str) -> int:
    """The record number in a corpus row's `source` (``FILE:N``)."""
    return int(source.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------------
# Round trip: inputs -> corpus -> tokens -> embeddings

FORMATS = {
    # kind: (writer, kept columns, expected Arrow types, how `source` numbers a record)
    "jsonl": (write_jsonl, ["article_id", "title", "score", "tags", "flag"],
              {"article_id": pa.int64(), "title": pa.string(), "score": pa.float64(),
               "tags": pa.list_(pa.string()), "flag": pa.bool_()}, lambda n: n - 1),
    "csv": (write_csv, ["article_id", "title"], {"article_id": pa.string(), "title": pa.string()},
            lambda n: n - 2),
    "parquet": (write_parquet, ["article_id", "title", "date"],
                {"article_id": pa.int32(), "title": pa.string(), "date": pa.date32()}, lambda n: n - 1),
}


def expected_value(kind: str, rec: dict[str, Any], name: str) -> Any:
    if kind == "csv":
        return str(rec[name])
    if name == "date":
        return dt.date(2020, 1, 1) + dt.timedelta(days=rec["article_id"])
    return rec[name]


@pytest.mark.parametrize("kind", FORMATS)
def test_round_trip_values_and_types_per_doc_id(kind: str, trained_model: Params, tmp_path: Path) -> None:
    write, keep, types, index = FORMATS[kind]
    recs = records()
    src = write(tmp_path / f"articles.{kind}", recs)
    params = ingest_params(tmp_path, [src], keep)
    params = params.replace(paths={"model": trained_model.paths.model},
                            tokenize={"tokenizer_path": trained_model.paths.tokenizer})
    ingest.run(params)
    tokenize.run(params)
    embed.run(params)

    corpus = corpus_table(params)
    assert corpus.schema.names == ["doc_id", "text", "split", "source", *keep]
    assert {n: corpus.schema.field(n).type for n in keep} == types
    # each corpus row (a sentence) carries the values of the record it came from
    per_doc: dict[str, dict[str, Any]] = {}
    for row in corpus.to_pylist():
        rec = recs[index(source_row(row["source"]))]
        assert row["text"] in normalize_text(rec["text"])
        assert {n: row[n] for n in keep} == {n: expected_value(kind, rec, n) for n in keep}
        per_doc[row["doc_id"]] = {n: row[n] for n in keep}
    assert len(per_doc) > len(recs)  # sentences: several corpus rows per record

    for out in (params.paths.tokens, params.paths.embeddings):
        table = pq.read_table(out)
        assert table.schema.names[-len(keep):] == keep
        assert {n: table.schema.field(n).type for n in keep} == types
        assert table.num_rows > 0
        for row in table.select(["doc_id", *keep]).to_pylist():
            assert {n: row[n] for n in keep} == per_doc[row["doc_id"]]
    # the embeddings keep the token files' row order, and their own columns in front
    emb = pq.read_table(params.paths.embeddings)
    assert emb.schema.names[:4] == ["doc_id", "split", "mu", "n_tokens"]
    tok = pq.read_table(params.paths.tokens)
    assert emb.column("doc_id").to_pylist() == tok.column("doc_id").to_pylist()


def test_docs_duckdb_join_runs(trained_model: Params, tmp_path: Path, monkeypatch) -> None:
    """The join example of docs/stages/embed.md, run as written from a project folder."""
    recs = records(200)
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "articles.jsonl", recs)
    pq.write_table(pa.table({"article_id": [r["article_id"] for r in recs],
                             "author": [f"author {r['article_id'] % 7}" for r in recs]}), "authors.parquet")
    params = load_params(None, [
        "ingest.inputs=[articles.jsonl]", "ingest.keep_columns=[article_id, title]",
        f"paths.model={trained_model.paths.model}", f"tokenize.tokenizer_path={trained_model.paths.tokenizer}",
        "ingest.valid_fraction=0.1", "ingest.test_fraction=0.1", "tokenize.overlong=truncate", "embed.device=cpu",
        "tracking.enabled=false"])
    ingest.run(params)
    tokenize.run(params)
    embed.run(params)

    text = (DOCS / "stages" / "embed.md").read_text()
    block = text.split("## Joining the vectors to your data", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(compile(block, "docs/stages/embed.md", "exec"), scope)  # noqa: S102 - our own documentation
    df = scope["df"]
    corpus = corpus_table(params).to_pandas()
    test_rows = corpus[corpus.split == "test"]
    assert len(df) == len(test_rows) > 0
    authors = {r["article_id"]: f"author {r['article_id'] % 7}" for r in recs}
    titles = dict(zip(corpus.doc_id, corpus.title, strict=True))
    for row in df.itertuples():
        assert row.author == authors[row.article_id]
        assert row.title == titles[row.doc_id]
        assert len(row.mu) == trained_model.model.latent_dim


# ---------------------------------------------------------------------------------------
# Ingest alone: missing columns, nulls, clashes, types, dedup, workers


def test_missing_column_is_one_line_naming_file_and_column(tmp_path: Path) -> None:
    recs = records(10)
    good = write_jsonl(tmp_path / "a.jsonl", recs)
    csv_file = write_csv(tmp_path / "b.csv", recs)
    txt = tmp_path / "c.txt"
    txt.write_text("A plain text file has no columns of its own at all.\n")
    with pytest.raises(InputError) as e:
        ingest.run(ingest_params(tmp_path, [good, csv_file], ["score"]))
    msg = str(e.value)
    assert "\n" not in msg and str(csv_file) in msg and "'score'" in msg and "missing_columns" in msg
    with pytest.raises(InputError, match=r"c\.txt: no column 'title'.*\.txt inputs have no columns"):
        ingest.run(ingest_params(tmp_path, [good, txt], ["title"]))
    assert not Path(make_tiny_params(tmp_path).paths.corpus).exists()  # nothing written


def test_null_mode_fills_nulls_with_the_type_of_the_files_that_have_it(tmp_path: Path) -> None:
    recs = records(10)
    txt = tmp_path / "c.txt"
    txt.write_text("A plain text file has no columns of its own at all, so it gets nulls.\n")
    params = ingest_params(tmp_path, [txt, write_jsonl(tmp_path / "a.jsonl", recs)], ["article_id", "nowhere"],
                           "ingest.missing_columns=null")
    ingest.run(params)
    corpus = corpus_table(params)
    assert corpus.schema.field("article_id").type == pa.int64()
    assert corpus.schema.field("nowhere").type == pa.null()
    rows = corpus.to_pylist()
    from_txt = [r for r in rows if r["source"].startswith(str(txt))]
    assert from_txt and all(r["article_id"] is None and r["nowhere"] is None for r in from_txt)
    assert all(r["article_id"] is not None for r in rows if r not in from_txt)


def test_null_typed_column_reaches_the_embeddings(trained_model: Params, tmp_path: Path) -> None:
    params = ingest_params(tmp_path, [write_jsonl(tmp_path / "a.jsonl", records())], ["title", "nowhere"],
                           "ingest.missing_columns=null")
    params = params.replace(paths={"model": trained_model.paths.model},
                            tokenize={"tokenizer_path": trained_model.paths.tokenizer})
    ingest.run(params)
    tokenize.run(params)
    embed.run(params)
    emb = pq.read_table(params.paths.embeddings)
    assert emb.schema.field("nowhere").type == pa.null() and emb.column("nowhere").null_count == emb.num_rows
    assert emb.column("title").null_count == 0


@pytest.mark.parametrize("name", ["doc_id", "text", "split", "source", "ids", "n_tokens", "mu", "logvar", "_key"])
def test_names_that_clash_with_the_pipeline_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match=r"ingest\.keep_columns\[1\]"):
        load_params(None, [f"ingest.keep_columns=[title, {name}]"])


def test_a_name_twice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="named twice"):
        load_params(None, ["ingest.keep_columns=[title, title]"])


def test_cli_clash_exits_2_with_one_line(capsys) -> None:
    from vaepipe.cli import main

    assert main(["ingest", "--set", "ingest.keep_columns=[doc_id]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ingest.keep_columns[0]" in err and "doc_id" in err and "Traceback" not in err


def test_types_that_do_not_unify_name_both_files(tmp_path: Path) -> None:
    recs = records(10)
    a = write_jsonl(tmp_path / "a.jsonl", recs)
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "article_id": str(r["article_id"])} for r in recs])
    with pytest.raises(InputError) as e:
        ingest.run(ingest_params(tmp_path, [a, b], ["article_id"]))
    msg = str(e.value)
    assert "\n" not in msg and str(a) in msg and str(b) in msg and "int64" in msg and "string" in msg


def test_ints_and_floats_unify_to_double_in_any_file_order(tmp_path: Path) -> None:
    recs = records(10)
    a = write_jsonl(tmp_path / "a.jsonl", recs[:5])
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "article_id": r["article_id"] + 0.5} for r in recs[5:]])
    for order in ([a, b], [b, a]):
        params = ingest_params(tmp_path / "x", order, ["article_id"])
        ingest.run(params)
        assert corpus_table(params).schema.field("article_id").type == pa.float64()


def test_a_field_with_mixed_types_in_one_file_is_an_error(tmp_path: Path) -> None:
    recs = records(4)
    recs[2]["title"] = 7
    with pytest.raises(InputError, match=r"a\.jsonl: field 'title'"):
        ingest.run(ingest_params(tmp_path, [write_jsonl(tmp_path / "a.jsonl", recs)], ["title"]))


def test_dedup_keeps_the_first_occurrence_columns(tmp_path: Path) -> None:
    text = "This one sentence appears in two records with different titles."
    recs = [{"text": text, "title": "first"}, {"text": "Another sentence that is unique to itself.", "title": "x"},
            {"text": text, "title": "second"}]
    params = ingest_params(tmp_path, [write_jsonl(tmp_path / "a.jsonl", recs)], ["title"])
    ingest.run(params)
    rows = {r["text"]: r["title"] for r in corpus_table(params).to_pylist()}
    assert rows[text] == "first"


def test_workers_2_equals_workers_1(tmp_path: Path) -> None:
    recs = records()
    inputs = [write_jsonl(tmp_path / "a.jsonl", recs[:30]), write_parquet(tmp_path / "b.parquet", recs[30:])]
    tables = []
    for w in (1, 2):
        params = ingest_params(tmp_path / f"w{w}", inputs, ["article_id", "title"], f"ingest.workers={w}")
        ingest.run(params)
        tables.append(corpus_table(params))
    assert tables[0].schema.field("article_id").type == pa.int64()  # int32 (Parquet) + int64 (JSONL)
    assert tables[0].equals(tables[1])


def test_no_kept_columns_leaves_every_schema_as_it_was(built_tokens: Params) -> None:
    corpus = pq.read_schema(next(Path(built_tokens.paths.corpus).glob("*.parquet")))
    tokens = pq.read_schema(next(Path(built_tokens.paths.tokens).glob("*.parquet")))
    assert corpus.names == ["doc_id", "text", "split", "source"]
    assert tokens.names == ["doc_id", "split", "ids", "n_tokens"]
