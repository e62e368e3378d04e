"""Typed wire messages and their strict MessagePack codec.

Every frame is a MessagePack map with `type` (the tag below) and `v` (the wire version,
`ids.WIRE_VERSION`). Decoding refuses an unknown type, a missing field, an unknown field, a
wrong type or an out-of-range value, with an error that names the field. A frame of another
wire version raises `UnsupportedWireVersion` naming both versions (so the first frame of a
stream can be refused with that reason), except `HelloRefused` and `RequestRefused`, which
decode at any version so a peer always learns why it was refused. Nothing else in the code
base sees an unvalidated dict from the network.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sogni_protocol import ids
from sogni_protocol.errors import DECODE_ERRORS, InvalidMessage

# --- field types -------------------------------------------------------------------------
Bytes32 = Annotated[bytes, Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, Meta(min_length=65, max_length=65)]
Address = Annotated[str, Meta(pattern="^0x[0-9a-fA-F]{40}$")]
Uint32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Uint64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # msgspec bounds are int64
ModelId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
Prompt = Annotated[str, Meta(max_length=ids.MAX_PROMPT_CHARS)]
Steps = Annotated[int, Meta(ge=1, le=150)]
Guidance = Annotated[float, Meta(ge=0.0, le=30.0)]
Side = Annotated[int, Meta(ge=64, le=2048, multiple_of=8)]
ImageCount = Annotated[int, Meta(ge=1, le=ids.MAX_IMAGES_PER_REQUEST)]
Slots = Annotated[int, Meta(ge=0, le=64)]
Reason = Annotated[str, Meta(max_length=512)]
ShortText = Annotated[str, Meta(max_length=128)]
Network = Literal["fast", "relaxed"]
TokenType = Literal["spark", "sogni"]
Scheduler = Annotated[str, Meta(max_length=32, pattern=r"^[a-z0-9_]*$")]
OutputFormat = Literal["png", "jpeg", "webp"]
LoraStrength = Annotated[float, Meta(ge=-4.0, le=4.0)]
UtcDay = Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
"""A UTC calendar day, `YYYY-MM-DD` (the Daily Boost's unit of replay protection)."""
PeerId = Annotated[str, Meta(min_length=1, max_length=128)]
NetworkId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
"""The network a ledger serves (shared by its coordinators): authorizations name it."""
DEFAULT_NETWORK_ID = "sogni-local"
PriceFactorBps = Annotated[int, Meta(ge=1, le=10_000)]
"""The tier's price factor in basis points: 10000 on fast, 5000 on relaxed (signed into the
offer and the receipt, so the payer's price, the worker's pay and the epoch agree)."""
FULL_PRICE_BPS = 10_000
NO_TRAJECTORY = bytes(32)


class UnsupportedWireVersion(InvalidMessage):
    """A frame of a wire version this code does not speak."""

    def __init__(self, version: int) -> None:
        super().__init__(ids.unsupported_version(version) + " (at $.v)")
        self.version = version


class _Message(
    msgspec.Struct, tag_field="type", rename="camel", kw_only=True, forbid_unknown_fields=True
):
    v: Annotated[int, Meta(ge=ids.WIRE_VERSION, le=ids.WIRE_VERSION)] = ids.WIRE_VERSION


class _Record(msgspec.Struct, rename="camel", kw_only=True, forbid_unknown_fields=True):
    """A struct nested inside messages (no tag of its own)."""


# --- shared records ----------------------------------------------------------------------
class LoraRef(_Record, kw_only=True):
    """One LoRA a job asks for, by the id it has in the node's model store."""

    id: ModelId
    strength: LoraStrength = 1.0


Loras = Annotated[list[LoraRef], Meta(max_length=ids.MAX_LORAS)]
"""Applied in order; at most 8, as in Sogni's apps."""


class JobParams(_Record, kw_only=True):
    """What one image is rendered from. Hashed into the offer, so the node can check it."""

    model_id: ModelId
    positive_prompt: Prompt
    negative_prompt: Prompt = ""
    style_prompt: Prompt = ""
    steps: Steps
    guidance: Guidance
    scheduler: Scheduler = ""
    width: Side
    height: Side
    seed: Uint32
    loras: Loras = []
    output_format: OutputFormat = "png"


class JobOffer(_Record, kw_only=True):
    """The EIP-712 `JobOffer` the coordinator signs; field names are the typed-data names."""

    job_id: Bytes32
    coordinator: Address
    model_id: ModelId
    params_hash: Bytes32
    steps: Steps
    width: Side
    height: Side
    seed: Uint32
    work_units: Uint64
    deadline: Uint64
    price_factor_bps: PriceFactorBps = FULL_PRICE_BPS


class Receipt(_Record, kw_only=True):
    """The EIP-712 `Receipt` the node's wallet signs for each image it delivers."""

    job_id: Bytes32
    offer_hash: Bytes32
    worker: Address
    coordinator: Address
    model_id: ModelId
    result_hash: Bytes32
    steps_done: Uint32
    work_units: Uint64
    completed_at: Uint64
    price_factor_bps: PriceFactorBps = FULL_PRICE_BPS
    trajectory_root: Bytes32 = NO_TRAJECTORY
    """The Merkle root of the render's trajectory (`sogni_protocol.trajectory`): every step's
    latent and scheduler state, committed before anyone asks for one; zero: none (a partial
    receipt, or a backend that does not record one)."""
    payout: Address | None = None
    """The account this receipt's rewards go to (EIP-712 version "4" on), so a container's
    signing key can be thrown away; None: the worker itself (`payee`). Signed as `payee`."""

    @property
    def payee(self) -> str:
        """Where the worker's share of this receipt is paid: `payout`, else the worker."""
        return self.payout if self.payout is not None else self.worker


class Capabilities(_Record, kw_only=True):
    """What a node can do right now; signed (by hash) together with its peer-id binding."""

    peer_id: Annotated[str, Meta(min_length=1, max_length=128)]
    wallet: Address
    expiry: Uint64
    models: Annotated[list[ModelId], Meta(max_length=256)]
    slots: Slots
    backend: ShortText
    device: ShortText
    max_pixels: Annotated[int, Meta(ge=0, le=2**31)]
    version: ShortText = ""
    warm_models: Annotated[list[ModelId], Meta(max_length=64)] = []
    speed: Annotated[float, Meta(ge=0, le=1e6)] = 0.0
    """Measured by `sogni-node bench`: baseline render seconds / this node's (0: unmeasured)."""
    loras: Annotated[list[ModelId], Meta(max_length=256)] = []
    """LoRA ids installed on the node (a job asking for others is not offered to it)."""
    machine_id: Annotated[
        str, Meta(max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9_.:-]{0,63})?$")
    ] = ""
    """The partner cloud's machine id (SaladCloud's instance metadata), so a coordinator can
    tell two adverts of one machine apart from two machines; empty: none known."""
    payout: Address | None = None
    """Where this node's rewards go (`payout_address`; None: its wallet): work it verifies for
    others is paid there too, and a verifier is never one paid to the same account as the
    worker it checks."""
    mode: ShortText = ""
    """The numeric mode it renders and re-checks in (its backend's `dtype_name`, what its
    receipts declare; a reduced-precision mode names its code path, `bfloat16@cpu-...`): a
    render in a path-bound mode is re-checked only by a node advertising the same mode;
    empty: not said (an older node)."""


