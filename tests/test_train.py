"""vaepipe.stages.train: schedules, the objective, checkpoints, determinism, resume == no resume, tracking."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vaepipe.core import provenance
from vaepipe.core.config import Params, TrainConfig
from vaepipe.core.errors import ConfigError, InputError
from vaepipe.core.run_info import RUN_FILE, read_run_info
from vaepipe.ml import checkpoint as ckpt
from vaepipe.ml.data import read_split
from vaepipe.ml.distributed import DistInfo
from vaepipe.ml.model import LossTerms, TextVAE, VAEConfig
from vaepipe.ml.schedules import beta_at, lr_at
from vaepipe.stages import train
from vaepipe.stages import train_support
from vaepipe.stages.package import TextModelPackage, package_text_model



def local(params: Params, tmp_path: Path, **train_kw: Any) -> Params:
    """The session's tiny token data, with this test's own model directories and settings."""
    return params.replace(paths={"model": str(tmp_path / "vae"), "baseline": str(tmp_path / "lm")},
                          train={"num_threads": 1, **train_kw})


def state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- schedules and objective --------------------------------------------------------------


def test_lr_schedule() -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(55, cfg, 100) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # cosine midpoint
    assert lr_at(100, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 100) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_beta_schedules() -> None:
    lin = TrainConfig(kl_schedule="linear", kl_warmup_steps=10)
    assert beta_at(0, lin) == pytest.approx(0.1) and beta_at(9, lin) == 1.0 and beta_at(1000, lin) == 1.0
    assert beta_at(4, TrainConfig(kl_schedule="constant")) == 1.0
    cyc = TrainConfig(kl_schedule="cyclical", kl_warmup_steps=5, kl_cycles=2)
    betas = [beta_at(s, cyc) for s in range(25)]
    assert betas[:10] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1, 1])
    assert betas[10] == pytest.approx(0.2)  # second cycle restarts
    assert betas[20:] == [1.0] * 5  # after the last cycle
    ae = TrainConfig(kl_schedule="linear", kl_warmup_steps=4, ae_pretrain_steps=3)
    assert [beta_at(s, ae) for s in range(8)] == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1, 1])


def test_objective_free_bits() -> None:
    kl = torch.tensor([[0.1, 2.0], [0.3, 4.0]])
    terms = LossTerms(recon=torch.tensor([10.0, 20.0]), kl=kl.sum(1), kl_per_dim=kl, mu=None, logvar=None,
                      n_tokens=torch.tensor([5, 5]))
    # batch-mean KL per dim = (0.2, 3.0); free bits 0.5 lifts the first to 0.5
    assert float(train.objective(terms, 1.0, 0.0)) == pytest.approx((30 + 2 * 3.2) / 10)
    assert float(train.objective(terms, 0.5, 0.5)) == pytest.approx((30 + 0.5 * 2 * 3.5) / 10)
    assert float(train.objective(terms, 0.0, 0.5)) == pytest.approx(3.0)
    # below the free-bits floor a dimension gets no gradient from the KL term
    kl_p = kl.clone().requires_grad_(True)
    t2 = LossTerms(terms.recon, kl_p.sum(1), kl_p, None, None, terms.n_tokens)
    train.objective(t2, 1.0, 0.5).backward()
    assert torch.equal(kl_p.grad[:, 0], torch.zeros(2)) and (kl_p.grad[:, 1] > 0).all()


# -- training runs --------------------------------------------------------------------


def test_vae_and_lm_write_their_directories(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=6, eval_every=3)
    res = train.run(p)
    assert res.model_dir == tmp_path / "vae" and res.steps == 6 and res.kind == "vae"
    for f in (ckpt.BEST, ckpt.LAST, ckpt.CONFIG_FILE, RUN_FILE):
        assert (tmp_path / "vae" / f).is_file(), f
    assert not (tmp_path / ".vae.partial").exists()
    model, config = ckpt.load_model(tmp_path / "vae")
    assert config["model"]["kind"] == "vae" and config["params"]["train"]["max_steps"] == 6
    assert config["tokenizer_hash"] and len(config["tokenizer_hash"]) == 64
    assert read_run_info(tmp_path / "vae") == {"run_id": None, "tracking_uri": None}
    res_lm = train.run(p.replace(model={"kind": "lm"}))
    assert res_lm.model_dir == tmp_path / "lm"
    lm, _ = ckpt.load_model(tmp_path / "lm")
    assert lm.encoder is None
    assert "val_au" in res.best_val and "val_au" not in res_lm.best_val


def test_short_run_reduces_validation_loss(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_epochs=6, max_steps=0, lr=3e-3, batch_tokens=512)
    valid = read_split(p.paths.tokens, "valid")
    res = train.run(p)
    model, config = ckpt.load_model(res.model_dir)
    torch.manual_seed(p.seed)
    fresh = TextVAE(VAEConfig.from_dict(config["model"]))
    before = train.evaluate_loss(fresh, valid, 512, torch.device("cpu"), amp=False, seed=p.seed)
    after = train.evaluate_loss(model, valid, 512, torch.device("cpu"), amp=False, seed=p.seed)
    assert after["val_elbo"] < before["val_elbo"] - 10  # nats per sentence (from ~214 at init)
    # the same data, batches and seed as the run's own validation: the same number
    assert after["val_elbo"] == pytest.approx(res.best_val["val_elbo"], rel=1e-9)


def test_same_seed_same_losses(built_tokens: Params, tmp_path: Path) -> None:
    kw = dict(max_steps=8, eval_every=4, word_dropout=0.2, free_bits=0.1)
    a = train.run(local(built_tokens, tmp_path / "a", **kw))
    b = train.run(local(built_tokens, tmp_path / "b", **kw))
    assert a.best_val == b.best_val
    assert state_dicts_equal(ckpt.load_state(a.model_dir / ckpt.LAST)["model"],
                             ckpt.load_state(b.model_dir / ckpt.LAST)["model"])
    c = train.run(local(built_tokens, tmp_path / "c", **kw).replace(seed=99))
    assert c.best_val != a.best_val


@pytest.mark.parametrize("stop_at", [5, 10])  # mid-epoch, and right at a validation + epoch end
def test_resume_equals_uninterrupted(built_tokens: Params, tmp_path: Path, stop_at: int) -> None:
    """SIGINT at a step boundary saves last.pt; resuming ends with bit-identical weights."""
    kw = dict(max_epochs=3, max_steps=0, batch_tokens=512, eval_every=0, word_dropout=0.2, free_bits=0.05,
              ae_pretrain_steps=4, kl_warmup_steps=6, patience=0)
    p = local(built_tokens, tmp_path / "full", **kw).replace(model={"bn_gamma": 0.5})
    full = train.run(p)

    def interrupt(step: int, metrics: dict[str, float]) -> None:
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal path, handled at the boundary

    q = local(built_tokens, tmp_path / "cut", **kw).replace(model={"bn_gamma": 0.5})
    with pytest.raises(KeyboardInterrupt):
        train.run(q, on_step=interrupt)
    partial = tmp_path / "cut" / ".vae.partial"
    assert not (tmp_path / "cut" / "vae").exists()  # nothing promoted before the end
    assert ckpt.load_state(partial / ckpt.LAST)["step"] == stop_at
    resumed = train.run(q.replace(train={"resume": True}))
    assert resumed.steps == full.steps and resumed.best_step == full.best_step
    assert resumed.best_val == full.best_val
    for name in (ckpt.LAST, ckpt.BEST):
        assert state_dicts_equal(ckpt.load_state(full.model_dir / name)["model"],
                                 ckpt.load_state(resumed.model_dir / name)["model"]), name
    opt_a = ckpt.load_state(full.model_dir / ckpt.LAST)["optimizer"]["state"]
    opt_b = ckpt.load_state(resumed.model_dir / ckpt.LAST)["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)


def test_resume_with_other_model_settings_is_refused(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=3)
    train.run(p)
    with pytest.raises(ConfigError, match="train.resume"):
        train.run(p.replace(model={"hidden_dim": 48}, train={"resume": True, "max_steps": 6}))
    # the same settings continue the finished run
    res = train.run(p.replace(train={"resume": True, "max_steps": 6}))
    assert res.steps == 6


def test_failed_run_keeps_previous_model(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=3)
    train.run(p)
    before = (tmp_path / "vae" / ckpt.BEST).read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        train.run(p.replace(paths={"tokens": str(tmp_path / "empty")}))
    assert (tmp_path / "vae" / ckpt.BEST).read_bytes() == before


class RecordingTracker:
    """A real in-memory Tracker implementation that remembers what it was told."""

    def __init__(self, fail_on_metrics: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.packages: list[TextModelPackage] = []
        self.run_id: str | None = None
        self.fail = fail_on_metrics

    def start(self, run_name=None, run_id=None, tags=None) -> None:
        self.run_id = "run-123"
        self.calls.append(("start", tags))

    def log_params(self, params) -> None:
        self.calls.append(("params", params))

    def log_metrics(self, metrics, step=None) -> None:
        if self.fail:
            raise RuntimeError("tracking server went away")
        self.calls.append(("metrics", dict(metrics)))

    def set_tags(self, tags) -> None:
        self.calls.append(("tags", tags))

    def log_artifact(self, path, artifact_path=None) -> None:
        assert Path(path).is_file(), path
        self.calls.append(("artifact", Path(path).name))

    def log_dataset(self, name, path, *, context, digest=None, rows=None) -> None:
        self.calls.append(("dataset", (name, context, rows)))

    def set_description(self, markdown) -> None:
        self.calls.append(("description", markdown))

    def log_text_model(self, package_dir, *, registered_name) -> str:
        # the stage hands over a finished package: the tracker only uploads it
        pkg = TextModelPackage.read(package_dir)
        assert (pkg.model_dir / ckpt.BEST).is_file() and pkg.tokenizer_file.is_file()
        self.packages.append(pkg)
        self.calls.append(("text_model", registered_name))
        return "models:/m-1"

    def end(self, status="FINISHED") -> None:
        self.calls.append(("end", status))


def test_tracking_calls(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=6, eval_every=3, log_every=2)
    t = RecordingTracker()
    train.run(p, tracker=t)
    kinds = [c[0] for c in t.calls]
    assert kinds[0] == "start" and kinds[-1] == "end" and t.calls[-1][1] == "FINISHED"
    tags = t.calls[0][1]
    assert set(tags) >= {"git_commit", "data_hash", "tokenizer_hash"} and len(tags["data_hash"]) == 64
    assert dict(t.calls)["params"] == p.flat()
    metrics = [c[1] for c in t.calls if c[0] == "metrics"]
    assert any({"loss", "recon", "kl", "beta", "lr", "grad_norm", "tokens_per_s"} <= set(m) for m in metrics)
    assert any({"val_elbo", "val_recon", "val_kl", "val_ppl"} <= set(m) for m in metrics)
    assert {"tokenizer.json", "config.json", "best.pt"} <= {c[1] for c in t.calls if c[0] == "artifact"}
    assert ("text_model", p.tracking.registered_model) in t.calls
    datasets = {c[1][0]: c[1] for c in t.calls if c[0] == "dataset"}
    assert datasets["tokens/train"][1] == "training" and datasets["tokens/valid"][1] == "validation"
    assert datasets["corpus"][1] == "training" and datasets["tokens/train"][2] > 0
    assert read_run_info(tmp_path / "vae") == {"run_id": "run-123", "tracking_uri": p.tracking.uri}
    [pkg] = t.packages  # packaged by the stage, with the settings the registered model needs
    config = ckpt.read_config(tmp_path / "vae")
    assert (pkg.lowercase, pkg.latent_dim, pkg.tokenizer_hash) == (
        p.ingest.lowercase, p.model.latent_dim, config["tokenizer_hash"]) and pkg.batch_tokens == 32768
    assert not pkg.root.exists()  # a temporary folder, gone once uploaded
    t_lm = RecordingTracker()
    train.run(p.replace(model={"kind": "lm"}), tracker=t_lm)
    assert not any(c[0] == "text_model" for c in t_lm.calls)
    assert package_text_model(p, tmp_path / "lm", tmp_path / "pkg-lm") is None  # no latent, no package
    assert not (tmp_path / "pkg-lm").exists()


def test_package_text_model_files_and_reading_back(trained_model: Params, tmp_path: Path) -> None:
    p = trained_model
    pkg = package_text_model(p, p.paths.model, tmp_path / "pkg")
    assert pkg is not None and pkg.root == tmp_path / "pkg"
    files = sorted(str(f.relative_to(pkg.root)) for f in pkg.root.rglob("*") if f.is_file())
    assert files == ["model/best.pt", "model/config.json", "text_model.json", "tokenizer.json"]
    assert (pkg.model_dir / ckpt.BEST).read_bytes() == (Path(p.paths.model) / ckpt.BEST).read_bytes()
    assert pkg.tokenizer_file.read_bytes() == (Path(p.paths.tokenizer) / "tokenizer.json").read_bytes()
    assert json.loads((pkg.root / "text_model.json").read_text()) == {
        "lowercase": p.ingest.lowercase, "latent_dim": p.model.latent_dim,
        "tokenizer_hash": ckpt.read_config(p.paths.model)["tokenizer_hash"], "batch_tokens": 32768}
    assert TextModelPackage.read(pkg.root) == pkg
    (pkg.root / "text_model.json").write_text("{}")
    with pytest.raises(InputError, match=r"text_model\.json: not a text model description"):
        TextModelPackage.read(pkg.root)
    (pkg.model_dir / ckpt.BEST).unlink()
    with pytest.raises(InputError, match=r"best\.pt: not found"):
        TextModelPackage.read(pkg.root)
    # no tokenizer to ship: nothing packaged
    no_tok = p.replace(paths={"tokenizer": str(tmp_path / "no-tokenizer")})
    assert package_text_model(no_tok, p.paths.model, tmp_path / "pkg2") is None
    with pytest.raises(InputError, match="config.json: not found"):
        package_text_model(p, tmp_path / "nowhere", tmp_path / "pkg3")


# -- which commit a run records ------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def make_git_repo(root: Path) -> str:
    """A one-commit checkout in ``root``; its HEAD."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    (root / "params.yaml").write_text("seed: 1\n")
    git(root, "add", "params.yaml")
    git(root, "commit", "-q", "-m", "first")
    return git(root, "rev-parse", "HEAD")


