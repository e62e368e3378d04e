"""The coordinator's configuration: a TOML file (optional) plus `SOGNI_COORDINATOR_*` env.

Defaults run a local coordinator against the embedded chain (eth-tester's chain id, a zero
verifying contract until the reward distributor is deployed); production sets both, because
they are the EIP-712 domain every offer and receipt is bound to.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sogni_coordinator.content_policy import ContentConfig
from sogni_coordinator.gateway.config import GatewayConfig
from sogni_coordinator.verification_config import VerificationConfig
from sogni_protocol.logs import LogLevel
from sogni_protocol.messages import Address, ModelId
from sogni_protocol.payout_rules import SettlementConfig
from sogni_protocol.settings import (
    DEFAULT_CHAIN_ID,
    DEV_CHAIN_IDS,
    UNDEPLOYED_CONTRACT,
    ChainId,
    ChainUrl,
    EnvName,
    Multiaddr,
    Seconds,
    SettingsError,
    check_heartbeats,
    check_listen_addr,
    fill_path,
    load_settings,
    read_config_text,
)
from sogni_protocol.stake_benefits import StakeBenefits
from sogni_wallet.addresses import apply_addresses_file

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "MIN_DISPUTE_WINDOW",
    "CoordinatorConfig",
    "check_chain_domain",
    "load_coordinator_config",
]

ENV_PREFIX = "SOGNI_COORDINATOR"
CONFIG_ENV = "SOGNI_COORDINATOR_CONFIG"
MIN_DISPUTE_WINDOW = 3600.0
"""Seconds `[verification] dispute_window` must be at least off a local network (with
verification on): the settler keeps a receipt out of every epoch for that long."""
DEFAULT_RELAY_MIN_CLAIM = 10**18
"""1 SOGNI: the least a relayed claim must add off a local network (`relay_min_claim`)."""


class CoordinatorConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Settings of one `sogni-coordinator`; see `configs/coordinator.example.toml`."""

    data_dir: Path = Path("~/.sogni/coordinator")
    listen: Multiaddr = "/ip4/127.0.0.1/tcp/4001"
    direct_port: Annotated[int, Meta(ge=-1, le=65535)] = 0
    """TCP port for direct channels (node job sessions and app requests straight over Noise,
    no yamux; `sogni_net.direct`) on `listen`'s IP: 0 picks a free port, -1 turns them off.
    Nodes and apps that cannot reach it use libp2p streams as before."""
    keystore: Path = None  # type: ignore[assignment]  # None until __post_init__: signer.json
    password_env: EnvName = "SOGNI_COORDINATOR_PASSWORD"
    database: Path = None  # type: ignore[assignment]  # None until __post_init__
    """A SQLite file, or a `postgresql://` URL (a Path mangles its `//`: read it with
    `storage.location`; `db.Database` does)."""
    chain_id: ChainId = DEFAULT_CHAIN_ID
    verifying_contract: Address = UNDEPLOYED_CONTRACT
    heartbeat_interval: Seconds = 5.0
    heartbeat_timeout: Seconds = 15.0
    offer_ttl: Seconds = 30.0
    no_node_grace: Seconds = 10.0
    """How long a queued job may wait with no connected node able to serve it before it fails
    (a node restarting after a crash must reconnect within it to keep its re-queued jobs)."""
    job_deadline_floor: Seconds = 150.0
    job_deadline_base: Annotated[float, Meta(ge=0, le=86_400)] = 30.0
    models: Annotated[list[ModelId], Meta(max_length=1024)] = msgspec.field(default_factory=list)
    http_listen: Annotated[str, Meta(max_length=300)] = "127.0.0.1:8080"
    """HTTP listener (`/healthz`, `/readyz`, `/metrics`, `/status`, `/epochs`, `/relay/claim`,
    the SDK gateway): `host:port`,
    `[ipv6]:port` (port 0 picks a free port) or `off`."""
    log_level: LogLevel = "info"
    log_json: bool | None = None
    chain_url: ChainUrl | None = None
    """Settlement chain JSON-RPC url (anvil: http://127.0.0.1:8545). None: the embedded
    in-process chain, which only the process that deployed it can use (see SETTLEMENT.md)."""
    addresses_file: Path | None = None
    """`chain deploy`'s output; when set, chain_id and verifying_contract come from it."""
    relay_min_claim: Annotated[int, Meta(ge=0)] | None = None
    """Base units of SOGNI a relayed claim must add to what its account already claimed:
    anyone may ask to relay anyone's claim, so without a floor a stranger makes this
    coordinator's key pay gas for dust. None: 1 SOGNI, or 0 on a local network (`relay_floor`);
    0 relays any amount."""
    settlement: SettlementConfig = msgspec.field(default_factory=SettlementConfig)
    tiers: Literal["open", "enforced"] = "open"
    """"enforced": fast jobs only to CUDA nodes with a worker licence and `fast_min_stake`;
    "open" (local networks): every node serves both tiers."""
    fast_min_stake: Annotated[int, Meta(ge=0)] = 10_000
    """Whole SOGNI a fast worker must have staked (read from chain)."""
    chain_poll_seconds: Annotated[float, Meta(ge=0.1, le=3600)] = 15.0
    """How often the chain's stake and licence events are polled to refresh the cached
    standing that routing and pay tiers read (chain reads never block dispatch)."""
    billing: Literal["off", "optional", "required"] = "optional"
    """"optional": requests naming a payer are charged, others are free (local networks);
    "required": every request must name and authorize a payer; "off": nothing is charged."""

    network_id: Annotated[
        str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    ] = "sogni-local"
    """The network this coordinator's ledger serves, shared by every coordinator of that
    ledger: payer authorizations and boost claims name it (with the distributor), so one is
    spent once across the network and is worthless at any other."""
    settlement_keystore: Path | None = None
    """The key that posts epoch roots (SETTLEMENT_ROLE), kept apart from the online offer key.
    None: on a local network the coordinator key settles; elsewhere `epoch close` writes the
    unsigned transaction for the settlement key to sign offline."""
    settlement_password_env: EnvName = "SOGNI_SETTLEMENT_PASSWORD"

    prompt_retention_seconds: Annotated[float, Meta(ge=0, le=365 * 86_400)] = 3600.0
    """How long a request's prompt stays readable after the request ended: then its key is
    deleted (crypto-shredding) and the sealed prompt in the database is useless. 0: at once."""

    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)
    """`[gateway]`: REST and WebSocket for apps built on Sogni's official SDKs, on
    `http_listen` (docs/GATEWAY.md); on by default, it answers only to API keys."""

    verification: VerificationConfig = msgspec.field(default_factory=VerificationConfig)
    """`[verification]`: which receipts are held until a re-run step verifies them
    (`sogni_coordinator.checks`); off by default."""

    staking_benefits: StakeBenefits = msgspec.field(default_factory=StakeBenefits)
    """`[staking_benefits]`: payers' stake tiers -> discount, queue priority, free upgrades
    (docs/ECONOMICS.md "Staking benefits"); applied only with a chain to read stake from."""
    results_dir: Path | None = None
    """Where receipted images wait for their client (default `data_dir/results`). With
    several coordinators on one PostgreSQL, one folder they all read and write (a shared
    mount): any of them delivers an image another received (docs/SCALING.md)."""
    network_signers: Annotated[list[Address], Meta(max_length=256)] = msgspec.field(
        default_factory=list
    )
    """Offer keys of the other coordinators of this network (PostgreSQL): a node's result
    for an offer one of them signed is accepted here (its coordinator died)."""
    lease_seconds: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    """How long a coordinator's lease on a shared-queue job lasts without renewal (it
    renews every third of it): after a coordinator dies, its jobs run elsewhere after this."""
    result_store: Literal["folder", "database"] = "folder"
    """Where receipted images wait for their client: "folder" (`results_dir`, the default)
    or "database" (rows in `database`: in PostgreSQL every coordinator of the network reads
    them, no shared folder to mount; in a SQLite file an image commits with its receipt, one
    flush instead of two: docs/OPERATIONS.md)."""
    result_retention: Annotated[float, Meta(ge=1, le=3650 * 86_400)] | None = None
    """Seconds an image its client never acknowledged is kept (then deleted by a sweep).
    None: 7 days in the database, until acknowledged in a folder (as before)."""
    result_url_key_file: Path | None = None
    """The gateway's result-URL HMAC key (default `data_dir/result-url.key`): one file per
    network, the same for every coordinator of it."""
    content: ContentConfig = msgspec.field(default_factory=ContentConfig)
    """`[content]`: the prompt policy checked before a request is queued or charged
    (docs/CONTENT_POLICY.md); adult content off by default."""

    def __post_init__(self) -> None:
        check_heartbeats(self.heartbeat_interval, self.heartbeat_timeout)
        check_http_listen(self.http_listen)
        _check_listen(self.listen)
        data_dir = fill_path(self, "data_dir", self.data_dir)
        fill_path(self, "keystore", data_dir / "signer.json")
        fill_path(self, "database", data_dir / "coordinator.db")
        check_database_url(self.database)
        if self.addresses_file is not None:
            apply_addresses_file(self)
        if self.result_store == "database" and str(self.database) == ":memory:":
            raise ValueError(
                'result_store = "database" keeps images in the database file, but database '
                'is ":memory:" (gone when the coordinator stops): name a file, or use '
                'result_store = "folder"'
            )
        if not self.local and self.billing != "required":
            raise ValueError(
                f"billing = {self.billing!r} pays for work nobody paid for: chain id "
                f"{self.chain_id} is not a local network (a dev chain: "
                f"{', '.join(map(str, sorted(DEV_CHAIN_IDS)))}), so billing must be 'required'"
            )
        window = self.verification.dispute_window
        if not self.local and self.verification.enabled and window < MIN_DISPUTE_WINDOW:
            raise ValueError(
                f"verification.dispute_window = {window:g} s leaves no time to dispute a "
                f"receipt before it is paid: chain id {self.chain_id} is not a local network, "
                f"so with verification on it must be at least {MIN_DISPUTE_WINDOW:g} (seconds)"
            )

    @property
    def local(self) -> bool:
        """A local network: the chain is a dev chain (free work may be paid, one key may
        both offer and settle)."""
        return self.chain_id in DEV_CHAIN_IDS

    @property
    def relay_floor(self) -> int:
        """`relay_min_claim`, or its default: 1 SOGNI, 0 on a local network (free gas)."""
        if self.relay_min_claim is not None:
            return self.relay_min_claim
        return 0 if self.local else DEFAULT_RELAY_MIN_CLAIM

    @property
    def node_key_path(self) -> Path:
        """Ed25519 libp2p identity of the coordinator, stored 0600 (its /p2p/ id)."""
        return self.data_dir / "node.key"