class RenderMeta(_Record, kw_only=True):
    """How an image was made, so a later check compares with the right tolerance."""

    backend: ShortText
    device: ShortText
    dtype: ShortText
    threads: Annotated[int, Meta(ge=0, le=1024)]


# --- client <-> coordinator (/sogni/client/1.0.0) ---------------------------------------
class RenderRequest(_Message, tag="renderRequest", kw_only=True):
    """Field names follow Sogni's public client SDK."""

    model_id: ModelId
    positive_prompt: Prompt
    negative_prompt: Prompt = ""
    style_prompt: Prompt = ""
    steps: Steps = 20
    guidance: Guidance = 7.5
    scheduler: Scheduler = ""
    width: Side = 512
    height: Side = 512
    seed: Uint32 = 0
    number_of_images: ImageCount = 1
    loras: Loras = []
    output_format: OutputFormat = "png"
    network: Network = "fast"
    token_type: TokenType = "spark"
    payer: Address | None = None
    """Wallet that pays; proven by `payer_signature` (EIP-712 `RenderAuthorization`)."""
    network_id: NetworkId = DEFAULT_NETWORK_ID
    """The network (ledger) the payer authorizes this request on: spent once across it."""
    nonce: Annotated[bytes, Meta(max_length=32)] = b""
    expiry: Uint64 = 0
    payer_signature: Signature | None = None
    disable_safety: bool = False
    """The SDKs' `disableSafety`: asks for adult content, which a coordinator renders only
    when its operator allows it (`[content] allow_adult`, docs/CONTENT_POLICY.md); prompts
    about minors are refused whatever it says."""


def job_params(request: RenderRequest, index: int) -> JobParams:
    """The parameters of image `index` of `request`: the request's own, seed + index (mod 2^32).

    The one definition of the request -> jobs split; coordinators, benchmarks and tests use it.
    """
    return JobParams(
        model_id=request.model_id,
        positive_prompt=request.positive_prompt,
        negative_prompt=request.negative_prompt,
        style_prompt=request.style_prompt,
        steps=request.steps,
        guidance=request.guidance,
        scheduler=request.scheduler,
        width=request.width,
        height=request.height,
        seed=(request.seed + index) % 2**32,
        loras=request.loras,
        output_format=request.output_format,
    )


def split_request(request: RenderRequest) -> list[JobParams]:
    """One `JobParams` per image of `request`, in order."""
    return [job_params(request, i) for i in range(request.number_of_images)]


class RequestAccepted(_Message, tag="requestAccepted", kw_only=True):
    request_id: Bytes32
    job_ids: Annotated[list[Bytes32], Meta(max_length=ids.MAX_IMAGES_PER_REQUEST)]
    chain_id: Uint64
    verifying_contract: Address
    cost_micro: Uint64 = 0
    """Reserved price in micro units of the request's token type (0 when billing is off)."""
    resume_token: Bytes32
    """The requester's secret for `ResumeRequest`: only it can re-attach or collect later.
    The coordinator keeps only its hash; the request id alone is not a secret."""


