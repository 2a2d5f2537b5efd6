"""Learning-rate and KL-weight schedules: pure functions of the step, so resuming needs no state.

Steps count optimizer updates from 0. With ``train.ae_pretrain_steps = A`` (Li et al. 2019) the
first A steps train an autoencoder (beta 0); the KL schedule then starts from 0 at step A.
"""

from __future__ import annotations

import math

from vaepipe.core.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def beta_at(step: int, cfg: TrainConfig) -> float:
    """KL weight at ``step``: 0 during AE pre-training, then the configured schedule.

    linear: 0 -> 1 over ``kl_warmup_steps`` (Bowman et al. 2016), then 1.
    cyclical (Fu et al. 2019): ``kl_cycles`` cycles of ``2 * kl_warmup_steps`` steps, each rising
    linearly 0 -> 1 over its first half and holding 1 over the second; 1 after the last cycle.
    constant: 1 throughout.
    """
    if step < cfg.ae_pretrain_steps:
        return 0.0
    s = step - cfg.ae_pretrain_steps
    if cfg.kl_schedule == "constant" or cfg.kl_warmup_steps == 0:
        return 1.0
    if cfg.kl_schedule == "linear":
        return min(1.0, (s + 1) / cfg.kl_warmup_steps)
    period = 2 * cfg.kl_warmup_steps
    if s >= cfg.kl_cycles * period:
        return 1.0
    return min(1.0, (s % period + 1) / cfg.kl_warmup_steps)
