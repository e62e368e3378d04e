"""The running coordinator's link to a shared settlement chain (anvil or a real RPC).

When `chain_url` and `addresses_file` are configured, the service closes epochs on a timer
(`settlement.epoch_seconds`) and reads each node wallet's licence and stake for tier routing
and selection weight. Without them (the embedded chain lives in one process only) epochs are
closed by `sogni-coordinator epoch close` or by the demo launcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.standing import Standing
from sogni_coordinator.store import Store

if TYPE_CHECKING:
    from sogni_chain import Deployment
    from sogni_coordinator.settlement import Settler

WEI_PER_SOGNI = 10**18


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


def connect_chain(config: CoordinatorConfig, private_key: bytes, store: Store) -> ChainLink | None:
    if config.chain_url is None or config.addresses_file is None:
        return None
    from sogni_chain import Addresses, Deployment, connect
    from sogni_coordinator.settlement import Settler

    chain = connect(config.chain_url)
    addresses = Addresses.load(config.addresses_file, chain_id=chain.chain_id)
    deployment = Deployment(chain, addresses)
    sender = chain.add_key(private_key)
    settler = Settler(
        store,
        deployment,
        sender=sender,
        rules=config.settlement.rules(),
        publish_dir=publish_dir(config),
    )
    return ChainLink(deployment, settler)
