"""bench/sweep.py: the jobs file's checks, and a real two-model sweep on the fixture corpus."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

SWEEP = Path(__file__).resolve().parents[1] / "bench" / "sweep.py"


def load_sweep():
    spec = importlib.util.spec_from_file_location("bench_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, message", [
    ("vae lm=lm\nlm model.kind=lm\n", "jobs.txt:1: lm=lm must name an LM job on an earlier line"),
    ("lm model.kind=lm\nlm model.kind=lm seed=2\n", "jobs.txt:2: duplicate job name 'lm'"),
    ("# comment\nvae bn_gamma\n", "jobs.txt:2: expected KEY=VALUE or lm=NAME, got 'bn_gamma'"),
])
def test_bad_jobs_file_names_the_line(tmp_path, text, message):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(text)
    with pytest.raises(SystemExit, match=message):
        load_sweep().parse_jobs(jobs)


def test_jobs_file_comments_and_kinds(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# header\n\nlm model.kind=lm  # the baseline\nvae lm=lm model.bn_gamma=0.5 seed=3\n")
    lm, vae = load_sweep().parse_jobs(jobs)
    assert (lm.name, lm.is_lm, lm.overrides, lm.line) == ("lm", True, ["model.kind=lm"], 3)
    assert (vae.name, vae.is_lm, vae.lm, vae.overrides) == ("vae", False, "lm", ["model.bn_gamma=0.5", "seed=3"])


@pytest.mark.slow
def test_sweep_scores_each_vae_against_its_own_lm(built_tokens, built_root, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("lm model.kind=lm\nvae lm=lm model.bn_gamma=0.5\nbroken lm=lm model.no_such_key=1\n")
    common = [a for s in tiny_overrides(built_root) for a in ("--set", s)]
    out, models = tmp_path / "out", tmp_path / "models"
    assert load_sweep().main([str(jobs), "--out", str(out), "--models", str(models), "--workers", "2", *common]) == 0

    rows = {r["name"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"lm", "vae", "broken"}
    assert rows["lm"]["steps"] > 0 and "iw_nll" not in rows["lm"]  # an LM is trained, not scored
    assert (models / "lm" / "best.pt").is_file() and (models / "vae" / "best.pt").is_file()
    vae = rows["vae"]
    metrics = json.loads((out / "reports" / "vae" / "metrics.json").read_text())
    assert vae["iw_nll"] == metrics["iw_nll"] and vae["lm_nll"] == metrics["lm_nll"]
    assert vae["gap"] == pytest.approx(metrics["iw_nll"] - metrics["lm_nll"])
    assert vae["gap_vs_lm_ci95"] == metrics["gap_vs_lm_ci95"]  # the paired bootstrap interval, kept
    assert vae["gap_vs_lm_ci95"][0] <= vae["gap"] <= vae["gap_vs_lm_ci95"][1]
    assert vae["iw_nll"] <= vae["elbo"] + 1e-6  # the IW bound is at least as tight as the ELBO
    assert vae["n_docs"] == metrics["n_docs"] > 0 and vae["steps"] == rows["lm"]["steps"]  # same budget
    assert "vaepipe train exited 2" in rows["broken"]["error"]
    assert "model.no_such_key" in (out / "logs" / "broken.train.log").read_text()
    table = (out / "results.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| lm", "| vae", "| broken"]
