"""dvc.yaml: its declarations checked against the code, then the real DVC pipeline end to end.

Fast tests read dvc.yaml and the stage modules: each stage's code deps are exactly the import
closure of its module (minus the plumbing named in dvc.yaml's header), every listed param
exists, and no output path is written literally instead of through ``${paths.*}``.

Slow tests run real ``dvc`` commands in a scratch git repository made by ``make_project``
(the project's code, dvc.yaml and params.yaml with the tiny overrides of tests/conftest.py,
a DVC remote in tmp). ``make_project`` is also used by tests/test_flows.py,
tests/test_services.py and bench/bench_orchestration.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "vaepipe"
STAGES = ("ingest", "tokenize", "train_lm", "train", "evaluate", "embed")
# vaepipe modules by dotted name under the package ("stages.train"); "__init__" is the package
STAGE_MODULE = {"ingest": "stages.ingest", "tokenize": "stages.tokenize", "train_lm": "stages.train",
                "train": "stages.train", "evaluate": "stages.evaluate", "embed": "stages.embed"}
PLUMBING = {"core.config", "cli", "core.errors", "__main__"}
# the tiny project's own settings on top of conftest's tiny overrides: few threads (the box is
# shared), and relative paths (DVC outputs must live inside the repository)
PROJECT_OVERRIDES = ["train.num_threads=1", "embed.num_threads=1", "tracking.system_metrics=false"]


# ------------------------------------------------------------------------------------------
# helpers shared with other tests and the benchmark


def git(args: Sequence[str], cwd: Path) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
    return r.stdout


def tool_env() -> dict[str, str]:
    """The environment for dvc/vaepipe subprocesses: this venv's bin first, one thread."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