class ResumeRequest(_Message, tag="resumeRequest", kw_only=True):
    """First frame of a stream that re-attaches to an accepted request (after a lost
    connection or a coordinator restart, or to collect later). Answered by `RequestResumed`
    then every image not yet acknowledged, or `RequestRefused` (`unauthorized`)."""

    request_id: Bytes32
    token: Bytes32


class RequestResumed(_Message, tag="requestResumed", kw_only=True):
    request_id: Bytes32
    job_ids: Annotated[list[Bytes32], Meta(max_length=ids.MAX_IMAGES_PER_REQUEST)]
    chain_id: Uint64
    verifying_contract: Address
    acked: Annotated[list[Bytes32], Meta(max_length=ids.MAX_IMAGES_PER_REQUEST)] = []
    """Jobs whose images the client already acknowledged: they are not sent again."""


class ImageAck(_Message, tag="imageAck", kw_only=True):
    """The client has these images (saved, or handed to the app): the coordinator records
    them as delivered, never sends them again and may delete its copies."""

    request_id: Bytes32
    job_ids: Annotated[list[Bytes32], Meta(min_length=1, max_length=ids.MAX_IMAGES_PER_REQUEST)]


class RequestRefused(_Message, tag="requestRefused", kw_only=True):
    code: ShortText
    reason: Annotated[str, Meta(max_length=4096)]  # may carry the quote as JSON


class JobProgress(_Message, tag="jobProgress", kw_only=True):
    job_id: Bytes32
    index: Uint32
    step: Uint32
    steps: Uint32


class JobImage(_Message, tag="jobImage", kw_only=True):
    job_id: Bytes32
    index: Uint32
    seed: Uint32
    image: bytes
    receipt: Receipt
    signature: Signature
    meta: RenderMeta


class JobFailed(_Message, tag="jobFailed", kw_only=True):
    """A job the coordinator gave up on after too many failed attempts; nothing is charged."""

    job_id: Bytes32
    index: Uint32
    reason: Reason


class CancelRequest(_Message, tag="cancelRequest", kw_only=True):
    """The client gives up on the rest of its request; it pays only for steps done."""

    request_id: Bytes32


class RequestDone(_Message, tag="requestDone", kw_only=True):
    request_id: Bytes32
    delivered: Uint32
    failed: Uint32
    cancelled: Uint32 = 0


class Balances(_Record, kw_only=True):
    """A payer's holdings in micro units (1e-6): free Daily Boost Spark, paid Spark, SOGNI."""

    spark_free: Uint64 = 0
    spark_paid: Uint64 = 0
    sogni: Uint64 = 0


class DailyBoostClaim(_Message, tag="dailyBoostClaim", kw_only=True):
    """Claim the free Daily Boost Spark for `day` (must be today, UTC), signed by the payer
    (EIP-712 `DailyBoostClaim`). The coordinator grants it once per payer and day, so a
    replayed claim is refused; answered by `BoostGranted` or `RequestRefused`."""

    payer: Address
    day: UtcDay
    signature: Signature
    network_id: NetworkId = DEFAULT_NETWORK_ID


class BoostGranted(_Message, tag="boostGranted", kw_only=True):
    payer: Address
    day: UtcDay
    amount_micro: Uint64
    """Free Spark granted, in micro-Spark."""
    balances: Balances
    next_claim_at: Uint64
    """Unix time the next claim opens (the next 00:00 UTC)."""


class BalanceQuery(_Message, tag="balanceQuery", kw_only=True):
    """Read one's own balances, signed by the payer (EIP-712 `BalanceQuery`) for the peer id
    that sends it and until `expiry`, so a copied query is useless to anyone else."""

    payer: Address
    peer_id: PeerId
    expiry: Uint64
    signature: Signature


class BalanceReport(_Message, tag="balanceReport", kw_only=True):
    payer: Address
    balances: Balances
    """What the payer can spend now."""
    reserved: Balances
    """Held for the payer's requests still running (settled per image, the rest refunded)."""
    boost_available: bool
    """The Daily Boost has not been claimed today (UTC)."""
    next_boost_at: Uint64
    """Unix time the Daily Boost can next be claimed (now, if it is available)."""


# --- node <-> coordinator (/sogni/jobs/1.0.0) --------------------------------------------
class NodeHello(_Message, tag="nodeHello", kw_only=True):
    """First frame of a pull stream: who the node is and what it can render."""

    capabilities: Capabilities
    binding_signature: Signature


class HelloRefused(_Message, tag="helloRefused", kw_only=True):
    """Coordinator's answer to a hello it refuses (wire version, binding, blacklist), sent
    before it closes the stream. Its shape never changes, so any version can read it."""

    reason: Annotated[str, Meta(max_length=2000)]


