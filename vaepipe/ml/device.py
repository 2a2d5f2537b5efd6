"""Which torch device a stage runs on: the one reading of ``train.device``, ``evaluate.device``
and ``embed.device``; and ``torch_threads``, a stage's CPU thread count scoped to the stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vaepipe.core.errors import ConfigError


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a ConfigError naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name} requested but torch sees no CUDA device")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count on exit.

    ``n == 0`` leaves torch's setting alone (the ``*.num_threads: 0`` default). The setting is
    process-wide, so a stage that changes it must give it back, also when it raises.
    """
    if not n:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
