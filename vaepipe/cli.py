"""Command line: ``vaepipe <command> [--params PATH] [--set section.key=value]...``.

Every command reads params.yaml (or ``--params``), applies the ``--set`` overrides, runs, and
turns a user-fixable error (``VaepipeError``) into one line on stderr and a non-zero exit code.
This is the only module that parses argv and the one that picks the experiment tracker.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

DESCRIPTION = """\
vaepipe: train and use variational autoencoder language models.

The pipeline's stages, in order (each reads params.yaml and writes one output path):
  ingest     raw text files -> clean, de-duplicated, split corpus Parquet (paths.corpus)
  tokenize   train a tokenizer (byte-level BPE or words), encode the corpus (paths.tokenizer, paths.tokens)
  train      train the VAE (or, with --set model.kind=lm, the LM baseline) (paths.model)
  evaluate   ELBO, IW-NLL, perplexity, KL, MI, active units vs the LM (paths.reports)
  embed      a latent vector for every document as Parquet (paths.embeddings)

Checking a trained model:
  diagnose     KL per dimension, active units, MI, the gap vs the LM, and a verdict
               ("posterior collapse ... try ...")

Using a trained model (one text per line on stdout; --json for JSON lines):
  sample       texts decoded from z ~ N(0, I)
  reconstruct  encode texts and decode their posterior means
  interpolate  texts along the line between two sentences' latents
  decode       texts from latent vectors (exported ids or a .npy file)
"""

EPILOG = """\
examples:
  vaepipe ingest --set 'ingest.inputs=[my_texts/]' --set ingest.unit=paragraph
  vaepipe train --set train.max_steps=200
  vaepipe neighbors "the economy and jobs" -k 5
  vaepipe sample -n 5 --strategy sample --temperature 0.8 --top-p 0.9 --seed 1
  vaepipe reconstruct "first sentence" "second sentence" --strategy beam
  vaepipe interpolate "sentence A" "sentence B" --steps 7
  vaepipe decode --embeddings data/embeddings --ids ID1 ID2   (or --npy z.npy)
  vaepipe log-model --model models/vae   log/register a model trained while MLflow was away
  vaepipe params --describe          every parameter with its default and meaning
  vaepipe diagnose --split valid --json
