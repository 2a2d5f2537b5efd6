"""The registered pyfunc's modes (vaepipe/adapters/mlflow_model.py), in process and served.

A tiny trained VAE is packaged, logged and registered (alias ``candidate``) in a sqlite store
under a tmp dir, exactly as training does; then it is loaded with ``mlflow.pyfunc.load_model``
and, in the slow test, served by a real ``mlflow models serve`` on a loopback port and called
over HTTP for every mode. Nothing is mocked. Decoding itself is TextModel's and tested with it;
here the properties are the interface's: the default is the old encoder, every mode answers
with the right shapes and types, the modes agree with each other (decode of encode equals
reconstruct, the ends of an interpolation are the reconstructions), a seed repeats its output,
and bad input is one INVALID_PARAMETER_VALUE message (HTTP 400).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vaepipe.core.config import Params
from vaepipe.stages.package import package_text_model

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from vaepipe.adapters import mlflow_model  # noqa: E402
from vaepipe.adapters.tracking_mlflow import MODEL_ALIAS  # noqa: E402

NAME = "modes-text-vae"
URI = f"models:/{NAME}@{MODEL_ALIAS}"
TEXTS = [
    "We the people of the United States, in order to form a more perfect union.",
    "The state of the union is strong.",
    "Taxes.",
]
# one bad request per rule: (params, input records, a piece of the one-line message)
BAD = [
    ({"mode": "translate"}, [{"text": TEXTS[0]}], "unknown mode 'translate'"),
    ({"mode": "reconstruct", "strategy": "psychic"}, [{"text": TEXTS[0]}], "psychic"),
    ({"mode": "reconstruct", "top_p": 0.0}, [{"text": TEXTS[0]}], "top_p"),
    ({"mode": "reconstruct", "top_p": 1.5}, [{"text": TEXTS[0]}], "top_p"),
    ({"mode": "reconstruct", "strategy": "beam", "beam_size": 0}, [{"text": TEXTS[0]}], "beam_size"),
    ({"mode": "reconstruct"}, [], "no rows: nothing to encode"),
    ({"mode": "reconstruct"}, [{"text": "   "}], "empty after normalisation"),
    ({"mode": "decode"}, [{"z": [0.0, 1.0]}], "the model's latent has"),
    ({"mode": "decode"}, [], "no rows: nothing to decode"),
    ({"mode": "interpolate"}, [], "no rows: nothing to interpolate"),
    ({"mode": "decode"}, [{"text": "no z here"}], "needs a column 'z'"),
    ({"mode": "interpolate"}, [{"text": TEXTS[0]}], "'text_b'"),
    ({"mode": "interpolate", "steps": 1}, [{"text": TEXTS[0], "text_b": TEXTS[1]}], "steps"),
]


@pytest.fixture(scope="module")
def registered(trained_model: Params, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Params]:
    """(tracking URI of a sqlite store holding ``NAME``@candidate, the params it was trained with)."""
    root = tmp_path_factory.mktemp("pyfunc-modes")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("modes", artifact_location=str(root / "mlartifacts"))
    run = client.create_run(exp)
    pkg = package_text_model(trained_model, trained_model.paths.model, root / "pkg")
    path_before = list(sys.path)
    model_uri = mlflow_model.log_text_model(run.info.run_id, pkg.root, registered_name=NAME, alias=MODEL_ALIAS,
                                            client=client)
    assert sys.path == path_before and model_uri == f"models:/{NAME}/1"
    client.set_terminated(run.info.run_id)
    return uri, trained_model


@pytest.fixture(scope="module")
def loaded(registered: tuple[str, Params]) -> Iterator[mlflow.pyfunc.PyFuncModel]:
    """The registered model as a consumer loads it (sys.path and the tracking URI restored)."""
    uri, _ = registered
    path_before, env_before = list(sys.path), os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield mlflow.pyfunc.load_model(URI)
    finally:
        sys.path[:] = path_before
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def frame(records: list[dict]) -> pd.DataFrame:
    """What the scoring server makes of ``dataframe_records`` (no records: no columns either)."""
    return pd.DataFrame.from_records(records)


# ---------------------------------------------------------------------------------------
# The signature


def test_signature_declares_every_param_with_its_default(loaded):
    sig = loaded.metadata.signature
    declared = {p.name: p.default for p in sig.params.params}
    assert declared == mlflow_model.PARAM_DEFAULTS and declared["mode"] == "encode"
    types = {p.name: p.dtype.name for p in sig.params.params}
    assert types["temperature"] == types["top_p"] == "double" and types["beam_size"] == "long"
    assert sig.inputs is None  # the modes read different columns; predict checks them itself
    assert list(sig.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 8]  # encode's output, as before


# ---------------------------------------------------------------------------------------
# In process: mlflow.pyfunc.load_model(...).predict(df, params=...)


def test_encode_is_the_default_and_unchanged(loaded, registered):
    _, p = registered
    tok = Path(p.paths.tokenizer) / "tokenizer.json"
    own = mlflow_model.TextToLatent().load(p.paths.model, tok, lowercase=p.ingest.lowercase, device="cpu")
    df = pd.DataFrame({"text": TEXTS})
    default = loaded.predict(df)
    assert default.dtype == np.float32 and default.shape == (len(TEXTS), 8)
    np.testing.assert_array_equal(loaded.predict(df, params={"mode": "encode"}), default)
    np.testing.assert_allclose(default, own.encode(TEXTS), rtol=1e-6, atol=1e-6)
    # the encoder keeps its own loop (it honours the model's batch_tokens): it equals TextModel's
    np.testing.assert_allclose(default, own.text_model.encode(TEXTS, empty="nan"), rtol=1e-6, atol=1e-6)
    # decoding params mean nothing to encode; a list still works; no text gives a NaN row
    np.testing.assert_array_equal(loaded.predict(TEXTS, params={"strategy": "beam", "seed": 3}), default)
    assert np.isnan(loaded.predict(pd.DataFrame({"text": [""]}))).all()


def test_every_mode_in_process(loaded):
    df = pd.DataFrame({"text": TEXTS})
    z = loaded.predict(df)

    recon = loaded.predict(df, params={"mode": "reconstruct"})
    assert isinstance(recon, list) and len(recon) == len(TEXTS) and all(isinstance(t, str) for t in recon)
    # decode of the encoded means is the reconstruction (greedy: no randomness at all)
    decoded = loaded.predict(pd.DataFrame({"z": [list(map(float, row)) for row in z]}), params={"mode": "decode"})
    assert decoded == recon

    # sample ignores its input (none at all works); a seed repeats itself, another seed need not
    kw = {"mode": "sample", "n": 4, "strategy": "sample", "temperature": 1.0, "seed": 7}
    samples = loaded.predict(pd.DataFrame({"text": []}), params=kw)
    assert len(samples) == 4 and all(isinstance(t, str) for t in samples)
    assert loaded.predict(df, params=kw) == samples
    assert len(loaded.predict(df, params={"mode": "sample"})) == mlflow_model.PARAM_DEFAULTS["n"]

    # one path per row; its ends are the two texts' reconstructions
    pairs = pd.DataFrame({"text": TEXTS[:2], "text_b": [TEXTS[2], TEXTS[0]]})
    paths = loaded.predict(pairs, params={"mode": "interpolate", "steps": 4})
    assert [len(path) for path in paths] == [4, 4]
    assert all(isinstance(t, str) for path in paths for t in path)
    assert [paths[0][0], paths[0][-1], paths[1][0], paths[1][-1]] == [recon[0], recon[2], recon[1], recon[0]]

    # the other strategies go through (beam, nucleus), seeded
    beam = loaded.predict(df, params={"mode": "reconstruct", "strategy": "beam", "beam_size": 3, "max_tokens": 20})
    assert len(beam) == len(TEXTS) and all(isinstance(t, str) for t in beam)
    nucleus = {"mode": "reconstruct", "strategy": "sample", "top_p": 0.9, "top_k": 5, "temperature": 0.8, "seed": 1}
    assert loaded.predict(df, params=nucleus) == loaded.predict(df, params=nucleus)


@pytest.mark.parametrize(("params", "records", "message"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_one_invalid_parameter_value(loaded, params, records, message):
    with pytest.raises(MlflowException) as e:
        loaded.predict(frame(records), params=params)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert message in e.value.message and "\n" not in str(e.value.message).strip()


def test_the_class_itself_checks_params_and_takes_dicts(registered):
    """Called directly (no MLflow signature in between) the class fills in defaults and refuses
    unknown keys itself; dict inputs work as DataFrames do."""
    _, p = registered
    tok = Path(p.paths.tokenizer) / "tokenizer.json"
    own = mlflow_model.TextToLatent().load(p.paths.model, tok, lowercase=p.ingest.lowercase, device="cpu")
    with pytest.raises(MlflowException, match=r"unknown params \['bogus'\]") as e:
        own.predict(None, TEXTS, params={"bogus": 1})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    recon = own.predict(None, {"text": TEXTS}, params={"mode": "reconstruct"})
    z = own.predict(None, TEXTS)
    assert own.predict(None, {"z": z.tolist()}, params={"mode": "decode", "seed": np.int64(0)}) == recon
    path = own.predict(None, {"text": [TEXTS[0]], "text_b": [TEXTS[1]]}, params={"mode": "interpolate", "steps": 3})
    assert path == [[recon[0], path[0][1], recon[1]]]
    with pytest.raises(MlflowException, match="row 1: 7 values"):
        own.predict(None, {"z": [z[0].tolist(), z[1].tolist()[:7]]}, params={"mode": "decode"})
    with pytest.raises(MlflowException, match="column 'text_b'"):
        own.predict(None, {"text": [TEXTS[0]], "text_b": [" "]}, params={"mode": "interpolate"})


def test_nan_in_z_is_refused(loaded):
    z = [0.0] * 7 + [float("nan")]
    with pytest.raises(MlflowException, match="NaN") as e:
        loaded.predict(pd.DataFrame({"z": [z]}), params={"mode": "decode"})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


# ---------------------------------------------------------------------------------------
# Served: a real `mlflow models serve`, called over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelServer:
    """``mlflow models serve -m URI --env-manager local`` on 127.0.0.1:port, in its own process group."""

    def __init__(self, model_uri: str, tracking_uri: str, root: Path) -> None:
        self.model_uri, self.tracking_uri, self.root = model_uri, tracking_uri, root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> None:
        # the server execs `uvicorn` by name: this interpreter's scripts come first on PATH
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "OMP_NUM_THREADS": "1", "PYTHONPATH": "",
               "PATH": path}
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri, "--env-manager", "local",
               "-p", str(self.port), "-h", "127.0.0.1", "--workers", "1"]
        log = open(self.root / "serve.log", "ab")
        # its own session: the server forks a worker, and stop() must take both
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited: {self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow models serve did not answer /ping within {timeout} s: {self.log()[-3000:]}")

    def log(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")

    def invoke(self, records: list[dict], params: dict | None = None) -> tuple[int, dict]:
        """POST /invocations; (HTTP status, decoded JSON body)."""
        body = {"dataframe_records": records, **({"params": params} if params is not None else {})}
        req = urllib.request.Request(self.url + "/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the PID we started, nothing else
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.mark.slow
def test_served_model_answers_every_mode_over_http(registered, loaded, tmp_path):
    uri, _ = registered
    server = ModelServer(URI, uri, tmp_path)
    try:
        server.start()
        records = [{"text": t} for t in TEXTS]

        # encode: the default, equal to the in-process predict
        status, out = server.invoke(records)
        assert status == 200, out
        mu = np.asarray(out["predictions"], dtype=np.float32)
        np.testing.assert_allclose(mu, loaded.predict(pd.DataFrame({"text": TEXTS})), rtol=1e-6, atol=1e-6)
        assert server.invoke(records, {"mode": "encode"})[1] == out

        status, out = server.invoke(records, {"mode": "reconstruct"})
        assert status == 200, out
        recon = out["predictions"]
        assert recon == loaded.predict(pd.DataFrame({"text": TEXTS}), params={"mode": "reconstruct"})
        assert len(recon) == len(TEXTS) and all(isinstance(t, str) for t in recon)

        status, out = server.invoke([{"z": row.tolist()} for row in mu], {"mode": "decode"})
        assert status == 200 and out["predictions"] == recon, out

        kw = {"mode": "sample", "n": 3, "strategy": "sample", "top_p": 0.9, "seed": 5}
        status, out = server.invoke([], kw)
        assert status == 200 and len(out["predictions"]) == 3, out
        assert all(isinstance(t, str) for t in out["predictions"])
        assert out["predictions"] == server.invoke(records, kw)[1]["predictions"]  # input ignored, seeded

        pairs = [{"text": TEXTS[0], "text_b": TEXTS[1]}]
        status, out = server.invoke(pairs, {"mode": "interpolate", "steps": 5})
        assert status == 200, out
        [path] = out["predictions"]
        assert len(path) == 5 and path[0] == recon[0] and path[-1] == recon[1]

        status, out = server.invoke(records, {"mode": "reconstruct", "strategy": "beam", "beam_size": 2})
        assert status == 200 and len(out["predictions"]) == len(TEXTS), out

        # bad requests: HTTP 400 carrying the one-line message
        for params, bad_records, message in BAD:
            status, out = server.invoke(bad_records, params)
            assert status == 400 and out["error_code"] == "INVALID_PARAMETER_VALUE", (params, out)
            assert message in out["message"], (params, out["message"])
        status, out = server.invoke([{"z": [float("nan")] * 8}], {"mode": "decode"})
        assert status in (400,), out  # JSON has no NaN literal: refused by the parser or by decode
    finally:
        server.stop()
