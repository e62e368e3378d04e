"""`sogni-node models list | add PATH | remove ID | verify [ID]` and the same for `loras`.

Works on the node's models dir (config `models_dir`, or `--models-dir`) with no model hub:
`add` copies a diffusers folder or converts a `.safetensors` checkpoint offline, and records
every weight file's sha256 so a changed or truncated file is refused before it is used.
Store and library errors propagate to the CLI error layer (registered in `cli_common`: exit 3);
`verify` finding a bad file is a result, not an error: it exits 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from sogni_node.cli_common import ConfigOption, JsonOption, load_config
from sogni_node.models.loras import LoraLibrary
from sogni_node.models.store import ModelStore
from sogni_protocol.cli_errors import CliError, Refused, Unavailable, classify

__all__ = ["loras_app", "models_app"]

models_app = typer.Typer(help="Install, list, remove and verify local models.")
loras_app = typer.Typer(help="Install, list, remove and verify LoRAs that jobs can ask for.")

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--models-dir", help="Models folder (default: config models_dir).", file_okay=False
    ),
]


def _unusable(exc: ValueError) -> CliError:
    """A file the store cannot use: its registered class, else refused (exit 3)."""
    return classify(exc) or Refused(str(exc), "check the file, or pass --class/--config-dir")


_NOT_A_CHECKPOINT = (
    "the file is damaged or not a checkpoint: download it again, or give a diffusers folder"
)


def _must_exist(path: Path) -> None:
    """A path that is not there is unavailable (exit 4), as every CLI says it."""
    if not path.exists():
        raise Unavailable(f"{path}: No such file or directory", "check the path")


def _checkpoint_file(path: Path) -> None:
    """Before the store looks at it: a single file must be a readable `.safetensors`
    (--class or --config-dir cannot help a file that is not one)."""
    from sogni_node.models.detect import DetectionError, read_safetensors_header

    _must_exist(path)
    if not path.is_file():
        return  # a diffusers folder: the store checks it
    if not path.name.lower().endswith(".safetensors"):
        raise Refused(
            f"{path.name}: only .safetensors single files are supported",
            "give a .safetensors checkpoint or a diffusers folder",
        )
    try:
        read_safetensors_header(path)
    except DetectionError as exc:
        raise Refused(str(exc), _NOT_A_CHECKPOINT) from None


def _store(config: Path | None, models_dir: Path | None) -> ModelStore:
    return ModelStore(models_dir if models_dir is not None else load_config(config).models_dir)


@models_app.command("list")
def list_models(
    config: ConfigOption = None, models_dir: DirOption = None, as_json: JsonOption = False
) -> None:
    """The models this node serves: built-in ones first, then installed ones."""
    from sogni_node.models import tiny
    from sogni_node.models.registry import SHAPES_DIR, ModelSpec, shapes_model_spec

    cfg = load_config(config)
    models = _store(config, models_dir).installed()
    built_in = []
    if (SHAPES_DIR / "model_index.json").is_file():
        built_in.append(shapes_model_spec())
    if cfg.test_model:  # listed, not built: the node builds it at start
        built_in.append(
            ModelSpec(
                model_id=tiny.TINY_MODEL_ID,
                path=(models_dir or cfg.models_dir) / tiny.TINY_MODEL_ID,
                model_class="sd15",
                default_steps=tiny.TINY_DEFAULT_STEPS,
                default_guidance=tiny.TINY_DEFAULT_GUIDANCE,
                width=tiny.TINY_IMAGE_SIZE,
                height=tiny.TINY_IMAGE_SIZE,
            )
        )
    if as_json:
        out = {
            s.model_id: {
                "builtIn": True,
                "class": s.model_class,
                "width": s.width,
                "height": s.height,
                "steps": s.default_steps,
                "guidance": s.default_guidance,
            }
            for s in built_in
        }
        out.update({m.model_id: m.to_json() for m in models})
        typer.echo(json.dumps(out, indent=2))
        return
    for s in built_in:
        typer.echo(
            f"{s.model_id}  {s.model_class}  {s.width}x{s.height}  steps={s.default_steps} "
            f"guidance={s.default_guidance}  (built-in)"
        )
    if not models:
        typer.echo("no models installed (add one with `sogni-node models add PATH`)")
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
    _checkpoint_file(path)
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
    except ValueError as exc:
        raise _unusable(exc) from exc
    typer.echo(f"added {model.model_id} ({model.model_class}) at {store.path(model)}")


@models_app.command("remove")
def remove(
    model_id: Annotated[str, typer.Argument(help="Installed model id.")],
    config: ConfigOption = None,
    models_dir: DirOption = None,
) -> None:
    """Remove a model's files and index entry."""
    _store(config, models_dir).remove(model_id)
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
    results = _store(config, models_dir).verify(model_id, full=not quick)
    if not results and not as_json:
        typer.echo("no models installed: nothing to verify (built-in models ship with the node)")
        return
    if as_json:
        typer.echo(json.dumps({r.model_id: {"ok": r.ok, "problems": r.problems} for r in results}))
    else:
        for r in results:
            typer.echo(
                f"{r.model_id}: ok" if r.ok else f"{r.model_id}: BAD: {'; '.join(r.problems)}"
            )
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def _library(config: Path | None, models_dir: Path | None) -> LoraLibrary:
    return LoraLibrary(models_dir if models_dir is not None else load_config(config).models_dir)


