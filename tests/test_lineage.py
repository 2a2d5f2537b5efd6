"""Lineage in MLflow (issue #19, items 1-3): datasets, source and Prefect tags, the run's
description and the registered version's description and tags.

Against real sqlite stores (nothing mocked): the MLflow UI reads exactly what ``MlflowClient``
returns here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vaepipe.core import provenance
from vaepipe.core.config import Params, TrackingConfig
from vaepipe.core.tracking import NullTracker
from vaepipe.stages.evaluate import run_description

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from vaepipe.adapters.tracking_mlflow import (  # noqa: E402
    DESCRIPTION_TAG, DIGEST_LEN, PREFECT_ENV, MlflowTracker, dataset_entity, dvc_default_remote, dvc_lock_digest,
    prefect_tags,
)

PREFECT = {"VAEPIPE_PREFECT_FLOW_RUN_ID": "0b1c-flow-run", "VAEPIPE_PREFECT_FLOW_RUN_NAME": "brave-otter",
           "VAEPIPE_PREFECT_DEPLOYMENT": "vaepipe/default",
           "VAEPIPE_PREFECT_FLOW_RUN_URL": "http://127.0.0.1:4200/runs/flow-run/0b1c-flow-run"}


def no_prefect_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PREFECT_ENV:
        monkeypatch.delenv(var, raising=False)


def datasets(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str, dict]]:
    """name -> (digest, context, profile) of a run's dataset inputs."""
    out = {}
    for d in client.get_run(run_id).inputs.dataset_inputs:
        ctx = {t.key: t.value for t in d.tags}.get("mlflow.data.context")
        out[d.dataset.name] = (d.dataset.digest, ctx, json.loads(d.dataset.profile or "{}"))
    return out


# -- pure pieces ---------------------------------------------------------------------------


def test_prefect_tags_only_for_set_variables():
    assert prefect_tags({}) == {}
    assert prefect_tags({"VAEPIPE_PREFECT_FLOW_RUN_ID": "abc", "VAEPIPE_PREFECT_DEPLOYMENT": ""}) == {
        "prefect.flow_run_id": "abc"}
    assert set(prefect_tags(PREFECT)) == {"prefect.flow_run_id", "prefect.flow_run_name", "prefect.deployment",
                                          "prefect.flow_run_url"}


def test_dvc_lock_digest_names_the_out_or_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dvc_lock_digest("data/tokens") is None  # no dvc.lock
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  tokenize:\n    cmd: vaepipe tokenize\n    outs:\n"
        "    - path: data/tokens\n      md5: 0123456789abcdef0123456789abcdef.dir\n      size: 10\n")
    assert dvc_lock_digest("data/tokens") == "0123456789abcdef0123456789abcdef.dir"
    assert dvc_lock_digest(tmp_path / "data" / "tokens") == "0123456789abcdef0123456789abcdef.dir"
    assert dvc_lock_digest("data/corpus") is None


