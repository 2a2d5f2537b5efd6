"""vaepipe.ml.decoding: batched decoding equals one-at-a-time decoding, for every strategy and
both decoders; the degenerate settings agree with greedy; seeds make sampling reproducible;
bad options are one-line ConfigErrors."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from vaepipe.core.constants import BOS_ID, EOS_ID, PAD_ID
from vaepipe.core.errors import ConfigError
from vaepipe.ml.decoding import Decoding, decode_ids
from vaepipe.ml.model import TextVAE, VAEConfig

DECODERS = ["lstm", "transformer"]
MAX = 12


def make_model(decoder: str, kind: str = "vae", seed: int = 0) -> TextVAE:
    """A random model whose <eos> is likely enough that sentences end at varied lengths."""
    torch.manual_seed(seed)
    cfg = VAEConfig(kind=kind, vocab_size=40, embed_dim=16, hidden_dim=24, latent_dim=6, num_layers=1,
                    num_heads=4, encoder="lstm", decoder=decoder, dropout=0.1, bn_gamma=0.0)
    model = TextVAE(cfg).eval()
    with torch.no_grad():
        model.out.bias[EOS_ID] += 1.5
        model.out.weight.mul_(4.0)  # peaked distributions: decodings differ, ties are rare
    return model


def latents(n: int = 7, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def one_at_a_time(model: TextVAE, z: torch.Tensor, decoding: Decoding) -> list[list[int]]:
    return [decode_ids(model, z[i : i + 1], decoding)[0] for i in range(z.size(0))]


@pytest.mark.parametrize("decoder", DECODERS)
def test_batched_greedy_equals_one_at_a_time(decoder: str) -> None:
    model, z = make_model(decoder), latents()
    dec = Decoding(max_tokens=MAX)
    batched = decode_ids(model, z, dec)
    assert batched == one_at_a_time(model, z, dec)
    assert len(batched) == len(z)
    assert len({len(s) for s in batched}) > 1, "the fixture should give sentences of several lengths"


@pytest.mark.parametrize("decoder", DECODERS)
def test_batched_beam_equals_per_sentence_beam(decoder: str) -> None:
    model, z = make_model(decoder), latents()
    dec = Decoding("beam", beam_size=4, max_tokens=MAX)
    assert decode_ids(model, z, dec) == one_at_a_time(model, z, dec)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_of_one_is_greedy(decoder: str) -> None:
    model, z = make_model(decoder), latents()
    assert decode_ids(model, z, Decoding("beam", beam_size=1, max_tokens=MAX)) == \
        decode_ids(model, z, Decoding("greedy", max_tokens=MAX))


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_beam_wider_than_the_search_space_is_exact(decoder: str) -> None:
    """With beams for every sequence of up to 3 tokens, beam search returns the most likely one,
    found here by scoring all of them (masked <pad>/<bos>, <eos> ends a sequence's score)."""
    torch.manual_seed(3)
    cfg = VAEConfig(kind="vae", vocab_size=8, embed_dim=8, hidden_dim=16, latent_dim=3, num_layers=1,
                    num_heads=2, encoder="lstm", decoder=decoder, dropout=0.0, bn_gamma=0.0)
    model = TextVAE(cfg).eval()
    with torch.no_grad():
        model.out.weight.mul_(3.0)
    z = 2 * torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    usable = [t for t in range(8) if t not in (PAD_ID, BOS_ID)]
    seqs = list(itertools.product(usable, repeat=3))
    got = decode_ids(model, z, Decoding("beam", beam_size=len(seqs), max_tokens=3))
    for i in range(len(z)):
        scores = exhaustive_scores(model, z[i], seqs)
        best = seqs[int(scores.argmax())]
        want = list(best[: best.index(EOS_ID)]) if EOS_ID in best else list(best)
        assert got[i] == want


def exhaustive_scores(model: TextVAE, z: torch.Tensor, seqs: list[tuple[int, ...]]) -> torch.Tensor:
    """Total log-probability of each 3-token sequence, up to and with its first <eos>."""
    ids = torch.tensor(seqs)
    inp = torch.cat([torch.full((len(seqs), 1), BOS_ID), ids[:, :-1]], dim=1)
    zz = z.expand(len(seqs), -1)
    with torch.no_grad():
        if model.cfg.decoder == "lstm":
            h, _ = model.decoder.lstm(model.decoder._inputs(inp, zz), model.decoder._init_state(zz))
        else:
            h = model.decoder._hidden(inp, zz)
        logits = model.logits(h)
        logits[..., [PAD_ID, BOS_ID]] = -math.inf
        lp = torch.log_softmax(logits, -1).gather(2, ids[:, :, None]).squeeze(2)  # (S, 3)
    ended_before = torch.cumsum((ids == EOS_ID).long(), dim=1) - (ids == EOS_ID).long() > 0
    return lp.masked_fill(ended_before, 0.0).sum(dim=1)


@pytest.mark.parametrize("decoder", DECODERS)
def test_sampling_is_reproducible_for_a_seed(decoder: str) -> None:
    model, z = make_model(decoder), latents()
    dec = Decoding("sample", temperature=1.5, max_tokens=MAX, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    a = decode_ids(model, z, dec)
    torch.manual_seed(456)
    assert decode_ids(model, z, dec) == a
    assert decode_ids(model, z, dataclasses.replace(dec, seed=4)) != a


@pytest.mark.parametrize("decoder", DECODERS)
def test_top_k_one_and_a_tiny_nucleus_are_greedy(decoder: str) -> None:
    model, z = make_model(decoder), latents()
    greedy = decode_ids(model, z, Decoding(max_tokens=MAX))
    assert decode_ids(model, z, Decoding("sample", top_k=1, max_tokens=MAX, seed=9)) == greedy
    assert decode_ids(model, z, Decoding("sample", top_p=1e-6, max_tokens=MAX, seed=9)) == greedy


def test_sampling_stays_in_top_k() -> None:
    """Every sampled token is among the k most likely at its step (checked by teacher forcing)."""
    model, z = make_model("lstm"), latents(20)
    seqs = decode_ids(model, z, Decoding("sample", top_k=3, temperature=3.0, max_tokens=MAX, seed=0))
    with torch.no_grad():
        for i, s in enumerate(seqs):
            state, tok = None, torch.tensor([BOS_ID])
            for t in s:
                h, state = model.decoder.step(tok, z[i : i + 1], state)
                logits = model.logits(h)[0]
                logits[[PAD_ID, BOS_ID]] = -math.inf
                assert t in logits.topk(3).indices.tolist()
                tok = torch.tensor([t])


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_outputs_hold_no_specials_and_respect_max_tokens(decoder: str, strategy: str) -> None:
    model, z = make_model(decoder), latents()
    for s in decode_ids(model, z, Decoding(strategy, beam_size=3, max_tokens=5)):
        assert len(s) <= 5
        assert all(t not in (PAD_ID, BOS_ID, EOS_ID) for t in s)


@pytest.mark.parametrize("decoder", DECODERS)
def test_lm_decodes_num_sequences(decoder: str) -> None:
    lm = make_model(decoder, kind="lm")
    out = decode_ids(lm, None, Decoding("sample", max_tokens=MAX, seed=1), num=5)
    assert len(out) == 5
    assert decode_ids(lm, None, Decoding("beam", beam_size=3, max_tokens=MAX), num=2) == \
        [decode_ids(lm, None, Decoding("beam", beam_size=3, max_tokens=MAX), num=1)[0]] * 2


def test_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request larger than MAX_ROWS is decoded in chunks, with the same output."""
    from vaepipe.ml import decoding

    model, z = make_model("lstm"), latents(9)
    dec = Decoding("beam", beam_size=3, max_tokens=MAX)
    whole = decode_ids(model, z, dec)
    monkeypatch.setattr(decoding, "MAX_ROWS", 6)  # two sequences of three beams per chunk
    assert decode_ids(model, z, dec) == whole


def test_training_mode_is_restored_and_dropout_is_off() -> None:
    model, z = make_model("lstm"), latents()
    expected = decode_ids(model, z, Decoding(max_tokens=MAX))
    model.train()
    assert decode_ids(model, z, Decoding(max_tokens=MAX)) == expected
    assert model.training


def test_a_vae_needs_z() -> None:
    with pytest.raises(ConfigError, match="z"):
        decode_ids(make_model("lstm"), None, Decoding())


@pytest.mark.parametrize(("field", "value", "match"), [
    ("strategy", "topk", "strategy"),
    ("beam_size", 0, "beam_size"),
    ("beam_size", 2.5, "beam_size"),
    ("temperature", 0.0, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("temperature", float("inf"), "temperature"),
    ("top_k", -1, "top_k"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("max_tokens", 0, "max_tokens"),
    ("seed", -1, "seed"),
    ("seed", 2**64, "seed"),
])
def test_bad_options_are_one_line_config_errors(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        Decoding(**{field: value}).checked()
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        decode_ids(make_model("lstm"), latents(2), Decoding(**{field: value}))


def test_unknown_keyword_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="beams"):
        Decoding.from_kwargs(beams=3)
    assert Decoding.from_kwargs(strategy="beam", beam_size=2) == Decoding("beam", beam_size=2)


def test_nucleus_from_candidates_equals_the_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """The top-k shortcut keeps exactly the tokens the sort of the whole row keeps, for rows
    whose nucleus is among the candidates and for rows where it is not."""
    from vaepipe.ml import decoding

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 300, generator=g) * torch.linspace(0.2, 6.0, 200)[:, None]  # flat .. peaked
    logits[:5, :2] = -math.inf
    monkeypatch.setattr(decoding, "NUCLEUS_CANDIDATES", 16)
    for p in (1e-6, 0.3, 0.9, 0.999):
        fast = decoding._nucleus(logits, p)
        assert torch.equal(torch.isfinite(fast), torch.isfinite(decoding._nucleus_sorted(logits, p))), p


def test_draw_follows_the_distribution() -> None:
    """Exponential-race draws match softmax frequencies (20,000 draws, 3-sigma bounds)."""
    from vaepipe.ml.decoding import _draw

    logits = torch.tensor([[0.0, 1.0, 2.0, -math.inf]]).expand(20_000, -1)
    counts = torch.bincount(_draw(logits, torch.Generator().manual_seed(0)), minlength=4).double()
    p = torch.softmax(logits[0].double(), -1)
    assert counts[3] == 0
    sigma = torch.sqrt(20_000 * p * (1 - p))
    assert bool(((counts - 20_000 * p).abs() <= 3 * sigma + 1).all()), (counts, 20_000 * p)
