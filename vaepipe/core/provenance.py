"""Which code a run ran: one answer for every record of a run.

    git_info() -> GitInfo(commit, dirty, branch, root)

Training tags its run ``git_commit`` and the MLflow tracker tags the same run
``mlflow.source.git.commit`` and ``vaepipe.git_dirty``; both ask this function, so one run
never carries two commits.

Which checkout: the *project* checkout, i.e. the git work tree holding ``project_dir`` (by
default the working directory the stage runs in: ``dvc repro`` and the Prefect flows run the
stages from the repository root). That checkout pins the code together with ``params.yaml``
and ``dvc.lock``, and it is the only one there is when vaepipe is installed as a wheel. Only
when ``project_dir`` is not inside a git work tree (a training started from a data folder or
a temporary directory) is the checkout holding the vaepipe package asked instead, which is
where an editable install's code lives. Neither in git: ``GitInfo`` of Nones.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the vaepipe package folder
_TIMEOUT_S = 10


@dataclass(frozen=True)
class GitInfo:
    """The state of one git checkout; all None when no checkout was found."""

    commit: str | None = None  # full sha of HEAD
    dirty: bool | None = None  # tracked files differ from HEAD (untracked files do not count)
    branch: str | None = None  # None on a detached HEAD
    root: Path | None = None  # the work tree's top folder


def git_info(project_dir: str | os.PathLike[str] | None = None) -> GitInfo:
    """The checkout ``project_dir`` (default: the working directory) is in, else the package's.

    Never raises: without git, or outside any checkout, the fields are None.
    """
    start = _cwd() if project_dir is None else Path(project_dir)
    for folder in (start, PACKAGE_DIR):
        info = _read(folder)
        if info.commit is not None:
            return info
    log.debug("neither %s nor %s is in a git checkout", start, PACKAGE_DIR)
    return GitInfo()


def _cwd() -> Path:
    try:
        return Path.cwd()
    except OSError:  # the working directory was deleted: only the package's checkout is left
        return PACKAGE_DIR


def _read(folder: Path) -> GitInfo:
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return GitInfo()
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    branch = _git(folder, "symbolic-ref", "--quiet", "--short", "HEAD")
    root = _git(folder, "rev-parse", "--show-toplevel")
    return GitInfo(commit=commit, dirty=None if status is None else bool(status),
                   branch=branch or None, root=Path(root) if root else None)


def _git(cwd: Path, *args: str) -> str | None:
    """stdout of one git command in ``cwd``, or None when it fails (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
