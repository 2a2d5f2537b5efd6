"""The registered text -> vector model: an MLflow pyfunc "model from code".

    mlflow.pyfunc.load_model("models:/vaepipe-text-vae@candidate").predict(
        pd.DataFrame({"text": ["We the people", "of the United States"]}))   # (2, latent_dim) float32

MLflow logs this file itself (``python_model=`` its path), never a pickled object: loading
runs the file, whose last line hands MLflow a ``TextToLatent``; ``load_context`` then rebuilds
the network from the logged artifacts (``model/best.pt`` + ``model/config.json`` read with
``weights_only``, and ``tokenizer.json``). Each text is normalised exactly as the corpus was
(``vaepipe.core.text.normalize_text`` with the corpus's ``ingest.lowercase``, kept in the model
config), tokenised by the model's own tokenizer, and encoded in eval mode, in length-bucketed
batches; the output row is the posterior mean mu. A text with no tokens (empty after
normalisation) or a missing value gets a row of NaN rather than failing a whole batch.

The logged model carries a copy of the vaepipe package (``code_paths``), so it loads in any
environment with the pinned third-party requirements (torch, tokenizers, numpy, pandas,
pyarrow, pyyaml, mlflow) even where vaepipe is not installed, and always with the code that
wrote its checkpoint. ``log_text_model`` (called by ``MlflowTracker``) packages and registers it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

log = logging.getLogger(__name__)

TEXT_COLUMN = "text"
ARTIFACT_MODEL = "model"  # directory holding best.pt + config.json
ARTIFACT_TOKENIZER = "tokenizer"  # tokenizer.json
MODEL_NAME = "text_model"  # name of the logged model inside the run
# model_config nests its settings under this key: MLflow also logs model_config as run params
# (flattened with "/"), and "text_model/lowercase" says whose setting it is
CONFIG_KEY = "text_model"
# third-party distributions the loaded model imports (through the bundled vaepipe)
REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "tokenizers", "pyyaml", "mlflow")
EXAMPLE_TEXTS = ["We the people of the United States.", "The state of the union is strong."]


class TextToLatent(PythonModel):
    """pyfunc: a DataFrame with a ``text`` column (or a list/Series of strings) -> (N, Z) float32."""

    def load_context(self, context: PythonModelContext) -> None:
        conf = (context.model_config or {}).get(CONFIG_KEY, {})
        self.load(context.artifacts[ARTIFACT_MODEL], context.artifacts[ARTIFACT_TOKENIZER],
                  lowercase=bool(conf.get("lowercase", False)),
                  batch_tokens=int(conf.get("batch_tokens", 32768)), device=str(conf.get("device", "auto")))

    def load(self, model_dir: str | Path, tokenizer_file: str | Path, *, lowercase: bool,
             batch_tokens: int = 32768, device: str = "auto") -> TextToLatent:
        """Load from plain paths (what ``load_context`` does with the logged artifacts)."""
        import torch

        from vaepipe.stages import tokenize
        from vaepipe.ml import checkpoint

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, config = checkpoint.load_model(model_dir, which="best", device=device)
        if not self.model.cfg.has_latent:
            raise ValueError(f"{model_dir}: a kind {self.model.cfg.kind!r} model has no latent to return")
        self.tokenizer = tokenize.load_tokenizer(tokenizer_file)
        self.lowercase = lowercase
        self.batch_tokens = batch_tokens
        self.device = torch.device(device)
        self.latent_dim = self.model.cfg.latent_dim
        return self

    # The DataFrame hint matters: MLflow reads predict's hints, and with this one it hands over
    # a DataFrame for every input form (a list of strings arrives as one unnamed column).
    def predict(self, context: PythonModelContext | None, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        return self.encode(_texts(model_input))

    def encode(self, texts: list[str | None]) -> np.ndarray:
        """Posterior means, one float32 row per text, in input order (NaN rows for no tokens)."""
        import torch

        from vaepipe.ml.data import collate, token_batches
        from vaepipe.core.text import normalize_text

        clean = [normalize_text(t, self.lowercase) if isinstance(t, str) else "" for t in texts]
        seqs = [np.asarray(s, dtype=np.int64) for s in _encode(self.tokenizer, clean)]
        out = np.full((len(texts), self.latent_dim), np.nan, dtype=np.float32)
        keep = np.flatnonzero([len(s) > 0 for s in seqs])
        if len(keep) == 0:
            return out
        lengths = np.array([len(seqs[i]) for i in keep], dtype=np.int64)
        self.model.eval()
        with torch.inference_mode():
            for idx in token_batches(lengths, self.batch_tokens, shuffle=False):
                rows = keep[idx]
                ids, lens = collate([seqs[i] for i in rows])
                mu, _ = self.model.encode(ids.to(self.device), lens.to(self.device))  # (B, Z)
                out[rows] = mu.float().cpu().numpy()
        return out


def _encode(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    from vaepipe.stages.tokenize import encode_texts

    return encode_texts(tokenizer, texts)


def _texts(model_input: Any) -> list[str | None]:
    """Accept what pyfunc callers pass: a DataFrame (``text`` column), a Series, a list, a str."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            col = model_input[TEXT_COLUMN]
        elif model_input.shape[1] == 1:
            col = model_input.iloc[:, 0]
        else:
            raise ValueError(f"input DataFrame needs a {TEXT_COLUMN!r} column, got {list(model_input.columns)}")
        values = col.tolist()
        if values and all(isinstance(v, (list, tuple, np.ndarray)) for v in values):
            values = [x for v in values for x in v]  # {"text": [...]} arrives as one row of lists
        return [None if _missing(v) else str(v) for v in values]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict) and TEXT_COLUMN in model_input:
        return _texts(pd.DataFrame({TEXT_COLUMN: list(np.atleast_1d(model_input[TEXT_COLUMN]))}))
    if isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        return [None if _missing(v) else str(v) for v in list(model_input)]
    raise TypeError(f"expected a DataFrame with a {TEXT_COLUMN!r} column or a list of strings, "
                    f"got {type(model_input).__name__}")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


