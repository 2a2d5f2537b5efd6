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


def test_cpu_preset_is_the_default_model_on_paragraphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """params-paragraph-cpu.yaml: the CPU default's model size on the paragraph corpus, with its own
    tokenizer and outputs, a bounded number of epochs, early stopping and a CPU-sized evaluation."""
    monkeypatch.chdir(ROOT)
    p, para, default = (load_params(ROOT / name) for name in
                        ("params-paragraph-cpu.yaml", "params-paragraph.yaml", "params.yaml"))
    assert p.ingest == para.ingest and p.paths.corpus == para.paths.corpus  # one paragraph corpus
    assert (p.tokenize.max_tokens, p.tokenize.overlong) == (para.tokenize.max_tokens, "drop")
    for field in ("embed_dim", "hidden_dim", "encoder_hidden_dim", "latent_dim", "dropout", "bn_gamma"):
        assert getattr(p.model, field) == getattr(default.model, field), field
    assert (p.train.max_steps, p.train.eval_every) == (0, 0) and p.train.patience > 0
    assert 0 < p.train.max_epochs <= 10 and p.evaluate.iw_samples == 500 and 0 < p.evaluate.max_docs <= 500
    for name in ("tokenizer", "tokens", "model", "baseline", "reports", "embeddings"):
        assert getattr(p.paths, name) not in (getattr(default.paths, name), getattr(para.paths, name)), name