class KeyRotation(_Record, kw_only=True):
    """A coordinator's offer-signing key handing over to a new one: signed (EIP-712
    `KeyRotation`) by `old_key`, so a node that trusts the old key may trust the new one
    without its operator editing `trusted_coordinators` (docs/OPERATIONS.md, "Rotating the
    offer key")."""

    old_key: Address
    new_key: Address
    not_before: Uint64
    """Unix seconds from which the new key signs offers."""


class SignedKeyRotation(_Record, kw_only=True):
    rotation: KeyRotation
    signature: Signature
    """By `rotation.old_key`, over the EIP-712 `KeyRotation` under the coordinator's domain."""


MAX_SET_SIGNERS = 256
"""Coordinators one network signer set names (`sogni_protocol.signer_set`)."""
HexSignature = Annotated[str, Meta(pattern="^0x[0-9a-fA-F]{130}$")]


class NetworkSignerSet(_Record, kw_only=True):
    """The offer keys of one network's coordinators, as its operator signs them (EIP-712
    `NetworkSignerSet`; the rules and the file: `sogni_protocol.signer_set`)."""

    network_id: NetworkId
    serial: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    """Raised by one for each new set; the highest accepted wins."""
    signers: Annotated[list[Address], Meta(min_length=1, max_length=MAX_SET_SIGNERS)]
    issued_at: Annotated[int, Meta(ge=0, le=2**63 - 1)]


class SignedSignerSet(_Record, kw_only=True):
    set: NetworkSignerSet
    operator: Address
    """Who signed it (checked against the recovered signer and the configured operators)."""
    signature: HexSignature


SIGNER_SET_FEATURE = "+signer-set"
"""A word in a node's `Capabilities.version`: it reads `Welcome.signer_set`. A coordinator
sends the set only to such nodes, so a node that predates the field (it would refuse the
unknown field) is welcomed as before."""


class Welcome(_Message, tag="welcome", kw_only=True):
    """Coordinator's answer: its offer-signing address and the EIP-712 domain for receipts."""

    coordinator: Address
    chain_id: Uint64
    verifying_contract: Address
    heartbeat_interval: Annotated[float, Meta(gt=0, le=300)]
    rotations: Annotated[list[SignedKeyRotation], Meta(max_length=16)] = []
    """The chain of key rotations from an older offer key to `coordinator`, oldest first: a
    node that trusts any key on it trusts `coordinator` too (each link signed by the key it
    replaces)."""
    signer_set: SignedSignerSet | msgspec.UnsetType = msgspec.UNSET
    """The network's operator-signed signer set this coordinator serves (its
    `network_signers.json`), sent only to a node whose `Capabilities.version` names
    `SIGNER_SET_FEATURE`; left out of the frame when unset, so a `Welcome` without it is
    the same bytes as before the field existed. The node checks it as any other copy
    (`sogni_node.trust.NetworkSigners`: operator's signature, serial only goes up)."""


class CapabilitiesUpdate(_Message, tag="capabilitiesUpdate", kw_only=True):
    """Node -> coordinator during a session: what it can render changed (a model or LoRA
    added or removed while it runs). Same content and binding signature as `NodeHello`."""

    capabilities: Capabilities
    binding_signature: Signature


MAX_LOOKAHEAD = 4
"""The most offers a node may hold in hand beyond its slots (`Ready`): the node asks for at
most this many (`sogni_node.worker.Worker.lookahead`), the coordinator honours no more."""


class Ready(_Message, tag="ready", kw_only=True):
    """Credit-based flow control: how many offers the node can hold, those in flight
    included. A pipelining node says its slots + n, n offers in hand while it renders (1, or
    up to `MAX_LOOKAHEAD` when its renders beat the round trip; the coordinator then returns
    a credit with each acked result); an older node says its free slots. `warm_models` are
    loaded now, so jobs for them start without a load."""

    slots: Slots
    warm_models: Annotated[list[ModelId], Meta(max_length=64)] = []


class Offer(_Message, tag="offer", kw_only=True):
    offer: JobOffer
    params: JobParams
    signature: Signature


class OfferDeclined(_Message, tag="offerDeclined", kw_only=True):
    job_id: Bytes32
    reason: Reason


class Progress(_Message, tag="progress", kw_only=True):
    job_id: Bytes32
    step: Uint32


class Cancel(_Message, tag="cancel", kw_only=True):
    """Stop at the next step. With `pay_partial` (the client cancelled) the node sends a
    receipt for the steps done, without an image; otherwise it just hands the job back."""

    job_id: Bytes32
    pay_partial: bool = False


class Result(_Message, tag="result", kw_only=True):
    job_id: Bytes32
    image: bytes
    receipt: Receipt
    signature: Signature
    meta: RenderMeta


class ResultAck(_Message, tag="resultAck", kw_only=True):
    job_id: Bytes32
    accepted: bool
    reason: Reason = ""


class HandBack(_Message, tag="handBack", kw_only=True):
    """The node gives a job back unfinished (shutdown, failure); it goes back to the queue."""

    job_id: Bytes32
    steps_done: Uint32
    reason: Reason


class Heartbeat(_Message, tag="heartbeat", kw_only=True):
    seq: Uint64


