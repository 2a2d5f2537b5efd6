"""What MLflow tracking costs the training loop: NullTracker vs MlflowTracker in one process.

    python bench/bench_tracking.py --log-every 20   # train.log_every's default
    python bench/bench_tracking.py --log-every 1    # the worst case

A small TextVAE training step (batch 32 x 32 tokens of random ids, forward + backward + AdamW,
1 torch thread) runs ``--steps`` steps with the no-op tracker and as many with
``MlflowTracker`` (one run, system metrics on unless ``--no-system-metrics``, a sqlite store in
a temporary directory), alternating in ABBA blocks of ``--block`` steps so that load changes on
a shared machine hit both alike. Every ``--log-every`` steps the loop logs train.py's seven
metrics (loss, recon, kl, beta, lr, grad_norm, tokens_per_s), accumulated the same way.

Printed:
- median step wall time per tracker (noisy on a shared machine);
- training-thread CPU per step (``time.thread_time``): what the tracker costs the loop itself;
- the tracker's own threads' CPU over the whole run (sender + system sampler, read from their
  per-thread CPU clocks before ``end``) as a share of the training CPU of the MLflow blocks;
  as a cross-check, the process CPU outside the training thread (any thread: torch's, the
  interpreter's), which should be about the same;
- per-call costs: ``log_metrics`` (enqueue), a synchronous ``MlflowClient.log_metric`` to the
  same store (what logging on the training thread would cost), ``log_batch`` split into a cost
  per request and per point (thread CPU, fitted from 1- and 1000-point requests), and one
  system-metrics sample;
- how many logged points reached the store.

The one MLflow run stays open through the null blocks too, so its background threads (the
sender finishing a batch, the sampler every 10 s) also run during null blocks: the wall-clock
comparison understates MLflow's cost by that overlap, the per-thread CPU figure does not (it
counts the tracker threads' work wherever it happened). The sender runs Python (SQLAlchemy)
code, so it can hold the GIL while the training thread waits: that shows in the tail of the
``log_metrics`` wall times and in step wall time, not in the training thread's CPU.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from vaepipe.core.config import TrackingConfig, TrainConfig  # noqa: E402
from vaepipe.core.tracking import NullTracker, Tracker  # noqa: E402
from vaepipe.ml.model import TextVAE, VAEConfig  # noqa: E402
from vaepipe.ml.schedules import beta_at, lr_at  # noqa: E402
from vaepipe.stages.train import objective  # noqa: E402


def make_model(args: argparse.Namespace) -> TextVAE:
    cfg = VAEConfig(kind="vae", vocab_size=args.vocab, embed_dim=args.embed_dim, hidden_dim=args.hidden_dim,
                    latent_dim=args.latent_dim, num_layers=1, num_heads=4, encoder="lstm", decoder="lstm",
                    dropout=0.1, bn_gamma=0.7, encoder_hidden_dim=args.hidden_dim // 2, tie_embeddings=True)
    torch.manual_seed(0)
    return TextVAE(cfg)


class Loop:
    """train.py's step and its windowed metrics, minus data loading and validation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = make_model(args)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2e-3)
        self.cfg = TrainConfig(warmup_steps=20, kl_warmup_steps=200)
        self.total = 2 * args.steps
        self.gen = torch.Generator().manual_seed(1)
        self.window = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}
        self.step = 0
        self.log_calls: list[tuple[float, float]] = []  # (wall s, thread CPU s) of each log_metrics

    def run_step(self, tracker: Tracker) -> None:
        a = self.args
        ids = torch.randint(4, a.vocab, (a.batch, a.seq_len), generator=self.gen)
        lengths = torch.full((a.batch,), a.seq_len, dtype=torch.int64)
        beta, lr = beta_at(self.step, self.cfg), lr_at(self.step, self.cfg, self.total)
        for g in self.opt.param_groups:
            g["lr"] = lr
        terms = self.model(ids, lengths)
        loss = objective(terms, beta, 0.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()
        self.step += 1
        w = self.window
        w["n"] += 1
        w["tokens"] += int((lengths + 1).sum())
        w["loss"] += loss.detach()
        w["recon"] += terms.recon.detach().mean()
        w["kl"] += terms.kl.detach().mean()
        if self.step % a.log_every == 0:
            now = time.perf_counter()
            m = {"loss": float(w["loss"]) / w["n"], "recon": float(w["recon"]) / w["n"],
                 "kl": float(w["kl"]) / w["n"], "beta": beta, "lr": lr, "grad_norm": float(gnorm),
                 "tokens_per_s": w["tokens"] / max(now - w["t"], 1e-9)}
            t0, c0 = time.perf_counter(), time.thread_time()
            tracker.log_metrics(m, step=self.step)
            if not isinstance(tracker, NullTracker):
                self.log_calls.append((time.perf_counter() - t0, time.thread_time() - c0))
            w.update(loss=0.0, recon=0.0, kl=0.0, n=0, tokens=0, t=now)


def thread_cpu(threads: list[threading.Thread]) -> float:
    """CPU seconds of live threads, from their per-thread clocks (Linux, macOS)."""
    total = 0.0
    for t in threads:
        if t.is_alive() and t.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, AttributeError):
                pass
    return total