def test_git_commit_tag_reads_the_project_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    head = make_git_repo(project)
    monkeypatch.chdir(project / ".")
    info = provenance.git_info()
    assert info == provenance.GitInfo(commit=head, dirty=False, branch="main", root=project.resolve())
    assert train_support.git_commit() == head
    (project / "params.yaml").write_text("seed: 2\n")  # a tracked file edited: dirty
    (project / "new.txt").write_text("x")  # untracked files do not count
    assert provenance.git_info(project).dirty is True
    # outside any checkout: the checkout holding the vaepipe package (an editable install's code)
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    package_head = git(Path(provenance.__file__).parent, "rev-parse", "HEAD")
    assert provenance.git_info().commit == package_head == train_support.git_commit()
    assert provenance.git_info().commit != head
    # and neither in git: nothing known, the tag says so
    monkeypatch.setattr(provenance, "PACKAGE_DIR", plain)
    assert provenance.git_info() == provenance.GitInfo()
    assert train_support.git_commit() == "unknown"


def test_exception_ends_run_failed(built_tokens: Params, tmp_path: Path) -> None:
    t = RecordingTracker(fail_on_metrics=True)
    with pytest.raises(RuntimeError, match="went away"):
        train.run(local(built_tokens, tmp_path, max_steps=4, log_every=1), tracker=t)
    assert t.calls[-1] == ("end", "FAILED")


