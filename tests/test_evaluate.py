"""Evaluate stage: the IW estimator against numerical quadrature, batching against per-document
computation, metric consistency, the end-to-end run on the trained fixture model, bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.evaluate_support import LOST_RUN_ID, tracked_copy
from vaepipe.core.errors import InputError
from vaepipe.ml import estimators as est
from vaepipe.ml.data import TokenSplit
from vaepipe.ml.model import TextVAE, VAEConfig
from vaepipe.stages import evaluate

CPU = torch.device("cpu")


def tiny_vae(latent_dim: int = 1, vocab: int = 12, seed: int = 0) -> TextVAE:
    torch.manual_seed(seed)
    cfg = VAEConfig(kind="vae", vocab_size=vocab, embed_dim=8, hidden_dim=16, latent_dim=latent_dim,
                    num_layers=1, num_heads=1, encoder="lstm", decoder="lstm", dropout=0.0, bn_gamma=0.0)
    model = TextVAE(cfg)
    with torch.no_grad():
        # make p(x|z) depend strongly on z, so that the posterior is far from the prior and a
        # wrong importance weight (e.g. a missing log p(z) - log q(z|x) term) would show
        model.decoder.z_to_state.weight.mul_(8.0)
        model.decoder.lstm.weight_ih_l0[:, -latent_dim:].mul_(8.0)
        # and make q(z|x) deliberately off (shifted, wide), so that the ELBO is loose and only
        # correct importance weights recover log p(x)
        model.encoder.to_posterior.bias[:latent_dim].add_(1.0)
        model.encoder.to_posterior.bias[latent_dim:].add_(0.7)
    return model.eval()


def synthetic_split(n: int, vocab: int, seed: int = 0, max_len: int = 6) -> TokenSplit:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=n)
    seqs = [rng.integers(4, vocab, size=int(k)).astype(np.int64) for k in lengths]
    return TokenSplit([f"d{i}" for i in range(n)], seqs, lengths.astype(np.int64))


@torch.inference_mode()
def quadrature_log_px(model: TextVAE, seq: np.ndarray, lo: float = -12.0, hi: float = 12.0, m: int = 4001) -> float:
    """log ∫ p(x|z) N(z; 0, 1) dz on a fine grid (trapezoid rule), for a 1-D latent."""
    z = torch.linspace(lo, hi, m).unsqueeze(1)  # (m, 1)
    ids = torch.from_numpy(seq).unsqueeze(0).expand(m, -1)
    lengths = torch.full((m,), len(seq))
    f = model.log_likelihood(ids, lengths, z).double() + est.log_standard_normal(z.double())
    w = torch.full((m,), (hi - lo) / (m - 1), dtype=torch.float64)
    w[0] = w[-1] = w[0] / 2
    return float(torch.logsumexp(f + w.log(), 0))


@pytest.mark.parametrize("batch_tokens", [40_000, 300])  # many docs per call / one doc, k-chunks
def test_iw_nll_matches_quadrature_for_a_1d_latent(batch_tokens):
    model = tiny_vae()
    split = synthetic_split(12, model.cfg.vocab_size, seed=1)
    exact = np.array([quadrature_log_px(model, s) for s in split.seqs])
    scores = evaluate.score_vae(model, split, iw_samples=2000, batch_tokens=batch_tokens, device=CPU,
                                generator=torch.Generator().manual_seed(0))
    # per document the K = 2000 estimate has a spread of about 0.02 nats here: 5 sd of slack;
    # over the 12 documents the mean error is far smaller than the ELBO's gap (about 0.6)
    np.testing.assert_allclose(scores.log_px, exact, atol=0.1)
    assert abs((scores.log_px - exact).mean()) < 0.02
    elbo = -(scores.recon + scores.kl_per_dim.sum(1))
    assert (exact - elbo).mean() > 0.3  # the posterior is not exact: the ELBO is visibly loose
    assert (elbo <= exact + 0.05).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bf16", [False, True])
def test_iw_nll_on_cuda_matches_quadrature(bf16):
    cuda = torch.device("cuda")
    model = tiny_vae()
    split = synthetic_split(12, model.cfg.vocab_size, seed=1)
    exact = np.array([quadrature_log_px(model, s) for s in split.seqs])  # float32 on the CPU
    scores = evaluate.score_vae(model.to(cuda), split, iw_samples=2000, batch_tokens=40_000, device=cuda,
                                bf16=bf16, generator=torch.Generator(device=cuda).manual_seed(0))
    # bf16 rounds the decoder's activations (about 3 significant digits), not the sums: allow
    # a little per predicted token on top of the Monte Carlo slack of the CPU test
    tol = 0.1 + (0.02 * (split.lengths + 1) if bf16 else 0.0)
    assert (np.abs(scores.log_px - exact) <= tol).all(), scores.log_px - exact
    assert abs((scores.log_px - exact).mean()) < (0.06 if bf16 else 0.02)


def test_iw_bound_tightens_with_k():
    model = tiny_vae(seed=3)
    split = synthetic_split(60, model.cfg.vocab_size, seed=2)
    exact = float(np.mean([quadrature_log_px(model, s) for s in split.seqs]))

    def iw_nll(k: int, seeds: int) -> float:  # mean over documents and over repeated runs
        runs = [evaluate.score_vae(model, split, iw_samples=k, batch_tokens=4096, device=CPU,
                                   generator=torch.Generator().manual_seed(k + 7919 * r)) for r in range(seeds)]
        return float(np.mean([-s.log_px.mean() for s in runs]))

    # measured here: about 12.10, 11.51, 11.32 with run-to-run spreads of 0.07, 0.03, 0.003
    nll = [iw_nll(1, 6), iw_nll(5, 6), iw_nll(1000, 1)]
    assert nll[0] > nll[1] + 0.2 and nll[1] > nll[2] + 0.05, nll
    assert nll[2] == pytest.approx(-exact, abs=0.02)


def test_batched_scores_land_on_the_right_documents():
    model = tiny_vae(latent_dim=3, vocab=30, seed=5)
    with torch.no_grad():  # a near-deterministic posterior: z = mu up to 1e-4, so recon is exact
        model.encoder.to_posterior.bias[3:].fill_(-20.0)
    split = synthetic_split(25, 30, seed=4, max_len=9)
    scores = evaluate.score_vae(model, split, iw_samples=7, batch_tokens=200, device=CPU,
                                generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for i, seq in enumerate(split.seqs):
            ids, lengths = torch.from_numpy(seq)[None], torch.tensor([len(seq)])
            mu, logvar = model.encode(ids, lengths)
            np.testing.assert_allclose(scores.mu[i], mu[0].double().numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(scores.logvar[i], logvar[0].double().numpy(), rtol=1e-5, atol=1e-5)
            ll_mu = float(model.log_likelihood(ids, lengths, mu)[0])
            assert scores.recon[i] == pytest.approx(-ll_mu, abs=1e-3)
            kl = est.gaussian_kl_per_dim(mu.double(), logvar.double()).numpy()[0]
            np.testing.assert_allclose(scores.kl_per_dim[i], kl, rtol=1e-5)


def test_score_lm_is_the_exact_per_document_likelihood():
    torch.manual_seed(0)
    cfg = VAEConfig(kind="lm", vocab_size=30, embed_dim=8, hidden_dim=16, latent_dim=4, num_layers=1,
                    num_heads=1, encoder="lstm", decoder="lstm", dropout=0.0, bn_gamma=0.0)
    lm = TextVAE(cfg).eval()
    split = synthetic_split(40, 30, seed=6, max_len=12)
    got = evaluate.score_lm(lm, split, batch_tokens=64, device=CPU)
    with torch.inference_mode():
        want = [float(lm.log_likelihood(torch.from_numpy(s)[None], torch.tensor([len(s)]), None)[0])
                for s in split.seqs]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_split_metrics_are_consistent():
    rng = np.random.default_rng(0)
    n, z = 50, 4
    lengths = rng.integers(1, 20, size=n)
    mu = rng.normal(size=(n, z)) * np.array([1.0, 0.5, 0.05, 0.0])
    logvar = np.full((n, z), -1.0)
    kl = est.gaussian_kl_per_dim(torch.from_numpy(mu), torch.from_numpy(logvar)).numpy()
    recon = rng.uniform(10, 60, size=n)
    log_px = -(recon + kl.sum(1)) + rng.uniform(0, 2, size=n)
    scores = evaluate.VAEScores(log_px, recon, kl, mu, logvar)
    texts = ["one two three", "héllo  wörld", *(["x y"] * (n - 2))]
    m = evaluate.split_metrics(scores, lengths, texts, iw_samples=5, mi_batch_size=8, seed=0,
                               lm_log_px=log_px - 1.0)
    n_tok = int((lengths + 1).sum())
    assert m["n_tokens"] == n_tok and m["n_docs"] == n
    assert m["n_words"] == 4 + 3 + 3 * (n - 2)  # words + one <eos> each
    assert m["n_bytes"] == len("one two three") + len("héllo  wörld".encode()) + 3 * (n - 2)
    assert m["ppl"] == pytest.approx(math.exp(m["iw_nll"] * n / n_tok))
    assert m["ppl_elbo"] == pytest.approx(math.exp(m["elbo"] * n / n_tok))
    assert m["ppl_word"] == pytest.approx(math.exp(m["iw_nll"] * n / m["n_words"]))
    assert m["bits_per_byte"] == pytest.approx(m["iw_nll"] * n / math.log(2) / m["n_bytes"])
    assert m["elbo"] == pytest.approx(m["recon"] + m["kl"])  # the negative ELBO, as train's val_elbo
    assert m["iw_nll"] <= m["elbo"]
    assert m["active_units"] == 2 and m["latent_dim"] == 4
    assert m["mi_minibatch"] <= math.log(8) + 0.5
    assert m["lm_nll"] == pytest.approx(m["iw_nll"] + 1.0)
    assert m["lm_ppl"] == pytest.approx(math.exp(m["lm_nll"] * n / n_tok))


# ---------------------------------------------------------------------------------------
# End to end on the session's trained fixture model

HEADLINE_KEYS = ("elbo", "recon", "kl", "iw_nll", "ppl", "ppl_elbo", "ppl_word", "bits_per_byte", "mi",
                 "mi_minibatch", "active_units", "latent_dim", "lm_nll", "lm_ppl", "gap_vs_lm", "n_docs", "n_tokens",
                 "iw_samples")


@pytest.mark.slow
def test_run_writes_consistent_metrics_and_reports(trained_model, tmp_path):
    params = trained_model.replace(paths={"reports": str(tmp_path / "reports")})
    result = evaluate.run(params)
    reports = tmp_path / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    for k in HEADLINE_KEYS:
        assert k in metrics, k
        assert math.isfinite(metrics[k]), k
    assert set(metrics["splits"]) == {"test", "valid"}
    assert metrics["headline_split"] == "test"
    assert {k: metrics[k] for k in HEADLINE_KEYS} == {k: metrics["splits"]["test"][k] for k in HEADLINE_KEYS}
    assert result.metrics["iw_nll"] == metrics["iw_nll"]
    for m in metrics["splits"].values():
        assert m["n_docs"] <= params.evaluate.max_docs
        assert m["iw_samples"] == params.evaluate.iw_samples
        assert m["ppl"] == pytest.approx(math.exp(m["iw_nll"] * m["n_docs"] / m["n_tokens"]))
        assert m["lm_ppl"] == pytest.approx(math.exp(m["lm_nll"] * m["n_docs"] / m["n_tokens"]))
        assert m["iw_nll"] <= m["elbo"] + 0.5  # K draws: true in expectation, loose slack
        assert m["kl"] >= 0 and 0 <= m["active_units"] <= m["latent_dim"] == params.model.latent_dim
        assert m["mi"] <= math.log(m["n_docs"]) + 1e-6
    with open(reports / "kl_per_dim.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["dim"]) for r in rows] == list(range(params.model.latent_dim))
    assert sum(float(r["kl"]) for r in rows) == pytest.approx(metrics["kl"], rel=1e-6)
    assert sum(int(r["active"]) for r in rows) == metrics["active_units"]
    with open(reports / "latent_pca.csv") as f:
        pca = list(csv.DictReader(f))
    assert len(pca) == metrics["n_docs"] and {"x", "y", "doc_id"} <= set(pca[0])
    for png in ("kl_per_dim.png", "latent_pca.png"):
        assert (reports / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recon = (reports / "reconstructions.txt").read_text()
    assert recon.count("\nx:") + recon.startswith("x:") == params.evaluate.num_examples
    assert (reports / "prior_samples.txt").read_text().count("greedy:") == params.evaluate.num_examples
    assert (reports / "interpolations.txt").read_text().count("t=") == params.evaluate.num_examples
    assert sorted(result.files) == sorted(p.name for p in reports.iterdir())


@pytest.mark.slow
def test_run_without_baseline_omits_lm_keys(trained_model, tmp_path):
    params = trained_model.replace(
        paths={"reports": str(tmp_path / "r"), "baseline": str(tmp_path / "no-lm")},
        evaluate={"splits": ["valid"], "iw_samples": 3, "num_examples": 0},
    )
    m = evaluate.run(params).metrics
    assert "lm_nll" not in m and "gap_vs_lm" not in m and math.isfinite(m["iw_nll"])
    reports = tmp_path / "r"
    assert sorted(p.name for p in reports.iterdir()) == [
        "interpolations.txt", "iw_nll_vs_k.csv", "iw_nll_vs_k.png", "kl_per_dim.csv", "kl_per_dim.png",
        "latent_pca.csv", "latent_pca.png", "metrics.json", "prior_samples.txt",
        "reconstructions.txt"]  # dvc.yaml's outs, always, and the IW-NLL curve
    assert "num_examples is 0" in (reports / "reconstructions.txt").read_text()


def test_missing_model_is_an_input_error_and_a_failing_cli(tiny_params, tmp_path):
    with pytest.raises(InputError, match="paths.model"):
        evaluate.run(tiny_params)
    from vaepipe.cli import main

    rc = main(["evaluate", "--params", str(write_params(tmp_path, tiny_params))])
    assert rc != 0
    assert not Path(tiny_params.paths.reports).exists()


def write_params(tmp_path: Path, params) -> Path:
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict()))
    return path


@pytest.mark.slow
def test_wrong_kind_and_wrong_tokenizer_are_input_errors(trained_model, tmp_path):
    # an LM where the VAE should be
    # (paths.baseline moves aside: two outputs may not be one folder)
    params = trained_model.replace(paths={"model": trained_model.paths.baseline, "baseline": str(tmp_path / "lm"),
                                          "reports": str(tmp_path / "r")})
    with pytest.raises(InputError, match="kind 'vae'"):
        evaluate.run(params)
    # a model trained with another tokenizer than paths.tokenizer holds
    tok_dir = tmp_path / "tok"
    shutil.copytree(trained_model.paths.tokenizer, tok_dir)
    tok_file = tok_dir / "tokenizer.json"
    tok_file.write_text(tok_file.read_text() + "\n")  # same tokenizer, different bytes and hash
    params = trained_model.replace(paths={"tokenizer": str(tok_dir), "reports": str(tmp_path / "r")})
    with pytest.raises(InputError, match="tokenizer"):
        evaluate.run(params)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_run_logs_to_the_training_run_in_mlflow(trained_model, tmp_path):
    from mlflow.tracking import MlflowClient

    from vaepipe.adapters.tracking_mlflow import MlflowTracker

    params, run_id, uri = tracked_copy(trained_model, tmp_path, iw_samples=3, num_examples=1)
    result = evaluate.run(params, make_tracker=MlflowTracker)
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    for split, m in result.splits.items():
        assert run.data.metrics[f"{split}_iw_nll"] == pytest.approx(m["iw_nll"])
        assert run.data.metrics[f"{split}_active_units"] == m["active_units"]
        assert run.data.metrics[f"{split}_gap_vs_lm_ci95_low"] == pytest.approx(m["gap_vs_lm_ci95"][0])
    headline = result.splits["test"]
    assert run.data.metrics["gap_vs_lm"] == pytest.approx(headline["gap_vs_lm"])
    assert [run.data.metrics[f"gap_vs_lm_ci95_{end}"] for end in ("low", "high")] == pytest.approx(
        headline["gap_vs_lm_ci95"])
    logged = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id, "evaluation")}
    assert {f"evaluation/{f}" for f in result.files} == logged


@pytest.mark.slow
def test_a_lost_tracking_run_does_not_fail_the_evaluation(trained_model, tmp_path, caplog):
    from vaepipe.adapters.tracking_mlflow import MlflowTracker

    params, _, _ = tracked_copy(trained_model, tmp_path, run_id=LOST_RUN_ID, splits=["test"], iw_samples=2,
                                num_examples=0)
    with caplog.at_level("WARNING", logger="vaepipe.stages.evaluate"):
        result = evaluate.run(params, make_tracker=MlflowTracker)
    assert (tmp_path / "r" / "metrics.json").is_file() and math.isfinite(result.metrics["iw_nll"])
    assert "not logged to MLflow" in caplog.text


@pytest.mark.slow
def test_without_matplotlib_the_figures_are_csv_only(trained_model, tmp_path, monkeypatch, caplog):
    """matplotlib is an optional extra: without it evaluate still succeeds, with the CSVs."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    params = trained_model.replace(paths={"reports": str(tmp_path / "r")},
                                   evaluate={"splits": ["test"], "iw_samples": 2, "num_examples": 1})
    with caplog.at_level("WARNING", logger="vaepipe.stages.plots"):
        result = evaluate.run(params)
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"metrics.json", "kl_per_dim.csv", "latent_pca.csv", "iw_nll_vs_k.csv"} <= names
    assert not {"kl_per_dim.png", "latent_pca.png", "iw_nll_vs_k.png"} & names
    assert sorted(result.files) == sorted(names)
    assert "pip install 'vaepipe[plots]'" in caplog.text
