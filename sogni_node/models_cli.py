"""`sogni-node models list | add PATH | remove ID | verify [ID]`.

Works on the node's models dir (config `models_dir`, or `--models-dir`) with no model hub:
`add` copies a diffusers folder or converts a `.safetensors` checkpoint offline, and records
every weight file's sha256 so a changed or truncated file is refused before it is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sogni_node.cli_common import ConfigOption, JsonOption, fail, load_config
from sogni_node.models.detect import DetectionError
from sogni_node.models.store import ModelStore, ModelStoreError

__all__ = ["models_app"]

models_app = typer.Typer(help="Install, list, remove and verify local models.")

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--models-dir", help="Models folder (default: config models_dir).", file_okay=False
    ),
]


def _store(config: Path | None, models_dir: Path | None) -> ModelStore:
    return ModelStore(models_dir if models_dir is not None else load_config(config).models_dir)


@models_app.command("list")
def list_models(
    config: ConfigOption = None, models_dir: DirOption = None, as_json: JsonOption = False
) -> None:
    """Installed models with class and render defaults."""
    try:
        models = _store(config, models_dir).installed()
    except ModelStoreError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({m.model_id: m.to_json() for m in models}, indent=2))
        return
    if not models:
        typer.echo("no models installed")
    for m in models:
        typer.echo(
            f"{m.model_id}  {m.model_class}  {m.width}x{m.height}  steps={m.steps} "
            f"guidance={m.guidance} scheduler={m.scheduler or 'saved'}  ({m.source_format})"
        )


@models_app.command("add")
def add(
    path: Annotated[Path, typer.Argument(help="Diffusers folder or .safetensors checkpoint.")],
    model_id: Annotated[
        str | None, typer.Option("--id", help="Model id (default: from name).")
    ] = None,
    model_class: Annotated[
        str | None, typer.Option("--class", help="sd15, sdxl, sdxl-turbo, lcm or flux.")
    ] = None,
    config_dir: Annotated[
        Path | None,
        typer.Option("--config-dir", help="Diffusers config folder for a non-standard file."),
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", help="Folder with CLIP vocab.json + merges.txt.")
    ] = None,
    config: ConfigOption = None,
    models_dir: DirOption = None,
) -> None:
    """Import a model: detect its class, hash its weights, add it to the index."""
    store = _store(config, models_dir)
    try:
        model = store.add(
            path,
            model_id=model_id,
            model_class=model_class,
            config_dir=config_dir,
            tokenizer_dir=tokenizer,
            progress=lambda msg: typer.echo(msg, err=True),
        )
    except (ModelStoreError, DetectionError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"added {model.model_id} ({model.model_class}) at {store.path(model)}")


@models_app.command("remove")
def remove(
    model_id: Annotated[str, typer.Argument(help="Installed model id.")],
    config: ConfigOption = None,
    models_dir: DirOption = None,
) -> None:
    """Remove a model's files and index entry."""
    try:
        _store(config, models_dir).remove(model_id)
    except ModelStoreError as exc:
        fail(str(exc))
    typer.echo(f"removed {model_id}")


@models_app.command("verify")
def verify(
    model_id: Annotated[str | None, typer.Argument(help="One model (default: all).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Check sizes only, no sha256.")] = False,
    config: ConfigOption = None,
    models_dir: DirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-hash weight files against the index; exit 1 if any model is bad."""
    try:
        results = _store(config, models_dir).verify(model_id, full=not quick)
    except ModelStoreError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({r.model_id: {"ok": r.ok, "problems": r.problems} for r in results}))
    else:
        for r in results:
            typer.echo(
                f"{r.model_id}: ok" if r.ok else f"{r.model_id}: BAD: {'; '.join(r.problems)}"
            )
    if not all(r.ok for r in results):
        raise typer.Exit(1)
