"""The coordinator config as the operator CLIs load it: a value the config refuses (e.g. a
chain_id contradicting the addresses file) is a usage error naming it (exit 2), while
`SettingsError` and `AddressesFileError` pass through with their own one-line message."""

from __future__ import annotations

from pathlib import Path

from sogni_coordinator.config import CoordinatorConfig, load_coordinator_config
from sogni_protocol.cli_errors import BadUsage
from sogni_protocol.settings import SettingsError
from sogni_wallet.addresses import AddressesFileError

__all__ = ["load_cli_config"]


def load_cli_config(path: Path | None) -> CoordinatorConfig:
    """`load_coordinator_config(path)`, its refusals turned into `BadUsage`."""
    try:
        return load_coordinator_config(path)
    except (SettingsError, AddressesFileError):
        raise
    except ValueError as exc:
        raise BadUsage(
            str(exc), "fix the config file or the SOGNI_COORDINATOR_* variables"
        ) from exc
