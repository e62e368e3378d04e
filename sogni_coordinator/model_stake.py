"""Stake on models, for their place in model lists (the gateway's models list, the status
page): models with more SOGNI staked on them (ModelStake.sol) come first, then the rest in
their usual order.

Totals come from the contract's events (each carries the model's new total), read
incrementally off the event loop every `poll_seconds`; lists are ordered from memory, so a
list request never waits for the chain. A chain that does not answer leaves the last totals.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from sogni_chain.model_stake import ModelStake, model_key
from sogni_protocol.logs import get_logger

__all__ = ["ModelStakeBoard", "by_stake"]

log = get_logger(__name__)


class ModelStakeBoard:
    def __init__(
        self, contract: ModelStake | None, *, first_block: int = 0, poll_seconds: float = 60.0
    ) -> None:
        self.contract = contract
        self.poll_seconds = poll_seconds
        self._cursor = first_block
        self._totals: dict[bytes, int] = {}

    def refresh(self) -> None:
        """Read events since the last read (blocking web3)."""
        if self.contract is None:
            return
        head = int(self.contract.chain.w3.eth.block_number)
        if head < self._cursor:
            return
        self._totals.update(self.contract.totals_since(self._cursor, head))
        self._cursor = head + 1

    def stake_of(self, model: str) -> int:
        """Wei staked on `model` as last read."""
        return self._totals.get(model_key(model), 0)

    def order(self, models: Iterable[str]) -> list[str]:
        """`models` by stake, most first; equal stakes keep their given order."""
        given = list(models)
        return sorted(given, key=lambda m: -self.stake_of(m))

    async def run(self) -> None:
        """Refresh every `poll_seconds` until cancelled; failures are logged, never raised."""
        while True:
            try:
                await trio.to_thread.run_sync(self.refresh)
            except Exception as exc:  # web3 raises many kinds; lists go on with old totals
                log.warning("model_stake_unavailable", error=f"{type(exc).__name__}"[:100])
            await trio.sleep(self.poll_seconds)


def by_stake(board: ModelStakeBoard | None, names: Iterable[str]) -> list[str]:
    """`names` ordered by stake when a board is wired (else as given)."""
    given = list(names)
    return given if board is None else board.order(given)
