"""Command line: ``pyanomaly info`` (more commands arrive with the detectors)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyanomaly", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print the torch version, the compiled kernels and the visible devices")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from pyanomaly.info import info_text

        print(info_text())
    return 0
