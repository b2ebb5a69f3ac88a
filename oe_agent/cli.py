"""The `oe-agent` command line: one verb per subcommand, registered by the module that owns it.

Each module in COMMANDS defines `register(subparsers)`, adding its verbs with
`set_defaults(func=...)`; `func(args)` returns the exit status. Errors are one line on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from oe_agent import __version__
from oe_agent.errors import UserError

# Modules that contribute verbs, in the order `--help` lists them.
COMMANDS: list[str] = [
    "oe_agent.dns.tools",
    "oe_agent.mesh",
    "oe_agent.ike.decrypt",
    "oe_agent.daemon",
    "oe_agent.control.client",
    "oe_agent.esp.static",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error
        self.exit(2, f"oe-agent: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oe-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"oe-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"oe-agent: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
