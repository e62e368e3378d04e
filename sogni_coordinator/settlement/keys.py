"""Which key posts epoch roots: the settlement key, kept apart from the online offer key.

The offer-signing key lives on the coordinator host and signs every job; if it could also post
roots, whoever stole it could pay themselves. So on any chain that is not a local network the
settlement key must be another key (`settlement_keystore`, granted SETTLEMENT_ROLE), and it
may stay offline: without its password in the environment the coordinator only plans epochs
and writes each `postRoot` unsigned, for `sogni-coordinator epoch sign` on the offline
machine and `epoch submit` back online. On a local network the coordinator key settles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from sogni_protocol.cli_errors import Refused
from sogni_wallet.keystore import keystore_address, unlock_wallet

if TYPE_CHECKING:
    from sogni_chain import Chain, Signer
    from sogni_coordinator.config import CoordinatorConfig

__all__ = ["settlement_sender"]

_HINT = "sogni-coordinator keys create --settlement"


def settlement_sender(
    cfg: CoordinatorConfig, chain: Chain, offer_address: str, offer_key: Callable[[], bytes]
) -> Signer:
    """The `Settler`'s sender: a signing account, or only the address of an offline key.
    `offer_key` unlocks the offer-signing key (used on a local network only)."""
    if cfg.settlement_keystore is None:
        if not cfg.local:
            raise Refused(
                f"chain {cfg.chain_id} is not a local network, so the offer-signing key may not "
                "also post epoch roots",
                "set settlement_keystore to a separate key holding SETTLEMENT_ROLE (it may stay "
                "offline); see docs/SETTLEMENT.md",
            )
        return chain.add_key(offer_key())
    address = keystore_address(cfg.settlement_keystore, create_hint=_HINT)
    if address.lower() == offer_address.lower() and not cfg.local:
        raise Refused(
            f"settlement_keystore holds the offer-signing key {address}",
            "use a separate key for settlement",
        )
    if cfg.settlement_password_env not in os.environ:
        return address  # offline: roots are written unsigned for it
    wallet = unlock_wallet(cfg.settlement_keystore, cfg.settlement_password_env, create_hint=_HINT)
    return chain.add_key(wallet.private_key)
