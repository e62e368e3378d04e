"""Charging for requests: quote, reserve on accept, settle per receipt, refund the rest.

A request that names a payer must carry the payer's EIP-712 authorization of exactly that
request; the price is reserved before the request is accepted (a payer who cannot afford it
is refused with the quote), each verified receipt moves one image's value from the
reservation to the worker, the platform and the model creator, and whatever was not
delivered goes back to the payer when the request ends. Requests without a payer are free
unless the operator requires payment (`billing = "required"`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

from sogni_coordinator.ledger import (
    InsufficientFunds,
    Ledger,
    LedgerError,
    Reservation,
    partial_value,
)
from sogni_protocol import eip712
from sogni_protocol.catalog import Catalog
from sogni_protocol.eip712 import Domain
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import RenderRequest
from sogni_protocol.pricing import quote

log = get_logger(__name__)

BillingMode = Literal["off", "optional", "required"]
MAX_AUTHORIZATION_SECONDS = 24 * 3600
"""A payer authorization may not outlive a day: it bounds the replay memory."""


class Refusal(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Billing:
    ledger: Ledger
    domain: Domain
    mode: BillingMode = "optional"
    catalog: Catalog | None = None
    take_rate_bps: int = 2000
    creator_share_bps: int = 500
    _reservations: dict[bytes, Reservation] = field(default_factory=dict)
    _models: dict[bytes, str] = field(default_factory=dict)
    _seen: dict[bytes, int] = field(default_factory=dict)

    def admit(self, request: RenderRequest, request_id: bytes) -> int:
        """Reserve the request's price; returns it (micro units) or raises `Refusal`."""
        if self.mode == "off" or (request.payer is None and self.mode == "optional"):
            return 0
        now = time.time()
        fault = eip712.check_payer(self.domain, request, now)
        if fault is not None:
            raise Refusal("unauthorized", fault)
        if request.expiry > now + MAX_AUTHORIZATION_SECONDS:
            raise Refusal("unauthorized", "payer authorization expires more than a day ahead")
        digest = eip712.request_hash(request)
        self._seen = {h: exp for h, exp in self._seen.items() if exp >= now}
        if digest in self._seen:
            raise Refusal("replayed", "this signed request was already submitted")
        q = quote(request, self.catalog)
        assert request.payer is not None
        try:
            reservation = self.ledger.reserve(request_id, request.payer, q)
        except InsufficientFunds as exc:
            reason = f"{exc}; quote: {json.dumps(q.to_dict())}"
            raise Refusal("insufficient_funds", reason) from None
        self._seen[digest] = request.expiry
        self._reservations[request_id] = reservation
        self._models[request_id] = request.model_id
        return reservation.total

    def settle(
        self, request_id: bytes, job_id: bytes, worker: str, steps_done: int, steps: int
    ) -> None:
        """One receipt: pay its value (pro rata for a cancelled job) out of the reservation."""
        reservation = self._reservations.get(request_id)
        if reservation is None:
            return
        try:
            self.ledger.settle(
                request_id,
                partial_value(reservation.per_image, steps_done, steps),
                worker,
                self.take_rate_bps,
                self.creator_share_bps,
                model_id=self._models[request_id],
                job_id=job_id,
            )
        except LedgerError as exc:  # the receipt is stored; the money can be reconciled
            log.error("ledger_settle_failed", request=request_id.hex()[:16], error=str(exc))

    def finish(self, request_id: bytes) -> None:
        """The request ended (all delivered, failed or given up): refund what is left."""
        if self._reservations.pop(request_id, None) is None:
            return
        self._models.pop(request_id, None)
        refunded = self.ledger.refund(request_id)
        if any(refunded.values()):
            log.info("request_refunded", request=request_id.hex()[:16], refunded=refunded)