def test_cuda_request_without_gpu_is_config_error(built_tokens: Params, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="train.device"):
        train.run(local(built_tokens, tmp_path, device="cuda"))


@pytest.mark.parametrize("batching", ["bucket", "mixed"])
def test_epoch_batches_cover_each_record_once(batching: str) -> None:
    # resume skips ahead by recomputing the epoch's batches: they must be a function of (seed, epoch)
    lengths = np.random.default_rng(0).integers(1, 40, size=300)
    cfg = TrainConfig(batch_tokens=256, batching=batching)
    one = train.epoch_batches(lengths, cfg, 1, 0, DistInfo())
    assert sorted(np.concatenate(one).tolist()) == list(range(300))
    if batching == "bucket":  # padded size within the budget
        assert all(len(b) * (lengths[b].max() + 1) <= 256 for b in one)
    else:  # real tokens within the budget (a longer sentence alone)
        assert all(len(b) == 1 or int((lengths[b] + 1).sum()) <= 256 for b in one)
    assert [b.tolist() for b in one] == [b.tolist() for b in train.epoch_batches(lengths, cfg, 1, 0, DistInfo())]
    assert [b.tolist() for b in one] != [b.tolist() for b in train.epoch_batches(lengths, cfg, 1, 1, DistInfo())]
    r0 = train.epoch_batches(lengths, cfg, 1, 0, DistInfo(0, 2))
    r1 = train.epoch_batches(lengths, cfg, 1, 0, DistInfo(1, 2))
    assert len(r0) == len(r1)
    if batching == "bucket":
        assert len(r0) == len(one) // 2
    assert not set(np.concatenate(r0).tolist()) & set(np.concatenate(r1).tolist())


