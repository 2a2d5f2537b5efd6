"""Guards for every file and folder the infra scripts delete or overwrite.

At 09:06 on 2026-11-27 a purge removed the whole checkout: a data-folder record that raced
between two starting servers held ``""``, ``Path("")`` is ``.``, and ``rmtree`` deleted the
current directory. Every deletion in ``infra/`` therefore goes through ``check_deletable``,
which refuses, with a one-line ``ServiceError``, anything that is not all of:

- given as an absolute path (a relative one is never resolved against the cwd), with no
  symlink or ``..`` in it (what we check is what would be deleted);
- at least two levels below ``/`` (never ``/``, ``/tmp``, ``/work``, ``/root``);
- not equal to, nor an ancestor of, a protected place: ``/``, ``$HOME``, the temporary
  folder, the current directory, this checkout;
- inside one of the allowed roots the caller names (the state folder, the recorded data
  folder), when it names any;
- carrying the marker that proves we made it (``services.json`` naming this very folder,
  PostgreSQL's ``PG_VERSION`` plus the line our initdb appended, our env-file header).

Standard library only; no side effects on import.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """A one-line, user-fixable problem (printed by services.py, exit status 2)."""


class UnsafeDeletion(ServiceError):
    """A deletion the guards refused: nothing was deleted."""


def protected_paths() -> list[Path]:
    """Places that must survive any deletion, together with everything above them."""
    places = [Path("/"), Path.home(), Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp"),
              REPO]
    try:
        places.append(Path.cwd())
    except OSError:  # the cwd itself was deleted: nothing below it to protect
        pass
    out = []
    for p in places:
        try:
            out.append(p.resolve())
        except OSError:
            out.append(p)
        out.append(p)
    return out


def check_deletable(path: Path | str, *, what: str, marker: Callable[[Path], bool],
                    marker_text: str, under: Iterable[Path | str] = ()) -> Path:
    """Return ``path`` when every guard passes, else raise ``UnsafeDeletion`` naming the rule.

    ``marker(path)`` says whether the folder or file is one we made; ``marker_text`` says
    what it looks for, for the error. ``under``: allowed roots (the path may equal one).
    """
    raw = str(path)
    p = Path(raw)

    def refuse(why: str) -> UnsafeDeletion:
        return UnsafeDeletion(f"refusing to delete {what} {raw!r}: {why}; nothing deleted")

    if not raw or not p.is_absolute():
        raise refuse("not an absolute path")
    try:
        real = p.resolve(strict=False)
    except OSError as e:
        raise refuse(f"cannot resolve it ({e})") from None
    if real != p or ".." in p.parts or p.is_symlink():
        raise refuse(f"it is not its own resolved path (a symlink or '..'; resolves to {real})")
    if len(real.parts) < 3:
        raise refuse("fewer than two levels below /")
    for place in protected_paths():
        if real == place or real in place.parents:
            raise refuse(f"it is, or contains, a protected place ({place})")
    roots = [Path(r) for r in under]
    if roots:
        inside = [r for r in roots if r.is_absolute() and (real == r or r in real.parents)]
        if not inside:
            raise refuse("outside the allowed folders " + ", ".join(str(r) for r in roots))
    if not marker(real):
        raise refuse(f"no {marker_text}, so not something infra/services.py made")
    return real


def remove_tree(path: Path | str, *, what: str, marker: Callable[[Path], bool], marker_text: str,
                under: Iterable[Path | str] = ()) -> bool:
    """``rmtree`` after ``check_deletable``; False when there was nothing to delete."""
    p = Path(str(path))
    if p.is_absolute() and not p.exists() and not p.is_symlink():
        return False
    real = check_deletable(p, what=what, marker=marker, marker_text=marker_text, under=under)
    if not real.is_dir():
        raise UnsafeDeletion(f"refusing to delete {what} {str(real)!r}: not a folder; nothing deleted")
    failures: list[str] = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(real, onexc=lambda fn, f, exc: failures.append(f"{f}: {exc}"))
    else:
        shutil.rmtree(real, onerror=lambda fn, f, exc: failures.append(f"{f}: {exc[1]}"))
    if failures:
        raise ServiceError(f"deleting {what} {real}: {len(failures)} entries left, first {failures[0]}")
    return True


def remove_file(path: Path | str, *, what: str, marker: Callable[[Path], bool], marker_text: str,
                under: Iterable[Path | str] = ()) -> bool:
    """``unlink`` a regular file after ``check_deletable``; False when it did not exist."""
    p = Path(str(path))
    if p.is_absolute() and not p.exists() and not p.is_symlink():
        return False
    real = check_deletable(p, what=what, marker=marker, marker_text=marker_text, under=under)
    if not real.is_file():
        raise UnsafeDeletion(f"refusing to delete {what} {str(real)!r}: not a regular file; nothing deleted")
    real.unlink()
    return True


# ------------------------------------------------------------------------------------------
# the markers


STATE_RECORD = "services.json"
# what ``up`` may find in a state folder it did not record yet: only what our own commands
# (status, env, an interrupted up) create there
STATE_ENTRIES = {"services.json", "postgres", "secrets", "logs", "run", "mlflow", "prefect", "s3",
                 "local.env", ".local.env.tmp"}
PG_CONF_MARK = "include_if_exists = 'vaepipe.conf'"
ENV_FILE_HEADER = "# written by infra/services.py up"


def is_state_folder(path: Path) -> bool:
    """``services.json`` inside records this very folder as its ``state_dir``."""
    import json

    try:
        saved = json.loads((path / STATE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("state_dir") == str(path)


def adoptable_state_folder(path: Path) -> bool:
    """Whether ``up`` may make ``path`` a state folder: absent, empty, already one, or
    holding only what our own commands put there. A folder of someone's files never becomes
    a state folder, so ``purge`` can never be pointed at one."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    return is_state_folder(path) or all(e.name in STATE_ENTRIES for e in path.iterdir())


def is_pg_data_dir(path: Path) -> bool:
    """A PostgreSQL data folder that our ``Cluster.init`` made (PG_VERSION + our conf line)."""
    try:
        return (path / "PG_VERSION").is_file() and PG_CONF_MARK in (path / "postgresql.conf").read_text()
    except OSError:
        return False


def is_our_env_file(path: Path, state: Path) -> bool:
    """An env file ``write_env_file`` wrote for the stack in ``state``."""
    import shlex

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith(ENV_FILE_HEADER) and \
        f"export VAEPIPE_STATE_DIR={shlex.quote(str(state))}\n" in text


def may_overwrite_env_file(path: Path) -> bool:
    """``write_env_file`` replaces only a file it wrote before (any stack), or creates one."""
    if path.is_symlink():
        return False
    if not path.exists():
        return True
    try:
        return path.is_file() and path.read_text().startswith(ENV_FILE_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def os_environ_path(var: str) -> Path | None:
    """An absolute path from the environment; ``ServiceError`` when it is relative."""
    raw = os.environ.get(var)
    if not raw:
        return None
    p = Path(raw).expanduser()
    if not p.is_absolute():
        raise ServiceError(f"{var}={raw!r}: must be an absolute path (a relative one would depend "
                           "on the current directory)")
    return p
