"""Training throughput: our loop beside a straightforward one, in the same process.

    python3 bench/bench_train.py                                  # synthetic data, CPU, default model
    python3 bench/bench_train.py --tokens data/tokens --repeats 5 --steps 8
    python3 bench/bench_train.py --device cuda --full --tokens data/tokens   # full-size model, bf16
    python3 bench/bench_train.py --tokens data/tokens --mixed --no-naive     # train.batching bucket vs mixed

Ours: length-bucketed batches under a token budget (vaepipe.ml.data.token_batches), packed
LSTMs, the vocabulary projection only at real positions, lengths kept on the host (no GPU
syncs), bf16 autocast on CUDA. Straightforward: fixed-size batches padded to the longest
allowed length, unpacked LSTMs, logits at every position, fp32 -- what most text-VAE code
does. Both train the same architecture with AdamW; tokens/s counts real tokens (+ <eos>),
never padding. Repeats alternate the two loops; medians are printed. ``--mixed`` adds our loop
with ``train.batching: mixed`` (random batches under a real-token budget) to the alternation.
Needs only torch, numpy and pyarrow (the token Parquet); no mlflow/prefect/yaml.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from vaepipe.ml.data import collate, mixed_batches, read_split, token_batches  # noqa: E402
from vaepipe.ml.estimators import gaussian_kl_per_dim
from vaepipe.ml.model import TextVAE, VAEConfig, reparameterize  # noqa: E402

# the CPU default (params.yaml) and the full-size GPU preset (params-gpu.yaml)
DEFAULT = dict(embed_dim=128, hidden_dim=256, encoder_hidden_dim=128, latent_dim=32, tie_embeddings=True, vocab=8000)
FULL = dict(embed_dim=512, hidden_dim=1024, encoder_hidden_dim=512, latent_dim=32, tie_embeddings=True, vocab=16000)


def synthetic(n: int, vocab: int, max_len: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Zipf-distributed ids with sentence-like lengths (log-normal, mean ~28 like sotu)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.2, 0.5, n).astype(np.int64), 1, max_len)
    ranks = np.minimum(rng.zipf(1.2, int(lengths.sum())), vocab - 4) + 3
    seqs = np.split(ranks.astype(np.int64), np.cumsum(lengths)[:-1])
    return seqs, lengths


def naive_step(model: TextVAE, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The straightforward forward pass: padded, unpacked, full (B, T1, V) logits."""
    enc, dec = model.encoder, model.decoder
    h, _ = enc.lstm(enc.embed(ids))  # (B, T, 2H) over padding too
    H = enc.lstm.hidden_size
    last = h[torch.arange(ids.size(0), device=ids.device), lengths - 1, :H]
    mu, logvar = enc.to_posterior(torch.cat([last, h[:, 0, H:]], -1)).chunk(2, -1)
    z = reparameterize(mu, logvar)
    inp, tgt = model._decoder_io(ids, lengths)
    out, _ = dec.lstm(dec._inputs(inp, z), dec._init_state(z))  # (B, T1, H)
    logits = model.logits(dec.drop(out))  # (B, T1, V), padding included
    recon = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=model.cfg.pad_id, reduction="sum")
    return (recon + gaussian_kl_per_dim(mu, logvar).sum()) / (lengths + 1).sum()


def gpu_util_sampler(stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        try:
            out.append(float(torch.cuda.utilization()))
        except Exception:
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=5)
                out.append(float(r.stdout.split()[0]))
            except Exception:
                return
        stop.wait(0.2)


