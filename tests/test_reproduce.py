"""Reproduction mode: splits as given (ingest.split_from), duplicates and lengths kept
(ingest.dedup, ingest.min_chars/max_chars), the word-level vocabulary (tokenize.kind: word) and
the params-reproduce.yaml preset that sets them all."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_tiny_params
from vaepipe.core.config import load_params
from vaepipe.core.constants import SPECIAL_TOKENS, UNK_ID
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.stages import ingest, tokenize

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "params-reproduce.yaml"

# a PTB-like corpus: one tokenised sentence per line, repeats, a very short and a very long line,
# a literal <unk> (PTB writes rare words so), words that occur only outside train
TRAIN = ["the cat sat on the mat", "the dog sat", "the cat sat on the mat", "a",
         "the <unk> ran to the dog", " ".join(["long"] * 120), "mat mat dog"]
VALID = ["the cat ran", "the zebra sat", "the cat ran"]
TEST = ["a dog on a mat", "unseen words here", "x"]


def _write(folder: Path, files: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return folder


def _preset(tmp_path: Path, inputs: Path, *extra: str):
    outs = {"corpus": "data/corpus", "tokenizer": "data/tokenizer", "tokens": "data/tokens",
            "model": "models/vae", "baseline": "models/lm", "reports": "reports", "embeddings": "data/emb"}
    return load_params(PRESET, [*(f"paths.{k}={tmp_path / v}" for k, v in outs.items()),
                                f"ingest.inputs=[{inputs}]", *extra])


def _rows(folder: str | Path, columns: list[str]) -> list[dict]:
    return pq.read_table(folder, columns=columns).to_pylist()


def _by_split(rows: list[dict], key: str) -> dict[str, list]:
    out: dict[str, list] = {"train": [], "valid": [], "test": []}
    for r in rows:
        out[r["split"]].append(r[key])
    return out


def _expected_vocab(lines: list[str], size: int) -> dict[str, int]:
    """The specials, then the size - 4 most frequent words of ``lines`` (ties by word)."""
    counts = Counter(w for line in lines for w in line.split() if w not in SPECIAL_TOKENS)
    words = sorted(counts, key=lambda w: (-counts[w], w))[: size - len(SPECIAL_TOKENS)]
    return {**{s: i for i, s in enumerate(SPECIAL_TOKENS)}, **{w: i for i, w in enumerate(words, len(SPECIAL_TOKENS))}}


def test_committed_preset_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # relative outputs inside the checkout
    p = load_params(PRESET)
    assert (p.ingest.split_from, p.ingest.dedup, p.ingest.min_chars, p.ingest.max_chars) == ("files", False, 0, None)
    assert (p.tokenize.kind, p.model.embed_dim, p.model.hidden_dim, p.model.latent_dim) == ("word", 512, 1024, 32)
    assert p.evaluate.max_docs == 0


def test_preset_honours_splits_duplicates_lengths_and_vocabulary_exactly(tmp_path: Path) -> None:
    inputs = _write(tmp_path / "in", {"ptb.train.txt": TRAIN, "ptb.valid.txt": VALID, "ptb.test.txt": TEST})
    params = _preset(tmp_path, inputs, "tokenize.vocab_size=9")  # 5 words: a cap that bites
    stats = ingest.run(params).stats
    given = {"train": TRAIN, "valid": VALID, "test": TEST}
    # rows per split == lines per file, in file order, repeats and the 1- and 600-char lines kept
    texts = _by_split(_rows(params.paths.corpus, ["text", "split"]), "text")
    assert texts == given
    assert stats["splits"] == {s: len(v) for s, v in given.items()}
    assert stats["dropped"]["duplicate"] == 0 and stats["dropped"]["too_short"] == stats["dropped"]["too_long"] == 0

    tokenize.run(params)
    tok = tokenize.load_tokenizer(params.paths.tokenizer)
    vocab = _expected_vocab(TRAIN, 9)
    assert tok.get_vocab(with_added_tokens=True) == vocab
    # 120 x long, 7 x the, 4 x mat, 3 x dog / sat (then word order); cat and on (2 each) are cut
    assert list(vocab)[4:] == ["long", "the", "mat", "dog", "sat"]
    ids = _by_split(_rows(params.paths.tokens, ["ids", "split"]), "ids")
    for split, lines in given.items():
        assert ids[split] == [[vocab.get(w, UNK_ID) for w in line.split()] for line in lines]
    assert UNK_ID in ids["valid"][1] and ids["test"][1] == [UNK_ID] * 3  # "zebra", "unseen words here"
    # decoding joins words with spaces; <unk> shows, <bos>/<eos> do not
    assert tok.decode([1, *ids["train"][4], 2], skip_special_tokens=True) == "the <unk> <unk> <unk> the dog"
    assert tok.decode(ids["train"][6], skip_special_tokens=True) == TRAIN[6]
    assert tok.decode(ids["train"][0], skip_special_tokens=True) == "the <unk> sat <unk> the mat"
    tstats = json.loads((Path(params.paths.tokens) / tokenize.STATS_FILE).read_text())
    assert {s: tstats["splits"][s]["kept"] for s in given} == {s: len(v) for s, v in given.items()}


def test_word_vocabulary_keeps_every_word_under_the_cap_and_reads_literal_specials_as_unk() -> None:
    tok = tokenize.train_word_tokenizer(iter([["b a b <eos> <pad>", "c a b"]]), 100)
    assert tok.get_vocab(with_added_tokens=True) == {**{s: i for i, s in enumerate(SPECIAL_TOKENS)}, "b": 4, "a": 5, "c": 6}
    assert tok.encode("a <pad> <bos> <eos> <unk> d", add_special_tokens=False).ids == [5, UNK_ID, UNK_ID, UNK_ID, UNK_ID, UNK_ID]
    with pytest.raises(ConfigError, match="tokenize.vocab_size: 4 is too small"):
        tokenize.train_word_tokenizer(iter([["a"]]), 4)


def test_hash_splits_and_dedup_stay_the_default(tmp_path: Path) -> None:
    inputs = _write(tmp_path / "in", {"a.txt": ["same line here", "same line here", "another line"]})
    base = ["ingest.unit=line", "ingest.min_chars=0", f"ingest.inputs=[{inputs}]"]
    stats = ingest.run(make_tiny_params(tmp_path / "a", base)).stats
    assert stats["records_out"] == 2 and stats["dropped"]["duplicate"] == 1
    stats = ingest.run(make_tiny_params(tmp_path / "b", [*base, "ingest.dedup=false"])).stats
    assert stats["records_out"] == 3 and stats["dropped"]["duplicate"] == 0


def test_split_files_mapping_places_files_by_pattern(tmp_path: Path) -> None:
    inputs = _write(tmp_path / "in", {"part1.txt": ["one a", "one b"], "part2.txt": ["two"], "held.txt": ["three"]})
    params = make_tiny_params(tmp_path, ["ingest.unit=line", "ingest.min_chars=0", f"ingest.inputs=[{inputs}]",
                                         "ingest.split_from=files",
                                         "ingest.split_files={train: ['part*'], valid: [held.txt], test: []}"])
    ingest.run(params)
    assert _by_split(_rows(params.paths.corpus, ["text", "split"]), "text") == {
        "train": ["one a", "one b", "two"], "valid": ["three"], "test": []}


@pytest.mark.parametrize(("names", "split_files", "fragment"), [
    (["train.txt", "notes.txt"], None, r"notes\.txt: ingest\.split_from: files: the file names no split"),
    (["train.valid.txt"], None, r"train\.valid\.txt: .* names train and valid"),
    (["a.txt", "b.txt"], "{train: [a.txt]}", r"b\.txt: .* matches ingest\.split_files patterns of no split"),
    (["a.txt"], "{train: ['*'], test: [a.txt]}", r"a\.txt: .* patterns of test and train"),
])
def test_a_file_without_exactly_one_split_is_refused_by_name(tmp_path: Path, names, split_files, fragment) -> None:
    inputs = _write(tmp_path / "in", {n: ["some text"] for n in names})
    extra = [f"ingest.split_files={split_files}"] if split_files else []
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{inputs}]", "ingest.split_from=files", *extra])
    with pytest.raises(InputError, match=fragment):
        ingest.run(params)
    assert not Path(params.paths.corpus).exists()


def test_split_column_in_jsonl_csv_and_parquet(tmp_path: Path) -> None:
    rows = [("first doc", "train"), ("second doc", "test"), ("first doc", "train"), ("third doc", "valid")]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t, "part": s}) + "\n" for t, s in rows))
    (folder / "b.csv").write_text("text,part\n" + "".join(f"{t},{s}\n" for t, s in rows))
    pq.write_table(pa.table({"text": [t for t, _ in rows], "part": [s for _, s in rows]}), folder / "c.parquet")
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{folder}]", "ingest.min_chars=0",
                                         "ingest.split_from=column:part", "ingest.dedup=false"])
    ingest.run(params)
    table = pq.read_table(params.paths.corpus)
    assert "part" not in table.column_names  # read for the split, not kept
    assert [(r["text"], r["split"]) for r in table.select(["text", "split"]).to_pylist()] == rows * 3
    # kept too when asked; a dictionary-encoded Parquet column reads the same
    dict_file = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in rows],
                             "part": pa.array([s for _, s in rows]).dictionary_encode()}), dict_file)
    kept = make_tiny_params(tmp_path / "k", [f"ingest.inputs=[{dict_file}]", "ingest.min_chars=0",
                                             "ingest.split_from=column:part", "ingest.keep_columns=[part]"])
    ingest.run(kept)
    t = pq.read_table(kept.paths.corpus)
    assert t.column("split").to_pylist() == ["train", "test", "valid"]  # deduplicated (the default)
    assert t.column("part").cast(pa.string()).to_pylist() == ["train", "test", "valid"]


@pytest.mark.parametrize(("content", "where", "value"), [
    ('{"text": "ok doc", "part": "train"}\n{"text": "bad doc", "part": "dev"}\n', "a.jsonl:2", "'dev'"),
    ('{"text": "ok doc", "part": "train"}\n{"text": "no part"}\n', "a.jsonl:2", "None"),
    ('{"text": "ok doc", "part": 1}\n', "a.jsonl:1", "1"),
])
def test_a_bad_split_value_names_file_and_row(tmp_path: Path, content: str, where: str, value: str) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(content)
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{f}]", "ingest.split_from=column:part",
                                         "ingest.missing_columns=null"])
    with pytest.raises(InputError, match=rf"{where}: ingest\.split_from column:part: value {value} is not train"):
        ingest.run(params)


def test_split_column_with_txt_inputs_is_refused(tmp_path: Path) -> None:
    inputs = _write(tmp_path / "in", {"train.txt": ["a line of text"]})
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{inputs}]", "ingest.split_from=column:part"])
    with pytest.raises(InputError, match=r"train\.txt: \.txt inputs have no columns"):
        ingest.run(params)


def test_max_chars_null_keeps_long_records(tmp_path: Path) -> None:
    inputs = _write(tmp_path / "in", {"a.txt": ["x" * 5000, "short one here"]})
    base = [f"ingest.inputs=[{inputs}]", "ingest.unit=line", "ingest.min_chars=0"]
    assert ingest.run(make_tiny_params(tmp_path / "a", base)).stats["records_out"] == 1
    assert ingest.run(make_tiny_params(tmp_path / "b", [*base, "ingest.max_chars=null"])).stats["records_out"] == 2


@pytest.mark.parametrize(("override", "fragment"), [
    (["ingest.split_from=random"], "ingest.split_from: 'random' is not hash, files or column:NAME"),
    (["ingest.split_from=column:"], "ingest.split_from: expected a string"),
    (["ingest.split_from=files", "ingest.split_files={dev: [a]}"], "ingest.split_files: unknown split 'dev'"),
    (["ingest.split_files={train: [a]}"], "ingest.split_files is set but ingest.split_from is 'hash'"),
    (["ingest.split_from=files", "ingest.split_files={train: [a], test: [a]}"],
     r"ingest.split_files.test\[0\]: 'a' is also listed under train"),
    (["ingest.split_from=files", "ingest.split_files=[a]"], "ingest.split_files: expected a mapping"),
    (["ingest.split_from=files", "ingest.split_files={train: [1]}"], r"ingest.split_files.train\[0\]: expected a string"),
    (["tokenize.kind=char"], "tokenize.kind: must be one of bpe, word"),
    (["ingest.max_chars=0"], "ingest.max_chars: must be >= 1"),
])
def test_bad_reproduction_keys_name_the_key(override: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_params(None, override)


@pytest.mark.slow
def test_a_word_vocabulary_runs_through_train_evaluate_and_the_text_model(tmp_path: Path) -> None:
    import random

    from vaepipe.stages import evaluate, train
    from vaepipe.stages.textmodel import load

    rng = random.Random(0)
    words = "the a cat dog sat ran on mat big small red".split()
    files = {f"toy.{s}.txt": [" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(n)]
             for s, n in (("train", 120), ("valid", 20), ("test", 20))}
    inputs = _write(tmp_path / "in", files)
    tiny = ["tokenize.vocab_size=10", "model.embed_dim=16", "model.hidden_dim=32", "model.encoder_hidden_dim=16",
            "model.latent_dim=4", "train.max_steps=10", "train.max_epochs=1", "train.batch_tokens=256",
            "train.warmup_steps=2", "train.kl_warmup_steps=5", "train.device=cpu", "train.num_threads=1",
            "evaluate.iw_samples=5", "evaluate.device=cpu", "evaluate.num_examples=2", "evaluate.strategies=[greedy]",
            "tracking.enabled=false"]
    params = _preset(tmp_path, inputs, *tiny)
    ingest.run(params)
    tokenize.run(params)
    train.run(params)
    metrics = evaluate.run(params).metrics
    assert metrics["n_docs"] == 20  # evaluate.max_docs: 0, every test line
    # ppl_word counts the words of the decoded text, <unk> included: one per token
    assert metrics["n_words"] == metrics["n_tokens"]
    vocab = set(tokenize.load_tokenizer(params.paths.tokenizer).get_vocab())
    m = load(params.paths.model, tokenizer=params.paths.tokenizer, device="cpu")
    for text in [*m.reconstruct(["the cat sat on the zebra"]), *m.sample(3, max_tokens=12)]:
        assert text == " ".join(text.split()) and set(text.split()) <= vocab - {"<pad>", "<bos>", "<eos>"}


def test_a_column_named_split_is_read_as_the_split(tmp_path: Path) -> None:
    # the usual name in exported datasets, although the corpus has a split column of its own
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps({"text": t, "split": s}) + "\n"
                         for t, s in [("one doc", "test"), ("two doc", "train"), ("three doc", "valid")]))
    params = make_tiny_params(tmp_path, [f"ingest.inputs=[{f}]", "ingest.min_chars=0", "ingest.split_from=column:split"])
    ingest.run(params)
    table = pq.read_table(params.paths.corpus)
    assert table.column_names == ["doc_id", "text", "split", "source"]
    assert table.select(["text", "split"]).to_pylist() == [
        {"text": "one doc", "split": "test"}, {"text": "two doc", "split": "train"}, {"text": "three doc", "split": "valid"}]
