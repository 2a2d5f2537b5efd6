"""Token Parquet -> batches under a token budget.

Records in the token Parquet hold the ids of the text only; the model adds ``<bos>``/``<eos>``
itself. Two ways to form batches, both from a seeded generator:

- ``token_batches``: by length, so almost no memory goes to padding: sort by length, cut runs
  whose ``count * max_len`` fits ``batch_tokens``, shuffle the order of the batches (and the
  order within equal lengths). Evaluation and export use it.
- ``mixed_batches``: random records until their real tokens fill ``batch_tokens``. Packed LSTMs
  spend no compute on padding, and a batch that spans all lengths gives batch norm (BN-VAE)
  statistics of the whole corpus rather than of one length.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vaepipe.core.constants import PAD_ID, TOKENIZER_META_KEY
from vaepipe.core.errors import InputError

RERUN_TOKENIZE = "vaepipe tokenize"  # what remakes a damaged token file


@dataclass
class TokenSplit:
    """One split of the token Parquet, in file order."""

    doc_ids: list[str]
    seqs: list[np.ndarray]  # one int64 array of token ids per record
    lengths: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


# Parquet readers verify the CRC that writers put in every page header (tokenize and embed
# write them: ``write_page_checksum=True``): a flipped bit then fails the read instead of
# turning into wrong ids or vectors. Pages of files written without checksums read as before.
VERIFY_PAGES: dict[str, Any] = {"page_checksum_verification": True}
WRITE_PAGE_CHECKSUMS: dict[str, Any] = {"write_page_checksum": True}


def parquet_files(root: str | os.PathLike[str]) -> list[Path]:
    """The ``*.parquet`` files under ``root``, sorted, minus those that dataset readers skip.

    pyarrow, pandas and DuckDB skip names starting with "." or "_" when they read a folder
    whole (working copies, ``_stats.json``); so does this list.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.parquet")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))


def parquet_problem(path: str | os.PathLike[str], error: BaseException, rerun: str) -> InputError:
    """The one-line error for a Parquet file that cannot be read; ``rerun`` names the stage
    that writes it (``vaepipe tokenize``, ...)."""
    if isinstance(error, OSError) and error.errno is not None:  # the OS refused: no such file, EACCES, EIO
        return InputError(f"{path}: cannot read ({error.strerror})")
    why = str(error).splitlines()[0].strip() if str(error) else type(error).__name__
    if "checksum" in why.lower():
        return InputError(f"{path}: a damaged Parquet page (page checksum mismatch: {why}); rerun `{rerun}`")
    return InputError(f"{path}: not a valid Parquet file ({why}); rerun `{rerun}`")


