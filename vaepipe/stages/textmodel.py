"""Both directions of a trained model, text -> latent and latent -> text, in one object.

    from vaepipe.stages.textmodel import load          # or: import vaepipe; vaepipe.load(...)
    m = load("models/vae")
    Z = m.encode(["a sentence", "another one"])        # (2, latent_dim) float32 posterior means
    m.decode(Z, strategy="beam", beam_size=5)          # -> list of 2 strings
    m.reconstruct(["a sentence"], strategy="sample", top_p=0.9, seed=1)
    m.sample(5)                                        # z ~ N(0, I), greedy decoding
    m.interpolate("sentence A", "sentence B", steps=7)

Texts are normalised as the corpus was (``ingest.lowercase`` of the training run) and
tokenised with the model's own tokenizer. Decoding options are the fields of
``vaepipe.ml.decoding.Decoding`` as keyword arguments (``strategy``, ``beam_size``,
``temperature``, ``top_k``, ``top_p``, ``max_tokens``, ``seed``); every call is batched on the
model's device and deterministic for its ``seed``. Bad arguments (an empty list, a latent of
the wrong width, NaN in z, an unknown strategy, ...) raise ``ConfigError`` with a one-line
message; an LM baseline (``kind: lm``) can only ``sample``.

Where ``load`` finds the tokenizer when none is given, first match wins:

1. a text model package (the folder MLflow registers: ``model/`` + ``tokenizer.json`` +
   ``text_model.json``) carries its own;
2. ``tokenizer.json`` inside the model folder;
3. ``paths.tokenizer`` recorded in the model's ``config.json`` (the training run's);
4. ``paths.tokenizer`` of ``./params.yaml``;
5. ``data/tokenizer`` (the default).

A candidate whose sha256 differs from the ``tokenizer_hash`` in ``config.json`` is skipped; when
candidates exist but none matches, ``load`` raises ``InputError`` naming them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vaepipe.core.errors import ConfigError, InputError
from vaepipe.core.text import normalize_text
from vaepipe.ml import checkpoint
from vaepipe.ml.data import collate, token_batches
from vaepipe.ml.decoding import Decoding, decode_ids
from vaepipe.ml.device import resolve_device
from vaepipe.stages import tokenize
from vaepipe.stages.package import PACKAGE_FILE, TextModelPackage

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from vaepipe.ml.model import TextVAE

log = logging.getLogger(__name__)

# tokens per encoder batch: bounds memory for long lists of texts
ENCODE_BATCH_TOKENS = 32768
DEFAULT_TOKENIZER = "data/tokenizer"


class TextModel:
    """A trained model with its tokenizer: encode, decode, reconstruct, sample, interpolate.

    Build it with ``load`` (or ``vaepipe.load``); the constructor takes the pieces directly.
    ``lowercase`` must be the corpus's ``ingest.lowercase`` so that inputs are normalised as
    the training texts were; ``batch_tokens`` bounds the tokens of one encoder batch.
    """

    def __init__(self, model: TextVAE, tokenizer: Tokenizer, device: torch.device | str, *,
                 lowercase: bool = False, batch_tokens: int = ENCODE_BATCH_TOKENS) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.lowercase = lowercase
        self.batch_tokens = batch_tokens  # token budget of one encoder batch

    @property
    def kind(self) -> str:
        """``vae`` (both directions) or ``lm`` (a language model without latent: sample only)."""
        return self.model.cfg.kind

    @property
    def latent_dim(self) -> int:
        """Width of a latent vector (0 for an LM)."""
        return self.model.cfg.latent_dim if self.model.cfg.has_latent else 0

    def __repr__(self) -> str:
        cfg = self.model.cfg
        return f"TextModel(kind={cfg.kind!r}, decoder={cfg.decoder!r}, latent_dim={self.latent_dim}, device={self.device})"

    # -- text -> latent ----------------------------------------------------------------

    def encode(self, texts: Sequence[str], return_logvar: bool = False, *,
               empty: str = "error") -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Posterior means (N, latent_dim) float32 of ``texts``, in order; with ``return_logvar``
        also the posterior log-variances, as ``(mu, logvar)``.

        A text with no tokens after normalisation is a ConfigError, or a row of NaN with
        ``empty="nan"`` (what the registered MLflow model returns for it).
        """
        self._need_latent("encode")
        if empty not in ("error", "nan"):
            raise ValueError(f"empty must be 'error' or 'nan', not {empty!r}")
        seqs = self._token_ids(texts, allow_empty=empty == "nan")
        n, zdim = len(seqs), self.latent_dim
        mu = np.full((n, zdim), np.nan, dtype=np.float32)
        lv = np.full((n, zdim), np.nan, dtype=np.float32)
        keep = np.flatnonzero([len(s) > 0 for s in seqs])
        lengths = np.array([len(seqs[i]) for i in keep], dtype=np.int64)
        with torch.inference_mode():
            for idx in token_batches(lengths, self.batch_tokens, shuffle=False) if len(keep) else []:
                rows = keep[idx]
                ids, lens = collate([seqs[i] for i in rows])
                m, v = self.model.encode(ids.to(self.device), lens.to(self.device))  # (B, Z)
                mu[rows] = m.float().cpu().numpy()
                lv[rows] = v.float().cpu().numpy()
        return (mu, lv) if return_logvar else mu

    # -- latent -> text ----------------------------------------------------------------

    def decode(self, z: Any, **decoding: Any) -> list[str]:
        """One text per row of ``z`` (array-like (N, latent_dim); one 1-D vector is one row)."""
        self._need_latent("decode")
        dec = Decoding.from_kwargs(**decoding)
        return self._texts(decode_ids(self.model, self._latents(z), dec))

    def reconstruct(self, texts: Sequence[str], **decoding: Any) -> list[str]:
        """Decode the posterior mean of each text: how much of it the latent keeps."""
        self._need_latent("reconstruct")
        dec = Decoding.from_kwargs(**decoding)
        mu = self.encode(texts)
        return self._texts(decode_ids(self.model, torch.from_numpy(mu), dec))

    def sample(self, n: int, **decoding: Any) -> list[str]:
        """``n`` texts from the prior: z ~ N(0, I) drawn with the decoding ``seed``, then decoded.

        An LM (no latent) samples ``n`` texts from its own distribution.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n: the number of samples must be an integer >= 1, got {n!r}")
        dec = Decoding.from_kwargs(**decoding)
        if not self.model.cfg.has_latent:
            return self._texts(decode_ids(self.model, None, dec, num=n))
        # drawn on the CPU: the same seed gives the same z on every device
        gen = torch.Generator().manual_seed(dec.seed)
        z = torch.randn(n, self.latent_dim, generator=gen)
        return self._texts(decode_ids(self.model, z, dec))

    def interpolate(self, text_a: str, text_b: str, steps: int = 5, **decoding: Any) -> list[str]:
        """``steps`` texts decoded along the line from E[z|a] to E[z|b], both ends included."""
        self._need_latent("interpolate")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ConfigError(f"steps: an interpolation needs an integer >= 2 steps, got {steps!r}")
        dec = Decoding.from_kwargs(**decoding)
        ends = torch.from_numpy(self.encode([text_a, text_b]))
        return self._texts(decode_ids(self.model, interpolation_path(ends[0], ends[1], steps), dec))

    # -- helpers -----------------------------------------------------------------------

    def _need_latent(self, what: str) -> None:
        if not self.model.cfg.has_latent:
            raise ConfigError(f"{what}: a kind 'lm' model has no latent space (only sample works); "
                              "load a VAE (model.kind: vae)")

    def _token_ids(self, texts: Sequence[str], *, allow_empty: bool) -> list[np.ndarray]:
        if isinstance(texts, str):
            raise ConfigError("texts: expected a list of strings, got one string")
        texts = list(texts)
        if not texts:
            raise ConfigError("texts: the list of texts is empty")
        clean = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                if allow_empty:
                    clean.append("")
                    continue
                raise ConfigError(f"texts[{i}]: expected a string, got {type(t).__name__}")
            clean.append(normalize_text(t, self.lowercase))
        seqs = tokenize.encode_texts(self.tokenizer, clean)
        if not allow_empty:
            for i, s in enumerate(seqs):
                if len(s) == 0:
                    raise ConfigError(f"texts[{i}]: {str(texts[i])[:60]!r} is empty after normalisation")
        return seqs

    def _latents(self, z: Any) -> torch.Tensor:
        """``z`` as a checked (N, latent_dim) float32 tensor."""
        try:
            arr = np.asarray(z.detach().cpu() if isinstance(z, torch.Tensor) else z, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"z: not an array of numbers ({e})") from None
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ConfigError(f"z: expected a non-empty (N, {self.latent_dim}) array, got shape {tuple(arr.shape)}")
        if arr.shape[1] != self.latent_dim:
            raise ConfigError(f"z: latent vectors of size {arr.shape[1]}, the model's latent_dim is {self.latent_dim}")
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        if len(bad):
            raise ConfigError(f"z: row {int(bad[0])} holds NaN or infinity ({len(bad)} rows in all)")
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _texts(self, seqs: list[list[int]]) -> list[str]:
        return self.tokenizer.decode_batch(seqs, skip_special_tokens=True)


def interpolation_path(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """(steps, Z): ``(1 - t) a + t b`` for t evenly spaced in [0, 1]; the ends are exactly a and b."""
    t = torch.linspace(0, 1, steps, dtype=a.dtype)[:, None]
    return (1 - t) * a + t * b


# ---------------------------------------------------------------------------------------
# Loading


def load(model_dir: str | Path, *, tokenizer: str | Path | Tokenizer | None = None,
         device: str | torch.device = "auto", lowercase: bool | None = None) -> TextModel:
    """The trained model in ``model_dir`` (``best.pt`` + ``config.json``) or a text model package.

    ``tokenizer``: a tokenizer.json file, its folder or a loaded ``tokenizers.Tokenizer``;
    when None it is found as the module docstring says. ``device``: ``auto`` (CUDA when
    present), ``cpu``, ``cuda``, ``cuda:1`` ... ``lowercase``: the corpus's ``ingest.lowercase``
    (default: the package's setting, else the one recorded in ``config.json``). InputError for a
    missing or broken model, or a tokenizer other than the one the model was trained with.
    """
    root = Path(model_dir)
    if (root / PACKAGE_FILE).is_file():
        package = TextModelPackage.read(root)
        root = package.model_dir
        lowercase = package.lowercase if lowercase is None else lowercase
        if tokenizer is None:
            tokenizer = package.tokenizer_file
    dev = device if isinstance(device, torch.device) else resolve_device(str(device), "device")
    model, config = checkpoint.load_model(root, which="best", device=dev)
    if lowercase is None:
        lowercase = bool(((config.get("params") or {}).get("ingest") or {}).get("lowercase", False))
    tok = _resolve_tokenizer(root, config, tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab != model.cfg.vocab_size:
        raise InputError(f"{root}: the tokenizer's vocabulary size {vocab} differs from the model's "
                         f"vocab_size {model.cfg.vocab_size}")
    return TextModel(model, tok, dev, lowercase=lowercase)


def _resolve_tokenizer(model_dir: Path, config: dict[str, Any], given: Any) -> Tokenizer:
    if given is not None and not isinstance(given, (str, Path)):
        return given  # a loaded Tokenizer: the caller vouches for it
    want = config.get("tokenizer_hash")
    if given is not None:
        _check_hash(Path(given), want, model_dir)
        return tokenize.load_tokenizer(given)
    candidates = _tokenizer_candidates(model_dir, config)
    present = [c for c in candidates if (c / tokenize.TOKENIZER_FILE if c.is_dir() else c).is_file()]
    for c in present:
        if not want or tokenize.tokenizer_hash(c) == want:
            log.info("tokenizer for %s: %s", model_dir, c)
            return tokenize.load_tokenizer(c)
    if present:
        raise InputError(f"{model_dir}: no tokenizer matching the model's (sha256 {want[:12]}) among "
                         f"{', '.join(map(str, present))}; pass tokenizer=")
    raise InputError(f"{model_dir}: no tokenizer found (looked in {', '.join(map(str, candidates))}); pass tokenizer=")


def _check_hash(path: Path, want: str | None, model_dir: Path) -> None:
    got = tokenize.tokenizer_hash(path)
    if want and got != want:
        raise InputError(f"{path}: tokenizer sha256 {got[:12]} differs from the one the model was "
                         f"trained with ({want[:12]}, {model_dir}/config.json)")


def _tokenizer_candidates(model_dir: Path, config: dict[str, Any]) -> list[Path]:
    out = [model_dir / tokenize.TOKENIZER_FILE]
    trained = ((config.get("params") or {}).get("paths") or {}).get("tokenizer")
    if trained:
        out.append(Path(trained))
    local = _params_yaml_tokenizer(Path("params.yaml"))
    if local:
        out.append(Path(local))
    out.append(Path(DEFAULT_TOKENIZER))
    return list(dict.fromkeys(out))


def _params_yaml_tokenizer(path: Path) -> str | None:
    """paths.tokenizer of a params.yaml, or None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        value = data["paths"]["tokenizer"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None

