"""vaepipe.ml.checkpoint: round trips through weights_only loading, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vaepipe.core.errors import InputError
from vaepipe.core.run_info import read_run_info, write_run_info
from vaepipe.ml.checkpoint import (
    BEST, CONFIG_FILE, LAST, load_model, load_state, nonfinite_entry, read_config, save_state,
    write_config,
)
from vaepipe.ml.model import TextVAE, VAEConfig


CFG = VAEConfig(kind="vae", vocab_size=30, embed_dim=8, hidden_dim=12, latent_dim=4, num_layers=1,
                num_heads=2, encoder="lstm", decoder="lstm", dropout=0.0, bn_gamma=0.5)


def saved_model(tmp_path: Path, cfg: VAEConfig = CFG) -> tuple[TextVAE, Path]:
    torch.manual_seed(0)
    model = TextVAE(cfg)
    d = tmp_path / "m"
    write_config(d, cfg, tokenizer_hash="abc", params={"seed": 1})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[5, 6, 7]]), torch.tensor([3])).recon.sum().backward()
    opt.step()
    save_state(d / BEST, {"format": 1, "model": model.state_dict(), "step": 1, "metrics": {"val_elbo": 3.5}})
    save_state(d / LAST, {"format": 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "rng": {"torch": torch.get_rng_state()}, "step": 1})
    return model, d


def test_round_trip_and_weights_only(tmp_path: Path) -> None:
    model, d = saved_model(tmp_path)
    # plain torch.load with weights_only=True reads both files: no pickled code inside
    for name in (BEST, LAST):
        raw = torch.load(d / name, weights_only=True)
        assert set(raw["model"]) == set(model.state_dict())
    loaded, config = load_model(d)
    assert not loaded.training
    assert config["tokenizer_hash"] == "abc" and config["params"] == {"seed": 1}
    assert VAEConfig.from_dict(config["model"]) == CFG
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    model.eval()
    ids, lengths = torch.tensor([[4, 9, 11, 0], [5, 6, 7, 8]]), torch.tensor([3, 4])
    z = torch.randn(2, 4)
    with torch.inference_mode():
        assert torch.equal(model.log_likelihood(ids, lengths, z), loaded.log_likelihood(ids, lengths, z))
        assert torch.equal(model.encode(ids, lengths)[0], loaded.encode(ids, lengths)[0])
    last_model, _ = load_model(d, which="last")
    state = load_state(d / LAST)
    assert "optimizer" in state and state["step"] == 1
    assert not list(d.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_bad_checkpoint_raises_input_error(tmp_path: Path) -> None:
    _, d = saved_model(tmp_path)
    (d / BEST).write_bytes(b"definitely not a checkpoint")
    with pytest.raises(InputError, match="best.pt"):
        load_model(d)
    (d / BEST).write_bytes((d / LAST).read_bytes()[:100])  # truncated
    with pytest.raises(InputError, match="best.pt"):
        load_model(d)


def test_missing_pieces_raise_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nowhere")
    _, d = saved_model(tmp_path)
    (d / BEST).unlink()
    with pytest.raises(InputError, match="checkpoint not found"):
        load_model(d)
    (d / CONFIG_FILE).unlink()
    with pytest.raises(InputError, match="config.json"):
        load_model(d, which="last")


def test_config_mismatch_raises_input_error(tmp_path: Path) -> None:
    _, d = saved_model(tmp_path)
    bigger = VAEConfig(**{**CFG.to_dict(), "hidden_dim": 16})
    write_config(d, bigger, tokenizer_hash=None, params=None)
    with pytest.raises(InputError, match="does not match"):
        load_model(d)
    (d / CONFIG_FILE).write_text(json.dumps({"model": {**CFG.to_dict(), "oops": 1}}))
    with pytest.raises(InputError, match="config.json"):
        read_config(d)
    (d / CONFIG_FILE).write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        read_config(d)


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    """weights_only loading refuses arbitrary pickled objects (a full nn.Module here)."""
    path = tmp_path / "evil.pt"
    torch.save(TextVAE(CFG), path)
    with pytest.raises(InputError, match="evil.pt"):
        load_state(path)


def test_run_info(tmp_path: Path) -> None:
    assert read_run_info(tmp_path) == {"run_id": None, "tracking_uri": None}
    write_run_info(tmp_path, "r1", "sqlite:///x.db")
    assert read_run_info(tmp_path) == {"run_id": "r1", "tracking_uri": "sqlite:///x.db"}


def test_shared_embeddings_survive_a_round_trip(tmp_path: Path) -> None:
    cfg = VAEConfig(**{**CFG.to_dict(), "share_embeddings": True})
    model, d = saved_model(tmp_path, cfg)
    loaded, _ = load_model(d)
    assert loaded.encoder.embed.weight is loaded.decoder.embed.weight
    assert torch.equal(loaded.encoder.embed.weight, model.decoder.embed.weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_refused(tmp_path: Path, bad: float) -> None:
    """A diverged run's best.pt (a NaN or infinity written into it with plain torch) does not load."""
    _, d = saved_model(tmp_path)
    raw = torch.load(d / BEST, weights_only=True)
    name = "decoder.rnn.weight_hh_l0" if "decoder.rnn.weight_hh_l0" in raw["model"] else sorted(raw["model"])[-1]
    raw["model"][name].view(-1)[3] = bad
    torch.save(raw, d / BEST)
    with pytest.raises(InputError) as e:
        load_model(d)
    assert str(e.value) == f"{d / BEST}: non-finite weights in {name}; retrain"
    assert nonfinite_entry(raw["model"]) == name
    load_model(d, which="last")  # last.pt is untouched and loads


def test_nonfinite_entry_ignores_integer_tensors() -> None:
    assert nonfinite_entry({"steps": torch.tensor([1, 2]), "w": torch.zeros(3)}) is None
    assert nonfinite_entry({"w": torch.tensor([0.0, float("nan")], dtype=torch.bfloat16)}) == "w"


def test_config_records_the_data_hash(tmp_path: Path) -> None:
    write_config(tmp_path, CFG, tokenizer_hash="t" * 64, params=None, data_hash="d" * 64)
    assert read_config(tmp_path)["data_hash"] == "d" * 64


def test_config_saved_before_encoder_pooling_loads_as_final(tmp_path: Path) -> None:
    model, d = saved_model(tmp_path)
    cfg_file = d / CONFIG_FILE
    data = json.loads(cfg_file.read_text())
    del data["model"]["encoder_pooling"]  # as written before the key existed
    cfg_file.write_text(json.dumps(data))
    loaded, _ = load_model(str(d), "best", torch.device("cpu"))
    assert loaded.cfg.encoder_pooling == "final"
    ids, lengths = torch.tensor([[5, 6, 7]]), torch.tensor([3])
    torch.testing.assert_close(loaded.eval().encode(ids, lengths)[0], model.eval().encode(ids, lengths)[0])
