"""params-paragraph.yaml (issue #21) and bench/gpu_paragraph.sh, the script that measures it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vaepipe.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "params-paragraph.yaml"


def test_committed_preset_loads_with_its_own_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # relative outputs inside the checkout
    p, default = load_params(PRESET), load_params(ROOT / "params.yaml")
    assert (p.ingest.unit, p.ingest.max_chars, p.tokenize.overlong) == ("paragraph", None, "drop")
    assert p.tokenize.max_tokens >= 400 and p.model.latent_dim == 32 and p.model.bn_gamma > 0  # collapse-proof
    assert (p.train.max_steps, p.train.eval_every) == (0, 0) and p.train.patience > 0  # early stop decides
    assert p.evaluate.max_docs == 0 and p.evaluate.iw_samples == 500
    for name in ("corpus", "tokenizer", "tokens", "model", "baseline", "reports", "embeddings"):
        assert getattr(p.paths, name) != getattr(default.paths, name), name  # the default run is left alone


def test_gpu_paragraph_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "bench/gpu_paragraph.sh")], check=True, timeout=30)
