"""Transport errors: what a caller of `sogni_net` catches instead of py-libp2p's exceptions.

Protocol errors (`FrameTooLarge`, `InvalidMessage`) come from `sogni_protocol.errors` and are
not `TransportError`s: they mean the peer misbehaved, not that the network failed.
"""


class TransportError(Exception):
    """The network failed us: a peer went away, a deadline passed, a dial failed."""


class ChannelClosed(TransportError):
    """The channel is finished: the peer closed or reset it, or we closed it ourselves."""


class ReadTimeout(TransportError):
    """No complete frame arrived before the read's deadline; the channel stays usable."""


class WriteTimeout(TransportError):
    """A frame could not be handed to the connection before its deadline.

    The channel is reset: a frame that may be half-written leaves the stream unusable.
    """


class DialError(TransportError):
    """Could not reach the peer, or it does not speak the requested protocol."""


class AddressError(DialError, ValueError):
    """The address itself is wrong (not a multiaddr, a bad IP, no or a bad /p2p/ peer id):
    nothing was dialed."""


class ListenError(TransportError):
    """This process cannot listen where it was told (the port is taken, the address is not
    this machine's)."""
