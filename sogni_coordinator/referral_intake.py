"""Referral codes on the client protocol: one signed `ReferralQuery` on a client stream is
answered with the payer's code (and, when it names a code, after recording the referral) or
`RequestRefused`, then the stream closes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio

from sogni_coordinator.final_reply import send_final_reply
from sogni_coordinator.ledger import ReferralRefused
from sogni_coordinator.referrals import codes_beside
from sogni_net import Channel
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import ReferralQuery, ReferralReport, RequestRefused
from sogni_protocol.referral_signing import check_referral_query

if TYPE_CHECKING:
    from sogni_coordinator.dispatch import Dispatcher

__all__ = ["answer_referral", "serve_referral"]

log = get_logger(__name__)


def answer_referral(
    dispatcher: Dispatcher, q: ReferralQuery, peer_id: str, now: float
) -> ReferralReport | RequestRefused:
    """Blocking (SQLite): the reply to one query."""
    fault = check_referral_query(dispatcher.domain, q, peer_id, now)
    if fault is not None:
        return RequestRefused(code="unauthorized", reason=fault)
    billing = dispatcher.billing
    if billing is None:
        return RequestRefused(
            code="billing_off", reason="billing is off on this coordinator: no referrals"
        )
    codes = codes_beside(billing.ledger)
    # off a local network only a customer's code refers anyone (as for the Daily Boost)
    try:
        if q.code:
            codes.use(billing.ledger, q.payer, q.code, eligible=billing.referrer_rule)
        return ReferralReport(
            payer=q.payer,
            code=codes.code_for(q.payer),
            referred_by=codes.referrer_of(billing.ledger, q.payer),
        )
    except ReferralRefused as exc:
        return RequestRefused(code="referral_refused", reason=str(exc))


async def serve_referral(channel: Channel, dispatcher: Dispatcher, q: ReferralQuery) -> None:
    reply = await trio.to_thread.run_sync(
        answer_referral, dispatcher, q, channel.remote_peer_id, time.time()
    )
    if isinstance(reply, RequestRefused):
        log.info("referral_refused", code=reply.code)
    await send_final_reply(channel, reply, log)
