"""The ``torch-coherence`` command line (console script ``torch-coherence``).

Each sub-command lives in a small ``add_<name>`` function that registers its parser and
handler: ``thresholds`` (:mod:`.thresholds`), ``demo`` (:mod:`torch_coherence.demo`) and
``reproduce`` (:mod:`.reproduce`); :data:`SUBCOMMANDS` lists them, so adding a command is
one function and one line. The commands only parse, call the library and print: every
number comes from :mod:`torch_coherence.theory`, :mod:`torch_coherence.dynamics` or
:mod:`torch_coherence.reproduce`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..demo import add_demo
from .reproduce import add_reproduce
from .thresholds import add_thresholds

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


#: Sub-command registrars, in the order ``--help`` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_thresholds,
    add_demo,
    add_reproduce,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="torch-coherence",
        description="Hessian coherence, sharpness and SGD stability margins.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torch-coherence`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as err:
        print(f"torch-coherence {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
