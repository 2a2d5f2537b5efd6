from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vaepipe.core.errors import InputError
from vaepipe.ml.data import PAD_ID, collate, iter_batches, mixed_batches, read_split, token_batches


def _write_tokens(path, rows):
    table = pa.table({
        "doc_id": [r[0] for r in rows],
        "split": [r[1] for r in rows],
        "ids": pa.array([r[2] for r in rows], type=pa.list_(pa.uint16())),
        "n_tokens": pa.array([len(r[2]) for r in rows], type=pa.int32()),
    })
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "part-00000.parquet")


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_record_once_within_budget(shuffle):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=1000)
    batches = token_batches(lengths, 512, shuffle=shuffle, generator=np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) == 1 or len(b) * (lengths[b].max() + 1) <= 512


def test_batches_are_length_homogeneous_so_padding_is_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=5000)
    batches = token_batches(lengths, 2048, shuffle=True, generator=np.random.default_rng(2))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths.sum() / padded > 0.9


def test_shuffle_is_seeded():
    lengths = np.arange(1, 200) % 17 + 1
    a = token_batches(lengths, 100, shuffle=True, generator=np.random.default_rng(5))
    b = token_batches(lengths, 100, shuffle=True, generator=np.random.default_rng(5))
    c = token_batches(lengths, 100, shuffle=True, generator=np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=False))


def test_oversized_record_gets_its_own_batch():
    batches = token_batches(np.array([3, 500, 4]), 64, shuffle=False)
    assert [b.tolist() for b in batches] == [[0, 2], [1]]


def test_mixed_batches_cover_every_record_once_within_real_token_budget():
    lengths = np.random.default_rng(0).integers(1, 60, size=2000)
    batches = mixed_batches(lengths, 512, generator=np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(2000))
    real = [int((lengths[b] + 1).sum()) for b in batches]
    assert all(r <= 512 for r in real)
    # greedy cut: a batch closes only when the next record would not fit
    assert all(r + lengths[b2[0]] + 1 > 512 for r, b2 in zip(real[:-1], batches[1:], strict=True))


def test_mixed_batches_mix_lengths_and_are_seeded():
    lengths = np.random.default_rng(0).integers(1, 60, size=3000)
    a = mixed_batches(lengths, 1024, generator=np.random.default_rng(5))
    b = mixed_batches(lengths, 1024, generator=np.random.default_rng(5))
    c = mixed_batches(lengths, 1024, generator=np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))
    # unlike length buckets, a batch spans most of the length range (what BN-VAE's statistics need)
    spread = np.median([lengths[x].max() - lengths[x].min() for x in a])
    assert spread > 40


def test_mixed_batches_oversized_record_alone():
    batches = mixed_batches(np.array([3, 500, 4]), 64, generator=np.random.default_rng(0))
    assert sorted(len(b) for b in batches) in ([1, 2], [1, 1, 1])
    assert any(b.tolist() == [1] for b in batches)


def test_collate_pads_and_reports_lengths():
    ids, lengths = collate([np.array([5, 6, 7]), np.array([9])])
    assert ids.tolist() == [[5, 6, 7], [9, PAD_ID, PAD_ID]]
    assert lengths.tolist() == [3, 1]


def test_read_split_round_trip(tmp_path):
    rows = [("a", "train", [4, 5, 6]), ("b", "test", [7]), ("c", "train", [8, 9])]
    _write_tokens(tmp_path / "tok", rows)
    s = read_split(tmp_path / "tok", "train")
    assert s.doc_ids == ["a", "c"]
    assert [x.tolist() for x in s.seqs] == [[4, 5, 6], [8, 9]]
    assert s.lengths.tolist() == [3, 2] and s.n_tokens == 5
    got = {}
    for idx, ids, lengths in iter_batches(s, 100):
        for i, row, n in zip(idx, ids, lengths, strict=True):
            got[s.doc_ids[i]] = row[:n].tolist()
    assert got == {"a": [4, 5, 6], "c": [8, 9]}
    assert len(read_split(tmp_path / "tok", "train", max_docs=1)) == 1


def test_read_split_errors(tmp_path):
    with pytest.raises(InputError, match="no token Parquet"):
        read_split(tmp_path / "missing", "train")
    _write_tokens(tmp_path / "tok", [("a", "train", [4])])
    with pytest.raises(InputError, match="split 'valid' is empty"):
        read_split(tmp_path / "tok", "valid")