def per_call_costs(uri: str, run_id: str, step_s: float, args: argparse.Namespace) -> dict[str, float]:
    """Synchronous costs measured on the main thread, outside the ABBA blocks."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(args.sync_calls):
        client.log_metric(run_id, "sync_probe", float(i), step=i)
    out["sync_log_metric_ms"] = 1000 * (time.perf_counter() - t0) / args.sync_calls
    out["sync_every_step_share"] = 7 * out["sync_log_metric_ms"] / 1000 / step_s

    def batch_cpu(n: int, reps: int, key: str) -> float:
        c0 = time.thread_time()
        for r in range(reps):
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(key, float(i), ts, r * n + i) for i in range(n)],
                             synchronous=True)
        return (time.thread_time() - c0) / reps

    one, big = batch_cpu(1, 10, "batch_probe_1"), batch_cpu(1000, 3, "batch_probe_1000")
    out["log_batch_point_ms"] = 1000 * (big - one) / 999
    out["log_batch_request_ms"] = 1000 * one - out["log_batch_point_ms"]

    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    c0 = time.thread_time()
    for _ in range(5):
        for m in monitors:
            m.collect_metrics()
            m.aggregate_metrics()
            m.clear_metrics()
    out["system_sample_ms"] = 1000 * (time.thread_time() - c0) / 5
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-every", type=int, default=20, help="log the seven metrics every N steps (train.log_every)")
    p.add_argument("--steps", type=int, default=300, help="steps per tracker")
    p.add_argument("--block", type=int, default=10, help="steps per ABBA block")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--no-system-metrics", action="store_true")
    p.add_argument("--sync-calls", type=int, default=20, help="synchronous log_metric calls to time")
    args = p.parse_args()
    if args.steps % args.block:
        p.error("--steps must be a multiple of --block")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from mlflow.utils.validation import MAX_METRICS_PER_BATCH  # noqa: F401 - fail early without mlflow

    from vaepipe.adapters.tracking_mlflow import MlflowTracker

    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        mlf = MlflowTracker(TrackingConfig(uri=uri, experiment="bench", system_metrics=not args.no_system_metrics))
        mlf.start(run_name=f"bench-log-every-{args.log_every}")
        run_id = mlf.run_id
        null = NullTracker()
        loop = Loop(args)
        for _ in range(args.block):  # warm-up: allocator, autograd graph, first AdamW state
            loop.run_step(null)
        loop.step = 0
        wall: dict[str, list[float]] = {"null": [], "mlflow": []}
        cpu: dict[str, list[float]] = {"null": [], "mlflow": []}
        other_cpu = {"null": 0.0, "mlflow": 0.0}  # process CPU outside the training thread
        blocks = args.steps // args.block
        order = ["null", "mlflow", "mlflow", "null"] * (blocks // 2) + ["null", "mlflow"] * (blocks % 2)
        tracker_threads = list(mlf._threads)  # the sender and the system sampler
        cpu_threads0 = thread_cpu(tracker_threads)
        print(f"{2 * args.steps} steps in {len(order)} ABBA blocks of {args.block}, log every {args.log_every}, "
              f"torch threads {args.threads}, store {uri}", flush=True)
        for name in order:
            tracker = null if name == "null" else mlf
            p0, t0 = time.process_time(), time.thread_time()
            for _ in range(args.block):
                w0, c0 = time.perf_counter(), time.thread_time()
                loop.run_step(tracker)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.thread_time() - c0)
            other_cpu[name] += (time.process_time() - p0) - (time.thread_time() - t0)
        sender_cpu = thread_cpu(tracker_threads) - cpu_threads0
        med_null = statistics.median(wall["null"])
        costs = per_call_costs(uri, run_id, med_null, args)
        t_end = time.perf_counter()
        mlf.end()
        end_s = time.perf_counter() - t_end
        from mlflow import MlflowClient

        stored = len(MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"))

    expected = args.steps // args.log_every
    train_cpu = {k: sum(v) for k, v in cpu.items()}
    w_null, w_mlf = med_null, statistics.median(wall["mlflow"])
    c_null, c_mlf = train_cpu["null"] / args.steps, train_cpu["mlflow"] / args.steps
    enqueue = sorted(loop.log_calls)
    print(f"median step wall       null {1000 * w_null:8.1f} ms   mlflow {1000 * w_mlf:8.1f} ms   "
          f"({100 * (w_mlf / w_null - 1):+.1f} %)")
    print(f"training-thread CPU    null {1000 * c_null:8.2f} ms   mlflow {1000 * c_mlf:8.2f} ms   "
          f"({100 * (c_mlf / c_null - 1):+.2f} %) per step")
    print(f"tracker threads' CPU   {1000 * sender_cpu:.1f} ms = {100 * sender_cpu / train_cpu['mlflow']:.2f} % "
          f"of the training CPU in MLflow blocks (per-thread clocks)")
    other = other_cpu["null"] + other_cpu["mlflow"]
    print(f"cross-check: process CPU outside the training thread {1000 * other:.1f} ms "
          f"(during null blocks {1000 * other_cpu['null']:.1f}, MLflow blocks {1000 * other_cpu['mlflow']:.1f})")
    if enqueue:
        p95 = enqueue[min(len(enqueue) - 1, int(0.95 * len(enqueue)))][0]
        print(f"log_metrics (7 metrics) on the training thread: median {1e6 * statistics.median(w for w, _ in enqueue):.1f} us wall, "
              f"{1e6 * statistics.median(c for _, c in enqueue):.1f} us CPU; wall p95 {1e6 * p95:.0f} us, "
              f"max {1e6 * enqueue[-1][0]:.0f} us ({len(enqueue)} calls)")
    print(f"synchronous MlflowClient.log_metric: {costs['sync_log_metric_ms']:.2f} ms per call; seven per step "
          f"would be {100 * costs['sync_every_step_share']:.0f} % of a median null step")
    print(f"log_batch thread CPU: {costs['log_batch_request_ms']:.2f} ms per request + "
          f"{costs['log_batch_point_ms']:.3f} ms per point;  one system-metrics sample: "
          f"{costs['system_sample_ms']:.2f} ms CPU")
    print(f"end(): {end_s:.2f} s;  points stored: {stored} of {expected}")


if __name__ == "__main__":
    main()
