"""A running coordinator's view of the operator's blocks (`reports.Reports`).

Why a poll: blocks are written by `sogni-coordinator reports resolve|block|unblock`, another
process; re-reading one small table every `BLOCK_POLL_SECONDS` is simpler and sturdier than
signalling the coordinator, and a block takes effect within that time.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import trio

from sogni_coordinator.db import DatabaseBusy
from sogni_coordinator.reports import BLOCK_POLL_SECONDS, NODE_BLOCKED, Reports
from sogni_protocol.logs import get_logger

if TYPE_CHECKING:
    from sogni_coordinator.dispatch import Dispatcher

log = get_logger(__name__)

__all__ = ["apply_blocks", "watch"]


def apply_blocks(reports: Reports, dispatcher: Dispatcher) -> int:
    """Hand the blocks to the dispatcher and router; drop connected nodes now blocked (they
    are told why with `Goodbye`). Returns how many nodes were dropped."""
    payers, nodes = reports.blocked_payers, reports.blocked_nodes
    dispatcher.blocked_payers = payers
    dispatcher.router.blocked_nodes = nodes
    dropped = 0
    for link in list(dispatcher.nodes.values()):
        if link.wallet.lower() in nodes:
            link.removed_reason = NODE_BLOCKED
            log.warning("node_blocked", peer=link.peer_id, wallet=link.wallet)
            dispatcher.node_left(link, NODE_BLOCKED)
            dropped += 1
    return dropped


async def watch(
    reports: Reports, dispatcher: Dispatcher, interval: float = BLOCK_POLL_SECONDS
) -> None:
    """Keep the running coordinator's blocks in step with the database (the CLI writes it).
    A round the database fails (away, locked) changes nothing: the last blocks stand, and the
    coordinator serves on (an outage of the shared database stopped every coordinator)."""
    while True:
        try:
            await trio.to_thread.run_sync(reports.refresh)
        except (sqlite3.Error, DatabaseBusy) as exc:
            log.warning("blocks_not_read", error=type(exc).__name__)
        else:
            apply_blocks(reports, dispatcher)
        await trio.sleep(interval)
