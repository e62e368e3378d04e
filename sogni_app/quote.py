"""Price a render request before sending it: `quote(...)` (API) and `sogni quote` (CLI)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import typer

from sogni_protocol.catalog import load_catalog
from sogni_protocol.cli_errors import BadUsage
from sogni_protocol.messages import RenderRequest
from sogni_protocol.pricing import Quote
from sogni_protocol.pricing import quote as _price
from sogni_protocol.stake_benefits import StakeBenefits, discounted

__all__ = ["Quote", "quote", "quote_cmd"]


def quote(
    model: str = "sdxl-base-1.0",
    *,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    images: int = 1,
    network: Literal["fast", "relaxed"] = "fast",
    token_type: Literal["spark", "sogni"] = "spark",
    sogni_usd: float | None = None,
    catalog: Path | str | None = None,
    model_class: str | None = None,
    stake: int = 0,
) -> Quote:
    """Quote `images` renders of `model`; unset steps/size take the model's defaults.

    A model the catalog does not list is refused (ValueError) unless `model_class` names the
    class to price it as (an estimate: a coordinator prices a model it does not list as the
    reference class, SDXL, scaled to the request's size). `stake`: the payer's active stake in
    whole SOGNI, for its tier's discount (the coordinator's default `[staking_benefits]`)."""
    cat = load_catalog(catalog) if catalog is not None else load_catalog()
    if model not in cat.models:
        if model_class is None:
            raise ValueError(
                f"unknown model {model!r}: the catalog lists {', '.join(sorted(cat.models))}; "
                "give --class CLASS to estimate an unlisted model"
            )
        if model_class not in cat.classes:
            raise ValueError(
                f"unknown class {model_class!r}: the catalog has {', '.join(sorted(cat.classes))}"
            )
        base = cat.classes[model_class]
        cat = replace(cat, models={**cat.models, model: replace(base, model_id=model)})
    entry = cat.model(model)
    request = msgspec.convert(
        {
            "type": "renderRequest",
            "modelId": model,
            "positivePrompt": "",
            "steps": steps or entry.default_steps,
            "width": width or entry.default_width,
            "height": height or entry.default_height,
            "numberOfImages": images,
            "network": network,
            "tokenType": token_type,
        },
        RenderRequest,
    )
    rules = StakeBenefits()  # the coordinator's defaults ([staking_benefits])
    return discounted(_price(request, cat, sogni_usd), rules.discount_for(rules.tier(stake)))


def quote_cmd(
    model: Annotated[str, typer.Option("--model", help="Model id.")] = "sdxl-base-1.0",
    steps: Annotated[int | None, typer.Option(help="Steps (default: model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Width (default: model's).")] = None,
    height: Annotated[int | None, typer.Option(help="Height (default: model's).")] = None,
    n: Annotated[int, typer.Option("-n", "--number", help="Number of images.")] = 1,
    network: Annotated[str, typer.Option(help="fast or relaxed (50% off).")] = "fast",
    token_type: Annotated[str, typer.Option(help="spark or sogni.")] = "spark",
    sogni_usd: Annotated[float | None, typer.Option(help="SOGNI price in USD.")] = None,
    model_class: Annotated[
        str | None,
        typer.Option("--class", help="Price a model the catalog does not list as this class."),
    ] = None,
    stake: Annotated[
        int, typer.Option(min=0, help="Your active stake in whole SOGNI (staker discount).")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show what a request would cost in render seconds, Spark, SOGNI and USD."""
    try:
        q = quote(
            model,
            steps=steps,
            width=width,
            height=height,
            images=n,
            network=network,  # type: ignore[arg-type]
            token_type=token_type,  # type: ignore[arg-type]
            sogni_usd=sogni_usd,
            model_class=model_class,
            stake=stake,
        )
    except (msgspec.ValidationError, ValueError) as exc:  # an unknown model, a bad size
        raise BadUsage(str(exc), "see `sogni quote --help` and the catalog's model ids") from None
    if as_json:
        typer.echo(json.dumps(q.to_dict()))
        return
    typer.echo(
        f"{q.images} x {q.model_id} on {q.network}: {q.render_seconds:.2f} render s = "
        f"{q.spark:.6f} Spark = {q.sogni:.6f} SOGNI = ${q.usd:.6f} "
        f"(per image {q.per_image.spark:.6f} Spark)"
    )
