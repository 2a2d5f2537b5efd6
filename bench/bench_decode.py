"""Benchmark of decoding (vaepipe/ml/decoding.py): sentences/s, batched vs one at a time.

For greedy, beam search (5 beams) and nucleus sampling (top_p 0.9) it decodes the same latent
vectors twice in the same process, side by side:

  batched  decode_ids over all --sentences at once (what vaepipe.load, the CLI verbs and the
           MLflow model do)
  loop     decode_ids called once per sentence (what a per-sentence implementation costs),
           over the first --loop-sentences of them

repeats each --repeats times and prints the median sentences/s of each and their ratio.
The issue's target: batched beam search >= 5x the loop on CPU.

The model has the sizes of the ``model`` section of --params (default params.yaml, the CPU
default; params-gpu.yaml for the GPU preset) with random weights, unless --model names a
trained model folder. A random model would almost never emit <eos>, so its <eos> logit is
shifted (by bisection) so that greedy decoding ends sentences after about --mean-length tokens, like real
text (speed depends on lengths, not on what the tokens are; the table prints the lengths).

    python3 bench/bench_decode.py                                     # CPU default size
    python3 bench/bench_decode.py --sentences 200 --loop-sentences 40 --repeats 3
    python3 bench/bench_decode.py --params params-gpu.yaml --device cuda --sentences 2000
    python3 bench/bench_decode.py --model models/vae
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRATEGIES = {
    "greedy": {"strategy": "greedy"},
    "beam5": {"strategy": "beam", "beam_size": 5},
    "nucleus0.9": {"strategy": "sample", "top_p": 0.9},
}


def build_model(args: argparse.Namespace):
    import torch
    import yaml

    from vaepipe.ml.model import TextVAE, VAEConfig

    if args.model:
        from vaepipe.ml.checkpoint import load_model

        model, _ = load_model(args.model, device=args.device)
        return model
    params = yaml.safe_load(Path(args.params).read_text())
    m, vocab = params["model"], params["tokenize"]["vocab_size"]
    torch.manual_seed(0)
    cfg = VAEConfig(kind="vae", vocab_size=vocab, embed_dim=m["embed_dim"], hidden_dim=m["hidden_dim"],
                    latent_dim=m["latent_dim"], num_layers=m["num_layers"], num_heads=m["num_heads"],
                    encoder=m["encoder"], decoder=args.decoder or m["decoder"], dropout=m["dropout"],
                    bn_gamma=m["bn_gamma"], encoder_hidden_dim=m["encoder_hidden_dim"],
                    tie_embeddings=m["tie_embeddings"], share_embeddings=m["share_embeddings"])
    model = TextVAE(cfg).to(args.device).eval()
    calibrate_eos(model, args.mean_length, args.device)
    return model


def calibrate_eos(model, mean_length: float, device: str) -> None:
    """Shift a random model's <eos> logit until greedy decoding of 64 random latents gives
    sentences of about ``mean_length`` tokens (bisection on the shift)."""
    import torch

    from vaepipe.ml.decoding import Decoding, decode_ids

    cfg = model.cfg
    bias = model.out_bias if cfg.tie_embeddings else model.out.bias
    z = torch.randn(64, cfg.latent_dim, generator=torch.Generator().manual_seed(1)).to(device)
    dec = Decoding(max_tokens=int(4 * mean_length))
    start = float(bias[cfg.eos_id].detach())
    lo, hi = -20.0, 20.0  # a higher shift ends sentences sooner
    for _ in range(14):
        mid = (lo + hi) / 2
        with torch.no_grad():
            bias[cfg.eos_id] = start + mid
        lengths = [len(s) for s in decode_ids(model, z, dec)]
        if sum(lengths) / len(lengths) > mean_length:
            lo = mid
        else:
            hi = mid
    with torch.no_grad():
        bias[cfg.eos_id] = start + (lo + hi) / 2


def timed(fn) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="model sizes from this file's model section")
    ap.add_argument("--model", default=None, help="a trained model folder instead of random weights")
    ap.add_argument("--decoder", default=None, help="override model.decoder (lstm | transformer)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--loop-sentences", type=int, default=60, help="sentences of the one-at-a-time loop")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mean-length", type=float, default=25.0, help="random model: mean sentence length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    args = ap.parse_args()

    import torch

    from vaepipe.ml.decoding import Decoding, decode_ids

    torch.set_num_threads(args.threads)
    model = build_model(args)
    cfg = model.cfg
    z = torch.randn(args.sentences, cfg.latent_dim, generator=torch.Generator().manual_seed(0)).to(args.device)
    print(f"# decoder {cfg.decoder}, embed {cfg.embed_dim}, hidden {cfg.hidden_dim}, z {cfg.latent_dim}, "
          f"vocab {cfg.vocab_size}; device {args.device}, {args.threads} threads; {args.sentences} sentences "
          f"batched, {args.loop_sentences} in the loop; max_tokens {args.max_tokens}; {args.repeats} repeats",
          flush=True)
    print(f"{'strategy':<11} {'batched sent/s':>15} {'loop sent/s':>12} {'ratio':>7} {'mean len':>9} {'loop len':>9}")
    for name in args.strategies.split(","):
        dec = Decoding(**STRATEGIES[name], max_tokens=args.max_tokens, seed=1)
        zl = z[: args.loop_sentences]
        out: list[list[int]] = []
        out_loop: list[list[int]] = []

        def batched() -> None:
            out[:] = decode_ids(model, z, dec)

        def loop() -> None:
            out_loop[:] = [decode_ids(model, zl[i : i + 1], dec)[0] for i in range(zl.size(0))]

        decode_ids(model, z[:2], dec)  # warm-up
        fast, slow = [], []
        for _ in range(args.repeats):
            fast.append(args.sentences / timed(batched))
            slow.append(args.loop_sentences / timed(loop))
        b, s = statistics.median(fast), statistics.median(slow)
        mean_len = sum(map(len, out)) / len(out)
        loop_len = sum(map(len, out_loop)) / len(out_loop)
        print(f"{name:<11} {b:>15.1f} {s:>12.1f} {b / s:>6.1f}x {mean_len:>9.1f} {loop_len:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
