"""vaepipe/ml/moments.py: moments merged over chunks equal numpy's over the concatenation."""

from __future__ import annotations

import json

import numpy as np
import torch

from vaepipe.ml.estimators import active_units
from vaepipe.ml.moments import Moments


def data() -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    # a large mean next to small spreads: where the sum-of-squares formula would cancel
    x = rng.normal(3.0, 0.2, size=(1000, 4)) * [1, 10, 0.01, 1]
    return x, np.split(x, [1, 100, 100, 101, 640])  # chunks of 1 and 0 rows among them


def test_merged_moments_equal_numpy_mean_and_variance():
    x, chunks = data()
    m = Moments.merge_all((Moments.of(c) for c in chunks), 4)
    assert m.n == len(x)
    np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.variance(), x.var(axis=0, ddof=1), rtol=1e-12)
    # the same, merged through the JSON every shard stores, and in another grouping
    via_json = [Moments.from_dict(json.loads(json.dumps(Moments.of(c).to_dict()))) for c in chunks]
    halves = Moments.merge_all(via_json[:3], 4).merge(Moments.merge_all(via_json[3:], 4))
    np.testing.assert_allclose(halves.variance(), x.var(axis=0, ddof=1), rtol=1e-12)


def test_variance_is_the_active_units_variance():
    x, _ = data()
    _, var = active_units(torch.from_numpy(x))
    np.testing.assert_allclose(Moments.of(x).variance(), var.numpy(), rtol=1e-12)


def test_fewer_than_two_rows_have_zero_variance():
    assert Moments.empty(3).variance().tolist() == [0.0, 0.0, 0.0]
    assert Moments.of(np.ones((1, 3))).variance().tolist() == [0.0, 0.0, 0.0]
    assert Moments.of(np.zeros((0, 3))).n == 0
