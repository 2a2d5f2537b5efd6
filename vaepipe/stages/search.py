"""Nearest-neighbour lookup over an embeddings export (``vaepipe neighbors``).

``neighbors(params, text, k)`` embeds a query the way ``vaepipe embed`` embedded the corpus
(same normalisation, tokenizer and encoder; the posterior mean) and returns the ``k``
documents whose exported vectors are most cosine-similar, with their text from the corpus.
The export itself (shards, manifest, provenance checks) is ``vaepipe.stages.embed``.

``top_k_cosine`` and ``lookup_texts`` need only numpy/pyarrow: they stream the export one
row group at a time, so memory does not grow with the corpus.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vaepipe.core.errors import ConfigError, InputError
from vaepipe.core.storage import staged
from vaepipe.ml.data import VERIFY_PAGES, open_parquet, parquet_files, reading_parquet
from vaepipe.stages.embed import (
    MANIFEST,
    META,
    RERUN_EMBED,
    fixed_list_to_numpy,
    load_checked_model,
    read_manifest,
)

if TYPE_CHECKING:
    from vaepipe.core.config import Params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbor:
    """One hit: 1-based ``rank``, cosine ``score`` in [-1, 1], the document and its text ("" if unknown)."""

    rank: int
    score: float
    doc_id: str
    split: str
    text: str


def neighbors(params: Params, text: str, k: int = 10) -> list[Neighbor]:
    """Embed ``text`` like the corpus was; the ``k`` most cosine-similar documents, best first.

    Reads the export in ``paths.embeddings`` (refused when it was made with another checkpoint
    than ``paths.model``) and the texts from ``paths.corpus``.
    """
    with staged(params, "search") as params:
        return _neighbors(params, text, k)


def _neighbors(params: Params, text: str, k: int) -> list[Neighbor]:
    out_dir = Path(params.paths.embeddings)
    manifest = read_manifest(out_dir)
    model, meta = load_checked_model(params, "cpu")
    if manifest["meta"].get(META + "model_sha256") != meta[META + "model_sha256"]:
        raise InputError(f"{out_dir / MANIFEST}: the export was made with another checkpoint than "
                         f"{params.paths.model}; rerun `vaepipe embed`")
    q = embed_query(model, params, text)
    hits = top_k_cosine([out_dir / s["file"] for s in manifest["shards"]], q, k)
    texts = lookup_texts(params.paths.corpus, [h[2] for h in hits])
    return [Neighbor(i + 1, score, doc_id, split, texts.get(doc_id, ""))
            for i, (score, _, doc_id, split) in enumerate(hits)]


def embed_query(model: torch.nn.Module, params: Params, text: str) -> np.ndarray:
    """The posterior mean (Z,) of ``text``, normalised and tokenized as ingest/tokenize do
    (``TextModel.encode``, the encoder of ``vaepipe.load``)."""
    from vaepipe.stages import tokenize
    from vaepipe.stages.textmodel import TextModel

    tokenizer = tokenize.load_tokenizer(params.paths.tokenizer)
    device = next(model.parameters()).device
    q = TextModel(model, tokenizer, device, lowercase=params.ingest.lowercase).encode([text], empty="nan")[0]
    if np.isnan(q).any():
        raise InputError(f"neighbors: the query {text!r} is empty after normalisation and tokenization")
    return q


def top_k_cosine(shard_files: list[Path], query: np.ndarray, k: int) -> list[tuple[float, int, str, str]]:
    """(score, row, doc_id, split) of the ``k`` rows most cosine-similar to ``query``, best first.

    Streams one row group at a time: argpartition keeps each chunk's best ``k``, a heap the
    overall best. Ties go to the earlier row, so the order is deterministic. A shard that is
    not valid Parquet or has a damaged page (checksum) is an InputError naming it.
    """
    q = query.astype(np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    best: list[tuple[float, int, str, str]] = []  # min-heap on (score, -row)
    row0 = 0
    for path in shard_files:
        batches = open_parquet(path, RERUN_EMBED).iter_batches(columns=["doc_id", "split", "mu"])
        while True:
            with reading_parquet(path, RERUN_EMBED):
                batch = next(batches, None)
            if batch is None:
                break
            mu = fixed_list_to_numpy(batch.column("mu"), len(q))
            norms = np.linalg.norm(mu, axis=1)
            scores = (mu @ q) / np.maximum(norms, 1e-12)
            top = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
            ids, splits = batch.column("doc_id"), batch.column("split")
            for i in top:
                item = (float(scores[i]), -(row0 + int(i)))
                if len(best) < k:
                    heapq.heappush(best, (*item, ids[i].as_py(), splits[i].as_py()))
                elif item > best[0][:2]:
                    heapq.heapreplace(best, (*item, ids[i].as_py(), splits[i].as_py()))
            row0 += batch.num_rows
    return [(s, -r, d, sp) for s, r, d, sp in sorted(best, reverse=True)]


def lookup_texts(corpus_dir: str | Path, doc_ids: list[str]) -> dict[str, str]:
    """doc_id -> text from the corpus Parquet (a filtered scan); {} with a warning if absent.

    A corpus file that is not valid Parquet or has a damaged page is an InputError naming it.
    """
    files = parquet_files(corpus_dir)
    if not files:
        log.warning("%s: no corpus Parquet; printing neighbours without their text", corpus_dir)
        return {}
    texts: dict[str, str] = {}
    for f in files:
        with reading_parquet(f, "vaepipe ingest"):
            table = pq.read_table(f, columns=["doc_id", "text"], filters=pc.field("doc_id").isin(doc_ids),
                                  **VERIFY_PAGES)
        texts.update(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist(), strict=True))
    return texts


def lookup_vectors(out_dir: str | Path, doc_ids: list[str], model_dir: str | Path | None = None) -> np.ndarray:
    """The exported posterior means of ``doc_ids``, one (Z,) float32 row per id, in that order.

    Streams the export in ``out_dir`` (shards named by its manifest). When ``model_dir`` is
    given, an export made with another checkpoint is refused (its vectors would decode to
    nonsense). ConfigError naming the first id that is not in the export.
    """
    from vaepipe.core.io import sha256_file
    from vaepipe.ml import checkpoint

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if model_dir is not None:
        best = Path(model_dir) / checkpoint.BEST
        if best.is_file() and manifest["meta"].get(META + "model_sha256") != sha256_file(best):
            raise InputError(f"{out_dir / MANIFEST}: the export was made with another checkpoint than "
                             f"{model_dir}; rerun `vaepipe embed` or pass that model with --model")
    z = int(manifest["meta"][META + "latent_dim"])
    wanted = set(doc_ids)
    found: dict[str, np.ndarray] = {}
    for s in manifest["shards"]:
        path = out_dir / s["file"]
        with reading_parquet(path, RERUN_EMBED):
            table = pq.read_table(path, columns=["doc_id", "mu"], filters=pc.field("doc_id").isin(list(wanted)),
                                  **VERIFY_PAGES)
        mu = fixed_list_to_numpy(table.column("mu"), z)
        for i, d in enumerate(table.column("doc_id").to_pylist()):
            found.setdefault(d, mu[i])
    missing = [d for d in doc_ids if d not in found]
    if missing:
        raise ConfigError(f"--ids: {missing[0]!r} is not in the export {out_dir}"
                          + (f" ({len(missing)} ids missing)" if len(missing) > 1 else ""))
    return np.stack([found[d] for d in doc_ids]).astype(np.float32)
