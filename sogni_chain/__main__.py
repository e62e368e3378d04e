"""Dev commands for the chain layer.

usage: python -m sogni_chain [--debug] COMMAND [OPTIONS]

commands:
  anvil   start the pinned anvil (from npm: `npm ci --prefix contracts`) in the foreground
          [--state .cache/anvil-state.json] [--port 8545] [--host 127.0.0.1]
  deploy  deploy the Sogni contracts to a dev chain and write the addresses file
          [--url http://127.0.0.1:8545] [--out .cache/addresses.json]
          [--fund-distributor 1000000] [--reuse]

`python -m sogni_chain COMMAND --help` shows a command's options.
"""

from __future__ import annotations

import sys

from sogni_protocol.cli_errors import (
    BadUsage,
    Unavailable,
    debug_requested,
    register,
    run,
)

register("sogni_chain.anvil.AnvilError", Unavailable, None)  # e.g. no anvil binary

PROG = "python -m sogni_chain"
COMMANDS = ("anvil", "deploy")
_HELP = ("-h", "--help", "help")


def _no_command(args: list[str]) -> int:
    """Nothing, or something that is not a command: one line naming the commands."""

    def refuse() -> None:
        named = " and ".join(COMMANDS)
        see = f"the commands are {named}; `{PROG} --help` shows them"
        if not args:
            raise BadUsage("no command given", see)
        raise BadUsage(f"unknown command {args[0]!r}", see)

    return run(refuse, debug=False)


def main(argv: list[str] | None = None) -> int:
    """Run one dev command; an expected failure is one line and its class's exit code
    (`sogni_protocol.cli_errors`; `--debug` or SOGNI_DEBUG=1 for the traceback)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if args and args[0] in _HELP:
        print(__doc__.strip())
        return 0
    if not args or args[0] not in COMMANDS:
        return _no_command(args)
    prog = f"{PROG} {args[0]}"
    if args[0] == "anvil":
        from .anvil import main as anvil_main

        return run(lambda: anvil_main(args[1:], prog=prog), debug=debug or debug_requested([]))
    from .deploy import main as deploy_main

    saved, sys.argv[0] = sys.argv[0], prog  # argparse's usage names this, not `__main__.py`
    try:
        return deploy_main(args[1:], debug=debug)
    finally:
        sys.argv[0] = saved


if __name__ == "__main__":
    sys.exit(main())
