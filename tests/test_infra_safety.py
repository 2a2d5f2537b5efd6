"""The deletion guards of infra/ (no servers needed): what purge may and may not delete.

Replays of the 09:06 incident (a record holding ``.``, a relative state folder, purge run
from inside the folder) run the real ``infra/services.py`` in a subprocess against a fake
checkout holding a precious file, and check that the file survives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from infra import pgcluster, safety
from infra.safety import ServiceError, UnsafeDeletion, check_deletable, remove_file, remove_tree
from infra.settings import Config

ALWAYS = dict(marker=lambda p: True, marker_text="nothing")


def _marked(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keep.txt").write_text("data")
    return folder


# ------------------------------------------------------------------------------------------
# check_deletable / remove_tree


@pytest.mark.parametrize("path", ["", ".", "..", "data", "./state", "tmp/x"])
def test_relative_paths_are_refused_even_when_marked(path: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(_marked(tmp_path / "cwd"))
    with pytest.raises(UnsafeDeletion, match="not an absolute path"):
        check_deletable(path, what="x", **ALWAYS)
    with pytest.raises(UnsafeDeletion):
        remove_tree(path, what="x", **ALWAYS)
    assert (tmp_path / "cwd" / "keep.txt").exists()


def test_root_home_tmp_and_shallow_folders_are_refused() -> None:
    for place in ("/", str(Path.home()), "/tmp", "/var/tmp", "/work", "/usr"):
        with pytest.raises(UnsafeDeletion):
            check_deletable(place, what="x", **ALWAYS)


def test_cwd_the_checkout_and_their_ancestors_are_refused(tmp_path: Path, monkeypatch) -> None:
    cwd = _marked(tmp_path / "a" / "b" / "cwd")
    monkeypatch.chdir(cwd)
    for p in (cwd, cwd.parent, tmp_path / "a", REPO):
        with pytest.raises(UnsafeDeletion, match="protected place"):
            check_deletable(p, what="x", **ALWAYS)
    with pytest.raises(UnsafeDeletion):
        check_deletable(REPO.parent, what="x", **ALWAYS)
    # a sibling of the cwd is fine
    assert check_deletable(_marked(tmp_path / "a" / "other"), what="x", **ALWAYS) == tmp_path / "a" / "other"


def test_symlinks_and_dotdot_are_refused(tmp_path: Path) -> None:
    target = _marked(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeDeletion, match="resolved path"):
        remove_tree(link, what="x", **ALWAYS)
    with pytest.raises(UnsafeDeletion, match="resolved path"):
        check_deletable(f"{tmp_path}/target/../target", what="x", **ALWAYS)
    assert (target / "keep.txt").exists() and link.is_symlink()


def test_outside_the_allowed_roots_is_refused(tmp_path: Path) -> None:
    state = _marked(tmp_path / "state")
    elsewhere = _marked(tmp_path / "elsewhere")
    with pytest.raises(UnsafeDeletion, match="outside the allowed folders"):
        check_deletable(elsewhere, what="x", under=[state], **ALWAYS)
    assert check_deletable(state / "keep.txt", what="x", under=[state], **ALWAYS) == state / "keep.txt"


def test_marker_decides_and_only_the_marked_folder_goes(tmp_path: Path) -> None:
    victim = _marked(tmp_path / "victim")
    sibling = _marked(tmp_path / "sibling")
    marker = dict(marker=lambda p: (p / "MARK").exists(), marker_text="MARK")
    with pytest.raises(UnsafeDeletion, match="no MARK"):
        remove_tree(victim, what="x", **marker)
    assert (victim / "keep.txt").exists()
    (victim / "MARK").write_text("")
    assert remove_tree(victim, what="x", **marker) is True
    assert not victim.exists() and (sibling / "keep.txt").exists()
    assert remove_tree(victim, what="x", **marker) is False  # gone already: nothing to do


def test_remove_file_refuses_folders_and_foreign_files(tmp_path: Path) -> None:
    folder = _marked(tmp_path / "folder")
    with pytest.raises(UnsafeDeletion, match="not a regular file"):
        remove_file(folder, what="x", **ALWAYS)
    with pytest.raises(UnsafeDeletion, match="no header"):
        remove_file(folder / "keep.txt", what="x", marker=lambda p: False, marker_text="header")
    assert (folder / "keep.txt").exists()


# ------------------------------------------------------------------------------------------
# the markers and the settings


def _state_json(state: Path, recorded: Path | None = None) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / "services.json").write_text(json.dumps({"state_dir": str(recorded or state)}))


def test_state_marker_must_name_the_folder_itself(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _state_json(state, recorded=tmp_path / "somewhere-else")  # e.g. a copied folder
    assert not safety.is_state_folder(state)
    _state_json(state)
    assert safety.is_state_folder(state)
    (state / "services.json").write_text("not json")
    assert not safety.is_state_folder(state)


def test_up_never_adopts_a_folder_of_other_files(tmp_path: Path, monkeypatch) -> None:
    folder = _marked(tmp_path / "my-work")
    monkeypatch.setenv("VAEPIPE_STATE_DIR", str(folder))
    cfg = Config.resolve()
    with pytest.raises(ServiceError, match="holds files that are not a vaepipe stack's"):
        cfg.save()
    assert not (folder / "services.json").exists()
    # a folder holding only what our own commands make is adopted
    fresh = tmp_path / "fresh"
    (fresh / "secrets").mkdir(parents=True)
    monkeypatch.setenv("VAEPIPE_STATE_DIR", str(fresh))
    cfg = Config.resolve()
    cfg.save()
    assert safety.is_state_folder(fresh)


@pytest.mark.parametrize("var", ["VAEPIPE_STATE_DIR", "XDG_STATE_HOME", "VAEPIPE_ENV_FILE",
                                 "VAEPIPE_MLFLOW_ARTIFACTS"])
def test_relative_paths_in_settings_are_refused(var: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VAEPIPE_STATE_DIR", raising=False)
    if var != "VAEPIPE_STATE_DIR" and var != "XDG_STATE_HOME":
        monkeypatch.setenv("VAEPIPE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv(var, "relative/path")
    with pytest.raises(ServiceError, match=f"{var}='relative/path': must be an absolute path"):
        Config.resolve()


def test_relative_pg_data_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VAEPIPE_PG_DATA", ".")
    with pytest.raises(ServiceError, match="VAEPIPE_PG_DATA='.': must be an absolute path"):
        pgcluster.Cluster.locate(tmp_path / "state")


def test_a_location_record_holding_a_relative_path_is_ignored(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VAEPIPE_PG_DATA", raising=False)
    state = tmp_path / "state"
    (state / "postgres").mkdir(parents=True)
    for bad in ("", ".", "data"):
        (state / "postgres" / "LOCATION").write_text(bad + "\n")
        data = pgcluster.Cluster.locate(state)
        assert data.is_absolute() and data != Path.cwd()
        assert (state / "postgres" / "LOCATION").read_text().strip() == str(data)


needs_pg = pytest.mark.skipif(pgcluster.find_bindir() is None, reason="PostgreSQL binaries absent")


@needs_pg
def test_cluster_remove_refuses_a_folder_initdb_did_not_make(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fake = _marked(state / "postgres" / "data")
    (fake / "PG_VERSION").write_text("15\n")  # looks like a cluster, lacks our conf line
    pg = pgcluster.Cluster(data_dir=fake, log_file=tmp_path / "pg.log", host="127.0.0.1", port=1,
                           password="x", bindir=pgcluster.find_bindir())
    with pytest.raises(UnsafeDeletion, match="vaepipe.conf include"):
        pg.remove(state)
    assert (fake / "keep.txt").exists()
    (fake / "postgresql.conf").write_text(f"# ...\n{safety.PG_CONF_MARK}\n")
    pg.remove(state)
    assert not fake.exists() and state.exists()


def test_env_file_is_overwritten_or_deleted_only_when_ours(tmp_path: Path) -> None:
    state = tmp_path / "state"
    foreign = tmp_path / "README.md"
    foreign.write_text("# a project readme\n")
    assert not safety.may_overwrite_env_file(foreign)
    ours = tmp_path / "local.env"
    ours.write_text(f"{safety.ENV_FILE_HEADER}: ...\nexport VAEPIPE_STATE_DIR={state}\n")
    assert safety.may_overwrite_env_file(ours) and safety.is_our_env_file(ours, state)
    assert not safety.is_our_env_file(ours, tmp_path / "other-state")


# ------------------------------------------------------------------------------------------
# the script, end to end (no servers start: purge of stacks that never ran)


def _script(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "VAEPIPE_"))}
    return subprocess.run([sys.executable, "-m", "infra.services", *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _fake_checkout(tmp_path: Path) -> Path:
    co = _marked(tmp_path / "checkout")
    _state_json(co)  # even a services.json that names it must not make purge delete it
    return co


def test_purge_of_a_relative_state_folder_is_refused(tmp_path: Path) -> None:
    co = _fake_checkout(tmp_path)
    r = _script(["purge", "--yes"], {"VAEPIPE_STATE_DIR": "."}, cwd=co)
    assert r.returncode == 2 and "must be an absolute path" in r.stderr
    assert (co / "keep.txt").read_text() == "data"


def test_purge_from_inside_the_state_folder_is_refused(tmp_path: Path) -> None:
    co = _fake_checkout(tmp_path)
    r = _script(["purge", "--yes"], {"VAEPIPE_STATE_DIR": str(co)}, cwd=co)
    assert r.returncode == 2 and "protected place" in r.stderr and "nothing deleted" in r.stderr
    assert (co / "keep.txt").read_text() == "data"


def test_purge_refuses_a_state_folder_recorded_for_another_path(tmp_path: Path) -> None:
    state = _marked(tmp_path / "copied-state")
    _state_json(state, recorded=tmp_path / "original")
    r = _script(["purge", "--yes"], {"VAEPIPE_STATE_DIR": str(state)}, cwd=tmp_path)
    assert r.returncode == 2 and "services.json naming this folder" in r.stderr
    assert (state / "keep.txt").exists()


def test_purge_with_a_location_of_dot_deletes_only_the_state_folder(tmp_path: Path) -> None:
    """The 09:06 replay: LOCATION held "." and purge ran from the checkout."""
    co = _fake_checkout(tmp_path)
    state = tmp_path / "state"
    _state_json(state)
    (state / "postgres").mkdir()
    (state / "postgres" / "LOCATION").write_text(".\n")
    env = {"VAEPIPE_STATE_DIR": str(state), "VAEPIPE_ENV_FILE": str(state / "local.env")}
    r = _script(["purge", "--yes"], env, cwd=co)
    assert r.returncode == 0, r.stderr
    assert not state.exists()
    assert (co / "keep.txt").read_text() == "data" and (co / "services.json").exists()


@needs_pg
def test_purge_with_a_location_naming_the_checkout_deletes_nothing(tmp_path: Path) -> None:
    co = _fake_checkout(tmp_path)
    (co / "PG_VERSION").write_text("15\n")
    state = tmp_path / "state"
    _state_json(state)
    (state / "postgres").mkdir()
    (state / "postgres" / "LOCATION").write_text(f"{co}\n")
    env = {"VAEPIPE_STATE_DIR": str(state), "VAEPIPE_ENV_FILE": str(state / "local.env")}
    for cwd in (co, tmp_path):
        r = _script(["purge", "--yes"], env, cwd=cwd)
        assert r.returncode == 2 and "refusing to delete PostgreSQL data folder" in r.stderr, r.stderr
        assert (co / "keep.txt").read_text() == "data" and state.exists()


def test_status_and_down_of_a_never_started_folder_create_nothing(tmp_path: Path) -> None:
    state = _marked(tmp_path / "my-work")
    env = {"VAEPIPE_STATE_DIR": str(state)}
    r = _script(["status"], env, cwd=tmp_path)
    assert r.returncode == 3 and "never started" in r.stdout
    r = _script(["down"], env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("not running") == 5  # s3, postgres, mlflow, prefect, worker
    r = _script(["up"], env, cwd=tmp_path)  # refused before anything starts
    assert r.returncode == 2 and "holds files that are not a vaepipe stack's" in r.stderr
    assert sorted(p.name for p in state.iterdir()) == ["keep.txt"]
