"""Downstream probes: do the exported means serve a consumer better than LSA?

Evaluate's ``probes`` section. For each label of ``evaluate.probe_labels`` (a corpus column,
``source`` or one carried by ``ingest.keep_columns``, with an optional regex and numeric bucket)
it compares, on the test split, the VAE's posterior means with an LSA baseline (TF-IDF +
truncated SVD at the latent size, fitted on the train split in the same run):

- ``acc_vae`` / ``acc_lsa``: accuracy of a logistic-regression probe on standardised features,
  fitted on the train sample, scored on the test sample;
- ``knn_vae`` / ``knn_lsa``: kNN@10 same-label share: for each test document, the share of its
  10 nearest train documents (cosine) that carry its label, averaged;
- ``acc_diff`` / ``knn_diff`` (VAE - LSA) with ``*_ci95``, the paired bootstrap 95% interval
  over test documents (1,000 resamples, seeded);
- ``majority``: the accuracy of always answering the train sample's most frequent label.

Cost is bounded by ``evaluate.probe_max_docs``: at most that many documents of each split, a
seeded sample over the whole split (corpus order often follows time or source). A label that
cannot be probed (its regex matches nothing, one class, fewer than ``evaluate.probe_min_docs``
labelled test documents) gives a one-line warning and is left out; a label column that the corpus lacks
is an ``InputError`` naming it. Without scikit-learn (the ``probes`` extra) the section is
skipped with a warning.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from vaepipe.core.errors import InputError
from vaepipe.ml import estimators as est
from vaepipe.ml.data import (RERUN_TOKENIZE, TokenSplit, iter_batches, list_column_to_arrays, open_parquet,
                             parquet_files, reading_parquet, token_files)

if TYPE_CHECKING:
    from vaepipe.core.config import ProbeLabelConfig

log = logging.getLogger(__name__)

KNN_K = 10
RESAMPLES = 1000
INSTALL_HINT = "pip install 'vaepipe[probes]'"
RERUN_INGEST = "vaepipe ingest"


@dataclass
class ProbeSample:
    """The sampled documents of one split: token ids for the VAE, text and columns for LSA and labels."""

    tokens: TokenSplit
    texts: list[str]
    columns: dict[str, list[Any]]  # corpus column -> one value per document


def have_sklearn() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# Labels


def extract_labels(values: Sequence[Any], regex: str | None, bucket: int) -> list[str | None]:
    """The label of each column value, None where there is none.

    ``regex``: group 1 (else the whole match) of the first match is the label; no match, no
    label. ``bucket`` > 0: the label must read as a number and becomes the range of width
    ``bucket`` that holds it ("1775-1799" for 1790 and 25); one that does not is no label.
    """
    pattern = re.compile(regex) if regex is not None else None
    out: list[str | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        text = str(v)
        if pattern is not None:
            m = pattern.search(text)
            if m is None:
                out.append(None)
                continue
            text = m.group(1) if pattern.groups else m.group(0)
        out.append(_bucket(text, bucket) if bucket else text)
    return out


def _bucket(text: str, bucket: int) -> str | None:
    try:
        x = float(text)
    except ValueError:
        return None
    if not math.isfinite(x):
        return None
    lo = math.floor(x / bucket) * bucket
    return f"{lo}-{lo + bucket - 1}"


# ---------------------------------------------------------------------------------------
# Reading the sample


def _split_doc_ids(tokens_dir: str | Path, split: str) -> list[str]:
    """doc_ids of ``split`` in the token files, in file order."""
    ids: list[str] = []
    for f in token_files(tokens_dir):
        with reading_parquet(f, RERUN_TOKENIZE):
            for batch in open_parquet(f, RERUN_TOKENIZE).iter_batches(batch_size=1 << 16, columns=["doc_id", "split"]):
                keep = pc.equal(batch.column("split").cast(pa.string()), split)
                ids += batch.column("doc_id").filter(keep).to_pylist()
    return ids


def _read_rows(files: list[Path], columns: list[str], wanted: set[str], rerun: str) -> dict[str, dict[str, Any]]:
    """doc_id -> {column: value} of the rows of ``files`` whose doc_id is in ``wanted``."""
    rows: dict[str, dict[str, Any]] = {}
    want = pa.array(sorted(wanted), pa.string())
    for f in files:
        with reading_parquet(f, rerun):
            for batch in open_parquet(f, rerun).iter_batches(batch_size=1 << 16, columns=["doc_id", *columns]):
                batch = batch.filter(pc.is_in(batch.column("doc_id").cast(pa.string()), value_set=want))
                cols = {c: batch.column(c).to_pylist() for c in columns}
                for i, d in enumerate(batch.column("doc_id").to_pylist()):
                    rows.setdefault(d, {c: cols[c][i] for c in columns})
    return rows


def check_label_columns(corpus_dir: str | Path, labels: Sequence[ProbeLabelConfig]) -> list[Path]:
    """The corpus files; InputError (one line) naming a label column the corpus lacks."""
    files = parquet_files(corpus_dir)
    if not files:
        raise InputError(f"{corpus_dir}: no corpus Parquet files for the probe labels (paths.corpus; run "
                         f"`{RERUN_INGEST}`, or set evaluate.probe_labels: [])")
    names = set(open_parquet(files[0], RERUN_INGEST).schema_arrow.names)
    for i, lab in enumerate(labels):
        if lab.column not in names:
            raise InputError(f"{files[0]}: evaluate.probe_labels[{i}].column {lab.column!r} is no corpus column "
                             "(use source, or carry it with ingest.keep_columns and rerun ingest)")
    return files


def read_sample(corpus_dir: str | Path, tokens_dir: str | Path, split: str, columns: list[str], *,
                max_docs: int, seed: int) -> ProbeSample:
    """At most ``max_docs`` documents of ``split`` (seeded sample, kept in file order) with
    their token ids, corpus text and ``columns``; only documents present in both files."""
    ids = _split_doc_ids(tokens_dir, split)
    if len(ids) > max_docs:
        pick = np.sort(np.random.default_rng(seed).choice(len(ids), max_docs, replace=False))
        ids = [ids[i] for i in pick]
    wanted = set(ids)
    corpus = _read_rows(parquet_files(corpus_dir), ["text", *columns], wanted, RERUN_INGEST)
    toks = _read_rows(token_files(tokens_dir), ["ids"], wanted, RERUN_TOKENIZE)
    ids = [d for d in ids if d in corpus and d in toks]
    seqs = list_column_to_arrays(pa.array([toks[d]["ids"] for d in ids], pa.list_(pa.int64())))
    tokens = TokenSplit(doc_ids=ids, seqs=seqs, lengths=np.array([len(s) for s in seqs], dtype=np.int64))
    return ProbeSample(tokens, [corpus[d]["text"] for d in ids], {c: [corpus[d][c] for d in ids] for c in columns})


@torch.inference_mode()
def posterior_means(model: torch.nn.Module, split: TokenSplit, *, batch_tokens: int, device: torch.device) -> np.ndarray:
    """E[z|x] of every document of ``split``: (N, Z) float64, in the split's order."""
    out = np.empty((len(split), model.cfg.latent_dim))
    for idx, ids, lengths in iter_batches(split, batch_tokens):
        mu, _ = model.encode(ids.to(device), lengths)
        out[idx] = mu.double().cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------
