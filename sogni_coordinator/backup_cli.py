"""`sogni-coordinator backup DIR` and `sogni-coordinator restore DIR` (docs/OPERATIONS.md,
"Backups"). The logic is in `sogni_coordinator.backup`; this module reads the config and
turns its errors into one line each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sogni_coordinator.backup import ENCRYPTED_KEYS, BackupError, backup, restore
from sogni_coordinator.config import CoordinatorConfig, load_coordinator_config
from sogni_protocol.cli_errors import Refused, register
from sogni_wallet.keystore import password_from_env_or_prompt

__all__ = ["app"]

register(BackupError, Refused, None)

app = typer.Typer(add_completion=False)
"""Nameless: `sogni_coordinator.cli` merges its commands into its own."""

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True)
]


def _url_key(cfg: CoordinatorConfig) -> Path:
    """The gateway's result-URL key file: `result_url_key_file`, else in the data folder."""
    if cfg.result_url_key_file is not None:
        return cfg.result_url_key_file
    return cfg.data_dir / "result-url.key"


@app.command("backup")
def backup_cmd(
    folder: Annotated[Path, typer.Argument(help="A new (or empty) folder for the backup.")],
    keys: Annotated[
        bool,
        typer.Option(
            "--keys",
            help="Also back up the keys: keystores as they are (encrypted); the libp2p "
            "identity and the gateway's result-URL key encrypted with the coordinator's "
            "password.",
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """A consistent snapshot of the database and published epochs, safe while it runs."""
    cfg = load_coordinator_config(config)
    key_files: list[Path] = []
    node_key = url_key = password = None
    if keys:
        key_files = [cfg.keystore]
        if cfg.settlement_keystore is not None:
            key_files.append(cfg.settlement_keystore)
        node_key = cfg.node_key_path
        url_key = _url_key(cfg)
        if node_key.exists() or url_key.exists():
            password = password_from_env_or_prompt(cfg.password_env)
    manifest = backup(
        cfg.data_dir,
        folder.expanduser(),
        database=cfg.database,
        key_files=key_files,
        node_key=node_key,
        url_key=url_key,
        password=password,
    )
    typer.echo(
        json.dumps({"backup": str(folder), "files": len(manifest.files), "keys": manifest.keys})
    )


@app.command("restore")
def restore_cmd(
    folder: Annotated[Path, typer.Argument(help="A folder written by `backup`.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing database (coordinator stopped).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Restore a backup into this coordinator's data folder; start it afterwards."""
    cfg = load_coordinator_config(config)
    source = folder.expanduser()
    password = None
    if any((source / "keys" / name).exists() for name in ENCRYPTED_KEYS):
        password = password_from_env_or_prompt(cfg.password_env)
    manifest = restore(
        source,
        cfg.data_dir,
        database=cfg.database,
        password=password,
        force=force,
        url_key=_url_key(cfg),
    )
    typer.echo(
        json.dumps(
            {"restored": str(cfg.data_dir), "files": len(manifest.files), "keys": manifest.keys}
        )
    )
