"""What a failed check saw, kept with the failed receipt for a dispute.

Why: a worker struck on a verifier's word may dispute it; the operator (or a later,
stronger check) then needs what the coordinator had: the leaves the worker opened (with
their Merkle proofs, so they are provably its committed ones), each verifier's answer,
the distance and the tolerance, and a third wallet's re-run when one was asked.
`Outcome.evidence` carries it as MessagePack (`encode_evidence`); the dispatcher stores it
(`Store.fail_held_receipt`) and `Store.failed_evidence(job_id)` returns it for
`decode_evidence`. Holds no prompt beyond what the opened leaves are (latents only).
"""

from __future__ import annotations

import msgspec

from sogni_protocol.messages import ChallengeAnswer, TensorEntry

__all__ = ["Evidence", "StepEvidence", "VerifierAnswer", "decode_evidence", "encode_evidence"]

EVIDENCE_VERSION = 1


class VerifierAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """One verifier's answer for one step (or the image check)."""

    verifier: str | None
    """Its wallet (None: no verifier answered)."""
    distance: float | None
    tolerance: float
    passed: bool
    reason: str
    code: str | None = None
    """Its refusal code, when it refused."""
    latents: TensorEntry | None = None
    """Its x'_{k+1}, when it answered a step."""


class StepEvidence(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    kind: str = "step"
    """`step` (re-run step k: leaf k -> leaf k + 1) or `image` (the final leaf decoded)."""
    first: VerifierAnswer
    third: VerifierAnswer | None = None
    """A third wallet's re-run of the same step, when the first answer was over tolerance."""
    probe_passed: bool | None = None
    """With no third wallet: whether the first verifier then passed a known-answer probe
    (None: no probe was available or answered)."""


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    v: int = EVIDENCE_VERSION
    reason: str
    """The verdict's reason, as stored with the failed receipt."""
    challenge: ChallengeAnswer | None = None
    """The worker's opened leaves, as it sent them."""
    challenge_refused: str | None = None
    """Why there were none (the node's refusal, no answer in time, ...)."""
    steps: list[StepEvidence] = msgspec.field(default_factory=list)


def encode_evidence(evidence: Evidence) -> bytes:
    return msgspec.msgpack.encode(evidence)


def decode_evidence(data: bytes) -> Evidence:
    """The stored evidence (raises `msgspec.DecodeError`/`ValidationError` if it is not)."""
    return msgspec.msgpack.decode(data, type=Evidence)