def timed(fn, steps: int, device: torch.device) -> tuple[float, float | None]:
    """Run ``fn(i)`` for i < steps; tokens/s and mean GPU utilisation (None on CPU)."""
    fn(-1)  # warm-up (allocator, cuDNN plans)
    if device.type == "cuda":
        torch.cuda.synchronize()
    util: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=gpu_util_sampler, args=(stop, util), daemon=True) if device.type == "cuda" else None
    if th:
        th.start()
    t0, tokens = time.perf_counter(), 0
    for i in range(steps):
        tokens += fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if th:
        stop.set()
        th.join()
    return tokens / dt, (statistics.mean(util) if util else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=Path, help="token Parquet directory (default: synthetic data)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--full", action="store_true", help="full-size model: emb 512, hidden 1024, z 32, vocab 16k")
    ap.add_argument("--batch-tokens", type=int, default=None, help="default 4096 (CPU) / 32768 (--full)")
    ap.add_argument("--max-len", type=int, default=64, help="padded width of the straightforward loop")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--no-naive", action="store_true", help="only our loop (e.g. when the naive one runs out of memory)")
    ap.add_argument("--mixed", action="store_true", help="also time our loop on mixed batches (train.batching: mixed)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    spec = FULL if a.full else DEFAULT
    batch_tokens = a.batch_tokens or (32768 if a.full else 4096)
    amp = device.type == "cuda"

    if a.tokens:
        split = read_split(a.tokens, "train")
        seqs, lengths = split.seqs, split.lengths
        vocab = int(max(s.max() for s in seqs)) + 1
        vocab = max(vocab, spec["vocab"]) if a.full else vocab
    else:
        vocab = spec["vocab"]
        seqs, lengths = synthetic(60_000, vocab, a.max_len)
    keep = lengths <= a.max_len
    seqs = [s for s, k in zip(seqs, keep) if k]
    lengths = lengths[keep]
    cfg = VAEConfig(kind="vae", vocab_size=vocab, embed_dim=spec["embed_dim"], hidden_dim=spec["hidden_dim"],
                    latent_dim=spec["latent_dim"], num_layers=1, num_heads=4, encoder="lstm", decoder="lstm",
                    dropout=0.1, bn_gamma=0.7, encoder_hidden_dim=spec["encoder_hidden_dim"],
                    tie_embeddings=spec["tie_embeddings"])
    torch.manual_seed(0)
    ours_model = TextVAE(cfg).to(device).train()
    naive_model = TextVAE(cfg).to(device).train()
    opt_o = torch.optim.AdamW(ours_model.parameters(), lr=1e-3)
    opt_n = torch.optim.AdamW(naive_model.parameters(), lr=1e-3)
    if a.mixed:  # a third model only when it is timed
        mixed_model = TextVAE(cfg).to(device).train()
        opt_m = torch.optim.AdamW(mixed_model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    buckets = token_batches(lengths, batch_tokens, shuffle=True, generator=rng)
    mixed = mixed_batches(lengths, batch_tokens, generator=rng) if a.mixed else []
    per_batch = max(1, batch_tokens // (a.max_len + 1))
    order = rng.permutation(len(seqs))
    fixed = [order[i : i + per_batch] for i in range(0, len(order) - per_batch + 1, per_batch)]

    def our_step(model: TextVAE, opt: torch.optim.Optimizer, idx: np.ndarray) -> int:
        ids, lens = collate([seqs[j] for j in idx])
        if device.type == "cuda":
            ids = ids.pin_memory().to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            t = model(ids, lens)
        loss = (t.recon.sum() + t.kl.sum()) / t.n_tokens.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        return int((lens + 1).sum())

    def ours(i: int) -> int:
        return our_step(ours_model, opt_o, buckets[(i + 1) % len(buckets)])

    def ours_mixed(i: int) -> int:
        return our_step(mixed_model, opt_m, mixed[(i + 1) % len(mixed)])

    def naive(i: int) -> int:
        idx = fixed[(i + 1) % len(fixed)]
        ids = torch.zeros(len(idx), a.max_len, dtype=torch.long)
        for r, j in enumerate(idx):
            ids[r, : len(seqs[j])] = torch.from_numpy(seqs[j])
        lens = torch.from_numpy(lengths[idx])
        loss = naive_step(naive_model, ids.to(device), lens.to(device))
        opt_n.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(naive_model.parameters(), 5.0)
        opt_n.step()
        return int((lens + 1).sum())

    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, model emb {cfg.embed_dim} hidden {cfg.hidden_dim} enc {cfg.encoder_hidden_dim} "
          f"z {cfg.latent_dim} vocab {vocab}, {sum(p.numel() for p in ours_model.parameters()) / 1e6:.1f}M params, "
          f"data {'synthetic' if not a.tokens else a.tokens} ({len(seqs)} records, mean length {lengths.mean():.1f}), "
          f"batch_tokens {batch_tokens}, naive batch {per_batch} x {a.max_len}", flush=True)
    rows: dict[str, list[float]] = {"ours": [], "naive": [], "mixed": []}
    utils: list[float] = []
    for r in range(a.repeats):
        tps, util = timed(ours, a.steps, device)
        rows["ours"].append(tps)
        if util is not None:
            utils.append(util)
        line = f"repeat {r}: ours {tps:,.0f} tokens/s" + (f" (GPU util {util:.0f}%)" if util is not None else "")
        if not a.no_naive:
            tps_n, _ = timed(naive, a.steps, device)
            rows["naive"].append(tps_n)
            line += f", straightforward {tps_n:,.0f} tokens/s, ratio {tps / tps_n:.2f}x"
        if a.mixed:
            tps_m, _ = timed(ours_mixed, a.steps, device)
            rows["mixed"].append(tps_m)
            line += f", ours on mixed batches {tps_m:,.0f} tokens/s ({tps_m / tps:.2f} of bucketed)"
        print(line, flush=True)
    med = statistics.median(rows["ours"])
    msg = f"median: ours {med:,.0f} tokens/s"
    if rows["naive"]:
        med_n = statistics.median(rows["naive"])
        msg += f", straightforward {med_n:,.0f} tokens/s, speed-up {med / med_n:.2f}x"
    if rows["mixed"]:
        med_m = statistics.median(rows["mixed"])
        ratios = [m / o for m, o in zip(rows["mixed"], rows["ours"], strict=True)]
        msg += f", mixed batches {med_m:,.0f} tokens/s (median ratio to bucketed {statistics.median(ratios):.2f})"
    if utils:
        msg += f", GPU utilisation {statistics.median(utils):.0f}%"
    if device.type == "cuda":
        msg += f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    print(msg)


if __name__ == "__main__":
    main()
