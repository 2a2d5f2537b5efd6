"""Evaluation extras (#16): the VAE-vs-LM gap with its paired bootstrap interval, the IW-NLL as a
function of K from prefixes of the same draws, and their place in metrics.json, MLflow and the
Prefect report."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from tests.test_evaluate import CPU, quadrature_log_px, synthetic_split, tiny_vae
from vaepipe.ml import estimators as est
from vaepipe.stages import evaluate, plots

# ---------------------------------------------------------------------------------------
# the bootstrap interval


def test_bootstrap_interval_matches_an_independent_computation():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 5.0, size=300)
    low, high = est.bootstrap_mean_ci(x, resamples=1000, seed=42)
    # the documented algorithm, written out here: one integers(0, N, N) draw per resample
    gen = np.random.default_rng(42)
    means = [x[gen.integers(0, len(x), len(x))].mean() for _ in range(1000)]
    want = np.percentile(means, [2.5, 97.5])
    assert (low, high) == pytest.approx(tuple(want), abs=1e-12)
    assert est.bootstrap_mean_ci(x, seed=42) == (low, high)  # 1,000 resamples by default, seeded
    assert est.bootstrap_mean_ci(x, seed=43) != (low, high)


@pytest.mark.parametrize("n, sd", [(400, 1.0), (2000, 3.0)])
def test_bootstrap_interval_agrees_with_the_normal_approximation(n, sd):
    x = np.random.default_rng(n).normal(-1.5, sd, size=n)
    low, high = est.bootstrap_mean_ci(x, resamples=1000, seed=0)
    assert low < x.mean() < high
    width = 2 * 1.96 * x.std(ddof=1) / math.sqrt(n)
    # the percentile bootstrap of a mean of normal data: the same width up to resampling noise
    # (about 5% for 1,000 resamples) and the n/(n-1) factor
    assert high - low == pytest.approx(width, rel=0.12)
    assert (low + high) / 2 == pytest.approx(x.mean(), abs=0.1 * width)


def test_bootstrap_interval_refuses_empty_input():
    with pytest.raises(ValueError, match="non-empty"):
        est.bootstrap_mean_ci(np.array([]))


def test_gap_is_the_mean_paired_difference_with_its_interval():
    rng = np.random.default_rng(1)
    n = 500
    lm_log_px = -rng.uniform(20, 80, size=n)  # documents differ a lot ...
    vae_log_px = lm_log_px + rng.normal(0.3, 0.5, size=n)  # ... the paired difference little
    g = evaluate.gap_vs_lm(vae_log_px, lm_log_px, seed=7)
    diff = (-vae_log_px) - (-lm_log_px)  # VAE IW-NLL minus LM NLL, per document
    assert g["gap_vs_lm"] == pytest.approx(diff.mean())
    assert g["gap_vs_lm_ci95"] == pytest.approx(list(est.bootstrap_mean_ci(diff, resamples=1000, seed=7)))
    low, high = g["gap_vs_lm_ci95"]
    # paired: the width follows the spread of the differences (0.5), not of the documents (17)
    assert high - low == pytest.approx(2 * 1.96 * diff.std(ddof=1) / math.sqrt(n), rel=0.12)
    assert low < g["gap_vs_lm"] < high < 0  # the VAE is better by about 0.3 nats, clearly


def test_split_metrics_gains_the_gap_only_with_a_baseline():
    rng = np.random.default_rng(0)
    n, z = 40, 2
    mu, logvar = rng.normal(size=(n, z)), np.full((n, z), -1.0)
    kl = est.gaussian_kl_per_dim(torch.from_numpy(mu), torch.from_numpy(logvar)).numpy()
    recon = rng.uniform(10, 60, size=n)
    log_px = -(recon + kl.sum(1)) + rng.uniform(0, 2, size=n)
    scores = evaluate.VAEScores(log_px, recon, kl, mu, logvar)
    lengths, texts = rng.integers(1, 20, size=n), ["a b"] * n
    lm = log_px + rng.normal(0, 1, size=n)
    m = evaluate.split_metrics(scores, lengths, texts, iw_samples=5, mi_batch_size=8, seed=11, lm_log_px=lm)
    assert m["gap_vs_lm"] == pytest.approx(m["iw_nll"] - m["lm_nll"])
    assert m["gap_vs_lm_ci95"] == evaluate.gap_vs_lm(log_px, lm, seed=11)["gap_vs_lm_ci95"]
    json.dumps(m)  # metrics.json material: plain floats and lists
    without = evaluate.split_metrics(scores, lengths, texts, iw_samples=5, mi_batch_size=8, seed=11)
    assert not {"gap_vs_lm", "gap_vs_lm_ci95"} & set(without)


def test_tracked_metrics_flatten_the_interval_and_lift_the_headline_gap():
    splits = {"test": {"iw_nll": 10.0, "gap_vs_lm": -0.5, "gap_vs_lm_ci95": [-0.9, -0.1], "n_docs": 3},
              "valid": {"iw_nll": 11.0, "gap_vs_lm": 0.25, "gap_vs_lm_ci95": [0.0, 0.5], "mi": float("nan")}}
    flat = evaluate.tracked_metrics(splits)
    assert flat == {"test_iw_nll": 10.0, "test_gap_vs_lm": -0.5, "test_gap_vs_lm_ci95_low": -0.9,
                    "test_gap_vs_lm_ci95_high": -0.1, "test_n_docs": 3.0, "valid_iw_nll": 11.0,
                    "valid_gap_vs_lm": 0.25, "valid_gap_vs_lm_ci95_low": 0.0, "valid_gap_vs_lm_ci95_high": 0.5,
                    "gap_vs_lm": -0.5, "gap_vs_lm_ci95_low": -0.9, "gap_vs_lm_ci95_high": -0.1}


def test_the_prefect_report_shows_the_gap_with_its_interval():
    pipeline = pytest.importorskip("flows.pipeline")
    md = pipeline.report_markdown({"iw_nll": 30.5, "lm_nll": 31.0, "gap_vs_lm": -0.5,
                                   "gap_vs_lm_ci95": [-0.75, -0.25]}, [], {"run_id": None}, {}, "not pushed")
    assert "| gap_vs_lm | -0.5 (95% CI -0.75 to -0.25) |" in md
    assert md.index("| lm_nll |") < md.index("| gap_vs_lm |")


# ---------------------------------------------------------------------------------------
# IW-NLL as a function of K


def test_iw_curve_ks_are_clipped_to_iw_samples():
    assert evaluate.iw_curve_ks(500) == (1, 10, 50, 100, 500)
    assert evaluate.iw_curve_ks(1000) == (1, 10, 50, 100, 500, 1000)
    assert evaluate.iw_curve_ks(64) == (1, 10, 50, 64)
    assert evaluate.iw_curve_ks(1) == (1,)


def test_prefix_estimates_are_the_estimates_of_the_first_k_weights():
    log_w = torch.randn(4, 9, dtype=torch.float64) * 3
    got = est.iw_log_marginal_prefixes(log_w, [1, 4, 9])
    for j, k in enumerate([1, 4, 9]):
        want = [math.log(np.mean(np.exp(row[:k]))) for row in log_w.numpy()]
        np.testing.assert_allclose(got[:, j].numpy(), want, rtol=1e-12)
    assert est.iw_log_marginal_prefixes(log_w, []).shape == (4, 0)
    with pytest.raises(ValueError, match="1..9"):
        est.iw_log_marginal_prefixes(log_w, [10])


@pytest.mark.parametrize("batch_tokens", [40_000, 150])  # all K draws in one call / K in chunks
def test_the_curve_ends_at_the_headline_iw_nll_and_falls_with_k(batch_tokens):
    model = tiny_vae(seed=3)  # a loose posterior: the IW bound tightens visibly with K
    split = synthetic_split(60, model.cfg.vocab_size, seed=2)
    ks = evaluate.iw_curve_ks(200)
    scores = evaluate.score_vae(model, split, iw_samples=200, batch_tokens=batch_tokens, device=CPU,
                                generator=torch.Generator().manual_seed(0), iw_ks=ks)
    assert scores.iw_ks == (1, 10, 50, 100, 200) and scores.log_px_by_k.shape == (60, 5)
    np.testing.assert_array_equal(scores.log_px_by_k[:, -1], scores.log_px)  # the same draws, K = iw_samples
    nll = -scores.log_px_by_k.mean(0)
    exact = -float(np.mean([quadrature_log_px(model, s) for s in split.seqs]))
    # measured: about 12.2 at K = 1, 11.36 at K = 10, then within 0.04 of the true NLL (11.32);
    # from K = 10 on the steps are below the Monte Carlo noise of 60 documents (about 0.03 at
    # K = 50), so the curve is checked to fall within that noise and to end at the truth
    assert nll[0] > nll[1] + 0.5, nll
    assert all(b <= a + 0.08 for a, b in zip(nll, nll[1:])), nll
    assert nll[-1] == pytest.approx(exact, abs=0.03)
    assert nll[0] > exact + 0.5 and (nll >= exact - 0.08).all(), (nll, exact)


def test_k1_is_the_single_draw_log_weight_computed_directly():
    model = tiny_vae(latent_dim=3, vocab=30, seed=5)
    with torch.no_grad():  # a near-deterministic posterior: every draw is z = mu (to 1e-4)
        model.encoder.to_posterior.bias[3:].fill_(-20.0)
    split = synthetic_split(100, 30, seed=4, max_len=9)
    scores = evaluate.score_vae(model, split, iw_samples=8, batch_tokens=300, device=CPU,
                                generator=torch.Generator().manual_seed(0), iw_ks=(1, 8))
    # log w = log p(x|z) + log p(z) - log q(z|x) at z = mu + sd * eps: with sd ~ 0, the first
    # two terms are those at mu and -log q(z|x) = 0.5 (Z log 2 pi + sum logvar + |eps|^2), so
    # the K = 1 value minus the part computed here from mu is 0.5 |eps|^2 ~ chi2(Z = 3) / 2
    rest = []
    with torch.inference_mode():
        for i, seq in enumerate(split.seqs):
            ids, lengths = torch.from_numpy(seq)[None], torch.tensor([len(seq)])
            mu, logvar = (t.double() for t in model.encode(ids, lengths))
            at_mu = (float(model.log_likelihood(ids, lengths, mu.float())[0]) + float(est.log_standard_normal(mu)[0])
                     + 0.5 * float((est.LOG_2PI + logvar).sum()))
            rest.append(scores.log_px_by_k[i, 0] - at_mu)
    rest = np.array(rest)
    assert (rest >= -2e-3).all(), rest.min()  # a half squared norm, never negative
    assert rest.mean() == pytest.approx(1.5, abs=0.45)  # E chi2(3) / 2, sd of the mean 0.12
    # and K = 1 is a one-sample ELBO: its mean over documents is the closed-form ELBO's, within noise
    elbo = -(scores.recon + scores.kl_per_dim.sum(1))
    assert (scores.log_px_by_k[:, 0] - elbo).mean() == pytest.approx(0.0, abs=0.45)


def test_score_vae_refuses_a_k_beyond_iw_samples():
    model = tiny_vae()
    with pytest.raises(ValueError, match="iw_ks"):
        evaluate.score_vae(model, synthetic_split(2, 12), iw_samples=5, batch_tokens=100, device=CPU, iw_ks=(10,))


def test_write_iw_curve(tmp_path):
    n = 5
    by_k = -np.array([[3.0, 2.0, 1.5]] * n)
    scores = evaluate.VAEScores(by_k[:, -1], np.zeros(n), np.zeros((n, 1)), np.zeros((n, 1)), np.zeros((n, 1)),
                                (1, 10, 20), by_k)
    files = evaluate.write_iw_curve(tmp_path, scores)
    with open(tmp_path / "iw_nll_vs_k.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["k"]), float(r["iw_nll"])) for r in rows] == [(1, 3.0), (10, 2.0), (20, 1.5)]
    assert files[0] == "iw_nll_vs_k.csv"
    if len(files) > 1:  # matplotlib installed
        assert (tmp_path / "iw_nll_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_curve = evaluate.VAEScores(*[getattr(scores, f) for f in ("log_px", "recon", "kl_per_dim", "mu", "logvar")])
    assert evaluate.write_iw_curve(tmp_path / "none", no_curve) == []


def test_report_csv_keeps_texts_with_line_breaks_whole(tmp_path):
    """Decoded samples may hold any character: a carriage return, a newline, quotes, commas.
    Each stays inside its field for the csv module and for pandas, rows and values intact."""
    texts = ["can:\r States", "two\nlines", "crlf\r\nend", 'say "no", then', "\x0b\x1c\x85\u2028 odd", ""]
    rows = [["sample", i, t] for i, t in enumerate(texts)]
    plots.write_csv(tmp_path / "s.csv", ["kind", "n", "text"], rows)
    with open(tmp_path / "s.csv", newline="") as f:
        back = list(csv.reader(f))
    assert back == [["kind", "n", "text"], *[["sample", str(i), t] for i, t in enumerate(texts)]]
    pd = pytest.importorskip("pandas")
    frame = pd.read_csv(tmp_path / "s.csv", keep_default_na=False)
    assert frame["text"].tolist() == texts and frame["n"].tolist() == list(range(len(texts)))


# ---------------------------------------------------------------------------------------
# end to end on the session's trained fixture model


@pytest.mark.slow
def test_run_writes_the_gap_and_the_curve(trained_model, tmp_path):
    params = trained_model.replace(paths={"reports": str(tmp_path / "r")},
                                   evaluate={"iw_samples": 12, "num_examples": 1})
    result = evaluate.run(params)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    for split in metrics["splits"].values():
        low, high = split["gap_vs_lm_ci95"]
        assert split["gap_vs_lm"] == pytest.approx(split["iw_nll"] - split["lm_nll"])
        assert low <= split["gap_vs_lm"] <= high
    assert metrics["gap_vs_lm"] == metrics["splits"]["test"]["gap_vs_lm"]
    with open(tmp_path / "r" / "iw_nll_vs_k.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["k"]) for r in rows] == [1, 10, 12]
    assert float(rows[-1]["iw_nll"]) == pytest.approx(metrics["iw_nll"], rel=1e-9)
    assert "iw_nll_vs_k.csv" in result.files


# ---------------------------------------------------------------------------------------
# evaluate.strategies and the reconstruction score


def test_token_accuracy_counts_positions_and_the_end_of_sentence():
    eos = 2  # EOS_ID
    assert eos == evaluate.EOS_ID
    assert evaluate.token_accuracy([[5, 6, 7]], [[5, 6, 7]]) == 1.0
    assert evaluate.token_accuracy([[5, 6, 7]], [[5, 9, 7]]) == pytest.approx(3 / 4)
    assert evaluate.token_accuracy([[5, 6, 7]], [[5, 6]]) == pytest.approx(2 / 4)  # <eos> where 7 is due
    assert evaluate.token_accuracy([[5, 6, 7]], [[5, 6, 7, 8, 9]]) == pytest.approx(3 / 4)  # no <eos> in time
    assert evaluate.token_accuracy([[6, 7, 8]], [[5, 6, 7, 8]]) == 0.0  # shifted: wrong from there on
    # pooled over tokens, not averaged over documents: (2 + 1) / (2 + 4), the second <eos> right
    assert evaluate.token_accuracy([[5], [5, 6, 7]], [[5], [9, 9, 9]]) == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        evaluate.token_accuracy([[5]], [[5], [6]])


def test_reconstruction_accuracy_matches_one_at_a_time_greedy_decoding():
    model = tiny_vae(latent_dim=3, vocab=30, seed=5)
    split = synthetic_split(20, 30, seed=4, max_len=9)
    scores = evaluate.score_vae(model, split, iw_samples=2, batch_tokens=500, device=CPU,
                                generator=torch.Generator().manual_seed(0))
    got = evaluate.reconstruction_accuracy(model, split, scores.mu, 15)
    assert got["recon_docs"] == 15
    # the same score counted here, from greedy decoding one document at a time with its own length bound
    from vaepipe.ml.decoding import Decoding, decode_ids

    right = total = 0
    with torch.inference_mode():
        for seq, mu in zip(split.seqs[:15], scores.mu[:15]):
            (out,) = decode_ids(model, torch.from_numpy(mu[None]).float(), Decoding("greedy", max_tokens=len(seq) + 1))
            target = [*seq.tolist(), evaluate.EOS_ID]
            out = [*out, evaluate.EOS_ID]
            right += sum(a == b for a, b in zip(target, out))
            total += len(target)
    assert got["recon_token_acc"] == pytest.approx(right / total)
    assert evaluate.reconstruction_accuracy(model, split, scores.mu, 0) == {}
    assert evaluate.reconstruction_accuracy(model, split, scores.mu, 1000)["recon_docs"] == 20


class _IdsTokenizer:
    """decode_batch as the tokenizers library's, writing the ids as text."""

    def decode_batch(self, seqs, skip_special_tokens=True):
        return [" ".join(f"t{i}" for i in s) for s in seqs]


