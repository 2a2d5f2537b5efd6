"""Shared fixtures: tiny params over the committed fixture corpus, and a pipeline built once.

``tiny_params`` gives every test its own directories under tmp_path. The session-scoped
``built_*`` fixtures run the real stages once on the fixture corpus (ingest -> tokenize ->
train), so evaluate/embed tests reuse one trained tiny model instead of training their own.
They must never be mutated by a test: copy what you change.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vaepipe.core.config import Params, load_params

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_CORPUS = FIXTURES / "corpus"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")


def tiny_overrides(root: Path) -> list[str]:
    """Overrides that make every stage run in seconds on the fixture corpus."""
    return [
        f"paths.corpus={root / 'data/corpus'}",
        f"paths.tokenizer={root / 'data/tokenizer'}",
        f"paths.tokens={root / 'data/tokens'}",
        f"paths.model={root / 'models/vae'}",
        f"paths.baseline={root / 'models/lm'}",
        f"paths.reports={root / 'reports'}",
        f"paths.embeddings={root / 'data/embeddings'}",
        f"ingest.inputs=[{FIXTURE_CORPUS}]",
        "ingest.valid_fraction=0.1",
        "ingest.test_fraction=0.1",
        "tokenize.vocab_size=600",
        "tokenize.max_tokens=48",
        "model.embed_dim=32",
        "model.hidden_dim=64",
        "model.latent_dim=8",
        "train.max_epochs=2",
        "train.max_steps=40",
        "train.batch_tokens=1024",
        "train.warmup_steps=5",
        "train.kl_warmup_steps=20",
        "train.log_every=5",
        "train.device=cpu",
        "evaluate.iw_samples=20",
        "evaluate.max_docs=40",
        "evaluate.device=cpu",
        "evaluate.num_examples=3",
        "embed.device=cpu",
        "tracking.enabled=false",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
    ]


def make_tiny_params(root: Path, extra: list[str] | tuple[str, ...] = ()) -> Params:
    return load_params(None, [*tiny_overrides(root), *extra])


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    return make_tiny_params(tmp_path)


@pytest.fixture(scope="session")
def built_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("built")


@pytest.fixture(scope="session")
def built_corpus(built_root: Path) -> Params:
    """Params whose paths.corpus holds the ingested fixture corpus."""
    from vaepipe.stages import ingest

    params = make_tiny_params(built_root)
    ingest.run(params)
    return params


@pytest.fixture(scope="session")
def built_tokens(built_corpus: Params) -> Params:
    """... plus the trained tokenizer and token Parquet."""
    from vaepipe.stages import tokenize

    tokenize.run(built_corpus)
    return built_corpus


@pytest.fixture(scope="session")
def trained_model(built_tokens: Params) -> Params:
    """... plus a tiny trained VAE in paths.model and a tiny LM baseline in paths.baseline."""
    from vaepipe.stages import train

    train.run(built_tokens)
    train.run(built_tokens.replace(model={"kind": "lm"}))
    return built_tokens


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The suite runs with one torch CPU thread (CI has 2 cores shared with servers and
    subprocesses); the process's setting is restored at the end."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
