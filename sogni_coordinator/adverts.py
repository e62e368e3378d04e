"""Capability adverts gossiped by nodes on `sogni/capabilities/1`.

The pull handshake is what routing trusts; gossip lets a coordinator see nodes that have
not (yet) connected to it, e.g. for a network view. Each advert is a `NodeHello` frame,
validated before GossipSub relays it: decoded strictly, the binding checked against the
gossip origin, and at most one accepted per node per `min_interval` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    adverts: dict[str, Capabilities] = field(default_factory=dict)
    _last_seen: dict[str, float] = field(default_factory=dict)

    def validate(self, origin: str, data: bytes) -> bool:
        """GossipSub validator: accept, record and relay only well-formed, bound, fresh adverts."""
        try:
            msg = decode(data)
        except ProtocolError as exc:
            log.info("advert_rejected", origin=origin, error=str(exc))
            return False
        if not isinstance(msg, NodeHello):
            log.info("advert_rejected", origin=origin, error=f"{type(msg).__name__} on topic")
            return False
        now = time.time()
        if now - self._last_seen.get(origin, -1e18) < self.min_interval:
            return False  # spam protection: one advert per node per interval
        fault = eip712.check_binding(
            self.domain, msg.capabilities, msg.binding_signature, origin, now
        )
        if fault is not None:
            log.info("advert_rejected", origin=origin, error=fault)
            return False
        self._last_seen[origin] = now
        self.adverts[origin] = msg.capabilities
        return True
