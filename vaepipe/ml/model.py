"""The text VAE: config, encoder q(z|x), decoder p(x|z), the model, and its loss terms.

Reads top to bottom like nanoGPT's model.py. Shapes in comments: B batch, T tokens (text
only), T1 = T + 1 decoder steps (``<bos>`` + text as input, text + ``<eos>`` as target),
E embedding, H hidden, Z latent, V vocabulary, N valid (non-padding) decoder positions.

- Encoder: bidirectional LSTM over packed sequences, its final states (``encoder_pooling:
  final``) or its outputs averaged over the tokens (``mean``) -> Gaussian posterior (mu, logvar); with
  ``bn_gamma > 0``, batch norm on mu with a fixed scale (BN-VAE, Zhu et al. 2020), which keeps
  the expected KL above a floor and so prevents posterior collapse.
- Decoder: LSTM whose initial state comes from z and which sees z concatenated to every
  input embedding (He et al. 2019), or a causal Transformer with z projected and added to
  every position. ``kind: lm`` is the same decoder without a latent (the LSTM-LM baseline).
- Loss terms: reconstruction summed over tokens (``<eos>`` counted, ``<bos>`` not) and the
  analytic KL to N(0, I) per dimension; train.py combines them with beta and free bits.

Only the valid positions reach the vocabulary projection (the largest matmul), so padding
costs nothing there; LSTMs run on packed sequences so padding costs nothing in them either.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from vaepipe.core.constants import BOS_ID, EOS_ID, PAD_ID
from vaepipe.ml.estimators import gaussian_kl_per_dim

if TYPE_CHECKING:
    from vaepipe.core.config import ModelConfig

# rows of the vocabulary projection computed at once when no gradient is needed: bounds the
# (rows, V) logits buffer in evaluation, where B*K rows of importance samples arrive at once
_INFERENCE_CHUNK = 8192


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild the network; saved as config.json beside the checkpoints."""

    kind: str  # "vae" | "lm"
    vocab_size: int
    embed_dim: int
    hidden_dim: int
    latent_dim: int
    num_layers: int
    num_heads: int
    encoder: str
    decoder: str  # "lstm" | "transformer"
    dropout: float
    bn_gamma: float
    encoder_hidden_dim: int = 0  # 0: hidden_dim
    encoder_pooling: str = "final"  # "final" | "mean"; configs saved before it existed read as final
    tie_embeddings: bool = False  # output layer shares the decoder's input embedding
    share_embeddings: bool = False  # the encoder reads the decoder's input embedding
    bow: bool = False  # a bag-of-words head z -> V for train.bow_weight's auxiliary loss (training only)
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unk_id: int = 3

    @classmethod
    def from_model_config(cls, model: ModelConfig, vocab_size: int, *, bow: bool = False) -> VAEConfig:
        """``bow``: build the bag-of-words head (train.bow_weight > 0)."""
        return cls(
            kind=model.kind, vocab_size=vocab_size, embed_dim=model.embed_dim,
            hidden_dim=model.hidden_dim, latent_dim=model.latent_dim, num_layers=model.num_layers,
            num_heads=model.num_heads, encoder=model.encoder, decoder=model.decoder,
            dropout=model.dropout, bn_gamma=model.bn_gamma,
            encoder_hidden_dim=model.encoder_hidden_dim, encoder_pooling=model.encoder_pooling,
            tie_embeddings=model.tie_embeddings,
            share_embeddings=model.share_embeddings, bow=bow and model.kind == "vae",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Inverse of ``to_dict``; raises ValueError on missing or unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VAEConfig key {unknown[0]!r}")
        return cls(**d)

    @property
    def has_latent(self) -> bool:
        return self.kind == "vae"


@dataclass
class LossTerms:
    """One-sample ELBO terms per sequence; the negative ELBO is ``recon + kl``."""

    recon: Tensor  # (B,) -log p(x|z), summed over tokens incl. <eos>
    kl: Tensor  # (B,) KL(q(z|x) || N(0, I)); zeros for kind lm
    kl_per_dim: Tensor  # (B, Z); (B, 0) for kind lm
    mu: Tensor | None  # (B, Z) posterior mean; None for kind lm
    logvar: Tensor | None  # (B, Z)
    n_tokens: Tensor  # (B,) predictions per sequence (length + 1 for <eos>)
    bow: Tensor | None = None  # (B,) bag-of-words NLL of the text's tokens given z; None without the head


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """z = mu + sigma * eps (Kingma & Welling 2014), differentiable in mu and logvar."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


# ---------------------------------------------------------------------------------------
# Encoder q(z|x)


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean of x (B, T, D) over the first ``lengths[b]`` positions of each row: (B, D).

    Positions past a row's length are masked out, so padding (whatever it holds) and the
    padded width T do not change the result.
    """
    mask = torch.arange(x.size(1), device=x.device)[None, :] < lengths.to(x.device)[:, None]  # (B, T)
    total = (x * mask[:, :, None].to(x.dtype)).sum(dim=1)
    return total / lengths.to(device=x.device, dtype=x.dtype).clamp(min=1)[:, None]


class LSTMEncoder(nn.Module):
    """Bidirectional LSTM over the text tokens -> mu, logvar.

    ``encoder_pooling``: ``final`` reads the final state of each direction (the forward one has
    seen the whole text last, the backward one first); ``mean`` averages the (B, T, 2H) outputs
    over the text's tokens, so every position speaks equally to z.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.encoder_pooling not in ("final", "mean"):
            raise ValueError(f"unsupported encoder_pooling {cfg.encoder_pooling!r} (final or mean)")
        self.pooling = cfg.encoder_pooling
        H = cfg.encoder_hidden_dim or cfg.hidden_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_id)
        self.lstm = nn.LSTM(cfg.embed_dim, H, batch_first=True, bidirectional=True)
        self.to_posterior = nn.Linear(2 * H, 2 * cfg.latent_dim)
        self.bn: nn.BatchNorm1d | None = None
        if cfg.bn_gamma > 0:
            # BN-VAE: the scale is fixed at gamma (not learned), the shift is learned. With
            # E[mu_d^2] = gamma^2 + beta_d^2 the expected KL stays >= Z * gamma^2 / 2 (approx.).
            self.bn = nn.BatchNorm1d(cfg.latent_dim)
            self.bn.weight.data.fill_(cfg.bn_gamma)
            self.bn.weight.requires_grad_(False)

    def forward(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        # ids (B, T), lengths (B,) >= 1
        x = self.embed(ids)  # (B, T, E)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)  # h_n (2, B, H), already in the input's row order
        if self.pooling == "mean":
            seq, _ = pad_packed_sequence(out, batch_first=True)  # (B, T', 2H), T' = max length
            h = masked_mean(seq, lengths)  # (B, 2H)
        else:
            h = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2H)
        mu, logvar = self.to_posterior(h).chunk(2, dim=-1)  # (B, Z) each
        if self.bn is not None:
            if self.training and mu.size(0) > 1:
                mu = self.bn(mu)
            else:  # one row has no batch statistics: use the running ones (as in eval)
                bn = self.bn
                mu = F.batch_norm(mu, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return mu, logvar


# ---------------------------------------------------------------------------------------
# Decoders p(x|z): each returns the hidden states of the valid positions only, (N, H)


def _valid_positions(lengths: Tensor, width: int) -> Tensor:
    """(B, T1) bool mask of the decoder steps that predict a real token or <eos>."""
    return torch.arange(width, device=lengths.device)[None, :] < (lengths + 1)[:, None]


class LSTMDecoder(nn.Module):
    """LSTM LM; with a latent, z sets the initial state and is fed at every step (He et al. 2019)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        z_in = cfg.latent_dim if cfg.has_latent else 0
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_id)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.embed_dim + z_in, cfg.hidden_dim, num_layers=cfg.num_layers, batch_first=True)
        self.z_to_state = nn.Linear(cfg.latent_dim, cfg.num_layers * cfg.hidden_dim) if z_in else None

    def _init_state(self, z: Tensor | None) -> tuple[Tensor, Tensor] | None:
        if z is None or self.z_to_state is None:
            return None
        c0 = self.z_to_state(z).view(z.size(0), self.cfg.num_layers, self.cfg.hidden_dim)
        c0 = c0.transpose(0, 1).contiguous()  # (L, B, H)
        return torch.tanh(c0), c0

    def _inputs(self, inp: Tensor, z: Tensor | None) -> Tensor:
        x = self.drop(self.embed(inp))  # (B, T1, E)
        if z is not None and self.z_to_state is not None:
            x = torch.cat([x, z[:, None, :].expand(-1, x.size(1), -1)], dim=-1)  # (B, T1, E+Z)
        return x

    def forward(self, inp: Tensor, lengths: Tensor, z: Tensor | None, *, packed: bool = True,
                lengths_cpu: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Hidden states at valid positions (N, H) and their flat indices into (B*T1)."""
        x = self._inputs(inp, z)
        state = self._init_state(z)
        B, T1 = inp.shape
        if packed:
            steps = (lengths if lengths_cpu is None else lengths_cpu).cpu() + 1
            pk = pack_padded_sequence(x, steps, batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(pk, state)
            # the same packing applied to flat positions tells where each packed row belongs
            flat = torch.arange(B * T1, device=inp.device).view(B, T1)
            where = pack_padded_sequence(flat, steps, batch_first=True, enforce_sorted=False).data
            return self.drop(out.data), where  # (N, H), (N,)
        out, _ = self.lstm(x, state)  # (B, T1, H): padded positions computed, then dropped
        mask = _valid_positions(lengths, T1).view(-1)
        where = mask.nonzero().squeeze(1)
        return self.drop(out.reshape(B * T1, -1)[where]), where

    @torch.no_grad()
    def step(self, tok: Tensor, z: Tensor | None, state: Any) -> tuple[Tensor, Any]:
        """One decoding step for generation: tok (B,) -> hidden (B, H), new state."""
        if state is None:
            state = self._init_state(z)
        out, state = self.lstm(self._inputs(tok[:, None], z), state)
        return out[:, -1], state


class ScaledEmbedding(nn.Embedding):
    """An embedding initialised N(0, 1/dim) (Vaswani et al. 2017), for inputs scaled by sqrt(dim).

    nn.Embedding's N(0, 1) would give a tied output layer logits with std sqrt(dim) (about 16
    at dim 256): an initial loss of ~230 nats per token instead of ~log V. Also what
    ``reset_decoder`` restores, since it goes through ``reset_parameters``.
    """

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.embedding_dim ** -0.5)
        self._fill_padding_idx_with_zero()


class TransformerDecoder(nn.Module):
    """Causal (GPT-style, pre-norm) Transformer; z is projected and added to every position."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_dim
        self.embed = ScaledEmbedding(cfg.vocab_size, H, padding_idx=cfg.pad_id)
        self.z_proj = nn.Linear(cfg.latent_dim, H) if cfg.has_latent else None
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            H, cfg.num_heads, dim_feedforward=4 * H, dropout=cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(H)

    @staticmethod
    def _positions(T: int, H: int, device: torch.device) -> Tensor:
        """Sinusoidal positions (Vaswani et al. 2017): no maximum length to configure."""
        pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, H, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / H))
        pe = torch.zeros(T, H, device=device)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : H // 2]
        return pe  # (T, H)

    def _hidden(self, inp: Tensor, z: Tensor | None) -> Tensor:
        B, T1 = inp.shape
        x = self.embed(inp) * math.sqrt(self.cfg.hidden_dim) + self._positions(T1, self.cfg.hidden_dim, inp.device)
        if z is not None and self.z_proj is not None:
            x = x + self.z_proj(z)[:, None, :]  # (B, T1, H)
        causal = nn.Transformer.generate_square_subsequent_mask(T1, device=inp.device)
        # right padding under a causal mask: valid positions never attend to padding
        return self.norm(self.blocks(self.drop(x), mask=causal, is_causal=True))  # (B, T1, H)

    def forward(self, inp: Tensor, lengths: Tensor, z: Tensor | None, *, packed: bool = True,
                lengths_cpu: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, T1 = inp.shape
        h = self._hidden(inp, z)
        where = _valid_positions(lengths, T1).view(-1).nonzero().squeeze(1)
        return h.reshape(B * T1, -1)[where], where


# ---------------------------------------------------------------------------------------
# The model


class TextVAE(nn.Module):
    """Gaussian text VAE (``kind: vae``) or its decoder alone as an LM (``kind: lm``, z is None)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.kind not in ("vae", "lm") or cfg.decoder not in ("lstm", "transformer") or cfg.encoder != "lstm":
            raise ValueError(f"unsupported model: kind={cfg.kind} encoder={cfg.encoder} decoder={cfg.decoder}")
        self.cfg = cfg
        self.encoder = LSTMEncoder(cfg) if cfg.has_latent else None
        self.decoder = LSTMDecoder(cfg) if cfg.decoder == "lstm" else TransformerDecoder(cfg)
        if cfg.share_embeddings and self.encoder is not None:
            # one table for both networks: the encoder reads embeddings that the decoder's much
            # stronger language-model gradient trains, which matters most on a short budget
            if self.decoder.embed.embedding_dim != cfg.embed_dim:
                raise ValueError("share_embeddings needs the decoder's embedding size to equal embed_dim")
            self.encoder.embed = self.decoder.embed
        if cfg.tie_embeddings:
            # Press & Wolf 2017: logits = W_emb (P h) + b; P maps H to the embedding size (or is
            # the identity when they agree). Halves the costliest matmul when E = H / 2.
            E = self.decoder.embed.embedding_dim
            self.out_proj: nn.Module = nn.Linear(cfg.hidden_dim, E) if E != cfg.hidden_dim else nn.Identity()
            self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        else:
            self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        # Zhao et al. 2017: z alone must predict the document's words (no order, no decoder),
        # which makes it carry the content that a strong decoder would otherwise model itself
        self.bow_head = nn.Linear(cfg.latent_dim, cfg.vocab_size) if cfg.bow and cfg.has_latent else None

    # -- pieces ------------------------------------------------------------------------

    def encode(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters mu, logvar: (B, Z) each."""
        if self.encoder is None:
            raise RuntimeError("a kind 'lm' model has no encoder")
        return self.encoder(ids, lengths)

    def bow_nll(self, ids: Tensor, lengths: Tensor, z: Tensor) -> Tensor:
        """-sum over the text's tokens of log softmax(W z + b)[token]: (B,). Padding ignored."""
        if self.bow_head is None:
            raise RuntimeError("this model has no bag-of-words head (VAEConfig.bow)")
        logp = F.log_softmax(self.bow_head(z).float(), dim=-1)  # (B, V)
        mask = torch.arange(ids.size(1), device=ids.device)[None, :] < lengths.to(ids.device)[:, None]
        return -(logp.gather(1, ids) * mask).sum(dim=1)

    def logits(self, h: Tensor) -> Tensor:
        """Decoder hidden states (..., H) -> vocabulary logits (..., V)."""
        if self.cfg.tie_embeddings:
            return F.linear(self.out_proj(h), self.decoder.embed.weight, self.out_bias)
        return self.out(h)

    def reset_decoder(self) -> None:
        """Re-initialise the decoder and output layer (Li et al. 2019, after AE pre-training)."""
        head = [self.out_proj] if self.cfg.tie_embeddings else [self.out]
        encoder_embed = self.encoder.embed if self.encoder is not None else None
        for m in [*self.decoder.modules(), *head]:
            # a shared embedding is the encoder's too: it keeps what pre-training learned
            if m is not self.decoder and m is not encoder_embed and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if self.cfg.tie_embeddings:
            nn.init.zeros_(self.out_bias)

    def _decoder_io(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """<bos> + text as decoder input, text + <eos> as target: (B, T1) each."""
        B = ids.size(0)
        bos = ids.new_full((B, 1), self.cfg.bos_id)
        pad = ids.new_full((B, 1), self.cfg.pad_id)
        inp = torch.cat([bos, ids], dim=1)  # (B, T1)
        tgt = torch.cat([ids, pad], dim=1)  # (B, T1)
        tgt.scatter_(1, lengths[:, None], self.cfg.eos_id)  # <eos> right after each text
        return inp, tgt

    def token_nll(self, ids: Tensor, lengths: Tensor, z: Tensor | None, *,
                  word_dropout: float = 0.0, packed: bool = True) -> Tensor:
        """-log p(x|z) summed over each sequence's tokens and <eos>: (B,). Padding ignored.

        ``lengths`` may stay on the CPU while ``ids`` are on a GPU: packing needs CPU lengths,
        and a copy host -> device does not wait for the GPU where device -> host would.
        """
        lengths_cpu = lengths.cpu()
        lengths = lengths.to(ids.device, non_blocking=True)
        inp, tgt = self._decoder_io(ids, lengths)
        if word_dropout > 0 and self.training:
            # Bowman et al. 2016: hide some inputs behind <unk> so the decoder leans on z
            drop = torch.rand(inp.shape, device=inp.device) < word_dropout
            drop[:, 0] = False  # keep <bos>
            inp = inp.masked_fill(drop, self.cfg.unk_id)
        B, T1 = inp.shape
        h, where = self.decoder(inp, lengths, z, packed=packed, lengths_cpu=lengths_cpu)  # (N, H), (N,)
        targets = tgt.view(-1)[where]  # (N,)
        if torch.is_grad_enabled() or h.size(0) <= _INFERENCE_CHUNK:
            nll = F.cross_entropy(self.logits(h).float(), targets, reduction="none")  # (N,)
        else:
            nll = torch.cat([
                F.cross_entropy(self.logits(h[i : i + _INFERENCE_CHUNK]).float(),
                                targets[i : i + _INFERENCE_CHUNK], reduction="none")
                for i in range(0, h.size(0), _INFERENCE_CHUNK)
            ])
        # scatter back to (B, T1) and sum rows: deterministic, unlike index_add on CUDA
        per_pos = nll.new_zeros(B * T1).index_put_((where,), nll)
        return per_pos.view(B, T1).sum(dim=1)  # (B,)

    # -- public API ----------------------------------------------------------------------

    def log_likelihood(self, ids: Tensor, lengths: Tensor, z: Tensor | None) -> Tensor:
        """Exact log p(x|z) per row, <eos> counted: (B,). Rows may repeat x with different z."""
        return -self.token_nll(ids, lengths, z)

    def forward(self, ids: Tensor, lengths: Tensor, *, word_dropout: float = 0.0) -> LossTerms:
        """One-sample ELBO terms. ids (B, T) text tokens padded with pad_id, lengths (B,) >= 1."""
        n_tokens = lengths.to(ids.device, non_blocking=True) + 1
        if self.encoder is None:
            recon = self.token_nll(ids, lengths, None, word_dropout=word_dropout)
            zeros = recon.new_zeros(ids.size(0), 0)
            return LossTerms(recon, recon.new_zeros(ids.size(0)), zeros, None, None, n_tokens)
        mu, logvar = self.encode(ids, lengths)  # (B, Z)
        z = reparameterize(mu, logvar)  # (B, Z), one sample
        recon = self.token_nll(ids, lengths, z, word_dropout=word_dropout)  # (B,)
        kl_per_dim = gaussian_kl_per_dim(mu.float(), logvar.float())  # (B, Z)
        bow = self.bow_nll(ids, lengths, z) if self.bow_head is not None and self.training else None
        return LossTerms(recon.float(), kl_per_dim.sum(dim=1), kl_per_dim, mu, logvar, n_tokens, bow)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
