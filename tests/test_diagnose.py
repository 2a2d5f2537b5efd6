"""vaepipe diagnose (vaepipe/stages/diagnose.py): the numbers are evaluate's, the verdict follows
them, a deliberately collapsed model is called collapsed (and a healthy one healthy), and the CLI
prints the report or JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vaepipe.core.config import Params
from vaepipe.core.errors import ConfigError
from vaepipe.stages import diagnose, evaluate, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def collapsed(trained_model: Params, tmp_path_factory: pytest.TempPathFactory) -> Params:
    """A tiny VAE trained the way that collapses (no BN-VAE, no free bits, the full KL weight from
    the first step), then made to be collapsed exactly: its encoder's output layer zeroed, so
    q(z|x) is the prior N(0, I) for every input (a tiny model trained so may or may not have
    found its way out of collapse by a given step). paths.baseline is the session's LM."""
    from vaepipe.ml.checkpoint import load_state, model_state, save_state

    root = tmp_path_factory.mktemp("collapsed")
    params = trained_model.replace(paths={"model": str(root / "vae"), "reports": str(root / "reports")},
                                   model={"bn_gamma": 0.0}, train={"kl_schedule": "constant"},
                                   evaluate={"max_docs": 200})
    train.run(params)
    best = Path(params.paths.model) / "best.pt"
    state = load_state(best)
    weights = model_state(state)
    weights["encoder.to_posterior.weight"].zero_()
    weights["encoder.to_posterior.bias"].zero_()
    save_state(best, state)
    return params


def _cli(params: Params, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vaepipe", "diagnose", "--params", str(path), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_a_collapsed_model_is_called_collapsed_with_the_keys_to_change(collapsed: Params) -> None:
    d = diagnose.run(collapsed, split="train")
    assert d.verdict == "collapsed", d.summary
    assert d.active_units == 0 and d.kl == pytest.approx(0.0, abs=1e-9) and d.mi == pytest.approx(0.0, abs=1e-9)
    assert d.summary.startswith(f"posterior collapse: 0 active units of {collapsed.model.latent_dim},")
    keys = [tip.split(":")[0] for tip in d.advice]
    # what the run had off; what it had on (linear warm-up was replaced by constant) is not advised
    assert keys == ["model.bn_gamma", "train.free_bits", "train.kl_schedule", "train.ae_pretrain_steps",
                    "train.aggressive_steps", "train.word_dropout"]
    assert len(d.kl_per_dim) == len(d.mean_variance_per_dim) == collapsed.model.latent_dim
    assert d.kl == pytest.approx(sum(d.kl_per_dim))
    assert d.active_units == sum(v > 0.01 for v in d.mean_variance_per_dim)
    # the LM baseline is there: the gap is VAE minus LM, inside its own interval
    assert d.gap_vs_lm == pytest.approx(d.iw_nll - d.lm_nll)
    assert d.gap_vs_lm_ci95[0] <= d.gap_vs_lm <= d.gap_vs_lm_ci95[1]


def test_the_numbers_are_evaluates(trained_model: Params, tmp_path: Path) -> None:
    # evaluate scores its headline split with the generator and metric seeds diagnose uses
    params = trained_model.replace(paths={"reports": str(tmp_path / "reports")}, evaluate={"num_examples": 0})
    ev = evaluate.run(params).splits[params.evaluate.splits[0]]
    d = diagnose.run(params)
    assert d.split == params.evaluate.splits[0] and d.n_docs == ev["n_docs"]
    for key in ("iw_nll", "kl", "mi", "active_units", "latent_dim", "lm_nll", "gap_vs_lm"):
        assert getattr(d, key) == pytest.approx(ev[key]), key
    assert d.gap_vs_lm_ci95 == pytest.approx(ev["gap_vs_lm_ci95"])


def test_cli_prints_the_report_and_json(collapsed: Params, tmp_path: Path) -> None:
    r = _cli(collapsed, tmp_path, "--split", "train", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["verdict"] == "collapsed" and out["split"] == "train"
    assert len(out["kl_per_dim"]) == collapsed.model.latent_dim and out["advice"]
    r = _cli(collapsed, tmp_path, "--split", "train")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verdict: posterior collapse:" in r.stdout
    assert "  model.bn_gamma: 0.7" in r.stdout and "95% CI" in r.stdout


def test_cli_errors_are_one_line(collapsed: Params, tmp_path: Path) -> None:
    r = _cli(collapsed.replace(paths={"model": str(tmp_path / "none")}), tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("vaepipe diagnose: error:")
    assert "no trained model (paths.model" in r.stderr
    with pytest.raises(ConfigError, match="diagnose: unknown split 'dev'"):
        diagnose.run(collapsed, split="dev")


@pytest.mark.parametrize(("au", "mi", "verdict"), [
    (0, 3.0, "collapsed"), (8, 0.05, "collapsed"), (3, 2.0, "weak"), (8, 0.5, "weak"),
    (4, 1.0, "healthy"), (8, 4.0, "healthy"),
])
def test_judge(au: int, mi: float, verdict: str) -> None:
    got, sentence = diagnose.judge(au, 8, mi, kl=1.0)
    assert got == verdict
    assert f"{au} active unit" in sentence and "of 8" in sentence


def test_advice_follows_the_training_params() -> None:
    on = {"model": {"bn_gamma": 1.0}, "train": {"free_bits": 0.5, "kl_schedule": "cyclical", "kl_warmup_steps": 2000,
                                                "ae_pretrain_steps": 500, "aggressive_steps": 500,
                                                "word_dropout": 0.3}}
    (only,) = diagnose.advice("weak", on)
    assert only.startswith("train longer")
    low = {"model": {"bn_gamma": 0.3}, "train": {**on["train"], "kl_schedule": "linear", "kl_warmup_steps": 100}}
    assert [t.split(":")[0] for t in diagnose.advice("collapsed", low)] == ["model.bn_gamma", "train.kl_warmup_steps"]
    assert diagnose.advice("healthy", {}) == []


@pytest.mark.slow
def test_a_model_that_uses_its_latent_is_called_healthy(trained_model: Params, tmp_path: Path) -> None:
    # beta stays near 0 (a warm-up far beyond the run) and word dropout makes the decoder need z
    params = trained_model.replace(paths={"model": str(tmp_path / "vae")},
                                   train={"kl_warmup_steps": 1_000_000, "max_steps": 150, "max_epochs": 100,
                                          "word_dropout": 0.5, "lr": 0.01, "eval_every": 0, "patience": 0},
                                   evaluate={"max_docs": 200})
    train.run(params)
    d = diagnose.run(params, split="train")
    assert d.verdict == "healthy", d.summary
    assert d.active_units == params.model.latent_dim and d.mi > diagnose.WEAK_MI and d.advice == []


def test_without_an_lm_baseline_there_is_no_gap(collapsed: Params, tmp_path: Path) -> None:
    d = diagnose.run(collapsed.replace(paths={"baseline": str(tmp_path / "no-lm")}), split="train")
    assert d.lm_nll is None and d.gap_vs_lm is None and d.gap_vs_lm_ci95 is None
    assert diagnose.gap_text(d) is None
    report = diagnose.format_report(d)
    assert "no LM baseline in paths.baseline" in report and "verdict: posterior collapse" in report
    assert json.loads(json.dumps(d.to_dict()))["lm_nll"] is None
