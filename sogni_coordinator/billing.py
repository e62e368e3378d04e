"""Charging for requests: quote, reserve on accept, settle per receipt, refund the rest.

A request that names a payer must carry the payer's EIP-712 authorization of exactly that
request; the price is reserved before the request is accepted (a payer who cannot afford it
is refused with the quote), each verified receipt moves one image's value from the
reservation to the worker, the platform and the model creator, and whatever was not
delivered goes back to the payer when the request ends. Requests without a payer are free
unless the operator requires payment (`billing = "required"`).

The platform's take on a receipt follows the worker's stake tier, with the same rule as
epoch settlement (`PayoutRules.take_bps`). Payers also claim their Daily Boost and read
their balances here, each with a signed message. Reservations live in the ledger, so a
restarted coordinator reloads them (`restore`) and still settles or refunds every request.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sogni_coordinator.ledger import (
    Asset,
    BoostAlreadyClaimed,
    InsufficientFunds,
    Ledger,
    LedgerError,
    Replayed,
    Reservation,
    SelfDealing,
    next_utc_midnight,
    partial_value,
    utc_day,
)
from sogni_coordinator.staking_benefits import PayerBenefits
from sogni_coordinator.standing import StandingLookup, no_chain
from sogni_coordinator.store import Store
from sogni_protocol import eip712
from sogni_protocol.catalog import Catalog
from sogni_protocol.eip712 import Domain
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    DEFAULT_NETWORK_ID,
    BalanceQuery,
    BalanceReport,
    Balances,
    BoostGranted,
    DailyBoostClaim,
    RenderRequest,
)
from sogni_protocol.payout_rules import SOGNI, PayoutRules, SettlementConfig
from sogni_protocol.pricing import Quote, quote
from sogni_protocol.stake_benefits import discounted

log = get_logger(__name__)

BillingMode = Literal["off", "optional", "required"]
MAX_AUTHORIZATION_SECONDS = 24 * 3600
"""A payer authorization may not outlive a day: it bounds the replay memory."""
MAX_QUERY_SECONDS = 3600
"""A signed balance query may not be valid for longer than an hour."""


class KeyAccounts(Protocol):
    """`api_keys.ApiKeys` as billing sees it."""

    def account_refusal(self, account: str, micro: int) -> str | None: ...


class Refusal(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _balances(amounts: dict[Asset, int]) -> Balances:
    return Balances(
        spark_free=amounts["spark_free"], spark_paid=amounts["spark_paid"], sogni=amounts["sogni"]
    )


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_Settlement = tuple[bytes, int, str, int, str, bytes]
"""`_settle_now`'s arguments: request id, value, payee, take (bps), model, job id."""


