from __future__ import annotations

import os
import stat

import pytest

from vaepipe.core import io
from vaepipe.core.io import (atomic_dir, atomic_file, atomic_write_bytes, durable_replace, replace_dir, sha256_tree,
                             write_json)


@pytest.fixture
def fsynced(monkeypatch) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of everything fsynced while the test runs."""
    seen: list[tuple[int, int]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino))
        real(fd)

    monkeypatch.setattr(io.os, "fsync", spy)
    return seen


def ident(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


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


def test_durable_replace_fsyncs_the_file_and_its_directory(tmp_path, fsynced):
    (tmp_path / "f").write_text("old")
    (tmp_path / ".f.tmp").write_text("new")
    new = ident(tmp_path / ".f.tmp")
    durable_replace(tmp_path / ".f.tmp", tmp_path / "f")
    assert (tmp_path / "f").read_text() == "new" and not (tmp_path / ".f.tmp").exists()
    assert fsynced == [new, ident(tmp_path)]  # the data before the rename, the entry after it


def test_atomic_write_bytes_fsyncs_the_directory_too(tmp_path, fsynced):
    atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert fsynced == [ident(tmp_path / "f.bin"), ident(tmp_path)]


def test_atomic_file_replaces_only_on_success(tmp_path, fsynced):
    final = tmp_path / "f.txt"
    with atomic_file(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".f.txt.tmp-") and not tmp.exists()
        tmp.write_text("one")
    assert final.read_text() == "one" and fsynced == [ident(final), ident(tmp_path)]
    with pytest.raises(RuntimeError), atomic_file(final) as tmp:
        tmp.write_text("two")
        raise RuntimeError("boom")
    assert final.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no temporary left behind


def test_replace_dir_swaps_whole_directories_durably(tmp_path, fsynced):
    final, work = tmp_path / "out", tmp_path / ".out.work"
    final.mkdir()
    (final / "old.txt").write_text("old")
    work.mkdir()
    (work / "new.txt").write_text("new")
    replace_dir(work, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one moved aside, then removed
    assert fsynced == [ident(tmp_path)]
    work.mkdir()  # onto a path that does not exist yet
    replace_dir(work, tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir() and not work.exists()
