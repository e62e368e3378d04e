"""`sogni-node` (and `python -m sogni_node`): check the `node` extra, then run the CLI.

Why here and not in `sogni_node.cli`: that module imports the hardware probe and, through its
commands, torch, diffusers and web3. On a bare install (`pip install sogni-supernet`: protocol,
wallet, transport, client) the command must say which extra to install, in one line, instead
of an ImportError traceback; so the check runs before anything heavy is imported.
"""

from __future__ import annotations

import typer

from sogni_protocol.cli_errors import main as run_cli
from sogni_protocol.cli_errors import require_extra

NODE_MODULES = ("torch", "diffusers", "web3", "hypercorn")
"""Modules of the `node` extra: diffusers on torch, web3 (rewards, staking), hypercorn (HTTP)."""


def _load() -> typer.Typer:
    require_extra("sogni-node", "node", NODE_MODULES)
    from sogni_node.cli import app

    return app


def main() -> None:
    run_cli(_load, prog_name="sogni-node")


if __name__ == "__main__":
    main()
