"""Typed messages of the epoch-files and claim-relay protocols, and their strict codec.

Two protocols a node uses to claim from anywhere, without gas:

- `ids.EPOCHS_PROTOCOL`: `EpochIndexRequest` -> `EpochIndex` (a page of the coordinator's
  published epochs), `EpochFileRequest` -> `EpochFileStart` then its bytes in `EpochFileChunk`s
  (or `EpochRefused`). Several requests may follow one another on a stream.
- `ids.RELAY_PROTOCOL`: one `RelayClaim` per stream -> `RelayDone` (the transaction's hash) or
  `RelayRefused`.

Kept apart from `messages.py` (the render protocols): these protocols carry their own version
in `v` (`RELAY_WIRE_VERSION`, the protocol ids' major version), so a render wire-format bump
does not change them. As there, decoding refuses an unknown type or field, a wrong type or an
out-of-range value with an error naming the field (`InvalidMessage`).

`check_file_name` is the one definition of what a published file may be called; the
coordinator serves nothing else and the node asks for nothing else, so no name can reach
outside the epochs folder.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta

from sogni_protocol import ids
from sogni_protocol.airdrop import airdrop_season
from sogni_protocol.errors import DECODE_ERRORS, InvalidMessage

__all__ = [
    "RELAY_WIRE_VERSION",
    "EpochFileChunk",
    "EpochFileRequest",
    "EpochFileStart",
    "EpochIndex",
    "EpochIndexRequest",
    "EpochRefused",
    "EpochSummary",
    "RelayClaim",
    "RelayDone",
    "RelayMessage",
    "RelayRefused",
    "check_file_name",
    "decode",
    "encode",
    "epoch_file_names",
]

RELAY_WIRE_VERSION = 1

Bytes32 = Annotated[bytes, Meta(min_length=32, max_length=32)]
Hex32 = Annotated[str, Meta(pattern="^0x[0-9a-fA-F]{64}$")]
Address = Annotated[str, Meta(pattern="^0x[0-9a-fA-F]{40}$")]
Uint256Text = Annotated[str, Meta(pattern="^(0|[1-9][0-9]{0,77})$")]
"""A uint256 as a decimal string (MessagePack integers stop at 2^64)."""
EpochNumber = Annotated[int, Meta(ge=1, le=2**63 - 1)]
Uint64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
FileName = Annotated[str, Meta(min_length=1, max_length=256)]
"""Checked by `check_file_name` where it is used, so a bad one gets a typed refusal."""
Code = Annotated[str, Meta(max_length=64)]
Reason = Annotated[str, Meta(max_length=1024)]
StakeBps = Annotated[int, Meta(ge=0, le=10_000)]

_EPOCH_FILE = re.compile(r"^epoch-([0-9]{6,18})\.(json|tree\.json)$")
_RECEIPTS_FILE = re.compile(r"^receipts/0x[0-9a-f]{64}\.json$")


def check_file_name(name: str) -> str:
    """`name` if it is a published file's name, else `ValueError` saying why not.

    Allowed: `epoch-NNNNNN.json`, `epoch-NNNNNN.tree.json` (six or more digits, as
    `epoch_files.epoch_filename` writes them), `receipts/0x<64 lowercase hex>.json` and a
    season's airdrop evidence, `airdrops/season-N/0x<64 lowercase hex>.json`.
    Nothing else: no other folder, no `..`, no absolute path, no backslash, no upper case.
    """
    if _RECEIPTS_FILE.match(name) or airdrop_season(name) is not None:
        return name
    match = _EPOCH_FILE.match(name)
    if match and int(match.group(1)) >= 1 and match.group(1) == f"{int(match.group(1)):06d}":
        return name
    raise ValueError(
        f"{name[:80]!r} is not a published epoch file name (epoch-NNNNNN.json, "
        "epoch-NNNNNN.tree.json, receipts/0x<keccak>.json or airdrops/season-N/0x<keccak>.json)"
    )


def epoch_file_names(epoch: int) -> tuple[str, str]:
    """The epoch file's and its tree dump's names (`epoch_files.epoch_filename`)."""
    return f"epoch-{epoch:06d}.json", f"epoch-{epoch:06d}.tree.json"


class _Message(
    msgspec.Struct, tag_field="type", rename="camel", kw_only=True, forbid_unknown_fields=True
):
    v: Annotated[int, Meta(ge=RELAY_WIRE_VERSION, le=RELAY_WIRE_VERSION)] = RELAY_WIRE_VERSION


class EpochSummary(msgspec.Struct, rename="camel", kw_only=True, forbid_unknown_fields=True):
    """One published epoch as the index lists it (also the HTTP `GET /epochs` entries)."""

    epoch: EpochNumber
    root: Hex32
    total: Uint256Text
    receipts_hash: Hex32
    file: FileName
    digest: Hex32
    """keccak256 of the epoch file's bytes (a node keeps its cached copy when it matches)."""
    receipts_file: FileName
    tree_file: FileName | None = None
    closed_at: Uint64 = 0
    size: Uint64 = 0
    """Bytes of the epoch file (its receipts batch is content-addressed)."""


