"""Pricing: render seconds, work units, and quotes in Spark, SOGNI and USD.

Whitepaper, "Calculating the cost for inference task" (formulas in docs/ECONOMICS.md):

    render_seconds = baseline(model class) * step_factor(steps) * pixel_factor(pixels)
    spark          = render_seconds / 43.2            (x 0.5 on the relaxed tier)
    usd            = spark * 0.005
    sogni          = usd / sogni_usd_price

The factors are measured (`bench/pricing_scaling.py` -> `configs/pricing_factors.toml`) and
are exactly 1 at a model's defaults, so a baseline SDXL job is 43.2 render s = 1 Spark.
Money is integer: micro-Spark and micro-SOGNI (1e-6), derived from integer work units.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from sogni_protocol.catalog import CONFIGS, Catalog, default_catalog
from sogni_protocol.messages import RenderRequest

BASELINE_RENDER_SECONDS = 43.2
"""`costPerBaseHQRenderInSec`: one baseline HQ render (SDXL, 1024x1024, 20 steps)."""
BASELINE_USD = Fraction("0.005")
"""`costPerBaseHQRenderInUSD`: the price of one baseline render, i.e. of 1 Spark."""
BASELINE_STEPS = 20
BASELINE_PIXELS = 1024 * 1024
WORK_UNITS_PER_SPARK = 43_200
"""Work units are milli render-seconds; 1 Spark = 43.2 render s = 43,200 work units."""
MICRO = 1_000_000
"""Ledger units per Spark and per SOGNI."""
FACTORS_FILE = CONFIGS / "pricing_factors.toml"


class _Params(Protocol):
    model_id: str
    steps: int
    width: int
    height: int


@dataclass(frozen=True)
class ScalingFactors:
    """Measured scaling: fixed cost in steps, and the pixel-count exponent."""

    overhead_steps: float = 0.0
    pixel_exponent: float = 1.0

    def step_factor(self, steps: int, default_steps: int) -> float:
        return (steps + self.overhead_steps) / (default_steps + self.overhead_steps)

    def pixel_factor(self, pixels: int, default_pixels: int) -> float:
        return float((pixels / default_pixels) ** self.pixel_exponent)


def load_factors(path: Path | str | None = None) -> ScalingFactors:
    """Read `pricing_factors.toml`; without the file, scale linearly (no overhead)."""
    chosen = Path(path) if path is not None else FACTORS_FILE
    if path is None and not chosen.exists():
        return ScalingFactors()
    with chosen.open("rb") as f:
        data = tomllib.load(f)
    return ScalingFactors(
        overhead_steps=float(data["steps"]["overhead_steps"]),
        pixel_exponent=float(data["pixels"]["exponent"]),
    )


@lru_cache(maxsize=1)
def default_factors() -> ScalingFactors:
    return load_factors()


def job_render_seconds(
    model_id: str,
    steps: int,
    width: int,
    height: int,
    catalog: Catalog | None = None,
    factors: ScalingFactors | None = None,
) -> float:
    """Render seconds of one image: the model's baseline scaled by steps and pixels."""
    entry = (catalog or default_catalog()).model(model_id)
    f = factors or default_factors()
    if steps == entry.default_steps and width * height == entry.default_pixels:
        return entry.baseline_render_seconds  # exact at the defaults
    return (
        entry.baseline_render_seconds
        * f.step_factor(steps, entry.default_steps)
        * f.pixel_factor(width * height, entry.default_pixels)
    )


def render_seconds(params: _Params) -> float:
    """Render seconds of one image (`JobParams` or `RenderRequest`), default catalog."""
    return job_render_seconds(params.model_id, params.steps, params.width, params.height)


def work_units(params: _Params) -> int:
    """Integer milli render-seconds: what receipts carry and settlement adds up."""
    return max(1, round(render_seconds(params) * 1000))


