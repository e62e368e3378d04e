"""What every `sogni-node` sub-command shares: the config option, the config loader, and the
node's own expected errors, registered with the one CLI error layer
(`sogni_protocol.cli_errors`) so that commands just let them propagate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sogni_node.config import NodeConfig, load_node_config
from sogni_protocol.cli_errors import BadUsage, Refused, Unavailable, register
from sogni_protocol.settings import SettingsError
from sogni_wallet.addresses import AddressesFileError

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

_MODELS_TODO = "see `sogni-node models list` and `sogni-node loras list`"
for _name, _kind, _todo in (
    ("sogni_node.hardware.HardwareError", Unavailable, "pick another --device or check its driver"),
    ("sogni_node.models.store.ModelStoreError", Refused, _MODELS_TODO),
    ("sogni_node.models.detect.DetectionError", Refused, "pass --class or --config-dir"),
    ("sogni_node.models.single_file.SingleFileError", Refused, "pass --class or --config-dir"),
    ("sogni_node.models.loras.LoraLibraryError", Refused, _MODELS_TODO),
    ("sogni_node.models.registry.UnknownModelError", BadUsage, _MODELS_TODO),
    ("sogni_node.journal.JournalError", Refused, None),
    ("sogni_node.rewards.PublicationError", Refused, "ask the coordinator's operator"),
    (
        "sogni_protocol.folder_lock.FolderBusy",
        Refused,
        "stop that node first, or give this one its own data_dir (SOGNI_NODE_DATA_DIR)",
    ),
):
    register(_name, _kind, _todo)


def load_config(path: Path | None) -> NodeConfig:
    """The effective config; a value it refuses is a usage error (exit 2)."""
    try:
        return load_node_config(path)
    except (SettingsError, AddressesFileError):
        raise
    except ValueError as exc:  # e.g. chain_id contradicting the addresses file
        raise BadUsage(str(exc), "fix the config file or the SOGNI_NODE_* variables") from exc
