"""train.aggressive_steps (He et al. 2019): encoder-only updates before each joint step, early in training."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.ddp_support import torchrun_train
from vaepipe.core.config import Params, TrainConfig
from vaepipe.ml import checkpoint as ckpt
from vaepipe.ml.data import read_split
from vaepipe.ml.distributed import DistInfo
from vaepipe.ml.model import TextVAE, VAEConfig
from vaepipe.stages import train


def local(params: Params, tmp_path: Path, **train_kw: Any) -> Params:
    return params.replace(paths={"model": str(tmp_path / "vae"), "baseline": str(tmp_path / "lm")},
                          train={"num_threads": 1, **train_kw})


def tiny_model(share: bool = False, bn_gamma: float = 0.5) -> TextVAE:
    torch.manual_seed(0)
    cfg = VAEConfig(kind="vae", vocab_size=600, embed_dim=16, hidden_dim=32, latent_dim=4, num_layers=1,
                    num_heads=2, encoder="lstm", decoder="lstm", dropout=0.1, bn_gamma=bn_gamma,
                    tie_embeddings=True, share_embeddings=share)
    return TextVAE(cfg)


def context(cfg: TrainConfig, total: int = 100) -> train.RunContext:
    return train.RunContext(cfg=cfg, kind="vae", seed=1, info=DistInfo(), device=torch.device("cpu"), amp=False,
                            total=total, work_dir=Path("/nonexistent"), final_dir=Path("/nonexistent"))


def snapshot(model: TextVAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_window_check_stops_when_a_window_does_not_improve() -> None:
    check = train.WindowCheck(2, torch.device("cpu"), DistInfo())
    losses = [5.0, 5.0, 4.0, 4.0, 3.0, 3.5, 4.0, 4.0]  # window means 5, 4, 3.25, 4 (worse)
    stops = [check.stop_after(torch.tensor(x), 10) for x in losses]
    assert stops == [False] * 7 + [True]
    tie = train.WindowCheck(1, torch.device("cpu"), DistInfo())
    assert [tie.stop_after(torch.tensor(x), 3) for x in (2.0, 1.0, 1.0)] == [False, False, True]  # equal: no better


def test_window_check_weights_by_tokens() -> None:
    check = train.WindowCheck(2, torch.device("cpu"), DistInfo())
    check.stop_after(torch.tensor(1.0), 1)
    check.stop_after(torch.tensor(3.0), 3)  # (1 + 9) / 4 = 2.5
    check.stop_after(torch.tensor(2.2), 1)
    assert not check.stop_after(torch.tensor(2.4), 1)  # 2.3 < 2.5 (unweighted, 2.3 would be worse than 2.0)
    assert check.previous == pytest.approx(2.3)


@pytest.mark.parametrize("share", [False, True])
def test_encoder_only_parameters_leave_out_what_the_decoder_uses(share: bool) -> None:
    model = tiny_model(share)
    enc = {id(p) for p in train.encoder_only_parameters(model)}
    decoder_side = {id(p) for p in model.decoder.parameters()} | {id(model.out_bias)}
    assert enc and not enc & decoder_side
    assert (id(model.encoder.embed.weight) in enc) is not share  # a shared table is the decoder's too
    assert id(model.encoder.bn.weight) not in enc  # BN-VAE's fixed scale is never trained


def test_inner_loop_changes_only_encoder_parameters(built_tokens: Params) -> None:
    split = read_split(built_tokens.paths.tokens, "train")
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, aggressive_steps=5, aggressive_max_inner=12, batch_tokens=512)
    ctx = context(cfg)
    model = TextVAE(VAEConfig.from_model_config(built_tokens.model, 600))
    model.train()
    optimizer = train.make_optimizer(model, cfg)
    pool = train.epoch_batches(split.lengths, cfg, 1, 0, DistInfo())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = snapshot(model)
    n = train.aggressive_encoder_updates(model, optimizer, pool, split.seqs, 0, ctx)
    after = snapshot(model)
    assert 1 <= n <= 12
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.") for k in changed), changed
    assert {k for k in changed if "running" not in k and "num_batches" not in k}  # weights, not only BN stats
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # the flags come back
    moved = {id(p) for p in optimizer.param_groups[0]["params"] if optimizer.state.get(p)}
    assert moved == {id(p) for p in train.encoder_only_parameters(model)}  # Adam's moments: the encoder's only


class Scripted:
    """Stands in for encoder_step: the losses it is given, one per update."""

    def __init__(self, losses: list[float]) -> None:
        self.losses, self.calls = losses, 0

    def __call__(self, model: Any, optimizer: Any, enc: Any, seqs: Any, beta: float,
                 ctx: Any) -> tuple[torch.Tensor, int, bool]:
        loss = self.losses[self.calls]
        self.calls += 1
        return torch.tensor(loss), 10, bool(np.isfinite(loss))


@pytest.mark.parametrize("losses, cap, expected", [
    ([5.0] * 5 + [4.0] * 5 + [4.5] * 5 + [1.0] * 30, 30, 15),  # the third window is worse: stop after it
    ([5.0] * 5 + [5.0] * 5 + [0.0] * 30, 30, 10),  # no better is not better
    ([10.0 - 0.1 * i for i in range(40)], 30, 30),  # always improving: the cap
    ([10.0 - 0.1 * i for i in range(40)], 7, 7),  # a cap inside a window
    ([5.0, 4.0, float("nan")] + [1.0] * 30, 30, 2),  # a non-finite loss ends the loop; no update counted
])
def test_inner_loop_stops_by_the_criterion_or_the_cap(monkeypatch: pytest.MonkeyPatch, losses: list[float],
                                                      cap: int, expected: int) -> None:
    scripted = Scripted(losses)
    monkeypatch.setattr(train, "encoder_step", scripted)
    ctx = context(TrainConfig(aggressive_steps=1, aggressive_max_inner=cap))
    model = tiny_model()
    n = train.aggressive_encoder_updates(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                         [np.array([0])], [np.array([4, 5])], 0, ctx)
    assert n == expected and scripted.calls == expected + (0 if all(np.isfinite(losses[:expected + 1])) else 1)


def test_aggressive_is_for_the_first_steps_of_a_vae_only() -> None:
    ctx = context(TrainConfig(aggressive_steps=3))
    assert [train.aggressive_due(s, ctx) for s in range(5)] == [True, True, True, False, False]
    lm = train.RunContext(**{**ctx.__dict__, "kind": "lm"})
    assert not train.aggressive_due(0, lm)
    assert not train.aggressive_due(0, context(TrainConfig()))  # 0: off, the default


def test_a_run_with_aggressive_steps_differs_and_repeats(built_tokens: Params, tmp_path: Path) -> None:
    kw = dict(max_steps=6, eval_every=3)
    plain = train.run(local(built_tokens, tmp_path / "plain", **kw))
    a = train.run(local(built_tokens, tmp_path / "a", aggressive_steps=3, aggressive_max_inner=10, **kw))
    b = train.run(local(built_tokens, tmp_path / "b", aggressive_steps=3, aggressive_max_inner=10, **kw))
    assert a.best_val == b.best_val and a.best_val != plain.best_val
    wa = ckpt.load_state(a.model_dir / ckpt.LAST)["model"]
    wb = ckpt.load_state(b.model_dir / ckpt.LAST)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("stop_at", [2, 7])  # inside the aggressive phase, and after it
def test_resume_equals_uninterrupted_with_aggressive_steps(built_tokens: Params, tmp_path: Path,
                                                           stop_at: int) -> None:
    kw = dict(max_steps=9, eval_every=3, aggressive_steps=4, aggressive_max_inner=8, word_dropout=0.1, patience=0)
    full = train.run(local(built_tokens, tmp_path / "full", **kw))

    def interrupt(step: int, metrics: dict[str, float]) -> None:
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)

    q = local(built_tokens, tmp_path / "cut", **kw)
    with pytest.raises(KeyboardInterrupt):
        train.run(q, on_step=interrupt)
    resumed = train.run(q.replace(train={"resume": True}))
    assert resumed.steps == full.steps and resumed.best_val == full.best_val
    for name in (ckpt.LAST, ckpt.BEST):
        a = ckpt.load_state(full.model_dir / name)["model"]
        b = ckpt.load_state(resumed.model_dir / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_with_other_aggressive_settings_is_refused(built_tokens: Params, tmp_path: Path) -> None:
    from vaepipe.core.errors import ConfigError

    p = local(built_tokens, tmp_path, max_steps=4, eval_every=2)
    train.run(p)
    with pytest.raises(ConfigError, match="aggressive_steps"):
        train.run(p.replace(train={"resume": True, "max_steps": 6, "aggressive_steps": 2}))


@pytest.mark.slow
def test_aggressive_steps_under_ddp(built_tokens: Params, tmp_path: Path) -> None:
    """Two gloo ranks make their encoder-only updates together (no rank waits at a collective
    the other skipped) and finish the run."""
    p = local(built_tokens, tmp_path, max_steps=6, batch_tokens=512, eval_every=3, aggressive_steps=3,
              aggressive_max_inner=10)
    proc = torchrun_train(p, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aggressive encoder updates done" in proc.stderr
    assert ckpt.load_state(tmp_path / "vae" / ckpt.LAST)["step"] == 6
