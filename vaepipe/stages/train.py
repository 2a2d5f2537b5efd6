"""`vaepipe train`: an explicit training loop for the text VAE (kind vae) or the LM baseline (kind lm).

    run(params, tracker=None) -> TrainResult

Length-bucketed batches (vaepipe.ml.data) under ``train.batch_tokens``, AdamW (or SGD) with warm-up
and cosine decay, gradient clipping, KL annealing / free bits / word dropout / AE pre-training /
aggressive encoder updates against posterior collapse, validation on the beta = 1 ELBO for early stopping and model
selection, DDP under torchrun, bf16 autocast on CUDA.

Checkpoints go to a sibling work directory ``.<name>.partial`` and replace ``paths.model`` (or
``paths.baseline``) only when training ends, so a failed run never destroys the previous model.
The work directory has a fixed name, so that a resume finds it; that is safe because rank 0
holds the write lock of the model directory (``core.outputs``) for the whole run: no other
vaepipe process writes beside it meanwhile. When rank 0 cannot take the lock, every rank
fails before the first collective, so none is left waiting under DDP.

SIGINT/SIGTERM stop at the next step boundary after saving ``last.pt``; ``train.resume: true``
then continues to exactly the weights an uninterrupted run would reach: schedules and random
streams are pure functions of (seed, rank, step), data order of (seed, epoch). A resume checks
that the checkpoint it continues was trained with the same model, seed, training settings
(bar ``RESUMABLE_TRAIN_KEYS``), tokenizer and token data.

Under torchrun's elastic agent (``--max-restarts``) a worker group restarted after a failure
(a crashed rank, a lost node replaced by another) resumes by itself from the work directory's
``last.pt`` (never from the finished model's): the steps since that checkpoint are trained
again, to the same weights. ``last.pt`` is written at each validation (``train.eval_every``),
so that cadence bounds the work a failure loses.

A step whose loss or gradient norm is not finite is skipped (all ranks agree); after
``train.max_nonfinite_steps`` such steps the run stops with an error. A checkpoint with
non-finite weights is never written, and a run whose validation ELBO was never finite is
not installed, so a diverged run never replaces the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaepipe.core.config import Params, TrainConfig
from vaepipe.core.constants import AU_THRESHOLD
from vaepipe.core.errors import ConfigError, InputError, VaepipeError
from vaepipe.core.io import replace_dir
from vaepipe.core.outputs import output_locks, remove_leftover, remove_leftovers, stage_outputs
from vaepipe.core.storage import staged
from vaepipe.core.run_info import read_run_info, write_run_info
from vaepipe.core.tracking import SPLIT_CONTEXT, NullTracker, Tracker, TrackerFactory, tracker_for
from vaepipe.ml import checkpoint as ckpt
from vaepipe.ml import distributed as D
from vaepipe.ml.data import TokenSplit, check_tokens_tokenizer, collate, mixed_batches, read_split, token_batches
from vaepipe.ml.device import resolve_device, torch_threads
from vaepipe.ml.model import LossTerms, TextVAE, VAEConfig
from vaepipe.ml.schedules import beta_at, lr_at
from vaepipe.stages.package import staged_text_model
from vaepipe.stages.train_support import (
    Progress, StopRequest, data_fingerprint, git_commit, inner_step_seed, step_seed, vocab_size_for,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model_dir: Path
    kind: str
    steps: int
    epochs_completed: int
    best_step: int
    best_val: dict[str, float]  # validation metrics of best.pt (val_elbo is -ELBO/sentence, beta = 1)
    stopped_early: bool
    wall_s: float
    tokens_per_s: float
    run_id: str | None


# ---------------------------------------------------------------------------------------
# Small named helpers


def objective(terms: LossTerms, beta: float, free_bits: float, bow_weight: float = 0.0) -> torch.Tensor:
    """Training loss per predicted token: (recon + beta * KL + bow_weight * BoW) summed over the
    batch / tokens.

    Free bits (Kingma et al. 2016, as in Li et al. 2019): each dimension's batch-mean KL below
    ``free_bits`` nats is clamped, so the encoder is not pushed to collapse that dimension.
    The bag-of-words term (Zhao et al. 2017, ``train.bow_weight``) is there when the model has
    the head; validation and evaluation never count it (it is no part of the ELBO).
    """
    B = terms.recon.size(0)
    total = terms.recon.sum()
    if terms.kl_per_dim.size(1) and beta > 0:
        per_dim = terms.kl_per_dim.mean(0)  # (Z,)
        if free_bits > 0:
            per_dim = per_dim.clamp(min=free_bits)
        total = total + beta * B * per_dim.sum()
    if bow_weight > 0 and terms.bow is not None:
        total = total + bow_weight * terms.bow.sum()
    return total / terms.n_tokens.sum()


def epoch_batches(lengths: np.ndarray, cfg: TrainConfig, seed: int, epoch: int, info: D.DistInfo) -> list[np.ndarray]:
    """This rank's batches of one epoch: a pure function of (seed, epoch), so resume can skip ahead."""
    rng = np.random.default_rng([seed, epoch])
    if cfg.batching == "mixed":
        return D.shard(mixed_batches(lengths, cfg.batch_tokens, generator=rng), info)
    return D.shard(token_batches(lengths, cfg.batch_tokens, shuffle=True, generator=rng), info)