@loras_app.command("list")
def list_loras(
    config: ConfigOption = None, models_dir: DirOption = None, as_json: JsonOption = False
) -> None:
    """Installed LoRAs (advertised to coordinators by these ids)."""
    loras = _library(config, models_dir).installed()
    if as_json:
        typer.echo(json.dumps({s.lora_id: {"sha256": s.sha256, "size": s.size} for s in loras}))
        return
    if not loras:
        typer.echo("no LoRAs installed")
    for s in loras:
        typer.echo(f"{s.lora_id}  {s.size} bytes  sha256={s.sha256[:16]}")


@loras_app.command("add")
def add_lora(
    path: Annotated[Path, typer.Argument(help="LoRA .safetensors (kohya or diffusers keys).")],
    lora_id: Annotated[
        str | None, typer.Option("--id", help="LoRA id (default: from file name).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Refuse the LoRA unless it fits this model's UNet and text encoder "
            "(loads the model: seconds).",
        ),
    ] = None,
    config: ConfigOption = None,
    models_dir: DirOption = None,
) -> None:
    """Check that a file is a supported LoRA, hash it and install it."""
    _must_exist(path)
    fits = _fit_check(config, models_dir, model) if model is not None else None
    try:
        stored = _library(config, models_dir).add(path, lora_id, fits)
    except ValueError as exc:
        if model is not None and "does not fit model" in str(exc):
            raise Refused(
                str(exc), f"use a LoRA trained for {model}, or leave out --model"
            ) from None
        raise classify(exc) or Refused(
            str(exc), "check that it is a LoRA .safetensors file (kohya or diffusers keys)"
        ) from exc
    typer.echo(f"added LoRA {stored.lora_id}" + (f" (fits {model})" if model else ""))


def _fit_check(
    config: Path | None, models_dir: Path | None, model_id: str
) -> Callable[[Path], str | None]:
    """File -> why it does not fit `model_id` (None: it fits), on the node's CPU renderer."""
    from sogni_node.models.defaults import default_registry
    from sogni_node.models.tiny import TINY_MODEL_ID
    from sogni_node.render.diffusers_backend import DiffusersBackend

    cfg = load_config(config)
    folder = models_dir if models_dir is not None else cfg.models_dir
    test_model = cfg.test_model or model_id == TINY_MODEL_ID
    registry = default_registry(folder, test_model=test_model)
    if model_id not in registry:
        known = ", ".join(registry.ids()) or "none"
        raise Refused(
            f"model {model_id!r} is not on this node (models: {known})",
            "name one of them with --model, or add it with `sogni-node models add PATH`",
        )
    backend = DiffusersBackend(registry, device="cpu")

    def fits(path: Path) -> str | None:
        problem = backend.lora_fit(model_id, path)
        return None if problem is None else f"does not fit model {model_id}: {problem}"

    return fits


@loras_app.command("remove")
def remove_lora(
    lora_id: Annotated[str, typer.Argument(help="Installed LoRA id.")],
    config: ConfigOption = None,
    models_dir: DirOption = None,
) -> None:
    """Remove a LoRA's file and index entry."""
    _library(config, models_dir).remove(lora_id)
    typer.echo(f"removed LoRA {lora_id}")


@loras_app.command("verify")
def verify_loras(
    lora_id: Annotated[str | None, typer.Argument(help="One LoRA (default: all).")] = None,
    config: ConfigOption = None,
    models_dir: DirOption = None,
) -> None:
    """Re-hash LoRA files against the index; exit 1 if any is bad."""
    problems = _library(config, models_dir).verify(lora_id)
    for i, problem in problems.items():
        typer.echo(f"{i}: ok" if problem is None else f"{i}: BAD: {problem}")
    if any(p is not None for p in problems.values()):
        raise typer.Exit(1)
