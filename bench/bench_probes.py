"""Downstream probes at a training budget: the VAE's posterior means against LSA.

    python3 bench/bench_probes.py --work /tmp/probes                         # default budget, seed 1234
    python3 bench/bench_probes.py --work /tmp/probes --steps 1400 4200 --seeds 1 2 3
    python3 bench/bench_probes.py --work /tmp/probes --tag bow1 --set train.bow_weight=1.0
    python3 bench/bench_probes.py --work /tmp/probes --model DIR --which last   # probes of a kept model only

Runs ingest and tokenize once into ``--work`` (params.yaml's corpus and tokenizer settings), then
for each budget (``train.max_steps``) and seed trains the VAE (kept under
``--work/models/TAG-sSEED-STEPS``; an existing one is reused) and runs evaluate's probe section
(``vaepipe.stages.probes.downstream``, the same code and labels as ``vaepipe evaluate``). Prints
one row per run and label and appends it, with the machine's load average and the times, as
one JSON line to ``--out``. ``--set`` takes params overrides like the CLI (the levers: e.g.
``train.bow_weight=1``, ``model.bn_gamma=1``, ``train.free_bits=0.5``, ``model.encoder_pooling=mean``).

``--export-dim N`` probes, instead of the means themselves, their projections on the top-N
principal directions of the probe's train sample of means (and LSA at N dimensions): how a
larger latent (``model.latent_dim=64``) would serve a consumer through an N-d export.

Each row also carries the kept checkpoint's validation metrics (``val``: ``val_elbo`` is the
one-sample -ELBO per sentence, in nats, that training selected the checkpoint by); the
importance-weighted NLL is not measured here: run ``vaepipe evaluate`` on a kept model for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaepipe.core.config import load_params  # noqa: E402
from vaepipe.ml.checkpoint import load_model  # noqa: E402
from vaepipe.stages import ingest, probes, tokenize, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class PrincipalMeans(torch.nn.Module):
    """A model whose ``encode`` gives the posterior means projected on ``components`` (N, Z)
    after subtracting ``center`` (Z,): what probes.downstream sees as an N-d latent."""

    def __init__(self, model: torch.nn.Module, center: np.ndarray, components: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.cfg = dataclasses.replace(model.cfg, latent_dim=components.shape[0])
        self.center = torch.from_numpy(center)
        self.components = torch.from_numpy(components)

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.model.encode(ids, lengths)
        return (mu.double() - self.center) @ self.components.T, logvar


def principal_directions(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Center (Z,) and the top-``n`` principal directions (n, Z) of the rows of ``x``, each
    direction's sign fixed so that its largest-magnitude loading is positive."""
    center = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - center, full_matrices=False)
    comps = vt[:n]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    return center, comps * signs[:, None]


def project_on_train_pcs(model: torch.nn.Module, params, n: int) -> PrincipalMeans:
    """``model`` exporting its means on the top-``n`` principal directions of the probe's train sample."""
    ev = params.evaluate
    sample = probes.read_sample(params.paths.corpus, params.paths.tokens, "train", [],
                                max_docs=ev.probe_max_docs, seed=params.seed)
    mu = probes.posterior_means(model, sample.tokens, batch_tokens=ev.batch_tokens, device=torch.device("cpu"))
    return PrincipalMeans(model, *principal_directions(mu, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="corpus, tokens and models go here")
    ap.add_argument("--steps", type=int, nargs="+", default=[1400], help="train.max_steps budgets")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234])
    ap.add_argument("--tag", default="default", help="names the models of this lever setting")
    ap.add_argument("--set", action="append", default=[], help="params override, section.key=value")
    ap.add_argument("--threads", type=int, default=0, help="train.num_threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines (default: WORK/results.jsonl)")
    ap.add_argument("--model", type=Path, default=None,
                    help="probe this model directory (e.g. a training's checkpoints so far) instead of training")
    ap.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of --model")
    ap.add_argument("--export-dim", type=int, default=0,
                    help="probe the means' projections on the top-N principal directions of the train sample")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vaepipe.stages.train").setLevel(logging.INFO)  # progress: one line per log_every steps
    work = args.work.resolve()
    out = args.out or work / "results.jsonl"
    base = load_params(ROOT / "params.yaml", [
        f"paths.corpus={work / 'corpus'}", f"paths.tokenizer={work / 'tokenizer'}", f"paths.tokens={work / 'tokens'}",
        f"paths.reports={work / 'reports'}", f"paths.embeddings={work / 'embeddings'}",
        f"paths.baseline={work / 'lm'}", "tracking.enabled=false", "train.device=cpu", "evaluate.device=cpu",
        f"train.num_threads={args.threads}", *args.set])
    if not (work / "corpus").is_dir():
        ingest.run(base)
    if not (work / "tokens").is_dir():
        tokenize.run(base)
    for steps in args.steps:
        for seed in args.seeds:
            model_dir = args.model or work / "models" / f"{args.tag}-s{seed}-{steps}"
            params = base.replace(seed=seed, train={"max_steps": steps}, paths={"model": str(model_dir)})
            t0 = time.time()
            if not (model_dir / "config.json").is_file():
                train.run(params)
            t_train = time.time() - t0
            model, _ = load_model(str(model_dir), args.which, torch.device("cpu"))
            state = torch.load(model_dir / f"{args.which}.pt", map_location="cpu", weights_only=False)
            trained_steps = int(state["step"])
            t1 = time.time()
            if args.export_dim:
                model = project_on_train_pcs(model, params, args.export_dim)
            ev = params.evaluate
            section = probes.downstream(model, ev.probe_labels, corpus_dir=params.paths.corpus,
                                        tokens_dir=params.paths.tokens, max_docs=ev.probe_max_docs,
                                        min_docs=ev.probe_min_docs, batch_tokens=ev.batch_tokens,
                                        device=torch.device("cpu"), seed=params.seed)
            row = {"tag": args.tag, "set": args.set, "seed": seed, "steps": steps, "checkpoint_step": trained_steps,
                   "export_dim": args.export_dim or None, "val": state.get("metrics", {}),
                   "train_s": round(t_train, 1),
                   "probe_s": round(time.time() - t1, 1), "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "probes": section}
            with out.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            for name, m in section.items():
                print(f"{args.tag} seed {seed} steps {steps} (checkpoint step {trained_steps}) {name}:"
                      f" acc VAE {m['acc_vae']:.3f} LSA {m['acc_lsa']:.3f}"
                      f" diff {m['acc_diff']:+.3f} [{m['acc_diff_ci95'][0]:+.3f}, {m['acc_diff_ci95'][1]:+.3f}];"
                      f" kNN VAE {m['knn_vae']:.3f} LSA {m['knn_lsa']:.3f} diff {m['knn_diff']:+.3f}"
                      f" [{m['knn_diff_ci95'][0]:+.3f}, {m['knn_diff_ci95'][1]:+.3f}];"
                      f" majority {m['majority']:.3f}; n {m['n_train']}/{m['n_test']}", flush=True)
            if "val_elbo" in row["val"]:
                print(f"{args.tag} seed {seed} steps {steps}: val -ELBO {row['val']['val_elbo']:.2f}", flush=True)


if __name__ == "__main__":
    main()
