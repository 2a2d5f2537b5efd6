"""Running ``vaepipe train`` under torchrun in the DDP tests: two CPU ranks, gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from vaepipe.core.config import Params


def torchrun_train(params: Params, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m vaepipe.cli train``
    with ``params`` written to ``cwd/params.yaml``; one torch thread per rank."""
    params_file = cwd / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    root = str(Path(__file__).resolve().parents[1])  # importable even where vaepipe is not installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH", "")) if x)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "vaepipe.cli", "train", "--params", str(params_file)],
        capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
    )