@contextlib.contextmanager
def reading_parquet(path: str | os.PathLike[str], rerun: str) -> Iterator[None]:
    """Turn a failed read of ``path`` in the block (empty, truncated, damaged file) into
    ``parquet_problem``'s InputError."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise parquet_problem(path, e, rerun) from None


def open_parquet(path: str | os.PathLike[str], rerun: str) -> pq.ParquetFile:
    """``path`` opened for reading with page checksums verified; InputError if it is no Parquet
    file. Reads from it can still fail on a damaged page: wrap them in ``reading_parquet``."""
    with reading_parquet(path, rerun):
        return pq.ParquetFile(path, **VERIFY_PAGES)


def token_files(tokens_dir: str | Path) -> list[Path]:
    """The token Parquet files under ``tokens_dir`` (``_stats.json`` etc. left out), sorted."""
    files = parquet_files(tokens_dir)
    if not files:
        raise InputError(f"{tokens_dir}: no token Parquet files (run `vaepipe tokenize` first)")
    return files


def check_tokens_tokenizer(tokens_dir: str | Path, tok_hash: str, against: str) -> None:
    """Refuse token files that tokenize stamped with another tokenizer than ``tok_hash``.

    ``against`` says where ``tok_hash`` comes from, for the message (e.g. "paths.tokenizer
    data/tokenizer/tokenizer.json", "the model"). Files without the stamp (written by hand)
    pass. Raises InputError naming the first file that disagrees or cannot be read.
    """
    for f in token_files(tokens_dir):
        stamped = (open_parquet(f, RERUN_TOKENIZE).schema_arrow.metadata or {}).get(TOKENIZER_META_KEY.encode())
        if stamped and stamped.decode() != tok_hash:
            raise InputError(f"{f}: token ids were made with tokenizer {stamped.decode()[:12]}, but {against} "
                             f"uses {tok_hash[:12]}; rerun `vaepipe tokenize`")


def read_split(tokens_dir: str | Path, split: str, max_docs: int = 0) -> TokenSplit:
    """Load one split (the first ``max_docs`` records when > 0) into memory.

    A token file that is empty, truncated or has a damaged page is an InputError naming it.
    """
    parts: list[pa.Table] = []
    rows = 0
    for f in token_files(tokens_dir):
        with reading_parquet(f, RERUN_TOKENIZE):
            for batch in open_parquet(f, RERUN_TOKENIZE).iter_batches(
                    batch_size=1 << 16, columns=["doc_id", "split", "ids", "n_tokens"]):
                batch = batch.filter(pc.equal(batch.column("split").cast(pa.string()), split))
                parts.append(pa.Table.from_batches([batch]).drop_columns(["split"]))
                rows += batch.num_rows
                if max_docs and rows >= max_docs:
                    break
        if max_docs and rows >= max_docs:
            break
    table = pa.concat_tables(parts, promote_options="permissive") if parts else None
    if table is None or table.num_rows == 0:
        raise InputError(f"{tokens_dir}: split {split!r} is empty")
    if max_docs and table.num_rows > max_docs:
        table = table.slice(0, max_docs)
    return TokenSplit(
        doc_ids=table.column("doc_id").to_pylist(),
        seqs=list_column_to_arrays(table.column("ids")),
        lengths=table.column("n_tokens").to_numpy().astype(np.int64),
    )


def list_column_to_arrays(col: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A list<int> column -> one int64 numpy array per row, without a Python-int detour."""
    out: list[np.ndarray] = []
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    for chunk in chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False).astype(np.int64)
        out.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return out


def token_batches(
    lengths: np.ndarray,
    batch_tokens: int,
    *,
    shuffle: bool,
    generator: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Indices of length-bucketed batches whose padded size stays within ``batch_tokens``.

    The token count of a batch is ``len(batch) * max length`` (+1 for ``<bos>``/``<eos>``),
    i.e. what the padded tensor costs. A record longer than the budget gets a batch of its
    own. Without ``shuffle`` the order is deterministic (by length, then position).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if shuffle:
        if generator is None:
            raise ValueError("shuffle=True needs a generator")
        tiebreak = generator.random(len(lengths))
        order = np.lexsort((tiebreak, lengths))
    else:
        order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        end = start + 1
        # lengths are sorted ascending, so the last element sets the padded width
        while end < n and (end - start + 1) * (int(lengths[order[end]]) + 1) <= batch_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    if shuffle:
        perm = generator.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def mixed_batches(lengths: np.ndarray, batch_tokens: int, *, generator: np.random.Generator) -> list[np.ndarray]:
    """Indices of randomly composed batches holding at most ``batch_tokens`` real tokens each.

    The token count of a record is its length + 1 (``<eos>``); a record over the budget gets a
    batch of its own. Padding costs the packed LSTMs no compute, so the budget counts real
    tokens; what mixing buys is batch statistics over all lengths (BN-VAE's batch norm).
    """
    order = generator.permutation(len(lengths))
    cost = np.asarray(lengths, dtype=np.int64)[order] + 1
    batches: list[np.ndarray] = []
    start, total = 0, 0
    for i, c in enumerate(cost.tolist()):
        if i > start and total + c > batch_tokens:
            batches.append(order[start:i])
            start, total = i, 0
        total += c
    if start < len(order):
        batches.append(order[start:])
    return batches


def collate(seqs: Sequence[np.ndarray], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of id arrays -> ``ids`` (B, T) int64 and ``lengths`` (B,) int64."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max()) if len(seqs) else 0
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def iter_batches(
    split: TokenSplit, batch_tokens: int, *, shuffle: bool = False, generator: np.random.Generator | None = None
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, ids, lengths)`` over a split, each record exactly once."""
    for idx in token_batches(split.lengths, batch_tokens, shuffle=shuffle, generator=generator):
        ids, lengths = collate([split.seqs[i] for i in idx])
        yield idx, ids, lengths