def test_dataset_entity_digest_from_dvc_lock_else_our_hash(built_tokens: Params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokens = built_tokens.paths.tokens
    ours = dataset_entity("tokens/train", tokens, digest="f" * 64, rows=7)
    assert ours.digest == "f" * DIGEST_LEN and json.loads(ours.profile) == {"num_rows": 7, "digest_from": "vaepipe"}
    assert json.loads(ours.source) == {"uri": Path(tokens).resolve().as_uri()} and ours.source_type == "local"
    cols = {c["name"] for c in json.loads(ours.schema)["mlflow_colspec"]}
    assert {"doc_id", "split", "ids", "n_tokens"} <= cols
    (tmp_path / "dvc.lock").write_text(json.dumps({"stages": {"tokenize": {"outs": [
        {"path": str(Path(tokens).resolve()), "md5": "a" * 32 + ".dir"}]}}}))
    assert dataset_entity("tokens/train", tokens, digest="f" * 64, rows=None).digest == "a" * 32 + ".dir"


def test_dataset_source_is_the_object_in_the_default_dvc_remote(built_tokens: Params, tmp_path, monkeypatch):
    """A real DVC project: the tokens folder is a stage's output in dvc.lock and pushed to the
    default remote; the dataset's source is the very object ``dvc push`` stored there."""
    from mlflow.data import get_source

    from test_dvc_pipeline import dvc, git

    proj, remote = tmp_path / "proj", tmp_path / "remote"
    proj.mkdir()
    shutil.copytree(built_tokens.paths.tokens, tmp_path / "built")
    git(["init", "-q"], proj)
    dvc(["init", "-q"], proj)
    monkeypatch.chdir(proj)
    tokens = proj / "data" / "tokens"
    assert dvc_default_remote() is None  # no remote yet: the local folder, as without DVC
    dvc(["stage", "add", "-n", "tokenize", "-o", "data/tokens",
         f"mkdir -p data && cp -r {tmp_path / 'built'} data/tokens"], proj)
    dvc(["repro", "-q"], proj)
    local = dataset_entity("tokens/train", tokens, digest=None, rows=None)
    assert local.source_type == "local" and json.loads(local.source) == {"uri": tokens.resolve().as_uri()}
    assert local.digest == dvc_lock_digest(tokens)[:DIGEST_LEN]

    dvc(["remote", "add", "-d", "store", str(remote)], proj)
    dvc(["push", "-q"], proj)
    assert dvc_default_remote() == str(remote)
    entity = dataset_entity("tokens/train", tokens, digest=None, rows=None)
    uri = json.loads(entity.source)["uri"]
    assert entity.source_type == "local" and uri.startswith(remote.as_uri() + "/files/md5/")
    pushed = Path(uri.removeprefix("file://"))
    assert pushed.is_file() and pushed.name.endswith(".dir")  # the folder's listing DVC pushed
    assert {e["relpath"] for e in json.loads(pushed.read_text())} == \
        {str(f.relative_to(tokens)) for f in tokens.rglob("*") if f.is_file()}
    assert entity.digest == dvc_lock_digest(tokens)[:DIGEST_LEN]
    assert get_source(entity).uri == uri  # MLflow resolves it to its local-artifact source

    # an S3 default remote (configured, never contacted) names the object by its s3:// URL;
    # .dvc/config.local overrides .dvc/config as in DVC
    dvc(["remote", "add", "-d", "cloud", "s3://vaepipe-bucket/dvc"], proj)
    md5 = dvc_lock_digest(tokens)
    s3 = dataset_entity("tokens/train", tokens, digest=None, rows=None)
    assert s3.source_type == "s3"
    assert json.loads(s3.source) == {"uri": f"s3://vaepipe-bucket/dvc/files/md5/{md5[:2]}/{md5[2:]}"}
    assert get_source(s3).uri == json.loads(s3.source)["uri"]
    dvc(["remote", "default", "--local", "store"], proj)
    assert dvc_default_remote() == str(remote)
    # an output dvc.lock does not name keeps the local path, whatever the remote
    other = proj / "other"
    shutil.copytree(tokens, other)
    assert json.loads(dataset_entity("other", other, digest="c" * 64, rows=1).source) == {"uri": other.as_uri()}


def test_run_description_has_the_table_and_five_examples_each(tmp_path):
    (tmp_path / "reconstructions.txt").write_text(
        "# header\n\n" + "".join(f"x:      s{i}\nmean:   m{i}\nsample: r{i}\n\n" for i in range(8)))
    (tmp_path / "prior_samples.txt").write_text(
        "# header\n\n" + "".join(f"greedy: g{i}\nsample: p{i}\n\n" for i in range(8)))
    metrics = {"iw_nll": 40.5, "lm_nll": 41.0, "gap_vs_lm": 0.5, "gap_vs_lm_ci95": [0.1, 0.9], "kl": 3.0,
               "mi": 1.2, "active_units": 4, "ppl": 90.0, "n_docs": 50, "iw_samples": 10}
    md = run_description("test", metrics, tmp_path)
    for row in ("| IW-NLL (nats/doc) | 40.5 |", "| LM NLL (nats/doc) | 41 |",
                "| gap vs LM (nats/doc) | 0.5 (95% CI 0.1 to 0.9) |", "| KL | 3 |", "| MI | 1.2 |",
                "| AU | 4 |", "| ppl | 90 |"):
        assert row in md
    assert "x:      s4" in md and "x:      s5" not in md and "greedy: g4" in md and "greedy: g5" not in md
    assert "# header" not in md
    # no LM baseline: its rows are left out; no reports: no example sections
    md = run_description("test", {"iw_nll": 1.0}, tmp_path / "missing")
    assert "LM NLL" not in md and "Reconstructions" not in md


def test_null_tracker_takes_the_new_calls():
    t = NullTracker()
    t.log_dataset("corpus", "nowhere", context="training")
    t.set_description("# nothing")


# -- a real store ---------------------------------------------------------------------------


def test_tracker_datasets_and_no_prefect_tags_outside_a_flow(built_tokens: Params, tmp_path, monkeypatch):
    no_prefect_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = MlflowTracker(TrackingConfig(uri=uri, experiment="lineage-plain"), flush_interval=0.1)
    t.start(run_name="plain")
    run_id = t.run_id
    t.log_dataset("tokens/valid", built_tokens.paths.tokens, context="validation", digest="b" * 64, rows=3)
    t.log_dataset("corpus", built_tokens.paths.corpus, context="training")
    t.log_dataset("missing", tmp_path / "nowhere", context="training")  # warned, listed, not fatal
    t.set_description("| a | b |")
    t.set_tags({"sample": "a\x00b"})  # PostgreSQL refuses NUL in text: every store gets U+FFFD
    t.end()
    client = MlflowClient(tracking_uri=uri)
    ds = datasets(client, run_id)
    assert ds["tokens/valid"] == ("b" * DIGEST_LEN, "validation", {"num_rows": 3, "digest_from": "vaepipe"})
    assert ds["corpus"][1] == "training" and ds["corpus"][2]["num_rows"] > 0
    assert "missing" not in ds and any("missing" in x for x in t.not_logged)
    tags = client.get_run(run_id).data.tags
    assert not any(k.startswith("prefect.") for k in tags)
    assert tags[DESCRIPTION_TAG] == "| a | b |" and tags["sample"] == "a\ufffdb"
    info = provenance.git_info()
    if info.commit:
        assert tags["mlflow.source.git.commit"] == info.commit
        assert tags["mlflow.source.name"] == str(info.root)


def test_train_and_evaluate_in_a_flow_leave_full_lineage(trained_model: Params, tmp_path, monkeypatch):
    from vaepipe.stages import evaluate, train

    for var, value in PREFECT.items():
        monkeypatch.setenv(var, value)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = trained_model.replace(paths={"model": str(tmp_path / "vae"), "reports": str(tmp_path / "reports")},
                                   tracking={"enabled": True, "uri": uri, "experiment": "lineage"})
    res = train.run(params, make_tracker=MlflowTracker)
    evaluate.run(params, make_tracker=MlflowTracker)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(res.run_id)
    tags = run.data.tags
    assert {tags[tag] for tag in PREFECT_ENV.values()} == set(PREFECT.values())
    assert tags["prefect.flow_run_id"] == PREFECT["VAEPIPE_PREFECT_FLOW_RUN_ID"]
    assert tags["mlflow.source.git.commit"] == tags["git_commit"]

    ds = datasets(client, res.run_id)
    data_hash = tags["data_hash"]
    assert ds["tokens/train"][:2] == (data_hash[:DIGEST_LEN], "training")
    assert ds["tokens/valid"][:2] == (data_hash[:DIGEST_LEN], "validation")
    assert ds["corpus"][1] == "training"
    for split in params.evaluate.splits:
        assert f"tokens/{split}" in ds

    note = tags[DESCRIPTION_TAG]
    # the Prefect flow run is a link on top (tag values are plain text in the UI)
    assert note.startswith(f"Prefect flow run: [brave-otter]({PREFECT['VAEPIPE_PREFECT_FLOW_RUN_URL']})\n\n###")
    assert "| IW-NLL (nats/doc) |" in note and "| LM NLL (nats/doc) |" in note and "95% CI" in note
    assert "### Reconstructions" in note and "### Prior samples" in note
    assert note.count("x:      ") == min(5, params.evaluate.num_examples)

    version = client.get_model_version(params.tracking.registered_model, "1")
    assert version.run_id == res.run_id
    assert "val_elbo" in version.description and data_hash in version.description
    assert version.tags["data_hash"] == data_hash and "val_elbo" in version.tags
    assert float(version.tags["val_elbo"]) == pytest.approx(res.best_val["val_elbo"], rel=1e-5)
