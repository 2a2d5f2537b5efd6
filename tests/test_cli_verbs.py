"""The CLI verbs sample / reconstruct / interpolate / decode, each through a real subprocess:
stdout holds the texts and nothing else, --json lines parse and carry the inputs, the output
equals the Python facade's, and every bad argument is one line on stderr with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from vaepipe.cli import one_line
from vaepipe.core.config import Params
from vaepipe.stages.textmodel import TextModel, load

TEXTS = ["The state of the union is strong.", "We must reduce the national debt."]


@pytest.fixture(scope="module")
def cli_params(trained_model: Params, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A params file over the session's trained model, with an embeddings export of its own."""
    from vaepipe.stages import embed

    root = tmp_path_factory.mktemp("verbs")
    params = trained_model.replace(paths={"embeddings": str(root / "embeddings")})
    embed.run(params)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def facade(trained_model: Params) -> TextModel:
    return load(trained_model.paths.model, device="cpu")


def vaepipe(params: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "vaepipe", *args, "--params", str(params), "--device", "cpu"],
                          capture_output=True, text=True, timeout=180, env=env, input=stdin,
                          cwd=params.parent)


def ok_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    """stdout's lines, split at "\n" only: a tiny model's texts hold other control characters."""
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stdout.endswith("\n")
    return r.stdout[:-1].split("\n")


def lines(texts: list[str]) -> list[str]:
    """What the plain output prints for each text: one line."""
    return [one_line(t) for t in texts]


def test_sample(cli_params: Path, facade: TextModel) -> None:
    args = ["sample", "-n", "4", "--strategy", "sample", "--top-p", "0.9", "--seed", "3"]
    expected = facade.sample(4, strategy="sample", top_p=0.9, seed=3)
    assert ok_lines(vaepipe(cli_params, *args)) == lines(expected)
    rows = [json.loads(x) for x in ok_lines(vaepipe(cli_params, *args, "--json"))]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert [r["text"] for r in rows] == expected


def test_sample_from_the_lm(cli_params: Path, trained_model: Params) -> None:
    assert len(ok_lines(vaepipe(cli_params, "sample", "-n", "3", "--model", trained_model.paths.baseline))) == 3


def test_reconstruct_arguments_file_and_stdin(cli_params: Path, facade: TextModel, tmp_path: Path) -> None:
    expected = facade.reconstruct(TEXTS, strategy="beam", beam_size=3)
    assert ok_lines(vaepipe(cli_params, "reconstruct", *TEXTS, "--strategy", "beam", "--beam-size", "3")) == \
        lines(expected)
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(TEXTS) + "\n\n")
    assert ok_lines(vaepipe(cli_params, "reconstruct", "--file", str(f), "--strategy", "beam",
                            "--beam-size", "3")) == lines(expected)
    rows = [json.loads(x) for x in ok_lines(vaepipe(cli_params, "reconstruct", "--file", "-", "--json",
                                                     stdin="\n".join(TEXTS)))]
    assert rows == [{"input": x, "text": t} for x, t in zip(TEXTS, facade.reconstruct(TEXTS), strict=True)]


