"""Tokenize stage: train (or reuse) a tokenizer, encode the corpus to token ids.

    corpus Parquet (doc_id, text, split, source) -> paths.tokenizer/tokenizer.json
                                                  -> paths.tokens/*.parquet + _stats.json

Byte-level BPE (Radford et al. 2019) over the 256 byte symbols is lossless: every string
encodes, nothing maps to ``<unk>``, and decoding the ids gives back the text byte for byte.
Three settings keep that true here: no normalizer (ingest already normalised the text; a second
pass would change it), ``add_prefix_space=False`` (otherwise a space appears in front of every
record), and ``encode_special_tokens=True`` (otherwise a literal "<pad>" in the text becomes id
0). The specials ``<pad> <bos> <eos> <unk>`` get ids 0-3 (vaepipe.ml.data) and never occur in the
output: the model adds ``<bos>``/``<eos>`` itself.

``tokenize.kind: word`` trains a word-level tokenizer instead, as the text-VAE literature
measures (He et al. 2019, Li et al. 2019): whitespace-separated words, the ``vocab_size - 4``
most frequent in the train split (ties by word, so the vocabulary is deterministic) after the
same four specials, every other word ``<unk>``. It is saved in the same tokenizer.json format
(tokenizers' ``WordLevel`` model, ``WhitespaceSplit`` pre-tokenizer), so every later stage
reads it unchanged. It has no decoder, so decoding joins words with one space, which gives back
the (whitespace-normalised) text where no word became ``<unk>``; ``<unk>`` is not a special
token there, so decoded text shows it (and counts it as a word) rather than dropping it. A
literal ``<pad>``, ``<bos>`` or ``<eos>`` in the text is read as ``<unk>`` (a normalizer), never
as the special id.

Columns the corpus carries beyond its own (``ingest.keep_columns``) are copied row-aligned into
the token files, after ``n_tokens``, with their types (``kept_columns``).

Everything streams: the trainer reads the train split one record batch at a time, and encoding
is a pure function over one Arrow record batch (``encode_record_batch``), driven here by a loop
over Parquet files and usable as-is as a ``map_batches`` function of a distributed engine.
Parallelism is the library's own (``encode_batch_fast`` runs on all cores unless
``TOKENIZERS_PARALLELISM=false``); memory is bounded by ``tokenize.batch_size``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Encoding, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vaepipe.core.config import Params
from vaepipe.core.constants import CORPUS_COLUMNS, SPECIAL_TOKENS, SPLITS, TOKEN_COLUMNS, TOKENIZER_META_KEY
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.core.io import atomic_dir, atomic_write_bytes, sha256_file, write_json
from vaepipe.core.outputs import output_locks, stage_outputs
from vaepipe.core.storage import staged

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_ALPHABET)  # 260: nothing is left for merges
MIN_WORD_VOCAB_SIZE = len(SPECIAL_TOKENS) + 1  # the specials and one word
UNK = SPECIAL_TOKENS[3]
CORPUS_READ = ("doc_id", "text", "split")  # what tokenize reads of the corpus (plus the kept columns)
# a side file starts with "_" so that pyarrow/pandas/DuckDB read the tokens folder whole
STATS_FILE = "_stats.json"


@dataclass
class SplitStats:
    """Counters for one split; lengths kept as a histogram so memory is O(max length)."""

    records: int = 0  # records read from the corpus
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_empty: int = 0
    text_bytes: int = 0  # UTF-8 bytes of every non-empty record ...
    text_tokens: int = 0  # ... and its full token count (before truncation): bytes per token
    hist: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # [n]: kept records of n tokens

    def update(self, other: SplitStats) -> None:
        for name in ("records", "kept", "truncated", "dropped_overlong", "dropped_empty",
                     "text_bytes", "text_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if len(other.hist) > len(self.hist):
            self.hist, other_hist = other.hist.copy(), self.hist
        else:
            other_hist = other.hist
        self.hist[: len(other_hist)] += other_hist

    def to_dict(self) -> dict[str, Any]:
        tokens = int(self.hist @ np.arange(len(self.hist)))
        cdf = np.cumsum(self.hist)

        def pct(q: float) -> int:  # nearest-rank percentile, exact from the histogram
            return int(np.searchsorted(cdf, max(1, int(np.ceil(q * self.kept))))) if self.kept else 0

        return {
            "records": self.records, "kept": self.kept, "tokens": tokens,
            "truncated": self.truncated, "dropped_overlong": self.dropped_overlong,
            "dropped_empty": self.dropped_empty,
            "length_mean": round(tokens / self.kept, 3) if self.kept else 0.0,
            "length_p50": pct(0.50), "length_p95": pct(0.95),
            "length_max": int(np.flatnonzero(self.hist).max()) if self.kept else 0,
            "text_bytes": self.text_bytes, "tokens_untruncated": self.text_tokens,
            "bytes_per_token": round(self.text_bytes / self.text_tokens, 4) if self.text_tokens else 0.0,
        }


@dataclass(frozen=True)
class TokenizeResult:
    tokenizer_file: Path
    tokens_dir: Path
    vocab_size: int
    tokenizer_sha256: str
    trained: bool  # False when tokenize.tokenizer_path was reused
    stats: dict[str, Any]


# ---------------------------------------------------------------------------------------
# Contract helpers (CONTRIBUTING.md)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer.json file (or the directory holding one), checked and ready to encode."""
    file = _tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust error says what is wrong; keep its first line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{file}: not a valid tokenizers JSON file ({first})") from None
    for want, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != want:
            raise InputError(f"{file}: special token {token} has id {got}, expected {want} "
                             f"(vaepipe needs {', '.join(SPECIAL_TOKENS)} as ids 0-{len(SPECIAL_TOKENS) - 1})")
    tok.encode_special_tokens = True  # not saved in tokenizer.json; see the module docstring
    return tok