"""

# each stage is the module of the same name under vaepipe/stages/
STAGES = ("ingest", "tokenize", "train", "evaluate", "embed")
RAY_STAGES = ("ingest", "tokenize", "embed")  # what engine.kind: ray runs on Ray Data (adapters.engine_ray)
STAGE_HELP = {
    "ingest": "raw text -> corpus Parquet",
    "tokenize": "train the tokenizer (BPE or words) and encode the corpus",
    "train": "train the VAE, or the LM baseline with --set model.kind=lm",
    "evaluate": "score the model against the LM baseline; write reports",
    "embed": "export a latent vector for every document",
}


# the stages that log to the experiment tracker when tracking.enabled
TRACKED = ("train", "evaluate")

# the commands that turn latents into text with a trained model (vaepipe.stages.textmodel)
VERBS = ("sample", "reconstruct", "interpolate", "decode")
# decoding flags: (flag, Decoding field, type, help)
DECODING_FLAGS = (
    ("--strategy", "strategy", str, "greedy (default), beam or sample"),
    ("--beam-size", "beam_size", int, "beams of --strategy beam (default: 5)"),
    ("--temperature", "temperature", float, "sampling temperature > 0 (default: 1.0)"),
    ("--top-k", "top_k", int, "sample among the k most likely tokens; 0: all (default)"),
    ("--top-p", "top_p", float, "nucleus sampling: smallest set of tokens with probability >= p, in (0, 1] "
                                "(default: 1.0)"),
    ("--max-tokens", "max_tokens", int, "longest output in tokens (default: 64)"),
    ("--seed", "seed", int, "random seed of sampling and of prior draws (default: 0)"),
)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2), like vaepipe's own errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _mlflow_tracker(cfg: Any) -> Any:
    # imported only when tracking is enabled: mlflow is an optional extra
    import dataclasses

    from vaepipe.adapters.tracking_mlflow import MlflowTracker

    return MlflowTracker(dataclasses.replace(cfg, uri=experiment_tracking_uri(cfg.uri)))


def experiment_tracking_uri(uri: str, environ: Mapping[str, str] | None = None,
                            cwd: Path | None = None) -> str:
    """The tracking URI a stage uses: a relative ``sqlite:///FILE`` anchored in the project when
    the stage runs in one of DVC's temporary experiment workspaces.

    ``dvc exp run --queue`` (and ``--temp``) runs the stages in a checkout under
    ``.dvc/tmp/exps/`` that DVC deletes afterwards, with ``DVC_ROOT`` naming the project it came
    from; a relative database there would take the experiment's MLflow runs with it. Everywhere
    else (``dvc repro``, ``dvc exp run`` in the workspace, a plain ``vaepipe`` command) the URI is
    returned unchanged, so run.json keeps the value params.yaml holds.
    """
    environ = os.environ if environ is None else environ
    root = environ.get("DVC_ROOT")
    prefix = "sqlite:///"
    if not root or not uri.startswith(prefix) or Path(uri[len(prefix):]).is_absolute():
        return uri
    if Path(root).resolve() == (cwd or Path.cwd()).resolve():
        return uri
    return prefix + str(Path(root).resolve() / uri[len(prefix):])


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", metavar="PATH",
                   help="parameters file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, value parsed as YAML (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vaepipe", description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        p = sub.add_parser(name, help=STAGE_HELP[name])
        p.add_argument("--wait", action="store_true",
                       help="if another vaepipe process is writing this stage's output, wait for it"
                            " to finish instead of failing")
        _add_common(p)
    p = sub.add_parser("neighbors", help="embed TEXT and print the nearest documents")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("-k", type=int, default=10, help="number of neighbours (default: 10)")
    _add_common(p)
    p = sub.add_parser("log-model", help="log and register a trained model in MLflow, as train's end does",
                       description="Log a trained model folder to tracking.uri and register it as "
                                   "tracking.registered_model (alias candidate), as the end of `vaepipe "
                                   "train` does: for a training whose MLflow server was away. Reopens the "
                                   "run named by the folder's run.json when the store has it.")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="the trained model folder (default: paths.model)")
    p.add_argument("--wait", action="store_true",
                   help="if another vaepipe process is writing the model folder, wait for it")
    _add_common(p)
    p = sub.add_parser("diagnose", help="does the model use its latent? KL per dimension, AU, MI, gap vs LM, verdict",
                       description="Score paths.model (and the LM in paths.baseline, when there) on one split's "
                                   "first evaluate.max_docs documents with K=evaluate.iw_samples, and print KL "
                                   "per dimension, active units, MI, the gap vs the LM with its 95%% interval, "
                                   "and a verdict (collapsed, weak, healthy) with the params.yaml keys to try.")
    p.add_argument("--split", default=None, help="the split to score (default: the first of evaluate.splits)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the report")
    _add_common(p)
    _add_verbs(sub)
    p = sub.add_parser("params", help="print the resolved parameters (or every key with --describe)")
    p.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
    _add_common(p)
    return parser


def _add_verbs(sub: Any) -> None:
    p = sub.add_parser("sample", help="texts decoded from the prior, z ~ N(0, I)")
    p.add_argument("-n", type=int, default=5, help="number of texts (default: 5)")
    _add_model_options(p)
    p = sub.add_parser("reconstruct", help="encode texts and decode their posterior means")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--file", metavar="PATH", help="read the texts from PATH, one per line ('-': stdin)")
    _add_model_options(p)
    p = sub.add_parser("interpolate", help="decode the line between two texts' latents, ends included")
    p.add_argument("text_a", metavar="TEXT_A")
    p.add_argument("text_b", metavar="TEXT_B")
    p.add_argument("--steps", type=int, default=5, help="texts on the path, ends included (default: 5)")
    _add_model_options(p)
    p = sub.add_parser("decode", help="decode latent vectors: exported documents' means or a .npy file")
    p.add_argument("--ids", nargs="+", metavar="ID", help="doc ids whose exported mu to decode")
    p.add_argument("--embeddings", metavar="DIR", help="the export holding --ids (default: paths.embeddings)")
    p.add_argument("--npy", metavar="PATH", help="a (N, latent_dim) float .npy file of latent vectors")
    _add_model_options(p)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR", help="the trained model folder (default: paths.model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, default), cpu, cuda ...")
    p.add_argument("--json", action="store_true", help="JSON lines: the inputs beside each output text")
    g = p.add_argument_group("decoding")
    for flag, dest, kind, text in DECODING_FLAGS:
        g.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    _add_common(p)


def _decoding(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags given on the command line (the others keep Decoding's defaults)."""
    given = {dest: getattr(args, dest) for _, dest, _, _ in DECODING_FLAGS}
    return {k: v for k, v in given.items() if v is not None}