def test_samples_by_strategy_decode_the_same_z_with_each_strategy(tmp_path):
    from vaepipe.ml.decoding import Decoding, decode_ids

    model = tiny_vae(latent_dim=3, vocab=30, seed=5)
    split = synthetic_split(6, 30, seed=4, max_len=9)
    scores = evaluate.score_vae(model, split, iw_samples=2, batch_tokens=500, device=CPU,
                                generator=torch.Generator().manual_seed(0))

    def write(folder, strategies, seed=3):
        files = evaluate.write_samples_by_strategy(tmp_path / folder, model, _IdsTokenizer(), split, scores,
                                                   strategies=strategies, num_examples=4, max_tokens=12, seed=seed)
        if not files:
            return None
        with open(tmp_path / folder / files[0]) as f:
            return list(csv.DictReader(f))

    for d in ("a", "b", "c", "none"):
        (tmp_path / d).mkdir()
    rows = write("a", ["greedy", "beam", "sample"])
    assert list(rows[0]) == ["kind", "doc_id", "input", "greedy", "beam", "sample"]
    assert [r["kind"] for r in rows] == ["reconstruction"] * 4 + ["prior"] * 4
    assert [r["doc_id"] for r in rows[:4]] == split.doc_ids[:4]
    assert rows[0]["input"] == " ".join(f"t{i}" for i in split.seqs[0])
    greedy = decode_ids(model, torch.from_numpy(scores.mu[:4]).float(), Decoding("greedy", max_tokens=12))
    assert [r["greedy"] for r in rows[:4]] == [" ".join(f"t{i}" for i in s) for s in greedy]
    assert write("b", ["sample", "greedy"]) == [{k: r[k] for k in ("kind", "doc_id", "input", "sample", "greedy")}
                                               for r in rows]  # same seed: the same samples
    assert [r["sample"] for r in write("c", ["sample"], seed=4)] != [r["sample"] for r in rows]
    assert write("none", []) is None and not list((tmp_path / "none").iterdir())


