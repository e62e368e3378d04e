"""Capability adverts gossiped by nodes on `sogni/capabilities/1`.

The pull handshake is what routing trusts; gossip lets a coordinator see nodes that have
not (yet) connected to it, e.g. for a network view. Each advert is a `NodeHello` frame,
validated before GossipSub relays it: decoded strictly, the binding checked against the
gossip origin, and at most one accepted per node per `min_interval` seconds.

Anyone can make a peer key and a wallet, so what an advert may cost is bounded whoever sends
it: one signature check per origin per `min_interval` (a refused one counts too: a stream of
bad bindings from one origin was checked every time, ~9 ms of the loop each), at most
`checks_per_second` across origins not connected here (a token bucket: past it, their
adverts are dropped unchecked; connected nodes keep their one per interval), and a book of at
most `max_adverts` origins, oldest first out, expired ones pruned (it grew by ~94 KB per
self-signed origin, forever).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from sogni_coordinator.gateway.limits import KeyBuckets
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import Capabilities, NodeHello, decode

log = get_logger(__name__)


@dataclass
class AdvertBook:
    domain: Domain
    min_interval: float = 25.0
    max_adverts: int = 4096
    checks_per_second: float = 20.0
    clock: Callable[[], float] = time.time
    connected: Callable[[str], bool] = lambda _origin: False
    """Is this origin a node connected here through the handshake? Only those skip the
    shared budget (an advert book of self-signed identities could otherwise be filled and
    then checked at 4,096 per 25 s)."""
    adverts: OrderedDict[str, Capabilities] = field(default_factory=OrderedDict)
    _last_seen: OrderedDict[str, float] = field(default_factory=OrderedDict)
    _checks: KeyBuckets = field(init=False)

    def __post_init__(self) -> None:
        per_minute = round(self.checks_per_second * 60)
        self._checks = KeyBuckets(per_minute, round(self.checks_per_second), self.clock)

    def validate(self, origin: str, data: bytes) -> bool:
        """GossipSub validator: accept, record and relay only well-formed, bound, fresh adverts."""
        now = self.clock()
        if now - self._last_seen.get(origin, -1e18) < self.min_interval:
            return False  # spam protection: one advert checked per node per interval
        if not self.connected(origin) and not self._checks.take("all"):
            return False  # the budget of checks is spent for now: a flood of fresh
            # identities never starves the nodes connected here (each limited on its own)
        self._seen(origin, now)
        try:
            msg = decode(data)
        except ProtocolError as exc:
            log.info("advert_rejected", origin=origin, error=str(exc))
            return False
        if not isinstance(msg, NodeHello):
            log.info("advert_rejected", origin=origin, error=f"{type(msg).__name__} on topic")
            return False
        fault = eip712.check_binding(
            self.domain, msg.capabilities, msg.binding_signature, origin, now
        )
        if fault is not None:
            log.info("advert_rejected", origin=origin, error=fault)
            return False
        self.adverts[origin] = msg.capabilities
        self.adverts.move_to_end(origin)
        self._prune(now)
        return True

    def _seen(self, origin: str, now: float) -> None:
        self._last_seen[origin] = now
        self._last_seen.move_to_end(origin)
        while self._last_seen:  # entries older than the interval limit nothing: dropped
            oldest, at = next(iter(self._last_seen.items()))
            if now - at < self.min_interval and len(self._last_seen) <= self.max_adverts:
                break
            del self._last_seen[oldest]

    def _prune(self, now: float) -> None:
        while len(self.adverts) > self.max_adverts:
            self.adverts.popitem(last=False)
        for origin in [o for o, caps in self.adverts.items() if caps.expiry <= now]:
            del self.adverts[origin]  # at most `max_adverts` looked at, `checks_per_second`
