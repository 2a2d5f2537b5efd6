"""Helpers of the training loop that are not about learning: devices, seeds, signals,
progress display, provenance hashes and checks, and the final directory swap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaepipe.core.errors import ConfigError, InputError
from vaepipe.core.provenance import git_info

log = logging.getLogger("vaepipe.stages.train")


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one step's random stream (dropout, word dropout, z samples): resume-proof."""
    return int(np.random.SeedSequence([seed, rank + 1, step + 2]).generate_state(1, dtype=np.uint64)[0] >> 1)


def inner_step_seed(seed: int, rank: int, step: int, inner: int) -> int:
    """Seed of the ``inner``-th encoder-only update before step ``step`` (``train.aggressive_steps``):
    a stream of its own, apart from every step's, so resume-proof as well."""
    return int(np.random.SeedSequence([seed, rank + 1, step + 2, inner + 1]).generate_state(1, dtype=np.uint64)[0] >> 1)


def vocab_size_for(params: Any, max_id: int) -> tuple[int, Path | None]:
    """Vocabulary size from tokenizer.json (or tokens/_stats.json), checked against the data."""
    tok_file = Path(params.paths.tokenizer) / "tokenizer.json"
    size: int | None = None
    source = ""
    if tok_file.is_file():
        try:
            from tokenizers import Tokenizer

            size = Tokenizer.from_file(str(tok_file)).get_vocab_size(with_added_tokens=True)
        except Exception as e:  # a corrupt file: say which one
            raise InputError(f"{tok_file}: cannot load the tokenizer ({e})") from None
        source = str(tok_file)
    else:
        stats = Path(params.paths.tokens) / "_stats.json"
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            size = int(json.loads(stats.read_text())["vocab_size"])
            source = str(stats)
        if size is None:
            size = max_id + 1
            source = "the largest token id"
            log.warning("%s not found; vocabulary size taken from the data (%d)", tok_file, size)
        tok_file = None
    if max_id >= size:
        raise InputError(f"{params.paths.tokens}: token id {max_id} is outside the vocabulary of {size} ({source})")
    return size, tok_file


def data_fingerprint(tokens_dir: str | os.PathLike[str]) -> str:
    """sha256 over the token data (Parquet + _stats.json): the ``data_hash`` tag."""
    from vaepipe.core.io import sha256_tree

    return sha256_tree(tokens_dir)


def git_commit() -> str:
    """The ``git_commit`` tag: the project checkout's HEAD (see vaepipe.core.provenance), or
    "unknown" outside git. The MLflow tracker's commit tag comes from the same function."""
    return git_info().commit or "unknown"


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (after saving last.pt).

    Stopping mid-step would save half-updated weights; a second SIGINT stops at once.
    Handlers are installed only in the main thread (signal's rule) and restored afterwards.
    """

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class Progress:
    """A tqdm bar (loss, KL, tokens/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            except ImportError:
                pass
        self.total = total
        self.first = self.last = initial
        self.t0 = time.perf_counter()

    def update(self, step: int, m: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", kl=f"{m['kl']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}")
        else:
            per_step = (time.perf_counter() - self.t0) / max(step - self.first, 1)
            log.info("step %d/%d loss %.4f recon %.2f kl %.3f beta %.3f lr %.2e grad %.2f %.0f tok/s eta %.0fs",
                     step, self.total, m["loss"], m["recon"], m["kl"], m["beta"], m["lr"], m["grad_norm"],
                     m["tokens_per_s"], per_step * (self.total - step))
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
