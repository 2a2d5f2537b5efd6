"""MkDocs hooks: the configuration reference is generated from the code at build time.

``docs/configuration.md`` holds the placeholder ``<!-- params-describe -->``; ``on_page_markdown``
replaces it with ``vaepipe.core.config.describe()`` (what ``vaepipe params --describe`` prints)
as one table per params.yaml section, so the page can never drift from the typed config.
A stage page holds ``<!-- params-describe SECTION -->`` (or several, comma-separated) and gets
the table of those sections only, without headings.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

PLACEHOLDER = re.compile(r"<!-- params-describe(?: (?P<sections>[a-z_, ]+))? -->")

# the repository root: docs/hooks.py -> ..; imported from here, not from an installed copy
ROOT = Path(__file__).resolve().parent.parent

# one heading per section, with the page that explains what the stage does with it
SECTIONS = {
    "": ("General", None),
    "paths": ("paths: where each artifact lives", "concepts.md#artifacts"),
    "ingest": ("ingest", "stages/ingest.md"),
    "tokenize": ("tokenize", "stages/tokenize.md"),
    "model": ("model", "stages/train.md#the-model"),
    "train": ("train", "stages/train.md"),
    "evaluate": ("evaluate", "stages/evaluate.md"),
    "embed": ("embed", "stages/embed.md"),
    "tracking": ("tracking", "tracking.md"),
}

# "key = default [choice | choice]  # help", as describe() writes each line
_CHOICES = re.compile(r"^(?P<default>.+?) \[(?P<choices>[^\[\]]*)\]$")


def describe_lines() -> list[str]:
    """The lines of ``vaepipe.core.config.describe()``, imported from this checkout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    config = importlib.import_module("vaepipe.core.config")
    return [line for line in config.describe().splitlines() if line.strip()]


def parse_line(line: str) -> dict[str, str]:
    """Split one describe() line into key, default, choices and help."""
    key, _, rest = line.partition(" = ")
    value, _, help_text = rest.partition("  # ")
    choices = ""
    m = _CHOICES.match(value)
    if m:
        value, choices = m.group("default"), m.group("choices")
    return {"key": key.strip(), "default": value.strip(), "choices": choices.strip(),
            "help": help_text.strip()}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def group(lines: list[str]) -> dict[str, list[dict[str, str]]]:
    """describe()'s rows by params.yaml section ("" for top-level keys), in its order."""
    groups: dict[str, list[dict[str, str]]] = {}
    for line in lines:
        row = parse_line(line)
        section = row["key"].split(".", 1)[0] if "." in row["key"] else ""
        groups.setdefault(section, []).append(row)
    return groups


def table(rows: list[dict[str, str]]) -> list[str]:
    """One Markdown table: key, default, allowed values, meaning."""
    out = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for r in rows:
        allowed = ", ".join(_code(c.strip()) for c in r["choices"].split("|") if c.strip())
        out.append(f"| `{r['key']}` | {_cell(_code(r['default']))} | {_cell(allowed)} | {_cell(r['help'])} |")
    return out + [""]


def render(lines: list[str]) -> str:
    """Markdown for the whole reference: a heading and a table per section."""
    out: list[str] = []
    for section, rows in group(lines).items():
        title, page = SECTIONS.get(section, (section, None))
        out.append(f"### {title}\n")
        if page:
            out.append(f"How they are used: [{title.split(':')[0]}]({page}).\n")
        out.extend(table(rows))
    return "\n".join(out)


def render_sections(lines: list[str], sections: list[str]) -> str:
    """Markdown for some sections only: one table, no headings (for the stage pages)."""
    groups = group(lines)
    unknown = [s for s in sections if s not in groups]
    if unknown:
        raise ValueError(f"params-describe: no params.yaml section {', '.join(unknown)}")
    return "\n".join(table([r for s in sections for r in groups[s]]))


def _replace(match: re.Match[str], lines: list[str]) -> str:
    if match.group("sections"):
        names = [s.strip() for s in match.group("sections").split(",") if s.strip()]
        return render_sections(lines, names)
    return render(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the placeholders with the generated tables (only pages that hold one)."""
    if not PLACEHOLDER.search(markdown):
        return markdown
    lines = describe_lines()
    return PLACEHOLDER.sub(lambda m: _replace(m, lines), markdown)