def _round(x: Fraction) -> int:
    """Round half up to an integer (prices are never negative)."""
    return int((x * 2 + 1) // 2)


def tier_factor(network: str, catalog: Catalog | None = None) -> Fraction:
    """Price multiplier of a tier: 1 on fast, `relaxed_price_factor` (0.5) on relaxed."""
    if network == "fast":
        return Fraction(1)
    if network == "relaxed":
        return Fraction(str((catalog or default_catalog()).relaxed_price_factor))
    raise ValueError(f"unknown network {network!r}; expected fast or relaxed")


def price_factor_bps(network: str, catalog: Catalog | None = None) -> int:
    """`tier_factor` in basis points, as signed into offers and receipts (`priceFactorBps`)."""
    if network == "fast":  # factor 1, whatever the catalog: no Fraction arithmetic per offer
        return 10_000
    return int(tier_factor(network, catalog) * 10_000)


def spark_micro(units: int, network: str = "fast", catalog: Catalog | None = None) -> int:
    """Price in micro-Spark of `units` work units on `network`."""
    return _round(Fraction(units * MICRO, WORK_UNITS_PER_SPARK) * tier_factor(network, catalog))


def sogni_micro(spark_micro_amount: int, sogni_usd: float) -> int:
    """Micro-SOGNI worth `spark_micro_amount` at `sogni_usd` USD per SOGNI."""
    if sogni_usd <= 0:
        raise ValueError("sogni_usd must be positive")
    return _round(spark_micro_amount * BASELINE_USD / Fraction(str(sogni_usd)))


class _InUnits:
    """Spark, SOGNI and USD views of amounts kept in integer micro units."""

    if TYPE_CHECKING:  # fields in `Price`, computed in `Quote`

        @property
        def spark_micro(self) -> int: ...

        @property
        def sogni_micro(self) -> int: ...

    @property
    def spark(self) -> float:
        return self.spark_micro / MICRO

    @property
    def sogni(self) -> float:
        return self.sogni_micro / MICRO

    @property
    def usd(self) -> float:
        return float(self.spark_micro * BASELINE_USD / MICRO)


@dataclass(frozen=True)
class Price(_InUnits):
    """One image's (or a whole request's) cost."""

    render_seconds: float
    work_units: int
    spark_micro: int
    sogni_micro: int


@dataclass(frozen=True)
class Quote(_InUnits):
    """What a request costs. `render_seconds` is work (tier-independent); prices are per tier.

    The totals are exactly `images` x `per_image`, so per-receipt settlement adds up.
    """

    model_id: str
    images: int
    network: str
    token_type: Literal["spark", "sogni"]
    sogni_usd_price: float
    per_image: Price

    @property
    def render_seconds(self) -> float:
        return self.per_image.render_seconds * self.images

    @property
    def work_units(self) -> int:
        return self.per_image.work_units * self.images

    @property
    def spark_micro(self) -> int:
        return self.per_image.spark_micro * self.images

    @property
    def sogni_micro(self) -> int:
        return self.per_image.sogni_micro * self.images

    @property
    def amount_micro(self) -> int:
        """Total in the unit the request pays with (`token_type`)."""
        return self.spark_micro if self.token_type == "spark" else self.sogni_micro

    def to_dict(self) -> dict[str, object]:
        return {
            "modelId": self.model_id,
            "images": self.images,
            "network": self.network,
            "tokenType": self.token_type,
            "renderSeconds": round(self.render_seconds, 4),
            "workUnits": self.work_units,
            "spark": self.spark,
            "sogni": self.sogni,
            "usd": round(self.usd, 8),
            "sogniUsdPrice": self.sogni_usd_price,
            "perImage": {
                "renderSeconds": round(self.per_image.render_seconds, 4),
                "workUnits": self.per_image.work_units,
                "spark": self.per_image.spark,
                "sogni": self.per_image.sogni,
                "usd": round(self.per_image.usd, 8),
            },
        }


def quote(
    request: RenderRequest,
    catalog: Catalog | None = None,
    sogni_usd: float | None = None,
    factors: ScalingFactors | None = None,
) -> Quote:
    """Price a `RenderRequest`; `sogni_usd` defaults to the catalog's `sogni_usd_price`."""
    cat = catalog or default_catalog()
    price = sogni_usd if sogni_usd is not None else cat.sogni_usd_price
    seconds = job_render_seconds(
        request.model_id, request.steps, request.width, request.height, cat, factors
    )
    units = max(1, round(seconds * 1000))
    spark = spark_micro(units, request.network, cat)
    per_image = Price(seconds, units, spark, sogni_micro(spark, price))
    return Quote(
        request.model_id,
        request.number_of_images,
        request.network,
        request.token_type,
        price,
        per_image,
    )
