"""Dev commands for the chain layer.

python -m sogni_chain anvil  [--state .cache/anvil-state.json] [--port 8545]
python -m sogni_chain deploy [--url http://127.0.0.1:8545] [--out .cache/addresses.json]
                             [--fund-distributor 1000000] [--reuse]
"""

from __future__ import annotations

import sys

from sogni_protocol.cli_errors import Unavailable, debug_requested, register, run

register("sogni_chain.anvil.AnvilError", Unavailable, None)  # e.g. no anvil binary


def main(argv: list[str] | None = None) -> int:
    """Run one dev command; an expected failure is one line and its class's exit code
    (`sogni_protocol.cli_errors`; `--debug` or SOGNI_DEBUG=1 for the traceback)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not args or args[0] not in ("anvil", "deploy"):
        print(__doc__, file=sys.stderr)
        return 2
    if args[0] == "anvil":
        from .anvil import main as anvil_main

        return run(lambda: anvil_main(args[1:]), debug=debug or debug_requested([]))
    from .deploy import main as deploy_main

    return deploy_main(args[1:], debug=debug)


if __name__ == "__main__":
    sys.exit(main())
