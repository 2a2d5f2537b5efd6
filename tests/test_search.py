"""vaepipe/stages/search.py: cosine search over an export and `vaepipe neighbors`.

Exports are made with vaepipe/stages/embed.py on the tiny trained model (helpers shared with
tests/test_embed.py); each goes to its own tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_embed import assert_one_line_error, mu_matrix, read_export, run_cli, with_embed, write_params
from vaepipe.cli import main
from vaepipe.core.config import Params
from vaepipe.stages import embed, search


@pytest.fixture(scope="module")
def base(trained_model: Params) -> Params:
    return trained_model


def corpus_texts(params: Params) -> dict[str, str]:
    corpus = pa.concat_tables(pq.read_table(f, columns=["doc_id", "text"])
                              for f in sorted(Path(params.paths.corpus).rglob("*.parquet")))
    return dict(zip(corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist(), strict=True))


# the query shown in docs/stages/embed.md
DUCKDB_TOP_K = """
SELECT doc_id, split, list_cosine_similarity(mu, $q::FLOAT[]) AS score
FROM read_parquet($files)
ORDER BY score DESC, doc_id
LIMIT $k
"""


def test_duckdb_top_k_equals_numpy_and_top_k_cosine(base, tmp_path):
    out = tmp_path / "emb"
    embed.run(with_embed(base, out, shard_rows=40, row_group_rows=16))
    table = read_export(out)
    mu = mu_matrix(table).astype(np.float64)
    q = mu[7] + 0.5 * mu[3]
    k = 10
    scores = mu @ q / (np.linalg.norm(mu, axis=1) * np.linalg.norm(q))
    want = np.argsort(-scores, kind="stable")[:k]
    rows = duckdb.connect().execute(
        DUCKDB_TOP_K, {"q": q.astype(np.float32).tolist(), "files": str(out / "*.parquet"), "k": k}).fetchall()
    ids = table.column("doc_id").to_pylist()
    assert [r[0] for r in rows] == [ids[i] for i in want]
    np.testing.assert_allclose([r[2] for r in rows], scores[want], atol=1e-5)
    # the streamed search used by `vaepipe neighbors` (heap over row groups) agrees too
    hits = search.top_k_cosine(sorted(out.glob("part-*.parquet")), q.astype(np.float32), k)
    assert [h[2] for h in hits] == [ids[i] for i in want] and [h[1] for h in hits] == want.tolist()


def test_top_k_cosine_small_random(tmp_path):
    rng = np.random.default_rng(3)
    mu = rng.standard_normal((257, 5)).astype(np.float32)
    mu[11] = 0.0  # a zero vector scores 0, never NaN
    ids = [f"d{i:03d}" for i in range(len(mu))]
    for j, sl in enumerate((slice(0, 100), slice(100, 257))):
        pq.write_table(pa.table({"doc_id": ids[sl], "split": ["train"] * len(ids[sl]),
                                 "mu": pa.FixedSizeListArray.from_arrays(pa.array(mu[sl].ravel()), 5)}),
                       tmp_path / f"part-{j:05d}.parquet", row_group_size=33)
    q = rng.standard_normal(5).astype(np.float32)
    s = (mu @ q) / np.maximum(np.linalg.norm(mu, axis=1), 1e-12) / np.linalg.norm(q)
    for k in (1, 5, 300):
        hits = search.top_k_cosine(sorted(tmp_path.glob("*.parquet")), q, k)
        want = np.argsort(-s, kind="stable")[:k]
        assert [h[1] for h in hits] == want.tolist()
        np.testing.assert_allclose([h[0] for h in hits], s[want], rtol=1e-5)


def test_neighbors_returns_ranked_documents_and_prints_nothing(base, tmp_path, capsys):
    params = with_embed(base, tmp_path / "emb")
    embed.run(params)
    texts = corpus_texts(base)
    query_id = read_export(tmp_path / "emb").column("doc_id")[5].as_py()
    capsys.readouterr()
    hits = search.neighbors(params, texts[query_id], k=3)
    assert capsys.readouterr().out == ""  # the CLI prints, the library does not
    assert [h.rank for h in hits] == [1, 2, 3]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.text == texts[h.doc_id] for h in hits)
    assert hits[0].score > 0.9999


def test_neighbors_cli_prints_ranked_documents_with_text(base, tmp_path, capsys):
    params = with_embed(base, tmp_path / "emb")
    embed.run(params)
    texts = corpus_texts(base)
    export_ids = set(read_export(tmp_path / "emb").column("doc_id").to_pylist())
    query_id = read_export(tmp_path / "emb").column("doc_id")[5].as_py()
    capsys.readouterr()
    rc = main(["-q", "neighbors", "  " + texts[query_id] + "\n", "-k", "4",
               "--params", str(write_params(params, tmp_path / "p.yaml"))])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 4
    rows = [line.split(maxsplit=4) for line in lines]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    for _, _, doc_id, split, text in rows:
        assert doc_id in export_ids and split in ("train", "valid", "test") and text == texts[doc_id]
    # the document itself is (one of) the best match(es): same text -> same ids -> same mu
    assert scores[0] > 0.9999
    assert query_id in [r[2] for r, s in zip(rows, scores, strict=True) if s > scores[0] - 1e-4]
    # the line format of `vaepipe neighbors`, exactly
    hits = search.neighbors(params, "  " + texts[query_id] + "\n", k=4)
    assert out == "".join(f"{n.rank:>3}  {n.score:+.4f}  {n.doc_id}  {n.split:<5}  {n.text}\n" for n in hits)


def test_neighbors_without_an_export(base, tmp_path, capsys):
    params = with_embed(base, tmp_path / "none")
    assert_one_line_error(*run_cli(params, tmp_path, capsys, "neighbors", "some text"), "vaepipe embed")
