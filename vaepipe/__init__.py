"""vaepipe: a batch pipeline for variational autoencoder language models.

    import vaepipe
    m = vaepipe.load("models/vae")      # or "models:/vaepipe-text-vae@candidate", "runs:/ID/text_model"
    m.encode(["a sentence"]); m.decode(Z); m.reconstruct(texts); m.sample(5); m.interpolate(a, b)

``import vaepipe`` stays light: torch, tokenizers and mlflow are imported by ``load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vaepipe.stages.textmodel import TextModel

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def load(source: str | Path, *, device: str | torch.device = "auto", tokenizer: Any = None,
         tracking_uri: str | None = None) -> TextModel:
    """A trained model as a ``TextModel`` (encode, decode, reconstruct, sample, interpolate).

    ``source``: a local model folder (``best.pt`` + ``config.json``, e.g. ``models/vae``), a
    text model package, or an MLflow URI (``models:/NAME@alias``, ``models:/NAME/VERSION``,
    ``runs:/RUN_ID/PATH``) downloaded from ``tracking_uri`` (default: MLflow's own setting,
    e.g. ``MLFLOW_TRACKING_URI``). ``tokenizer``: see ``vaepipe.stages.textmodel.load``.
    ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` ...
    """
    # by name at call time: every layer imports this package (for __version__), so a static
    # import here would make the stages reach the MLflow adapter (import-linter's layers)
    from importlib import import_module

    if str(source).startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        adapter = import_module("vaepipe.adapters.mlflow_load")
        return adapter.load_from_mlflow(str(source), device=device, tokenizer=tokenizer, tracking_uri=tracking_uri)
    return import_module("vaepipe.stages.textmodel").load(source, tokenizer=tokenizer, device=device)