class Goodbye(_Message, tag="goodbye", kw_only=True):
    reason: Reason = ""


# --- challenges (docs/TRAJECTORY.md, "Challenges") ---------------------------------------
MAX_CHALLENGE_STEPS = 16
"""Most leaves one `Challenge` may ask for (8 step pairs)."""
MAX_STEP_ENTRIES = 64
"""Most committed entries (tensors plus scalars) one revealed step may carry."""
EntryName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.]+$")]
Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
TensorDtype = Literal["float32", "float16", "bfloat16"]
"""`sogni_protocol.trajectory.DTYPES`: the compute dtypes a committed tensor may name."""


class TensorEntry(_Record, kw_only=True):
    """One committed tensor of a revealed step: float32 little-endian bytes (C order), its
    shape, and the dtype it was computed in (`sogni_protocol.trajectory.TensorBytes`)."""

    name: EntryName
    dtype: TensorDtype
    shape: Annotated[list[Uint32], Meta(max_length=8)]
    data: bytes

    def __post_init__(self) -> None:
        size = 4
        for d in self.shape:
            size *= d
        if len(self.data) != size:
            raise ValueError(
                f"tensor {self.name!r} of shape {self.shape} needs {size} bytes, "
                f"got {len(self.data)}"
            )


class ScalarEntry(_Record, kw_only=True):
    """One committed scalar of a revealed step (an int, a float, or None)."""

    name: EntryName
    value: Int64 | float | None


class StepOpeningWire(_Record, kw_only=True):
    """Leaf `step` revealed: every entry its digest commits to, and its Merkle proof."""

    step: Uint32
    tensors: Annotated[list[TensorEntry], Meta(min_length=1, max_length=MAX_STEP_ENTRIES)]
    scalars: Annotated[list[ScalarEntry], Meta(max_length=MAX_STEP_ENTRIES)] = []
    proof: Annotated[list[Bytes32], Meta(max_length=ids.MAX_PROOF_NODES)]
    n_leaves: Annotated[int, Meta(ge=1, le=2**32 - 1)]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors] + [s.name for s in self.scalars]
        if len(names) > MAX_STEP_ENTRIES:
            raise ValueError(f"a step has at most {MAX_STEP_ENTRIES} entries")
        if len(set(names)) != len(names):
            raise ValueError("entry names repeat")
        if "latents" not in {t.name for t in self.tensors}:
            raise ValueError("a step reveals a 'latents' tensor")
        if self.step >= self.n_leaves:
            raise ValueError(f"step {self.step} is outside a tree of {self.n_leaves} leaves")

    @property
    def latents(self) -> TensorEntry:
        """The revealed latent (every opening has one: checked on decode)."""
        return next(t for t in self.tensors if t.name == "latents")


OPEN_PIXELS_FEATURE = "+open-pixels"
"""A word in a node's `Capabilities.version`: it keeps the lossless pixels of its JPEG and
WebP renders and opens them when a `Challenge` asks (`Challenge.pixels`). A coordinator asks
only such nodes, so a node that predates the field (it would refuse it) is challenged as
before, and its lossy images are checked by the block rule (docs/IMAGE_CHECK.md)."""


class PixelsOpening(_Record, kw_only=True):
    """The lossless pixels a JPEG or WebP result was encoded from (the uint8 RGB the backend
    produced, as a PNG of only IHDR, IDAT and IEND), and the node's encoder build
    (`sogni_protocol.image_encoding.encoder_build`): the coordinator checks the pixels against
    a verifier's decode and the delivered file against its own encode of them."""

    png: Annotated[bytes, Meta(min_length=8, max_length=ids.RESULT_FRAME_LIMIT)]
    encoder: ShortText = ""


class Challenge(_Message, tag="challenge", kw_only=True):
    """Coordinator -> node: reveal these leaves of the job's committed trajectory (with
    proofs) before `deadline` (unix seconds). Answered by `ChallengeAnswer` or
    `ChallengeRefused`."""

    job_id: Bytes32
    steps: Annotated[list[Uint32], Meta(min_length=1, max_length=MAX_CHALLENGE_STEPS)]
    deadline: Uint64
    pixels: bool | msgspec.UnsetType = msgspec.UNSET
    """True: also open the lossless pixels the job's JPEG or WebP was encoded from
    (`ChallengeAnswer.pixels`; docs/IMAGE_CHECK.md, "Opened pixels"). Sent only to a node
    whose `Capabilities.version` names `OPEN_PIXELS_FEATURE`; left out of the frame when
    unset, so a `Challenge` without it is the same bytes as before the field existed."""

    def __post_init__(self) -> None:
        if len(set(self.steps)) != len(self.steps):
            raise ValueError("challenged steps repeat")


class ChallengeAnswer(_Message, tag="challengeAnswer", kw_only=True):
    """Node -> coordinator: the asked leaves, opened. May be megabytes: it travels under the
    result frame limit."""

    job_id: Bytes32
    openings: Annotated[list[StepOpeningWire], Meta(min_length=1, max_length=MAX_CHALLENGE_STEPS)]
    pixels: PixelsOpening | msgspec.UnsetType = msgspec.UNSET
    """Only when the `Challenge` asked (`Challenge.pixels`) and the node still has them;
    left out of the frame otherwise (an older coordinator refuses the unknown field)."""


