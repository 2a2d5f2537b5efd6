"""evaluate's numbers pinned bit for bit: ``score_vae`` against the reference loop (as it was at
721c28e: each draw chunk of a length group through one decoder call), and metrics.json of the
fixture model against metrics computed from it. A change that shares work in evaluate must keep
these passing: even regrouping the decoder's rows moves some log-likelihoods by one ulp (the
matrix kernels sum a row differently at another row count or offset), which these catch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_evaluate import CPU, synthetic_split, tiny_vae
from vaepipe.ml import estimators as est
from vaepipe.ml.data import TokenSplit, iter_batches, read_split
from vaepipe.stages import evaluate


@torch.inference_mode()
def reference_score_vae(model, split: TokenSplit, *, iw_samples: int, batch_tokens: int,
                        generator: torch.Generator, iw_ks=()) -> evaluate.VAEScores:
    """score_vae of 721c28e, kept as the reference: the same draws in the same order, and each
    draw chunk of a length group scored by one decoder call."""
    ks = tuple(iw_ks)
    n, zdim = len(split), model.cfg.latent_dim
    log_px, recon, by_k = np.empty(n), np.empty(n), np.empty((n, len(ks)))
    mu_all, lv_all = np.empty((n, zdim)), np.empty((n, zdim))
    for idx, ids, lengths in iter_batches(split, max(1, batch_tokens // iw_samples)):
        mu, logvar = (t.float() for t in model.encode(ids, lengths))
        b, t1 = ids.shape[0], ids.shape[1] + 1
        k_chunk = max(1, min(iw_samples, batch_tokens // (b * t1)))
        log_w, ll_sum = [], torch.zeros(b)
        for k0 in range(0, iw_samples, k_chunk):
            k = min(k_chunk, iw_samples - k0)
            z = est.sample_diag(mu, logvar, k, generator)
            ll = model.log_likelihood(ids.repeat_interleave(k, 0), lengths.repeat_interleave(k, 0),
                                      z.reshape(b * k, zdim))
            ll = ll.float().view(b, k)
            log_w.append(est.iw_log_weights(ll, z, mu, logvar))
            ll_sum += ll.sum(1)
        log_w_all = torch.cat(log_w, 1)
        log_px[idx] = est.iw_log_marginal(log_w_all).double().numpy()
        by_k[idx] = est.iw_log_marginal_prefixes(log_w_all, ks).double().numpy()
        recon[idx] = (-ll_sum / iw_samples).double().numpy()
        mu_all[idx], lv_all[idx] = mu.double().numpy(), logvar.double().numpy()
    kl = est.gaussian_kl_per_dim(torch.from_numpy(mu_all), torch.from_numpy(lv_all)).numpy()
    return evaluate.VAEScores(log_px, recon, kl, mu_all, lv_all, ks, by_k if ks else None)


def assert_same_scores(got: evaluate.VAEScores, want: evaluate.VAEScores) -> None:
    for name in ("log_px", "recon", "kl_per_dim", "mu", "logvar"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.iw_ks == want.iw_ks
    if want.log_px_by_k is None:
        assert got.log_px_by_k is None
    else:
        np.testing.assert_array_equal(got.log_px_by_k, want.log_px_by_k)


@pytest.mark.parametrize("iw_samples, batch_tokens, max_len", [
    (50, 40_000, 9),  # many documents per group, all draws in one chunk
    (50, 300, 9),  # one document per group, the draws in several chunks
    (37, 120, 20),  # chunks that do not divide K, long documents alone over the budget
    pytest.param(500, 16_384, 30, marks=pytest.mark.slow),  # the default K and budget
])
def test_score_vae_gives_the_reference_numbers_bit_for_bit(iw_samples, batch_tokens, max_len):
    model = tiny_vae(latent_dim=3, vocab=30, seed=2)
    split = synthetic_split(23, 30, seed=7, max_len=max_len)
    ks = evaluate.iw_curve_ks(iw_samples)
    got = evaluate.score_vae(model, split, iw_samples=iw_samples, batch_tokens=batch_tokens, device=CPU,
                             generator=torch.Generator().manual_seed(5), iw_ks=ks)
    want = reference_score_vae(model, split, iw_samples=iw_samples, batch_tokens=batch_tokens,
                               generator=torch.Generator().manual_seed(5), iw_ks=ks)
    assert_same_scores(got, want)


@pytest.mark.slow
def test_metrics_json_equals_the_reference_computation(trained_model, tmp_path):
    """Every number of metrics.json's splits, on the trained fixture model, from the reference path."""
    from vaepipe.ml.checkpoint import load_model
    from vaepipe.stages import tokenize

    params = trained_model.replace(paths={"reports": str(tmp_path / "r")},
                                   evaluate={"num_examples": 1, "probe_labels": []})
    evaluate.run(params)
    got = json.loads((tmp_path / "r" / "metrics.json").read_text())
    ev, paths = params.evaluate, params.paths
    model, _ = load_model(paths.model, "best", CPU)
    lm, _ = load_model(paths.baseline, "best", CPU)
    tokenizer = tokenize.load_tokenizer(paths.tokenizer)
    for i, name in enumerate(ev.splits):
        split = read_split(paths.tokens, name, ev.max_docs)
        scores = reference_score_vae(model, split, iw_samples=ev.iw_samples, batch_tokens=ev.batch_tokens,
                                     generator=torch.Generator().manual_seed(params.seed + i),
                                     iw_ks=evaluate.iw_curve_ks(ev.iw_samples) if i == 0 else ())
        lm_ll = evaluate.score_lm(lm, split, batch_tokens=ev.batch_tokens, device=CPU)
        texts = tokenizer.decode_batch([s.tolist() for s in split.seqs], skip_special_tokens=True)
        want = evaluate.split_metrics(scores, split.lengths, texts, iw_samples=ev.iw_samples,
                                      mi_batch_size=ev.mi_batch_size, seed=params.seed + 100 * i, lm_log_px=lm_ll)
        want = json.loads(json.dumps(want))  # as metrics.json holds it: lists for tuples
        assert {k: got["splits"][name][k] for k in want} == want, name