@torch.no_grad()
def evaluate_loss(model: TextVAE, split: TokenSplit, batch_tokens: int, device: torch.device, *,
                  amp: bool, seed: int, info: D.DistInfo = D.DistInfo()) -> dict[str, float]:
    """Validation metrics with beta = 1 and no word dropout (never the annealed beta).

    ``val_elbo`` is the negative ELBO in nats per sentence (the LM's NLL for kind lm),
    ``val_ppl`` its per-token exponential (an upper bound on the perplexity for a VAE), ``val_au``
    the active units (Cov_x E_q[z|x] > 0.01, Burda et al. 2016). The z samples come from a
    forked, fixed-seed RNG: validation is deterministic and leaves training's stream alone.
    """
    was_training = model.training
    model.eval()
    Z = model.cfg.latent_dim if model.cfg.has_latent else 0
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # recon, kl, tokens, sentences
    mu_sum = torch.zeros(Z, dtype=torch.float64, device=device)
    mu_sq = torch.zeros(Z, dtype=torch.float64, device=device)
    batches = token_batches(split.lengths, batch_tokens, shuffle=False)[info.rank :: info.world_size]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for idx in batches:
            ids, lengths = collate([split.seqs[i] for i in idx])  # lengths stay on the CPU (packing)
            ids = ids.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                terms = model(ids, lengths)
            acc += torch.stack([terms.recon.double().sum(), terms.kl.double().sum(),
                                terms.n_tokens.double().sum(), torch.tensor(float(len(idx)), device=device)])
            if Z:
                mu = terms.mu.double()
                mu_sum += mu.sum(0)
                mu_sq += mu.pow(2).sum(0)
    D.all_reduce_sum(acc, info)
    D.all_reduce_sum(mu_sum, info)
    D.all_reduce_sum(mu_sq, info)
    model.train(was_training)
    recon, kl, tokens, n = acc.tolist()
    out = {"val_elbo": (recon + kl) / n, "val_recon": recon / n, "val_kl": kl / n,
           "val_nll_token": (recon + kl) / tokens, "val_ppl": math.exp(min((recon + kl) / tokens, 50.0))}
    if Z:
        var = mu_sq / n - (mu_sum / n) ** 2
        out["val_au"] = float((var > AU_THRESHOLD).sum())
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # BN-VAE's fixed scale excluded
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---------------------------------------------------------------------------------------
# Where a run stands, and what stays fixed while it runs


@dataclass
class TrainState:
    """Where a run stands: the counters and best validation that last.pt stores next to the
    weights, the optimizer and the RNG states, so that ``train.resume`` continues from here.

    ``pos`` is the index of the next batch of epoch ``epoch``; ``bad`` counts the selectable
    validations since the last improvement (patience); ``last_eval`` is the step of the latest
    validation (-1: none yet); ``best_step`` stays -1 until best.pt is written.
    """

    step: int = 0
    epoch: int = 0
    pos: int = 0
    best_val: float = math.inf
    best_step: int = -1
    bad: int = 0
    last_eval: int = -1
    best_metrics: dict[str, float] = field(default_factory=dict)

    def to_checkpoint(self) -> dict[str, Any]:
        """last.pt's entries for this state: one key per field, in field order (the format that
        checkpoints have always had, so old last.pt files still resume)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any]) -> TrainState:
        """The state stored in a loaded last.pt; KeyError naming the entries it lacks."""
        missing = [f.name for f in fields(cls) if f.name not in saved]
        if missing:
            raise KeyError(", ".join(missing))
        return cls(**{f.name: saved[f.name] for f in fields(cls)})

    def record_validation(self, metrics: dict[str, float], *, selectable: bool) -> bool:
        """Note a validation at the current step; True when it is the new best (save best.pt).

        A validation that is not ``selectable`` (during AE pre-training) neither becomes the
        best nor counts against patience.
        """
        self.last_eval = self.step
        if not selectable:
            return False
        if metrics["val_elbo"] < self.best_val:
            self.best_val, self.best_step, self.bad, self.best_metrics = metrics["val_elbo"], self.step, 0, metrics
            return True
        self.bad += 1
        return False


@dataclass(frozen=True)
class RunContext:
    """What stays fixed while one run trains: its settings, device, rank and step budget, and
    the work directory that its checkpoints go to."""

    cfg: TrainConfig
    kind: str  # vae | lm
    seed: int
    info: D.DistInfo
    device: torch.device
    amp: bool  # bf16 autocast (CUDA only)
    total: int  # planned steps: the length of the lr schedule
    work_dir: Path
    final_dir: Path  # paths.model or paths.baseline: replaced by work_dir when the run ends


@dataclass
class StepMetrics:
    """One optimisation step's numbers. Tensors stay on the device: no sync until logged."""

    loss: torch.Tensor
    recon: torch.Tensor  # batch mean
    kl: torch.Tensor  # batch mean
    grad_norm: torch.Tensor  # before clipping
    beta: float
    lr: float
    tokens: int  # predicted tokens (the words and EOS of each sentence)
    skipped: bool = False  # the loss or gradient norm was not finite (on some rank): no update