def tokenizer_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of the tokenizer.json bytes (recorded by train/embed to pair models and ids)."""
    return sha256_file(_tokenizer_file(path))


def encode_texts(tokenizer: Tokenizer, texts: Iterable[str]) -> list[np.ndarray]:
    """Ids of each text (no specials), one int64 array per text, as the model consumes them."""
    tokenizer.encode_special_tokens = True  # a literal "<eos>" in a query is text, not id 2
    encs = tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encs]


def _tokenizer_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise InputError(f"{file}: tokenizer file not found")
    return file


# ---------------------------------------------------------------------------------------
# Training


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE whose encode/decode round trip is exact."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterator[list[str]], vocab_size: int, min_frequency: int,
                    length: int | None = None) -> Tokenizer:
    """Train on batches of texts; the specials come first so they get ids 0-3."""
    check_vocab_size(vocab_size)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=BYTE_ALPHABET,  # all 256 bytes, seen in training or not: nothing is lost
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    tok.encode_special_tokens = True
    return tok


def new_word_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    """A word-level tokenizer over ``vocab`` (specials at ids 0-3 included): whitespace words,
    ``<unk>`` for the rest; literal ``<pad>``/``<bos>``/``<eos>`` in a text become ``<unk>``."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(s, UNK) for s in SPECIAL_TOKENS if s != UNK])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no decoder: tokenizers joins the words with one space. <unk> stays a plain word so that
    # decoded text shows it (and evaluate's word counts include it, as He et al. count it)
    tok.add_special_tokens([s for s in SPECIAL_TOKENS if s != UNK])
    tok.encode_special_tokens = True
    return tok


def word_counts(texts: Iterator[list[str]], tok: Tokenizer) -> Counter[str]:
    """How often each word occurs in ``texts``, split as ``tok`` splits them (one Rust call per batch)."""
    counts: Counter[str] = Counter()
    for batch in texts:
        norm = tok.normalizer.normalize_str(" ".join(batch)) if tok.normalizer else " ".join(batch)
        counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(norm))
    return counts