@pytest.mark.parametrize("overrides", [
    {"model": {"decoder": "transformer", "num_layers": 2}},
    {"train": {"optimizer": "sgd", "lr": 0.1, "kl_schedule": "cyclical", "kl_warmup_steps": 1}},
    {"train": {"kl_schedule": "constant", "grad_clip": 0.0, "word_dropout": 0.5}},
    {"train": {"batching": "mixed"}, "model": {"share_embeddings": True}},
])
def test_other_settings_train(built_tokens: Params, tmp_path: Path, overrides: dict[str, Any]) -> None:
    p = local(built_tokens, tmp_path, max_steps=3).replace(**overrides)  # replace merges into sections
    res = train.run(p)
    assert res.steps == 3 and math.isfinite(res.best_val["val_elbo"])
    model, config = ckpt.load_model(res.model_dir)
    for section, values in overrides.items():
        for k, v in values.items():
            assert config["params"][section][k] == v


# -- the training state and what run() leaves behind -------------------------------------

# last.pt's training-state entries, as every checkpoint so far has written them
LEGACY_STATE = {"step": 0, "epoch": 0, "pos": 0, "best_val": math.inf, "best_step": -1, "bad": 0,
                "last_eval": -1, "best_metrics": {}}


def test_train_state_checkpoint_round_trip(tmp_path: Path) -> None:
    fresh = train.TrainState().to_checkpoint()
    assert list(fresh) == list(LEGACY_STATE) and fresh == LEGACY_STATE
    state = train.TrainState(step=12, epoch=1, pos=3, best_val=101.5, best_step=10, bad=1, last_eval=12,
                             best_metrics={"val_elbo": 101.5, "val_au": 3.0})
    ckpt.save_state(tmp_path / ckpt.LAST, {"format": ckpt.FORMAT, "model": {"w": torch.zeros(2)},
                                           "rng": {"torch": torch.get_rng_state()}, **state.to_checkpoint()})
    loaded = ckpt.load_state(tmp_path / ckpt.LAST)  # weights_only: the state is plain data
    assert train.TrainState.from_checkpoint(loaded) == state
    del loaded["last_eval"], loaded["bad"]
    with pytest.raises(KeyError, match="bad, last_eval"):
        train.TrainState.from_checkpoint(loaded)


