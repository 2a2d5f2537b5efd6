"""vaepipe/stages/embed.py: the latent export, on the tiny trained model.

The session fixture ``trained_model`` is only read; every export goes to its own tmp_path.
The search over an export (`vaepipe neighbors`) is tests/test_search.py, which shares the
helpers here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from vaepipe.cli import main
from vaepipe.core.config import Params
from vaepipe.core.errors import InputError
from vaepipe.core.io import sha256_file
from vaepipe.core.run_info import read_run_info
from vaepipe.ml import checkpoint
from vaepipe.ml.data import collate, list_column_to_arrays
from vaepipe.ml.estimators import active_units
from vaepipe.stages import tokenize, embed


@pytest.fixture(scope="module")
def base(trained_model: Params) -> Params:
    return trained_model


def with_embed(params: Params, out: Path, **embed_cfg) -> Params:
    return params.replace(paths={"embeddings": str(out)}, embed={"device": "cpu", **embed_cfg})


def token_table(params: Params, splits=("train", "valid", "test")) -> pa.Table:
    files = sorted(Path(params.paths.tokens).rglob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f, columns=["doc_id", "split", "ids", "n_tokens"]) for f in files)
    return table.filter(pc.is_in(table.column("split"), value_set=pa.array(list(splits))))


def read_export(out: Path) -> pa.Table:
    files = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def mu_matrix(table: pa.Table, column: str = "mu") -> np.ndarray:
    z = table.schema.field(column).type.list_size
    return embed.fixed_list_to_numpy(table.column(column), z)


def kv(path: Path) -> dict[str, str]:
    md = pq.ParquetFile(path).metadata.metadata
    return {k.decode(): v.decode() for k, v in md.items() if k.startswith(b"vaepipe.")}


def write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict()))
    return path


# ---------------------------------------------------------------------------------------
# The export


def test_schema_metadata_and_layout(base, tmp_path):
    params = with_embed(base, tmp_path / "emb", shard_rows=70, row_group_rows=25, logvar=True)
    res = embed.run(params)
    out = Path(params.paths.embeddings)
    files = sorted(out.glob("part-*.parquet"))
    z = base.model.latent_dim
    assert res.rows == token_table(base).num_rows and res.shards == len(files) > 1
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(len(files))]
    mus = []
    for f in files:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        assert schema.names == ["doc_id", "split", "mu", "n_tokens", "logvar"]
        assert schema.field("doc_id").type == pa.string() and schema.field("split").type == pa.string()
        assert schema.field("n_tokens").type == pa.int32()
        for col in ("mu", "logvar"):
            t = schema.field(col).type
            assert pa.types.is_fixed_size_list(t) and t.list_size == z and t.value_type == pa.float32()
        md = pf.metadata
        assert md.num_rows <= 70
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert max(sizes) <= 25 and sum(sizes) == md.num_rows
        enc = json.loads(kv(f)["vaepipe.encoding"])
        assert enc["byte_stream_split"] == (enc["bytes_byte_stream_split"] < enc["bytes_plain"])
        for i in range(md.num_columns):
            col = md.row_group(0).column(i)
            assert col.compression == "ZSTD"
            if col.path_in_schema in ("mu.list.element", "logvar.list.element"):
                assert ("BYTE_STREAM_SPLIT" in col.encodings) == enc["byte_stream_split"]
        mus.append(mu_matrix(pq.read_table(f)))
    meta = [kv(f) for f in files]
    model_dir = Path(base.paths.model)
    run_id = read_run_info(model_dir)["run_id"] or ""
    for m in meta:
        assert m["vaepipe.model_sha256"] == sha256_file(model_dir / checkpoint.BEST)
        assert m["vaepipe.tokenizer_sha256"] == tokenize.tokenizer_hash(base.paths.tokenizer)
        assert m["vaepipe.mlflow_run_id"] == run_id
        assert m["vaepipe.latent_dim"] == str(z)
        assert m["vaepipe.version"] == embed.__version__
        assert m["vaepipe.active_mask"] == meta[0]["vaepipe.active_mask"]  # export-wide, same everywhere
    # also visible as Arrow schema metadata (what the pq.read_schema example in docs/stages/embed.md reads)
    assert pq.read_schema(files[0]).metadata[b"vaepipe.active_mask"].decode() == meta[0]["vaepipe.active_mask"]
    # the mask is the active-unit definition of evaluate (estimators.active_units) on the export
    n_active, var = active_units(torch.from_numpy(np.concatenate(mus)))
    mask = json.loads(meta[0]["vaepipe.active_mask"])
    assert mask == (var > embed.AU_THRESHOLD).tolist() and res.active_units == n_active
    np.testing.assert_allclose(json.loads(meta[0]["vaepipe.mu_variance"]), var.numpy(), rtol=1e-9)
    manifest = json.loads((out / embed.MANIFEST).read_text())
    assert manifest["rows"] == res.rows and manifest["active_mask"] == mask
    assert [s["file"] for s in manifest["shards"]] == [f.name for f in files]
    # no staging or temporary leftovers beside or inside the output (the lock file stays)
    assert not [p for p in out.parent.glob(".emb*") if p.name != ".emb.lock"] and not list(out.glob(".*"))


def test_rows_keep_token_order_and_vectors_belong_to_their_row(base, tmp_path):
    params = with_embed(base, tmp_path / "emb", shard_rows=50, row_group_rows=20, batch_tokens=300)
    embed.run(params)
    got, want = read_export(tmp_path / "emb"), token_table(base)
    assert got.column("doc_id").to_pylist() == want.column("doc_id").to_pylist()
    assert got.column("split").to_pylist() == want.column("split").to_pylist()
    assert got.column("n_tokens").to_pylist() == want.column("n_tokens").to_pylist()
    # batches are formed by length; each vector must still be its own record's: encode a sample alone
    model, _ = checkpoint.load_model(base.paths.model)
    seqs = list_column_to_arrays(want.column("ids"))
    mu = mu_matrix(got)
    rows = np.linspace(0, len(seqs) - 1, 12).astype(int)
    with torch.inference_mode():
        for i in rows:
            alone = model.encode(*collate([seqs[i]]))[0][0].numpy()
            np.testing.assert_allclose(mu[i], alone, rtol=1e-4, atol=1e-5)


def test_splits_subset(base, tmp_path):
    res = embed.run(with_embed(base, tmp_path / "emb", splits=["test", "valid"]))
    got = read_export(tmp_path / "emb")
    want = token_table(base, ("test", "valid"))
    assert res.rows == got.num_rows == want.num_rows
    assert got.column("doc_id").to_pylist() == want.column("doc_id").to_pylist()
    assert set(got.column("split").to_pylist()) == {"test", "valid"}


def test_two_runs_are_identical_and_a_rerun_is_a_no_op(base, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    embed.run(with_embed(base, a, shard_rows=60, row_group_rows=30))
    embed.run(with_embed(base, b, shard_rows=60, row_group_rows=30))
    fa, fb = sorted(a.glob("part-*")), sorted(b.glob("part-*"))
    assert [f.name for f in fa] == [f.name for f in fb]
    for x, y in zip(fa, fb, strict=True):
        assert x.read_bytes() == y.read_bytes()
    stamp = [f.stat().st_mtime_ns for f in fa]
    res = embed.run(with_embed(base, a, shard_rows=60, row_group_rows=30))
    assert res.shards_reused == res.shards == len(fa)
    assert [f.stat().st_mtime_ns for f in fa] == stamp


class Interrupt(Exception):
    pass

def fail_encode_on_call(monkeypatch, n: int) -> list[int]:
    """Make embed.encode_chunk raise Interrupt on its n-th call; the list counts the calls."""
    real, calls = embed.encode_chunk, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise Interrupt
        return real(*a, **k)

    monkeypatch.setattr(embed, "encode_chunk", failing)
    return calls


def test_interrupted_run_resumes_from_finished_shards(base, tmp_path, monkeypatch):
    cfg = {"shard_rows": 40, "row_group_rows": 15}
    ref = tmp_path / "ref"
    embed.run(with_embed(base, ref, **cfg))
    out = tmp_path / "emb"
    params = with_embed(base, out, **cfg)
    real = embed.encode_chunk
    calls = fail_encode_on_call(monkeypatch, 5)  # shard 0 = chunks 15+15+10; fail in the 2nd chunk of shard 1
    with pytest.raises(Interrupt):
        embed.run(params)
    assert not out.exists()  # nothing under the final name
    (staging,) = tmp_path.glob(".emb.partial-*")
    assert sorted(p.name for p in staging.iterdir()) == ["part-00000.parquet"]  # tmp of shard 1 removed
    assert pq.ParquetFile(staging / "part-00000.parquet").metadata.num_rows == 40
    (staging / ".part-00001.parquet.tmp-99999").write_bytes(b"PAR1 half a file")  # as after kill -9

    calls.clear()
    monkeypatch.setattr(embed, "encode_chunk", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    res = embed.run(params)
    n_chunks_total = sum(-(-min(40, res.rows - s * 40) // 15) for s in range(res.shards))
    assert res.shards_reused == 1 and len(calls) == n_chunks_total - 3
    assert not staging.exists() and not list(out.glob(".*"))
    for x, y in zip(sorted(ref.glob("part-*")), sorted(out.glob("part-*")), strict=True):
        assert pq.read_table(x).equals(pq.read_table(y)) and kv(x) == kv(y)
    assert read_export(ref).equals(read_export(out))


def test_stale_partial_of_another_configuration_is_not_reused(base, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    real = embed.encode_chunk
    fail_encode_on_call(monkeypatch, 3)
    with pytest.raises(Interrupt):
        embed.run(with_embed(base, out, shard_rows=20, row_group_rows=20))
    (old,) = tmp_path.glob(".emb.partial-*")
    monkeypatch.setattr(embed, "encode_chunk", real)
    res = embed.run(with_embed(base, out, shard_rows=20, row_group_rows=20, logvar=True))
    assert res.shards_reused == 0 and not old.exists()
    assert "logvar" in read_export(out).column_names
    # a complete export of another configuration is replaced, not reported up to date
    res = embed.run(with_embed(base, out, shard_rows=20, row_group_rows=20))
    assert res.shards_reused == 0 and "logvar" not in read_export(out).column_names


def test_a_failed_export_leaves_the_previous_one_intact(base, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    embed.run(with_embed(base, out, shard_rows=40, npy=True))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail_encode_on_call(monkeypatch, 2)  # in the second shard, after a first one was finished
    with pytest.raises(Interrupt):
        embed.run(with_embed(base, out, shard_rows=40, row_group_rows=40, logvar=True, npy=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(out.glob(".*"))


def test_num_threads_is_restored_after_the_export_and_after_an_error(base, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    n = 1 if before != 1 else 2
    seen = []
    real = embed.export_embeddings

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(embed, "export_embeddings", spy)
    embed.run(with_embed(base, tmp_path / "emb", num_threads=n))
    assert seen == [n] and torch.get_num_threads() == before
    params = with_embed(base, tmp_path / "emb2", num_threads=n).replace(paths={"model": str(tmp_path / "nomodel")})
    with pytest.raises(InputError):
        embed.run(params)
    assert torch.get_num_threads() == before


def test_npy_export_matches_parquet(base, tmp_path):
    out = tmp_path / "emb"
    embed.run(with_embed(base, out, shard_rows=45, npy=True))
    table = read_export(out)
    mat = np.load(out / embed.NPY)
    assert mat.dtype == np.float32 and mat.shape == (table.num_rows, base.model.latent_dim)
    assert np.array_equal(mat, mu_matrix(table))
    assert (out / embed.NPY_IDS).read_text().splitlines() == table.column("doc_id").to_pylist()
    # the side files start with "_", so the directory still reads as one dataset (docs/stages/embed.md examples)
    assert pq.read_table(out).equals(table)
    df = pd.read_parquet(out)
    assert df["doc_id"].tolist() == table.column("doc_id").to_pylist()
    assert np.array_equal(np.stack(df["mu"].to_numpy()), mat)
    # an up-to-date export without the matrix gets it added on a rerun with npy on
    (out / embed.NPY).unlink()
    res = embed.run(with_embed(base, out, shard_rows=45, npy=True))
    assert res.shards_reused == res.shards and np.array_equal(np.load(out / embed.NPY), mat)


# ---------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit


def run_cli(params: Params, tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    cmd = list(args) or ["embed"]
    rc = main(["-q", *cmd, "--params", str(write_params(params, tmp_path / "bad.yaml"))])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0 and len(err.splitlines()) == 1 and "error:" in err, err
    for n in needles:
        assert n in err, err


def test_no_trained_model(base, tmp_path, capsys):
    params = with_embed(base, tmp_path / "emb").replace(paths={"model": str(tmp_path / "nomodel")})
    rc, err = run_cli(params, tmp_path, capsys)
    assert_one_line_error(rc, err, "nomodel")
    assert not (tmp_path / "emb").exists()


def test_lm_baseline_has_no_encoder(base, tmp_path, capsys):
    if not (Path(base.paths.baseline) / "config.json").is_file():
        pytest.skip("no LM baseline in this fixture")
    # paths.baseline moves aside: two outputs may not be one folder
    params = with_embed(base, tmp_path / "emb").replace(paths={"model": base.paths.baseline,
                                                               "baseline": str(tmp_path / "lm")})
    assert_one_line_error(*run_cli(params, tmp_path, capsys), "encoder")


def test_tokenizer_that_is_not_the_models(base, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    src = Path(base.paths.tokenizer) / "tokenizer.json"
    (tok_dir / "tokenizer.json").write_text(src.read_text() + "\n")  # same vocabulary, other bytes
    params = with_embed(base, tmp_path / "emb").replace(paths={"tokenizer": str(tok_dir)})
    assert_one_line_error(*run_cli(params, tmp_path, capsys), str(tok_dir), "sha256")


def test_tokenizer_vocab_size_differs_when_the_model_has_no_hash(base, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(base.paths.model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["tokenizer_hash"] = None
    (model_dir / "config.json").write_text(json.dumps(config))
    tok = tokenize.train_tokenizer(iter([["a small other corpus, for a small other vocabulary"] * 20]), 300, 2)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(tok.to_str())
    params = with_embed(base, tmp_path / "emb").replace(
        paths={"model": str(model_dir), "tokenizer": str(tmp_path / "tok")})
    assert_one_line_error(*run_cli(params, tmp_path, capsys), "vocab")


def test_empty_split_and_empty_corpus(base, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for f in sorted(Path(base.paths.tokens).glob("*.parquet")):
        t = pq.read_table(f)
        pq.write_table(t.filter(pc.not_equal(t.column("split"), "test")), tokens / f.name)
    params = with_embed(base, tmp_path / "emb").replace(paths={"tokens": str(tokens)})
    assert_one_line_error(*run_cli(params, tmp_path, capsys), "'test'")
    for f in tokens.glob("*.parquet"):
        f.unlink()
    assert_one_line_error(*run_cli(params, tmp_path, capsys), str(tokens))
    assert not (tmp_path / "emb").exists()


# ---------------------------------------------------------------------------------------
# RowBuffer / EncodedTables: the one take(n) that both engines' encoded rows go through


def _parts(sizes: list[int]) -> list[pa.RecordBatch]:
    start, out = 0, []
    for n in sizes:
        out.append(pa.record_batch({"x": pa.array(range(start, start + n), pa.int64())}))
        start += n
    return out


def test_row_buffer_takes_across_parts_in_order_and_says_when_short():
    buf = embed.RowBuffer(iter(_parts([3, 0, 5, 2])), lambda: InputError("short"))
    assert buf.take(4).column("x").to_pylist() == [0, 1, 2, 3]
    buf.skip(2)
    assert buf.take(10).column("x").to_pylist() == [6, 7, 8, 9]  # fewer at the end
    with pytest.raises(InputError, match="short"):
        buf.take(1)
    chunks = embed.RowBuffer(iter(_parts([3, 5, 2])), lambda: InputError("short")).chunks(4)
    assert [c.column("x").to_pylist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_encoded_tables_give_back_what_encoded_table_packed():
    z = 3
    ids = pa.array([[5, 6], [7], [8, 9, 10], [11]], pa.list_(pa.uint16()))
    chunk = pa.table({"doc_id": ["a", "b", "c", "d"], "split": ["test"] * 4, "ids": ids, "kept": [1, 2, 3, 4]})
    mu = np.arange(12, dtype=np.float32).reshape(4, z)
    lv = -mu
    lengths = np.array([2, 1, 3, 1])
    packed = embed.encoded_table(chunk, mu, lv, lengths, z)
    rows = embed.EncodedTables(iter([packed.slice(0, 1), packed.slice(1)]), z, lambda: InputError("short"))
    head, m, v, n = rows.take(3)
    assert head.column_names == ["doc_id", "split", "kept"] and head.column("doc_id").to_pylist() == ["a", "b", "c"]
    np.testing.assert_array_equal(m, mu[:3])
    np.testing.assert_array_equal(v, lv[:3])
    np.testing.assert_array_equal(n, lengths[:3])
    rows.skip(1)
    with pytest.raises(InputError, match="short"):
        rows.take(1)


# ---------------------------------------------------------------------------------------
# A corpus the model was not trained on (docs/stages/embed.md, "Embedding another corpus")


def test_a_corpus_of_another_unit_through_the_models_tokenizer(base, tmp_path):
    """The documented recipe: ingest another corpus (here the fixture's paragraphs, for a model
    trained on its sentences), tokenize it with ``tokenize.tokenizer_path`` set to the model's
    tokenizer, embed. Every kept paragraph gets the vector that the text-to-latent API gives
    for its text; a tokenizer trained on the new corpus instead is refused by name."""
    from vaepipe.stages import ingest, textmodel

    other = base.replace(
        paths={"corpus": str(tmp_path / "corpus-para"), "tokenizer": str(tmp_path / "tokenizer-para"),
               "tokens": str(tmp_path / "tokens-para"), "embeddings": str(tmp_path / "emb-para")},
        ingest={"unit": "paragraph", "max_chars": None},
        tokenize={"tokenizer_path": base.paths.tokenizer, "max_tokens": 400},
        embed={"device": "cpu"})
    ingest.run(other)
    tokenize.run(other)
    embed.run(other)
    assert (sha256_file(Path(other.paths.tokenizer) / "tokenizer.json")
            == sha256_file(Path(base.paths.tokenizer) / "tokenizer.json"))

    out = read_export(Path(other.paths.embeddings))
    tokens = token_table(other)
    assert out.column("doc_id").to_pylist() == tokens.column("doc_id").to_pylist()
    assert 0 < out.num_rows < token_table(base).num_rows  # fewer documents than the model's sentences

    corpus = pa.concat_tables(pq.read_table(f, columns=["doc_id", "text"])
                              for f in sorted(Path(other.paths.corpus).rglob("*.parquet")))
    text_of = dict(zip(corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist()))
    texts = [text_of[d] for d in out.column("doc_id").to_pylist()]
    assert max(len(t) for t in texts) > 300  # paragraphs, not sentences
    tm = textmodel.load(base.paths.model, tokenizer=base.paths.tokenizer, device="cpu")
    np.testing.assert_allclose(mu_matrix(out), tm.encode(texts), rtol=0, atol=1e-5)

    retrained = other.replace(paths={"tokenizer": str(tmp_path / "tok-own"), "tokens": str(tmp_path / "tokens-own"),
                                     "embeddings": str(tmp_path / "emb-own")},
                              tokenize={"tokenizer_path": None})
    tokenize.run(retrained)
    with pytest.raises(InputError, match=r"tok-own: tokenizer sha256 \w+ differs"):
        embed.run(retrained)