class ChallengeRefused(_Message, tag="challengeRefused", kw_only=True):
    """Node -> coordinator: it cannot answer (trajectory gone, step out of range), or not
    now (`reason` starting with `CHALLENGE_BUSY`: too many challenges waiting; ask again)."""

    job_id: Bytes32
    reason: Reason


CHALLENGE_BUSY = "busy:"
"""How a `ChallengeRefused.reason` says "not now": the coordinator asks again until its
deadline, and an answer that never comes then fails the check without a strike (nothing is
paid unchecked: a node that always says busy is never paid)."""


# --- verifier nodes (docs/VERIFICATION.md, "Verifier nodes") --------------------------------
class VerifyStep(_Message, tag="verifyStep", kw_only=True):
    """Coordinator -> a verifier node (another wallet than the worker's): re-run denoising
    step `k` (0-based, x_k -> x_{k+1}) of a render from the committed leaf k and answer
    `StepVerified` with x'_{k+1}, or `VerifyRefused`, before `deadline` (unix seconds).

    `check_id` is random, never the job id; the verifier is not told whose job it is. It does
    see the job's parameters (`params`: the prompt too), since re-running a step needs them.
    `dtype` is the numeric mode the worker declared (`RenderMeta.dtype`): the verifier runs
    only in that mode, else refuses. `scheduler` "" means the model's default. May exceed a
    control frame (a 512 x 512 latent is 64 KiB): it travels under the result frame limit."""

    check_id: Bytes32
    model_id: ModelId
    params: JobParams
    scheduler: Scheduler
    dtype: ShortText
    k: Uint32
    opening: StepOpeningWire
    deadline: Uint64

    def __post_init__(self) -> None:
        if self.model_id != self.params.model_id:
            raise ValueError("model_id differs from the parameters' model")
        if self.k >= self.params.steps:
            raise ValueError(f"step {self.k} is outside a render of {self.params.steps} steps")
        if self.opening.step != self.k:
            raise ValueError(f"opening of leaf {self.opening.step} for step {self.k}")


class StepVerified(_Message, tag="stepVerified", kw_only=True):
    """Verifier -> coordinator: its x'_{k+1} (float32, `latents`). `x_k_scale` is what it
    multiplied leaf k by to get x_k (the scheduler's `init_noise_sigma` for k = 0, since
    leaf 0 is the unscaled noise; 1 otherwise), so the coordinator measures the committed
    step from the same x_k. `start_distance` (k = 0 only, else None): |leaf 0 - noise| / |noise|
    where noise is the job seed's initial noise as the verifier regenerates it (inf when
    leaf 0 has another shape): the seed check (docs/VERIFICATION.md, "Seed check"). Travels
    under the result frame limit."""

    check_id: Bytes32
    latents: TensorEntry
    x_k_scale: Annotated[float, Meta(gt=0.0, le=1e6)] = 1.0
    start_distance: Annotated[float, Meta(ge=0.0)] | None = None


class VerifyDecode(_Message, tag="verifyDecode", kw_only=True):
    """Coordinator -> a verifier node: decode the committed final latent (leaf N, `opening`)
    of a `width` x `height` render of `model_id` with the model's VAE, in the declared mode
    `dtype`, and answer `DecodeVerified` with the image, or `VerifyRefused`, before
    `deadline`. The coordinator compares that image with the one the worker delivered, so a
    worker cannot commit one trajectory and deliver another image (docs/VERIFICATION.md,
    "Image check"). Carries no prompt. Travels under the result frame limit."""

    check_id: Bytes32
    model_id: ModelId
    dtype: ShortText
    width: Annotated[int, Meta(ge=8, le=4096)]
    height: Annotated[int, Meta(ge=8, le=4096)]
    opening: StepOpeningWire
    deadline: Uint64


class DecodeVerified(_Message, tag="decodeVerified", kw_only=True):
    """Verifier -> coordinator: the VAE decode of the final latent of a `VerifyDecode` (or
    the image of a `VerifyRender`), as a lossless PNG. Travels under the result frame limit."""

    check_id: Bytes32
    image: Annotated[bytes, Meta(max_length=ids.RESULT_FRAME_LIMIT)]
    start_distance: Annotated[float, Meta(ge=0.0)] | msgspec.UnsetType = msgspec.UNSET
    """Only answering a `VerifyRender` with `start_latents`: |leaf 0 - noise| / |noise|, the
    noise the job's seed draws rounded as the closest of float32, float16 and bfloat16 (`inf`
    for a leaf of another shape). Unset otherwise (not encoded)."""


RERENDER_FEATURE = "+rerender"
"""A word in a node's `Capabilities.version`: it answers `VerifyRender` (a whole re-render of
a job, for a receipt the step checks cannot cover). A coordinator sends `VerifyRender` only to
such nodes, so a node that predates the message never receives a frame it cannot read."""