def test_last_pt_holds_the_train_state(built_tokens: Params, tmp_path: Path) -> None:
    res = train.run(local(built_tokens, tmp_path, max_steps=4, eval_every=3))
    last = ckpt.load_state(res.model_dir / ckpt.LAST)
    assert set(last) == {"format", "model", "optimizer", "rng", *LEGACY_STATE}
    state = train.TrainState.from_checkpoint(last)
    assert (state.step, state.epoch, state.best_step, state.best_metrics) == (4, 0, 4, res.best_val)
    assert state.last_eval == 4 and state.best_val == res.best_val["val_elbo"]


def test_resume_from_last_pt_without_state_is_input_error(built_tokens: Params, tmp_path: Path) -> None:
    p = local(built_tokens, tmp_path, max_steps=2)
    train.run(p)
    last = ckpt.load_state(tmp_path / "vae" / ckpt.LAST)
    del last["pos"]
    ckpt.save_state(tmp_path / "vae" / ckpt.LAST, last)
    with pytest.raises(InputError, match=r"last\.pt.*missing pos"):
        train.run(p.replace(train={"resume": True, "max_steps": 4}))


def test_run_restores_torch_threads(built_tokens: Params, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []

    def record(step: int, metrics: dict[str, float]) -> None:
        seen.append(torch.get_num_threads())
        if step == 2 and len(seen) > 3:  # the second run fails mid-loop
            raise RuntimeError("callback failed")

    try:
        torch.set_num_threads(2)
        train.run(local(built_tokens, tmp_path / "a", max_steps=3, num_threads=1), on_step=record)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="callback failed"):
            train.run(local(built_tokens, tmp_path / "b", max_steps=3, num_threads=1), on_step=record)
        assert seen[3:] == [1, 1] and torch.get_num_threads() == 2
        train.run(local(built_tokens, tmp_path / "c", max_steps=1, num_threads=0), on_step=record)
        assert seen[5:] == [2]  # 0 leaves torch's setting alone
    finally:
        torch.set_num_threads(before)


def test_non_main_rank_logging_is_restored(built_tokens: Params, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Rank 1 of 2 (as torchrun would say) logs warnings only while training, then gives the logger back.

    The process group is a real gloo group of one process, so collectives and DDP just work.
    """
    import logging

    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    logger = logging.getLogger("vaepipe.stages.train")
    before = logger.level
    caplog.set_level(logging.INFO)
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        # batch_tokens 256: the validation split has a batch for each of two ranks
        res = train.run(local(built_tokens, tmp_path, max_steps=2, log_every=1, batch_tokens=256))
        assert res.steps == 2 and not dist.is_initialized()  # run() left the group
        assert not (tmp_path / "vae").exists()  # rank 0 writes; this is rank 1
        assert not [r for r in caplog.records if r.name == logger.name and r.levelno < logging.WARNING]
        assert logger.level == before
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        (tmp_path / "empty").mkdir()
        with pytest.raises(InputError):
            train.run(local(built_tokens, tmp_path, max_steps=2).replace(paths={"tokens": str(tmp_path / "empty")}))
        assert logger.level == before
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
