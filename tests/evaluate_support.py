"""Set-up shared by the evaluate tests (test_evaluate*.py, test_probes.py).

Both start from the session's trained fixture model (``trained_model`` in conftest.py), which
they must not change: ``quick_eval`` writes its reports under ``tmp_path``, ``tracked_copy``
evaluates a copy of the model whose run.json names an MLflow run in a store under ``tmp_path``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vaepipe.core.config import Params

# a run id that no store holds: a tracking run that was lost
LOST_RUN_ID = "0123456789abcdef0123456789abcdef"


def quick_eval(trained_model: Params, tmp_path: Path, **evaluate_keys: Any) -> tuple[Params, Any]:
    """Evaluate the trained fixture model on the test split, K = 2, no examples, no reconstruction
    score (``evaluate_keys`` override these): (params, EvalResult), reports in ``tmp_path/r``."""
    from vaepipe.stages import evaluate

    params = trained_model.replace(paths={"reports": str(tmp_path / "r")},
                                   evaluate={"splits": ["test"], "iw_samples": 2, "num_examples": 0,
                                             "recon_docs": 0, **evaluate_keys})
    return params, evaluate.run(params)


def tracked_copy(trained_model: Params, tmp_path: Path, *, run_id: str | None = None,
                 **evaluate_keys: Any) -> tuple[Params, str, str]:
    """(params, run_id, tracking uri) that evaluate a copy of the trained model in ``tmp_path/vae``
    into ``tmp_path/r``, tracking on, with ``evaluate_keys`` set.

    The copy's run.json names ``run_id`` in a fresh SQLite store; without one, a finished run
    made here stands in for the run train.py made.
    """
    from vaepipe.adapters.tracking_mlflow import MlflowTracker
    from vaepipe.core.run_info import write_run_info

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = trained_model.replace(
        paths={"model": str(tmp_path / "vae"), "reports": str(tmp_path / "r")},
        evaluate=evaluate_keys,
        tracking={"enabled": True, "uri": uri, "system_metrics": False},
    )
    shutil.copytree(trained_model.paths.model, tmp_path / "vae")
    if run_id is None:
        training = MlflowTracker(params.tracking)
        training.start(run_name="train")
        run_id = training.run_id
        training.end()
    write_run_info(tmp_path / "vae", run_id, uri)
    return params, run_id, uri
