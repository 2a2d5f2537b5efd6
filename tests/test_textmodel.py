"""The Python facade (vaepipe.load / TextModel) on the tiny trained model of the session:
round trips, batched == one-at-a-time, interpolation ends == reconstructions, seeds, the LM,
where the tokenizer comes from, and every bad input as a one-line ConfigError."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vaepipe
from vaepipe.core.config import Params
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.stages import search
from vaepipe.stages.textmodel import TextModel, load

TEXTS = [
    "The state of the union is strong.",
    "We must reduce the national debt.",
    "Our economy grows and jobs return.",
    "America will lead the world.",
]


@pytest.fixture(scope="module")
def vae(trained_model: Params) -> TextModel:
    return vaepipe.load(trained_model.paths.model, device="cpu")


@pytest.fixture(scope="module")
def lm(trained_model: Params) -> TextModel:
    return load(trained_model.paths.baseline, device="cpu")


def test_import_vaepipe_stays_light() -> None:
    code = "import sys, vaepipe; print(sorted(m for m in ('torch', 'mlflow', 'tokenizers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_encode_gives_posterior_means(vae: TextModel, trained_model: Params) -> None:
    mu = vae.encode(TEXTS)
    assert mu.shape == (4, vae.latent_dim) and mu.dtype == np.float32
    assert vae.kind == "vae" and str(vae.device) == "cpu"
    mu2, logvar = vae.encode(TEXTS, return_logvar=True)
    np.testing.assert_array_equal(mu, mu2)
    assert logvar.shape == mu.shape and np.isfinite(logvar).all()
    # the same vector as the neighbors query (normalisation, tokenizer, encoder)
    model, _ = search.load_checked_model(trained_model, "cpu")
    np.testing.assert_allclose(mu[1], search.embed_query(model, trained_model, TEXTS[1]), rtol=1e-5, atol=1e-6)
    # one at a time == batched
    np.testing.assert_allclose(np.concatenate([vae.encode([t]) for t in TEXTS]), mu, rtol=1e-5, atol=1e-6)


def test_encode_empty_text(vae: TextModel) -> None:
    with pytest.raises(ConfigError, match=r"texts\[1\]"):
        vae.encode(["fine", "   "])
    out = vae.encode(["fine", "   "], empty="nan")
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


@pytest.mark.parametrize("opts", [{}, {"strategy": "beam", "beam_size": 3}])
def test_reconstruct_is_decode_of_encode_and_batched_equals_single(vae: TextModel, opts: dict) -> None:
    rec = vae.reconstruct(TEXTS, **opts)
    assert len(rec) == 4 and all(isinstance(s, str) for s in rec)
    assert rec == vae.decode(vae.encode(TEXTS), **opts)
    assert rec == [vae.reconstruct([t], **opts)[0] for t in TEXTS]


def test_decode_accepts_lists_and_one_vector(vae: TextModel) -> None:
    z = vae.encode(TEXTS[:2])
    assert vae.decode(z.tolist()) == vae.decode(z)
    assert vae.decode(z[0]) == vae.decode(z[:1])


def test_interpolate_ends_are_the_reconstructions(vae: TextModel) -> None:
    for opts in ({}, {"strategy": "beam", "beam_size": 3}):
        path = vae.interpolate(TEXTS[0], TEXTS[1], steps=6, **opts)
        assert len(path) == 6
        assert [path[0], path[-1]] == vae.reconstruct(TEXTS[:2], **opts)


def test_sample_is_reproducible(vae: TextModel) -> None:
    a = vae.sample(6, strategy="sample", top_p=0.9, seed=1)
    assert len(a) == 6
    assert vae.sample(6, strategy="sample", top_p=0.9, seed=1) == a
    assert vae.sample(6, strategy="sample", top_p=0.9, seed=2) != a
    # greedy decoding of prior draws: the seed picks z
    assert vae.sample(4, seed=5) == vae.sample(4, seed=5)


def test_lm_samples_but_has_no_latent(lm: TextModel) -> None:
    assert lm.kind == "lm" and lm.latent_dim == 0
    out = lm.sample(3, strategy="sample", seed=0)
    assert len(out) == 3 and out == lm.sample(3, strategy="sample", seed=0)
    for call in (lambda: lm.encode(TEXTS), lambda: lm.decode(np.zeros((1, 8))),
                 lambda: lm.reconstruct(TEXTS), lambda: lm.interpolate("a b", "c d")):
        with pytest.raises(ConfigError, match="kind 'lm'"):
            call()


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: m.decode(np.zeros((2, m.latent_dim + 1))), "latent_dim"),
    (lambda m: m.decode(np.full((2, m.latent_dim), np.nan)), "NaN"),
    (lambda m: m.decode(np.array([[0.0] * 7 + [np.inf]])), "NaN or infinity"),
    (lambda m: m.decode(np.zeros((0, m.latent_dim))), "non-empty"),
    (lambda m: m.decode([["a"] * 8]), "not an array"),
    (lambda m: m.encode([]), "empty"),
    (lambda m: m.encode("one string"), "list of strings"),
    (lambda m: m.reconstruct([]), "empty"),
    (lambda m: m.interpolate("a b", "c d", steps=1), "steps"),
    (lambda m: m.sample(0), "n:"),
    (lambda m: m.sample(2, strategy="nope"), "strategy"),
    (lambda m: m.sample(2, top_p=0.0), "top_p"),
    (lambda m: m.sample(2, beam_size=0), "beam_size"),
    (lambda m: m.sample(2, beams=3), "beams"),
])
def test_bad_input_is_a_one_line_config_error(vae: TextModel, call, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        call(vae)
    assert "\n" not in str(e.value)


def test_tokenizer_is_found_and_checked(trained_model: Params, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "vae"
    shutil.copytree(trained_model.paths.model, model_dir)
    tok = Path(trained_model.paths.tokenizer) / "tokenizer.json"
    # the recorded paths.tokenizer of the training run is found from anywhere
    monkeypatch.chdir(tmp_path)
    assert load(model_dir, device="cpu").encode(TEXTS[:1]).shape == (1, 8)
    # a tokenizer.json beside the checkpoint wins, and must be the model's
    other = tmp_path / "other.json"
    other.write_text(tok.read_text() + "\n")  # same tokenizer, other bytes: another sha256
    with pytest.raises(InputError, match="differs from the one the model was trained with"):
        load(model_dir, tokenizer=other, device="cpu")
    shutil.copy2(other, model_dir / "tokenizer.json")
    assert load(model_dir, device="cpu").latent_dim == 8  # skipped (wrong hash), the recorded one used


def test_no_tokenizer_anywhere(trained_model: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    model_dir = tmp_path / "vae"
    shutil.copytree(trained_model.paths.model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["params"]["paths"]["tokenizer"] = str(tmp_path / "gone")
    (model_dir / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no tokenizer found"):
        load(model_dir, device="cpu")


def test_load_a_text_model_package(trained_model: Params, tmp_path: Path, vae: TextModel) -> None:
    from vaepipe.stages.package import package_text_model

    package_text_model(trained_model, trained_model.paths.model, tmp_path / "pkg")
    m = vaepipe.load(tmp_path / "pkg", device="cpu")
    np.testing.assert_array_equal(m.encode(TEXTS), vae.encode(TEXTS))


def test_missing_model_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        vaepipe.load(tmp_path / "nothing")


@pytest.mark.slow
def test_load_a_registered_model_by_uri(trained_model: Params, tmp_path: Path, vae: TextModel) -> None:
    """vaepipe.load resolves models:/NAME@alias and models:/NAME/VERSION through MLflow."""
    from mlflow import MlflowClient

    from vaepipe.adapters.tracking_mlflow import MlflowTracker
    from vaepipe.core.config import TrackingConfig
    from vaepipe.stages.package import package_text_model

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=store).search_experiments()
    pkg = package_text_model(trained_model, trained_model.paths.model, tmp_path / "pkg")
    tracker = MlflowTracker(TrackingConfig(enabled=True, uri=store, experiment="load"), flush_interval=0.1)
    tracker.start(run_name="load")
    uri = tracker.log_text_model(pkg.root, registered_name="load-me")
    tracker.end()
    assert uri == "models:/load-me/1"
    for source in (uri, "models:/load-me@candidate"):
        m = vaepipe.load(source, device="cpu", tracking_uri=store)
        assert m.latent_dim == vae.latent_dim and m.lowercase == vae.lowercase
        np.testing.assert_array_equal(m.encode(TEXTS), vae.encode(TEXTS))
        assert m.reconstruct(TEXTS, strategy="beam", beam_size=3) == vae.reconstruct(TEXTS, strategy="beam", beam_size=3)
    with pytest.raises(InputError, match="models:/load-me/7"):
        vaepipe.load("models:/load-me/7", tracking_uri=store)
