"""The evaluation estimators against values computed another way (closed forms, torch.distributions)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from vaepipe.ml import estimators as est



def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_log_densities_match_torch_distributions():
    g = gen()
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    mu = torch.randn(7, 5, generator=g, dtype=torch.float64)
    logvar = torch.randn(7, 5, generator=g, dtype=torch.float64)
    ref = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(est.log_normal_diag(z, mu, logvar), ref)
    torch.testing.assert_close(est.log_standard_normal(z), Normal(0.0, 1.0).log_prob(z).sum(-1))
    kl_ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(est.gaussian_kl_per_dim(mu, logvar), kl_ref)
    assert (est.gaussian_kl_per_dim(mu, logvar) >= 0).all()
    torch.testing.assert_close(est.neg_entropy(logvar), -Normal(mu, torch.exp(0.5 * logvar)).entropy().sum(-1))


def test_sample_diag_moments():
    mu = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    logvar = torch.log(torch.tensor([[0.25, 4.0]], dtype=torch.float64))
    z = est.sample_diag(mu, logvar, 200_000, gen(1))
    assert z.shape == (1, 200_000, 2)
    torch.testing.assert_close(z.mean(1), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(1), torch.exp(logvar), atol=0.03, rtol=0)


# A linear-Gaussian "VAE" whose marginal is known exactly:
# p(z) = N(0, 1), p(x|z) = N(a z, s^2)  =>  p(x) = N(0, a^2 + s^2),
# exact posterior p(z|x) = N(a x / (a^2 + s^2), s^2 / (a^2 + s^2)).
A, S = 2.0, 0.5


def linear_gaussian_log_w(x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    z = est.sample_diag(mu, logvar, k, gen(seed))  # (N, k, 1)
    log_px_z = Normal(A * z[..., 0], S).log_prob(x.unsqueeze(1))  # (N, k)
    return est.iw_log_weights(log_px_z, z, mu, logvar)


def exact_log_px(x: torch.Tensor) -> torch.Tensor:
    return Normal(0.0, math.sqrt(A * A + S * S)).log_prob(x)


def test_iw_with_the_true_posterior_is_exact_for_any_k():
    x = torch.linspace(-3, 3, 11, dtype=torch.float64)
    post_var = S * S / (A * A + S * S)
    mu = (A * x / (A * A + S * S)).unsqueeze(1)
    logvar = torch.full_like(mu, math.log(post_var))
    for k in (1, 7):
        # every weight equals p(x) when q is the exact posterior: zero variance
        torch.testing.assert_close(est.iw_log_marginal(linear_gaussian_log_w(x, mu, logvar, k, 3)), exact_log_px(x))


def test_iw_bound_tightens_with_k_and_converges_to_log_px():
    x = torch.linspace(-3, 3, 41, dtype=torch.float64)
    # a deliberately poor posterior: shrunk mean, too wide
    mu = (0.5 * A * x / (A * A + S * S)).unsqueeze(1)
    logvar = torch.full_like(mu, math.log(0.3))
    exact = exact_log_px(x)
    means = []
    for k in (1, 10, 100, 5000):
        log_w = linear_gaussian_log_w(x, mu, logvar, k, seed=k)
        iw = est.iw_log_marginal(log_w)
        # Jensen: log mean w >= mean log w for the same draws, deterministically
        assert (iw >= log_w.mean(-1) - 1e-12).all()
        means.append(float((iw - exact).mean()))
    assert means == sorted(means), means  # tighter on average as K grows
    assert means[0] < -0.5  # the ELBO (K = 1) is visibly loose here ...
    assert abs(means[-1]) < 0.02  # ... and K = 5000 is close to the exact log p(x)


def test_iw_log_marginal_is_stable_for_large_weights():
    log_w = torch.tensor([[-1000.0, -1000.0], [1000.0, 1000.0 + math.log(3)]], dtype=torch.float64)
    out = est.iw_log_marginal(log_w)
    torch.testing.assert_close(out, torch.tensor([-1000.0, 1000.0 + math.log(2.0)], dtype=torch.float64))


def test_mi_two_well_separated_clusters_is_log2():
    n = 2000
    mu = torch.zeros(n, 3, dtype=torch.float64)
    mu[: n // 2, 0] = 20.0
    mu[n // 2 :, 0] = -20.0
    logvar = torch.zeros_like(mu)
    mi = est.mutual_info_aggregate(mu, logvar, samples_per_point=2, generator=gen(0))
    assert mi == pytest.approx(math.log(2.0), abs=0.01)
    assert mi <= math.log(n)
    # He et al.'s form (closed-form entropy) estimates the same quantity, with more noise
    mi_he = est.mutual_info_aggregate(mu, logvar, samples_per_point=8, generator=gen(1), analytic_entropy=True)
    assert mi_he == pytest.approx(math.log(2.0), abs=0.05)


def test_mi_linear_gaussian_matches_closed_form():
    # x ~ N(0, s^2), q(z|x) = N(x, sigma^2): I(x; z) = 0.5 log(1 + s^2 / sigma^2)
    s, sigma, n = 1.0, 0.5, 3000
    x = torch.randn(n, 1, generator=gen(5), dtype=torch.float64) * s
    logvar = torch.full_like(x, math.log(sigma**2))
    mi = est.mutual_info_aggregate(x, logvar, samples_per_point=4, generator=gen(6), chunk=500)
    assert mi == pytest.approx(0.5 * math.log(1 + s**2 / sigma**2), abs=0.04)


def test_mi_is_zero_when_the_posterior_ignores_x():
    mu = torch.full((1000, 4), 0.3, dtype=torch.float64)
    logvar = torch.full_like(mu, -0.7)
    assert abs(est.mutual_info_aggregate(mu, logvar, generator=gen(2))) < 0.05


def test_minibatch_mi_cannot_exceed_log_batch_size_but_whole_set_mi_can():
    # 4096 distinct, perfectly separated posteriors: the true MI is log 4096
    n, b = 4096, 64
    mu = torch.randn(n, 2, generator=gen(7), dtype=torch.float64) * 1000.0
    logvar = torch.full_like(mu, -4.0)
    g = gen(8)
    batches = [est.mutual_info_minibatch(mu[i : i + b], logvar[i : i + b], generator=g) for i in range(0, n, b)]
    mean_mb = sum(batches) / len(batches)
    # closed-form entropy minus one draw: unbiased, noise sd about 1/b here, so 5 sd of slack
    assert mean_mb <= math.log(b) + 0.08
    assert mean_mb == pytest.approx(math.log(b), abs=0.08)  # saturated
    whole = est.mutual_info_aggregate(mu, logvar, generator=gen(9), chunk=512)
    assert whole == pytest.approx(math.log(n), abs=0.1)
    assert whole <= math.log(n) + 1e-9  # paired draws: never above log N
    assert whole > mean_mb + 3.0


def test_active_units_on_known_variances():
    n = 20_000
    stds = torch.tensor([1.0, 0.3, 0.2, 0.05, 0.0], dtype=torch.float64)  # variances 1, .09, .04, .0025, 0
    mu = torch.randn(n, 5, generator=gen(3), dtype=torch.float64) * stds + 7.0
    au, var = est.active_units(mu)
    assert au == 3
    torch.testing.assert_close(var, stds**2, atol=0.01, rtol=0.05)
    # the threshold is strict and configurable
    assert est.active_units(mu, threshold=0.05)[0] == 2
    assert est.active_units(mu[:1])[0] == 0  # one point has no spread


def test_perplexity_and_bits_per_byte():
    nll = torch.tensor([3.0, 5.5, 1.25], dtype=torch.float64)
    tokens = 17
    assert est.perplexity(float(nll.sum()), tokens) == pytest.approx(float(torch.exp(nll.sum() / tokens)))
    # bits per byte: total nats -> bits, per byte
    assert est.bits_per_byte(float(nll.sum()), 9) == pytest.approx(float(nll.sum()) / 9 * math.log2(math.e))
    with pytest.raises(ValueError):
        est.perplexity(1.0, 0)
    with pytest.raises(ValueError):
        est.bits_per_byte(1.0, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=40), min_size=1, max_size=8)
       .filter(lambda rows: len({len(r) for r in rows}) == 1),
       st.floats(-1e3, 1e3))
def test_iw_log_marginal_properties(rows, shift):
    log_w = torch.tensor(rows, dtype=torch.float64)
    iw = est.iw_log_marginal(log_w)
    # between the ELBO-like mean and the best weight; shifting every weight shifts the estimate
    assert (iw >= log_w.mean(-1) - 1e-9).all()
    assert (iw <= log_w.max(-1).values + 1e-9).all()
    torch.testing.assert_close(est.iw_log_marginal(log_w + shift), iw + shift)
