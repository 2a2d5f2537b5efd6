"""From latent vectors back to token ids: greedy, beam and sampled decoding, batched.

    decode_ids(model, z, Decoding(strategy="beam", beam_size=5)) -> [[ids], ...]

The one decoding implementation of vaepipe: the Python facade (``vaepipe.load``), the CLI
verbs, the registered MLflow model and evaluate's example texts all call ``decode_ids``.

- Every strategy is batched over sequences: one decoder step advances all rows at once. Beam
  search keeps ``B * beam_size`` rows and picks each sentence's next beams with one ``topk``
  over ``(B, beam_size * beam_size)`` candidates (each beam's own ``beam_size`` most likely
  tokens: no other token can enter the best ``beam_size``); there is no Python loop per
  sentence. A sentence that has ended leaves the batch, so later steps cost nothing for it.
- LSTM decoders carry their recurrent state from step to step; Transformer decoders recompute
  the prefix at each step (O(T^2) in the length, cheap for sentence-length text).
- A finished beam (it produced ``<eos>``) only continues with ``<eos>`` at no cost, so it
  keeps its score and competes with the unfinished ones. Scores only fall as beams grow, so a
  sentence is done once its best beam has ended. The result is the beam with the highest
  total log-probability (``<eos>`` included), without length normalisation.
- Sampling draws from its own ``torch.Generator`` on the model's device, seeded with
  ``Decoding.seed``: the same seed gives the same output, whatever else used torch's RNG.
- Returned ids exclude ``<bos>`` and ``<eos>``; a row that reached ``max_tokens`` without an
  ``<eos>`` is cut there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from vaepipe.core.errors import ConfigError
from vaepipe.ml.model import LSTMDecoder, TextVAE

STRATEGIES = ("greedy", "beam", "sample")

# decoder rows (sequences x beams) advanced together: bounds the memory of a large request
# (the (rows, V) logits and, for a Transformer, the (rows, T, H) prefix) without costing speed
MAX_ROWS = 2048


@dataclass(frozen=True)
class Decoding:
    """How to turn a latent vector into text.

    ``strategy``: ``greedy`` (the most likely token at each step), ``beam`` (beam search with
    ``beam_size`` beams, the most likely sentence found) or ``sample`` (draw each token from the
    distribution sharpened or flattened by ``temperature`` and restricted to the ``top_k`` most
    likely tokens (0: all) and to the smallest set whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2020; 1.0: all)). ``max_tokens`` bounds the length of
    the output; ``seed`` makes sampling reproducible.
    """

    strategy: str = "greedy"
    beam_size: int = 5
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0

    def checked(self) -> Decoding:
        """This decoding, or a ConfigError (one line) naming the first invalid field."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: unknown decoding strategy {self.strategy!r} "
                              f"(expected one of {', '.join(STRATEGIES)})")
        if not _is_int(self.beam_size) or self.beam_size < 1:
            raise ConfigError(f"beam_size: must be an integer >= 1, got {self.beam_size!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"temperature: must be a finite number > 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k: must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed: must be an integer in [0, 2**63), got {self.seed!r}")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Decoding:
        """A checked Decoding from keyword arguments; ConfigError for an unknown one."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown decoding option (expected one of {', '.join(sorted(names))})")
        return cls(**kwargs).checked()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------
# The entry point


def decode_ids(model: TextVAE, z: Tensor | None, decoding: Decoding, *, num: int | None = None) -> list[list[int]]:
    """Token ids of one decoded sequence per row of ``z`` (B, Z), without ``<bos>``/``<eos>``.

    A ``kind: lm`` model has no latent: pass ``z=None`` and ``num`` sequences (a ``z`` given to
    it only sets the number of rows). ``z`` may live on any device; decoding runs on the
    model's. The model is put in eval mode for the call and restored after.
    """
    decoding = decoding.checked()
    device = _model_device(model)
    if model.cfg.has_latent:
        if z is None:
            raise ConfigError("z: a VAE decodes latent vectors; none were given")
        z = z.to(device=device, dtype=torch.float32)
        rows = z.size(0)
    else:
        rows = z.size(0) if z is not None else (num if num is not None else 1)
        z = None
    if rows == 0:
        return []
    gen = torch.Generator(device=device).manual_seed(decoding.seed)
    per_chunk = max(1, MAX_ROWS // (decoding.beam_size if decoding.strategy == "beam" else 1))
    out: list[list[int]] = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, rows, per_chunk):
            n = min(per_chunk, rows - start)
            zc = z[start : start + n] if z is not None else None
            if decoding.strategy == "beam":
                seqs = _beam_search(model, zc, n, decoding, device)
            else:
                seqs = _step_decode(model, zc, n, decoding, device, gen)
            out += _strip(seqs, model.cfg.eos_id, decoding.max_tokens)
    return out


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _strip(seqs: Tensor, eos_id: int, max_tokens: int) -> list[list[int]]:
    """Rows of generated ids -> lists cut at the first <eos> (or at max_tokens)."""
    out = []
    for row in seqs.tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row[:max_tokens])
    return out


# ---------------------------------------------------------------------------------------
# One decoder step for any decoder


class _Stepper:
    """Feeds one token per row and returns the next-token logits (rows, V), float32.

    LSTM: the recurrent state is carried. Transformer: the whole prefix is recomputed.
    ``reorder(index)`` keeps rows ``index`` (in that order), as beam search needs.
    """

    def __init__(self, model: TextVAE, z: Tensor | None, rows: int, device: torch.device) -> None:
        self.model = model
        self.z = z
        self.lstm = isinstance(model.decoder, LSTMDecoder)
        self.state: Any = None
        self.prefix = torch.empty(rows, 0, dtype=torch.long, device=device)

    def __call__(self, tok: Tensor) -> Tensor:
        if self.lstm:
            h, self.state = self.model.decoder.step(tok, self.z, self.state)  # (rows, H)
        else:
            self.prefix = torch.cat([self.prefix, tok[:, None]], dim=1)
            h = self.model.decoder._hidden(self.prefix, self.z)[:, -1]  # (rows, H)
        logits = self.model.logits(h).float()
        cfg = self.model.cfg
        logits[:, cfg.pad_id] = -math.inf  # never generated
        logits[:, cfg.bos_id] = -math.inf
        return logits

    def reorder(self, index: Tensor) -> None:
        if self.z is not None:
            self.z = self.z.index_select(0, index)
        if self.lstm:
            if self.state is not None:
                self.state = tuple(s.index_select(1, index) for s in self.state)  # (L, rows, H)
        else:
            self.prefix = self.prefix.index_select(0, index)


# ---------------------------------------------------------------------------------------
# Greedy and sampled decoding


def _step_decode(model: TextVAE, z: Tensor | None, rows: int, decoding: Decoding,
                 device: torch.device, gen: torch.Generator) -> Tensor:
    """Greedy or sampled decoding of ``rows`` sequences: (rows, max_tokens) ids, <eos>-padded.

    A row that produced <eos> leaves the batch, so the steps after it cost nothing.
    """
    cfg = model.cfg
    step = _Stepper(model, z, rows, device)
    out = torch.full((rows, decoding.max_tokens), cfg.eos_id, dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)  # the output row of each decoder row
    tok = torch.full((rows,), cfg.bos_id, dtype=torch.long, device=device)
    for t in range(decoding.max_tokens):
        logits = step(tok)  # (alive, V)
        tok = logits.argmax(-1) if decoding.strategy == "greedy" else _sample(logits, decoding, gen)
        out[alive, t] = tok
        going = tok != cfg.eos_id
        if not bool(going.all()):
            if not bool(going.any()):
                break
            keep = going.nonzero().squeeze(1)
            alive, tok = alive[keep], tok[keep]
            step.reorder(keep)
    return out


# the nucleus is looked for among this many most likely tokens first: a trained model's
# nucleus is nearly always there, and a top-k is far cheaper than sorting the vocabulary
NUCLEUS_CANDIDATES = 64


def _sample(logits: Tensor, decoding: Decoding, gen: torch.Generator) -> Tensor:
    """One token per row from softmax(logits / temperature), restricted by top_k and top_p."""
    logits = logits / decoding.temperature
    if 0 < decoding.top_k < logits.size(-1):
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(1, logits.topk(decoding.top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if decoding.top_p < 1.0:
        logits = _nucleus(logits, decoding.top_p)
    return _draw(logits, gen)


def _draw(logits: Tensor, gen: torch.Generator) -> Tensor:
    """One index per row with probability softmax(logits), by inverting the cumulative
    distribution at one uniform number per row (a pass over the row; multinomial needs several)."""
    weights = torch.exp((logits - logits.max(dim=-1, keepdim=True).values).double())  # -inf -> 0
    cdf = weights.cumsum(dim=-1)
    u = torch.rand(logits.size(0), 1, generator=gen, device=logits.device, dtype=torch.float64) * cdf[:, -1:]
    # the first index whose cumulative weight exceeds u: always one of positive weight, < V
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=logits.size(-1) - 1)


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (>= 1 token).

    Rows whose nucleus lies within their ``NUCLEUS_CANDIDATES`` most likely tokens are done
    from those; the others sort their whole row.
    """
    c = min(NUCLEUS_CANDIDATES, logits.size(-1))
    vals, idx = logits.topk(c, dim=-1)  # (R, c), best first
    probs = torch.exp(vals - torch.logsumexp(logits, dim=-1, keepdim=True))
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    kept = torch.full_like(logits, -math.inf).scatter(1, idx, vals.masked_fill(before >= top_p, -math.inf))
    covered = before[:, -1] + probs[:, -1] >= top_p  # the c tokens reach top_p: the rest is out
    if not bool(covered.all()):
        rows = (~covered).nonzero().squeeze(1)
        kept[rows] = _nucleus_sorted(logits[rows], top_p)
    return kept


def _nucleus_sorted(logits: Tensor, top_p: float) -> Tensor:
    """``_nucleus`` by sorting each whole row."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= top_p  # the top token has before == 0 < top_p: always kept
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


# ---------------------------------------------------------------------------------------
# Beam search


def _beam_search(model: TextVAE, z: Tensor | None, rows: int, decoding: Decoding, device: torch.device) -> Tensor:
    """The highest-scoring of ``beam_size`` beams per sequence: (rows, max_tokens) ids, <eos>-padded.

    Decoder rows are ``b * K + k`` (live sequence b, beam k). Each step scores the extensions
    of every beam, ``scores[b, k] + log p(v | beam)``, and keeps each sequence's ``K`` best
    with one ``topk``. Only a beam's own ``K`` most likely tokens can be among those, so the
    candidates are ``K * K`` per sequence, not ``K * V``. A sequence whose best beam has ended
    is done (scores only fall as beams grow, so nothing can overtake it) and leaves the batch.
    """
    cfg = model.cfg
    K = decoding.beam_size
    step = _Stepper(model, z.repeat_interleave(K, dim=0) if z is not None else None, rows * K, device)
    out = torch.full((rows, decoding.max_tokens), cfg.eos_id, dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)  # the output row of each live sequence
    tok = torch.full((rows * K,), cfg.bos_id, dtype=torch.long, device=device)
    # all beams start identical: only beam 0 may extend at the first step, so they differ after it
    scores = torch.full((rows, K), -math.inf, device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(rows * K, dtype=torch.bool, device=device)
    seqs = torch.empty(rows * K, 0, dtype=torch.long, device=device)
    # a finished beam continues only with <eos>, at no cost: its score stays as it is
    W = min(K, cfg.vocab_size)  # candidates per beam
    ended_lp = torch.full((W,), -math.inf, device=device)
    ended_lp[0] = 0.0
    for t in range(decoding.max_tokens):
        n = alive.numel()
        logits = step(tok)  # (n*K, V)
        top_lp, top_tok = logits.topk(W, dim=-1)  # (n*K, W)
        top_lp = top_lp - torch.logsumexp(logits, dim=-1, keepdim=True)  # log-probabilities
        top_lp = torch.where(finished[:, None], ended_lp, top_lp)
        top_tok = top_tok.masked_fill(finished[:, None], cfg.eos_id)
        cand = (scores.view(n * K, 1) + top_lp).view(n, K * W)
        scores, pick = cand.topk(K, dim=-1)  # (n, K), best first
        base = (torch.arange(n, device=device) * K)[:, None]
        origin = (base + torch.div(pick, W, rounding_mode="floor")).view(-1)  # parent rows
        tok = top_tok.view(n, K * W).gather(1, pick).view(-1)
        step.reorder(origin)
        seqs = torch.cat([seqs.index_select(0, origin), tok[:, None]], dim=1)
        finished = finished.index_select(0, origin) | (tok == cfg.eos_id)
        done = finished.view(n, K)[:, 0]  # the best beam has ended
        if bool(done.any()):
            out[alive[done], : t + 1] = seqs.view(n, K, -1)[done, 0]
            if bool(done.all()):
                return out
            keep_seq = (~done).nonzero().squeeze(1)
            keep = (keep_seq[:, None] * K + torch.arange(K, device=device)).view(-1)
            alive, scores = alive[keep_seq], scores[keep_seq]
            tok, finished, seqs = tok[keep], finished[keep], seqs[keep]
            step.reorder(keep)
    out[alive, : seqs.size(1)] = seqs.view(alive.numel(), K, -1)[:, 0]
    return out
