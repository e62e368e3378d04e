"""Close epochs on a timer, inside a trio program (the coordinator service, or `epoch watch`).

The close itself is synchronous (SQLite, web3, Merkle hashing) and can take seconds on a big
epoch, so it runs in a worker thread: the trio thread keeps serving nodes meanwhile. A failed
close (a revert, or any other error such as an unreachable chain) is logged and retried at
the next tick; the plan it committed (if any) is kept, so a retry posts the same root.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from sogni_protocol.logs import get_logger

from .epochs import EpochResult, SettlementBusy, SettlementError, Settler

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["run_epoch_timer"]

log = get_logger(__name__)


async def run_epoch_timer(
    settler: Settler,
    every: float,
    on_closed: Callable[[EpochResult], None] | None = None,
    *,
    task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every ``every`` seconds, close an epoch (if there is anything to pay); until cancelled."""
    task_status.started()
    hurry = False
    while True:
        if not hurry:
            await trio.sleep(every)
        hurry = False
        try:
            result = await trio.to_thread.run_sync(settler.close_epoch)
        except SettlementBusy:  # another coordinator of the network is closing: its turn
            log.info("epoch_close_skipped", reason="another coordinator is closing")
            continue
        except SettlementError as exc:
            log.error("epoch_close_failed", error=str(exc))
            continue
        except Exception as exc:  # an RPC hiccup must not take the coordinator down
            log.error("epoch_close_crashed", error=repr(exc), exc_info=True)
            continue
        if result is not None and result.posted:
            hurry = settler.more_waiting  # an epoch filled up: the next one now
            log.info(
                "epoch_closed",
                epoch=result.epoch,
                receipts=result.paid_receipts,
                total=str(result.total),
            )
            if on_closed is not None:
                on_closed(result)
