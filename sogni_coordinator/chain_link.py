"""The running coordinator's link to a shared settlement chain (anvil or a real RPC).

When `chain_url` and `addresses_file` are configured, the service closes epochs on a timer
(`settlement.epoch_seconds`) and reads each node wallet's licence and stake for tier routing
and selection weight. Without them (the embedded chain lives in one process only) epochs are
closed by `sogni-coordinator epoch close` or by the demo launcher.

Every call here blocks (web3 over HTTP): the event loop reaches them only through
`standing.StandingCache` (`standing_cache`), which runs them in worker threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.standing import Standing, StandingCache
from sogni_coordinator.store import Store

if TYPE_CHECKING:
    from sogni_chain import Deployment
    from sogni_coordinator.settlement import Settler

WEI_PER_SOGNI = 10**18
MAX_LOG_BLOCKS = 5_000
"""A wider gap between polls (a long outage) invalidates every wallet instead of asking
the node for that many blocks of logs."""
_STAKE_EVENTS = ("Staked", "UnstakeRequested", "Withdrawn", "Slashed")
_ZERO_ADDRESS = "0x" + "00" * 20


def publish_dir(config: CoordinatorConfig) -> Path:
    """Where epoch and receipts files are published (`settlement.publish_dir`)."""
    publish = config.settlement.publish_dir
    return publish.expanduser() if publish is not None else config.data_dir / "epochs"


@dataclass
class ChainLink:
    deployment: Deployment
    settler: Settler

    def standing(self, wallet: str) -> Standing:
        """Licence and whole-SOGNI stake of a wallet (a blocking call of a few ms on anvil)."""
        licensed = self.deployment.license.has_valid_license(wallet)
        stake = self.deployment.staking.active_stake(wallet) // WEI_PER_SOGNI
        return Standing(licensed, int(stake))

    def standing_changes(self) -> Callable[[], set[str] | None]:
        """A feed of wallets whose standing changed since its previous call, from staking
        and licence events (None: a blacklisting or a gap too wide, any may have)."""
        w3 = self.deployment.chain.w3
        staking = self.deployment.staking.contract
        licence = self.deployment.license.contract
        # From now on: a change between this call and the first poll must not be missed
        # (standings read before now are fresh reads).
        cursor: int | None = int(w3.eth.block_number) + 1

        def poll() -> set[str] | None:
            nonlocal cursor
            head = int(w3.eth.block_number)
            if cursor is None or head - cursor >= MAX_LOG_BLOCKS:
                first, cursor = cursor is None, head + 1
                return set() if first else None
            if head < cursor:
                return set()
            span = {"from_block": cursor, "to_block": head}
            changed: set[str] = set()
            for name in _STAKE_EVENTS:
                for entry in staking.events[name]().get_logs(**span):
                    changed.add(str(entry["args"]["account"]).lower())
            for entry in licence.events.Transfer().get_logs(**span):
                changed.update(str(entry["args"][k]).lower() for k in ("from", "to"))
            blacklisted = licence.events.Blacklisted().get_logs(**span)
            cursor = head + 1
            changed.discard(_ZERO_ADDRESS)  # a mint's `from`, a burn's `to`
            return None if blacklisted else changed

        return poll

    def standing_cache(self, **kw: Any) -> StandingCache:
        """What routing and billing read (never blocking); its `run` polls the events."""
        return StandingCache(self.standing, changes=self.standing_changes(), **kw)


def connect_chain(config: CoordinatorConfig, private_key: bytes, store: Store) -> ChainLink | None:
    if config.chain_url is None or config.addresses_file is None:
        return None
    from sogni_chain import Addresses, Deployment, connect
    from sogni_coordinator.network_params import network_params_for
    from sogni_coordinator.settlement import Settler
    from sogni_coordinator.settlement.keys import settlement_sender
    from sogni_coordinator.settlement.rules import payout_rules

    chain = connect(config.chain_url, keys=[])  # its own keys only: never anvil's dev keys
    addresses = Addresses.load(config.addresses_file, chain_id=chain.chain_id)
    offer_address = chain.add_key(private_key).address  # the wrappers' default sender
    deployment = Deployment(chain, addresses)
    sender = settlement_sender(config, chain, offer_address, lambda: private_key)
    settler = Settler(
        store,
        deployment,
        sender=sender,
        rules=payout_rules(config),
        publish_dir=publish_dir(config),
        network_id=config.network_id,
        dispute_window=config.verification.dispute_window,
        params=network_params_for(chain, config.addresses_file),
        confirmations=config.settlement.confirmations_on(local=config.local),
    )
    return ChainLink(deployment, settler)