def load_coordinator_config(
    path: Path | None = None, env: Mapping[str, str] = os.environ
) -> CoordinatorConfig:
    """Load: file `path` (or `$SOGNI_COORDINATOR_CONFIG`, or none) + `SOGNI_COORDINATOR_*`."""
    text, source = read_config_text(path, env, CONFIG_ENV)
    cfg = load_settings(CoordinatorConfig, text, env, ENV_PREFIX, source=source)
    check_chain_domain(cfg, source)
    return cfg


def check_chain_domain(cfg: CoordinatorConfig, source: str | None = None) -> None:
    """Refuse `chain_url` without `addresses_file`.

    Why: the EIP-712 domain comes from the addresses file; without it the coordinator signs
    every offer and receipt for the embedded chain's domain, and none of that work can ever be
    paid on the shared chain `chain_url` names. (`chain deploy`, which writes that file, loads
    the config without this check.)
    """
    if cfg.chain_url is not None and cfg.addresses_file is None:
        raise SettingsError(
            f"chain_url without addresses_file: receipts would be signed for chain "
            f"{cfg.chain_id}, never payable on {cfg.chain_url}; set addresses_file "
            "(SOGNI_COORDINATOR_ADDRESSES_FILE) to the file `sogni-coordinator chain deploy` "
            "wrote",
            key="addresses_file",
            source=source or "<config>",
        )


