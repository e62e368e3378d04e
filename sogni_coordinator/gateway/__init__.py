"""The gateway for apps written for Sogni's official client SDKs (docs/GATEWAY.md).

REST and WebSocket on the coordinator's HTTP listener, at the host root, in-process on the
coordinator's dispatcher, ledger and store. `open_gateway` builds it from the coordinator's
settings; `gateway_routes` mounts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.gateway.config import GatewayConfig
from sogni_coordinator.gateway.core import Gateway
from sogni_coordinator.gateway.limits import SharedLimits
from sogni_coordinator.gateway.rest import gateway_routes
from sogni_coordinator.result_urls import ResultUrls, load_key
from sogni_coordinator.storage import is_postgres, location
from sogni_protocol.catalog import default_catalog

if TYPE_CHECKING:
    from sogni_coordinator.dispatch import Dispatcher

__all__ = ["Gateway", "GatewayConfig", "gateway_routes", "open_gateway"]


def open_gateway(
    config: GatewayConfig,
    dispatcher: Dispatcher,
    *,
    database: Path,
    data_dir: Path,
    configured_models: set[str],
    network_id: str,
    url_key_file: Path | None = None,
    results_dir: Path | None = None,
) -> tuple[Gateway, ApiKeys]:
    """The gateway, and the API-key store to `close()` when the coordinator stops (it
    closes the project records the gateway keeps in the same database too)."""

    keys = ApiKeys(database)
    gateway = Gateway(
        dispatcher,
        keys,
        ResultUrls(load_key(url_key_file), config.public_url)
        if url_key_file is not None  # one key per network (docs/SCALING.md)
        else ResultUrls.load(data_dir, config.public_url),
        keys.projects,
        config=config,
        catalog=default_catalog(),
        configured_models=configured_models,
        results_dir=results_dir or data_dir / "gateway-results",
        network_id=network_id,
        # several coordinators on one PostgreSQL count a key's rate and an address's failed
        # keys together (connected on first use, in a worker thread; closed by `run`)
        shared_limits=SharedLimits(location(database)) if is_postgres(database) else None,
    )
    return gateway, keys
