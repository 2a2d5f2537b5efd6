"""Which folders may be a stage's output: the checks behind ``paths.*`` in params.yaml.

Every stage replaces its output folder as a whole (and removes leftovers beside it), so an
output that overlaps another output, an input, or a folder the user keeps other things in
would be deleted. ``check_output_paths`` refuses all of those before any stage touches the
disk. Paths are compared resolved (symlinked parents followed) and absolute (relative ones are
relative to the current directory, as the stages read them).

An ``s3://bucket/prefix`` output (``core.storage``) is compared with the other S3 outputs
and inputs as the path ``/bucket/prefix``; it never overlaps a local path, and it must name a
prefix (never a whole bucket).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING

from vaepipe.core.errors import ConfigError
from vaepipe.core.storage import is_uri, parse_uri

if TYPE_CHECKING:
    from vaepipe.core.config import Params

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # pkg://, s3://, ...: not local paths
_GLOB_MAGIC = re.compile(r"[*?[]")  # the characters glob expands


_Located = tuple[str, str, PurePath]  # (key, value as written, absolute resolved path or /bucket/prefix)


def check_output_paths(params: Params, params_dir: str | Path | None) -> None:
    """ConfigError when a ``paths.*`` output overlaps a protected folder, another output or an input."""
    # every paths.* key names what some stage writes
    named = [(f"paths.{k}", v) for k, v in dataclasses.asdict(params.paths).items()]
    outputs = [_located(k, v) for k, v in named if not is_uri(v)]
    # protected folders first, so that `paths.reports=.` is named as the current directory
    _refuse_protected(outputs, _protected_places(params_dir))
    _refuse_overlaps(outputs)
    _refuse_held_inputs(outputs, _local_inputs(params))
    remote = [(k, v, parse_uri(v, k).posix) for k, v in named if is_uri(v)]
    _refuse_overlaps(remote)
    _refuse_held_inputs(remote, _remote_inputs(params))


def _refuse_protected(outputs: list[_Located], places: list[tuple[str, Path]]) -> None:
    for key, raw, path in outputs:
        for label, place in places:
            if place == path or place.is_relative_to(path):
                verb = "is" if place == path else "contains"
                raise ConfigError(f"{key} {raw} ({path}) {verb} {label} ({place}): "
                                  "a stage replaces its output folder as a whole")


def _refuse_overlaps(outputs: list[_Located]) -> None:
    for i, (key, raw, path) in enumerate(outputs):
        for other_key, other_raw, other in outputs[i + 1:]:
            relation = _relation(path, other)
            if relation:
                raise ConfigError(f"{key} {raw} ({path}) {relation} {other_key} {other_raw} ({other}): "
                                  "outputs must not overlap")


def _refuse_held_inputs(outputs: list[_Located], inputs: list[_Located]) -> None:
    for key, raw, path in outputs:
        for in_key, in_raw, in_path in inputs:
            # tokenize reads tokenizer_path before it replaces paths.tokenizer: reuse in place is fine
            if in_key == "tokenize.tokenizer_path" and key == "paths.tokenizer":
                continue
            if in_path == path or in_path.is_relative_to(path):
                verb = "equals" if in_path == path else "contains"
                raise ConfigError(f"{key} {raw} ({path}) {verb} {in_key} {in_raw} ({in_path}): "
                                  "an output must not hold an input")


def _located(key: str, raw: str) -> _Located:
    """``(key, raw, absolute resolved path)``; ConfigError naming the key if it cannot be resolved."""
    try:
        return key, raw, Path(raw).resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a symlink loop, or a current directory that is gone
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{key} {raw}: cannot resolve the path ({reason})") from None


def _relation(a: PurePath, b: PurePath) -> str | None:
    """How ``a`` stands to ``b`` in words ("equals", "contains", "lies inside"), None if apart."""
    if a == b:
        return "equals"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "lies inside"
    return None


def _protected_places(params_dir: str | Path | None) -> list[tuple[str, Path]]:
    """Folders no output may be or contain, with how errors name them."""
    places: list[tuple[str, Path]] = [("the filesystem root", Path("/"))]
    try:
        places.append(("the home folder", Path.home().resolve()))
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry: nothing to protect
        pass
    try:
        places.append(("the current directory", Path.cwd().resolve()))
    except OSError:  # the current directory was removed: no output can lie in it
        pass
    if params_dir is not None:
        places.append(("the folder of the params file", Path(params_dir).resolve()))
    package = Path(__file__).resolve().parents[1]  # .../vaepipe
    if (package.parent / "pyproject.toml").is_file():  # a source checkout (editable install)
        places.append(("the vaepipe checkout", package.parent))
    places.append(("the vaepipe package", package))
    return places


def _local_inputs(params: Params) -> list[_Located]:
    """The inputs that are local paths: ``ingest.inputs`` (URL-like ones skipped) and
    ``tokenize.tokenizer_path``, as ``(key, raw, absolute resolved path)``."""
    found = []
    for i, spec in enumerate(params.ingest.inputs):
        if _URL.match(spec):
            continue
        found.append(_located_input(f"ingest.inputs[{i}]", spec, _fixed_folder(spec)))
    if params.tokenize.tokenizer_path and not is_uri(params.tokenize.tokenizer_path):
        path = params.tokenize.tokenizer_path
        found.append(_located_input("tokenize.tokenizer_path", path, path))
    return found


def _remote_inputs(params: Params) -> list[_Located]:
    """The ``s3://`` inputs (``ingest.inputs``, ``tokenize.tokenizer_path``) placed as ``/bucket/prefix``."""
    specs = [(f"ingest.inputs[{i}]", spec) for i, spec in enumerate(params.ingest.inputs)]
    specs.append(("tokenize.tokenizer_path", params.tokenize.tokenizer_path or ""))
    found = []
    for key, spec in specs:
        if is_uri(spec):
            bucket, _, prefix = _fixed_folder(spec)[len("s3://"):].partition("/")
            found.append((key, spec, PurePosixPath("/", bucket, prefix.strip("/"))))
    return found


def _located_input(key: str, spec: str, raw: str) -> _Located:
    """Like ``_located``, but an input whose last part cannot be resolved (a symlink loop) is
    placed by its folder: whether an output holds it does not depend on where it points, and
    the stage that reads it reports the loop naming the file."""
    try:
        return key, spec, Path(raw).resolve(strict=False)
    except (OSError, RuntimeError):
        p = Path(raw)
        return key, spec, _located(key, str(p.parent))[2] / p.name


def _fixed_folder(spec: str) -> str:
    """``spec`` itself, or for a glob the folder above its first wildcard (``data/a*/x`` -> ``data``)."""
    head, *rest = _GLOB_MAGIC.split(spec, maxsplit=1)
    if not rest:
        return spec
    return os.path.dirname(head) or "."
