"""`vaepipe train`: an explicit training loop for the text VAE (kind vae) or the LM baseline (kind lm).

    run(params, tracker=None) -> TrainResult

Length-bucketed batches (vaepipe.ml.data) under ``train.batch_tokens``, AdamW (or SGD) with warm-up
and cosine decay, gradient clipping, KL annealing / free bits / word dropout / AE pre-training
against posterior collapse, validation on the beta = 1 ELBO for early stopping and model
selection, DDP under torchrun, bf16 autocast on CUDA.

Checkpoints go to a sibling work directory ``.<name>.partial`` and replace ``paths.model`` (or
``paths.baseline``) only when training ends, so a failed run never destroys the previous model.
SIGINT/SIGTERM stop at the next step boundary after saving ``last.pt``; ``train.resume: true``
then continues to exactly the weights an uninterrupted run would reach: schedules and random
streams are pure functions of (seed, rank, step), data order of (seed, epoch).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaepipe.core.run_info import read_run_info, write_run_info
from vaepipe.ml.device import resolve_device
from vaepipe.ml import checkpoint as ckpt
from vaepipe.ml import distributed as D
from vaepipe.core.constants import AU_THRESHOLD
from vaepipe.core.config import Params, TrainConfig
from vaepipe.ml.data import TokenSplit, collate, mixed_batches, read_split, token_batches
from vaepipe.core.errors import ConfigError
from vaepipe.core.io import replace_dir
from vaepipe.ml.model import LossTerms, TextVAE, VAEConfig
from vaepipe.ml.schedules import beta_at, lr_at
from vaepipe.core.tracking import NullTracker, Tracker, TrackerFactory, tracker_for
from vaepipe.stages.train_support import (
    Progress, StopRequest, data_fingerprint, git_commit, step_seed, vocab_size_for,
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


def objective(terms: LossTerms, beta: float, free_bits: float) -> torch.Tensor:
    """Training loss per predicted token: (recon + beta * KL) summed over the batch / tokens.

    Free bits (Kingma et al. 2016, as in Li et al. 2019): each dimension's batch-mean KL below
    ``free_bits`` nats is clamped, so the encoder is not pushed to collapse that dimension.
    """
    B = terms.recon.size(0)
    total = terms.recon.sum()
    if terms.kl_per_dim.size(1) and beta > 0:
        per_dim = terms.kl_per_dim.mean(0)  # (Z,)
        if free_bits > 0:
            per_dim = per_dim.clamp(min=free_bits)
        total = total + beta * B * per_dim.sum()
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
# The loop


def run(params: Params, tracker: Tracker | None = None, *, make_tracker: TrackerFactory | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``params.model.kind`` on ``paths.tokens``; write checkpoints; track the run.

    The run is logged to ``tracker``, or, when ``tracking.enabled``, to one that
    ``make_tracker(params.tracking)`` makes (the CLI passes MLflow's).

    ``on_step(step, metrics)`` is called on rank 0 at every step boundary (progress reporting,
    tests); raising KeyboardInterrupt there stops the run like SIGINT, after saving last.pt.
    """
    t0 = time.perf_counter()
    cfg, mcfg = params.train, params.model
    device = resolve_device(cfg.device, "train.device")
    info = D.setup(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    amp = device.type == "cuda" and cfg.bf16
    final_dir = Path(params.paths.model if mcfg.kind == "vae" else params.paths.baseline)
    work_dir = final_dir.parent / f".{final_dir.name}.partial"
    tracker = (tracker or tracker_for(params, make_tracker)) if info.is_main else NullTracker()
    if not info.is_main:  # logging on rank 0 only; other ranks still report warnings
        log.setLevel(logging.WARNING)
    stop = StopRequest()
    try:
        train = read_split(params.paths.tokens, "train")
        valid = read_split(params.paths.tokens, "valid")
        max_id = max(int(max(s.max() for s in train.seqs)), int(max(s.max() for s in valid.seqs)))
        vocab_size, tok_file = vocab_size_for(params, max_id)
        vcfg = VAEConfig.from_model_config(mcfg, vocab_size)
        torch.manual_seed(params.seed)
        model = TextVAE(vcfg).to(device)
        optimizer = make_optimizer(model, cfg)

        n_batches = len(epoch_batches(train.lengths, cfg, params.seed, 0, info))
        if n_batches == 0:
            raise ConfigError(f"train.batch_tokens: the train split gives no batch for {info.world_size} ranks")
        total = cfg.max_epochs * n_batches
        total = min(total, cfg.max_steps) if cfg.max_steps else total
        state = {"step": 0, "epoch": 0, "pos": 0, "best_val": math.inf, "best_step": -1, "bad": 0,
                 "last_eval": -1, "best_metrics": {}}
        resumed_run_id = None
        if cfg.resume:
            resumed_run_id = _resume(model, optimizer, state, vcfg, work_dir, final_dir, info)
        elif info.is_main and work_dir.exists():
            shutil.rmtree(work_dir)  # a stale partial run that was not asked to be resumed
        D.barrier(info)

        tok_hash = _tokenizer_hash(tok_file)
        if info.is_main:
            tracker.start(run_name=f"train-{mcfg.kind}", run_id=resumed_run_id,
                          tags={"git_commit": git_commit(), "data_hash": data_fingerprint(params.paths.tokens),
                                "tokenizer_hash": tok_hash or "", "kind": mcfg.kind})
            if resumed_run_id is None:
                tracker.log_params(params.flat())
            ckpt.write_config(work_dir, vcfg, tokenizer_hash=tok_hash, params=params.to_dict())
            write_run_info(work_dir, tracker.run_id, params.tracking.uri if tracker.run_id else None)
        log.info("train %s: %d params, %d train / %d valid records, %d batches/epoch/rank, %d steps, device %s%s",
                 mcfg.kind, sum(p.numel() for p in model.parameters()), len(train), len(valid), n_batches,
                 total, device, f", {info.world_size} ranks" if info.enabled else "")

        net: nn.Module = model
        if info.enabled:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        def save(name: str, extra: dict[str, Any]) -> None:
            if info.is_main:
                ckpt.save_state(work_dir / name, {"format": ckpt.FORMAT, "model": model.state_dict(), **extra})

        def save_last() -> None:
            rng = {"torch": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            save(ckpt.LAST, {"optimizer": optimizer.state_dict(), "rng": rng, **state})

        def validate() -> dict[str, float]:
            m = evaluate_loss(model, valid, cfg.batch_tokens, device, amp=amp, seed=params.seed, info=info)
            state["last_eval"] = state["step"]
            selectable = state["step"] > cfg.ae_pretrain_steps  # the AE phase's ELBO is not a VAE's
            if selectable and m["val_elbo"] < state["best_val"]:
                state.update(best_val=m["val_elbo"], best_step=state["step"], bad=0, best_metrics=m)
                save(ckpt.BEST, {"step": state["step"], "epoch": state["epoch"], "metrics": m})
            elif selectable:
                state["bad"] += 1
            tracker.log_metrics(m, step=state["step"])
            log.info("step %d validation: %s", state["step"], ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
            return m

        progress = Progress(total, initial=state["step"], enabled=info.is_main)
        window = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}
        trained_tokens, train_time = 0, 0.0
        stopped_early = False
        net.train()
        with stop.installed():
            while state["step"] < total and state["epoch"] < cfg.max_epochs:
                batches = epoch_batches(train.lengths, cfg, params.seed, state["epoch"], info)
                while state["pos"] < len(batches) and state["step"] < total:
                    step = state["step"]
                    torch.manual_seed(step_seed(params.seed, info.rank, step))
                    ids, lengths = collate([train.seqs[i] for i in batches[state["pos"]]])
                    if device.type == "cuda":
                        ids = ids.pin_memory().to(device, non_blocking=True)  # lengths stay on the CPU
                    beta, lr = beta_at(step, cfg), lr_at(step, cfg, total)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                        terms = net(ids, lengths, word_dropout=cfg.word_dropout)
                    loss = objective(terms, beta, cfg.free_bits)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                    optimizer.step()
                    state["step"], state["pos"] = step + 1, state["pos"] + 1
                    n_tok = int((lengths + 1).sum())
                    window["tokens"] += n_tok
                    trained_tokens += n_tok
                    window["n"] += 1
                    window["loss"] += loss.detach()
                    window["recon"] += terms.recon.detach().mean()
                    window["kl"] += terms.kl.detach().mean()
                    if state["step"] % cfg.log_every == 0 or state["step"] == total:
                        now = time.perf_counter()
                        tps = window["tokens"] * info.world_size / max(now - window["t"], 1e-9)
                        train_time += now - window["t"]
                        m = {"loss": float(window["loss"]) / window["n"], "recon": float(window["recon"]) / window["n"],
                             "kl": float(window["kl"]) / window["n"], "beta": beta, "lr": lr,
                             "grad_norm": float(gnorm), "tokens_per_s": tps}
                        tracker.log_metrics(m, step=state["step"])
                        progress.update(state["step"], m)
                        window.update(loss=0.0, recon=0.0, kl=0.0, n=0, tokens=0, t=now)
                    if cfg.ae_pretrain_steps and state["step"] == cfg.ae_pretrain_steps and mcfg.kind == "vae":
                        # Li et al. 2019: keep the pre-trained encoder, restart decoder and optimizer
                        torch.manual_seed(step_seed(params.seed, 0, -1))
                        model.reset_decoder()
                        optimizer = make_optimizer(model, cfg)
                        log.info("step %d: AE pre-training done, decoder reset", state["step"])
                    end_of_epoch = state["pos"] == len(batches)
                    if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch):
                        t_val = time.perf_counter()
                        validate()
                        save_last()
                        window["t"] += time.perf_counter() - t_val  # tokens/s counts training only
                        if cfg.patience and state["bad"] >= cfg.patience:
                            stopped_early = True
                            log.info("early stop at step %d: no improvement in %d validations", state["step"], cfg.patience)
                    if on_step is not None and info.is_main:
                        try:
                            on_step(state["step"], {"loss": float(loss.detach())})
                        except KeyboardInterrupt:
                            stop.requested = True
                    # under DDP the ranks agree on stopping at log steps (a collective per step costs)
                    check = not info.enabled or state["step"] % cfg.log_every == 0
                    if check and D.any_rank(stop.requested, info, device):
                        save_last()
                        log.warning("interrupted at step %d; last.pt saved in %s: continue with --set train.resume=true",
                                    state["step"], work_dir)
                        raise KeyboardInterrupt
                    if stopped_early:
                        break
                if stopped_early:
                    break
                if state["pos"] >= len(batches):
                    state["epoch"], state["pos"] = state["epoch"] + 1, 0
        progress.close()
        if state["last_eval"] != state["step"] or state["best_step"] < 0:
            m = validate()
            if state["best_step"] < 0:  # only the AE phase ran: keep its weights as best
                state.update(best_val=m["val_elbo"], best_step=state["step"], best_metrics=m)
                save(ckpt.BEST, {"step": state["step"], "epoch": state["epoch"], "metrics": m})
        save_last()
        D.barrier(info)
        if info.is_main:
            replace_dir(work_dir, final_dir)
            _finish_tracking(tracker, params, final_dir, tok_file)
        tps = trained_tokens * info.world_size / max(train_time, 1e-9)
        result = TrainResult(final_dir, mcfg.kind, state["step"], state["epoch"], state["best_step"],
                             state["best_metrics"], stopped_early, time.perf_counter() - t0, tps, tracker.run_id)
        log.info("train %s done: %d steps in %.0f s (%.0f tokens/s), best val_elbo %.4f at step %d -> %s",
                 mcfg.kind, result.steps, result.wall_s, tps, state["best_val"], state["best_step"], final_dir)
        tracker.end("FINISHED")
        return result
    except BaseException as e:
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        D.teardown(info)


def _tokenizer_hash(tok_file: Path | None) -> str | None:
    from vaepipe.core.io import sha256_file

    return sha256_file(tok_file) if tok_file is not None and tok_file.is_file() else None


def _resume(model: TextVAE, optimizer: torch.optim.Optimizer, state: dict[str, Any], vcfg: VAEConfig,
            work_dir: Path, final_dir: Path, info: D.DistInfo) -> str | None:
    """Load last.pt (from an interrupted run's work dir, else the finished model dir) into place."""
    src = work_dir if (work_dir / ckpt.LAST).is_file() else final_dir if (final_dir / ckpt.LAST).is_file() else None
    if src is None:
        log.warning("train.resume: no last.pt in %s or %s; starting from scratch", work_dir, final_dir)
        return None
    saved = VAEConfig.from_dict(ckpt.read_config(src)["model"])
    if saved != vcfg:
        raise ConfigError(f"train.resume: model settings differ from {src / ckpt.CONFIG_FILE}; "
                          "train from scratch (train.resume=false) or restore the model.* params")
    last = ckpt.load_state(src / ckpt.LAST)
    model.load_state_dict(ckpt.model_state(last))
    optimizer.load_state_dict(last["optimizer"])
    for k in state:
        state[k] = last[k]
    torch.set_rng_state(last["rng"]["torch"])
    if "cuda" in last["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(last["rng"]["cuda"])
    run_id = read_run_info(src).get("run_id")
    D.barrier(info)
    if info.is_main and src == final_dir:
        shutil.copytree(final_dir, work_dir, dirs_exist_ok=True)
    log.info("resumed from %s at step %d (epoch %d, batch %d)", src / ckpt.LAST, state["step"], state["epoch"], state["pos"])
    return run_id


def _finish_tracking(tracker: Tracker, params: Params, model_dir: Path, tok_file: Path | None) -> None:
    """Artifacts, the text -> vector model (kind vae), then run.json."""
    if tok_file is not None and tok_file.is_file():
        tracker.log_artifact(tok_file, "tokenizer")
    tracker.log_artifact(model_dir / ckpt.CONFIG_FILE, "model")
    tracker.log_artifact(model_dir / ckpt.BEST, "model")
    if params.model.kind == "vae" and tok_file is not None and tracker.run_id is not None:
        # imported here to keep this change to this helper (the module's imports are shared work)
        from vaepipe.stages.package import staged_text_model

        with staged_text_model(params, model_dir) as package:  # packaged here; the tracker uploads
            if package is not None:
                tracker.log_text_model(package.root, registered_name=params.tracking.registered_model)
    write_run_info(model_dir, tracker.run_id, params.tracking.uri if tracker.run_id else None)
