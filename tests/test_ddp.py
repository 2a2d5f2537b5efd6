"""DDP under torchrun: two CPU processes with the gloo backend train one model together."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ddp_support import torchrun_train
from vaepipe.core.config import Params, TrainConfig
from vaepipe.ml import checkpoint as ckpt
from vaepipe.ml.data import read_split
from vaepipe.ml.distributed import DistInfo
from vaepipe.stages.train import epoch_batches


@pytest.mark.slow
def test_torchrun_two_processes_gloo(built_tokens: Params, tmp_path: Path) -> None:
    p = built_tokens.replace(
        paths={"model": str(tmp_path / "vae"), "baseline": str(tmp_path / "lm")},
        train={"max_epochs": 2, "max_steps": 0, "batch_tokens": 512, "eval_every": 0, "num_threads": 1},
    )
    proc = torchrun_train(p, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank took an equal half of every epoch's batches: steps = epochs * (batches // 2)
    lengths = read_split(p.paths.tokens, "train").lengths
    per_rank = [len(epoch_batches(lengths, p.train, p.seed, e, DistInfo(0, 2))) for e in range(2)]
    last = ckpt.load_state(tmp_path / "vae" / ckpt.LAST)
    assert last["step"] == sum(per_rank) > 0
    model, _ = ckpt.load_model(tmp_path / "vae")  # rank 0 wrote a loadable, plain (unwrapped) state dict
    assert not any(k.startswith("module.") for k in model.state_dict())
    assert proc.stderr.count("train vae done") == 1  # logging on rank 0 only
    assert not (tmp_path / ".vae.partial").exists()
    assert torch.isfinite(torch.tensor(last["best_val"]))


def test_shards_are_disjoint_and_equal() -> None:
    from vaepipe.ml.distributed import shard

    items = list(range(11))
    parts = [shard(items, DistInfo(r, 3)) for r in range(3)]
    assert [len(x) for x in parts] == [3, 3, 3]
    assert sorted(sum(parts, [])) == sorted(set(sum(parts, [])))
    assert shard(items, DistInfo()) == items
    assert TrainConfig().batch_tokens > 0
