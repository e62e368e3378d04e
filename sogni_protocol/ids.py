"""Protocol ids, topics and size limits: the numbers both ends must agree on."""

from typing import Final

JOBS_PROTOCOL: Final = "/sogni/jobs/1.0.0"
"""Long-lived pull stream a node opens to each coordinator it trusts."""

CLIENT_PROTOCOL: Final = "/sogni/client/1.0.0"
"""One stream per exchange from an app to a coordinator: a render request (and its images),
a resume of one (`ResumeRequest`: the images not yet acknowledged), a Daily Boost claim, or a
balance query."""

CAPABILITIES_TOPIC: Final = "sogni/capabilities/1"
"""GossipSub topic for signed capability adverts (at most one per node every 30 s)."""

WIRE_VERSION: Final = 7
"""The wire format's major version, carried as `v` in every message map (2: resume tokens,
`ResumeRequest`, `ImageAck`, `HelloRefused`; 3: the tier's `priceFactorBps` in offers and
receipts, and the network id in payer authorizations; 4: the trajectory root in receipts;
5: refusal codes in `VerifyRefused`, and the verifier's image check, `VerifyDecode` /
`DecodeVerified`; 6: the payout address in receipts (EIP-712 version "4") and the partner
cloud's `machineId` in capabilities; 7: `CapabilitiesUpdate` during a session, and the chain of
offer-key rotations in `Welcome`, `disableSafety` in render requests, and the payout
address in capabilities).

The rule: `v` is the major version, and peers speak only their own (messages are strict, an
unknown field is refused, so any change to a message is a new major version). It is
negotiated at the first frame of a stream: a coordinator answers a `NodeHello` of another
version with `HelloRefused`, and a client's first frame with `RequestRefused`
(`unsupported_version`), both naming the two versions, then closes. Those two refusals keep
their shape in every version, so a peer reads them whatever `v` they carry."""

SUPPORTED_WIRE_VERSIONS: Final = frozenset({WIRE_VERSION})


def unsupported_version(version: int, speaker: str = "peer") -> str:
    """Why a frame of wire version `version` is refused, for logs and refusals."""
    return f"wire version {version} is not supported: this {speaker} speaks {WIRE_VERSION}"


CONTROL_FRAME_LIMIT: Final = 64 * 1024
"""Largest frame that carries no image: offers, progress, heartbeats, requests."""

RESULT_FRAME_LIMIT: Final = 32 * 1024 * 1024
"""Largest frame that may carry an image (node results, images streamed to clients)."""

MAX_IMAGES_PER_REQUEST: Final = 512
MAX_PROMPT_CHARS: Final = 4096
MAX_LORAS: Final = 8

EMBEDDED_MODEL_ID = "sogni-shapes-64"
"""The trained model shipped inside the node package: what a render asks for by default."""

EPOCHS_PROTOCOL: Final = "/sogni/epochs/1.0.0"
"""A coordinator's published epoch folder (`epoch-N.json`, `epoch-N.tree.json`,
`receipts/0x<keccak>.json`) for nodes that claim from anywhere: a stream carries requests one
after another (`sogni_protocol.relay_messages`: an index page, or a file by name), each
answered before the next is read."""

RELAY_PROTOCOL: Final = "/sogni/relay/1.0.0"
"""Gasless claims: one `RelayClaim` per stream, answered by the transaction's hash or a
refusal; the coordinator pays the gas, the tokens go to the claiming account."""

EPOCH_FILE_LIMIT: Final = 64 * 1024 * 1024
"""Largest published file served or fetched (a receipts batch of a very busy epoch)."""

EPOCH_CHUNK_BYTES: Final = 512 * 1024
"""A file travels over `EPOCHS_PROTOCOL` in chunks of at most this many bytes."""

EPOCHS_FRAME_LIMIT: Final = 1024 * 1024
"""Largest frame on `EPOCHS_PROTOCOL`: a chunk, or an index page, with room for the map."""

EPOCH_INDEX_PAGE: Final = 1000
"""Most epochs listed in one index answer (the rest: ask again `after` the last one)."""

RELAY_FRAME_LIMIT: Final = CONTROL_FRAME_LIMIT
"""Largest frame on `RELAY_PROTOCOL` (a claim with its proof, or the answer)."""

MAX_PROOF_NODES: Final = 64
"""Longest Merkle proof accepted: a tree of 2^64 leaves."""