# one output line: (the inputs it came from, for --json; the text)
Line = tuple[dict[str, Any], str]


def _run_verb(args: argparse.Namespace, params: Any) -> list[Line]:
    """Run sample/reconstruct/interpolate/decode with the model of --model or paths.model.

    The arguments are checked before the model is loaded, so a typo fails at once.
    """
    from vaepipe.ml.decoding import Decoding
    from vaepipe.stages.textmodel import load

    dec = _decoding(args)
    Decoding.from_kwargs(**dec)
    texts = _input_texts(args) if args.command == "reconstruct" else []
    if args.command == "decode":
        _check_decode_source(args)
    model_dir = args.model or params.paths.model
    tok = Path(params.paths.tokenizer)
    m = load(model_dir, tokenizer=tok if tok.exists() else None, device=args.device)
    if args.command == "sample":
        return [({"index": i}, t) for i, t in enumerate(m.sample(args.n, **dec))]
    if args.command == "reconstruct":
        return [({"input": x}, t) for x, t in zip(texts, m.reconstruct(texts, **dec), strict=True)]
    if args.command == "interpolate":
        return _interpolate(m, args, dec)
    return _decode(m, args, params, model_dir, dec)


def _interpolate(m: Any, args: argparse.Namespace, dec: dict[str, Any]) -> list[Line]:
    out = m.interpolate(args.text_a, args.text_b, steps=args.steps, **dec)
    ts = [i / (len(out) - 1) for i in range(len(out))]
    return [({"from": args.text_a, "to": args.text_b, "t": round(t, 6)}, x) for t, x in zip(ts, out, strict=True)]


def _check_decode_source(args: argparse.Namespace) -> None:
    from vaepipe.core.errors import ConfigError

    if (args.ids is None) == (args.npy is None):
        raise ConfigError("decode: give either --ids (with --embeddings) or --npy")
    if args.npy is not None and args.embeddings is not None:
        raise ConfigError("decode: --embeddings goes with --ids, not with --npy")


def _decode(m: Any, args: argparse.Namespace, params: Any, model_dir: str, dec: dict[str, Any]) -> list[Line]:
    """decode --npy FILE (rows in file order) or --ids ID... (exported means, in the given order)."""
    if args.npy is not None:
        return [({"row": i}, t) for i, t in enumerate(m.decode(_read_npy(args.npy), **dec))]
    from vaepipe.stages.search import lookup_vectors

    z = lookup_vectors(args.embeddings or params.paths.embeddings, args.ids, model_dir)
    return [({"id": d}, t) for d, t in zip(args.ids, m.decode(z, **dec), strict=True)]


def _input_texts(args: argparse.Namespace) -> list[str]:
    """reconstruct's texts: the arguments, or the non-blank lines of --file."""
    from vaepipe.core.errors import ConfigError

    if args.file is not None and args.texts:
        raise ConfigError("reconstruct: give texts as arguments or --file, not both")
    texts = list(args.texts)
    if args.file is not None:
        try:
            raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--file {args.file}: cannot read ({e.__class__.__name__}: {e})") from None
        # "\n" only: str.splitlines would also split at U+2028, \x1c ... inside a text
        texts = [line.rstrip("\r") for line in raw.split("\n") if line.strip()]
    if not texts:
        raise ConfigError("reconstruct: no texts (give TEXT arguments or --file; blank lines are skipped)")
    return texts


