"""Which MLflow run made the model of a git revision.

    python -m flows.lineage [--rev REV] [--project-dir D] [--remote NAME]

``paths.model/run.json`` (``run_id``, ``tracking_uri``) is an output of the train stage, so the
model directory's md5 in that revision's dvc.lock pins the run. This reads params.yaml (for
``paths.model``) from git and run.json through ``dvc.api.read``, which takes the file from the
local DVC cache or, in a clone that never pulled, from the remote — no checkout needed.
Prints one JSON object: rev, model path, run_id, tracking_uri.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL_PATH = "models/vae"  # vaepipe.core.config.PathsConfig.model


def model_run(project_dir: str | Path = ".", rev: str | None = None, remote: str | None = None) -> dict[str, Any]:
    """``{"rev", "model", "run_id", "tracking_uri"}`` of ``rev`` (None: the workspace)."""
    import dvc.api
    from dvc.exceptions import DvcException

    from vaepipe.core.errors import InputError

    repo = str(Path(project_dir).resolve())
    try:
        params = yaml.safe_load(dvc.api.read("params.yaml", repo=repo, rev=rev)) or {}
    except (DvcException, FileNotFoundError) as e:
        raise InputError(f"params.yaml at {rev or 'workspace'}: {e}") from None
    model = (params.get("paths") or {}).get("model", DEFAULT_MODEL_PATH)
    try:
        text = dvc.api.read(f"{model}/run.json", repo=repo, rev=rev, remote=remote)
    except (DvcException, FileNotFoundError) as e:
        raise InputError(f"{model}/run.json at {rev or 'workspace'}: not in the DVC cache or remote "
                         f"(was the train stage run and pushed?): {' '.join(str(e).split())}") from None
    info = json.loads(text)
    return {"rev": rev or "workspace", "model": model, "run_id": info.get("run_id"),
            "tracking_uri": info.get("tracking_uri")}


def main(argv: Sequence[str] | None = None) -> int:
    from vaepipe.core.errors import VaepipeError

    p = argparse.ArgumentParser(prog="python -m flows.lineage", description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default=None, help="git revision (default: the workspace)")
    p.add_argument("--project-dir", default=".", metavar="D", help="the DVC project (default: .)")
    p.add_argument("--remote", default=None, metavar="NAME", help="DVC remote to read from (default: core.remote)")
    args = p.parse_args(argv)
    try:
        print(json.dumps(model_run(args.project_dir, args.rev, args.remote)))
    except VaepipeError as e:
        print(f"flows.lineage: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
