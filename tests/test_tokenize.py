"""Tokenize stage (vaepipe/stages/tokenize.py): lossless byte-level BPE, specials, train-split-only training,
output schema and stats, truncate/drop, tokenizer reuse, determinism, and bad input via the CLI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_tiny_params
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from vaepipe import cli
from vaepipe.core.config import Params
from vaepipe.core.io import sha256_tree
from vaepipe.ml import data
from vaepipe.stages import tokenize
from vaepipe.stages.readers import resolve_inputs


def _corpus_table(params: Params) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in tokenize.corpus_files(params.paths.corpus))


def _tokens_table(params: Params) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted(Path(params.paths.tokens).glob("*.parquet")))


def _write_corpus(root: Path, rows: list[tuple[str | None, str]], name: str = "part-00000.parquet") -> None:
    """A corpus shard by hand: (text, split) rows, doc_id the row number."""
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "doc_id": [f"{i:032x}" for i in range(len(rows))],
        "text": pa.array([t for t, _ in rows], pa.string()),
        "split": [s for _, s in rows],
        "source": ["hand"] * len(rows),
    }), root / name)


def _hand_params(tmp_path: Path, rows: list[tuple[str | None, str]], *extra: str) -> Params:
    params = make_tiny_params(tmp_path, list(extra))
    _write_corpus(Path(params.paths.corpus), rows)
    return params


_BASE = [(f"Sentence number {i} talks about the nation and its people.", s)
         for i, s in enumerate(["train"] * 40 + ["valid"] * 5 + ["test"] * 5)]


@pytest.fixture(scope="module")
def tok(built_tokens: Params) -> Tokenizer:
    return tokenize.load_tokenizer(built_tokens.paths.tokenizer)


# ---------------------------------------------------------------------------------------
# Lossless round trip


def test_round_trip_on_fixture_corpus(built_tokens: Params, tok: Tokenizer) -> None:
    corpus = _corpus_table(built_tokens)
    texts = corpus.column("text").to_pylist()
    for text, ids in zip(texts, tokenize.encode_texts(tok, texts), strict=True):
        assert ids.dtype == np.int64 and len(ids) > 0 and ids.min() >= len(tokenize.SPECIAL_TOKENS)
        assert tok.decode(ids.tolist()) == text
    # and the stage's own output decodes to the corpus text of the same doc_id
    by_id = dict(zip(corpus.column("doc_id").to_pylist(), texts, strict=True))
    tokens = _tokens_table(built_tokens)
    for doc_id, ids, n in zip(tokens.column("doc_id").to_pylist(), tokens.column("ids").to_pylist(),
                              tokens.column("n_tokens").to_pylist(), strict=True):
        assert len(ids) == n and tok.decode(ids) == by_id[doc_id]  # overlong: drop, so nothing cut


def test_round_trip_on_whole_sotu_speeches(tok: Tokenizer) -> None:
    """Raw speeches, newlines and all (a tokenizer trained on 500 sentences meets unseen text)."""
    files = resolve_inputs(["pkg://sotu/data/speeches"])
    sample = [files[i] for i in range(0, len(files), 25)]
    texts = [f.path.read_text(encoding="utf-8") for f in sample]
    assert sum(map(len, texts)) > 300_000
    for text, ids in zip(texts, tokenize.encode_texts(tok, texts), strict=True):
        assert tok.decode(ids.tolist()) == text


_ODD = st.sampled_from(list("aé\u0301ñ ü😀👍🏽🇺🇸中文字日本語한국어0123456789.,;:!?\"'()[]{}<>/\\|@#$%^&*-_=+~`\n\t\x00\x7f\u200d\ufeff")
                       + ["<eos>", "<pad>", "<bos>", "<unk>", "<|endoftext|>", " the", "Ġ"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(_ODD, max_size=40).map("".join)))
def test_round_trip_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    (ids,) = tokenize.encode_texts(tok, [text])
    assert tok.decode(ids.tolist()) == text
    assert not len(ids) or ids.min() >= len(tokenize.SPECIAL_TOKENS)  # no specials, no <unk>, ever
    assert len(ids) <= len(text.encode("utf-8"))  # at most one token per byte


def test_specials_have_fixed_ids_and_literal_specials_are_text(built_tokens: Params, tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in tokenize.SPECIAL_TOKENS] == [0, 1, 2, 3]
    text = "Emoji 😀 and <eos> are text too, <pad> as well."
    (ids,) = tokenize.encode_texts(tok, [text])
    assert not set(ids.tolist()) & {0, 1, 2, 3}
    assert tok.decode(ids.tolist()) == text
    # a freshly loaded tokenizer encodes the same: encode_special_tokens is not saved in the
    # file, load_tokenizer must set it again
    fresh = tokenize.load_tokenizer(built_tokens.paths.tokenizer)
    assert fresh.encode(text, add_special_tokens=False).ids == ids.tolist()
    raw = Tokenizer.from_file(str(Path(built_tokens.paths.tokenizer) / tokenize.TOKENIZER_FILE))
    assert 2 in raw.encode(text, add_special_tokens=False).ids  # what the setting guards against


def test_min_vocab_size() -> None:
    assert tokenize.MIN_VOCAB_SIZE == 260


# ---------------------------------------------------------------------------------------
# Training, output, stats


def test_trains_on_the_train_split_only(tmp_path: Path) -> None:
    rows = [("the cat sat on the mat with another cat", "train")] * 30 + \
           [("zyzzyvaquux zyzzyvaquux zyzzyvaquux", "valid")] * 30 + \
           [("xylophonequark xylophonequark", "test")] * 30
    params = _hand_params(tmp_path, rows, "tokenize.vocab_size=300", "tokenize.min_frequency=2")
    res = tokenize.run(params)
    t = tokenize.load_tokenizer(res.tokenizer_file)
    train_ids, valid_ids = tokenize.encode_texts(t, [rows[0][0], rows[30][0]])
    assert len(train_ids) <= 12  # 39 bytes: the train text was merged into words
    # no pair of the valid text occurs in the train text: were valid read, "zy", "qu"... would merge
    assert len(valid_ids) == len(rows[30][0].encode())
    # valid/test are still encoded (byte fallback): nothing is lost
    st_ = json.loads((Path(params.paths.tokens) / tokenize.STATS_FILE).read_text())
    assert st_["splits"]["valid"]["kept"] == 30 and st_["splits"]["test"]["kept"] == 30


def test_output_schema_and_order(built_tokens: Params) -> None:
    tokens = Path(built_tokens.paths.tokens)
    corpus_files = tokenize.corpus_files(built_tokens.paths.corpus)
    assert sorted(p.name for p in tokens.glob("*.parquet")) == [p.name for p in corpus_files]
    stats = json.loads((tokens / tokenize.STATS_FILE).read_text())
    sha = hashlib.sha256((Path(built_tokens.paths.tokenizer) / tokenize.TOKENIZER_FILE).read_bytes()).hexdigest()
    assert stats["tokenizer_sha256"] == sha == tokenize.tokenizer_hash(built_tokens.paths.tokenizer)
    for f in tokens.glob("*.parquet"):
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.names == ["doc_id", "split", "ids", "n_tokens"]
        assert pf.schema_arrow.field("ids").type == pa.list_(pa.uint16())  # vocab 600 fits
        assert pf.schema_arrow.field("n_tokens").type == pa.int32()
        assert pf.schema_arrow.metadata[b"vaepipe.tokenizer_sha256"].decode() == sha
        assert pf.metadata.row_group(0).column(2).compression == "ZSTD"
    assert stats["id_type"] == "uint16" and stats["vocab_size"] == 600
    # same order as the corpus, minus the dropped records
    corpus_ids = _corpus_table(built_tokens).column("doc_id").to_pylist()
    token_ids = _tokens_table(built_tokens).column("doc_id").to_pylist()
    pos = {d: i for i, d in enumerate(corpus_ids)}
    assert [pos[d] for d in token_ids] == sorted(pos[d] for d in token_ids)


def test_read_split_reads_the_output_in_order(built_tokens: Params) -> None:
    table = _tokens_table(built_tokens)
    for s in tokenize.SPLITS:
        part = table.filter(pc.equal(table.column("split"), s))
        got = data.read_split(built_tokens.paths.tokens, s)
        assert got.doc_ids == part.column("doc_id").to_pylist()
        assert [x.tolist() for x in got.seqs] == part.column("ids").to_pylist()
        assert got.lengths.tolist() == part.column("n_tokens").to_pylist()


def test_stats_agree_with_numpy(built_tokens: Params, tok: Tokenizer) -> None:
    stats = json.loads((Path(built_tokens.paths.tokens) / tokenize.STATS_FILE).read_text())
    corpus, tokens = _corpus_table(built_tokens), _tokens_table(built_tokens)
    max_tokens = built_tokens.tokenize.max_tokens
    total = 0
    for s in tokenize.SPLITS:
        texts = [t for t, sp in zip(corpus.column("text").to_pylist(), corpus.column("split").to_pylist(),
                                    strict=True) if sp == s]
        full = np.array([len(x) for x in tokenize.encode_texts(tok, texts)])
        n = np.array([len(x) for x, sp in zip(tokens.column("ids").to_pylist(), tokens.column("split").to_pylist(),
                                              strict=True) if sp == s])
        got = stats["splits"][s]
        assert got["records"] == len(texts)
        assert got["kept"] == len(n) == int((full <= max_tokens).sum())
        assert got["dropped_overlong"] == int((full > max_tokens).sum()) and got["truncated"] == 0
        assert got["dropped_empty"] == 0
        assert got["tokens"] == int(n.sum()) and got["tokens_untruncated"] == int(full.sum())
        assert got["length_mean"] == pytest.approx(n.mean(), abs=1e-3)
        assert got["length_p50"] == int(np.percentile(n, 50, method="inverted_cdf"))
        assert got["length_p95"] == int(np.percentile(n, 95, method="inverted_cdf"))
        assert got["length_max"] == int(n.max())
        nbytes = sum(len(t.encode()) for t in texts)
        assert got["text_bytes"] == nbytes
        assert got["bytes_per_token"] == pytest.approx(nbytes / full.sum(), abs=1e-4)
        total += int(n.sum())
    assert stats["tokens"] == total
    assert stats["max_tokens"] == max_tokens and stats["overlong"] == "drop"
    assert stats["tokenizer_source"] == "trained"


def test_truncate_vs_drop_and_empty_records(tmp_path: Path) -> None:
    rows = [(("word " * k).strip() + ".", s) for k, s in zip(range(1, 60), ["train", "valid", "test"] * 20)]
    rows += [("", "train"), (None, "valid")]
    res = {}
    for mode in ("truncate", "drop"):
        params = _hand_params(tmp_path / mode, rows, "tokenize.max_tokens=10", f"tokenize.overlong={mode}",
                              "tokenize.vocab_size=280")
        res[mode] = (tokenize.run(params), _tokens_table(params), params)
    tok = tokenize.load_tokenizer(res["drop"][0].tokenizer_file)
    full = {f"{i:032x}": ids for i, ids in enumerate(tokenize.encode_texts(tok, [t or "" for t, _ in rows]))}
    n_over = sum(len(v) > 10 for v in full.values())
    n_empty = sum(len(v) == 0 for v in full.values())
    assert n_over > 10 and n_empty == 2

    tr_stats, tr = res["truncate"][0].stats, res["truncate"][1]
    assert sum(s["truncated"] for s in tr_stats["splits"].values()) == n_over
    assert sum(s["dropped_overlong"] for s in tr_stats["splits"].values()) == 0
    assert sum(s["dropped_empty"] for s in tr_stats["splits"].values()) == n_empty
    assert tr.num_rows == len(rows) - n_empty
    for d, ids, n in zip(tr.column("doc_id").to_pylist(), tr.column("ids").to_pylist(),
                         tr.column("n_tokens").to_pylist(), strict=True):
        assert ids == full[d][:10].tolist() and n == len(ids) <= 10

    dr_stats, dr = res["drop"][0].stats, res["drop"][1]
    assert sum(s["dropped_overlong"] for s in dr_stats["splits"].values()) == n_over
    assert sum(s["truncated"] for s in dr_stats["splits"].values()) == 0
    assert dr.num_rows == len(rows) - n_empty - n_over
    assert all(ids == full[d].tolist() for d, ids in zip(dr.column("doc_id").to_pylist(),
                                                         dr.column("ids").to_pylist(), strict=True))
    # same tokenizer in both modes (training does not depend on max_tokens)
    assert res["drop"][0].tokenizer_sha256 == res["truncate"][0].tokenizer_sha256


def test_int32_ids_when_an_id_passes_65535(tmp_path: Path, built_tokens: Params) -> None:
    assert tokenize.output_schema(1 << 16).field("ids").type == pa.list_(pa.uint16())
    assert tokenize.output_schema((1 << 16) + 1).field("ids").type == pa.list_(pa.int32())
    spec = json.loads((Path(built_tokens.paths.tokenizer) / tokenize.TOKENIZER_FILE).read_text())
    vocab = spec["model"]["vocab"]
    vocab["Ġthe"] = 70_000  # ids need not be contiguous in a hand-made tokenizer.json
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps(spec))
    params = _hand_params(tmp_path, _BASE, f"tokenize.tokenizer_path={hand}")
    res = tokenize.run(params)
    assert res.stats["id_type"] == "int32"
    table = _tokens_table(params)
    assert table.schema.field("ids").type == pa.list_(pa.int32())
    ids = table.column("ids").to_pylist()
    assert any(70_000 in x for x in ids)
    t = Tokenizer.from_file(str(hand))
    assert [t.decode(x) for x in ids] == [r[0] for r in _BASE]


def test_reuse_tokenizer_copies_bytes_and_encodes_the_same(tmp_path: Path, built_tokens: Params) -> None:
    src = Path(built_tokens.paths.tokenizer) / tokenize.TOKENIZER_FILE
    params = make_tiny_params(tmp_path, [f"paths.corpus={built_tokens.paths.corpus}",
                                         f"tokenize.tokenizer_path={src.parent}", "tokenize.vocab_size=5000"])
    res = tokenize.run(params)
    assert not res.trained
    assert res.tokenizer_file.read_bytes() == src.read_bytes()
    assert res.tokenizer_sha256 == tokenize.tokenizer_hash(src) == res.stats["tokenizer_sha256"]
    assert res.stats["tokenizer_source"] == str(src.parent) and res.vocab_size == 600
    assert _tokens_table(params).equals(_tokens_table(built_tokens))


def test_deterministic(tmp_path: Path, built_corpus: Params) -> None:
    outs = []
    for name in ("a", "b"):
        params = make_tiny_params(tmp_path / name, [f"paths.corpus={built_corpus.paths.corpus}"])
        tokenize.run(params)
        outs.append((sha256_tree(params.paths.tokenizer), sha256_tree(params.paths.tokens)))
    assert outs[0] == outs[1]


def test_failed_run_keeps_previous_output(tmp_path: Path) -> None:
    params = _hand_params(tmp_path, _BASE)
    tokenize.run(params)
    before = (sha256_tree(params.paths.tokens), sha256_tree(params.paths.tokenizer))
    with pytest.raises(tokenize.InputError, match="every record of split"):
        tokenize.run(params.replace(tokenize={"max_tokens": 1}))
    assert (sha256_tree(params.paths.tokens), sha256_tree(params.paths.tokenizer)) == before


# ---------------------------------------------------------------------------------------
# Bad input through the CLI


def _cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], *sets: str) -> tuple[int, str]:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(make_tiny_params(tmp_path).to_dict()), encoding="utf-8")
    args = ["-q", "tokenize", "--params", str(params_file)]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    rc = cli.main(args)
    return rc, capsys.readouterr().err


def _corrupt(p: Path) -> Path:
    p.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    return p


def _wrong_specials(p: Path, built: Path) -> Path:
    spec = json.loads(built.read_text())
    spec["added_tokens"] = [dict(a, id=3 - a["id"]) for a in spec["added_tokens"]]
    vocab = spec["model"]["vocab"]
    for s in tokenize.SPECIAL_TOKENS:
        vocab[s] = 3 - vocab[s]
    p.write_text(json.dumps(spec))
    return p


@pytest.mark.parametrize("case", ["no_corpus", "missing_split", "empty_split", "unknown_split", "corrupt_parquet",
                                  "missing_column", "missing_tokenizer", "corrupt_tokenizer", "wrong_specials"])
def test_bad_input_gives_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                             built_tokens: Params) -> None:
    corpus = tmp_path / "data/corpus"
    built = Path(built_tokens.paths.tokenizer) / tokenize.TOKENIZER_FILE
    sets: list[str] = []
    rows = list(_BASE)
    if case == "missing_split":
        rows = [r for r in rows if r[1] != "valid"]
    elif case == "unknown_split":
        rows[3] = (rows[3][0], "dev")
    if case != "no_corpus":
        _write_corpus(corpus, rows)
    if case == "empty_split":
        sets = ["tokenize.max_tokens=2"]
    elif case == "corrupt_parquet":
        (corpus / "part-00001.parquet").write_bytes(b"PAR1 not really parquet")
    elif case == "missing_column":
        pq.write_table(pa.table({"doc_id": ["x", "y", "z"], "split": list(tokenize.SPLITS)}),
                       corpus / "part-00000.parquet")
    elif case == "missing_tokenizer":
        sets = [f"tokenize.tokenizer_path={tmp_path / 'nope' / 'tokenizer.json'}"]
    elif case == "corrupt_tokenizer":
        sets = [f"tokenize.tokenizer_path={_corrupt(tmp_path / 'bad.json')}"]
    elif case == "wrong_specials":
        sets = [f"tokenize.tokenizer_path={_wrong_specials(tmp_path / 'swapped.json', built)}"]
    rc, err = _cli(tmp_path, capsys, *sets)
    assert rc == 1, err
    assert err.count("\n") == 1 and err.startswith("vaepipe tokenize: error: ")
    expected = {
        "no_corpus": r"data/corpus: no corpus Parquet files",
        "missing_split": r"data/corpus: split 'valid' has no records",
        "empty_split": r"every record of split '\w+' was dropped",
        "unknown_split": r"part-00000\.parquet: unknown split 'dev'",
        "corrupt_parquet": r"part-00001\.parquet: not a valid Parquet file .*; rerun `vaepipe ingest`",
        "missing_column": r"part-00000\.parquet: missing column 'text'",
        "missing_tokenizer": r"nope/tokenizer\.json: tokenizer file not found",
        "corrupt_tokenizer": r"bad\.json: not a valid tokenizers JSON file",
        "wrong_specials": r"swapped\.json: special token <pad> has id 3, expected 0",
    }[case]
    assert re.search(expected, err), err
    assert not (tmp_path / "data/tokens").exists() and not (tmp_path / "data/tokenizer").exists()


@pytest.mark.parametrize("size", [1, 259])
def test_vocab_size_below_260_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], size: int) -> None:
    _write_corpus(tmp_path / "data/corpus", _BASE)
    rc, err = _cli(tmp_path, capsys, f"tokenize.vocab_size={size}")
    assert rc == 2 and err.count("\n") == 1 and "tokenize.vocab_size" in err, err


def test_vocab_size_260_is_the_minimum_and_still_lossless(tmp_path: Path) -> None:
    params = _hand_params(tmp_path, _BASE, "tokenize.vocab_size=260", "tokenize.max_tokens=200")
    res = tokenize.run(params)
    assert res.vocab_size == 260
    t = tokenize.load_tokenizer(res.tokenizer_file)
    text = "Ünïcödé 😀 still round-trips with no merges at all."
    (ids,) = tokenize.encode_texts(t, [text])
    assert len(ids) == len(text.encode()) and t.decode(ids.tolist()) == text


def test_train_sample_bytes_is_a_stable_doc_id_sample_of_the_train_split(built_corpus):
    files = tokenize.corpus_files(built_corpus.paths.corpus)
    everything = [t for batch in tokenize.iter_train_texts(files, 64) for t in batch]
    total = sum(len(t.encode()) for t in everything)
    sample = [t for batch in tokenize.iter_train_texts(files, 64, sample_bytes=total // 4) for t in batch]
    again = [t for batch in tokenize.iter_train_texts(files, 7, sample_bytes=total // 4) for t in batch]
    assert sample == again  # the same records whatever the batching
    assert set(sample) < set(everything)  # train records only, and not all of them
    got = sum(len(t.encode()) for t in sample)
    assert 0.1 * total < got < 0.45 * total  # about a quarter, by hash
    whole = [t for batch in tokenize.iter_train_texts(files, 64, sample_bytes=10 * total) for t in batch]
    assert whole == everything  # a budget above the split: all of it, as without one
