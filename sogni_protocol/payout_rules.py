"""What a job pays and to whom: the `[settlement]` config table and the payout split.

Integer-only and free of I/O on purpose: a node recomputes its own payout from its journal
with this same code and the rules published in each epoch file, so every rounding step must
be identical on both sides. Amounts are SOGNI base units (1 SOGNI = 10**18).

    value   = what the payer paid for the job, in SOGNI base units at the epoch's rate
              (`sogni_protocol.epoch_math`: paid Spark * wei_per_spark + SOGNI, plus free
              Spark scaled to the epoch's emission budget)
    take    = value * take_bps // 10_000                (by the worker's stake tier)
    creator = value * creator_share_bps // 10_000       (model creator, or creator fund)
    worker  = value - take - creator
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, NamedTuple

import msgspec
from msgspec import Meta

from sogni_protocol.messages import Address, ModelId

__all__ = [
    "BPS",
    "SOGNI",
    "WORK_UNITS_PER_SPARK",
    "PayoutRules",
    "SettlementConfig",
    "Split",
]

SOGNI = 10**18
BPS = 10_000
WORK_UNITS_PER_SPARK = 43_200
"""Work units are milli render-seconds; one Spark is 43.2 render seconds."""

LOCAL_FREE_EMISSION_SOGNI = 1_000_000
"""A local network's default free budget per epoch: enough that demos never hit it."""

Bps = Annotated[int, Meta(ge=0, le=BPS)]
WholeSogni = Annotated[int, Meta(ge=0, le=10**12)]


class Split(NamedTuple):
    """One receipt's value and where it goes (the platform keeps ``take``)."""

    value: int
    take: int
    creator_amount: int
    creator: str | None
    """Who receives ``creator_amount``; None: nobody is configured, the platform keeps it."""
    worker: int


class PayoutRules(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """The economic rules one epoch was settled with; published in the epoch file."""

    wei_per_spark: int
    stake_tiers_sogni: list[int]
    take_rates_bps: list[int]
    creator_share_bps: int
    model_creators: dict[str, str] = msgspec.field(default_factory=dict)
    creator_fund: str | None = None
    free_budget_wei: int = 0
    """What this epoch may pay at most for free (Daily Boost) Spark, in base units."""

    def take_bps(self, stake_wei: int | None) -> int:
        """Take rate of the highest tier whose minimum ``stake_wei`` reaches (None: tier 0)."""
        rate = self.take_rates_bps[0]
        if stake_wei is None:
            return rate
        for minimum, bps in zip(self.stake_tiers_sogni, self.take_rates_bps, strict=True):
            if stake_wei >= minimum * SOGNI:
                rate = bps
        return rate

    def creator_of(self, model_id: str) -> str | None:
        return self.model_creators.get(model_id, self.creator_fund)

    def split(self, value: int, model_id: str, take_bps: int) -> Split:
        """Split `value` (base units the payer paid) between platform, creator and worker."""
        take = value * take_bps // BPS
        creator_amount = value * self.creator_share_bps // BPS
        worker = value - take - creator_amount
        if worker < 0:
            raise ValueError(f"take {take_bps} + creator {self.creator_share_bps} bps exceed 100%")
        return Split(value, take, creator_amount, self.creator_of(model_id), worker)


PUBLIC_CONFIRMATIONS = 64
"""Two Ethereum epochs: past finality there, and well past any L2 sequencer's reorgs."""


class SettlementConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The coordinator's `[settlement]` table (env: `SOGNI_COORDINATOR_SETTLEMENT__<KEY>`).

    Stake tiers and take rates are parallel lists (env-friendly: comma-separated): a worker
    whose active stake reaches ``stake_tiers_sogni[i]`` SOGNI pays ``take_rates_bps[i]``.
    """

    epoch_seconds: Annotated[float, Meta(gt=0, le=30 * 86_400)] = 3600.0
    sogni_wei_per_spark: Annotated[int, Meta(ge=1, le=2**63 - 1)] = SOGNI
    """SOGNI base units paid per Spark of work (default: 1 SOGNI, i.e. SOGNI at 0.005 USD)."""
    stake_tiers_sogni: Annotated[list[WholeSogni], Meta(min_length=1, max_length=16)] = (
        msgspec.field(default_factory=lambda: [0, 1_000, 10_000, 100_000])
    )
    take_rates_bps: Annotated[list[Bps], Meta(min_length=1, max_length=16)] = msgspec.field(
        default_factory=lambda: [3000, 2500, 2000, 1500]
    )
    creator_share_bps: Bps = 500
    model_creators: dict[ModelId, Address] = msgspec.field(default_factory=dict)
    """Model id -> creator wallet (TOML only); other models' share goes to `creator_fund`."""
    creator_fund: Address | None = None
    free_emission_sogni: Annotated[int, Meta(ge=0, le=10**12)] | None = None
    """Whole SOGNI an epoch may pay for free (Daily Boost) work, pro rata when the work is worth
    more; default: 0, except on a local network (a dev chain id), where free work is paid."""
    publish_dir: Path | None = None
    """Where epoch and receipts files are written; default: `data_dir/epochs`."""
    confirmations: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    """Blocks behind the chain's head that settlement trusts: stakes (take-rate tiers) are
    read that deep, so a reorganisation cannot change an epoch's snapshot after its close.
    None: 0 on a local network (a dev chain id), else `PUBLIC_CONFIRMATIONS`."""

    def confirmations_on(self, *, local: bool) -> int:
        if self.confirmations is not None:
            return self.confirmations
        return 0 if local else PUBLIC_CONFIRMATIONS

    def __post_init__(self) -> None:
        tiers, rates = self.stake_tiers_sogni, self.take_rates_bps
        if len(tiers) != len(rates):
            raise ValueError("stake_tiers_sogni and take_rates_bps must have the same length")
        if tiers[0] != 0 or any(b <= a for a, b in itertools.pairwise(tiers)):
            raise ValueError("stake_tiers_sogni must start at 0 and strictly increase")
        if any(b > a for a, b in itertools.pairwise(rates)):
            raise ValueError("take_rates_bps must not increase with stake")
        if rates[0] + self.creator_share_bps > BPS:
            raise ValueError("take_rates_bps[0] + creator_share_bps exceed 10000 (100%)")

    def rules(self, *, local: bool = False, wei_per_spark: int | None = None) -> PayoutRules:
        """The rules of the next epoch; `local`: the chain is a dev chain (free work is paid
        unless `free_emission_sogni` says otherwise); `wei_per_spark`: today's rate."""
        budget = self.free_emission_sogni
        if budget is None:
            budget = LOCAL_FREE_EMISSION_SOGNI if local else 0
        return PayoutRules(
            wei_per_spark=self.sogni_wei_per_spark if wei_per_spark is None else wei_per_spark,
            free_budget_wei=budget * SOGNI,
            stake_tiers_sogni=list(self.stake_tiers_sogni),
            take_rates_bps=list(self.take_rates_bps),
            creator_share_bps=self.creator_share_bps,
            model_creators={m: _checksum(a) for m, a in sorted(self.model_creators.items())},
            creator_fund=None if self.creator_fund is None else _checksum(self.creator_fund),
        )


def _checksum(address: str) -> str:
    from eth_utils import to_checksum_address

    return str(to_checksum_address(address))
