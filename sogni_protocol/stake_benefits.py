"""Benefits for staked artists (whitepaper, "Worker Compensation & Staking"): a payer whose
active stake reaches a tier gets a discount on every quote, its queued jobs are offered
before lower tiers', and at high tiers its relaxed jobs may run on idle fast nodes at the
relaxed price ("free upgrade").

Pure rules, shared by `sogni quote --stake` and the coordinator (`[staking_benefits]`), so
a quote and the charge apply the same discount to the same integers: the discount is taken
per image, rounded down, and the totals stay `images x per_image`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import msgspec
from msgspec import Meta

from sogni_protocol.pricing import Price, Quote

__all__ = ["StakeBenefits", "discounted"]

BPS = 10_000


class StakeBenefits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """`[staking_benefits]`: tier i+1 starts at `tiers_sogni[i]` whole SOGNI of active stake."""

    tiers_sogni: Annotated[list[Annotated[int, Meta(ge=1)]], Meta(max_length=16)] = msgspec.field(
        default_factory=lambda: [1_000, 10_000, 100_000]
    )
    discount_bps: Annotated[list[Annotated[int, Meta(ge=0, le=5_000)]], Meta(max_length=16)] = (
        msgspec.field(default_factory=lambda: [500, 1_000, 2_000])
    )
    """Discount of each tier (5 / 10 / 20 %); tier 0 (below the first threshold) pays full."""
    upgrade_min_tier: Annotated[int, Meta(ge=1)] = 3
    """Lowest tier whose relaxed jobs may run on fast nodes at the relaxed price."""
    upgrade_idle_fraction: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.5
    """Free upgrades only while more than this share of the fast tier's slots is idle."""

    def __post_init__(self) -> None:
        if len(self.tiers_sogni) != len(self.discount_bps):
            raise ValueError("staking_benefits: tiers_sogni and discount_bps differ in length")
        if any(b <= a for a, b in zip(self.tiers_sogni, self.tiers_sogni[1:], strict=False)):
            raise ValueError("staking_benefits: tiers_sogni must increase")

    @property
    def top_tier(self) -> int:
        return len(self.tiers_sogni)

    def tier(self, stake_sogni: int) -> int:
        """0 (no benefit) .. `top_tier`: how many thresholds the stake reaches."""
        return sum(1 for t in self.tiers_sogni if stake_sogni >= t)

    def discount_for(self, tier: int) -> int:
        return 0 if tier <= 0 else self.discount_bps[min(tier, self.top_tier) - 1]

    def upgrades(self, tier: int) -> bool:
        return tier >= self.upgrade_min_tier


def discounted(q: Quote, discount_bps: int) -> Quote:
    """`q` with `discount_bps` off each image's Spark and SOGNI price (rounded down to the
    micro unit; never below 1 micro); work units and render seconds are unchanged."""
    if discount_bps <= 0:
        return q
    keep = BPS - discount_bps
    p = q.per_image
    price = Price(
        p.render_seconds,
        p.work_units,
        max(1, p.spark_micro * keep // BPS),
        max(1, p.sogni_micro * keep // BPS),
    )
    return replace(q, per_image=price)
