"""What every `sogni-node` sub-command shares: the config option and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from sogni_node.config import NodeConfig, load_node_config
from sogni_protocol.settings import SettingsError

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (default: $SOGNI_NODE_CONFIG, else built-in defaults).",
        dir_okay=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and an exit code: 2 for bad settings, 1 for everything else."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_config(path: Path | None) -> NodeConfig:
    try:
        return load_node_config(path)
    except (SettingsError, ValueError) as exc:
        fail(str(exc), 2)
