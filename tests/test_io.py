from __future__ import annotations

import os
import stat

import pytest

from vaepipe.core.io import atomic_dir, atomic_write_bytes, sha256_tree, write_json


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "a.txt").write_text("two")
        raise RuntimeError("boom")
    assert (final / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as d:
            atomic_write_bytes(d / "f.bin", b"x")
        write_json(tmp_path / "s.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "f.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o644


def test_sha256_tree_depends_on_names_and_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    h1 = sha256_tree(tmp_path / "a")
    (tmp_path / "a" / "x").write_bytes(b"2")
    h2 = sha256_tree(tmp_path / "a")
    (tmp_path / "a" / "x").rename(tmp_path / "a" / "y")
    h3 = sha256_tree(tmp_path / "a")
    assert len({h1, h2, h3}) == 3