# --- /sogni/epochs/1.0.0 -------------------------------------------------------------------
class EpochIndexRequest(_Message, tag="epochIndexRequest", kw_only=True):
    """Ask for the published epochs numbered above `after`, oldest first."""

    after: Uint64 = 0


class EpochIndex(_Message, tag="epochIndex", kw_only=True):
    epochs: Annotated[list[EpochSummary], Meta(max_length=ids.EPOCH_INDEX_PAGE)]
    more: bool = False
    """More epochs follow the last one listed: ask again with `after` = its number."""


class EpochFileRequest(_Message, tag="epochFileRequest", kw_only=True):
    name: FileName


class EpochFileStart(_Message, tag="epochFileStart", kw_only=True):
    """The file exists: `size` bytes follow in `EpochFileChunk`s, keccak256 `digest`."""

    name: FileName
    size: Annotated[int, Meta(ge=0, le=ids.EPOCH_FILE_LIMIT)]
    digest: Bytes32


class EpochFileChunk(_Message, tag="epochFileChunk", kw_only=True):
    data: Annotated[bytes, Meta(min_length=1, max_length=ids.EPOCH_CHUNK_BYTES)]


class EpochRefused(_Message, tag="epochRefused", kw_only=True):
    """`bad_name`, `not_found`, `too_large`, `unavailable` or `bad_request`."""

    code: Code
    reason: Reason


# --- /sogni/relay/1.0.0 --------------------------------------------------------------------
class RelayClaim(_Message, tag="relayClaim", kw_only=True):
    """Submit `claim` (or, with `stake_bps`, `claimAndStake`) for `account`.

    The proof is against the distributor's newest matured root. `stake_bps` > 0 needs
    `signature`: the account's EIP-712 `StakeAuthorization(account, cumulativeAmount,
    stakeBps, deadline)` under the distributor's domain.
    """

    account: Address
    cumulative_amount: Uint256Text
    proof: Annotated[list[Bytes32], Meta(max_length=ids.MAX_PROOF_NODES)]
    stake_bps: StakeBps = 0
    deadline: Uint64 = 0
    signature: Annotated[bytes, Meta(max_length=1024)] = b""


class RelayDone(_Message, tag="relayDone", kw_only=True):
    """The claim is mined: `amount` went to `account` (`staked` of it as its stake)."""

    tx_hash: Bytes32
    account: Address
    epoch: EpochNumber
    amount: Uint256Text
    staked: Uint256Text = "0"
    paid: Uint256Text = "0"


class RelayRefused(_Message, tag="relayRefused", kw_only=True):
    """Nothing was sent. Codes: `invalid_proof`, `nothing_to_claim`, `not_matured`,
    `bad_authorization`, `expired`, `would_revert`, `rate_limited`, `busy`, `paused`,
    `relayer_unfunded`, `no_chain`, `unavailable`."""

    code: Code
    reason: Reason


RelayMessage = (
    EpochIndexRequest
    | EpochIndex
    | EpochFileRequest
    | EpochFileStart
    | EpochFileChunk
    | EpochRefused
    | RelayClaim
    | RelayDone
    | RelayRefused
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(RelayMessage)


def encode(message: _Message) -> bytes:
    return _encoder.encode(message)


def decode(payload: bytes) -> RelayMessage:
    """One frame's payload as a typed message, or `InvalidMessage` naming what is wrong."""
    try:
        return _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(f"invalid message: {exc}") from None
    except DECODE_ERRORS as exc:
        raise InvalidMessage(f"not a MessagePack message: {exc}") from None
