"""Experiment tracking behind a small protocol, so the core runs where MLflow is absent.

``NullTracker`` does nothing (like nanochat's DummyWandb); ``MlflowTracker`` logs to MLflow.
Stage code only ever sees a ``Tracker``. ``make_tracker(params)`` picks one; MLflow is
imported lazily, so importing vaepipe never touches MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from vaepipe.config import Params


@runtime_checkable
class Tracker(Protocol):
    """What training and evaluation need from an experiment tracker."""

    @property
    def run_id(self) -> str | None: ...

    def start(self, run_name: str | None = None, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_text_model(self, model_dir: str | Path, tokenizer_file: str | Path, *,
                       lowercase: bool, registered_name: str | None) -> str | None:
        """Log (and register, when a name is given) the text -> latent-mean model; its URI."""
        ...

    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """The no-op tracker: ``tracking.enabled: false``, tests, and GPU boxes without MLflow."""

    run_id: str | None = None

    def start(self, run_name: str | None = None, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text_model(self, model_dir: str | Path, tokenizer_file: str | Path, *,
                       lowercase: bool, registered_name: str | None) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass


def make_tracker(params: Params) -> Tracker:
    """``MlflowTracker`` when ``tracking.enabled``, else ``NullTracker``.

    MLflow is imported only here, on demand, so the training core runs where it is absent.
    """
    if not params.tracking.enabled:
        return NullTracker()
    from vaepipe.tracking_mlflow import MlflowTracker

    return MlflowTracker(params.tracking)
