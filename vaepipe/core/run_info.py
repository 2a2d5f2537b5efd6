"""``run.json`` in a model folder: which tracking run trained the model, and where it lives.

Read by evaluate and embed (to log to and cite the training run) and by the Prefect flow (to
tag the run with DVC's hashes), which must not need torch to read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vaepipe.core.errors import InputError
from vaepipe.core.io import write_json

RUN_FILE = "run.json"


def write_run_info(model_dir: str | Path, run_id: str | None, tracking_uri: str | None) -> Path:
    path = Path(model_dir) / RUN_FILE
    write_json(path, {"run_id": run_id, "tracking_uri": tracking_uri})
    return path


def read_run_info(model_dir: str | Path) -> dict[str, Any]:
    """run.json, or nulls when it is absent (a model trained without tracking)."""
    path = Path(model_dir) / RUN_FILE
    if not path.is_file():
        return {"run_id": None, "tracking_uri": None}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
