"""Checkpoints: tensors + JSON only, written atomically, loaded with ``weights_only=True``.

A model directory (``paths.model`` for a VAE, ``paths.baseline`` for the LM) holds:

    best.pt      {"format", "model": state_dict, "step", "epoch", "metrics"} (best validation ELBO)
    last.pt      the same plus "optimizer", RNG states and the data position (for resume)
    config.json  {"model": VAEConfig, "tokenizer_hash", "data_hash", "params", "format"}
    run.json     {"run_id", "tracking_uri"} of the tracking run (vaepipe.core.run_info)

No pickled modules (nanoGPT's ``model_args`` idea): the network is rebuilt from config.json
and the state dict loaded into it, so a checkpoint never executes code when read.
``load_model`` refuses weights that are not finite (a diverged run), so no caller computes
with NaN.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vaepipe.core.errors import InputError
from vaepipe.core.io import atomic_write_bytes, write_json
from vaepipe.ml.model import TextVAE, VAEConfig

FORMAT = 1
CONFIG_FILE = "config.json"
BEST = "best.pt"
LAST = "last.pt"


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_state``; InputError when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable checkpoint ({msg[:200]})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def write_config(model_dir: str | Path, cfg: VAEConfig, *, tokenizer_hash: str | None,
                 params: dict[str, Any] | None, data_hash: str | None = None) -> Path:
    """config.json: what ``load_model`` needs to rebuild the network, plus provenance:
    the sha256 of the tokenizer and of the token data it was trained on (``train.resume``
    checks both)."""
    path = Path(model_dir) / CONFIG_FILE
    write_json(path, {"format": FORMAT, "model": cfg.to_dict(), "tokenizer_hash": tokenizer_hash,
                      "data_hash": data_hash, "params": params})
    return path


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """Parsed config.json with ``"model"`` validated as a VAEConfig dict; InputError otherwise."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{path}: not found (train a model first: `vaepipe train`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise InputError(f"{path}: missing the 'model' section")
    try:
        VAEConfig.from_dict(data["model"])
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: bad 'model' section ({e})") from None
    return data


def model_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict inside a checkpoint (a bare state dict is accepted too)."""
    inner = state.get("model", state)
    if not isinstance(inner, dict) or not all(isinstance(v, torch.Tensor) for v in inner.values()):
        raise ValueError("no model state dict")
    return inner


def nonfinite_entry(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor in ``tensors`` holding a NaN or an
    infinity (a diverged run's weights), or None when all are finite."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def load_model(model_dir: str | Path, which: str = "best",
               device: str | torch.device = "cpu") -> tuple[TextVAE, dict[str, Any]]:
    """Rebuild the model from config.json, load ``best.pt`` or ``last.pt``; eval mode.

    Raises InputError when the directory, config or checkpoint is absent, corrupt, does not
    match the configuration (wrong shapes or keys), or holds non-finite weights.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', not {which!r}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: model directory not found (train a model first: `vaepipe train`)")
    config = read_config(model_dir)
    cfg = VAEConfig.from_dict(config["model"])
    ckpt_path = model_dir / (BEST if which == "best" else LAST)
    state = load_state(ckpt_path, map_location="cpu")
    model = TextVAE(cfg)
    try:
        model.load_state_dict(model_state(state), strict=True)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise InputError(
            f"{ckpt_path}: does not match {model_dir / CONFIG_FILE} ({' '.join(first[:2])[:300]})"
        ) from None
    bad = nonfinite_entry(model.state_dict())
    if bad is not None:
        raise InputError(f"{ckpt_path}: non-finite weights in {bad}; retrain")
    model.to(device).eval()
    return model, config