# The measures (pure numpy / scikit-learn)


def lsa_features(train_texts: list[str], test_texts: list[str], dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF (sublinear tf) + truncated SVD to ``dim`` components, fitted on ``train_texts``."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(sublinear_tf=True)
    xtr = tfidf.fit_transform(train_texts)
    svd = TruncatedSVD(n_components=max(1, min(dim, xtr.shape[1] - 1)), random_state=seed)
    return svd.fit_transform(xtr), svd.transform(tfidf.transform(test_texts))


def probe_correct(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, seed: int) -> np.ndarray:
    """Per test document: did logistic regression on standardised features (fit on train) get its label?"""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(xtr, ytr)
    return (clf.predict(xte) == yte).astype(np.float64)


def knn_share(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Per test document: the share of its ``k`` nearest train documents (cosine) with its label."""
    k = min(k, len(xtr))
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    tr, te = unit(np.asarray(xtr, np.float64)), unit(np.asarray(xte, np.float64))
    out = np.empty(len(te))
    for i in range(0, len(te), 1024):  # (1024, N_train) similarities at a time
        sim = te[i : i + 1024] @ tr.T
        nbrs = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[i : i + 1024] = (ytr[nbrs] == yte[i : i + 1024, None]).mean(1)
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int, resamples: int = RESAMPLES) -> dict[str, Any]:
    """mean(a - b) and its paired bootstrap 95% interval (documents resampled together)."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    low, high = est.bootstrap_mean_ci(diff, resamples=resamples, level=0.95, seed=seed)
    return {"diff": float(diff.mean()), "diff_ci95": [low, high]}


def compare(vae: tuple[np.ndarray, np.ndarray], lsa: tuple[np.ndarray, np.ndarray],
            ytr: np.ndarray, yte: np.ndarray, seed: int) -> dict[str, Any]:
    """One label's section: each feature set's probe accuracy and kNN share, their differences."""
    acc = {n: probe_correct(x[0], ytr, x[1], yte, seed) for n, x in (("vae", vae), ("lsa", lsa))}
    knn = {n: knn_share(x[0], ytr, x[1], yte) for n, x in (("vae", vae), ("lsa", lsa))}
    majority = Counter(ytr.tolist()).most_common(1)[0][0]
    m: dict[str, Any] = {"n_train": len(ytr), "n_test": len(yte), "n_classes": len(set(ytr.tolist())),
                         "majority": float(np.mean(yte == majority))}
    for name, per_doc in (("acc", acc), ("knn", knn)):
        m |= {f"{name}_vae": float(per_doc["vae"].mean()), f"{name}_lsa": float(per_doc["lsa"].mean())}
        d = paired_difference(per_doc["vae"], per_doc["lsa"], seed)
        m |= {f"{name}_diff": d["diff"], f"{name}_diff_ci95": d["diff_ci95"]}
    return m


def label_problem(name: str, ytr: list[str | None], yte: list[str | None], min_test: int) -> str | None:
    """Why label ``name`` cannot be probed (one line), or None when it can."""
    n_tr = sum(y is not None for y in ytr)
    n_te = sum(y is not None for y in yte)
    if n_tr + n_te == 0:
        return f"probe label {name}: the regex/bucket gives no label for any sampled document"
    classes = {y for y in ytr if y is not None}
    if len(classes) < 2:
        return f"probe label {name}: {len(classes)} class(es) in the train sample, at least 2 needed"
    if n_te < min_test:
        return f"probe label {name}: {n_te} labelled test documents, at least {min_test} needed"
    return None


# ---------------------------------------------------------------------------------------
# The section


def downstream(model: torch.nn.Module, labels: Sequence[ProbeLabelConfig], *, corpus_dir: str | Path,
               tokens_dir: str | Path, max_docs: int, min_docs: int, batch_tokens: int, device: torch.device,
               seed: int) -> dict[str, dict[str, Any]]:
    """``{label name: metrics}`` for each label that can be probed; {} when none can (warned)."""
    if not labels:
        return {}
    if not have_sklearn():
        log.warning("downstream probes skipped: scikit-learn is not installed (%s)", INSTALL_HINT)
        return {}
    check_label_columns(corpus_dir, labels)
    columns = sorted({lab.column for lab in labels})
    train = read_sample(corpus_dir, tokens_dir, "train", columns, max_docs=max_docs, seed=seed)
    test = read_sample(corpus_dir, tokens_dir, "test", columns, max_docs=max_docs, seed=seed + 1)
    if len(train.texts) == 0 or len(test.texts) == 0:
        log.warning("downstream probes skipped: the train or test split has no documents")
        return {}
    vae = tuple(posterior_means(model, s.tokens, batch_tokens=batch_tokens, device=device) for s in (train, test))
    lsa = lsa_features(train.texts, test.texts, vae[0].shape[1], seed)
    out: dict[str, dict[str, Any]] = {}
    for lab in labels:
        ytr = extract_labels(train.columns[lab.column], lab.regex, lab.bucket)
        yte = extract_labels(test.columns[lab.column], lab.regex, lab.bucket)
        problem = label_problem(lab.name, ytr, yte, min_docs)
        if problem:
            log.warning("%s; not probed", problem)
            continue
        mtr = np.array([y is not None for y in ytr])
        mte = np.array([y is not None for y in yte])
        y_tr = np.array([y for y in ytr if y is not None], dtype=object)
        y_te = np.array([y for y in yte if y is not None], dtype=object)
        out[lab.name] = {"column": lab.column,
                         **compare((vae[0][mtr], vae[1][mte]), (lsa[0][mtr], lsa[1][mte]), y_tr, y_te, seed)}
        log.info("probe %s: acc VAE %.3f vs LSA %.3f, kNN@%d %.3f vs %.3f (majority %.3f)", lab.name,
                 out[lab.name]["acc_vae"], out[lab.name]["acc_lsa"], KNN_K, out[lab.name]["knn_vae"],
                 out[lab.name]["knn_lsa"], out[lab.name]["majority"])
    return out


def tracked(section: dict[str, dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of the section: ``probe_LABEL_KEY``, an interval as ``..._ci95_low/_high``."""
    flat: dict[str, float] = {}
    for name, m in section.items():
        for k, v in m.items():
            if isinstance(v, (list, tuple)) and len(v) == 2:
                flat |= {f"probe_{name}_{k}_low": float(v[0]), f"probe_{name}_{k}_high": float(v[1])}
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"probe_{name}_{k}"] = float(v)
    return {k: v for k, v in flat.items() if math.isfinite(v)}
