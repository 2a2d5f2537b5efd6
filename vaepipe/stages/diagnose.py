"""Diagnose a trained VAE: does it use its latent, and does the latent pay for itself?

    paths.model (vae), paths.baseline (lm, optional), paths.tokens, paths.tokenizer -> Diagnosis

The answer to "why do all my samples look alike": on one split (the first of
``evaluate.splits``, its first ``evaluate.max_docs`` documents) it measures, with evaluate's own
scorers and estimators, the KL of each latent dimension, the active units (AU: dimensions whose
posterior mean varies across documents, Cov_x E_q[z|x] > 0.01), the mutual information between
documents and codes (MI), and, when paths.baseline holds the LM baseline, the gap between the
VAE's IW-NLL and the LM's NLL with its paired bootstrap 95% interval. Then a plain-language
verdict:

- ``collapsed``: no active unit, or MI below ``COLLAPSE_MI`` nats: the decoder ignores z, so
  every prior sample and every reconstruction comes out alike.
- ``weak``: fewer than half the dimensions active, or MI below ``WEAK_MI`` nats: z carries a
  little (the topic, the length), far from what it could.
- ``healthy``: most dimensions active and z informative.

For collapsed and weak models the advice names the settings of the run that trained the
model (config.json) that are off or low, with the ``params.yaml`` key to change. Nothing is
written: ``vaepipe diagnose`` prints the report (``--json``: this module's ``Diagnosis``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vaepipe.core.constants import AU_THRESHOLD, SPLITS
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.ml import estimators as est
from vaepipe.ml.data import read_split
from vaepipe.ml.device import resolve_device
from vaepipe.stages import evaluate

if TYPE_CHECKING:
    from vaepipe.core.config import Params

log = logging.getLogger(__name__)

COLLAPSE_MI = 0.1  # nats: below this, z tells the documents apart no better than chance
WEAK_MI = 1.0  # nats: below this, z tells apart fewer than e (about 3) groups of documents
WEAK_AU_SHARE = 0.5  # fewer active units than this share of latent_dim: a weak latent
VERDICTS = ("collapsed", "weak", "healthy")


@dataclass(frozen=True)
class Diagnosis:
    """What ``diagnose`` found; ``to_dict`` is what ``vaepipe diagnose --json`` prints."""

    model: str
    split: str
    n_docs: int
    iw_samples: int
    latent_dim: int
    active_units: int
    kl: float  # nats per document, summed over the dimensions
    mi: float  # nats, aggregate posterior over the evaluated documents
    kl_per_dim: list[float]  # nats per document, one per dimension
    mean_variance_per_dim: list[float]  # Cov_x E_q[z|x] per dimension (active above AU_THRESHOLD)
    iw_nll: float
    lm_nll: float | None = None
    gap_vs_lm: float | None = None  # VAE IW-NLL - LM NLL, nats per document: negative, the VAE is better
    gap_vs_lm_ci95: list[float] | None = None  # its paired bootstrap 95% interval (evaluate.gap_vs_lm)
    verdict: str = "healthy"  # one of VERDICTS
    summary: str = ""  # the verdict in one sentence
    advice: list[str] = field(default_factory=list)  # "key: value (why)" lines to try

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(params: Params, *, split: str | None = None) -> Diagnosis:
    """Diagnose paths.model on ``split`` (default: the first of ``evaluate.splits``), scoring its
    first ``evaluate.max_docs`` documents with K = ``evaluate.iw_samples``."""
    ev, paths = params.evaluate, params.paths
    split = split or ev.splits[0]
    if split not in SPLITS:
        raise ConfigError(f"diagnose: unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    device = resolve_device(ev.device, "evaluate.device")
    tokenizer, model, config, lm = _load_models(params, device)
    data = read_split(paths.tokens, split, ev.max_docs)
    if not len(data):
        raise InputError(f"{paths.tokens}: split {split!r} has no documents")
    log.info("diagnose %s on %s: %d docs, K=%d", paths.model, split, len(data), ev.iw_samples)
    # evaluate's scorers and metrics, seeded as evaluate seeds its headline split
    scores = evaluate.score_vae(model, data, iw_samples=ev.iw_samples, batch_tokens=ev.batch_tokens,
                                device=device, bf16=ev.bf16,
                                generator=torch.Generator(device=device).manual_seed(params.seed))
    lm_ll = None if lm is None else evaluate.score_lm(lm, data, batch_tokens=ev.batch_tokens,
                                                      device=device, bf16=ev.bf16)
    texts = tokenizer.decode_batch([s.tolist() for s in data.seqs], skip_special_tokens=True)
    m = evaluate.split_metrics(scores, data.lengths, texts, iw_samples=ev.iw_samples,
                               mi_batch_size=ev.mi_batch_size, seed=params.seed, lm_log_px=lm_ll)
    _, variance = est.active_units(torch.from_numpy(scores.mu), AU_THRESHOLD)
    trained_with = config.get("params") if isinstance(config.get("params"), dict) else {}
    verdict, summary = judge(m["active_units"], m["latent_dim"], m["mi"], m["kl"])
    return Diagnosis(
        model=str(paths.model), split=split, n_docs=m["n_docs"], iw_samples=ev.iw_samples,
        latent_dim=m["latent_dim"], active_units=m["active_units"], kl=m["kl"], mi=m["mi"],
        kl_per_dim=[float(v) for v in np.asarray(scores.kl_per_dim).mean(0)],
        mean_variance_per_dim=[float(v) for v in variance.numpy()],
        iw_nll=m["iw_nll"], lm_nll=m.get("lm_nll"), gap_vs_lm=m.get("gap_vs_lm"),
        gap_vs_lm_ci95=m.get("gap_vs_lm_ci95"), verdict=verdict, summary=summary,
        advice=advice(verdict, trained_with),
    )


def _load_models(params: Params, device: torch.device) -> tuple[Any, torch.nn.Module, dict[str, Any],
                                                                  torch.nn.Module | None]:
    """(tokenizer, VAE, its config.json, the LM baseline or None), checked as evaluate checks
    them: the right kinds, trained with the tokenizer in paths.tokenizer."""
    from vaepipe.stages import tokenize

    paths = params.paths
    if not (Path(paths.model) / "config.json").is_file():
        raise InputError(f"{paths.model}: no trained model (paths.model; run `vaepipe train` first)")
    tokenizer = tokenize.load_tokenizer(paths.tokenizer)
    tok_hash = tokenize.tokenizer_hash(paths.tokenizer)
    model, config = evaluate._load(paths.model, "vae", "paths.model", device, tok_hash)
    lm = None
    if (Path(paths.baseline) / "config.json").is_file():
        lm, _ = evaluate._load(paths.baseline, "lm", "paths.baseline", device, tok_hash)
    return tokenizer, model, config, lm


def judge(active: int, latent_dim: int, mi: float, kl: float) -> tuple[str, str]:
    """(verdict, one sentence) from the active units, the MI and the KL (nats per document)."""
    units = f"{active} active unit{'s' if active != 1 else ''} of {latent_dim}"
    numbers = f"{units}, MI {mi:.2f} nats, KL {kl:.2f} nats per document"
    alike = "The decoder ignores z, so samples from the prior and reconstructions all look alike."
    if active == 0:
        return "collapsed", f"posterior collapse: {numbers}. {alike}"
    if mi < COLLAPSE_MI:
        return "collapsed", (f"posterior collapse: MI {mi:.2f} nats ({units}, KL {kl:.2f} nats per "
                             "document): the posterior means move, but by less than their own noise, "
                             f"so z tells documents apart no better than chance. {alike}")
    if active < WEAK_AU_SHARE * latent_dim or mi < WEAK_MI:
        return "weak", (f"weak latent: {numbers}. z carries a little about each document, far "
                        "from what it could; reconstructions keep little of their input.")
    return "healthy", f"healthy: {numbers}. The latent code is used."


def advice(verdict: str, trained_with: dict[str, Any]) -> list[str]:
    """The settings to try, given the params the model was trained with (config.json's
    ``params``; keys it lacks count as the defaults)."""
    from vaepipe.core.config import Params

    defaults = Params().to_dict()
    model = {**defaults["model"], **(trained_with.get("model") or {})}
    train = {**defaults["train"], **(trained_with.get("train") or {})}
    tips = []
    if model["bn_gamma"] == 0:
        tips.append("model.bn_gamma: 0.7 (was 0: BN-VAE keeps each dimension's KL above gamma^2/2, "
                    "so collapse cannot happen)")
    elif model["bn_gamma"] < 0.7:
        tips.append(f"model.bn_gamma: 0.7 or more (was {model['bn_gamma']}: a larger gamma forces more KL)")
    if train["free_bits"] == 0:
        tips.append("train.free_bits: 0.5 (was 0: no KL penalty below 0.5 nats per dimension)")
    if train["kl_schedule"] == "constant":
        tips.append("train.kl_schedule: cyclical (was constant: a full KL weight from the first step "
                    "collapses z before the encoder learns anything)")
    elif train["kl_warmup_steps"] < 1000:
        tips.append(f"train.kl_warmup_steps: 2000 or more (was {train['kl_warmup_steps']}: a longer "
                    "warm-up lets the encoder learn first)")
    if train["ae_pretrain_steps"] == 0:
        tips.append("train.ae_pretrain_steps: 1000 (was 0: Li et al. 2019's autoencoder pre-training, "
                    "then a fresh decoder)")
    if train["aggressive_steps"] == 0:
        tips.append("train.aggressive_steps: 500 (was 0: He et al. 2019's encoder-only updates before each "
                    "early step, so the encoder keeps up with the decoder; each such step costs up to "
                    "1 + train.aggressive_max_inner updates, so keep it to the first epoch or two)")
    if train["word_dropout"] == 0:
        tips.append("train.word_dropout: 0.3 (was 0: a decoder that cannot read every previous word "
                    "has to use z)")
    if not tips:
        tips.append("train longer (train.max_steps, train.max_epochs) or raise model.latent_dim only "
                    "after the settings above are on; they already are")
    return tips if verdict in ("collapsed", "weak") else []


def gap_text(d: Diagnosis) -> str | None:
    """The VAE vs LM line, or None without an LM baseline: the interval entirely below 0
    means the VAE is better, entirely above 0 worse, holding 0 level."""
    if d.lm_nll is None or d.gap_vs_lm is None or d.gap_vs_lm_ci95 is None:
        return None
    low, high = d.gap_vs_lm_ci95
    if high < 0:
        word = "better than the LM: the latent pays for itself"
    elif low > 0:
        word = "worse than the LM: the latent costs more than it gives"
    else:
        word = "level with the LM (the interval holds 0)"
    return (f"IW-NLL {d.iw_nll:.2f} vs LM {d.lm_nll:.2f} nats per document: gap {d.gap_vs_lm:+.2f} "
            f"(95% CI {low:+.2f} to {high:+.2f}), {word}")


def format_report(d: Diagnosis) -> str:
    """The text ``vaepipe diagnose`` prints."""
    lines = [f"{d.model} on {d.split} ({d.n_docs} documents, K={d.iw_samples})",
             f"active units: {d.active_units} of {d.latent_dim} (Cov_x E[z|x] > {AU_THRESHOLD})",
             f"KL: {d.kl:.3f} nats per document; MI: {d.mi:.3f} nats",
             "KL per dimension (nats; * active):"]
    cells = [f"{i:>3} {kl:7.3f}{'*' if v > AU_THRESHOLD else ' '}"
             for i, (kl, v) in enumerate(zip(d.kl_per_dim, d.mean_variance_per_dim, strict=True))]
    lines += ["  " + "   ".join(cells[i:i + 8]) for i in range(0, len(cells), 8)]
    gap = gap_text(d)
    lines.append(gap if gap else "no LM baseline in paths.baseline: no gap (train one: "
                 "`vaepipe train --set model.kind=lm`)")
    lines.append(f"verdict: {d.summary}")
    if d.advice:
        lines.append("try (params.yaml keys):")
        lines += [f"  {tip}" for tip in d.advice]
    return "\n".join(lines)