def dvc(args: Sequence[str], cwd: Path, *, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=tool_env(), capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"dvc {' '.join(args)} (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def make_project(project: Path, remote: Path, extra: Sequence[str] = ()) -> Path:
    """A scratch git + DVC repository running the real pipeline on the fixture corpus.

    It holds copies of vaepipe/ (dvc.yaml's code deps), dvc.yaml, .dvcignore and params.yaml
    with the tiny overrides (relative paths) and ``extra`` applied; DVC's default remote
    ``local`` points at ``remote``. Everything is committed. Returns ``project``.
    """
    from flows.runparams import apply_run_params

    project.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PKG, project / "vaepipe", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "params.yaml"):
        shutil.copy(REPO / name, project / name)
    (project / ".dvc").mkdir(exist_ok=True)
    (project / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (project / ".dvc" / "config").write_text(
        "[core]\n    remote = local\n    analytics = false\n    check_update = false\n"
        f"['remote \"local\"']\n    url = {remote}\n")
    overrides = [*tiny_overrides(Path(".")), *PROJECT_OVERRIDES, *extra]
    apply_run_params(project, None, overrides)
    git(["init", "-q", "-b", "main"], project)
    git(["config", "user.email", "test@vaepipe.invalid"], project)
    git(["config", "user.name", "vaepipe tests"], project)
    git(["add", "-A"], project)
    git(["commit", "-qm", "tiny project"], project)
    return project


def ran_stages(output: str) -> list[str]:
    """Stages that dvc repro actually ran (``Running stage 'X':``)."""
    return re.findall(r"Running stage '([^']+)'", output)


def lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


# ------------------------------------------------------------------------------------------
# dvc.yaml against the code (fast)


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def _module_file(module: str) -> Path:
    return PKG / f"{module.replace('.', '/')}.py"


def _is_module(module: str) -> bool:
    return _module_file(module).is_file()


def _imports(module: str) -> set[str]:
    """vaepipe modules that ``module`` imports when it runs (TYPE_CHECKING blocks excluded).

    ``__init__`` counts only when a value is taken from the package itself
    (``from vaepipe import __version__``): every import executes it, but only then can it
    change an output. Package ``__init__`` files of the layers hold only docstrings.
    """
    tree = ast.parse(_module_file(module).read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vaepipe."):
                    found.add(alias.name.removeprefix("vaepipe."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vaepipe":
                for alias in node.names:
                    found.add(alias.name if _is_module(alias.name) else "__init__")
            elif node.module.startswith("vaepipe."):
                base = node.module.removeprefix("vaepipe.")
                if _is_module(base):
                    found.add(base)
                else:  # from vaepipe.stages import tokenize, plots
                    found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or m in PLUMBING:
            continue
        seen.add(m)
        if m != "__init__":
            todo.extend(_imports(m))
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_the_import_closure(stage: str) -> None:
    deps = dvc_yaml()["stages"][stage]["deps"]
    code = {str(Path(d).relative_to("vaepipe").with_suffix("")).replace("/", ".")
            for d in deps if d.startswith("vaepipe/")}
    assert all((REPO / d).is_file() for d in deps if d.startswith("vaepipe/")), deps
    assert code == import_closure(STAGE_MODULE[stage]), (
        f"{stage}: dvc.yaml deps {sorted(code)} != imports {sorted(import_closure(STAGE_MODULE[stage]))}")


def test_closure_follows_function_level_imports_and_skips_type_checking() -> None:
    # evaluate imports tokenize, plots and checkpoint inside functions; plots imports evaluate
    # only for type checking, and evaluate never imports ingest
    closure = import_closure("stages.evaluate")
    assert {"stages.tokenize", "stages.plots", "ml.checkpoint", "ml.model"} <= closure
    assert "stages.ingest" not in closure and "core.config" not in closure
    assert import_closure("stages.plots") == {"stages.plots", "ml.estimators", "ml.decoding", "ml.model",
                                              "core.io", "core.constants"}


def test_every_listed_param_exists() -> None:
    flat: dict[str, object] = {}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for k, v in params.items():
        flat[k] = v
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
    for name, stage in dvc_yaml()["stages"].items():
        for p in stage.get("params", []):
            assert isinstance(p, str) and p in flat, f"{name}: param {p} is not in params.yaml"


def test_paths_come_from_params_templating() -> None:
    doc = dvc_yaml()
    for name, stage in doc["stages"].items():
        entries = [*stage.get("deps", []), *stage.get("outs", []), *stage.get("metrics", []),
                   *stage.get("plots", [])]
        for e in entries:
            path = e if isinstance(e, str) else next(iter(e))
            if path.startswith("vaepipe/"):
                continue
            assert path.startswith("${paths."), f"{name}: {path} is a literal path"
        assert "${" not in stage["cmd"] and "params.yaml" in stage["cmd"]  # paths reach the CLI via params
    for e in doc.get("plots", []):
        path = e if isinstance(e, str) else next(iter(e))
        assert path.startswith("${paths."), f"top-level plot {path} is a literal path"
    assert list(doc["stages"]) == list(STAGES)


def test_stage_commands_run_the_cli_on_params_yaml() -> None:
    for name, stage in dvc_yaml()["stages"].items():
        cli_stage = "train" if name == "train_lm" else name
        assert stage["cmd"].startswith(f"vaepipe {cli_stage} --params params.yaml"), stage["cmd"]
    assert "--set model.kind=lm" in dvc_yaml()["stages"]["train_lm"]["cmd"]


def test_default_remote_expands_home(tmp_path: Path) -> None:
    # .dvc/config writes the remote as ~/.cache/...: DVC must expand it, not make ./~ in the repo
    from dvc.repo import Repo

    repo = Repo(str(REPO))
    try:
        remote = repo.cloud.get_remote()
        assert remote.path.startswith(str(Path.home())) and "~" not in remote.path, remote.path
    finally:
        repo.close()


# ------------------------------------------------------------------------------------------
# the real pipeline (slow)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny project after its first full ``dvc repro`` (one per module: it costs a minute)."""
    root = tmp_path_factory.mktemp("dvc-project")
    remote = root / "remote"
    proj = make_project(root / "project", remote)
    r = dvc(["repro"], proj)
    assert ran_stages(r.stdout) == list(STAGES), r.stdout
    return proj, remote


@pytest.mark.slow
def test_full_repro_then_nothing_to_do(project: tuple[Path, Path]) -> None:
    proj, _ = project
    stages = lock(proj)
    assert list(stages) == list(STAGES)
    metrics = json.loads((proj / "reports/metrics.json").read_text())
    assert {"elbo", "iw_nll", "kl", "mi", "active_units", "lm_nll"} <= set(metrics)
    r = dvc(["repro"], proj)
    assert ran_stages(r.stdout) == [], r.stdout
    assert lock(proj) == stages
    assert dvc(["status"], proj).stdout.strip().endswith("Data and pipelines are up to date.")


@pytest.mark.slow
def test_param_changes_rerun_exactly_their_dependants(project: tuple[Path, Path]) -> None:
    proj, _ = project
    before = lock(proj)
    r = dvc(["exp", "run", "-S", "evaluate.iw_samples=7"], proj)
    assert ran_stages(r.stdout) == ["evaluate"], r.stdout
    assert lock(proj)["evaluate"]["params"]["params.yaml"]["evaluate"]["iw_samples"] == 7
    # tracking.registered_model is read by train only, but train's new config.json changes the
    # model directory's md5, which evaluate and embed depend on; the baseline stays
    r = dvc(["exp", "run", "-S", "tracking.registered_model=another-name"], proj)
    assert ran_stages(r.stdout) == ["train", "evaluate", "embed"], r.stdout
    after = lock(proj)
    assert after["train_lm"] == before["train_lm"]
    assert after["train"]["outs"] != before["train"]["outs"]
    # metrics diff against the committed (HEAD) workspace state reads the metric file
    r = dvc(["metrics", "diff", "--json"], proj)
    assert "reports/metrics.json" in r.stdout


@pytest.mark.slow
def test_metrics_and_plots_show(project: tuple[Path, Path], tmp_path: Path) -> None:
    proj, _ = project
    shown = json.loads(dvc(["metrics", "show", "--json"], proj).stdout)
    values = json.loads((proj / "reports/metrics.json").read_text())
    (ws,) = shown.values()  # one revision, the workspace (keyed "" by dvc 3.67)
    ws = ws["data"]["reports/metrics.json"]["data"]
    assert ws["iw_nll"] == values["iw_nll"] and ws["latent_dim"] == 8
    out = tmp_path / "plots"
    dvc(["plots", "show", "-o", str(out)], proj)
    html = (out / "index.html").read_text()
    # the three CSV plots as Vega specs with dvc.yaml's titles, the three PNGs as images
    for stage_plot in dvc_yaml()["stages"]["evaluate"]["plots"]:
        assert next(iter(stage_plot.values()))["title"] in html
    assert html.count("vegaEmbed(") == 3
    pngs = sorted(p.name for p in (out / "static").glob("*.png"))
    assert pngs == ["workspace_reports_iw_nll_vs_k.png", "workspace_reports_kl_per_dim.png",
                    "workspace_reports_latent_pca.png"]


@pytest.mark.slow
def test_push_then_pull_in_a_fresh_clone(project: tuple[Path, Path], tmp_path: Path) -> None:
    proj, remote = project
    # the state to clone: params.yaml, dvc.lock and the git-kept metric committed
    git(["add", "params.yaml", "dvc.lock", "reports/metrics.json"], proj)
    git(["commit", "-qm", "pipeline run"], proj)
    dvc(["push", "--run-cache"], proj)
    assert (remote / "files" / "md5").is_dir()
    clone = tmp_path / "clone"
    git(["clone", "-q", str(proj), str(clone)], tmp_path)
    # before any pull, flows.lineage reads the model's run.json at HEAD from the remote
    r = subprocess.run([sys.executable, "-m", "flows.lineage", "--rev", "HEAD", "--project-dir", str(clone)],
                       cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    run_json = json.loads((proj / "models/vae/run.json").read_text())
    assert json.loads(r.stdout) == {"rev": "HEAD", "model": "models/vae", **run_json}
    assert not (clone / "models").exists()
    r = dvc(["pull", "--run-cache"], clone)
    for stage in lock(proj).values():
        for out in stage.get("outs", []):
            a, b = proj / out["path"], clone / out["path"]
            assert _tree_bytes(a) == _tree_bytes(b), out["path"]
    r = dvc(["repro"], clone)
    assert ran_stages(r.stdout) == [], r.stdout


def _tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
