"""Dev commands for the chain layer.

python -m sogni_chain anvil  [--state .cache/anvil-state.json] [--port 8545]
python -m sogni_chain deploy [--url http://127.0.0.1:8545] [--out .cache/addresses.json]
                             [--fund-distributor 1000000] [--reuse]
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("anvil", "deploy"):
        print(__doc__, file=sys.stderr)
        return 2
    if args[0] == "anvil":
        from .anvil import main as anvil_main

        return anvil_main(args[1:])
    from .deploy import main as deploy_main

    return deploy_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
