"""Governed economic parameters, read from chain at each epoch close.

Why one place: the take rates and the free-emission budget a coordinator settles with, and the
verification rate it checks with, come from its config until stakers vote otherwise; after a
proposal executes, NetworkParameters holds the new value and every coordinator picks it up at
its next epoch close (never mid-epoch: an epoch is settled with one set of rules, published in
its epoch file). A parameter governance never set, a chain that cannot be read, or a value
that does not fit this coordinator's config (a take-rate list for another number of tiers)
leaves the config value in force, with a log line saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from sogni_chain import Chain, ChainRevert
from sogni_chain.governance import (
    GovernanceAddresses,
    NetworkParameters,
    ParameterSnapshot,
    governance_path,
)
from sogni_protocol.logs import get_logger
from sogni_protocol.payout_rules import BPS, SOGNI, PayoutRules
from sogni_protocol.settings import READ_ONLY_SENDER

__all__ = ["NetworkParamsReader", "network_params_for"]

log = get_logger(__name__)


class NetworkParamsReader:
    """Folds the governed parameters over a coordinator's configured ones."""

    def __init__(self, parameters: NetworkParameters) -> None:
        self.parameters = parameters
        self._seen_version: int | None = None
        self._last: ParameterSnapshot | None = None
        self._followers: list[Callable[[], None]] = []

    def read(self) -> ParameterSnapshot | None:
        """The chain's parameters now; None (logged) when the chain cannot be read."""
        try:
            snap = self.parameters.snapshot()
        except (ChainRevert, OSError, ValueError) as exc:
            log.warning("network_params_unreadable", error=str(exc).splitlines()[0][:200])
            return self._last
        if snap.version != self._seen_version:
            log.info(
                "network_params_read",
                version=snap.version,
                take_rates_bps=snap.take_rates_bps,
                emission_budget_sogni=snap.emission_budget_sogni,
                verification_rate_bps=snap.verification_rate_bps,
            )
            self._seen_version = snap.version
            self._last = snap
            for follower in self._followers:
                follower()
        self._last = snap
        return snap

    def rules_for_epoch(self, rules: PayoutRules) -> PayoutRules:
        """``rules`` with the governed take rates and emission budget, where set and valid."""
        snap = self.read()
        if snap is None:
            return rules
        new = rules
        rates = snap.take_rates_bps
        if rates is not None and rates != list(rules.take_rates_bps):
            if len(rates) != len(rules.stake_tiers_sogni):
                log.warning(
                    "network_params_take_rates_ignored",
                    reason=f"{len(rates)} rates for {len(rules.stake_tiers_sogni)} stake tiers",
                )
            elif max(rates) + rules.creator_share_bps > BPS:
                log.warning(
                    "network_params_take_rates_ignored",
                    reason="take + creator share exceed 100%",
                )
            else:
                new = msgspec.structs.replace(new, take_rates_bps=list(rates))
        if snap.emission_budget_sogni is not None:
            new = msgspec.structs.replace(new, free_budget_wei=snap.emission_budget_sogni * SOGNI)
        if new != rules:
            log.info(
                "network_params_applied",
                version=snap.version,
                take_rates_bps=f"{list(rules.take_rates_bps)} -> {list(new.take_rates_bps)}",
                free_budget_wei=f"{rules.free_budget_wei} -> {new.free_budget_wei}",
            )
        return new

    def verification_rate(self, configured: float) -> float:
        """The governed verification rate (a fraction), else ``configured``. Uses the last
        read (at epoch close), so the rate, too, changes only from one epoch to the next."""
        snap = self._last
        if snap is None or snap.verification_rate_bps is None:
            return configured
        return snap.verification_rate_bps / BPS

    def follow_verification(self, checks: Any) -> None:
        """Keep ``checks.policy.rate`` (a dispatcher's `Checks`) at the governed verification
        rate from now on, changed at each epoch close where governance changed it; the
        configured rate stays where governance never set one."""
        configured = float(checks.policy.rate)

        def apply() -> None:
            rate = self.verification_rate(configured)
            if rate != checks.policy.rate:
                log.info("verification_rate_applied", old=checks.policy.rate, new=rate)
                checks.policy = msgspec.structs.replace(checks.policy, rate=rate)

        self._followers.append(apply)
        if self.read() is not None:
            apply()


def network_params_for(chain: Chain, addresses_file: str | Path) -> NetworkParamsReader | None:
    """A reader when governance is deployed next to ``addresses_file``; else None (config only)."""
    path = governance_path(addresses_file)
    if not path.is_file():
        return None
    try:
        gov = GovernanceAddresses.load(path, chain_id=chain.chain_id)
    except ValueError as exc:
        log.warning("network_params_unavailable", error=str(exc))
        return None
    return NetworkParamsReader(NetworkParameters(chain, gov.parameters, READ_ONLY_SENDER))
