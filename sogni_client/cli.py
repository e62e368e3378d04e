"""`sogni`: render images on the Supernet from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sogni_client.api import RenderedImage, RenderRefused, render_sync, save
from sogni_protocol.messages import RenderRequest

app = typer.Typer(help="Render images on the Sogni Supernet.", no_args_is_help=True)

DEFAULT_COORDINATOR_FILE = Path("~/.sogni/coordinator/coordinator.json")


def resolve_coordinator(explicit: str | None) -> str:
    """--coordinator, then $SOGNI_COORDINATOR_ADDR, then the local coordinator's address file."""
    if explicit:
        return explicit
    if env := os.environ.get("SOGNI_COORDINATOR_ADDR"):
        return env
    info = DEFAULT_COORDINATOR_FILE.expanduser()
    if info.exists():
        return str(json.loads(info.read_text())["addrs"][0])
    raise typer.BadParameter(
        "no coordinator: pass --coordinator /ip4/.../p2p/..., set SOGNI_COORDINATOR_ADDR, "
        f"or run a local coordinator (it writes {DEFAULT_COORDINATOR_FILE})",
        param_hint="--coordinator",
    )


@app.callback()
def _main() -> None:
    """Sub-commands below."""


@app.command("render")
def render_cmd(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    n: Annotated[int, typer.Option("-n", "--number", help="Number of images (1-512).")] = 1,
    model: Annotated[str, typer.Option("--model", help="Model id.")] = "sogni-tiny-sd",
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 8,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.0,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed+i.")] = 0,
    width: Annotated[int, typer.Option(help="Width in pixels.")] = 64,
    height: Annotated[int, typer.Option(help="Height in pixels.")] = 64,
    negative: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    network: Annotated[str, typer.Option(help="fast or relaxed.")] = "fast",
    out: Annotated[Path, typer.Option(help="Folder for images and receipts.jsonl.")] = Path("out"),
    coordinator: Annotated[str | None, typer.Option(help="Coordinator multiaddr.")] = None,
) -> None:
    """Render PROMPT and save the images with their signed receipts."""
    addr = resolve_coordinator(coordinator)
    try:
        request = msgspec.convert(
            {
                "modelId": model,
                "positivePrompt": prompt,
                "negativePrompt": negative,
                "steps": steps,
                "guidance": guidance,
                "seed": seed,
                "width": width,
                "height": height,
                "numberOfImages": n,
                "network": network,
                "type": "renderRequest",
            },
            RenderRequest,
        )
    except msgspec.ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    with Progress(
        TextColumn("[bold]rendering"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ) as bar:
        total = n * steps
        task = bar.add_task("render", total=total)
        done_steps: dict[int, int] = {}

        def on_progress(index: int, step: int, _steps: int) -> None:
            done_steps[index] = step
            bar.update(task, completed=sum(done_steps.values()))

        def on_image(image: RenderedImage) -> None:
            done_steps[image.index] = steps
            bar.update(task, completed=sum(done_steps.values()))

        try:
            result = render_sync(addr, request, on_progress=on_progress, on_image=on_image)
        except RenderRefused as exc:
            typer.echo(f"refused: {exc}", err=True)
            raise typer.Exit(2) from None
    paths = save(result, out)
    typer.echo(f"{len(paths)} images and receipts in {out}/ (receipts.jsonl)")
    for index, reason in result.failed:
        typer.echo(f"image {index} failed: {reason}", err=True)
    if result.failed:
        raise typer.Exit(1)


app.command("quote")(__import__("sogni_client.quote").quote.quote_cmd)


if __name__ == "__main__":
    app()
