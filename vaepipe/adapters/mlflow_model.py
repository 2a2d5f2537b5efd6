"""The registered text model: an MLflow pyfunc "model from code", both ways.

    m = mlflow.pyfunc.load_model("models:/vaepipe-text-vae@candidate")
    m.predict(pd.DataFrame({"text": ["We the people", "of the United States"]}))   # (2, latent_dim) float32
    m.predict(pd.DataFrame({"text": ["We the people"]}), params={"mode": "reconstruct"})  # ["we the people"]

The standard ``params`` argument of ``predict`` picks the mode (declared in the model
signature with its defaults, ``PARAM_DEFAULTS``):

    encode       (the default) ``text`` -> (N, Z) float32 posterior means, as always
    reconstruct  ``text`` -> list of N texts: each text encoded, its mu decoded
    decode       ``z`` (one list of Z floats per row) -> list of N texts
    sample       the input is ignored (send any, even no rows) -> list of ``n`` texts, z ~ N(0, I)
    interpolate  ``text`` and ``text_b`` -> one list of ``steps`` texts per row, linear in z
                 from mu(text) to mu(text_b), endpoints included

plus the decoding parameters ``strategy`` (greedy | beam | sample), ``beam_size``,
``temperature``, ``top_k``, ``top_p``, ``max_tokens`` and ``seed``. The decoding itself is
``vaepipe.stages.textmodel.TextModel``'s (batched, seeded); this module only maps frames and
params onto it. Bad input (an unknown mode or strategy, a latent of the wrong size, NaN in z,
no rows to decode, top_p outside (0, 1], beam_size < 1) raises an ``MlflowException`` with a
one-line message and error code ``INVALID_PARAMETER_VALUE``, which a served model answers
with HTTP 400 and that message.

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
wrote its checkpoint. Training packages the files (``vaepipe.stages.package``);
``log_text_model`` (called by ``MlflowTracker``) only saves, uploads and registers them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import DataType, ParamSchema, ParamSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel

    from vaepipe.stages.package import TextModelPackage
    from vaepipe.stages.textmodel import TextModel

log = logging.getLogger(__name__)

TEXT_COLUMN = "text"
TEXT_B_COLUMN = "text_b"  # interpolate: the other end of each row's path
Z_COLUMN = "z"  # decode: one list of latent_dim floats per row
ARTIFACT_MODEL = "model"  # directory holding best.pt + config.json
ARTIFACT_TOKENIZER = "tokenizer"  # tokenizer.json
MODEL_NAME = "text_model"  # name of the logged model inside the run
# model_config nests its settings under this key: MLflow also logs model_config as run params
# (flattened with "/"), and "text_model/lowercase" says whose setting it is
CONFIG_KEY = "text_model"
# third-party distributions the loaded model imports (through the bundled vaepipe)
REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "tokenizers", "pyyaml", "mlflow")
EXAMPLE_TEXTS = ["We the people of the United States.", "The state of the union is strong."]

MODES = ("encode", "reconstruct", "decode", "sample", "interpolate")
DECODING_KEYS = ("strategy", "beam_size", "temperature", "top_k", "top_p", "max_tokens", "seed")
# every predict param with its default, as declared in the signature's ParamSchema; the
# decoding defaults are vaepipe.ml.decoding.Decoding's
PARAM_DEFAULTS: dict[str, str | int | float] = {
    "mode": "encode",
    "strategy": "greedy", "beam_size": 5, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_tokens": 64,
    "seed": 0,
    "steps": 5,  # interpolate: texts per path, endpoints included
    "n": 1,  # sample: how many texts
}


class InvalidModelInput(MlflowException, ValueError):
    """Bad input or params: MLflow's INVALID_PARAMETER_VALUE (HTTP 400 when served).

    Also a ValueError, so callers that caught the encoder's ValueError still catch it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class TextToLatent(PythonModel):
    """pyfunc: text -> (N, Z) float32 by default; ``params["mode"]`` runs the other directions."""

    def load_context(self, context: PythonModelContext) -> None:
        conf = (context.model_config or {}).get(CONFIG_KEY, {})
        self.load(context.artifacts[ARTIFACT_MODEL], context.artifacts[ARTIFACT_TOKENIZER],
                  lowercase=bool(conf.get("lowercase", False)),
                  batch_tokens=int(conf.get("batch_tokens", 32768)), device=str(conf.get("device", "auto")))

    def load(self, model_dir: str | Path, tokenizer_file: str | Path, *, lowercase: bool,
             batch_tokens: int = 32768, device: str = "auto") -> TextToLatent:
        """Load from plain paths (what ``load_context`` does with the logged artifacts)."""
        import torch

        from vaepipe.ml import checkpoint
        from vaepipe.stages import tokenize

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
        self._text_model: TextModel | None = None
        return self

    @property
    def text_model(self) -> TextModel:
        """The ``TextModel`` that does every mode (built on first use)."""
        if self._text_model is None:
            from vaepipe.stages.textmodel import TextModel

            self._text_model = TextModel(self.model, self.tokenizer, self.device, lowercase=self.lowercase,
                                         batch_tokens=self.batch_tokens)
        return self._text_model

    # The signature declares no inputs, so MLflow hands model_input over as the caller gave it
    # (a DataFrame, a list, a Series, a dict): _texts, _text_pairs and _latents accept each form.
    # The hint stays pd.DataFrame, which MLflow does not convert (a list[str] hint would).
    def predict(self, context: PythonModelContext | None, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray | list[str] | list[list[str]]:
        """Run ``params["mode"]`` (default encode) on ``model_input``; see the module docstring."""
        from vaepipe.core.errors import VaepipeError

        p = _resolve_params(params)
        try:
            return getattr(self, f"_predict_{p['mode']}")(model_input, p)
        except VaepipeError as e:  # TextModel's and Decoding's one-line errors
            raise InvalidModelInput(str(e)) from None

    def _predict_encode(self, model_input: Any, p: dict[str, Any]) -> np.ndarray:
        return self.encode(_texts(model_input))

    def _predict_reconstruct(self, model_input: Any, p: dict[str, Any]) -> list[str]:
        _require_rows(model_input, "nothing to encode")
        return self.text_model.reconstruct(_texts(model_input), **_decoding(p))

    def _predict_decode(self, model_input: Any, p: dict[str, Any]) -> list[str]:
        z = _latents(model_input, self.latent_dim)
        return self.text_model.decode(z, **_decoding(p))

    def _predict_sample(self, model_input: Any, p: dict[str, Any]) -> list[str]:
        return self.text_model.sample(_plain(p["n"]), **_decoding(p))

    def _predict_interpolate(self, model_input: Any, p: dict[str, Any]) -> list[list[str]]:
        import torch

        from vaepipe.core.errors import ConfigError
        from vaepipe.stages.textmodel import interpolation_path

        steps = _plain(p["steps"])
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise InvalidModelInput(f"steps: an interpolation needs an integer >= 2 steps, got {steps!r}")
        _require_rows(model_input, "nothing to interpolate")
        ends = []
        for column, texts in zip((TEXT_COLUMN, TEXT_B_COLUMN), _text_pairs(model_input)):
            try:
                ends.append(torch.from_numpy(self.text_model.encode(texts)))
            except ConfigError as e:
                raise InvalidModelInput(f"column {column!r}: {e}") from None
        # every row's path in one batch: row i's texts are decoded rows i*steps .. (i+1)*steps-1
        z = torch.cat([interpolation_path(a, b, steps) for a, b in zip(*ends)])
        out = self.text_model.decode(z, **_decoding(p))
        return [out[i * steps:(i + 1) * steps] for i in range(len(ends[0]))]

    def encode(self, texts: list[str | None]) -> np.ndarray:
        """Posterior means, one float32 row per text, in input order (NaN rows for no tokens)."""
        if not texts:
            return np.empty((0, self.latent_dim), dtype=np.float32)
        return self.text_model.encode([t if isinstance(t, str) else "" for t in texts], empty="nan")


def params_schema() -> ParamSchema:
    """The signature's params: ``PARAM_DEFAULTS`` with their types (string, long or double)."""
    def dtype(value: object) -> DataType:
        return DataType.string if isinstance(value, str) else DataType.long if isinstance(value, int) else DataType.double

    return ParamSchema([ParamSpec(name, dtype(default), default) for name, default in PARAM_DEFAULTS.items()])


def _resolve_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` over ``PARAM_DEFAULTS``; an unknown key or mode is an error.

    Through ``mlflow.pyfunc`` the signature has filled in the defaults already (and dropped
    unknown keys with a warning); a direct ``TextToLatent.predict`` call gets the same checks."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_DEFAULTS))
    if unknown:
        raise InvalidModelInput(f"unknown params {unknown}; known: {sorted(PARAM_DEFAULTS)}")
    out = {**PARAM_DEFAULTS, **params}
    if out["mode"] not in MODES:
        raise InvalidModelInput(f"unknown mode {out['mode']!r}; expected one of {', '.join(MODES)}")
    return out


def _decoding(p: dict[str, Any]) -> dict[str, Any]:
    """The decoding keyword arguments of ``TextModel`` (checked there, by ``Decoding``)."""
    return {k: _plain(p[k]) for k in DECODING_KEYS}


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (Decoding wants int, not int64)."""
    return value.item() if isinstance(value, np.generic) else value


def _texts(model_input: Any) -> list[str | None]:
    """Accept what pyfunc callers pass: a DataFrame (``text`` column), a Series, a list, a str."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            col = model_input[TEXT_COLUMN]
        elif model_input.shape[1] == 1:
            col = model_input.iloc[:, 0]
        else:
            raise InvalidModelInput(f"input DataFrame needs a {TEXT_COLUMN!r} column, "
                                    f"got {list(model_input.columns)}")
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
    raise InvalidModelInput(f"expected a DataFrame with a {TEXT_COLUMN!r} column or a list of strings, "
                            f"got {type(model_input).__name__}")


def _text_pairs(model_input: Any) -> tuple[list[str | None], list[str | None]]:
    """interpolate's input: a DataFrame (or records dict) with ``text`` and ``text_b`` columns."""
    frame = pd.DataFrame(model_input) if isinstance(model_input, dict) else model_input
    if not isinstance(frame, pd.DataFrame) or not {TEXT_COLUMN, TEXT_B_COLUMN} <= set(frame.columns):
        got = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(model_input).__name__
        raise InvalidModelInput(f"mode 'interpolate' needs columns {TEXT_COLUMN!r} and {TEXT_B_COLUMN!r} "
                                f"(one path per row), got {got}")
    return _texts(frame[[TEXT_COLUMN]]), _texts(frame[[TEXT_B_COLUMN]])


def _latents(model_input: Any, latent_dim: int) -> np.ndarray:
    """decode's input: column ``z``, one list of ``latent_dim`` numbers per row -> (N, Z) float32.

    Checked row by row here (a ragged column names its row); the values are TextModel's to check."""
    _require_rows(model_input, "nothing to decode")
    if isinstance(model_input, dict) and Z_COLUMN in model_input:
        rows = list(model_input[Z_COLUMN])
    elif isinstance(model_input, pd.DataFrame) and Z_COLUMN in model_input.columns:
        rows = model_input[Z_COLUMN].tolist()
    else:
        got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
        raise InvalidModelInput(f"mode 'decode' needs a column {Z_COLUMN!r} (a list of {latent_dim} floats "
                                f"per row), got {got}")
    if not rows:
        raise InvalidModelInput(f"no rows in column {Z_COLUMN!r}: nothing to decode")
    out = np.empty((len(rows), latent_dim), dtype=np.float32)
    for i, row in enumerate(rows):
        try:
            values = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidModelInput(f"column {Z_COLUMN!r}, row {i}: not a list of numbers") from None
        if values.shape != (latent_dim,):
            raise InvalidModelInput(f"column {Z_COLUMN!r}, row {i}: {values.size} values, the model's latent "
                                    f"has {latent_dim}")
        out[i] = values  # NaN and infinity: TextModel.decode refuses them
    return out


def _require_rows(model_input: Any, what: str) -> None:
    """No rows at all (``{"dataframe_records": []}`` arrives as a frame without columns) -> error."""
    if isinstance(model_input, (pd.DataFrame, pd.Series, list, tuple, np.ndarray)) and len(model_input) == 0:
        raise InvalidModelInput(f"the input has no rows: {what}")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


# ---------------------------------------------------------------------------------------
# Logging a package (used by vaepipe.adapters.tracking_mlflow.MlflowTracker.log_text_model)


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


def log_text_model(run_id: str, package_dir: str | Path, *, registered_name: str | None,
                   alias: str | None, client: MlflowClient) -> str | None:
    """Log a packaged text model (``vaepipe.stages.package``) as the run's pyfunc; register it.

    Everything goes through ``client`` (an ``MlflowClient``): the process-wide tracking URI is
    neither read nor changed. The pyfunc is saved to a temporary folder, loaded there and asked
    to predict its input example -- a model that fails is never uploaded or registered -- then
    uploaded as a LoggedModel of the run. Returns ``models:/<name>/<version>`` when registered
    (``alias`` pointed at that version), else ``models:/<model_id>``.
    """
    from vaepipe.core.errors import VaepipeError
    from vaepipe.stages.package import TextModelPackage

    package = TextModelPackage.read(package_dir)
    model_config = {CONFIG_KEY: {"lowercase": package.lowercase, "batch_tokens": package.batch_tokens,
                                 "device": "auto"}}
    run = client.get_run(run_id)
    # the LoggedModel lives in the run's experiment (MLflow's default would be the fluent
    # "active" experiment, i.e. Default with ./mlruns artifacts)
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        params=dict(run.data.params), model_type="text-to-latent")
    try:
        with tempfile.TemporaryDirectory(prefix="vaepipe-model-") as tmp:
            local = _save_pyfunc(package, model_config, logged, run_id, Path(tmp))
            _check_predicts(local, package.latent_dim)
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        _finalize(client, logged.model_id, "FAILED")
        raise
    _finalize(client, logged.model_id, "READY")
    _link_to_run(client, run_id, logged.model_id, model_config)
    if not registered_name:
        return f"models:/{logged.model_id}"
    version = _register(client, registered_name, run_id, logged)
    try:
        _describe_version(client, registered_name, version, package, run_id)
    except (MlflowException, VaepipeError, OSError, ValueError, RuntimeError) as e:
        # the version is registered and serves: a missing description must not undo that
        log.warning("registered %s version %s without its description and tags: %s",
                    registered_name, version, str(e).splitlines()[0] if str(e) else type(e).__name__)
    if alias:
        client.set_registered_model_alias(registered_name, alias, version)
    log.info("registered %s version %s (alias %s) from run %s", registered_name, version, alias, run_id)
    return f"models:/{registered_name}/{version}"


def _save_pyfunc(package: TextModelPackage, model_config: dict[str, Any], logged: LoggedModel, run_id: str,
                 tmp: Path) -> Path:
    """``mlflow.pyfunc.save_model`` of this file with the package's files and a vaepipe copy."""
    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    # No input schema: the modes read different columns (text; text and text_b; z, a list of
    # floats), and a plain list of strings must still reach encode. MLflow's column check
    # would let only one of these through (an unnamed string column refuses z and drops
    # text_b; named columns refuse lists), so predict checks its input itself. The output
    # schema is the default mode's; the other modes return texts.
    signature = ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, package.latent_dim))]),
        params=params_schema(),
    )
    # MLmodel's record of where the model lives (what Model.log would write)
    mlmodel = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                    model_id=logged.model_id,
                    metadata={"latent_dim": package.latent_dim, "tokenizer_hash": package.tokenizer_hash,
                              "lowercase": package.lowercase, "output": "posterior mean mu"})
    local = tmp / "model"
    mlflow.pyfunc.save_model(
        path=str(local), mlflow_model=mlmodel,
        python_model=str(Path(__file__).resolve()),
        artifacts={ARTIFACT_MODEL: str(package.model_dir), ARTIFACT_TOKENIZER: str(package.tokenizer_file)},
        code_paths=[str(_copy_vaepipe(tmp / "code"))],
        model_config=model_config,
        signature=signature,
        input_example=pd.DataFrame({TEXT_COLUMN: EXAMPLE_TEXTS}),
        pip_requirements=pip_requirements(),
    )
    # save_model may load the model (requirements, the example): no bytecode in the upload
    for cache in list(local.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    return local


def _copy_vaepipe(dest: Path) -> Path:
    """The whole vaepipe package tree (core/, ml/, stages/, adapters/ ...) as ``dest/vaepipe``.

    MLflow puts ``code/`` first on sys.path when it loads the model, so ``import vaepipe...``
    there finds this copy, in any environment."""
    import vaepipe

    target = dest / "vaepipe"
    shutil.copytree(Path(vaepipe.__file__).resolve().parent, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _check_predicts(local: Path, latent_dim: int) -> None:
    """Load the saved model as a consumer would and predict the input example, or raise."""
    import sys

    import mlflow

    saved_path = list(sys.path)
    try:
        model = mlflow.pyfunc.load_model(str(local))
        out = np.asarray(model.predict(pd.DataFrame({TEXT_COLUMN: EXAMPLE_TEXTS})))
    except Exception as e:  # an ImportError, a schema error ...: the model is broken, not the store
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{local}: the packaged model does not load and predict its input example "
                         f"({type(e).__name__}: {first})") from e
    finally:
        sys.path[:] = saved_path  # loading prepends the (temporary) code folder for good
    if out.shape != (len(EXAMPLE_TEXTS), latent_dim) or not np.isfinite(out).all():
        raise ValueError(f"{local}: the packaged model predicts shape {out.shape} (or non-finite values) "
                         f"for its input example, expected ({len(EXAMPLE_TEXTS)}, {latent_dim})")


def _finalize(client: MlflowClient, model_id: str, status: str) -> None:
    try:
        client.finalize_logged_model(model_id, status)
    except Exception as e:  # noqa: BLE001 - the status is cosmetic next to the error being raised
        log.warning("could not mark logged model %s %s: %s", model_id, status, e)


def _link_to_run(client: MlflowClient, run_id: str, model_id: str, model_config: dict[str, Any]) -> None:
    """The run lists the model among its outputs and carries its settings as params
    (``text_model/lowercase`` ..., flattened with "/" as MLflow does for ``model_config``)."""
    from mlflow.entities import LoggedModelOutput, Param

    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    known = client.get_run(run_id).data.params
    params = [Param(f"{section}/{k}", str(v)) for section, conf in model_config.items() for k, v in conf.items()]
    params = [p for p in params if p.key not in known]  # a resumed run logged them already
    if params:
        client.log_batch(run_id, params=params, synchronous=True)


def version_facts(package: TextModelPackage) -> tuple[dict[str, float], str | None, int | None]:
    """What tells one version from another, known at registration: best.pt's validation
    metrics (from training), the data hash of config.json, and best.pt's step."""
    from vaepipe.ml import checkpoint as ckpt

    state = ckpt.load_state(package.model_dir / ckpt.BEST)
    metrics = {k: float(v) for k, v in (state.get("metrics") or {}).items() if isinstance(v, (int, float))}
    data_hash = ckpt.read_config(package.model_dir).get("data_hash") or None
    step = state.get("step")
    return metrics, data_hash, int(step) if isinstance(step, int) else None


def _describe_version(client: MlflowClient, name: str, version: str, package: TextModelPackage,
                      run_id: str) -> None:
    """The version's description (a markdown table of its validation metrics) and tags (each
    metric, ``data_hash``, ``latent_dim``), so the Models page tells versions apart."""
    metrics, data_hash, step = version_facts(package)
    lines = [f"Text -> latent mean (dim {package.latent_dim}) from run `{run_id}`"
             + (f", best.pt at step {step}" if step is not None else "") + ".", ""]
    if data_hash:
        lines += [f"Token data hash: `{data_hash}`", ""]
    if metrics:
        lines += ["| validation metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    client.update_model_version(name, version, description="\n".join(lines))
    tags = {k: f"{v:.6g}" for k, v in metrics.items()} | {"latent_dim": str(package.latent_dim)}
    if data_hash:
        tags["data_hash"] = data_hash
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _register(client: MlflowClient, name: str, run_id: str, logged: LoggedModel) -> str:
    """A new version of registered model ``name`` (created when missing); its number.

    The version's source is the LoggedModel's artifact location, not ``models:/<model_id>``:
    a database registry resolves that URI through MLflow's process-wide tracking URI, not
    this client's. ``model_id`` goes along for the registries that record it (a server's).
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                     model_id=logged.model_id)
    return str(mv.version)


# MLflow's "model from code" contract: when MLflow runs this file (as module ``code_model_*``)
# it takes the model given to set_model. An ordinary ``import vaepipe.adapters.mlflow_model`` registers
# nothing, keeping imports free of side effects.
if __name__ != "vaepipe.adapters.mlflow_model":
    from mlflow.models import set_model

    set_model(TextToLatent())
