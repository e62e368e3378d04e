"""Structured logging for the transport, and a muzzle for py-libp2p's own loggers.

Events carry ids, sizes and error types only: never frame payloads, prompts or images.
"""

from __future__ import annotations

import logging
import os
from typing import Any

try:
    import structlog

    _structlog: Any = structlog.get_logger("sogni_net")
except ImportError:  # pragma: no cover - structlog is a project dependency
    _structlog = None

_stdlib = logging.getLogger("sogni_net")


def log_event(level: int, event: str, **fields: Any) -> None:
    """Emit `event` with key/value fields through structlog, or stdlib logging without it."""
    if _structlog is not None:
        _structlog.log(level, event, **fields)
    elif _stdlib.isEnabledFor(level):
        details = " ".join(f"{key}={value}" for key, value in fields.items())
        _stdlib.log(level, "%s %s", event, details)


def quiet_libp2p_logging() -> None:
    """Keep py-libp2p at WARNING and route it through the application's handlers.

    `import libp2p` sets its root logger to WARNING with `propagate=False` and no handler, so
    its warnings bypass the application's logging setup and land on bare stderr. Unless the
    operator asked for libp2p debugging (LIBP2P_DEBUG), restore propagation at WARNING.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return
    for name in ("libp2p", "multiaddr"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.propagate = True
    # A failed dial is reported once, by whoever dialled (one line with what to do); the
    # TCP transport's own "Failed to open TCP stream" error would say it twice.
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)
    # Some modules pin their own logger lower (auto_connector sets INFO at import).
    for name, child in list(logging.root.manager.loggerDict.items()):
        if (
            name.startswith(("libp2p.", "multiaddr."))
            and isinstance(child, logging.Logger)
            and logging.NOTSET < child.level < logging.WARNING
        ):
            child.setLevel(logging.WARNING)


_MAX_ERROR_TEXT = 300


def describe(exc: BaseException) -> str:
    """`Type: message`, cut to 300 characters.

    Error texts name fields, not values, but a hostile peer chooses the field names (an
    unknown key of a megabyte would otherwise land in the log verbatim).
    """
    text = str(exc)
    if len(text) > _MAX_ERROR_TEXT:
        text = text[:_MAX_ERROR_TEXT] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