@dataclass
class LogWindow:
    """Step metrics summed since the last log line."""

    t: float  # when the window opened (pushed forward by validation time)
    loss: Any = 0.0  # sums of device tensors once a step is added
    recon: Any = 0.0
    kl: Any = 0.0
    n: int = 0
    tokens: int = 0

    def add(self, out: StepMetrics) -> None:
        self.tokens += out.tokens
        self.n += 1
        self.loss += out.loss
        self.recon += out.recon
        self.kl += out.kl

    def close(self, now: float, last: StepMetrics, world_size: int) -> dict[str, float]:
        """The log line's metrics: window means, and beta, lr and grad norm of ``last`` (the
        latest step); a new window opens at ``now``."""
        tps = self.tokens * world_size / max(now - self.t, 1e-9)
        m = {"loss": float(self.loss) / self.n, "recon": float(self.recon) / self.n, "kl": float(self.kl) / self.n,
             "beta": last.beta, "lr": last.lr, "grad_norm": float(last.grad_norm), "tokens_per_s": tps}
        self.loss, self.recon, self.kl, self.n, self.tokens, self.t = 0.0, 0.0, 0.0, 0, 0, now
        return m


# ---------------------------------------------------------------------------------------
# The pieces of the loop


def batch_stream(state: TrainState, lengths: np.ndarray, ctx: RunContext) -> Iterator[tuple[np.ndarray, bool]]:
    """This rank's batches still due from ``state``'s (epoch, pos), each with whether it ends its epoch.

    The caller advances ``state.step`` and ``state.pos`` after each batch; the stream moves
    ``state`` on to the next epoch once one is used up, and ends after ``ctx.total`` steps or
    ``train.max_epochs`` epochs. Leaving it early (early stopping) keeps the epoch where it is.
    """
    cfg = ctx.cfg
    while state.step < ctx.total and state.epoch < cfg.max_epochs:
        batches = epoch_batches(lengths, cfg, ctx.seed, state.epoch, ctx.info)
        while state.pos < len(batches) and state.step < ctx.total:
            yield batches[state.pos], state.pos + 1 == len(batches)
        if state.pos >= len(batches):
            state.epoch, state.pos = state.epoch + 1, 0


def train_step(net: nn.Module, model: TextVAE, optimizer: torch.optim.Optimizer, seqs: list[np.ndarray],
               step: int, ctx: RunContext) -> StepMetrics:
    """One optimisation step on the batch ``seqs`` at ``step``: the step's own random stream, the
    scheduled lr and beta, forward through ``net`` (the model or its DDP wrapper), backward,
    gradient clipping, update.

    When the loss or the gradient norm is not finite on any rank, there is no update (the
    gradients are dropped) and the result says ``skipped``.
    """
    cfg = ctx.cfg
    torch.manual_seed(step_seed(ctx.seed, ctx.info.rank, step))
    ids, lengths = collate(seqs)
    if ctx.device.type == "cuda":
        ids = ids.pin_memory().to(ctx.device, non_blocking=True)  # lengths stay on the CPU
    beta, lr = beta_at(step, cfg), lr_at(step, cfg, ctx.total)
    for g in optimizer.param_groups:
        g["lr"] = lr
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.amp):
        terms = net(ids, lengths, word_dropout=cfg.word_dropout)
    loss = objective(terms, beta, cfg.free_bits, cfg.bow_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    finite = all_ranks_finite(loss.detach(), gnorm, ctx.info)
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)  # NaN/inf must not reach the weights or Adam's moments
    return StepMetrics(loss=loss.detach(), recon=terms.recon.detach().mean(), kl=terms.kl.detach().mean(),
                       grad_norm=gnorm, beta=beta, lr=lr, tokens=int((lengths + 1).sum()), skipped=not finite)


def all_ranks_finite(loss: torch.Tensor, grad_norm: torch.Tensor, info: D.DistInfo) -> bool:
    """Whether ``loss`` and ``grad_norm`` are finite on every rank (one small all-reduce under
    DDP): the ranks must agree on skipping a step, or their weights would drift apart. This
    waits for the step's backward pass, as a GradScaler's inf check does."""
    bad = (~torch.isfinite(loss.float()) | ~torch.isfinite(grad_norm.float())).float().reshape(1)
    return not bool(D.all_reduce_sum(bad, info).item())


class NonFiniteGuard:
    """Counts the skipped (non-finite) steps of a run; the ``train.max_nonfinite_steps``-th stops it.

    The count is over the whole run, not steps in a row: a diverging run alternates NaN
    steps with finite ones that push the weights further off (seen with ``train.lr=1e6``).
    A resumed run counts afresh.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.skipped = 0

    def check(self, out: StepMetrics, step: int) -> None:
        """Note step ``step``'s outcome; VaepipeError at the ``train.max_nonfinite_steps``-th skipped step."""
        if not out.skipped:
            return
        self.skipped += 1
        loss, gnorm = float(out.loss), float(out.grad_norm)
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        log.warning("step %d skipped: %s is not finite (loss %s, grad norm %s)", step, what, loss, gnorm)
        if self.skipped >= self.cfg.max_nonfinite_steps:
            raise VaepipeError(
                f"train: {what} is not finite at step {step} (loss {loss}, grad norm {gnorm}) after "
                f"{self.skipped} skipped steps (train.max_nonfinite_steps); lower train.lr "
                f"(now {self.cfg.lr:g}) or set train.grad_clip (now {self.cfg.grad_clip:g}{': off' if not self.cfg.grad_clip else ''})")