def test_interpolate(cli_params: Path, facade: TextModel) -> None:
    assert ok_lines(vaepipe(cli_params, "interpolate", *TEXTS, "--steps", "7")) == \
        lines(facade.interpolate(*TEXTS, steps=7))
    rows = [json.loads(x) for x in ok_lines(vaepipe(cli_params, "interpolate", *TEXTS, "--steps", "3", "--json"))]
    assert [r["t"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["from"] == TEXTS[0] and rows[0]["to"] == TEXTS[1]
    assert [rows[0]["text"], rows[-1]["text"]] == facade.reconstruct(TEXTS)


def test_decode_exported_ids(cli_params: Path, facade: TextModel) -> None:
    import pyarrow.parquet as pq

    from vaepipe.stages.embed import MANIFEST
    from vaepipe.stages.search import lookup_vectors

    export = cli_params.parent / "embeddings"
    manifest = json.loads((export / MANIFEST).read_text())
    ids = pq.read_table(export / manifest["shards"][0]["file"], columns=["doc_id"]).column("doc_id").to_pylist()[:3]
    ids = ids[::-1]
    rows = [json.loads(x) for x in ok_lines(vaepipe(cli_params, "decode", "--ids", *ids, "--json"))]
    assert [r["id"] for r in rows] == ids
    assert [r["text"] for r in rows] == facade.decode(lookup_vectors(export, ids))
    assert ok_lines(vaepipe(cli_params, "decode", "--embeddings", str(export), "--ids", *ids)) == \
        lines([r["text"] for r in rows])


def test_decode_npy(cli_params: Path, facade: TextModel, tmp_path: Path) -> None:
    z = facade.encode(TEXTS)
    np.save(tmp_path / "z.npy", z)
    assert ok_lines(vaepipe(cli_params, "decode", "--npy", str(tmp_path / "z.npy"))) == \
        lines(facade.reconstruct(TEXTS))
    rows = [json.loads(x) for x in ok_lines(vaepipe(cli_params, "decode", "--npy", str(tmp_path / "z.npy"), "--json"))]
    assert [r["row"] for r in rows] == [0, 1]


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    np.save(tmp / "wide.npy", np.zeros((2, 9), dtype=np.float32))
    np.save(tmp / "nan.npy", np.full((2, 8), np.nan, dtype=np.float32))
    (tmp / "junk.npy").write_text("not numpy")
    (tmp / "empty.txt").write_text("\n\n")
    return [
        (["sample", "-n", "0"], "n:"),
        (["sample", "--strategy", "nope"], "strategy"),
        (["sample", "--top-p", "0"], "top_p"),
        (["sample", "--top-p", "1.5"], "top_p"),
        (["sample", "--beam-size", "0", "--strategy", "beam"], "beam_size"),
        (["sample", "--temperature", "0"], "temperature"),
        (["sample", "--max-tokens", "0"], "max_tokens"),
        (["sample", "--beam-size", "x"], "invalid int value"),
        (["sample", "--bogus"], "unrecognized arguments"),
        (["reconstruct"], "no texts"),
        (["reconstruct", "--file", str(tmp / "empty.txt")], "no texts"),
        (["reconstruct", "--file", str(tmp / "missing.txt")], "missing.txt"),
        (["reconstruct", "a", "--file", str(tmp / "empty.txt")], "not both"),
        (["reconstruct", "   "], "empty after normalisation"),
        (["interpolate", "a b", "c d", "--steps", "1"], "steps"),
        (["interpolate", "only one"], "required"),
        (["decode"], "either --ids"),
        (["decode", "--npy", str(tmp / "wide.npy")], "latent_dim"),
        (["decode", "--npy", str(tmp / "nan.npy")], "NaN"),
        (["decode", "--npy", str(tmp / "junk.npy")], "junk.npy"),
        (["decode", "--npy", str(tmp / "missing.npy")], "missing.npy"),
        (["decode", "--ids", "no-such-id"], "no-such-id"),
        (["decode", "--ids", "x", "--npy", str(tmp / "wide.npy")], "either --ids"),
    ]


@pytest.mark.slow
def test_bad_arguments_are_one_line_exit_2(cli_params: Path, tmp_path: Path) -> None:
    for args, match in bad_inputs(tmp_path):
        r = vaepipe(cli_params, *args)
        assert r.returncode == 2, (args, r.returncode, r.stderr[-1000:])
        assert r.stdout == "", args
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr[-1000:])
        assert ": error: " in r.stderr and match in r.stderr, (args, r.stderr)


def test_lm_refuses_reconstruct(cli_params: Path, trained_model: Params) -> None:
    r = vaepipe(cli_params, "reconstruct", "a sentence", "--model", trained_model.paths.baseline)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "kind 'lm'" in r.stderr


def test_plain_output_is_one_line_per_text() -> None:
    assert one_line("a\nb\r\nc\rd\u2028e") == "a b c d\u2028e"
