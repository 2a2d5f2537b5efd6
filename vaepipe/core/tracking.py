"""Experiment tracking behind a small protocol, so the core runs where MLflow is absent.

``NullTracker`` does nothing (like nanochat's DummyWandb); ``MlflowTracker``
(vaepipe.adapters.tracking_mlflow) logs to MLflow. Stage code only ever sees a ``Tracker``,
made by ``tracker_for(params, make_tracker)`` from a factory its caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from vaepipe.core.errors import ConfigError

if TYPE_CHECKING:
    from vaepipe.core.config import Params, TrackingConfig


# what a run used each token split for: the context of its dataset (MLflow's "Datasets" column)
SPLIT_CONTEXT = {"train": "training", "valid": "validation", "test": "test"}


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

    def log_dataset(self, name: str, path: str | Path, *, context: str, digest: str | None = None,
                    rows: int | None = None) -> None:
        """Record the Parquet folder ``path`` as an input of the run, named ``name``.

        ``context`` says what the run used it for ("training", "validation", "test");
        ``digest`` is our own hash of the data, used when dvc.lock does not name ``path``
        (None: the tracker hashes it then); ``rows``: how many records the run read (None: all
        of the folder's). Never raises: a store that is away gets it later or lists it as not
        logged.
        """
        ...

    def set_description(self, markdown: str) -> None:
        """The run's description, shown on top of its page (markdown)."""
        ...

    def log_text_model(self, package_dir: str | Path, *, registered_name: str | None) -> str | None:
        """Upload (and register, when a name is given) the text -> latent-mean model; its URI.

        ``package_dir`` is a folder made by ``vaepipe.stages.package.package_text_model``:
        the tracker only uploads and registers what is in it.
        """
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

    def log_dataset(self, name: str, path: str | Path, *, context: str, digest: str | None = None,
                    rows: int | None = None) -> None:
        pass

    def set_description(self, markdown: str) -> None:
        pass

    def log_text_model(self, package_dir: str | Path, *, registered_name: str | None) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass


# what a caller passes to the stages that track: tracking config -> tracker (MlflowTracker is one)
TrackerFactory = Callable[["TrackingConfig"], Tracker]


def tracker_for(params: Params, make_tracker: TrackerFactory | None) -> Tracker:
    """The tracker a stage logs to: ``NullTracker`` unless ``tracking.enabled``.

    The caller (the CLI, or a Python user) supplies the factory of a real tracker, e.g.
    ``vaepipe.adapters.tracking_mlflow.MlflowTracker``; the stages never import one, so they
    run where MLflow is not installed.
    """
    if not params.tracking.enabled:
        return NullTracker()
    if make_tracker is None:
        raise ConfigError("tracking.enabled is true but no tracker was given: run the stage with the "
                          "`vaepipe` command, or pass make_tracker=MlflowTracker "
                          "(from vaepipe.adapters.tracking_mlflow)")
    return make_tracker(params.tracking)