def train_word_tokenizer(texts: Iterator[list[str]], vocab_size: int) -> Tokenizer:
    """The specials (ids 0-3), then the ``vocab_size - 4`` most frequent words of ``texts``
    (ties broken by the word, so the same corpus always gives the same ids)."""
    check_vocab_size(vocab_size, "word")
    counts = word_counts(texts, new_word_tokenizer({s: i for i, s in enumerate(SPECIAL_TOKENS)}))
    for s in SPECIAL_TOKENS:
        counts.pop(s, None)  # <unk> in PTB-style text is the special, not a word of its own
    words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - len(SPECIAL_TOKENS)]
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: i for i, (w, _) in enumerate(words, len(SPECIAL_TOKENS))})
    return new_word_tokenizer(vocab)


def check_vocab_size(vocab_size: int, kind: str = "bpe") -> None:
    if kind == "word":
        if vocab_size < MIN_WORD_VOCAB_SIZE:
            raise ConfigError(f"tokenize.vocab_size: {vocab_size} is too small; a word vocabulary needs at "
                              f"least {MIN_WORD_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + 1 word)")
        return
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"tokenize.vocab_size: {vocab_size} is too small; byte-level BPE needs at least "
                          f"{MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + 256 byte symbols)")


def iter_train_texts(files: list[Path], batch_size: int, sample_bytes: int | None = None) -> Iterator[list[str]]:
    """The train split's texts, one bounded list per Parquet record batch.

    ``sample_bytes`` (``tokenize.train_sample_bytes``): when the train split holds more text
    than this, only the records whose doc_id hash falls below ``sample_bytes / train bytes``
    are yielded: about that many bytes, the same records on every run and engine.
    """
    keep_below = _sample_fraction(files, batch_size, sample_bytes)
    for file in files:
        columns = ("text", "split") if keep_below >= 1.0 else ("doc_id", "text", "split")
        for batch in _iter_batches(file, columns, batch_size):
            mask = pc.equal(batch.column("split"), "train")
            if keep_below < 1.0:
                mask = pc.and_(mask, pc.less(_doc_id_fraction(batch.column("doc_id")), keep_below))
            texts = pc.filter(batch.column("text"), mask)
            if len(texts):
                yield pc.fill_null(texts, "").to_pylist()


def _sample_fraction(files: list[Path], batch_size: int, sample_bytes: int | None) -> float:
    """The doc_id-hash threshold that keeps about ``sample_bytes`` of the train split (1.0: all)."""
    if sample_bytes is None:
        return 1.0
    total = 0
    for file in files:
        for batch in _iter_batches(file, ("text", "split"), batch_size):
            texts = pc.filter(batch.column("text"), pc.equal(batch.column("split"), "train"))
            total += int(pc.sum(pc.binary_length(texts)).as_py() or 0)
    fraction = min(1.0, sample_bytes / total) if total else 1.0
    if fraction < 1.0:
        log.info("training the BPE on a %.1f%% doc_id-hash sample of %.1f MB of train text "
                 "(tokenize.train_sample_bytes)", 100 * fraction, total / 1e6)
    return fraction


