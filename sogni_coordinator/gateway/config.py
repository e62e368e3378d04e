"""The `[gateway]` table: the HTTP/WebSocket gateway for apps built on Sogni's client SDKs."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = ["GatewayConfig"]


class GatewayConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Served on the coordinator's `http_listen` when `enabled` (docs/GATEWAY.md)."""

    enabled: bool = True
    public_url: str | None = None
    """Base of the result URLs handed out (behind a TLS proxy: `https://sogni.example.org`);
    None: the address the request came in on."""
    result_ttl_seconds: Annotated[float, msgspec.Meta(ge=60, le=7 * 86400)] = 3600.0
    """How long a signed result URL stays valid."""
    retention_seconds: Annotated[float, msgspec.Meta(ge=60)] = 86400.0
    """How long a delivered image is kept for download, then deleted."""
    jobs_per_minute: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 60
    """Projects one API key may start per minute (a burst of a quarter of it, at least 5)."""
    requests_per_minute: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 600
    """REST calls one API key may make per minute."""
    failed_auth_per_minute: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    """Failed authentications one IP may make per minute before it is refused outright."""
    frame_limit_bytes: Annotated[int, msgspec.Meta(ge=4096, le=16 * 1024 * 1024)] = 256 * 1024
    """Largest WebSocket frame read from an app (a jobRequest is a few KB)."""
    max_projects_per_socket: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 32
    """Projects one socket may have in flight."""
    max_sockets_per_key: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 64
    """Sockets (one per `appId`) one API key may hold open at once: each costs the
    coordinator memory and a once-a-second look at the swarm; one more is closed 1013 (the
    SDK retries later)."""
    default_network: Literal["fast", "relaxed"] = "fast"