def end_ae_pretraining(model: TextVAE, optimizer: torch.optim.Optimizer, step: int,
                       ctx: RunContext) -> torch.optim.Optimizer:
    """The optimizer to go on with. When ``step`` ends AE pre-training (kind vae), Li et al. 2019:
    keep the pre-trained encoder, restart the decoder and the optimizer."""
    cfg = ctx.cfg
    if not (cfg.ae_pretrain_steps and step == cfg.ae_pretrain_steps and ctx.kind == "vae"):
        return optimizer
    torch.manual_seed(step_seed(ctx.seed, 0, -1))
    model.reset_decoder()
    optimizer = make_optimizer(model, cfg)
    log.info("step %d: AE pre-training done, decoder reset", step)
    return optimizer


# He et al. 2019 compare the encoder's loss over windows of inner updates (15 of at most 100);
# with at most train.aggressive_max_inner (30) updates, windows of 5 leave room for several tests
AGGRESSIVE_WINDOW = 5


def encoder_only_parameters(model: TextVAE) -> list[nn.Parameter]:
    """The trainable parameters of the encoder that nothing else uses: what an aggressive
    (encoder-only) update may change. An embedding shared with the decoder
    (``model.share_embeddings``) is the decoder's too, so it is left out."""
    if model.encoder is None:
        return []
    elsewhere = {id(p) for name, child in model.named_children() if name != "encoder" for p in child.parameters()}
    elsewhere |= {id(p) for p in model.parameters(recurse=False)}
    return [p for p in model.encoder.parameters() if p.requires_grad and id(p) not in elsewhere]


