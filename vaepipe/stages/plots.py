"""Report artifacts of the evaluate stage: plot data (CSV, for ``dvc plots``), PNG figures and
qualitative text (reconstructions, prior samples, interpolations; Bowman et al. 2016).

matplotlib is imported lazily and used through its object API with the Agg canvas, so no
global backend is switched and nothing needs a display.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vaepipe.core.constants import AU_THRESHOLD
from vaepipe.core.io import atomic_write_bytes, atomic_write_text
from vaepipe.ml import estimators as est
from vaepipe.ml.decoding import Decoding, decode_ids

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from vaepipe.ml.data import TokenSplit
    from vaepipe.stages.evaluate import VAEScores

log = logging.getLogger(__name__)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """``header`` and ``rows`` as RFC 4180 CSV (CRLF line ends). The CRLF matters: Python 3.11's
    writer quotes a field only for the characters of its line terminator, so with a bare "\n"
    a decoded sample that holds a carriage return was written unquoted and split its row in two
    for any reader."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def pca_2d(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project centred posterior means on their first two principal axes (exact SVD).

    Returns the (N, 2) coordinates and the share of variance of each axis; a 1-D latent gets
    a zero second axis.
    """
    x = torch.from_numpy(np.asarray(mu, dtype=np.float64))
    x = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    q = min(2, vh.shape[0])
    coords = np.zeros((x.shape[0], 2))
    coords[:, :q] = (x @ vh[:q].T).numpy()
    var = s.pow(2)
    share = np.zeros(2)
    if float(var.sum()) > 0:
        share[:q] = (var[:q] / var.sum()).numpy()
    return coords, share


def _have_matplotlib() -> bool:
    # matplotlib is an optional extra ([plots]); the CSVs carry the same data
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def plot_kl_per_dim(path: Path, kl: np.ndarray, mu_var: np.ndarray, threshold: float) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 0.25 * len(kl) + 1.5), 3.2))
    ax = fig.add_subplot()
    active = mu_var > threshold
    ax.bar(np.arange(len(kl)), kl, color=np.where(active, "tab:blue", "tab:gray"))
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    ax.set_title(f"KL per dimension: {int(active.sum())}/{len(kl)} active (Cov(E[z|x]) > {threshold})")
    fig.tight_layout()
    atomic_write_bytes(path, _png(fig))


def plot_latent_pca(path: Path, coords: np.ndarray, share: np.ndarray, n_tokens: np.ndarray) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    pts = ax.scatter(coords[:, 0], coords[:, 1], c=n_tokens, s=6, cmap="viridis", alpha=0.7)
    fig.colorbar(pts, ax=ax, label="tokens")
    ax.set_xlabel(f"PC1 ({100 * share[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * share[1]:.1f}% of variance)")
    ax.set_title("posterior means E[z|x], test set")
    fig.tight_layout()
    atomic_write_bytes(path, _png(fig))


def _decode(tokenizer: Tokenizer, seqs: list[list[int]]) -> list[str]:
    return tokenizer.decode_batch(seqs, skip_special_tokens=True)


@torch.inference_mode()
def write_examples(out: Path, model: torch.nn.Module, tokenizer: Tokenizer, split: TokenSplit,
                   scores: VAEScores, *, num_examples: int, max_len: int, device: torch.device,
                   seed: int) -> list[str]:
    """reconstructions.txt, prior_samples.txt, interpolations.txt (num_examples each).

    Decoded with ``vaepipe.ml.decoding`` (greedy, and sampling at temperature 1 seeded with
    ``seed``), the decoding that ``vaepipe.load``, the CLI verbs and the MLflow model use.

    All three are always written (dvc.yaml declares them as outputs), with a note when there
    is nothing to show.
    """
    files = ["reconstructions.txt", "prior_samples.txt", "interpolations.txt"]
    n = min(num_examples, len(split))
    if n == 0:
        for f in files:
            atomic_write_text(out / f, "# no examples: evaluate.num_examples is 0\n")
        return files
    gen = torch.Generator(device=device).manual_seed(seed)
    zdim = scores.mu.shape[1]
    mu = torch.from_numpy(scores.mu[:n]).float().to(device)
    lv = torch.from_numpy(scores.logvar[:n]).float().to(device)
    z_post = est.sample_diag(mu, lv, 1, gen)[:, 0]
    greedy_dec = Decoding("greedy", max_tokens=max_len)
    sample_dec = Decoding("sample", max_tokens=max_len, seed=seed)
    inputs = _decode(tokenizer, [s.tolist() for s in split.seqs[:n]])
    greedy = _decode(tokenizer, decode_ids(model, mu, greedy_dec))
    sampled = _decode(tokenizer, decode_ids(model, z_post, sample_dec))
    lines = ["# x: test sentence; mean: greedy decoding of E[z|x]; sample: z ~ q(z|x), sampled decoding", ""]
    for x, g, s in zip(inputs, greedy, sampled):
        lines += [f"x:      {x}", f"mean:   {g}", f"sample: {s}", ""]
    atomic_write_text(out / "reconstructions.txt", "\n".join(lines))

    z_prior = torch.randn(n, zdim, generator=gen, device=device)
    p_greedy = _decode(tokenizer, decode_ids(model, z_prior, greedy_dec))
    # another seed than the reconstructions': the two sets of draws stay independent
    p_sampled = _decode(tokenizer, decode_ids(model, z_prior, Decoding("sample", max_tokens=max_len, seed=seed + 1)))
    lines = ["# z ~ N(0, I); greedy and sampled decoding of the same z", ""]
    for g, s in zip(p_greedy, p_sampled):
        lines += [f"greedy: {g}", f"sample: {s}", ""]
    atomic_write_text(out / "prior_samples.txt", "\n".join(lines))

    if len(split) < 2:
        atomic_write_text(out / "interpolations.txt", "# no interpolation: the split has one document\n")
    else:
        # between the means of the first two test sentences, greedy decoding (Bowman et al. 2016)
        steps = max(2, num_examples)
        ends = torch.from_numpy(scores.mu[:2]).float().to(device)
        t = torch.linspace(0, 1, steps, device=device)[:, None]
        z_path = (1 - t) * ends[0] + t * ends[1]
        path = _decode(tokenizer, decode_ids(model, z_path, greedy_dec))
        ends_text = _decode(tokenizer, [s.tolist() for s in split.seqs[:2]])
        lines = [f"# from: {ends_text[0]}", f"# to:   {ends_text[1]}",
                 "# greedy decoding of z = (1 - t) E[z|x_from] + t E[z|x_to]", ""]
        lines += [f"t={float(ti):.2f}  {s}" for ti, s in zip(t[:, 0], path)]
        atomic_write_text(out / "interpolations.txt", "\n".join(lines) + "\n")
    return files


def write_reports(out: Path, model: torch.nn.Module, tokenizer: Tokenizer, split: TokenSplit,
                  scores: VAEScores, *, num_examples: int, max_len: int, device: torch.device,
                  seed: int, au_threshold: float = AU_THRESHOLD) -> list[str]:
    """Plot data, figures and sample texts of the headline split into ``out``; the file names."""
    kl = scores.kl_per_dim.mean(0)
    mu_var = est.posterior_mean_variance(torch.from_numpy(scores.mu)).numpy()
    write_csv(out / "kl_per_dim.csv", ["dim", "kl", "mu_var", "active"],
              [[d, float(kl[d]), float(mu_var[d]), int(mu_var[d] > au_threshold)] for d in range(len(kl))])
    coords, share = pca_2d(scores.mu)
    write_csv(out / "latent_pca.csv", ["x", "y", "doc_id", "n_tokens"],
              [[float(c[0]), float(c[1]), d, int(n)] for c, d, n in zip(coords, split.doc_ids, split.lengths)])
    files = ["kl_per_dim.csv", "latent_pca.csv"]
    if _have_matplotlib():
        plot_kl_per_dim(out / "kl_per_dim.png", kl, mu_var, au_threshold)
        plot_latent_pca(out / "latent_pca.png", coords, share, split.lengths)
        files += ["kl_per_dim.png", "latent_pca.png"]
    else:
        log.warning("matplotlib is not installed: the figures are written as CSV only "
                    "(pip install 'vaepipe[plots]' for the PNGs)")
    return files + write_examples(out, model, tokenizer, split, scores, num_examples=num_examples,
                                  max_len=max_len, device=device, seed=seed)
