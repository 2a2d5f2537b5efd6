"""The estimators of text-VAE evaluation, as pure tensor functions (no model, no I/O).

Conventions: ``mu``/``logvar`` are diagonal-Gaussian posterior parameters ``(N, Z)``;
log-densities are in nats and summed over the latent dimensions; nothing here depends on a
device or dtype beyond what the inputs bring (callers pass float32 or float64).

- ``iw_log_marginal``: the importance-weighted estimate of log p(x) from K log weights
  (Burda et al. 2016; He et al. 2019 use K = 500).
- ``mutual_info_aggregate`` (``mi``): I(x;z) under q(x,z) = p_data(x) q(z|x), with the
  aggregate posterior q(z) = mean_n q(z|x_n) over the *whole evaluated set*.
- ``mutual_info_minibatch`` (``mi_minibatch``): the same estimator restricted to one
  minibatch, as ``calc_mi`` in vae-lagging-encoder (He et al. 2019); it cannot exceed about
  log(batch size), so it saturates for informative latents.
- ``active_units``: dimensions whose posterior mean varies across the data,
  Cov_x(E_q[z|x]) > 0.01 (Burda et al. 2016).
- ``perplexity`` / ``bits_per_byte``: from a total NLL in nats.
- ``iw_log_marginal_prefixes``: the IW estimate at several K from prefixes of the same draws.
- ``bootstrap_mean_ci``: a percentile bootstrap interval of a mean (paired, when the values
  are per-document differences of two models).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vaepipe.core.constants import AU_THRESHOLD

LOG_2PI = math.log(2.0 * math.pi)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension (broadcasts)."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per dimension, in closed form: (..., Z)."""
    return 0.5 * (mu.pow(2) + torch.exp(logvar) - 1.0 - logvar)


def neg_entropy(logvar: torch.Tensor) -> torch.Tensor:
    """E_q[log q(z|x)] of a diagonal Gaussian, in closed form: (...,)."""
    return -0.5 * (logvar.shape[-1] * LOG_2PI + (1.0 + logvar).sum(-1))


