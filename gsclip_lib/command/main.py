"""``gsclip``: splats as a tool (README "Splats from the command line", FORMAT.md for the bytes).

    gsclip encode IMAGE_OR_FOLDER... --splats N [--steps K] [--size S] -o OUT
    gsclip render FILE.gsplat -o OUT.png [--size S] [--ellipses]
    gsclip info FILE.gsplat
    gsclip classify FILE.gsplat... --model DIR --classes fashion_mnist|imagenet|names.txt [--top K]
    gsclip compare IMAGE --splats N [-o SIDE_BY_SIDE.png]

Every subcommand takes ``--json`` (one JSON document on stdout). A mistake of the user's (a file
that is not an image, a damaged record, a folder that is not a trained level, an output folder that
does not exist, a bad option) is one line on stderr and exit status 2, and nothing half-written is
left: every output file appears whole under its final name or not at all
(:mod:`gsclip_lib.atomic_files`; a folder run keeps its finished shards, to resume from). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, NoReturn, Sequence

from gsclip_lib.atomic_files import finite_or_none
from gsclip_lib.errors import GsclipError
from gsclip_lib.splats.codec import CodecError

EXIT_USER_ERROR = 2


class UsageError(GsclipError):
    """A command line argparse refused."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing its usage: every mistake is one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--params", default="params.yaml",
                        help="parameter file whose groups give the settings (default: params.yaml)")


def build_parser() -> argparse.ArgumentParser:
    from gsclip_lib.command import classifying, encoding, viewing

    parser = _Parser(prog="gsclip", description=__doc__.splitlines()[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (encoding, viewing, classifying):
        module.add_parsers(commands, add_common)
    return parser


def emit(result: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], str]) -> None:
    """The result on stdout, as JSON or as the subcommand's text."""
    if as_json:
        print(json.dumps(finite_or_none(result), indent=2, allow_nan=False, default=str))
    else:
        print(text(result))


def one_line(error: BaseException) -> str:
    """An error's message on one line (a message that spans lines is joined with "; ")."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 2 on a user's mistake (one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        result = args.run(args)
        emit(result, args.json, args.text)
    except (GsclipError, CodecError) as error:
        print(f"gsclip: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("gsclip: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
