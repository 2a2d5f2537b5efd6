"""How a flow run's parameters reach DVC: by writing them into the project's params.yaml.

dvc.yaml's stages read params.yaml (their ``params:`` lists and ``${paths.*}`` templating), so
an override only changes what DVC runs once it is in that file — the same thing
``dvc exp run -S key=value`` does. Unlike ``-S``, the values are validated first by the typed
loader (``vaepipe.core.config.load_params``): a misspelled key fails the run before any stage
instead of silently adding a parameter (iterative/dvc#5477). Only keys whose value differs are
rewritten, with ruamel.yaml's round trip, so comments, order and layout of the file stay and
``git diff params.yaml`` shows exactly the experiment.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vaepipe.core.config import Params, load_params
from vaepipe.core.errors import ConfigError
from vaepipe.core.io import atomic_write_text

PARAMS_FILE = "params.yaml"  # the file dvc.yaml reads (DVC's default params file)


def resolve_run_params(project_dir: str | Path, params_file: str | Path | None = None,
                       overrides: Sequence[str] = ()) -> Params:
    """The run's validated values: ``params_file`` (default: the project's params.yaml) plus
    ``overrides`` (``section.key=value``, values parsed as YAML). Raises ConfigError."""
    project_dir = Path(project_dir)
    source = Path(params_file) if params_file is not None else project_dir / PARAMS_FILE
    if not source.is_absolute() and params_file is not None and not source.is_file():
        source = project_dir / source  # relative to the project, like the flow's other paths
    return load_params(source, list(overrides))


def apply_run_params(project_dir: str | Path, params_file: str | Path | None = None,
                     overrides: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Validate the run's values, then write the ones that differ into params.yaml.

    Returns ``{"section.key": (old, new)}`` for every key written (empty when the file already
    holds the run's values, and then the file is not touched at all: its mtime and bytes stay).
    """
    project_dir = Path(project_dir)
    target = project_dir / PARAMS_FILE
    wanted = resolve_run_params(project_dir, params_file, overrides)  # raises before any write
    current = load_params(target) if target.is_file() else None
    old_flat = current.flat() if current is not None else {}
    changes = {k: (old_flat.get(k), v) for k, v in wanted.flat().items()
               if current is None or old_flat.get(k) != v}
    if not changes:
        return {}
    yaml = _yaml()
    doc = yaml.load(target.read_text(encoding="utf-8")) if target.is_file() else None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    for key, (_, new) in changes.items():
        _set(doc, key, new, target)
    out = io.StringIO()
    yaml.dump(doc, out)
    atomic_write_text(target, out.getvalue())
    # the file must now load to exactly the run's values (a guard against YAML surprises,
    # e.g. a string that reads back as a number)
    if load_params(target) != wanted:
        raise ConfigError(f"{target}: rewritten file does not read back as the run's parameters")
    return changes


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip mode: comments and key order survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long value (an input list) onto several lines
    # write null as `null` (ruamel's default is an empty value, which would rewrite untouched
    # lines such as `tokenizer_path: null`)
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _set(doc: Any, key: str, value: Any, target: Path) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    *sections, leaf = key.split(".")
    node = doc
    for s in sections:
        child = node.get(s)
        if child is None:
            child = node[s] = CommentedMap()
        elif not isinstance(child, dict):
            raise ConfigError(f"{target}: {s} is not a section")
        node = child
    if isinstance(value, list):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()  # `inputs: [a, b]` on one line, like the committed file
        value = seq
    node[leaf] = value
