"""Requests sent to a node on its jobs stream, each waiting for the node's reply.

Why one module: challenges (`challenges`) and step re-checks (`verifiers`) both send a message
on a node's outbox and wait, with a deadline, for the reply that names the same key; a node
that leaves fails its open requests at once rather than at their deadlines. Runs on the
dispatcher's trio thread, like everything it touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import trio

from sogni_protocol.logs import get_logger
from sogni_protocol.messages import Message

__all__ = ["PendingReplies"]

log = get_logger(__name__)


class _Refusal(Protocol):
    @property
    def reason(self) -> str: ...


Answer = TypeVar("Answer")
Refusal = TypeVar("Refusal", bound=_Refusal)


@dataclass(eq=False)
class _Waiting(Generic[Answer, Refusal]):
    done: trio.Event = field(default_factory=trio.Event)
    reply: Answer | Refusal | None = None
    gone: str | None = None


class PendingReplies(Generic[Answer, Refusal]):
    """Waiting requests keyed by (peer id, key). `who` names the node in the reasons
    ("node", "verifier"); `exclusive`: a second request for a waiting key is refused."""

    def __init__(
        self,
        answer: type[Answer] | tuple[type[Any], ...],
        refusal: type[Refusal],
        who: str,
        *,
        exclusive: bool,
    ) -> None:
        self._answer = answer
        self._refusal = refusal
        self._who = who
        self._exclusive = exclusive
        self._waiting: dict[tuple[str, bytes], _Waiting[Answer, Refusal]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def open_to(self, peer_id: str) -> int:
        """Requests waiting for `peer_id`'s answer."""
        return sum(1 for peer, _key in self._waiting if peer == peer_id)

    async def ask(
        self,
        peer_id: str,
        key: bytes,
        outbox: trio.MemorySendChannel[Message],
        message: Message,
        timeout: float,
    ) -> Answer | str:
        """Queue `message` on the node's stream and wait at most `timeout` seconds: the
        node's answer, or why there is none (a refusal as its reason)."""
        reply = await self.ask_reply(peer_id, key, outbox, message, timeout)
        if isinstance(reply, self._refusal):
            return f"{self._who} refused: {reply.reason}"
        return reply  # type: ignore[return-value]

    async def ask_reply(
        self,
        peer_id: str,
        key: bytes,
        outbox: trio.MemorySendChannel[Message],
        message: Message,
        timeout: float,
    ) -> Answer | Refusal | str:
        """As `ask`, but a refusal comes back as itself, for a caller that acts on its
        fields (a verifier's refusal `code`), not only its reason."""
        slot = (peer_id, key)
        if self._exclusive and slot in self._waiting:
            return f"a request for this job is still open at the {self._who}"
        waiting: _Waiting[Answer, Refusal] = _Waiting()
        self._waiting[slot] = waiting
        try:
            try:
                outbox.send_nowait(message)
            except trio.WouldBlock:
                return f"the {self._who}'s outbox is full"
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return f"the {self._who} is gone"
            with trio.move_on_after(timeout):
                await waiting.done.wait()
        finally:
            if self._waiting.get(slot) is waiting:
                del self._waiting[slot]
        reply = waiting.reply
        if isinstance(reply, self._answer):
            return reply  # type: ignore[return-value]
        if isinstance(reply, self._refusal):
            return reply
        if waiting.gone is not None:
            return f"{self._who} left: {waiting.gone}"
        return f"no answer within {timeout:g} s"

    def answered(self, peer_id: str, key: bytes, reply: Answer | Refusal) -> bool:
        """A node's reply; False (and ignored) if no request of this node waits for it."""
        waiting = self._waiting.get((peer_id, key))
        if waiting is None or waiting.done.is_set():
            log.warning("unasked_reply", peer=peer_id, who=self._who)
            return False
        waiting.reply = reply
        waiting.done.set()
        return True

    def node_left(self, peer_id: str, reason: str) -> None:
        """The node's stream ended: its open requests fail now, not at their deadlines."""
        for (peer, _), waiting in self._waiting.items():
            if peer == peer_id and not waiting.done.is_set():
                waiting.gone = reason
                waiting.done.set()
