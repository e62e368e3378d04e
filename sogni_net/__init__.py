"""Peer-to-peer transport: the only package in the code base that imports libp2p.

Everything else sees `open_host`, `Host`, `Channel` (frames of typed messages with deadlines)
and the `TransportError` family, so the libp2p implementation can change behind it.
"""

from sogni_net.channel import Channel
from sogni_net.errors import ChannelClosed, DialError, ReadTimeout, TransportError, WriteTimeout
from sogni_net.host import GOSSIP_MESSAGE_LIMIT, Handler, Host, TopicValidator, open_host
from sogni_net.keys import NodeKey, load_or_create_node_key

__all__ = [
    "GOSSIP_MESSAGE_LIMIT",
    "Channel",
    "ChannelClosed",
    "DialError",
    "Handler",
    "Host",
    "NodeKey",
    "ReadTimeout",
    "TopicValidator",
    "TransportError",
    "WriteTimeout",
    "load_or_create_node_key",
    "open_host",
]