RERENDER_SEED_FEATURE = "+rerender-seed"
"""A word in a node's `Capabilities.version`: it honours `VerifyRender.start_latents` (measures
the worker's committed leaf 0 against the job seed's noise: the seed check of a re-rendered
receipt). A coordinator sends `start_latents` only to such nodes."""


RERENDER_WEIGHTS_FEATURE = "+rerender-weights"
"""A word in a node's `Capabilities.version`: it honours `VerifyRender.weights` (re-renders
with another node's quantized weights reproduced). A coordinator sends a non-empty `weights`
only to such nodes."""


class VerifyRender(_Message, tag="verifyRender", kw_only=True):
    """Coordinator -> a verifier node (another wallet than the worker's): render the whole job
    `params` again, from its seed, in the verifier's own numeric mode `dtype` (the coordinator
    asks only a node advertising it: the reference mode, float32), and answer `DecodeVerified`
    with the image as a lossless PNG, or `VerifyRefused`, before `deadline`. For a receipt
    whose declared mode has no measured step tolerance, or that commits no trajectory
    (docs/VERIFICATION.md, "Whole re-render"). Like `VerifyStep`, carries the prompt, never
    the job id. Sent only to a node naming `RERENDER_FEATURE`.

    `weights` (set only for a node naming `RERENDER_WEIGHTS_FEATURE`): the worker's
    weights as `<dtype>+<quantization>` (e.g. `bfloat16+quanto-int4`), for a mode whose
    rounding alone moves the picture too far (4-bit, fp8): the verifier casts its denoiser's
    weights to that dtype, quantizes them as that mode does and computes with them
    dequantized, in its own `dtype`."""

    check_id: Bytes32
    model_id: ModelId
    params: JobParams
    dtype: ShortText
    deadline: Uint64
    weights: ShortText | msgspec.UnsetType = msgspec.UNSET
    """Unset (not encoded, so a `+rerender` node that predates the field reads the frame)
    unless the worker's weights must be reproduced."""
    start_latents: TensorEntry | msgspec.UnsetType = msgspec.UNSET
    """The worker's leaf 0 (its starting noise, unscaled), opened and proved against its
    receipt's trajectory root by the coordinator, for a node naming `RERENDER_SEED_FEATURE`:
    the answer then carries `start_distance`. Without it a re-render would pass another seed's
    image whenever the model draws much the same picture for both seeds."""

    def __post_init__(self) -> None:
        if self.model_id != self.params.model_id:
            raise ValueError("model_id differs from the parameters' model")


VerifyRefusalCode = Literal[
    "bad_leaf", "mode", "model", "backend", "scheduler", "loras", "deadline", "too_large", "other"
]
"""Why a verifier refused, for the coordinator to act on (the reason is for people):
`bad_leaf` blames the worker's committed leaf (a latent of the wrong size, a multistep leaf
without its state: re-running it raised ValueError); every other code says nothing about the
worker (another numeric mode, the model or its LoRAs not here, a backend or scheduler that
cannot re-run, a deadline already past, an answer over the frame limit, a crash)."""


class VerifyRefused(_Message, tag="verifyRefused", kw_only=True):
    """Verifier -> coordinator: it cannot re-run the step or decode the latent (`code`)."""

    check_id: Bytes32
    reason: Reason
    code: VerifyRefusalCode = "other"


# --- content reports (client -> coordinator, docs/SAFETY.md "Reports") --------------------
ReportReason = Literal["minor", "sexual", "violence", "hate", "other"]
ReportNote = Annotated[str, Meta(max_length=1000)]
ImageIndex = Annotated[int, Meta(ge=-1, le=ids.MAX_IMAGES_PER_REQUEST - 1)]
"""An image of a request by index; -1: every image of it."""


class ContentReport(_Message, tag="contentReport", kw_only=True):
    """Report a request's images to the coordinator's operator, signed by the request's payer
    (EIP-712 `ContentReport`, `sogni_protocol.report_signing`) for the sending peer id and
    until `expiry`. Answered by `ReportFiled` or `RequestRefused`."""

    payer: Address
    peer_id: PeerId
    request_id: Bytes32
    image_index: ImageIndex = -1
    reason: ReportReason
    note: ReportNote = ""
    """Free text for the operator: kept with the report, never logged."""
    expiry: Uint64
    signature: Signature


class ReportFiled(_Message, tag="reportFiled", kw_only=True):
    report_id: Uint64
    """The operator's handle (`sogni-coordinator reports show ID`)."""


# --- referral codes (client -> coordinator, docs/ECONOMICS.md "Referral codes") ------------
ReferralCode = Annotated[str, Meta(max_length=40)]


class ReferralQuery(_Message, tag="referralQuery", kw_only=True):
    """Read one's referral code, and with `code` apply someone's, signed by the payer
    (EIP-712 `ReferralQuery`, `sogni_protocol.referral_signing`) for the sending peer id and
    until `expiry`. Answered by `ReferralReport` or `RequestRefused`."""

    payer: Address
    peer_id: PeerId
    code: ReferralCode = ""
    """Empty: only read; else the referrer's code to record."""
    expiry: Uint64
    signature: Signature