@contextlib.contextmanager
def only_trainable(model: nn.Module, keep: list[nn.Parameter]) -> Iterator[None]:
    """Within the block, only ``keep`` require gradients: backward computes no weight gradient
    for the rest (it still flows through them to ``keep``), and the optimizer skips them. Every
    parameter's own setting comes back afterwards (BN-VAE's fixed scale stays fixed)."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    kept = {id(p) for p in keep}
    try:
        for p, _ in before:
            p.requires_grad_(id(p) in kept)
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


class WindowCheck:
    """He et al. 2019's stopping rule for the inner loop: the loss per token, summed over all
    ranks, over each window of ``window`` updates; stop once a window is no better than the
    one before it."""

    def __init__(self, window: int, device: torch.device, info: D.DistInfo) -> None:
        self.window, self.info = window, info
        self.acc = torch.zeros(2, dtype=torch.float64, device=device)  # loss * tokens, tokens
        self.n = 0
        self.previous = math.inf

    def stop_after(self, loss: torch.Tensor, tokens: int) -> bool:
        """Add one update's per-token loss over ``tokens`` predicted tokens; True when it closes a
        window that did not improve on the previous one (every rank gets the same answer)."""
        self.acc += torch.stack([loss.double() * tokens, loss.new_tensor(float(tokens), dtype=torch.float64)])
        self.n += 1
        if self.n % self.window:
            return False
        loss_sum, count = D.all_reduce_sum(self.acc, self.info).tolist()
        self.acc.zero_()
        current = loss_sum / max(count, 1.0)
        done = not current < self.previous
        self.previous = current
        return done


def encoder_step(model: TextVAE, optimizer: torch.optim.Optimizer, enc: list[nn.Parameter],
                 seqs: list[np.ndarray], beta: float, ctx: RunContext) -> tuple[torch.Tensor, int, bool]:
    """One encoder-only update on the batch ``seqs`` (inside ``only_trainable(model, enc)``):
    the training objective at ``beta``, backward, the encoder's gradients averaged over the
    ranks and clipped, update. Returns the loss per token, the predicted tokens, and whether
    the update was made (False: a loss or gradient was not finite on some rank)."""
    cfg = ctx.cfg
    ids, lengths = collate(seqs)
    if ctx.device.type == "cuda":
        ids = ids.pin_memory().to(ctx.device, non_blocking=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.amp):
        terms = model(ids, lengths, word_dropout=cfg.word_dropout)  # the bare model: DDP would sync all
    loss = objective(terms, beta, cfg.free_bits, cfg.bow_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.info.enabled:
        for p in enc:
            if p.grad is not None:
                D.all_reduce_sum(p.grad, ctx.info).div_(ctx.info.world_size)
    gnorm = nn.utils.clip_grad_norm_(enc, cfg.grad_clip or math.inf)
    finite = all_ranks_finite(loss.detach(), gnorm, ctx.info)
    if finite:
        optimizer.step()  # the other parameters have no gradient: AdamW leaves them (and their moments) alone
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), int((lengths + 1).sum()), finite


def aggressive_due(step: int, ctx: RunContext) -> bool:
    """Whether ``step`` starts with encoder-only updates: a VAE within ``train.aggressive_steps``."""
    return ctx.kind == "vae" and step < ctx.cfg.aggressive_steps


def aggressive_encoder_updates(model: TextVAE, optimizer: torch.optim.Optimizer, pool: list[np.ndarray],
                               seqs: list[np.ndarray], step: int, ctx: RunContext) -> int:
    """He et al. 2019's aggressive inference-network training, before the joint step ``step``:
    encoder-only updates, each on a fresh batch drawn from ``pool`` (index arrays into ``seqs``),
    until the encoder's loss over a window of ``AGGRESSIVE_WINDOW`` updates stops improving, or
    ``train.aggressive_max_inner`` updates. The decoder, the output layer and a shared
    embedding do not change. Returns the number of updates made.

    The batches and random streams are pure functions of (seed, rank, step, update), the
    decisions are taken on losses summed over the ranks: a resumed run makes the same
    updates, and every rank stops together.
    """
    cfg = ctx.cfg
    enc = encoder_only_parameters(model)
    beta = beta_at(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, cfg, ctx.total)
    rng = np.random.default_rng([ctx.seed, ctx.info.rank, step])
    check = WindowCheck(AGGRESSIVE_WINDOW, ctx.device, ctx.info)
    n = 0
    with only_trainable(model, enc):
        while n < cfg.aggressive_max_inner:
            torch.manual_seed(inner_step_seed(ctx.seed, ctx.info.rank, step, n))
            batch = pool[int(rng.integers(len(pool)))]
            loss, tokens, made = encoder_step(model, optimizer, enc, [seqs[i] for i in batch], beta, ctx)
            n += made
            if not made or check.stop_after(loss, tokens):
                break
    return n


def _save(name: str, model: TextVAE, ctx: RunContext, extra: dict[str, Any]) -> None:
    """Write ``name`` (rank 0); every rank first refuses non-finite weights (DDP keeps them
    identical, so all ranks raise together) so that a diverged model is never saved or promoted."""
    state = model.state_dict()
    bad = ckpt.nonfinite_entry(state)
    if bad is not None:
        cfg = ctx.cfg
        raise VaepipeError(f"train: the weights are not finite at step {extra.get('step', '?')} ({bad}); "
                           f"{ctx.final_dir} is left as it was; lower train.lr (now {cfg.lr:g}) or set "
                           f"train.grad_clip (now {cfg.grad_clip:g})")
    if ctx.info.is_main:
        ckpt.save_state(ctx.work_dir / name, {"format": ckpt.FORMAT, "model": state, **extra})


def save_best(model: TextVAE, state: TrainState, metrics: dict[str, float], ctx: RunContext) -> None:
    """best.pt (rank 0): the weights now, with the step, epoch and validation metrics."""
    _save(ckpt.BEST, model, ctx, {"step": state.step, "epoch": state.epoch, "metrics": metrics})


def save_last(model: TextVAE, optimizer: torch.optim.Optimizer, state: TrainState, ctx: RunContext) -> None:
    """last.pt (rank 0): the weights, optimizer, RNG states and ``state``: all that resume needs."""
    rng = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
    _save(ckpt.LAST, model, ctx, {"optimizer": optimizer.state_dict(), "rng": rng, **state.to_checkpoint()})


def validate(model: TextVAE, valid: TokenSplit, state: TrainState, ctx: RunContext,
             tracker: Tracker) -> dict[str, float]:
    """Validate at ``state.step``: track and log the metrics, update the best, save best.pt on a new best."""
    m = evaluate_loss(model, valid, ctx.cfg.batch_tokens, ctx.device, amp=ctx.amp, seed=ctx.seed, info=ctx.info)
    selectable = state.step > ctx.cfg.ae_pretrain_steps  # the AE phase's ELBO is not a VAE's
    if state.record_validation(m, selectable=selectable):
        save_best(model, state, m, ctx)
    tracker.log_metrics(m, step=state.step)
    log.info("step %d validation: %s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    return m


def maybe_validate(model: TextVAE, valid: TokenSplit, state: TrainState, ctx: RunContext, tracker: Tracker,
                   *, end_of_epoch: bool) -> dict[str, float] | None:
    """Validate (see ``validate``) when due: every ``train.eval_every`` steps, or at the end of
    each epoch when that is 0. The metrics, or None when not due."""
    cfg = ctx.cfg
    due = state.step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
    return validate(model, valid, state, ctx, tracker) if due else None


def validate_at_end(model: TextVAE, valid: TokenSplit, state: TrainState, ctx: RunContext,
                    tracker: Tracker) -> None:
    """The last validation, unless the last step had one; when no validation was selectable
    (only the AE phase ran), the final weights become best.pt."""
    if state.last_eval == state.step and state.best_step >= 0:
        return
    m = validate(model, valid, state, ctx, tracker)
    if state.best_step < 0 and not math.isfinite(m["val_elbo"]):
        cfg = ctx.cfg
        raise VaepipeError(f"train: the validation ELBO is not finite at step {state.step} ({m['val_elbo']}) and "
                           f"never was; {ctx.final_dir} is left as it was; lower train.lr (now {cfg.lr:g}) "
                           f"or set train.grad_clip (now {cfg.grad_clip:g})")
    if state.best_step < 0:
        state.best_val, state.best_step, state.best_metrics = m["val_elbo"], state.step, m
        save_best(model, state, m, ctx)


def report_step(on_step: Callable[[int, dict[str, float]], None] | None, step: int, out: StepMetrics,
                stop: StopRequest, info: D.DistInfo) -> None:
    """``on_step(step, {"loss": ...})`` on rank 0; a KeyboardInterrupt there asks to stop, like SIGINT."""
    if on_step is None or not info.is_main:
        return
    try:
        on_step(step, {"loss": float(out.loss)})
    except KeyboardInterrupt:
        stop.requested = True


def stop_agreed(stop: StopRequest, step: int, ctx: RunContext) -> bool:
    """Whether some rank was asked to stop. Under DDP the ranks agree at log steps only (a
    collective per step costs), so a stop lands on the next multiple of ``train.log_every``."""
    check = not ctx.info.enabled or step % ctx.cfg.log_every == 0
    return check and D.any_rank(stop.requested, ctx.info, ctx.device)


@contextlib.contextmanager
def rank0_logging(info: D.DistInfo) -> Iterator[None]:
    """Info logging on rank 0 only: other ranks raise this module's logger to WARNING for the
    block (they still report warnings) and restore its level afterwards."""
    if info.is_main:
        yield
        return
    previous = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(previous)


# ---------------------------------------------------------------------------------------
# The run


def run(params: Params, tracker: Tracker | None = None, *, make_tracker: TrackerFactory | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None, wait: bool = False) -> TrainResult:
    """Train ``params.model.kind`` on ``paths.tokens``; write checkpoints; track the run.

    The run is logged to ``tracker``, or, when ``tracking.enabled``, to one that
    ``make_tracker(params.tracking)`` makes (the CLI passes MLflow's).

    ``on_step(step, metrics)`` is called on rank 0 at every step boundary (progress reporting,
    tests); raising KeyboardInterrupt there stops the run like SIGINT, after saving last.pt.

    ``train.num_threads`` and the quieter logging of non-main DDP ranks hold while the run
    does: both are restored when it returns or raises.

    Rank 0 holds the write lock of the model directory while the run lasts (``wait``: wait
    for another run that holds it instead of failing).
    """
    t0 = time.perf_counter()
    device = resolve_device(params.train.device, "train.device")
    info = D.setup(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    tracker = (tracker or tracker_for(params, make_tracker)) if info.is_main else NullTracker()
    try:
        with staged(params, "train") as params, model_dir_lock(params, info, device, wait=wait), \
                torch_threads(params.train.num_threads), rank0_logging(info):
            result = _train(params, tracker, device, info, on_step, t0)
            tracker.end("FINISHED")
        return result
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        D.teardown(info)


@contextlib.contextmanager
def model_dir_lock(params: Params, info: D.DistInfo, device: torch.device, *, wait: bool) -> Iterator[None]:
    """Rank 0 holds the write lock of the model directory for the block (``wait``: wait for
    another run that holds it instead of failing).

    Only rank 0 writes the model directory, so only rank 0 locks it (the ranks of one machine
    would otherwise lock each other out). Its success is shared with one collective before
    any other: when rank 0 cannot take the lock (BusyError), every rank raises, and none is
    left waiting at a barrier.
    """
    with contextlib.ExitStack() as stack:
        failure: BaseException | None = None
        if info.is_main:
            try:
                stack.enter_context(output_locks(stage_outputs(params, "train"), wait=wait))
            except Exception as e:  # noqa: BLE001 - re-raised below, once the other ranks know
                failure = e
        if D.any_rank(failure is not None, info, device):
            if failure is not None:
                raise failure
            raise VaepipeError("train: rank 0 could not take the write lock of the model directory (see its error)")
        yield


def _train(params: Params, tracker: Tracker, device: torch.device, info: D.DistInfo,
           on_step: Callable[[int, dict[str, float]], None] | None, t0: float) -> TrainResult:
    """run()'s body: data and model, resume, the loop, the final checkpoints and the swap into place."""
    cfg, mcfg = params.train, params.model
    final_dir = Path(params.paths.model if mcfg.kind == "vae" else params.paths.baseline)
    work_dir = final_dir.parent / f".{final_dir.name}.partial"  # fixed name: resume finds it; the lock guards it

    # data, model, optimizer
    train = read_split(params.paths.tokens, "train")
    valid = read_split(params.paths.tokens, "valid")
    max_id = max(int(max(s.max() for s in train.seqs)), int(max(s.max() for s in valid.seqs)))
    vocab_size, tok_file = vocab_size_for(params, max_id)
    tok_hash = _tokenizer_hash(tok_file)
    if tok_file is not None and tok_hash is not None:
        check_tokens_tokenizer(params.paths.tokens, tok_hash, f"paths.tokenizer {tok_file}")
    elastic = D.restarted(info, device) and not cfg.resume  # torchrun restarted this group after a failure
    resume = cfg.resume or elastic
    data_hash = data_fingerprint(params.paths.tokens) if info.is_main or resume else ""
    vcfg = VAEConfig.from_model_config(mcfg, vocab_size, bow=cfg.bow_weight > 0)
    torch.manual_seed(params.seed)
    model = TextVAE(vcfg).to(device)
    optimizer = make_optimizer(model, cfg)

    pool = epoch_batches(train.lengths, cfg, params.seed, 0, info)  # aggressive updates draw from it
    n_batches = len(pool)
    if n_batches == 0:
        raise ConfigError(f"train.batch_tokens: the train split gives no batch for {info.world_size} ranks")
    total = cfg.max_epochs * n_batches
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    ctx = RunContext(cfg=cfg, kind=mcfg.kind, seed=params.seed, info=info, device=device,
                     amp=device.type == "cuda" and cfg.bf16, total=total, work_dir=work_dir,
                     final_dir=final_dir)

    # resume, or start afresh
    resumed = _resume(model, optimizer, params, vcfg, Provenance(data_hash, tok_hash), ctx,
                      elastic=elastic) if resume else None
    state, resumed_run_id = resumed or (TrainState(), None)
    if resumed is None and not cfg.resume and info.is_main and work_dir.exists():
        remove_leftover(final_dir, work_dir)  # a stale partial run that was not asked to be resumed
    D.barrier(info)

    if info.is_main:
        tracker.start(run_name=f"train-{mcfg.kind}", run_id=resumed_run_id,
                      tags={"git_commit": git_commit(), "data_hash": data_hash,
                            "tokenizer_hash": tok_hash or "", "kind": mcfg.kind})
        if resumed_run_id is None:
            tracker.log_params(params.flat())
        log_inputs(tracker, params, data_hash, {"train": len(train), "valid": len(valid)})
        ckpt.write_config(work_dir, vcfg, tokenizer_hash=tok_hash, params=params.to_dict(), data_hash=data_hash)
        write_run_info(work_dir, tracker.run_id, params.tracking.uri if tracker.run_id else None)
    log.info("train %s: %d params, %d train / %d valid records, %d batches/epoch/rank, %d steps, device %s%s",
             mcfg.kind, sum(p.numel() for p in model.parameters()), len(train), len(valid), n_batches,
             total, device, f", {info.world_size} ranks" if info.enabled else "")

    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # the loop
    progress = Progress(total, initial=state.step, enabled=info.is_main)
    window = LogWindow(t=time.perf_counter())
    trained_tokens, train_time = 0, 0.0
    stopped_early = False
    stop = StopRequest()
    guard = NonFiniteGuard(cfg)
    inner = 0  # encoder-only updates made (train.aggressive_steps), for the log
    net.train()
    with stop.installed():
        for idx, end_of_epoch in batch_stream(state, train.lengths, ctx):
            if aggressive_due(state.step, ctx):
                inner += aggressive_encoder_updates(model, optimizer, pool, train.seqs, state.step, ctx)
                if state.step + 1 == cfg.aggressive_steps:
                    log.info("aggressive encoder updates done: %d before step %d", inner, cfg.aggressive_steps)
            out = train_step(net, model, optimizer, [train.seqs[i] for i in idx], state.step, ctx)
            state.step, state.pos = state.step + 1, state.pos + 1
            guard.check(out, state.step)  # a skipped step moves the schedule on; its batch is lost
            if not out.skipped:
                trained_tokens += out.tokens
                window.add(out)
            if (state.step % cfg.log_every == 0 or state.step == total) and window.n:
                now = time.perf_counter()
                train_time += now - window.t
                m = window.close(now, out, info.world_size)
                tracker.log_metrics(m, step=state.step)
                progress.update(state.step, m)
            optimizer = end_ae_pretraining(model, optimizer, state.step, ctx)

            t_val = time.perf_counter()
            if maybe_validate(model, valid, state, ctx, tracker, end_of_epoch=end_of_epoch) is not None:
                save_last(model, optimizer, state, ctx)
                window.t += time.perf_counter() - t_val  # tokens/s counts training only
                if cfg.patience and state.bad >= cfg.patience:
                    stopped_early = True
                    log.info("early stop at step %d: no improvement in %d validations", state.step, cfg.patience)

            report_step(on_step, state.step, out, stop, info)
            if stop_agreed(stop, state.step, ctx):
                save_last(model, optimizer, state, ctx)
                log.warning("interrupted at step %d; last.pt saved in %s: continue with --set train.resume=true",
                            state.step, work_dir)
                raise KeyboardInterrupt
            if stopped_early:
                break
    progress.close()

    # the end: last validation and checkpoints, then the finished model replaces the old one
    validate_at_end(model, valid, state, ctx, tracker)
    save_last(model, optimizer, state, ctx)
    D.barrier(info)
    if info.is_main:
        replace_dir(work_dir, final_dir)
        finish_tracking(tracker, params, final_dir, tok_file)
    tps = trained_tokens * info.world_size / max(train_time, 1e-9)
    result = TrainResult(final_dir, mcfg.kind, state.step, state.epoch, state.best_step,
                         state.best_metrics, stopped_early, time.perf_counter() - t0, tps, tracker.run_id)
    log.info("train %s done: %d steps in %.0f s (%.0f tokens/s), best val_elbo %.4f at step %d -> %s",
             mcfg.kind, result.steps, result.wall_s, tps, state.best_val, state.best_step, final_dir)
    return result


def _tokenizer_hash(tok_file: Path | None) -> str | None:
    from vaepipe.core.io import sha256_file

    return sha256_file(tok_file) if tok_file is not None and tok_file.is_file() else None


# train.* keys a resumed run may change: its bounds, its cadence and where it runs, not what it
# learns (a different lr or batch size would make another run under the old run's name)
RESUMABLE_TRAIN_KEYS = frozenset({"resume", "max_steps", "max_epochs", "patience", "eval_every", "log_every",
                                  "device", "bf16", "num_threads", "max_nonfinite_steps"})


@dataclass(frozen=True)
class Provenance:
    """The sha256 of the token data (``data_fingerprint``) and of tokenizer.json (None: no
    tokenizer file) that a run trains on."""

    data_hash: str
    tokenizer_hash: str | None


def resume_differences(saved: Mapping[str, Any], params: Params, vcfg: VAEConfig,
                       prov: Provenance) -> dict[str, tuple[Any, Any]]:
    """``{key: (trained with, now)}`` for each setting in which the run that wrote ``saved``
    (a config.json) differs from this one: ``seed``, ``model.*``, ``train.*`` but
    ``RESUMABLE_TRAIN_KEYS``, ``data_hash``, ``tokenizer_hash``. Keys that an older
    config.json does not record are not compared."""
    then_params = saved.get("params") if isinstance(saved.get("params"), dict) else {}
    then = {f"model.{k}": v for k, v in saved["model"].items()}  # the network as built (vocab_size too)
    then.update(_flat(then_params, ("seed", "model", "train")))
    now = {f"model.{k}": v for k, v in vcfg.to_dict().items()}
    now.update(_flat(params.to_dict(), ("seed", "model", "train")))
    then.update({"data_hash": saved.get("data_hash"), "tokenizer_hash": saved.get("tokenizer_hash")})
    now.update({"data_hash": prov.data_hash, "tokenizer_hash": prov.tokenizer_hash})
    return {k: (then[k], v) for k, v in now.items()
            if k in then and then[k] is not None and then[k] != v
            and k.removeprefix("train.") not in RESUMABLE_TRAIN_KEYS}


def _flat(d: Mapping[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in sections:
        v = d.get(name)
        if isinstance(v, dict):
            out.update({f"{name}.{k}": kv for k, kv in v.items()})
        elif name in d:
            out[name] = v
    return out


def _show(key: str, value: Any) -> str:
    return f"{value[:12]}" if key.endswith("_hash") and isinstance(value, str) else f"{value}"


def _resume(model: TextVAE, optimizer: torch.optim.Optimizer, params: Params, vcfg: VAEConfig,
            prov: Provenance, ctx: RunContext, *, elastic: bool = False) -> tuple[TrainState, str | None] | None:
    """Load last.pt (from an interrupted run's work dir, else the finished model dir) into place:
    the training state to go on from and the tracking run to continue; None when there is no
    last.pt to continue (start afresh).

    ``elastic`` (a worker group that torchrun restarted, see ``D.restarted``): only the work
    dir's last.pt, which this job wrote (its first attempt cleared any older partial run before
    training); the finished model dir holds an earlier run, never this one's.

    ConfigError, naming the keys, when that checkpoint's run had other settings, data or
    tokenizer (see ``resume_differences``): resuming it would continue another run and
    record this run's settings as its own.
    """
    work_dir, final_dir, info = ctx.work_dir, ctx.final_dir, ctx.info
    src = resume_source(ctx, elastic=elastic)
    if src is None:
        if not elastic:
            log.warning("train.resume: no last.pt in %s or %s; starting from scratch", work_dir, final_dir)
        return None
    diffs = resume_differences(ckpt.read_config(src), params, vcfg, prov)
    if diffs:
        then = ", ".join(f"{k}={_show(k, a)}" for k, (a, _) in diffs.items())
        now = "/".join(_show(k, b) for k, (_, b) in diffs.items())
        raise ConfigError(f"train.resume: {src / ckpt.LAST} was trained with {then}, not {now}; "
                          "run without train.resume to start afresh (or restore those settings)")
    last = ckpt.load_state(src / ckpt.LAST)
    model.load_state_dict(ckpt.model_state(last))
    optimizer.load_state_dict(last["optimizer"])
    try:
        state = TrainState.from_checkpoint(last)
    except KeyError as e:
        raise InputError(f"{src / ckpt.LAST}: no training state to resume from (missing {e.args[0]})") from None
    torch.set_rng_state(last["rng"]["torch"])
    if "cuda" in last["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(last["rng"]["cuda"])
    run_id = read_run_info(src).get("run_id")
    D.barrier(info)
    if info.is_main and src == final_dir:
        shutil.copytree(final_dir, work_dir, dirs_exist_ok=True)
    if info.is_main:
        for name in (ckpt.LAST, ckpt.BEST):  # a checkpoint write that the failure cut short
            remove_leftovers(work_dir / name)
    log.info("resumed from %s at step %d (epoch %d, batch %d)%s", src / ckpt.LAST, state.step, state.epoch,
             state.pos, " (a worker group that torchrun restarted)" if elastic else "")
    return state, run_id


def resume_source(ctx: RunContext, *, elastic: bool) -> Path | None:
    """The folder whose last.pt a resumed run continues: the work dir of an interrupted run,
    else (unless ``elastic``) the finished model dir; None when neither holds one."""
    if (ctx.work_dir / ckpt.LAST).is_file():
        return ctx.work_dir
    if not elastic and (ctx.final_dir / ckpt.LAST).is_file():
        return ctx.final_dir
    return None


def log_inputs(tracker: Tracker, params: Params, data_hash: str, split_rows: dict[str, int]) -> None:
    """The corpus (when it is still there) and each token split the run read, as the run's datasets."""
    if Path(params.paths.corpus).is_dir():
        tracker.log_dataset("corpus", params.paths.corpus, context=SPLIT_CONTEXT["train"])
    for split, rows in split_rows.items():
        tracker.log_dataset(f"tokens/{split}", params.paths.tokens, context=SPLIT_CONTEXT[split],
                            digest=data_hash or None, rows=rows)


def finish_tracking(tracker: Tracker, params: Params, model_dir: Path, tok_file: Path | None) -> None:
    """Artifacts, the text -> vector model (kind vae), then run.json."""
    if tok_file is not None and tok_file.is_file():
        tracker.log_artifact(tok_file, "tokenizer")
    tracker.log_artifact(model_dir / ckpt.CONFIG_FILE, "model")
    tracker.log_artifact(model_dir / ckpt.BEST, "model")
    if params.model.kind == "vae" and tok_file is not None and tracker.run_id is not None:
        with staged_text_model(params, model_dir) as package:  # packaged here; the tracker uploads
            if package is not None:
                tracker.log_text_model(package.root, registered_name=params.tracking.registered_model)
    write_run_info(model_dir, tracker.run_id, params.tracking.uri if tracker.run_id else None)
