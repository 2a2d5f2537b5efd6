from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from vaepipe.core.config import Params, load_params
from vaepipe.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_equals_defaults():
    # params.yaml documents the defaults; the two must not drift apart.
    assert load_params(ROOT / "params.yaml") == Params()


def test_committed_params_yaml_lists_every_key():
    # a key missing from params.yaml is invisible to `dvc params diff` and to its readers
    import yaml

    listed = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    flat = {f"{s}.{k}" for s, sec in listed.items() if isinstance(sec, dict) for k in sec}
    flat |= {k for k, v in listed.items() if not isinstance(v, dict)}
    assert sorted(set(Params().flat()) - flat) == []


def test_params_are_frozen():
    p = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 3  # type: ignore[misc]


def test_overrides_parse_yaml_values():
    p = load_params(None, ["seed=7", "ingest.inputs=[a.txt, b.jsonl]", "train.lr=3e-4",
                           "tokenize.tokenizer_path=null", "train.resume=true"])
    assert p.seed == 7
    assert p.ingest.inputs == ["a.txt", "b.jsonl"]
    assert p.train.lr == pytest.approx(3e-4)
    assert p.tokenize.tokenizer_path is None
    assert p.train.resume is True


def test_int_where_float_expected_is_accepted():
    assert load_params(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_stepz=3", "unknown key train.max_stepz"),
        ("trian.max_steps=3", "unknown key trian"),
        ("ingest.unit=word", "ingest.unit: must be one of line, paragraph, sentence, document"),
        ("train.max_steps=-1", "train.max_steps: must be >= 0"),
        ("train.max_steps=abc", "train.max_steps: expected an integer"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer"),
        ("train.resume=yes please", "train.resume: expected true or false"),
        ("ingest.valid_fraction=0.7", "ingest.valid_fraction: must be <= 0.5"),
        ("embed.splits=[train, dev]", "embed.splits: unknown split 'dev'"),
        ("seed", "expected section.key=value"),
        ("paths=3", "paths: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_params(None, [override])
    assert fragment in str(e.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("seed: 1\ntrain:\n  lr: [1\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert str(f) in str(e.value) and "line" in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"model": {"latent_dims": 4}}))
    with pytest.raises(ConfigError, match=r"p\.yaml: unknown key model\.latent_dims"):
        load_params(f)


def test_missing_file():
    with pytest.raises(ConfigError, match="params file not found"):
        load_params("/nonexistent/params.yaml")


def test_replace_validates():
    p = Params().replace(train={"max_steps": 5})
    assert p.train.max_steps == 5 and p.train.lr == Params().train.lr
    with pytest.raises(ConfigError):
        Params().replace(train={"max_steps": -5})


def test_flat_has_dotted_keys():
    flat = Params().flat()
    assert flat["seed"] == 1234 and flat["model.latent_dim"] == 32 and "tracking.uri" in flat
