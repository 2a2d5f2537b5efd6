"""Compare remedies for posterior collapse under one training budget on the default corpus.

    python bench/collapse_sweep.py --variant bn07 --steps 250 --out bench/out/sweep   # one variant
    python bench/collapse_sweep.py --score bn07 --out bench/out/sweep                 # (re)score it
    python bench/collapse_sweep.py --report bench/out/sweep                           # the table

Every variant trains the same architecture for the same number of steps from params.yaml plus
the shared overrides below (same seed, so the same batches in the same order), then scores the
validation split: the beta = 1 ELBO (training's own validation), KL, active units
(Cov_x E_q[z|x] > 0.01), mutual information I(x; z) over the aggregate posterior of the scored
documents, and an importance-weighted NLL (K samples), next to the LM baseline's exact NLL.
Needs the default data (`vaepipe ingest && vaepipe tokenize`). Tracking is off.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

VARIANTS: dict[str, list[str]] = {
    "lm": ["model.kind=lm"],
    "linear": ["train.kl_schedule=linear"],
    "cyclical": ["train.kl_schedule=cyclical", "train.kl_cycles=4", "train.kl_warmup_steps={cycle}"],
    "li_ae_fb": ["train.ae_pretrain_steps={ae}", "train.free_bits=0.25"],
    "fb": ["train.free_bits=0.25"],
    "bn06": ["model.bn_gamma=0.6"],
    "bn07": ["model.bn_gamma=0.7"],
    "bn07_wd": ["model.bn_gamma=0.7", "train.word_dropout=0.25"],
}


def shared(steps: int) -> list[str]:
    # bn_gamma=0 unless the variant sets it: the sweep compares remedies from a plain VAE
    return [f"train.max_steps={steps}", f"train.kl_warmup_steps={max(1, steps * 2 // 5)}",
            f"train.warmup_steps={max(1, steps // 10)}", "train.eval_every=0", "train.patience=0",
            "model.bn_gamma=0", "train.free_bits=0", "train.word_dropout=0", "train.ae_pretrain_steps=0",
            "train.kl_schedule=linear", "tracking.enabled=false", "train.device=cpu"]


def score(model_dir: Path, tokens: str, docs: int, k: int, which: str = "best") -> dict[str, float]:
    """beta = 1 ELBO, KL, AU and MI on the first ``docs`` validation records; IW-NLL (K = k) on them."""
    from vaepipe.ml import checkpoint as ckpt
    from vaepipe.ml.data import iter_batches, read_split
    from vaepipe.ml.estimators import active_units, iw_log_marginal, iw_log_weights, mutual_info_aggregate, sample_diag
    from vaepipe.stages.train import evaluate_loss

    valid = read_split(tokens, "valid", max_docs=docs)
    model, config = ckpt.load_model(model_dir, which=which)
    out: dict[str, float] = {"step": float(ckpt.load_state(model_dir / f"{which}.pt").get("step", -1))}
    out.update(evaluate_loss(model, valid, 8192, torch.device("cpu"), amp=False, seed=0))
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if config["model"]["kind"] == "lm":
            out["nll"] = out["val_elbo"]  # exact for the LM
            return out
        mus, lvs, log_px = [], [], 0.0
        for _, ids, lengths in iter_batches(valid, max(1, 16384 // k)):
            mu, lv = model.encode(ids, lengths)
            z = sample_diag(mu, lv, k, g)  # (B, K, Z)
            b = ids.size(0)
            ll = model.log_likelihood(ids.repeat_interleave(k, 0), lengths.repeat_interleave(k, 0),
                                      z.reshape(b * k, -1)).view(b, k)
            log_px += float(iw_log_marginal(iw_log_weights(ll, z, mu, lv)).sum())
            mus.append(mu)
            lvs.append(lv)
        mu, lv = torch.cat(mus), torch.cat(lvs)
        out["iw_nll"] = -log_px / len(valid)
        out["au"] = float(active_units(mu)[0])
        out["mi"] = mutual_info_aggregate(mu, lv, generator=g)
    return out


def score_dir(out: Path, name: str, tokens: str, docs: int, k: int) -> None:
    """Score a variant's finished model, or the last.pt of one stopped early (SIGINT)."""
    base = out / name
    kind_dir = "lm" if name == "lm" else "vae"
    final, partial = base / kind_dir, base / f".{kind_dir}.partial"
    model_dir, which = (final, "best") if (final / "best.pt").is_file() else (partial, "last")
    row = {"variant": name, "scored": f"{model_dir.name}/{which}.pt", "docs": docs, "k": k}
    row.update({key: round(v, 4) for key, v in score(model_dir, tokens, docs, k, which).items()})
    (out / f"{name}.scored.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)


def run_variant(name: str, steps: int, out: Path, docs: int, k: int, params_file: str) -> None:
    from vaepipe.core.config import load_params
    from vaepipe.stages import train

    sets = [s.format(cycle=max(1, steps // 8), ae=steps * 3 // 10) for s in VARIANTS[name]]
    d = out / name
    params = load_params(params_file, [*shared(steps), *sets, f"paths.model={d}/vae", f"paths.baseline={d}/lm"])
    t0 = time.perf_counter()
    res = train.run(params)
    wall = time.perf_counter() - t0
    row = {"variant": name, "steps": res.steps, "train_wall_s": round(wall, 1),
           "tokens_per_s": round(res.tokens_per_s), "overrides": sets,
           **{k2: round(v, 4) for k2, v in res.best_val.items()}}
    (out / f"{name}.train.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    score_dir(out, name, params.paths.tokens, docs, k)


def report(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.scored.json"))]
    lm = next((r for r in rows if r["variant"] == "lm"), None)
    cols = ["variant", "step", "val_elbo", "val_recon", "val_kl", "iw_nll", "au", "mi"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if r["variant"] == "lm":
            r = {**r, "iw_nll": r.get("nll"), "val_kl": 0}
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if lm:
        print(f"\nLM baseline exact NLL on the same documents: {lm['nll']:.3f} nats/sentence")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--out", type=Path, default=Path("bench/out/sweep"))
    ap.add_argument("--docs", type=int, default=400, help="validation documents scored for IW-NLL/MI/AU")
    ap.add_argument("--k", type=int, default=50, help="importance samples for the IW-NLL")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", type=Path, metavar="DIR")
    ap.add_argument("--score", metavar="VARIANT", help="(re)score a variant's model under --out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    if a.report:
        report(a.report)
    elif a.score:
        from vaepipe.core.config import load_params

        score_dir(a.out, a.score, load_params(a.params).paths.tokens, a.docs, a.k)
    elif a.variant:
        a.out.mkdir(parents=True, exist_ok=True)
        run_variant(a.variant, a.steps, a.out, a.docs, a.k, a.params)
    else:
        sys.exit("give --variant NAME or --report DIR")


if __name__ == "__main__":
    main()
