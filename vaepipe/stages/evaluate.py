"""Evaluate stage: the numbers a text-VAE reviewer checks, plus samples and plots.

    paths.model (vae), paths.baseline (lm, optional), paths.tokens, paths.tokenizer
        -> paths.reports/metrics.json, kl_per_dim.csv/.png, latent_pca.csv/.png,
           iw_nll_vs_k.csv/.png, samples_by_strategy.csv, reconstructions.txt, prior_samples.txt,
           interpolations.txt

Per split (``evaluate.splits``; the first is the headline), in eval mode (no dropout, no word
dropout) and with beta = 1:

- ``iw_nll``: -log p(x) by importance sampling with K = ``evaluate.iw_samples`` draws from
  q(z|x) (Burda et al. 2016; K = 500 in He et al. 2019). Batched over sequences *and* samples:
  one decoder call scores ``B sequences x k samples`` rows within ``evaluate.batch_tokens``
  padded tokens, never one sentence at a time.
- ``elbo`` = recon + kl, the *negative* ELBO (positive, lower is better, like train's
  ``val_elbo`` and like ``iw_nll``, which it bounds from above): recon = -E_q log p(x|z) averaged
  over the same K draws, kl in closed form. NLL/ELBO are per sentence, in nats.
- ``ppl`` / ``ppl_elbo``: per token from the IW-NLL / from -ELBO, ``<eos>`` counted, ``<bos>``
  not; ``ppl_word``: per whitespace word of the decoded text plus one ``<eos>`` per sentence
  (the word-level convention of He et al.); ``bits_per_byte``: per UTF-8 byte of the text.
- ``mi`` (aggregate posterior over the whole evaluated set) and ``mi_minibatch`` (He et al.'s
  calc_mi, <= log(evaluate.mi_batch_size)): see vaepipe/ml/estimators.py.
- ``active_units`` (Cov_x E_q[z|x] > 0.01) of ``latent_dim``; KL per dimension in a CSV.
- ``lm_nll`` / ``lm_ppl``: the LM baseline's exact NLL on the same documents, when
  paths.baseline holds one, and ``gap_vs_lm`` = iw_nll - lm_nll with ``gap_vs_lm_ci95``, its
  paired bootstrap interval over documents (1,000 resamples, seeded by ``seed``).
- ``iw_nll_vs_k.csv``: the headline IW-NLL at K in 1, 10, 50, 100, 500 (up to and always
  including ``evaluate.iw_samples``), from prefixes of the same K draws: no extra decoder passes.
- ``recon_token_acc`` (headline split): the share of target tokens (the document's tokens and
  its ``<eos>``) that the greedy decoding of E[z|x] reproduces at the same position, over the
  first ``evaluate.recon_docs`` documents; ``samples_by_strategy.csv``: reconstructions and
  prior samples decoded with each of ``evaluate.strategies``, side by side.
- ``probes`` (metrics.json): the downstream probes of ``evaluate.probe_labels`` on the test split,
  the posterior means against LSA (vaepipe/stages/probes.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vaepipe.core.constants import AU_THRESHOLD, EOS_ID
from vaepipe.core.errors import ConfigError, InputError, VaepipeError
from vaepipe.core.io import atomic_dir, atomic_write_bytes, write_json
from vaepipe.core.outputs import output_locks, stage_outputs
from vaepipe.core.storage import staged
from vaepipe.core.tracking import SPLIT_CONTEXT, Tracker, TrackerFactory, tracker_for
from vaepipe.ml import estimators as est
from vaepipe.ml.data import TokenSplit, iter_batches, read_split
from vaepipe.ml.decoding import STRATEGIES, Decoding, decode_ids
from vaepipe.ml.device import resolve_device
from vaepipe.stages import probes

if TYPE_CHECKING:  # config needs PyYAML; the scoring functions must import without it (bench/)
    from vaepipe.core.config import Params

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 60.0
# K values of iw_nll_vs_k.csv (those below evaluate.iw_samples, then iw_samples itself)
IW_CURVE_KS = (1, 10, 50, 100, 500)
GAP_BOOTSTRAP_RESAMPLES = 1000
# the decodings that evaluate.strategies names (nucleus sampling as Holtzman et al. 2020 use it)
STRATEGY_DECODINGS = {"greedy": Decoding("greedy"), "beam": Decoding("beam", beam_size=5),
                      "sample": Decoding("sample", top_p=0.9)}
# headline metrics that MLflow also gets without the split prefix
UNPREFIXED = ("gap_vs_lm", "recon_token_acc")


@dataclass
class VAEScores:
    """Per-document results of one split (numpy, float64), in the split's file order."""

    log_px: np.ndarray  # (N,) IW estimate of log p(x)
    recon: np.ndarray  # (N,) -E_q log p(x|z), Monte Carlo over the K draws
    kl_per_dim: np.ndarray  # (N, Z) closed form
    mu: np.ndarray  # (N, Z) posterior means
    logvar: np.ndarray  # (N, Z)
    iw_ks: tuple[int, ...] = ()  # the K values of log_px_by_k's columns
    log_px_by_k: np.ndarray | None = None  # (N, len(iw_ks)): IW log p(x) from the first k draws


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # flat headline values (as in metrics.json, minus "splits")
    splits: dict[str, dict[str, Any]]  # every evaluated split
    reports_dir: Path
    files: list[str] = field(default_factory=list)  # names written under reports_dir


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 for the decoder's matmuls on CUDA; the model casts logits to float32 itself."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def score_vae(model: torch.nn.Module, split: TokenSplit, *, iw_samples: int, batch_tokens: int,
              device: torch.device, bf16: bool = False, generator: torch.Generator | None = None,
              iw_ks: Sequence[int] = ()) -> VAEScores:
    """IW log p(x), reconstruction and posteriors of every document of ``split``.

    Sequences are grouped by length so that one group repeated K times fits ``batch_tokens``
    padded tokens; within a group the K samples go in chunks of that size (a sequence longer
    than the budget alone still gets several samples per call). The K log weights of each
    sequence are kept, (B, K), and reduced with logsumexp; ``iw_ks`` (each in 1..K) asks for
    the estimate from the first k of them too (``VAEScores.log_px_by_k``), at no extra decoder cost.
    """
    ks = tuple(int(k) for k in iw_ks)
    if any(not 1 <= k <= iw_samples for k in ks):
        raise ValueError(f"iw_ks must lie in 1..iw_samples={iw_samples}, got {list(ks)}")
    n, zdim = len(split), model.cfg.latent_dim
    # lengths stay on the host (packing reads them there; a host->device copy never waits for
    # the GPU) and results stay on the device until the end: no per-call synchronisation
    parts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    t0 = last = time.monotonic()
    done = 0
    for idx, ids, lengths in iter_batches(split, max(1, batch_tokens // iw_samples)):
        if done and time.monotonic() - last > PROGRESS_EVERY_S:  # K = 500 on a CPU runs for hours
            last = time.monotonic()
            rate = done / (last - t0)
            log.info("IW-NLL: %d/%d documents, %.1f/s, about %.0f min left", done, n, rate, (n - done) / rate / 60)
        done += len(idx)
        ids = ids.to(device, non_blocking=True)
        mu, logvar = (t.float() for t in model.encode(ids, lengths))  # (B, Z) each
        b, t1 = ids.shape[0], ids.shape[1] + 1
        k_chunk = max(1, min(iw_samples, batch_tokens // (b * t1)))
        log_w, ll_sum = [], torch.zeros(b, device=device)
        for k0 in range(0, iw_samples, k_chunk):
            k = min(k_chunk, iw_samples - k0)
            z = est.sample_diag(mu, logvar, k, generator)  # (B, k, Z)
            with _autocast(device, bf16):
                ll = model.log_likelihood(ids.repeat_interleave(k, 0), lengths.repeat_interleave(k, 0),
                                          z.reshape(b * k, zdim))
            ll = ll.float().view(b, k)  # rows are (seq 0: k draws), (seq 1: k draws), ...
            log_w.append(est.iw_log_weights(ll, z, mu, logvar))
            ll_sum += ll.sum(1)
        log_w_all = torch.cat(log_w, 1)  # (B, K), the draws in order
        parts.append((idx, est.iw_log_marginal(log_w_all), est.iw_log_marginal_prefixes(log_w_all, ks),
                      -ll_sum / iw_samples, mu, logvar))
    log_px, recon, by_k = np.empty(n), np.empty(n), np.empty((n, len(ks)))
    mu_all, lv_all = np.empty((n, zdim)), np.empty((n, zdim))
    for idx, lp, lpk, rc, mu, logvar in parts:
        log_px[idx], recon[idx] = lp.double().cpu().numpy(), rc.double().cpu().numpy()
        by_k[idx] = lpk.double().cpu().numpy()
        mu_all[idx], lv_all[idx] = mu.double().cpu().numpy(), logvar.double().cpu().numpy()
    kl = est.gaussian_kl_per_dim(torch.from_numpy(mu_all), torch.from_numpy(lv_all)).numpy()
    return VAEScores(log_px, recon, kl, mu_all, lv_all, ks, by_k if ks else None)


@torch.inference_mode()
def score_lm(model: torch.nn.Module, split: TokenSplit, *, batch_tokens: int, device: torch.device,
             bf16: bool = False) -> np.ndarray:
    """Exact log p(x) of every document under a latent-free LM: (N,)."""
    parts = []
    for idx, ids, lengths in iter_batches(split, batch_tokens):
        with _autocast(device, bf16):
            parts.append((idx, model.log_likelihood(ids.to(device, non_blocking=True), lengths, None)))
    out = np.empty(len(split))
    for idx, ll in parts:
        out[idx] = ll.double().cpu().numpy()
    return out


def text_counts(texts: list[str]) -> tuple[int, int]:
    """(whitespace words + one <eos> per text, UTF-8 bytes) of the decoded documents."""
    words = sum(len(t.split()) + 1 for t in texts)
    return words, sum(len(t.encode("utf-8")) for t in texts)


def minibatch_mi(mu: torch.Tensor, logvar: torch.Tensor, batch_size: int, generator: torch.Generator) -> float:
    """He et al.'s calc_mi over consecutive batches of the split, size-weighted mean."""
    total = 0.0
    for i in range(0, mu.shape[0], batch_size):
        m, lv = mu[i : i + batch_size], logvar[i : i + batch_size]
        total += est.mutual_info_minibatch(m, lv, generator=generator) * m.shape[0]
    return total / mu.shape[0]


def split_metrics(s: VAEScores, lengths: np.ndarray, texts: list[str], *, iw_samples: int,
                  mi_batch_size: int, seed: int, lm_log_px: np.ndarray | None = None) -> dict[str, Any]:
    """Every metric of one split from the per-document scores (pure, deterministic per seed)."""
    n = len(lengths)
    n_tokens = int((np.asarray(lengths) + 1).sum())  # <eos> counted, <bos> not
    n_words, n_bytes = text_counts(texts)
    kl = s.kl_per_dim.sum(1)
    iw_total, elbo_total = float(-s.log_px.sum()), float((s.recon + kl).sum())
    mu, lv = torch.from_numpy(s.mu), torch.from_numpy(s.logvar)
    au, _ = est.active_units(mu, AU_THRESHOLD)
    m: dict[str, Any] = {
        "elbo": elbo_total / n,  # -ELBO, as train.py's val_elbo
        "recon": float(s.recon.mean()),
        "kl": float(kl.mean()),
        "iw_nll": iw_total / n,
        "ppl": est.perplexity(iw_total, n_tokens),
        "ppl_elbo": est.perplexity(elbo_total, n_tokens),
        "ppl_word": est.perplexity(iw_total, n_words),
        "bits_per_byte": est.bits_per_byte(iw_total, n_bytes),
        "mi": est.mutual_info_aggregate(mu, lv, generator=torch.Generator().manual_seed(seed)),
        "mi_minibatch": minibatch_mi(mu, lv, mi_batch_size, torch.Generator().manual_seed(seed + 1)),
        "active_units": au,
        "latent_dim": int(s.mu.shape[1]),
        "n_docs": n,
        "n_tokens": n_tokens,
        "n_words": n_words,
        "n_bytes": n_bytes,
        "iw_samples": iw_samples,
    }
    if lm_log_px is not None:
        lm_total = float(-lm_log_px.sum())
        m |= {"lm_nll": lm_total / n, "lm_ppl": est.perplexity(lm_total, n_tokens),
              "lm_ppl_word": est.perplexity(lm_total, n_words),
              "lm_bits_per_byte": est.bits_per_byte(lm_total, n_bytes)}
        m |= gap_vs_lm(s.log_px, lm_log_px, seed=seed)
    return m


def gap_vs_lm(vae_log_px: np.ndarray, lm_log_px: np.ndarray, *, seed: int,
              resamples: int = GAP_BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """``gap_vs_lm``: mean over documents of VAE IW-NLL minus LM NLL (nats per document; negative
    when the VAE is better), and ``gap_vs_lm_ci95``: [low, high], its paired bootstrap interval
    (documents resampled, both models' scores of a document kept together).

    A difference between two runs smaller than this interval's width is within the noise of
    which documents were evaluated.
    """
    diff = np.asarray(lm_log_px, dtype=np.float64) - np.asarray(vae_log_px, dtype=np.float64)
    low, high = est.bootstrap_mean_ci(diff, resamples=resamples, level=0.95, seed=seed)
    return {"gap_vs_lm": float(diff.mean()), "gap_vs_lm_ci95": [low, high]}


def iw_curve_ks(iw_samples: int) -> tuple[int, ...]:
    """The K values of iw_nll_vs_k.csv: IW_CURVE_KS below ``iw_samples``, then ``iw_samples``."""
    return (*(k for k in IW_CURVE_KS if k < iw_samples), iw_samples)


def write_iw_curve(out: Path, scores: VAEScores) -> list[str]:
    """iw_nll_vs_k.csv (``k,iw_nll``: mean over documents, nats) and its PNG; the file names.

    The values come from prefixes of the same draws, so they differ only by K, not by which
    samples were drawn; in expectation the curve falls towards the true NLL as K grows.
    """
    from vaepipe.stages import plots

    if scores.log_px_by_k is None:
        return []
    nll = -scores.log_px_by_k.mean(0)
    plots.write_csv(out / "iw_nll_vs_k.csv", ["k", "iw_nll"], [[k, float(v)] for k, v in zip(scores.iw_ks, nll)])
    files = ["iw_nll_vs_k.csv"]
    if plots._have_matplotlib():  # an optional extra; plots.write_reports warns once when it is missing
        plot_iw_curve(out / "iw_nll_vs_k.png", scores.iw_ks, nll)
        files.append("iw_nll_vs_k.png")
    return files


def plot_iw_curve(path: Path, ks: Sequence[int], nll: np.ndarray) -> None:
    """IW-NLL against K on a log axis (matplotlib's object API, no global backend)."""
    from matplotlib.figure import Figure

    from vaepipe.stages import plots

    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot()
    ax.plot(list(ks), nll, marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples, prefixes of the same draws)")
    ax.set_ylabel("IW-NLL (nats per document)")
    ax.set_title("IW-NLL as a function of K")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(path, plots._png(fig))


def check_strategies(strategies: Sequence[str]) -> None:
    """ConfigError (one line) for a name in ``evaluate.strategies`` that is no decoding strategy."""
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigError(f"evaluate.strategies: unknown decoding strategy {s!r} "
                              f"(expected some of {', '.join(STRATEGIES)})")


def token_accuracy(targets: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> float:
    """Share of target positions (each target's tokens, then ``<eos>``) where the output, followed
    by its ``<eos>``, holds the same token: a missing, extra or shifted token counts as wrong
    from there on, a too-long output is wrong at the target's ``<eos>``."""
    right = total = 0
    for t, o in zip(targets, outputs, strict=True):
        t, o = [*t, EOS_ID], [*o, EOS_ID]
        right += sum(a == b for a, b in zip(t, o))
        total += len(t)
    if total == 0:
        raise ValueError("token_accuracy needs at least one target")
    return right / total


def reconstruction_accuracy(model: torch.nn.Module, split: TokenSplit, mu: np.ndarray, n_docs: int) -> dict[str, Any]:
    """``recon_token_acc`` of the greedy decoding of E[z|x] on the first ``n_docs`` documents,
    with ``recon_docs``, the number used; empty when there are none."""
    n = min(n_docs, len(split))
    if n == 0:
        return {}
    targets = [s.tolist() for s in split.seqs[:n]]
    # one token beyond the longest target is enough to judge an output that does not stop
    decoding = Decoding("greedy", max_tokens=max(len(t) for t in targets) + 1)
    outputs = decode_ids(model, torch.from_numpy(mu[:n]).float(), decoding)
    return {"recon_token_acc": token_accuracy(targets, outputs), "recon_docs": n}


def write_samples_by_strategy(out: Path, model: torch.nn.Module, tokenizer: Any, split: TokenSplit,
                              scores: VAEScores, *, strategies: Sequence[str], num_examples: int,
                              max_tokens: int, seed: int) -> list[str]:
    """samples_by_strategy.csv: ``kind,doc_id,input,<one column per strategy>``; the file names.

    ``reconstruction`` rows decode E[z|x] of the first ``num_examples`` documents, ``prior``
    rows decode z ~ N(0, I) (seeded by ``seed``), each row's z with every strategy, so that the
    columns differ only by the decoding. Nothing is written without strategies or examples.
    """
    from vaepipe.stages import plots

    n = min(num_examples, len(split))
    if not strategies or num_examples == 0:
        return []
    mu = torch.from_numpy(scores.mu[:n]).float()
    prior = torch.randn(num_examples, mu.shape[1], generator=torch.Generator().manual_seed(seed))
    z = torch.cat([mu, prior])
    texts = {s: tokenizer.decode_batch(decode_ids(model, z, replace(STRATEGY_DECODINGS[s], max_tokens=max_tokens,
                                                                    seed=seed)), skip_special_tokens=True)
             for s in strategies}
    inputs = tokenizer.decode_batch([s.tolist() for s in split.seqs[:n]], skip_special_tokens=True)
    rows = [["reconstruction", split.doc_ids[i], inputs[i]] for i in range(n)]
    rows += [["prior", "", ""] for _ in range(num_examples)]
    for i, row in enumerate(rows):
        row += [texts[s][i] for s in strategies]
    plots.write_csv(out / "samples_by_strategy.csv", ["kind", "doc_id", "input", *strategies], rows)
    return ["samples_by_strategy.csv"]


def _load(model_dir: str, kind: str, key: str, device: torch.device, tok_hash: str) -> tuple[Any, dict]:
    from vaepipe.ml.checkpoint import load_model

    model, config = load_model(model_dir, "best", device)
    if model.cfg.kind != kind:
        raise InputError(f"{model_dir}: {key} must hold a kind '{kind}' model, found '{model.cfg.kind}'")
    trained_with = config.get("tokenizer_hash")
    if trained_with and trained_with != tok_hash:
        raise InputError(f"{model_dir}/config.json: trained with tokenizer {trained_with[:12]}, but "
                         f"paths.tokenizer holds {tok_hash[:12]} (retrain, or point paths.tokenizer at its tokenizer)")
    return model, config


def run(params: Params, tracker: Tracker | None = None, *,
        make_tracker: TrackerFactory | None = None, wait: bool = False) -> EvalResult:
    """Evaluate paths.model (and paths.baseline when present) on ``evaluate.splits``.

    The metrics and figures are added to the training run (run.json), through ``tracker`` or
    one that ``make_tracker`` makes when ``tracking.enabled``. Holds the write lock of
    ``paths.reports`` while it runs.
    """
    with staged(params, "evaluate") as params, output_locks(stage_outputs(params, "evaluate"), wait=wait):
        return _run(params, tracker, make_tracker)


def _run(params: Params, tracker: Tracker | None, make_tracker: TrackerFactory | None) -> EvalResult:
    from vaepipe.stages import tokenize, plots

    ev, paths = params.evaluate, params.paths
    check_strategies(ev.strategies)
    device = resolve_device(ev.device, "evaluate.device")
    if not (Path(paths.model) / "config.json").is_file():
        raise InputError(f"{paths.model}: no trained model (paths.model; run `vaepipe train` first)")
    tokenizer = tokenize.load_tokenizer(paths.tokenizer)
    tok_hash = tokenize.tokenizer_hash(paths.tokenizer)
    model, _ = _load(paths.model, "vae", "paths.model", device, tok_hash)
    if ev.probe_labels:  # a label column the corpus lacks fails before the long scoring
        probes.check_label_columns(paths.corpus, ev.probe_labels)
    lm = None
    if (Path(paths.baseline) / "config.json").is_file():
        lm, _ = _load(paths.baseline, "lm", "paths.baseline", device, tok_hash)
    else:
        log.info("%s: no LM baseline, lm_nll not reported", paths.baseline)

    splits: dict[str, dict[str, Any]] = {}
    headline: tuple[TokenSplit, VAEScores] | None = None
    for i, name in enumerate(ev.splits):
        split = read_split(paths.tokens, name, ev.max_docs)
        gen = torch.Generator(device=device).manual_seed(params.seed + i)
        log.info("evaluate %s: %d docs, K=%d, device %s", name, len(split), ev.iw_samples, device)
        scores = score_vae(model, split, iw_samples=ev.iw_samples, batch_tokens=ev.batch_tokens,
                           device=device, bf16=ev.bf16, generator=gen,
                           iw_ks=iw_curve_ks(ev.iw_samples) if headline is None else ())
        lm_ll = None if lm is None else score_lm(lm, split, batch_tokens=ev.batch_tokens, device=device, bf16=ev.bf16)
        texts = tokenizer.decode_batch([s.tolist() for s in split.seqs], skip_special_tokens=True)
        splits[name] = split_metrics(scores, split.lengths, texts, iw_samples=ev.iw_samples,
                                     mi_batch_size=ev.mi_batch_size, seed=params.seed + 100 * i, lm_log_px=lm_ll)
        log.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in _scalars(splits[name]).items()))
        if headline is None:
            headline = (split, scores)
    assert headline is not None  # config validation guarantees at least one split

    splits[ev.splits[0]] |= reconstruction_accuracy(model, headline[0], headline[1].mu, ev.recon_docs)
    metrics = dict(splits[ev.splits[0]])
    probe_section = run_probes(params, model, device)
    if probe_section:
        metrics["probes"] = probe_section
    with atomic_dir(paths.reports) as out:
        files = plots.write_reports(out, model, tokenizer, *headline, num_examples=ev.num_examples,
                                    max_len=params.tokenize.max_tokens, device=device, seed=params.seed)
        files += write_iw_curve(out, headline[1])
        files += write_samples_by_strategy(out, model, tokenizer, *headline, strategies=ev.strategies,
                                           num_examples=ev.num_examples, max_tokens=params.tokenize.max_tokens,
                                           seed=params.seed)
        write_json(out / "metrics.json", {**metrics, "headline_split": ev.splits[0], "splits": splits})
        files.append("metrics.json")
    reports = Path(paths.reports)
    split_rows = {name: int(m["n_docs"]) for name, m in splits.items()}
    _log_to_training_run(params, tracker, make_tracker, splits, [reports / f for f in files],
                         split_rows=split_rows, description=run_description(ev.splits[0], metrics, reports),
                         extra_metrics=probes.tracked(probe_section))
    return EvalResult(metrics, splits, reports, files)


def run_probes(params: Params, model: torch.nn.Module, device: torch.device) -> dict[str, dict[str, Any]]:
    """The downstream section (vaepipe/stages/probes.py): VAE means vs LSA on the test split."""
    ev = params.evaluate
    return probes.downstream(model, ev.probe_labels, corpus_dir=params.paths.corpus, tokens_dir=params.paths.tokens,
                             max_docs=ev.probe_max_docs, min_docs=ev.probe_min_docs, batch_tokens=ev.batch_tokens,
                             device=device, seed=params.seed)


# the run description's headline table: (metric key, what the row is called)
DESCRIPTION_ROWS = (("iw_nll", "IW-NLL (nats/doc)"), ("lm_nll", "LM NLL (nats/doc)"),
                    ("gap_vs_lm", "gap vs LM (nats/doc)"), ("kl", "KL"), ("mi", "MI"),
                    ("active_units", "AU"), ("ppl", "ppl"))
DESCRIPTION_EXAMPLES = 5


def run_description(split: str, metrics: dict[str, Any], reports: Path) -> str:
    """The markdown an MLflow run page shows on top: the headline split's metrics table (gap
    with its 95% interval), then the first reconstructions and prior samples of ``reports``."""
    lines = [f"### Evaluation on `{split}` ({metrics.get('n_docs', '?')} docs, K={metrics.get('iw_samples', '?')})",
             "", "| metric | value |", "|---|---|"]
    for key, label in DESCRIPTION_ROWS:
        value = metrics.get(key)
        if not isinstance(value, (int, float)):
            continue
        cell = f"{value:.4g}"
        ci = metrics.get(f"{key}_ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2:
            cell += f" (95% CI {ci[0]:.4g} to {ci[1]:.4g})"
        lines.append(f"| {label} | {cell} |")
    for title, name in (("Reconstructions", "reconstructions.txt"), ("Prior samples", "prior_samples.txt")):
        blocks = _example_blocks(reports / name)[:DESCRIPTION_EXAMPLES]
        if blocks:
            lines += ["", f"### {title}", "", "```", "\n\n".join(blocks), "```"]
    return "\n".join(lines) + "\n"


def _example_blocks(path: Path) -> list[str]:
    """The examples of a reconstructions/prior-samples report: blank-line separated, no comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    blocks = ["\n".join(ln for ln in b.splitlines() if not ln.startswith("#")).strip()
              for b in text.split("\n\n")]
    return [b for b in blocks if b]


def _scalars(m: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of one split's metrics; a ``*_ci95`` [low, high] becomes ``*_ci95_low/_high``."""
    out: dict[str, float] = {}
    for k, v in m.items():
        if k.endswith("_ci95") and isinstance(v, (list, tuple)) and len(v) == 2:
            out |= {f"{prefix}{k}_low": float(v[0]), f"{prefix}{k}_high": float(v[1])}
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = float(v)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def tracked_metrics(splits: dict[str, dict[str, Any]]) -> dict[str, float]:
    """What goes to MLflow: every split's metrics as ``SPLIT_KEY``, plus the headline (first)
    split's ``gap_vs_lm`` / ``gap_vs_lm_ci95_low`` / ``_high`` and ``recon_token_acc`` without a prefix."""
    flat = {k: v for name, m in splits.items() for k, v in _scalars(m, f"{name}_").items()}
    headline = next(iter(splits.values()), {})
    flat |= {k: v for k, v in _scalars(headline).items() if k.startswith(UNPREFIXED)}
    return flat


def _log_to_training_run(params: Params, tracker: Tracker | None, make_tracker: TrackerFactory | None,
                         splits: dict[str, dict[str, Any]],
                         files: list[Path], *, split_rows: dict[str, int] | None = None,
                         description: str | None = None, extra_metrics: dict[str, float] | None = None) -> None:
    """Add the figures to the MLflow run that trained the model (run.json), if there is one,
    with the evaluated token splits as its datasets and ``description`` as its description."""
    from vaepipe.core.run_info import read_run_info

    info = read_run_info(params.paths.model)
    run_id = info.get("run_id")
    if not run_id or (tracker is None and not params.tracking.enabled):
        log.info("no tracking run to log the evaluation to")
        return
    if tracker is None:
        uri = info.get("tracking_uri") or params.tracking.uri
        # the run lives where it was logged, even when params now name another server
        tracker = tracker_for(params.replace(tracking={"uri": uri}), make_tracker)
    try:
        tracker.start(run_id=run_id)
    except VaepipeError as e:
        # the reports are written and are the stage's output; a tracking store that is down or
        # lost the run must not turn a finished evaluation into a failed one
        log.warning("evaluation not logged to MLflow run %s: %s (reports are in %s)", run_id, e,
                    params.paths.reports)
        return
    try:
        tracker.log_metrics(tracked_metrics(splits) | (extra_metrics or {}))
        for split, rows in (split_rows or {}).items():
            tracker.log_dataset(f"tokens/{split}", params.paths.tokens,
                                context=SPLIT_CONTEXT.get(split, split), rows=rows)
        for f in files:
            tracker.log_artifact(f, "evaluation")
        if description:
            tracker.set_description(description)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
