"""Which torch device a stage runs on: the one reading of ``train.device``, ``evaluate.device``
and ``embed.device``."""

from __future__ import annotations

import torch

from vaepipe.core.errors import ConfigError


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a ConfigError naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name} requested but torch sees no CUDA device")
    return torch.device(name)