def sample_diag(mu: torch.Tensor, logvar: torch.Tensor, k: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """k reparameterised draws per row: (N, Z) -> (N, k, Z)."""
    eps = torch.randn((mu.shape[0], k, mu.shape[1]), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps


def iw_log_weights(log_px_given_z: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
                   ) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x): (N, k) from (N, k), (N, k, Z), (N, Z)."""
    log_q = log_normal_diag(z, mu.unsqueeze(1), logvar.unsqueeze(1))
    return log_px_given_z + log_standard_normal(z) - log_q


def iw_log_marginal(log_w: torch.Tensor) -> torch.Tensor:
    """log p(x) ≈ logsumexp_k log w_k - log K, per row: (N, K) -> (N,).

    A stochastic lower bound on log p(x) whose expectation rises towards log p(x) as K grows
    (Burda et al. 2016); K = 1 gives a one-sample ELBO.
    """
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


def iw_log_marginal_prefixes(log_w: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """The IW estimate of log p(x) using the first k of the K log weights, for each k: (N, K) -> (N, len(ks)).

    The draws are i.i.d., so a prefix of k of them is a K = k estimate in its own right: the
    curve over k costs no extra decoder pass. Each k must lie in 1..K.
    """
    if any(not 1 <= k <= log_w.shape[-1] for k in ks):
        raise ValueError(f"every k must lie in 1..{log_w.shape[-1]}, got {list(ks)}")
    if not ks:
        return log_w.new_empty((*log_w.shape[:-1], 0))
    return torch.stack([iw_log_marginal(log_w[..., :k]) for k in ks], dim=-1)


def bootstrap_mean_ci(values: np.ndarray, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
                      ) -> tuple[float, float]:
    """Percentile bootstrap interval of ``values.mean()``: (low, high).

    Resample ``values`` with replacement ``resamples`` times (one
    ``numpy.random.default_rng(seed).integers(0, N, N)`` draw per resample, in order), take each
    resample's mean and return the (1 - level)/2 and (1 + level)/2 percentiles (numpy's linear
    interpolation). Given per-document *differences* of two models scored on the same documents
    this is the paired bootstrap: documents are resampled, not the two models separately.
    Memory O(N), whatever ``resamples``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_mean_ci needs a non-empty 1-D array")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError("bootstrap_mean_ci needs resamples >= 1 and 0 < level < 1")
    rng = np.random.default_rng(seed)
    means = np.fromiter((x[rng.integers(0, x.size, x.size)].mean() for _ in range(resamples)),
                        dtype=np.float64, count=resamples)
    low, high = np.percentile(means, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(low), float(high)


# elements of one (chunk, N, Z) intermediate in the aggregate-posterior sums: 2^22 float64 is
# 32 MiB, a few of which are alive at once
_AGG_ELEMENTS = 1 << 22


def _log_aggregate_posterior(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                             chunk: int | None = None) -> torch.Tensor:
    """log q(z_i) with q(z) = mean_n N(z; mu_n, var_n): (M, Z) -> (M,), memory O(chunk * N * Z).

    Chunked over the *query* points, so N posteriors x any number of queries fit in memory;
    ``chunk=None`` sizes the chunks to a fixed memory budget.
    """
    n = mu.shape[0]
    if chunk is None:
        chunk = max(1, _AGG_ELEMENTS // max(1, n * mu.shape[1]))
    out = []
    for start in range(0, z.shape[0], chunk):
        zc = z[start : start + chunk].unsqueeze(1)  # (c, 1, Z)
        log_dens = log_normal_diag(zc, mu.unsqueeze(0), logvar.unsqueeze(0))  # (c, N)
        out.append(torch.logsumexp(log_dens, dim=1) - math.log(n))
    return torch.cat(out)


def mutual_info_aggregate(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    samples_per_point: int = 1,
    generator: torch.Generator | None = None,
    chunk: int | None = None,
    analytic_entropy: bool = False,
) -> float:
    """I(x;z) = E_x E_q(z|x)[log q(z|x) - log q(z)] with q(z) the aggregate posterior of all N.

    Draws ``samples_per_point`` z ~ q(z|x_n) per point and scores each against all N
    posteriors (logsumexp, chunked). By default log q(z|x) is evaluated at the *same* draws,
    so the per-draw noise of both terms cancels and the estimate never exceeds log N (the
    mixture holds q(z|x_n) / N); ``analytic_entropy`` uses the closed-form E_q[log q(z|x)]
    instead, as He et al.'s ``calc_mi`` does (unbiased too, noisier). Used for ``mi``.
    """
    mu64, lv64 = mu.double(), logvar.double()
    z = sample_diag(mu64, lv64, samples_per_point, generator)  # (N, S, Z)
    if analytic_entropy:
        log_q_own = neg_entropy(lv64).mean()
    else:
        log_q_own = log_normal_diag(z, mu64.unsqueeze(1), lv64.unsqueeze(1)).mean()
    log_qz = _log_aggregate_posterior(z.reshape(-1, mu.shape[1]), mu64, lv64, chunk)
    return float(log_q_own - log_qz.mean())


def mutual_info_minibatch(
    mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None
) -> float:
    """He et al. 2019 ``calc_mi`` on one minibatch: q(z) is the mixture of this batch only.

    Their formula exactly: closed-form negative entropy minus log q(z) at one draw per point,
    with q(z) the mixture of this batch's posteriors, so its expectation cannot exceed
    log(batch size). The reported ``mi_minibatch`` is the size-weighted mean over the
    evaluation batches, like vae-lagging-encoder's test loop.
    """
    return mutual_info_aggregate(mu, logvar, samples_per_point=1, generator=generator,
                                 chunk=max(1, mu.shape[0]), analytic_entropy=True)


def posterior_mean_variance(mu: torch.Tensor) -> torch.Tensor:
    """Cov_x(E_q[z|x]) per dimension: the unbiased variance of the posterior means, (Z,).

    Two-pass in float64, as vae-lagging-encoder's ``calc_au`` (which divides by N - 1).
    """
    mu = mu.double()
    if mu.shape[0] < 2:
        return torch.zeros(mu.shape[1], dtype=torch.float64)
    return mu.var(dim=0, unbiased=True)


def active_units(mu: torch.Tensor, threshold: float = AU_THRESHOLD) -> tuple[int, torch.Tensor]:
    """(number of active dimensions, per-dimension variance of the posterior means)."""
    var = posterior_mean_variance(mu)
    return int((var > threshold).sum()), var


def perplexity(total_nll: float, count: int) -> float:
    """exp(total NLL in nats / count); count is tokens (with <eos>) or words."""
    if count <= 0:
        raise ValueError("perplexity needs a positive count")
    return math.exp(total_nll / count)


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Total NLL in bits per UTF-8 byte of the text: comparable across vocabularies."""
    if n_bytes <= 0:
        raise ValueError("bits_per_byte needs a positive byte count")
    return total_nll / math.log(2.0) / n_bytes
