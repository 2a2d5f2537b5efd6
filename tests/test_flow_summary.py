"""flows/summary.py: the end-of-run report printed by `make run` and written to reports/."""

from __future__ import annotations

from pathlib import Path

from flows.pipeline import StageReport
from flows.summary import SUMMARY_FILE, format_metric, mlflow_lines, run_summary, write_summary

REPORTS = [StageReport("ingest", "up to date", 0.8), StageReport("train", "ran", 612.5),
           StageReport("evaluate", "restored from run-cache", 3.0)]
OUTPUTS = {"model": "models/vae", "reports": "reports", "embeddings": "data/embeddings"}
METRICS = {"iw_nll": 201.25, "lm_nll": 203.5, "gap_vs_lm": -2.25, "gap_vs_lm_ci95": [-3.5, -1.0], "kl": 4.5,
           "mi": 2.75, "active_units": 7, "ppl": 88.125, "elbo": 205.0}


def test_summary_has_times_metrics_outputs_and_the_mlflow_command() -> None:
    text = run_summary(REPORTS, METRICS, {"run_id": "abc123", "tracking_uri": "sqlite:///mlflow.db"}, OUTPUTS,
                       "not pushed (--no-push)")
    lines = text.splitlines()
    assert "  train       612.5 s  ran" in lines and "  evaluate      3.0 s  restored from run-cache" in lines
    assert "  total       616.3 s" in lines
    # headline metrics in order, the gap with its interval; the rest stays in metrics.json
    assert "  gap_vs_lm     -2.25 (95% CI -3.5 to -1)" in lines
    keys = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in METRICS]
    assert keys == ["iw_nll", "lm_nll", "gap_vs_lm", "kl", "mi", "active_units", "ppl"]
    assert "  model: models/vae" in lines and "  embeddings: data/embeddings" in lines
    assert "MLflow run: abc123" in lines
    assert "  open the UI: mlflow ui --backend-store-uri sqlite:///mlflow.db" in lines
    assert "DVC remote: not pushed (--no-push)" in lines
    assert lines[-1].startswith("Commit the run: git add dvc.lock")


def test_summary_without_metrics_or_tracking() -> None:
    text = run_summary(REPORTS[:1], {}, {"run_id": None}, OUTPUTS, "pushed")
    assert "Metrics" not in text and "MLflow: no run (tracking disabled)" in text


def test_format_metric_and_mlflow_links() -> None:
    assert format_metric("gap_vs_lm", {"gap_vs_lm": 1.0}) == "1"  # no interval: the value alone
    assert format_metric("active_units", {"active_units": 3}) == "3"
    assert format_metric("kl", {}) is None and format_metric("kl", {"kl": True}) is None
    assert format_metric("x", {"x": 0.5, "x_ci95": [0.25, "?"]}) == "0.5"
    assert mlflow_lines({"run_id": "r1", "tracking_uri": "http://h:5000/", "experiment_id": "3"}) == \
        ["MLflow run: r1", "  open: http://h:5000/#/experiments/3/runs/r1"]


def test_write_summary(tmp_path: Path) -> None:
    path = write_summary("hello\n", tmp_path / "reports")
    assert path == tmp_path / "reports" / SUMMARY_FILE and path.read_text() == "hello\n"
