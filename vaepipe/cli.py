"""The only place that parses argv.

    vaepipe ingest|tokenize|train|evaluate|embed [--params PATH] [--set section.key=value]...
    vaepipe neighbors TEXT [-k N] [--params PATH] [--set ...]
    vaepipe params [--params PATH] [--set ...]      # print the resolved parameters

Each stage lives in its own module with a public ``run(params) -> Result``; the CLI loads
the params, calls it, and turns user-fixable errors (``VaepipeError``) into one line on
stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# stage name -> module under vaepipe/ (bpe, not tokenize: that name shadows the stdlib)
STAGES = {
    "ingest": "ingest",
    "tokenize": "bpe",
    "train": "train",
    "evaluate": "evaluate",
    "embed": "embed",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", metavar="PATH",
                   help="parameters file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, value parsed as YAML (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaepipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in STAGES.items():
        p = sub.add_parser(name, help=f"run the {name} stage (vaepipe/{module}.py)")
        _add_common(p)
    p = sub.add_parser("neighbors", help="embed TEXT and print the nearest documents")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("-k", type=int, default=10, help="number of neighbours (default: 10)")
    _add_common(p)
    p = sub.add_parser("params", help="print the resolved parameters (or every key with --describe)")
    p.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
    _add_common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vaepipe.config import describe, load_params
    from vaepipe.errors import VaepipeError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
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
            from vaepipe.embed import neighbors

            if args.k < 1:
                raise VaepipeError("-k must be at least 1")
            neighbors(params, args.text, k=args.k)
            return 0
        module = importlib.import_module(f"vaepipe.{STAGES[args.command]}")
        module.run(params)
        return 0
    except VaepipeError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"vaepipe {args.command}: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"vaepipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