def _read_npy(path: str) -> Any:
    import numpy as np

    from vaepipe.core.errors import ConfigError

    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--npy {path}: not a readable .npy array ({e.__class__.__name__}: {e})") from None
    if not np.issubdtype(z.dtype, np.number):
        raise ConfigError(f"--npy {path}: expected numbers, got dtype {z.dtype}")
    return z


def _print_lines(results: list[Line], as_json: bool) -> None:
    """One output per line on stdout: the text (line breaks turned into spaces), or a JSON object."""
    import json

    for inputs, text in results:
        print(json.dumps({**inputs, "text": text}, ensure_ascii=False) if as_json else one_line(text))


def one_line(text: str) -> str:
    """``text`` with ``\r`` and ``\n`` as spaces: a decoded text may hold them (byte-level BPE)."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def _fail(command: str, message: str, code: int) -> int:
    msg = " ".join(message.split())  # one line, whatever the message held
    print(f"vaepipe {command}: error: {msg}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    from vaepipe.core.config import describe, load_params
    from vaepipe.core.errors import VaepipeError
    from vaepipe.core.outputs import describe_os_error, stage_outputs

    args = build_parser().parse_args(argv)
    # the verbs' stderr is for problems only: their output is piped into other tools
    logging.basicConfig(
        level=logging.WARNING if args.quiet or args.command in VERBS else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    params = None
    try:
        if args.command == "params" and args.describe:
            print(describe())
            return 0
        params = load_params(args.params, args.overrides)
        if args.command == "params":
            import yaml

            print(yaml.safe_dump(params.to_dict(), sort_keys=False), end="")
            return 0
        if args.command == "neighbors":
            from vaepipe.stages.search import neighbors

            if args.k < 1:
                raise VaepipeError("-k must be at least 1")
            for n in neighbors(params, args.text, k=args.k):
                print(f"{n.rank:>3}  {n.score:+.4f}  {n.doc_id}  {n.split:<5}  {n.text}")
            return 0
        if args.command in VERBS:
            _print_lines(_run_verb(args, params), args.json)
            return 0
        if args.command == "diagnose":
            import json

            from vaepipe.stages import diagnose

            found = diagnose.run(params, split=args.split)
            print(json.dumps(found.to_dict()) if args.json else diagnose.format_report(found))
            return 0
        if args.command == "log-model":
            from vaepipe.adapters.tracking_mlflow import log_trained_model

            tracker = log_trained_model(params, args.model or params.paths.model, wait=args.wait)
            print(f"logged {tracker.model_uri or 'the model'} in MLflow run {tracker.last_run_id} "
                  f"at {tracker.uri}")
            return 0
        if params.engine.kind == "ray" and args.command in RAY_STAGES and params.engine.submit:
            from vaepipe.adapters.ray_jobs import submit_stage

            submit_stage(args.command, params.engine, params_file=args.params, overrides=args.overrides,
                         on_line=lambda line: print(line, flush=True), wait=args.wait)
            return 0
        if params.engine.kind == "ray" and args.command in RAY_STAGES:
            from vaepipe.adapters.engine_ray import run_stage

            run_stage(args.command, params, wait=args.wait)
            return 0
        module = importlib.import_module(f"vaepipe.stages.{args.command}")
        if args.command in TRACKED:
            module.run(params, make_tracker=_mlflow_tracker, wait=args.wait)
        else:
            module.run(params, wait=args.wait)
        return 0
    except VaepipeError as e:
        return _fail(args.command, str(e), e.exit_code)
    except OSError as e:
        # a full disk or a read-only place is the user's to fix: one line, not a traceback
        stage = "train" if args.command == "log-model" else args.command
        outputs = stage_outputs(params, stage) if params is not None else []
        msg = describe_os_error(e, outputs)
        if msg is None:
            raise
        return _fail(args.command, msg, 1)
    except KeyboardInterrupt:
        print(f"vaepipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
