"""The short plain-text report that ends a flow run: printed by ``make run``, kept in reports/.

One pure function, :func:`run_summary`, makes it from what the flow already has (the stages'
outcomes and times, metrics.json, the MLflow run of run.json, the output paths), so the
terminal and the file say the same thing. The file, ``<paths.reports>/run_summary.md``, sits
beside evaluate's outputs but is none of them: dvc.yaml does not own it (a per-run file with
timings would change every stage's lock entry), git ignores it with the rest of reports/, and
the next run overwrites it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

SUMMARY_FILE = "run_summary.md"
# the metrics people read first, in this order; the rest stays in metrics.json
SUMMARY_METRICS = ("iw_nll", "lm_nll", "gap_vs_lm", "kl", "mi", "active_units", "ppl")
# what to commit after a run (DVC's own per-stage reminder is silenced in the flow)
COMMIT_HINT = "git add dvc.lock params.yaml reports/metrics.json"


class StageTiming(Protocol):
    stage: str
    outcome: str
    seconds: float


def format_metric(key: str, metrics: Mapping[str, Any]) -> str | None:
    """``key``'s value with its 95% interval (``KEY_ci95``) when metrics.json has one; None when absent."""
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    ci = metrics.get(f"{key}_ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        text += f" (95% CI {ci[0]:.4g} to {ci[1]:.4g})"
    return text


def probe_lines(metrics: Mapping[str, Any]) -> list[str]:
    """evaluate's downstream probes (metrics.json ``probes``): per label, probe accuracy and
    kNN@10 same-label share of the VAE means vs LSA, the difference with its 95% interval."""
    section = metrics.get("probes")
    if not isinstance(section, Mapping) or not section:
        return []
    lines = ["", "Downstream probes (test split, VAE means vs LSA):"]
    width = max(len(str(name)) for name in section)
    for name, m in section.items():
        if not isinstance(m, Mapping):
            continue
        cells = []
        for key, label in (("acc", "probe acc"), ("knn", "kNN@10")):
            vae, lsa, diff = m.get(f"{key}_vae"), m.get(f"{key}_lsa"), format_metric(f"{key}_diff", m)
            if isinstance(vae, (int, float)) and isinstance(lsa, (int, float)) and diff is not None:
                cells.append(f"{label} {vae:.3f} vs {lsa:.3f} (diff {diff})")
        majority = m.get("majority")
        if isinstance(majority, (int, float)):
            cells.append(f"majority {majority:.3f}")
        lines.append(f"  {name:<{width}}  " + "; ".join(cells))
    return lines


def probe_markdown(metrics: Mapping[str, Any]) -> list[str]:
    """The same section as a markdown table for the Prefect report; [] without probes."""
    section = metrics.get("probes")
    if not isinstance(section, Mapping) or not section:
        return []
    lines = ["", "## Downstream probes (test split, VAE means vs LSA)", "",
             "| label | probe acc VAE / LSA | diff (95% CI) | kNN@10 VAE / LSA | diff (95% CI) | majority |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in section.items():
        if not isinstance(m, Mapping):
            continue
        cells = [str(name)]
        for key in ("acc", "knn"):
            vae, lsa = m.get(f"{key}_vae"), m.get(f"{key}_lsa")
            both = isinstance(vae, (int, float)) and isinstance(lsa, (int, float))
            cells += [f"{vae:.3f} / {lsa:.3f}" if both else "", format_metric(f"{key}_diff", m) or ""]
        majority = m.get("majority")
        cells.append(f"{majority:.3f}" if isinstance(majority, (int, float)) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mlflow_lines(info: Mapping[str, Any]) -> list[str]:
    """Which MLflow run, and how to look at it."""
    run_id, uri = info.get("run_id"), str(info.get("tracking_uri") or "")
    if not run_id:
        return ["MLflow: no run (tracking disabled)"]
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/#/experiments/{info.get('experiment_id', '0')}/runs/{run_id}"
        return [f"MLflow run: {run_id}", f"  open: {url}"]
    return [f"MLflow run: {run_id}", f"  open the UI: mlflow ui --backend-store-uri {uri}"]


def run_summary(reports: Sequence[StageTiming], metrics: Mapping[str, Any], info: Mapping[str, Any],
                outputs: Mapping[str, str], pushed: str) -> str:
    """The end-of-run report as plain text.

    ``reports``: each stage's outcome and seconds; ``metrics``: reports/metrics.json (may be
    empty); ``info``: ``run_id``/``tracking_uri``/``experiment_id`` of the MLflow run;
    ``outputs``: label -> path (model, reports, embeddings); ``pushed``: what happened to the
    DVC remote.
    """
    width = max((len(r.stage) for r in reports), default=0)
    lines = ["vaepipe run summary", "", "Stages (seconds, what DVC did):"]
    lines += [f"  {r.stage:<{width}}  {r.seconds:>7.1f} s  {r.outcome}" for r in reports]
    lines.append(f"  {'total':<{width}}  {sum(r.seconds for r in reports):>7.1f} s")
    shown = [(k, format_metric(k, metrics)) for k in SUMMARY_METRICS]
    shown = [(k, v) for k, v in shown if v is not None]
    if shown:
        lines += ["", "Metrics (headline split):"]
        key_width = max(len(k) for k, _ in shown)
        lines += [f"  {k:<{key_width}}  {v}" for k, v in shown]
    lines += probe_lines(metrics)
    lines += ["", "Outputs:"]
    lines += [f"  {label}: {path}" for label, path in outputs.items()]
    lines += ["", *mlflow_lines(info), f"DVC remote: {pushed}", f"Commit the run: {COMMIT_HINT}"]
    return "\n".join(lines) + "\n"


def write_summary(text: str, reports_dir: Path) -> Path:
    """Write ``text`` to ``reports_dir/run_summary.md`` (the folder exists after evaluate)."""
    from vaepipe.core.io import atomic_write_text

    path = reports_dir / SUMMARY_FILE
    reports_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