# ---------------------------------------------------------------------------------------
# Packaging (used by vaepipe.adapters.tracking_mlflow.MlflowTracker.log_text_model)


def pip_requirements() -> list[str]:
    """The installed versions of ``REQUIREMENTS``, pinned (local tags such as +cpu dropped)."""
    reqs = []
    for dist in REQUIREMENTS:
        try:
            version = importlib_metadata.version(dist).split("+")[0]
        except importlib_metadata.PackageNotFoundError:
            reqs.append(dist)
            continue
        reqs.append(f"{dist}=={version}")
    return reqs


def log_text_model(run_id: str, model_dir: str | Path, tokenizer_file: str | Path, *, lowercase: bool,
                   registered_name: str | None, alias: str | None, client: Any,
                   tracking_uri: str, batch_tokens: int = 32768) -> str | None:
    """Log this file as the run's pyfunc model; register it and point ``alias`` at the version.

    Returns ``models:/<name>/<version>`` when registered, else ``models:/<model_id>``; None for
    a model without a latent (``kind: lm``). MLflow validates the input example by loading the
    packaged model and predicting it, so a model that would not load is never registered.
    """
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    import vaepipe
    from vaepipe.ml import checkpoint

    model_dir, tokenizer_file = Path(model_dir), Path(tokenizer_file)
    if tokenizer_file.is_dir():
        tokenizer_file = tokenizer_file / "tokenizer.json"
    config = checkpoint.read_config(model_dir)
    cfg = config["model"]
    if cfg.get("kind") != "vae":
        log.info("%s: kind %r has no latent; no text model logged", model_dir, cfg.get("kind"))
        return None
    # the input column is left unnamed so that pyfunc's schema check lets a plain list of strings
    # through as well as a DataFrame with a "text" column (a named column refuses lists)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(cfg["latent_dim"])))]),
    )
    with tempfile.TemporaryDirectory(prefix="vaepipe-model-") as tmp:
        stage = Path(tmp)
        (stage / "model").mkdir()
        for name in (checkpoint.BEST, checkpoint.CONFIG_FILE):
            shutil.copy2(model_dir / name, stage / "model" / name)
        code = stage / "code" / "vaepipe"
        shutil.copytree(Path(vaepipe.__file__).parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Create the LoggedModel in the run's experiment ourselves: left to Model.log it lands in
        # the fluent "active" experiment, i.e. Default (id 0) with ./mlruns artifacts, not ours.
        run = client.get_run(run_id)
        logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                            params=dict(run.data.params), model_type="text-to-latent")
        with _tracking_uri(tracking_uri):
            info = Model.log(
                artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                model_id=logged.model_id,
                python_model=str(Path(__file__).resolve()),
                artifacts={ARTIFACT_MODEL: str(stage / "model"), ARTIFACT_TOKENIZER: str(tokenizer_file)},
                code_paths=[str(code)],
                model_config={CONFIG_KEY: {"lowercase": lowercase, "batch_tokens": batch_tokens, "device": "auto"}},
                signature=signature,
                input_example=pd.DataFrame({TEXT_COLUMN: EXAMPLE_TEXTS}),
                pip_requirements=pip_requirements(),
                metadata={"latent_dim": int(cfg["latent_dim"]), "tokenizer_hash": config.get("tokenizer_hash"),
                          "lowercase": lowercase, "output": "posterior mean mu"},
                registered_model_name=registered_name,
            )
    if not registered_name:
        return info.model_uri
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(registered_name, alias, version)
    log.info("registered %s version %s (alias %s) from run %s", registered_name, version, alias, run_id)
    return f"models:/{registered_name}/{version}"


class _tracking_uri:
    """Point MLflow's process-wide tracking URI (read by ``Model.log``) at ``uri`` for a while."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self) -> None:
        import mlflow

        self.old = mlflow.get_tracking_uri() if _uri_was_set() else None
        mlflow.set_tracking_uri(self.uri)

    def __exit__(self, *exc: Any) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.old)


def _uri_was_set() -> bool:
    import os

    from mlflow.tracking._tracking_service import utils

    return utils._tracking_uri is not None or "MLFLOW_TRACKING_URI" in os.environ


# MLflow's "model from code" contract: when MLflow runs this file (as module ``code_model_*``)
# it takes the model given to set_model. An ordinary ``import vaepipe.adapters.mlflow_model`` registers
# nothing, keeping imports free of side effects.
if __name__ != "vaepipe.adapters.mlflow_model":
    from mlflow.models import set_model

    set_model(TextToLatent())