@dataclass
class Billing:
    ledger: Ledger
    domain: Domain
    mode: BillingMode = "optional"
    catalog: Catalog | None = None
    rules: PayoutRules = field(default_factory=lambda: SettlementConfig().rules())
    """Stake tiers, take rates and the creator share (the `[settlement]` table)."""
    standing: StandingLookup = no_chain
    """Licence and stake of a wallet: the service's `StandingCache`, so settling never waits
    for the chain (none: every worker is tier 0)."""
    clock: Callable[[], float] = time.time
    network_id: str = DEFAULT_NETWORK_ID
    """The ledger's network: authorizations and boost claims must name it."""
    benefits: PayerBenefits | None = None
    """Staked payers' discount and queue tier (`[staking_benefits]`); None: none."""
    boost_for_anyone: bool = True
    """Any wallet may claim the Daily Boost (a local network); False: only one that bought
    Spark or deposited SOGNI here, or has stake (a script mints wallets for free, each a
    day's free Spark: renders for nothing, and workers unpaid when the free budget is 0)."""
    key_accounts: KeyAccounts | None = None
    """API keys' accounts (`api_keys.ApiKeys`): a revoked or limited key's account cannot be
    spent outside the gateway either (`admit(..., via_gateway=False)`); None: not checked."""
    _reservations: dict[bytes, Reservation] = field(default_factory=dict)
    _models: dict[bytes, str] = field(default_factory=dict)
    _settlements: dict[bytes, list[_Settlement]] = field(default_factory=dict)
    """A live request's settlements, replayed before its refund (`_refund_now`)."""
    _payers: dict[bytes, frozenset[str]] = field(default_factory=dict)
    """A live request's payer and the accounts referral-linked to it (`payer_accounts`)."""

    # --- render requests -------------------------------------------------------------------
    def admit(self, request: RenderRequest, request_id: bytes, *, via_gateway: bool = False) -> int:
        """Reserve the request's price; returns it (micro units) or raises `Refusal`.
        Writes on the calling thread (CLI, tests); the dispatcher uses `admit_off_loop`.
        `via_gateway`: the gateway submitted it for an API key and checked the key itself."""
        priced = self._authorized_quote(request)
        if priced is None:
            return 0
        reservation = self._reserve(request, request_id, *priced, via_gateway=via_gateway)
        return self._record(request, request_id, reservation)

    async def admit_off_loop(
        self, request: RenderRequest, request_id: bytes, *, via_gateway: bool = False
    ) -> int:
        """`admit` with the ledger's fsync'd write in the writer thread, in order with every
        queued settlement and refund (and, in the same savepoint, the key account's check)."""
        if self.benefits is not None and self.charges(request):
            await self.benefits.warm(request.payer)
        priced = self._authorized_quote(request)
        if priced is None:
            return 0
        reserve = functools.partial(self._reserve, via_gateway=via_gateway)
        reservation = await self.ledger.call(reserve, request, request_id, *priced)
        return self._record(request, request_id, reservation)

    def charges(self, request: RenderRequest) -> bool:
        """Whether `request` is paid for (else it is free: never paid on chain either)."""
        return not (self.mode == "off" or (request.payer is None and self.mode == "optional"))

    def _authorized_quote(self, request: RenderRequest) -> tuple[Quote, int] | None:
        """The quote of a request that must be paid, after checking its payer's signature,
        with the payer's stake discount (basis points) already taken off it; None for a free
        request."""
        if not self.charges(request):
            return None
        if request.network_id != self.network_id:
            raise Refusal("unauthorized", self._wrong_network("request", request.network_id))
        now = self.clock()
        fault = eip712.check_payer(self.domain, request, now)
        if fault is not None:
            raise Refusal("unauthorized", self._with_domain(fault))
        if request.expiry > now + MAX_AUTHORIZATION_SECONDS:
            raise Refusal("unauthorized", "payer authorization expires more than a day ahead")
        q = quote(request, self.catalog)
        if self.benefits is None:
            return q, 0
        discount = self.benefits.discount_bps(request.payer)
        return discounted(q, discount), discount

    def _reserve(
        self,
        request: RenderRequest,
        request_id: bytes,
        q: Quote,
        discount_bps: int = 0,
        *,
        via_gateway: bool = False,
    ) -> Reservation:
        """Runs in the writer's savepoint (`admit_off_loop`): a refusal raised after the key
        account's spend was recorded rolls it back with everything else."""
        assert request.payer is not None
        if self.key_accounts is not None and not via_gateway:
            why = self.key_accounts.account_refusal(request.payer, q.spark_micro)
            if why is not None:
                raise Refusal("unauthorized", why)
        try:
            reservation = self.ledger.reserve(
                request_id,
                request.payer,
                q,
                authorization=eip712.request_hash(request),
                authorization_expiry=request.expiry,
                signature=request.payer_signature,
                network_id=request.network_id,
                discount_bps=discount_bps,
            )
            self._payers[request_id] = self.ledger.linked_accounts(request.payer)
            return reservation
        except Replayed as exc:
            raise Refusal("replayed", str(exc)) from None
        except InsufficientFunds as exc:
            reason = f"{exc}; quote: {json.dumps(q.to_dict())}"
            raise Refusal("insufficient_funds", reason) from None

    def _record(self, request: RenderRequest, request_id: bytes, reservation: Reservation) -> int:
        self._reservations[request_id] = reservation
        self._models[request_id] = request.model_id
        return reservation.total

    def payer_accounts(self, request_id: bytes) -> frozenset[str]:
        """The accounts (lower case) that paid for a live request: its payer and every account
        referral-linked to it (`Ledger.linked_accounts`, read when it was reserved). None of
        them may check the request's jobs (pass them to `verifiers.choose_verifier` /
        `verify_step` as `payer_accounts`): a payer verifying its own jobs would be paid from
        their take (free Daily Boost work included: emission turned into its earnings) and
        could fail honest renders of them. Empty for a free request (no payer)."""
        return self._payers.get(request_id, frozenset())

    def take_rate_bps(self, worker: str) -> int:
        """The platform's take on this worker's receipts: its stake tier's rate."""
        return self.rules.take_bps(self._stake_wei(worker))

    def _stake_wei(self, worker: str) -> int | None:
        """The worker's active stake as `standing` has it (a `StandingCache` in the service:
        memory only, never the chain); None (tier 0, the highest take) if it fails."""
        try:
            return self.standing(worker).stake * SOGNI
        except Exception as exc:  # a raw chain lookup raises many kinds; pay anyway
            log.warning("stake_lookup_failed", wallet=worker.lower(), error=type(exc).__name__)
            return None

    def settle(
        self, request_id: bytes, job_id: bytes, worker: str, steps_done: int, steps: int
    ) -> None:
        """One receipt: pay its value (pro rata for a cancelled job) out of the reservation,
        to `worker`, the receipt's payee (its payout address, else the signing wallet: as the
        epoch pays it, take tier included).

        The amounts are decided now; the ledger write joins the database's write queue (the
        group commit's next transaction, off the event loop). Paying twice is impossible
        (the ledger settles a job id once) and a settlement lost in a crash is redone by
        `restore` from the stored receipt.
        """
        reservation = self._reservations.get(request_id)
        if reservation is None:
            return
        settlement = (
            request_id,
            partial_value(reservation.per_image, steps_done, steps),
            worker,
            self.take_rate_bps(worker),
            self._models[request_id],
            job_id,
        )
        self._settlements.setdefault(request_id, []).append(settlement)
        self.ledger.submit("settle", self._settle_now, *settlement)

    def _settle_now(
        self, request_id: bytes, value: int, worker: str, take_bps: int, model: str, job: bytes
    ) -> None:
        try:
            self.ledger.settle(
                request_id,
                value,
                worker,
                take_bps,
                self.rules.creator_share_bps,
                model_id=model,
                job_id=job,
                refuse_self_dealing=True,
            )
        except SelfDealing as exc:  # left unsettled: refunded with the request, never paid
            log.warning("self_dealing_unpaid", request=request_id.hex()[:16], error=str(exc))
        except LedgerError as exc:  # the receipt is stored; the money can be reconciled
            log.error("ledger_settle_failed", request=request_id.hex()[:16], error=str(exc))

    def finish(self, request_id: bytes) -> None:
        """The request ended (all delivered, failed or given up): refund what is left, after
        every settlement queued before (one queue, in order)."""
        if self._reservations.pop(request_id, None) is None:
            return
        self._models.pop(request_id, None)
        self._payers.pop(request_id, None)
        settled = self._settlements.pop(request_id, [])
        self.ledger.submit("refund", self._refund_now, request_id, settled)

    def _refund_now(self, request_id: bytes, settled: list[_Settlement]) -> None:
        # every settlement again first (idempotent per job): one whose write failed (a
        # busy or lost database fails its whole group, and nothing retries a `submit`)
        # would otherwise find the reservation closed for good, its receipt never paid
        missing = set(self.ledger.unsettled_of([job for *_, job in settled]))
        for settlement in settled:  # not `settle`'s own replay of a settled job: a scan
            if settlement[-1] in missing:  # of the ledger's entries (cost grew with it)
                self._settle_now(*settlement)
        refunded = self.ledger.refund(request_id)
        if any(refunded.values()):
            log.info("request_refunded", request=request_id.hex()[:16], refunded=refunded)

    def forget(self, request_id: bytes) -> None:
        """Another coordinator of the network took the request over (`cluster.py`): it
        settles and refunds it now; this one lets go without touching the ledger."""
        self._reservations.pop(request_id, None)
        self._models.pop(request_id, None)
        self._settlements.pop(request_id, None)
        self._payers.pop(request_id, None)

    def restore(self, store: Store, only: Collection[bytes] | None = None) -> int:
        """After a restart, take back every open reservation; returns how many stay open.

        Receipts stored before the stop but not yet settled in the ledger (the coordinator
        stopped between the two commits) are settled now (settling is idempotent per job);
        a request with no queued job left is refunded now; the others are kept, so their
        re-queued jobs settle per receipt and the rest is refunded when they end. A
        reservation whose request never reached the store (stopped before accepting it)
        is refunded whole.
        """
        kept = 0
        for row in self.ledger.open_reservations():
            rid = bytes.fromhex(row.request_id)
            if only is not None and rid not in only:  # `only`: the requests this one owns
                continue
            record = store.request_record(rid)
            if record is None or row.amount % record.images:
                if record is not None:
                    log.error("reservation_not_divisible", request=row.request_id[:16])
                self.ledger.refund(rid)
                continue
            self._reservations[rid] = Reservation(
                row.request_id,
                row.payer,
                row.token_type,
                row.left["spark_free"],
                row.left["spark_paid"],
                row.left["sogni"],
                row.amount // record.images,
            )
            self._models[rid] = record.model_id
            self._payers[rid] = self.ledger.linked_accounts(row.payer)
            for receipt, steps in record.receipts:
                self.settle(rid, receipt.job_id, receipt.payee, receipt.steps_done, steps)
            if record.queued == 0:
                self.finish(rid)
            else:
                kept += 1
        return kept

    # --- Daily Boost and balances ---------------------------------------------------------
    def _require_on(self) -> None:
        if self.mode == "off":
            raise Refusal(
                "billing_off", "billing is off on this coordinator: renders are free, no balances"
            )

    def _wrong_network(self, what: str, named: str) -> str:
        return (
            f"the {what} is signed for network {named!r}, but this coordinator's ledger serves "
            f"{self.network_id!r}: sign it for {self.network_id!r}"
        )

    def _with_domain(self, fault: str) -> str:
        d = self.domain
        return f"{fault}; this coordinator signs for chain {d.chain_id}, {d.verifying_contract}"

    @property
    def referrer_rule(self) -> Callable[[str], bool] | None:
        """What a referral code's owner must pass (`ReferralCodes.use(eligible=...)`):
        nothing on a local network, else being a customer (`is_customer`)."""
        return None if self.boost_for_anyone else self.is_customer

    def is_customer(self, account: str) -> bool:
        """`account` bought Spark or deposited SOGNI here, or has stake: what off a local
        network the Daily Boost and a usable referral code need (a fresh wallet costs nothing
        to make, so neither may be had with one)."""
        try:
            staked = self.standing(account).stake > 0
        except Exception as exc:  # a raw chain lookup raises many kinds: judge by the ledger
            log.warning("stake_lookup_failed", wallet=account.lower(), error=type(exc).__name__)
            staked = False
        return staked or self.ledger.has_paid(account)

    def claim_boost(self, claim: DailyBoostClaim) -> BoostGranted:
        """Grant the Daily Boost for today (UTC) if the claim is the payer's own and the first
        today; otherwise `Refusal` (`unauthorized`, `wrong_day`, `not_eligible`: off a local
        network only a paying or staking account, `already_claimed`)."""
        self._require_on()
        if claim.network_id != self.network_id:
            raise Refusal("unauthorized", self._wrong_network("boost claim", claim.network_id))
        fault = eip712.check_boost_claim(self.domain, claim)
        if fault is not None:
            raise Refusal("unauthorized", self._with_domain(fault))
        now = self.clock()
        today, opens = utc_day(now), next_utc_midnight(now)
        if claim.day != today:
            raise Refusal(
                "wrong_day",
                f"the claim is for {claim.day} but today is {today} (UTC): sign one for today",
            )
        if not self.boost_for_anyone and not self.is_customer(claim.payer):
            raise Refusal(
                "not_eligible",
                f"{claim.payer} has never bought Spark, deposited SOGNI or staked on this "
                "network: the Daily Boost is for its customers (buy Spark or stake first)",
            )
        try:
            amount = self.ledger.claim_daily_boost(claim.payer, now)
        except BoostAlreadyClaimed:
            raise Refusal(
                "already_claimed",
                f"{claim.payer} already claimed the Daily Boost for {today} (UTC); "
                f"the next claim opens at {_iso(opens)}",
            ) from None
        log.info("daily_boost_granted", payer=claim.payer.lower(), micro_spark=amount)
        return BoostGranted(
            payer=claim.payer,
            day=today,
            amount_micro=amount,
            balances=_balances(self.ledger.balance(claim.payer)),
            next_claim_at=opens,
        )

    def report(self, query: BalanceQuery, peer_id: str) -> BalanceReport:
        """The payer's balances, for a query it signed for this connection's peer id."""
        self._require_on()
        now = self.clock()
        fault = eip712.check_balance_query(self.domain, query, peer_id, now)
        if fault is not None:
            raise Refusal("unauthorized", self._with_domain(fault))
        if query.expiry > now + MAX_QUERY_SECONDS:
            raise Refusal("unauthorized", "balance query expires more than an hour ahead")
        available = not self.ledger.boost_claimed(query.payer, utc_day(now))
        return BalanceReport(
            payer=query.payer,
            balances=_balances(self.ledger.balance(query.payer)),
            reserved=_balances(self.ledger.reserved_for(query.payer)),
            boost_available=available,
            next_boost_at=int(now) if available else next_utc_midnight(now),
        )
