"""The last message of a one-shot client stream (report, referral): send it, then close.

A client that left early is normal, not an error; the close is shielded and bounded so a
cancelled or stuck peer cannot hold the handler open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from sogni_net import Channel, TransportError

if TYPE_CHECKING:
    import structlog

    from sogni_protocol.messages import Message

__all__ = ["send_final_reply"]


async def send_final_reply(
    channel: Channel, reply: Message, log: structlog.stdlib.BoundLogger
) -> None:
    """Send ``reply`` on ``channel`` and close it; a vanished client is logged on ``log``
    (the caller's, so the event keeps its module's name)."""
    try:
        await channel.send(reply)
    except TransportError as exc:
        log.info("client_gone", error=type(exc).__name__)
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await channel.close()