def _check_listen(value: str) -> None:
    """Refuse a `listen` the host cannot serve (UDP, a DNS name, a bad IP or port) when the
    config loads, naming the key: `start` would crash on it."""
    try:
        check_listen_addr(value)
    except ValueError as exc:
        raise ValueError(f"listen: {exc}") from None


def check_database_url(database: Path | str) -> None:
    """Refuse a `database` PostgreSQL URL that cannot parse (a bad host or port) when the
    config loads, never echoing it: it may carry a password. libpq checks the rest when it
    connects."""
    from sogni_coordinator.storage import is_postgres, location

    if not is_postgres(database):
        return
    try:  # libpq's own parser: a password may hold `#`, `?` or `[` unencoded
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # no PostgreSQL support installed: opening it will say so
        return
    try:
        port = conninfo_to_dict(location(database)).get("port")
        ports = [] if port is None else str(port).split(",")  # libpq takes "p1,p2"
        if not all(p.isdigit() and 0 < int(p) < 65536 for p in ports):
            raise ValueError("port")
    except Exception:  # its text may quote the URL, password included: never shown
        raise ValueError(
            "database: not a valid PostgreSQL URL: write it as "
            "postgresql://USER@HOST:PORT/DBNAME (the password after USER:)"
        ) from None


def check_http_listen(value: str) -> None:
    """Refuse a malformed `http_listen` at load time, naming the field (not at first bind)."""
    from sogni_net.http import parse_listen  # lazy: sogni_net loads libp2p

    try:
        parse_listen(value)
    except ValueError as exc:
        raise ValueError(f"http_listen: {exc}") from None