def _doc_id_fraction(doc_id: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A uniform number in [0, 1) from the doc_id's hex digits 8-15: the dedup key's second half,
    independent of the last 8 bytes that pick the split."""
    ids = pc.fill_null(doc_id.cast(pa.string()), "0" * 32).to_pylist()
    return pa.array(np.array([int(d[8:16] or "0", 16) for d in ids], dtype=np.float64) / float(1 << 32))


# ---------------------------------------------------------------------------------------
# Encoding: a pure function over one record batch


def output_schema(id_limit: int, metadata: dict[str, str] | None = None,
                  kept: pa.Schema | None = None) -> pa.Schema:
    """uint16 ids when every id (< ``id_limit``) fits: half the bytes of int32; else int32.
    The ``kept`` columns (``kept_columns``) follow ``n_tokens``."""
    id_type = pa.uint16() if id_limit <= 1 << 16 else pa.int32()
    return pa.schema([("doc_id", pa.string()), ("split", pa.string()),
                      ("ids", pa.list_(id_type)), ("n_tokens", pa.int32()), *(kept or [])], metadata=metadata)


def kept_columns(files: list[Path]) -> pa.Schema:
    """The corpus columns beyond its own (``ingest.keep_columns``), the same in every file."""
    def schema_of(file: Path) -> pa.Schema:
        try:
            return pq.read_schema(file)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{file}: not a valid Parquet file ({str(e).splitlines()[0]}); "
                             "rerun `vaepipe ingest`") from None

    return same_kept_columns(files, schema_of, CORPUS_COLUMNS, "vaepipe ingest")


def same_kept_columns(files: list[Path], schema_of: Callable[[Path], pa.Schema], own: Sequence[str],
                      rerun: str) -> pa.Schema:
    """The columns of ``files`` beyond ``own``: the kept ones, which must be the same (names
    and types) in every file; InputError naming the first file that differs."""
    first: pa.Schema | None = None
    for file in files:
        kept = pa.schema([f for f in schema_of(file) if f.name not in own])
        if first is None:
            first = kept
        elif not kept.equals(first):
            raise InputError(f"{file}: its kept columns ({kept.names}) differ from {files[0].name}'s "
                             f"({first.names}); rerun `{rerun}`")
    return first if first is not None else pa.schema([])


def encode_record_batch(tok: Tokenizer, batch: pa.RecordBatch, max_tokens: int, overlong: str,
                        schema: pa.Schema) -> tuple[pa.RecordBatch, dict[str, SplitStats]]:
    """Encode one corpus record batch -> (token record batch, per-split counters).

    Records over ``max_tokens`` are cut to their first ``max_tokens`` ids (``truncate``) or
    left out (``drop``); records of 0 tokens are left out. Order is kept.
    """
    encs = tok.encode_batch_fast(_texts(batch), add_special_tokens=False)
    return assemble_record_batch(batch, encs, max_tokens, overlong, schema)


def assemble_record_batch(batch: pa.RecordBatch, encs: list[Encoding], max_tokens: int, overlong: str,
                          schema: pa.Schema) -> tuple[pa.RecordBatch, dict[str, SplitStats]]:
    """The second half of ``encode_record_batch``: encodings of ``batch``'s texts -> output."""
    text = pc.fill_null(batch.column("text"), "")
    seqs = [e.ids for e in encs]
    full = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    over = full > max_tokens
    keep = (full > 0) & ~over if overlong == "drop" else full > 0
    if overlong == "truncate" and over.any():
        seqs = [s[:max_tokens] if len(s) > max_tokens else s for s in seqs]
    n = np.minimum(full, max_tokens)
    nbytes = pc.binary_length(text).to_numpy(zero_copy_only=False)
    split = batch.column("split").cast(pa.string())  # a dictionary-encoded column, too
    stats: dict[str, SplitStats] = {}
    for s in SPLITS:
        m = pc.fill_null(pc.equal(split, s), False).to_numpy(zero_copy_only=False)
        if not m.any():
            continue
        st = stats[s] = SplitStats()
        st.records = int(m.sum())
        nonempty = m & (full > 0)
        st.kept = int((m & keep).sum())
        st.dropped_empty = int((m & (full == 0)).sum())
        st.truncated = int((m & over).sum()) if overlong == "truncate" else 0
        st.dropped_overlong = int((m & over).sum()) if overlong == "drop" else 0
        st.text_bytes = int(nbytes[nonempty].sum())
        st.text_tokens = int(full[nonempty].sum())
        st.hist = np.bincount(n[m & keep]).astype(np.int64)
    ids = pa.array(seqs, type=schema.field("ids").type)
    kept = [batch.column(name) for name in schema.names[len(TOKEN_COLUMNS):]]  # row-aligned copies
    out = pa.RecordBatch.from_arrays(
        [batch.column("doc_id").cast(pa.string()), split, ids, pa.array(n, type=pa.int32()), *kept],
        schema=schema)
    if not keep.all():
        out = out.filter(pa.array(keep))
    return out, stats


# ---------------------------------------------------------------------------------------
# The stage


EncodedBatches = Iterator[tuple[pa.RecordBatch, dict[str, SplitStats]]]
# (tokenizer, corpus files, corpus root, output dir, output schema) -> each file's per-split
# counters, in file order, once its token file is written under the output dir
WriteFiles = Callable[[Tokenizer, list[Path], Path, Path, pa.Schema], Iterator[dict[str, SplitStats]]]


def run(params: Params, *, wait: bool = False, write_files: WriteFiles | None = None) -> TokenizeResult:
    """Train or load the tokenizer, encode every split, write tokens + stats atomically.

    Holds the write locks of ``paths.tokenizer`` and ``paths.tokens`` while it runs.
    ``write_files``: where the token files are encoded and written (default: here,
    ``local_writer(params)``; the Ray engine's actors write them into the same staging
    directory, with the same names and bytes); the stats, the tokenizer and the atomic swap
    into place stay here.
    """
    with staged(params, "tokenize") as params, output_locks(stage_outputs(params, "tokenize"), wait=wait):
        return _run(params, write_files or local_writer(params))


def local_writer(params: Params) -> WriteFiles:
    """Encode and write in this process, one corpus file after another."""
    cfg = params.tokenize

    def write(tok: Tokenizer, files: list[Path], corpus_root: Path, out_dir: Path,
              schema: pa.Schema) -> Iterator[dict[str, SplitStats]]:
        unchecked = cfg.tokenizer_path  # ours round-trips (tested); a reused one is spot-checked once
        for file in files:
            stats = write_token_file(token_file(out_dir, corpus_root, file), schema,
                                     encode_file(tok, file, schema, cfg.batch_size, cfg.max_tokens, cfg.overlong,
                                                 check_source=unchecked))
            unchecked = unchecked if not stats else None
            yield stats

    return write


def encode_file(tok: Tokenizer, file: Path, schema: pa.Schema, batch_size: int, max_tokens: int, overlong: str,
                check_source: str | None = None) -> EncodedBatches:
    """The token batches of one corpus file with their per-split counters, cut as every engine
    cuts them (``read_corpus_batches``), the next batch encoded while this one is assembled.
    ``check_source``: a reused tokenizer, whose first batch is decoded to warn if it is lossy."""
    for batch, encs in _encode_ahead(tok, read_corpus_batches(file, schema, batch_size)):
        if check_source:
            check_source = None if _warn_if_lossy(tok, batch, encs, check_source) else check_source
        encoded, stats = assemble_record_batch(batch, encs, max_tokens, overlong, schema)
        del encs  # about 0.5 kB per token: gone before the next batch arrives
        yield encoded, stats


def token_file(out_dir: Path, corpus_root: Path, corpus_file: Path) -> Path:
    """The token file of ``corpus_file``: the same relative name under ``out_dir``."""
    return out_dir / corpus_file.relative_to(corpus_root)


def write_token_file(path: Path, schema: pa.Schema, batches: EncodedBatches) -> dict[str, SplitStats]:
    """Write ``batches`` (a row group each) to the token file ``path`` (one with no rows too);
    their per-split counters, summed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    totals: dict[str, SplitStats] = {}
    # page checksums: a flipped bit in a token file fails the read instead of changing ids
    with pq.ParquetWriter(path, schema, compression="zstd", write_page_checksum=True) as writer:
        for batch, stats in batches:
            writer.write_batch(batch)
            for s, st in stats.items():
                totals.setdefault(s, SplitStats()).update(st)
    return totals


def read_corpus_batches(file: Path, schema: pa.Schema, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The record batches of one corpus file that encoding reads (the same on every engine,
    so the token files' row groups are too)."""
    kept = schema.names[len(TOKEN_COLUMNS):]
    return _iter_batches(file, (*CORPUS_READ, *kept), batch_size)


def _run(params: Params, write_files: WriteFiles) -> TokenizeResult:
    cfg, paths = params.tokenize, params.paths
    if not cfg.tokenizer_path:
        check_vocab_size(cfg.vocab_size, cfg.kind)  # a config error before any corpus is read
    files = corpus_files(paths.corpus)
    counts = split_counts(files)
    for s in SPLITS:
        if not counts.get(s):
            raise InputError(f"{paths.corpus}: split {s!r} has no records "
                             "(check ingest.valid_fraction / ingest.test_fraction and the inputs)")
    if cfg.tokenizer_path:
        tok = load_tokenizer(cfg.tokenizer_path)
        # copied byte for byte, so its hash stays the one the user knows
        tok_json = _tokenizer_file(cfg.tokenizer_path).read_bytes()
        log.info("reusing tokenizer %s (vocab %d; tokenize.kind, vocab_size and min_frequency unused)",
                 cfg.tokenizer_path, tok.get_vocab_size())
    elif cfg.kind == "word":
        log.info("building a word vocabulary (vocab_size %d) from %d train records", cfg.vocab_size, counts["train"])
        tok = train_word_tokenizer(iter_train_texts(files, cfg.batch_size, cfg.train_sample_bytes), cfg.vocab_size)
    else:
        log.info("training byte-level BPE (vocab_size %d) on %d train records", cfg.vocab_size, counts["train"])
        tok = train_tokenizer(iter_train_texts(files, cfg.batch_size, cfg.train_sample_bytes), cfg.vocab_size,
                              cfg.min_frequency, length=counts["train"])
    if not cfg.tokenizer_path:
        tok_json = tok.to_str(pretty=True).encode("utf-8")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tok_sha = hashlib.sha256(tok_json).hexdigest()
    # ids need not be contiguous in a hand-made tokenizer.json: size the id type by the largest
    id_limit = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    kept = kept_columns(files)
    schema = output_schema(id_limit, {TOKENIZER_META_KEY: tok_sha, "vaepipe.vocab_size": str(vocab_size)}, kept)
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "off", "no"):
        log.warning("TOKENIZERS_PARALLELISM=%s: encoding on one core", os.environ["TOKENIZERS_PARALLELISM"])

    totals = {s: SplitStats() for s in SPLITS}
    t0 = time.perf_counter()
    with atomic_dir(paths.tokens) as tmp:
        for stats in write_files(tok, files, Path(paths.corpus), tmp, schema):
            for s, st in stats.items():
                totals[s].update(st)
        per_split = {s: totals[s].to_dict() for s in SPLITS}
        n_tok = sum(st["tokens_untruncated"] for st in per_split.values())
        secs = time.perf_counter() - t0
        log.info("encoded %d tokens in %.1f s (%.0f tokens/s)", n_tok, secs, n_tok / max(secs, 1e-9))
        for s, st in per_split.items():
            if not st["kept"]:
                raise InputError(f"{paths.corpus}: every record of split {s!r} was dropped "
                                 f"(tokenize.max_tokens={cfg.max_tokens}, tokenize.overlong={cfg.overlong})")
            log.info("%s: %d records, %d tokens, mean %.1f, p95 %d, truncated %d, dropped %d overlong + %d empty",
                     s, st["kept"], st["tokens"], st["length_mean"], st["length_p95"], st["truncated"],
                     st["dropped_overlong"], st["dropped_empty"])
        stats_all = {
            "vocab_size": vocab_size, "tokenizer_sha256": tok_sha,
            "tokenizer_source": cfg.tokenizer_path or "trained",
            "max_tokens": cfg.max_tokens, "overlong": cfg.overlong,
            "id_type": str(schema.field("ids").type.value_type),
            "tokens": sum(st["tokens"] for st in per_split.values()),
            "splits": per_split,
        }
        write_json(tmp / STATS_FILE, stats_all)
        # the tokenizer goes in last, just before the tokens are renamed into place
        with atomic_dir(paths.tokenizer) as tok_dir:
            atomic_write_bytes(tok_dir / TOKENIZER_FILE, tok_json)
    return TokenizeResult(
        tokenizer_file=Path(paths.tokenizer) / TOKENIZER_FILE, tokens_dir=Path(paths.tokens),
        vocab_size=vocab_size, tokenizer_sha256=tok_sha, trained=not cfg.tokenizer_path, stats=stats_all,
    )


