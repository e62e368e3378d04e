"""The gateway's side of referral codes: the account's code in `/v1/account/me`, and
applying a code (`POST /v1/account/referral`). Not in the official SDK protocol (it has no
referral field): `referralCode` and `referredBy` are extra fields the SDKs ignore."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import trio

from sogni_coordinator.ledger import ReferralRefused
from sogni_coordinator.referrals import codes_beside

if TYPE_CHECKING:
    from sogni_coordinator.gateway.core import Gateway

__all__ = ["account_referral", "apply_referral"]


async def account_referral(gateway: Gateway, account: str) -> dict[str, Any]:
    """`{referralCode, referredBy}` of `account` (nothing when billing is off)."""
    billing = gateway.dispatcher.billing
    if billing is None:
        return {}
    codes = codes_beside(billing.ledger)
    code = await trio.to_thread.run_sync(codes.code_for, account)
    by = await trio.to_thread.run_sync(codes.referrer_of, billing.ledger, account)
    return {"referralCode": code, "referredBy": by}


async def apply_referral(gateway: Gateway, account: str, code: str) -> str | None:
    """None when recorded, else the one-line reason it was refused."""
    billing = gateway.dispatcher.billing
    if billing is None:
        return "referrals are off on this coordinator (no billing)"
    codes = codes_beside(billing.ledger)
    try:
        # off a local network only a customer's code refers anyone (as over libp2p)
        use = functools.partial(codes.use, eligible=billing.referrer_rule)
        await trio.to_thread.run_sync(use, billing.ledger, account, code)
    except ReferralRefused as exc:
        return str(exc)
    return None
