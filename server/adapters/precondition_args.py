"""The command line's conditional writes: `--if-version N` and `--if-absent`, shared by the
`adapters` subcommands and `train --store`, so a script gets the same compare-and-swap as the
HTTP API's If-Match / If-None-Match. A failed precondition exits with PRECONDITION_EXIT_CODE."""

from __future__ import annotations

import argparse

from server.adapters.store import Precondition

PRECONDITION_EXIT_CODE = 3


def add_precondition_arguments(parser: argparse.ArgumentParser, creates: bool) -> None:
    """`creates`: the command may create the name, so --if-absent makes sense for it."""
    group = parser.add_mutually_exclusive_group() if creates else parser
    group.add_argument(
        "--if-version",
        type=int,
        default=None,
        metavar="N",
        help=f"only if the name currently serves version N (else exit {PRECONDITION_EXIT_CODE}, nothing changed)",
    )
    if creates:
        group.add_argument(
            "--if-absent",
            action="store_true",
            help=f"only if no adapter has this name yet (else exit {PRECONDITION_EXIT_CODE}, nothing changed)",
        )


def precondition_from_args(args: argparse.Namespace) -> Precondition | None:
    if args.if_version is not None:
        return Precondition(version=args.if_version)
    if getattr(args, "if_absent", False):
        return Precondition(exists=False)
    return None
