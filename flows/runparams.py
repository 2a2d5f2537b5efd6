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
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


# ------------------------------------------------------------------------------------------
# the typed deployment parameters


Unit = Literal["line", "paragraph", "sentence", "document"]
Device = Literal["auto", "cpu", "cuda"]

# RunSettings field -> the params.yaml keys it sets (device: every stage that places a model)
SETTING_KEYS: dict[str, tuple[str, ...]] = {
    "inputs": ("ingest.inputs",),
    "unit": ("ingest.unit",),
    "embed_dim": ("model.embed_dim",),
    "hidden_dim": ("model.hidden_dim",),
    "latent_dim": ("model.latent_dim",),
    "max_steps": ("train.max_steps",),
    "device": ("train.device", "evaluate.device", "embed.device"),
    "iw_samples": ("evaluate.iw_samples",),
}


class RunSettings(BaseModel):
    """The parameters people change most, as typed fields (the Prefect UI renders them as a form).

    Every field is optional: left empty, params.yaml's value stays. Anything else goes through
    the flow's free-form ``overrides`` (``section.key=value``).
    """

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] | None = Field(None, description="ingest.inputs: files, directories, globs or pkg:// paths")
    unit: Unit | None = Field(None, description="ingest.unit: the record unit")
    embed_dim: int | None = Field(None, ge=1, description="model.embed_dim: token embedding size")
    hidden_dim: int | None = Field(None, ge=1, description="model.hidden_dim: LSTM hidden size / Transformer width")
    latent_dim: int | None = Field(None, ge=1, description="model.latent_dim: size of z")
    max_steps: int | None = Field(None, ge=0, description="train.max_steps: optimizer steps; 0 means no bound")
    device: Device | None = Field(None, description="train/evaluate/embed device: auto picks CUDA when present")
    iw_samples: int | None = Field(None, ge=1, description="evaluate.iw_samples: K of the importance-weighted NLL")

    def to_overrides(self) -> list[str]:
        """The set fields as ``section.key=value`` overrides (values as JSON, which YAML reads back)."""
        return [f"{key}={json.dumps(value)}" for name, value in self.model_dump(exclude_none=True).items()
                for key in SETTING_KEYS[name]]
