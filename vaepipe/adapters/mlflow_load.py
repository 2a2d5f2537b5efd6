"""Open a model logged or registered in MLflow as a ``TextModel`` (what ``vaepipe.load`` does
with ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH`` ...).

The URI is downloaded with ``mlflow.artifacts.download_artifacts`` into a temporary folder;
in the registered pyfunc's layout (``MLmodel`` naming the ``model`` and ``tokenizer``
artifacts, ``vaepipe.adapters.mlflow_model``) the checkpoint folder and the tokenizer are read
from there, with the corpus's ``lowercase`` from its model config. A download that is a plain
model folder (``config.json`` + ``best.pt``) or a text model package loads as such. Everything
is in memory once loaded, so the temporary folder is removed before returning.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vaepipe.core.errors import InputError
from vaepipe.ml import checkpoint
from vaepipe.stages.textmodel import TextModel
from vaepipe.stages.textmodel import load as load_local

if TYPE_CHECKING:
    import torch

# what vaepipe.adapters.mlflow_model logs (kept literal: that module imports pandas)
ARTIFACT_MODEL = "model"
ARTIFACT_TOKENIZER = "tokenizer"
CONFIG_KEY = "text_model"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(source: str | Path) -> bool:
    """True for a ``models:/``, ``runs:/`` or ``mlflow-artifacts:/`` URI."""
    return isinstance(source, str) and source.startswith(URI_SCHEMES)


def load_from_mlflow(uri: str, *, device: str | torch.device = "auto", tokenizer: Any = None,
                     tracking_uri: str | None = None) -> TextModel:
    """Download ``uri`` (from ``tracking_uri``, default: MLflow's own setting) and load it."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="vaepipe-load-") as tmp:
        try:
            local = Path(_download(uri, tmp, tracking_uri))
        except MlflowException as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"{uri}: cannot download the model from MLflow ({first[:300]})") from None
        return load_downloaded(local, device=device, tokenizer=tokenizer)


def _download(uri: str, dst: str, tracking_uri: str | None) -> str:
    import mlflow.artifacts

    if uri.startswith("models:/") and tracking_uri is not None:
        # MLflow resolves models:/ with the process-wide registry URI whatever it is passed:
        # resolve it here with a client of our own, leaving the process's settings alone
        uri = _model_download_uri(uri, tracking_uri)
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri)


def _model_download_uri(uri: str, tracking_uri: str) -> str:
    """Where the files of ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``models:/ID`` are."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = get_model_name_and_version(client, uri)
    if len(found) == 1:  # a logged model's id
        return client.get_logged_model(found[0]).artifact_location
    return client.get_model_version_download_uri(*found)


def load_downloaded(local: Path, *, device: str | torch.device = "auto", tokenizer: Any = None) -> TextModel:
    """A downloaded pyfunc folder (MLmodel), text model package or model folder -> TextModel."""
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        if (local / checkpoint.CONFIG_FILE).is_file() or (local / "text_model.json").is_file():
            return load_local(local, tokenizer=tokenizer, device=device)
        raise InputError(f"{local}: neither an MLflow model (MLmodel) nor a vaepipe model folder")
    flavor = (yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}).get("flavors", {}).get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    try:
        model_dir = local / artifacts[ARTIFACT_MODEL]["path"]
        tok_file = local / artifacts[ARTIFACT_TOKENIZER]["path"]
    except (KeyError, TypeError):
        raise InputError(f"{mlmodel}: not a vaepipe text model (no {ARTIFACT_MODEL!r}/{ARTIFACT_TOKENIZER!r} "
                         "artifacts)") from None
    conf = (flavor.get("model_config") or {}).get(CONFIG_KEY) or {}
    lowercase = bool(conf["lowercase"]) if "lowercase" in conf else None
    return load_local(model_dir, tokenizer=tokenizer if tokenizer is not None else tok_file, device=device,
                      lowercase=lowercase)
