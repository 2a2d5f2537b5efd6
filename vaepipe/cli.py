"""Command line: ``vaepipe <command> [--params PATH] [--set section.key=value]...``.

Every command reads params.yaml (or ``--params``), applies the ``--set`` overrides, runs, and
turns a user-fixable error (``VaepipeError``) into one line on stderr and a non-zero exit code.
This is the only module that parses argv and the one that picks the experiment tracker.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

DESCRIPTION = """\
vaepipe: train and use variational autoencoder language models.

The pipeline's stages, in order (each reads params.yaml and writes one output path):
  ingest     raw text files -> clean, de-duplicated, split corpus Parquet (paths.corpus)
  tokenize   train a byte-level BPE tokenizer, encode the corpus (paths.tokenizer, paths.tokens)
  train      train the VAE (or, with --set model.kind=lm, the LM baseline) (paths.model)
  evaluate   ELBO, IW-NLL, perplexity, KL, MI, active units vs the LM (paths.reports)
  embed      a latent vector for every document as Parquet (paths.embeddings)
"""

EPILOG = """\
examples:
  vaepipe ingest --set 'ingest.inputs=[my_texts/]' --set ingest.unit=paragraph
  vaepipe train --set train.max_steps=200
  vaepipe neighbors "the economy and jobs" -k 5
  vaepipe log-model --model models/vae   log/register a model trained while MLflow was away
  vaepipe params --describe          every parameter with its default and meaning
"""

# each stage is the module of the same name under vaepipe/stages/
STAGES = ("ingest", "tokenize", "train", "evaluate", "embed")
STAGE_HELP = {
    "ingest": "raw text -> corpus Parquet",
    "tokenize": "train the BPE tokenizer and encode the corpus",
    "train": "train the VAE, or the LM baseline with --set model.kind=lm",
    "evaluate": "score the model against the LM baseline; write reports",
    "embed": "export a latent vector for every document",
}


# the stages that log to the experiment tracker when tracking.enabled
TRACKED = ("train", "evaluate")


def _mlflow_tracker(cfg: Any) -> Any:
    # imported only when tracking is enabled: mlflow is an optional extra
    from vaepipe.adapters.tracking_mlflow import MlflowTracker

    return MlflowTracker(cfg)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", metavar="PATH",
                   help="parameters file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, value parsed as YAML (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaepipe", description=DESCRIPTION, epilog=EPILOG,
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
    p = sub.add_parser("params", help="print the resolved parameters (or every key with --describe)")
    p.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
    _add_common(p)
    return parser


def _fail(command: str, message: str, code: int) -> int:
    msg = " ".join(message.split())  # one line, whatever the message held
    print(f"vaepipe {command}: error: {msg}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    from vaepipe.core.config import describe, load_params
    from vaepipe.core.errors import VaepipeError
    from vaepipe.core.outputs import describe_os_error, stage_outputs

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
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
        if args.command == "log-model":
            from vaepipe.adapters.tracking_mlflow import log_trained_model

            tracker = log_trained_model(params, args.model or params.paths.model, wait=args.wait)
            print(f"logged {tracker.model_uri or 'the model'} in MLflow run {tracker.last_run_id} "
                  f"at {tracker.uri}")
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