class ReferralReport(_Message, tag="referralReport", kw_only=True):
    payer: Address
    code: ReferralCode
    """The payer's own code, to hand out."""
    referred_by: Address | None = None


ClientMessage = (
    RenderRequest
    | ResumeRequest
    | ImageAck
    | CancelRequest
    | DailyBoostClaim
    | BalanceQuery
    | ContentReport
)
CoordinatorToClient = (
    RequestAccepted
    | RequestResumed
    | RequestRefused
    | JobProgress
    | JobImage
    | JobFailed
    | RequestDone
    | BoostGranted
    | BalanceReport
    | ReportFiled
)
NodeToCoordinator = (
    NodeHello
    | CapabilitiesUpdate
    | Ready
    | OfferDeclined
    | Progress
    | Result
    | HandBack
    | Heartbeat
    | Goodbye
    | ChallengeAnswer
    | ChallengeRefused
    | StepVerified
    | DecodeVerified
    | VerifyRefused
)
CoordinatorToNode = (
    Welcome
    | HelloRefused
    | Offer
    | Cancel
    | ResultAck
    | Heartbeat
    | Challenge
    | VerifyStep
    | VerifyDecode
    | VerifyRender
)
Message = (
    RenderRequest
    | RequestAccepted
    | ResumeRequest
    | RequestResumed
    | ImageAck
    | RequestRefused
    | JobProgress
    | JobImage
    | JobFailed
    | CancelRequest
    | RequestDone
    | DailyBoostClaim
    | BoostGranted
    | BalanceQuery
    | BalanceReport
    | NodeHello
    | CapabilitiesUpdate
    | HelloRefused
    | Welcome
    | Ready
    | Offer
    | OfferDeclined
    | Progress
    | Cancel
    | Result
    | ResultAck
    | HandBack
    | Heartbeat
    | Goodbye
    | Challenge
    | ChallengeAnswer
    | ChallengeRefused
    | VerifyStep
    | StepVerified
    | VerifyDecode
    | VerifyRender
    | DecodeVerified
    | VerifyRefused
    | ContentReport
    | ReportFiled
    | ReferralQuery
    | ReferralReport
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: _Message | _Record) -> bytes:
    """Canonical MessagePack: fields in declaration order, so hashes of records are stable."""
    return _encoder.encode(message)


class _Envelope(msgspec.Struct):
    """What every version's frames share: enough to tell the version (other fields ignored)."""

    type: str = ""
    v: int = ids.WIRE_VERSION


class _AnyRefusal(msgspec.Struct):
    type: str
    code: str = ""
    reason: str = ""


def _other_version(payload: bytes) -> Message | None:
    """A frame of another wire version: its refusal if it is one, else raise."""
    try:
        envelope = msgspec.msgpack.decode(payload, type=_Envelope)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    if envelope.v in ids.SUPPORTED_WIRE_VERSIONS:
        return None
    if envelope.type in ("helloRefused", "requestRefused"):
        try:
            r = msgspec.msgpack.decode(payload, type=_AnyRefusal)
        except msgspec.ValidationError:
            raise UnsupportedWireVersion(envelope.v) from None
        if envelope.type == "helloRefused":
            return HelloRefused(reason=r.reason[:2000])
        return RequestRefused(code=r.code[:128], reason=r.reason[:4096])
    raise UnsupportedWireVersion(envelope.v)


QUOTED_LIMIT = 40
"""Characters of a refused value that an error quotes (msgspec's "Invalid enum value
'...'" quotes the whole value, which the peer chose: up to a frame's size)."""
ERROR_LIMIT = 500
"""Characters of a decode error's text at most."""
_QUOTED = re.compile(r"'(.*)'(?= - at `|$)", re.DOTALL)


def _bounded(text: str) -> str:
    """msgspec's error text with the value it quotes cut to `QUOTED_LIMIT` characters, and
    the whole to `ERROR_LIMIT`: errors are logged and sent back to the peer."""

    def cut(m: re.Match[str]) -> str:
        value = m.group(1)
        if len(value) <= QUOTED_LIMIT:
            return m.group(0)
        return f"'{value[:QUOTED_LIMIT]}...' ({len(value)} characters)"

    return _QUOTED.sub(cut, text, count=1)[:ERROR_LIMIT]


def decode(payload: bytes) -> Message:
    """Decode one frame payload into a typed message, or raise `InvalidMessage`
    (`UnsupportedWireVersion` for a frame of another wire version); its text quotes at most
    `QUOTED_LIMIT` characters of a refused value."""
    try:
        return _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        try:
            refusal = _other_version(payload)
        except DECODE_ERRORS as again:
            raise InvalidMessage(f"not a MessagePack message: {_bounded(str(again))}") from None
        if refusal is not None:
            return refusal
        raise InvalidMessage(f"invalid message: {_bounded(str(exc))}") from None
    except DECODE_ERRORS as exc:
        raise InvalidMessage(f"not a MessagePack message: {_bounded(str(exc))}") from None