def test_unknown_strategy_is_a_config_error_before_any_work(tiny_params, tmp_path):
    from vaepipe.core.errors import ConfigError

    params = tiny_params.replace(evaluate={"strategies": ["greedy", "nucleus"]})
    with pytest.raises(ConfigError, match="evaluate.strategies: unknown decoding strategy 'nucleus'"):
        evaluate.run(params)  # no trained model here: the strategy is checked first
    from tests.test_evaluate import write_params
    from vaepipe.cli import main

    assert main(["evaluate", "--params", str(write_params(tmp_path, params))]) == 2


@pytest.mark.slow
def test_run_writes_strategies_and_the_reconstruction_score(trained_model, tmp_path):
    params = trained_model.replace(paths={"reports": str(tmp_path / "r")},
                                   evaluate={"splits": ["test"], "iw_samples": 2, "num_examples": 3,
                                             "recon_docs": 7})
    result = evaluate.run(params)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert 0.0 <= metrics["recon_token_acc"] <= 1.0 and metrics["recon_docs"] == 7
    assert metrics["splits"]["test"]["recon_token_acc"] == metrics["recon_token_acc"]
    with open(tmp_path / "r" / "samples_by_strategy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0])[3:] == ["greedy", "beam", "sample"]
    assert "samples_by_strategy.csv" in result.files
    params = params.replace(paths={"reports": str(tmp_path / "r2")},
                            evaluate={"strategies": [], "recon_docs": 0})
    result = evaluate.run(params)
    assert "recon_token_acc" not in result.metrics and "samples_by_strategy.csv" not in result.files