def corpus_files(corpus: str | os.PathLike[str]) -> list[Path]:
    """The corpus Parquet shards, sorted (stable output names and order); names starting with
    "." or "_" are skipped, as pyarrow/pandas/DuckDB skip them when they read the folder."""
    root = Path(corpus)
    files = sorted(p for p in root.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
                   ) if root.is_dir() else []
    if not files:
        raise InputError(f"{root}: no corpus Parquet files (run `vaepipe ingest` first)")
    return files


def split_counts(files: list[Path]) -> dict[str, int]:
    """Records per split, reading only the split column; unknown split names are an error."""
    counts: dict[str, int] = {}
    for file in files:
        for batch in _iter_batches(file, ("split",), 1 << 16):
            vc = pc.value_counts(batch.column("split"))
            for name, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
                if name not in SPLITS:
                    raise InputError(f"{file}: unknown split {name!r} (allowed: {', '.join(SPLITS)})")
                counts[name] = counts.get(name, 0) + n
    return counts


def _iter_batches(file: Path, columns: tuple[str, ...], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns``, page checksums verified, with a one-line InputError for
    an empty, truncated or damaged file."""
    try:
        pf = pq.ParquetFile(file, page_checksum_verification=True)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise InputError(f"{file}: missing column {missing[0]!r} (a corpus needs {', '.join(CORPUS_READ)})")
        yield from pf.iter_batches(batch_size=batch_size, columns=list(columns))
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # the OS refused (EACCES, EIO): not the format
            raise InputError(f"{file}: cannot read ({e.strerror})") from None
        why = str(e).splitlines()[0].strip() if str(e) else type(e).__name__
        if "checksum" in why.lower():  # same wording as vaepipe.ml.data.parquet_problem
            raise InputError(f"{file}: a damaged Parquet page (page checksum mismatch: {why}); "
                             "rerun `vaepipe ingest`") from None
        raise InputError(f"{file}: not a valid Parquet file ({why}); rerun `vaepipe ingest`") from None


def _warn_if_lossy(tok: Tokenizer, batch: pa.RecordBatch, encs: list[Encoding], source: str | None) -> bool:
    """Decode the first records of a reused tokenizer's first batch; warn if text changes
    (a normaliser, a prefix space, a non-byte-level model): ids would no longer mean the text."""
    texts = _texts(batch)[:64]
    bad = sum(tok.decode(e.ids, skip_special_tokens=False) != t for e, t in zip(encs, texts, strict=False))
    if bad:
        log.warning("tokenizer %s does not round-trip %d of %d sample records: decoding will not give "
                    "back the corpus text exactly", source, bad, len(texts))
    return True


def _texts(batch: pa.RecordBatch) -> list[str]:
    return pc.fill_null(batch.column("text"), "").to_pylist()


def _encode_ahead(tok: Tokenizer, batches: Iterable[pa.RecordBatch],
                  ) -> Iterator[tuple[pa.RecordBatch, list[Encoding]]]:
    """``(batch, encodings)`` pairs, encoding batch k+1 while the caller assembles and writes k.

    ``encode_batch_fast`` releases the GIL and fans out over all cores itself; this one helper
    thread only overlaps our serial Python/Arrow work (ids -> Arrow, Parquet I/O) with it, which
    matters on many-core machines where that serial part would otherwise set the pace.
    At most two batches are in flight, so memory stays bounded by ``tokenize.batch_size``.
    """
    it = iter(batches)
    cur = next(it, None)
    if cur is None:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bpe-encode") as pool:
        fut: Future[list[Encoding]] = pool.submit(tok.encode_batch_fast, _texts(cur), add_special_tokens=False)
        for nxt in it:
            encs = fut.result()
            fut = pool.submit(tok.encode_batch_fast, _texts(nxt), add_special_tokens=False)
            yield cur, encs
            del encs  # with the caller's `del`: two batches of Encodings alive at most
            cur = nxt
        yield cur, fut.result()
