"""The documentation site: it builds with --strict, and its generated pages match the code.

`mkdocs build --strict` fails on a broken link or anchor, a page missing from the nav, a
missing snippet (BENCHMARKS.md) or an API reference that does not resolve, so building it is
the test. The build takes 5-10 s (once for the module), so the tests that read the built site
are marked slow; the checks of the sources and of the hook are not.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vaepipe.core.config import describe

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings_handlers")),
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)


def _hooks():
    spec = importlib.util.spec_from_file_location("vaepipe_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _describe_keys() -> list[str]:
    return [line.split(" = ", 1)[0] for line in describe().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_site_builds_with_every_page(site: Path) -> None:
    for name in ("concepts", "configuration", "stages/ingest", "stages/tokenize", "stages/train",
                 "stages/evaluate", "stages/probes", "stages/embed", "using", "reproduce", "orchestration",
                 "tracking", "team", "failures", "storage",
                 "scaling", "benchmarks", "benchmarks-archive", "architecture", "api/core", "api/ml",
                 "api/stages", "api/adapters", "api/cli"):
        assert (site / name / "index.html").is_file(), name
    assert (site / "index.html").is_file()
    assert not (site / "hooks.py").exists()


@pytest.mark.slow
def test_configuration_page_lists_every_key(site: Path) -> None:
    html = _page(site, "configuration")
    missing = [k for k in _describe_keys() if f"<code>{k}</code>" not in html]
    assert not missing, f"keys of describe() missing from configuration.md: {missing}"


@pytest.mark.slow
def test_no_placeholder_survives(site: Path) -> None:
    for page in site.rglob("*.html"):
        assert "params-describe" not in page.read_text(encoding="utf-8"), page


@pytest.mark.slow
def test_stage_pages_list_their_sections(site: Path) -> None:
    for page, section in (("stages/ingest", "ingest"), ("stages/tokenize", "tokenize"),
                          ("stages/train", "train"), ("stages/train", "model"),
                          ("stages/evaluate", "evaluate"), ("stages/embed", "embed")):
        html = _page(site, page)
        keys = [k for k in _describe_keys() if k.startswith(section + ".")]
        assert keys and all(f"<code>{k}</code>" in html for k in keys), (page, section)


@pytest.mark.slow
def test_benchmarks_page_includes_benchmarks_md(site: Path) -> None:
    html = _page(site, "benchmarks")
    assert 'id="reference-figures"' in html
    assert "1,389,176" in html  # a figure that lives only in BENCHMARKS.md
    assert "--8&lt;--" not in html and "--8<--" not in html


@pytest.mark.slow
def test_api_reference_renders(site: Path) -> None:
    html = _page(site, "api/core")
    assert "load_params" in html and "describe" in html


def test_docs_cite_nothing_outside_the_repository() -> None:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CONTRIBUTING.md",
             *sorted(ROOT.glob("params*.yaml")), *sorted((ROOT / "docs").rglob("*.md"))]
    for f in files:
        text = f.read_text(encoding="utf-8")
        # the development team's private notes (spelled in parts so this file does not name them)
        for bad in ("DESIGN" + ".md", "TOOL-" + "NOTES", "../" + "shared"):
            assert bad not in text, f"{f.relative_to(ROOT)} cites {bad}"


def test_hook_parses_describe_lines() -> None:
    hooks = _hooks()
    row = hooks.parse_line("ingest.unit = 'sentence' [line | paragraph | sentence | document]  # record unit")
    assert row == {"key": "ingest.unit", "default": "'sentence'", "choices": "line | paragraph | sentence | document",
                   "help": "record unit"}
    row = hooks.parse_line("evaluate.splits = ['test', 'valid']  # splits to evaluate; the first is the headline")
    assert row["default"] == "['test', 'valid']" and row["choices"] == ""
    table = hooks.render_sections(hooks.describe_lines(), ["tokenize"])
    assert re.search(r"^\| `tokenize.overlong` \| `'drop'` \| `truncate`, `drop` \|", table, re.M)
    with pytest.raises(ValueError, match="no params.yaml section nope"):
        hooks.render_sections(hooks.describe_lines(), ["nope"])
