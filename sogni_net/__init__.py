"""Peer-to-peer transport: the only package in the code base that imports libp2p.

Everything else sees `open_host`, `Host`, `Channel` (frames of typed messages with deadlines)
and the `TransportError` family, so the libp2p implementation can change behind it. The
daemons' HTTP listener (`serve_http`, hypercorn on trio) lives here too; it imports its
libraries (the `http` extra) only when it starts.

The libp2p parts load on first use (PEP 562): configs validate `http_listen` with
`sogni_net.http.parse_listen`, and loading a config must not import libp2p, which costs half a
second and detaches its loggers from the application's handlers until a host starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sogni_net.errors import (
    AddressError,
    ChannelClosed,
    DialError,
    ListenError,
    ReadTimeout,
    TransportError,
    WriteTimeout,
)
from sogni_net.http import health_endpoint, parse_listen, require_http_extra, serve_http

if TYPE_CHECKING:
    from sogni_net.admission import InboundLimits
    from sogni_net.channel import Channel
    from sogni_net.host import (
        GOSSIP_MESSAGE_LIMIT,
        Handler,
        Host,
        TopicValidator,
        open_host,
        peer_info,
    )
    from sogni_net.keys import NodeKey, load_or_create_node_key

_LAZY = {
    "Channel": "sogni_net.channel",
    "GOSSIP_MESSAGE_LIMIT": "sogni_net.host",
    "Handler": "sogni_net.host",
    "Host": "sogni_net.host",
    "InboundLimits": "sogni_net.admission",
    "TopicValidator": "sogni_net.host",
    "open_host": "sogni_net.host",
    "peer_info": "sogni_net.host",
    "NodeKey": "sogni_net.keys",
    "load_or_create_node_key": "sogni_net.keys",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sogni_net' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "GOSSIP_MESSAGE_LIMIT",
    "AddressError",
    "Channel",
    "ChannelClosed",
    "DialError",
    "Handler",
    "Host",
    "InboundLimits",
    "ListenError",
    "NodeKey",
    "ReadTimeout",
    "TopicValidator",
    "TransportError",
    "WriteTimeout",
    "health_endpoint",
    "load_or_create_node_key",
    "open_host",
    "parse_listen",
    "peer_info",
    "require_http_extra",
    "serve_http",
]
