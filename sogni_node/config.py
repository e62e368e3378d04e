"""The node's configuration: a TOML file (optional) plus `SOGNI_NODE_*` env overrides.

Every field has a default so `sogni-node start` works with no file at all, and partner images
(Nosana, Salad) can configure a node by env alone. Paths left unset derive from `data_dir`,
so moving one directory moves the whole node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sogni_protocol.logs import LogLevel
from sogni_protocol.messages import DEFAULT_NETWORK_ID, Address, NetworkId
from sogni_protocol.settings import (
    DEFAULT_CHAIN_ID,
    UNDEPLOYED_CONTRACT,
    ChainId,
    ChainUrl,
    CoordinatorMultiaddr,
    EnvName,
    Multiaddr,
    Seconds,
    check_heartbeats,
    check_listen_addr,
    check_peer_addr,
    fill_path,
    load_settings,
    read_config_text,
    readable_pattern,
)
from sogni_wallet.addresses import apply_addresses_file

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "NodeConfig",
    "config_sources",
    "load_node_config",
]

ENV_PREFIX = "SOGNI_NODE"
CONFIG_ENV = "SOGNI_NODE_CONFIG"
"""Env var naming the config file when no `--config` is given."""
DATA_DIR_LOCK = "node.lock"
"""Held (`flock`) by a running `sogni-node start` in its `data_dir`: one daemon per journal,
and `sogni-node status` tells a running node from none without its HTTP listener."""


EpochSource = Annotated[
    str,
    Meta(
        pattern=r"^((/[A-Za-z0-9_.:%-]+)+/p2p/[A-Za-z0-9]+|https?://[^\s/]+(/[^\s]*)?)$",
        max_length=512,
    ),
]
"""A coordinator's multiaddr (pinning its peer id) or the base URL of its HTTP listener."""
readable_pattern(
    EpochSource,
    "a coordinator's multiaddr ending in its peer id (/ip4/.../tcp/.../p2p/12D3KooW...) or "
    "the http(s):// URL of its HTTP listener",
)


class NodeConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Settings of one `sogni-node`; see `configs/node.example.toml` for each key's meaning."""

    data_dir: Path = Path("~/.sogni/node")
    listen: Multiaddr = "/ip4/127.0.0.1/tcp/0"
    direct_channels: bool = True
    """Run job sessions over a coordinator's direct channel when it offers one
    (`sogni_net.direct`: Noise straight on TCP, no yamux); else, or when false, libp2p."""
    coordinators: list[CoordinatorMultiaddr] = msgspec.field(default_factory=list)
    trusted_coordinators: list[Address] = msgspec.field(default_factory=list)
    network_id: NetworkId = DEFAULT_NETWORK_ID
    """The network whose signer set this node accepts (`network_operators`)."""
    network_operators: Annotated[list[Address], Meta(max_length=16)] = msgspec.field(
        default_factory=list
    )
    """Operator keys of the network: offers from any signer of a set one of them signed
    (`network_signers_file`, `sogni_protocol.signer_set`) are accepted too."""
    network_signers_file: Path | None = None
    """The operator-signed signer set (`sogni-coordinator network signers sign`), re-read at
    each connect; the highest serial accepted is kept in `data_dir/network_signers.json`."""
    network_signers_urls: Annotated[list[EpochSource], Meta(max_length=32)] = msgspec.field(
        default_factory=list
    )
    """Coordinators' HTTP listeners (`http(s)://host:port`) to fetch the set from
    (`GET /v1/network/signers`) at start and every `network_signers_refresh` seconds; only a
    valid, newer set is taken."""
    network_signers_refresh: Annotated[float, Meta(ge=1, le=86_400)] = 300.0
    forward_results_after: Annotated[float, Meta(ge=0.5, le=86_400)] = 10.0
    """Seconds a coordinator must have been unreachable before a result kept for it is sent
    to another coordinator of its network (a restart is back sooner)."""
    slots: Annotated[int, Meta(ge=1, le=16)] = 1
    models_dir: Path = None  # type: ignore[assignment]  # None until __post_init__: data_dir/models
    backend: Literal["auto", "diffusers", "coreml"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: Annotated[int, Meta(ge=0, le=1024)] = 0
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """auto: float16 on CUDA, float32 elsewhere."""
    quantize: Literal["none", "int8", "int8-dynamic", "fp8", "quanto-int8", "quanto-int4"] = "none"
    """Quantized denoiser weights (the `quant` extra); fp8 needs a CUDA GPU of sm_89 or newer."""
    compile: bool = False
    """torch.compile the denoiser: slower first render, faster steps after (CUDA mostly)."""
    max_pixels: Annotated[int, Meta(ge=0, le=2048 * 2048)] = 0
    test_model: bool = False
    """Also offer `sogni-tiny-sd`, the random-weights test model (tests, benchmarks): its images
    are noise, so a production node leaves it off."""
    keystore: Path = None  # type: ignore[assignment]  # None until __post_init__: wallet.json
    password_env: EnvName = "SOGNI_NODE_PASSWORD"
    payout_address: Address | None = None
    """Where this node's rewards go (env `SOGNI_NODE_PAYOUT_ADDRESS`), signed into every
    receipt; None: its own wallet. A partner container with a throwaway key needs one."""
    heartbeat_interval: Annotated[float, Meta(gt=0, le=300)] = 5.0
    heartbeat_timeout: Seconds = 15.0
    shutdown_grace: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    chain_id: ChainId = DEFAULT_CHAIN_ID
    verifying_contract: Address = UNDEPLOYED_CONTRACT
    advert_interval: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    """Seconds between gossiped capability adverts (coordinators accept one per ~25 s)."""
    http_listen: Annotated[str, Meta(max_length=300)] = "127.0.0.1:9860"
    """HTTP listener (`/healthz` now; status and metrics later): `host:port`, `[ipv6]:port`
    (port 0 picks a free port) or `off`."""
    log_level: LogLevel = "info"
    log_json: bool | None = None
    trajectory_retention_seconds: Annotated[float, Meta(ge=0, le=30 * 86_400)] = 3600.0
    """How long each render's committed trajectory (every step's latent, about 8 MiB for a
    30-step SDXL render) is kept to answer a challenge of its receipt; then deleted."""
    chain_url: ChainUrl | None = None
    """Settlement chain JSON-RPC url (e.g. anvil) for `rewards`, `stake`; None: no chain."""
    addresses_file: Path | None = None
    """`sogni-coordinator chain deploy`'s output; when set, chain_id and verifying_contract
    come from it (its distributor is the EIP-712 verifying contract)."""
    epochs_dir: Path | None = None
    """A local copy of a coordinator's published epoch files (`epoch-N.json`, `receipts/`) for
    `rewards`; None: fetch them from `epoch_sources` (else the coordinators) into
    `data_dir/epochs`, checked before use."""
    epoch_sources: Annotated[list[EpochSource], Meta(max_length=32)] = msgspec.field(
        default_factory=list
    )
    """Where `rewards` fetches published epochs and sends relayed claims: coordinator
    multiaddrs (`/sogni/epochs/1.0.0`, `/sogni/relay/1.0.0`) or their HTTP listeners
    (`http(s)://host:port`); tried in order. Empty: the `coordinators`."""
    auto_stake_share: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    """Share of each `rewards claim` staked for this wallet at once (0.5: half); the rest
    goes to the wallet. `--stake-share` overrides it for one claim; `sogni-node rewards
    auto-stake SHARE` writes it to the config file."""

    def __post_init__(self) -> None:
        check_heartbeats(self.heartbeat_interval, self.heartbeat_timeout)
        check_http_listen(self.http_listen)
        check_addresses(self)
        if self.payout_address is not None:
            from sogni_node.payout import check_payout_address

            payout = check_payout_address(self.payout_address)
            msgspec.structs.force_setattr(self, "payout_address", payout)
        data_dir = fill_path(self, "data_dir", self.data_dir)
        fill_path(self, "models_dir", data_dir / "models")
        fill_path(self, "keystore", data_dir / "wallet.json")
        if self.addresses_file is not None:
            apply_addresses_file(self)

    @property
    def bench_path(self) -> Path:
        """Last `sogni-node bench` result; its speed is advertised."""
        return self.data_dir / "bench.json"

    @property
    def journal_path(self) -> Path:
        """SQLite journal of this node's offers and receipts (`sogni_node.journal`)."""
        return self.data_dir / "journal.db"

    @property
    def epochs_cache(self) -> Path:
        """Where fetched epoch folders are kept, one per source (`sogni_node.epoch_fetch`)."""
        return self.data_dir / "epochs"

    @property
    def node_key_path(self) -> Path:
        """Ed25519 libp2p identity (peer id), stored 0600."""
        return self.data_dir / "node.key"

    @property
    def network_signers_path(self) -> Path:
        """The signer set this node accepted last (highest serial), kept across restarts."""
        return self.data_dir / "network_signers.json"

    def is_trusted(self, address: str) -> bool:
        """Whether offers signed by `address` are accepted (case-insensitive hex compare)."""
        low = address.lower()
        return any(low == a.lower() for a in self.trusted_coordinators)


PATH_KEYS = frozenset(
    f.name
    for f in msgspec.structs.fields(NodeConfig)
    if "Path" in str(f.type)  # data_dir, models_dir, keystore, addresses_file, ...
)
"""Keys whose value is a path: an empty `SOGNI_NODE_<KEY>=` leaves them unset."""


def without_empty_paths(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less the path variables set to an empty string (or blanks): those mean "not
    set", as for XDG's variables. An empty path read as "." would put the journal and the
    keys in whatever folder the node was started from (`SOGNI_NODE_DATA_DIR=` in a unit
    file or a container's env)."""
    names = {f"{ENV_PREFIX}_{key.upper()}" for key in PATH_KEYS}
    return {k: v for k, v in env.items() if not (k in names and not v.strip())}


def load_node_config(path: Path | None = None, env: Mapping[str, str] = os.environ) -> NodeConfig:
    """Load the node config: file `path` (or `$SOGNI_NODE_CONFIG`, or none) + `SOGNI_NODE_*`
    (a path variable set empty counts as unset: `without_empty_paths`)."""
    text, source = read_config_text(path, env, CONFIG_ENV)
    return load_settings(NodeConfig, text, without_empty_paths(env), ENV_PREFIX, source=source)


DERIVED_FROM_DATA_DIR = frozenset({"models_dir", "keystore"})
"""Keys whose default is a path under `data_dir`."""
FROM_ADDRESSES_FILE = frozenset({"chain_id", "verifying_contract"})
"""Keys that `addresses_file`, when set, decides."""


def config_sources(path: Path | None = None, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Where each key's effective value comes from: `env NAME`, `file PATH`, `addresses_file`,
    `default` or `default (under data_dir)`, for every key, set or not. Call after
    `load_node_config` succeeded (the file is known to parse)."""
    import tomllib

    text, source = read_config_text(path, env, CONFIG_ENV)
    env = without_empty_paths(env)
    in_file = tomllib.loads(text) if text is not None else {}
    addresses = env.get(f"{ENV_PREFIX}_ADDRESSES_FILE") or in_file.get("addresses_file")
    out: dict[str, str] = {}
    for field in msgspec.structs.fields(NodeConfig):
        env_name = f"{ENV_PREFIX}_{field.encode_name.upper()}"
        if field.name in FROM_ADDRESSES_FILE and addresses:
            out[field.name] = "addresses_file"
        elif env_name in env:
            out[field.name] = f"env {env_name}"
        elif field.encode_name in in_file:
            out[field.name] = f"file {source}"
        elif field.name in DERIVED_FROM_DATA_DIR:
            out[field.name] = "default (under data_dir)"
        else:
            out[field.name] = "default"
    return out


def check_addresses(cfg: NodeConfig) -> None:
    """Refuse, when the config loads and naming the key, a `listen` the host cannot serve and
    a coordinator address that can never be dialed or authenticated (a bad IP or port, an
    invalid peer id): `start` would crash on the one, and retry the other forever."""
    try:
        check_listen_addr(cfg.listen)
    except ValueError as exc:
        raise ValueError(f"listen: {exc}") from None
    for key in ("coordinators", "epoch_sources", "network_signers_urls"):
        for addr in getattr(cfg, key):
            if not addr.startswith("/"):  # an http(s):// URL (epoch_sources and the like)
                continue
            try:
                check_peer_addr(addr)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    seen: dict[str, str] = {}
    for addr in cfg.coordinators:  # each its own session: one coordinator's replaced the other
        peer = addr.rsplit("/p2p/", 1)[-1]
        if peer in seen:
            raise ValueError(
                f"coordinators: {addr[:200]!r} and {seen[peer][:200]!r} are one coordinator "
                f"(peer {peer}): list each coordinator once"
            )
        seen[peer] = addr


def check_http_listen(value: str) -> None:
    """Refuse a malformed `http_listen` at load time, naming the field (not at first bind)."""
    from sogni_net.http import parse_listen  # lazy: sogni_net loads libp2p

    try:
        parse_listen(value)
    except ValueError as exc:
        raise ValueError(f"http_listen: {exc}") from None
