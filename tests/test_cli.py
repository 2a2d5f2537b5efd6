from __future__ import annotations

import subprocess
import sys

from vaepipe.cli import main


def test_params_prints_resolved_values(capsys):
    assert main(["params", "--set", "model.latent_dim=16"]) == 0
    assert "latent_dim: 16" in capsys.readouterr().out


def test_bad_override_is_one_line_and_nonzero(capsys):
    rc = main(["train", "--set", "train.max_stepz=3"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.count("\n") == 0
    assert "train.max_stepz" in err


def test_describe_lists_every_key(capsys):
    assert main(["params", "--describe"]) == 0
    out = capsys.readouterr().out
    for key in ("paths.corpus", "ingest.unit", "tokenize.vocab_size", "model.kind",
                "train.batch_tokens", "evaluate.iw_samples", "embed.splits", "tracking.uri"):
        assert key in out


def test_console_script_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "vaepipe", "params", "--params", "/nope.yaml"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "vaepipe params: error: /nope.yaml: params file not found"
    assert "Traceback" not in r.stderr


def test_log_model_is_a_command_with_the_common_options(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["log-model", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all(opt in out for opt in ("--model", "--params", "--set", "--wait"))
