"""`sogni-coordinator` (and `python -m sogni_coordinator`): check the `coordinator` extra,
then run the CLI.

Why here: `sogni_coordinator.cli` reaches web3 and the embedded EVM (settlement, `chain`
commands). On a bare install the command must name the extra to install in one line
instead of an ImportError traceback, so the check runs before anything heavy is imported.
"""

from __future__ import annotations

import typer

from sogni_protocol.cli_errors import main as run_cli
from sogni_protocol.cli_errors import require_extra

COORDINATOR_MODULES = ("web3", "eth_tester", "hypercorn")
"""Modules of the `coordinator` extra (the chain client, the embedded EVM, HTTP)."""


def _load() -> typer.Typer:
    require_extra("sogni-coordinator", "coordinator", COORDINATOR_MODULES)
    from sogni_coordinator.cli import app

    return app


def main() -> None:
    run_cli(_load, prog_name="sogni-coordinator")


if __name__ == "__main__":
    main()
