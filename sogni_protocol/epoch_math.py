"""The arithmetic of an epoch, in one place: the coordinator settles with it, the auditor and
the nodes recompute with it, so every rounding step is the same on every side.

Only paid value is paid. Each receipt earns what its payer paid for that job (the ledger's
settlement of it), converted at the epoch's rate, then split by the rules:

    paid_value = spark_paid * wei_per_spark // 1e6 + sogni * 1e12     (micro units -> wei)
    free_raw   = spark_free * wei_per_spark // 1e6                     (Daily Boost Spark)
    free_value = free_raw * budget // free_requested   if free_requested > budget
                 free_raw                              otherwise       (pro rata in budget)
    value      = paid_value + free_value   -> take (stake tier), creator share, worker

Verifier nodes that re-ran steps of a job's check are paid out of that receipt's take
(`verifier_pay`): a step is worth the job's value over the offer's steps (a verifier gets
`value * steps // offer.steps`), scaled down pro rata when the verifiers would get more than
the take; the worker's and creator's amounts never change.

Payout addresses (receipts of EIP-712 version "4"): the worker's amount goes to the receipt's
`payee` (its signed payout address, else the worker), and the take tier is the payee's stake
(an ephemeral container's signing key holds no stake; the account it pays does). Self-dealing
is judged against both the worker and the payee: neither is paid as a verifier of the
receipt, and no receipt pays its own payer back free (Daily Boost) Spark (`self_dealing`).

A receipt with no payer settlement earns nothing (it is refused, never in a batch). The
payer's charge is bound to the signed offer: a full job costs `spark_micro(work_units)` at the
offer's price factor, a cancelled one the steps done pro rata (`expected_charge`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

from eth_utils import to_checksum_address

from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.epoch_files import (
    RECEIPTS_FORMAT,
    BatchEntry,
    PayerSettlement,
    Payout,
    ReceiptsBatch,
    Restoration,
    VerifierPay,
)
from sogni_protocol.errors import SignatureError
from sogni_protocol.messages import JobOffer, Receipt
from sogni_protocol.payout_rules import BPS, PayoutRules, Split

__all__ = [
    "MICRO",
    "NO_PAYER",
    "WEI_PER_MICRO_SOGNI",
    "Valued",
    "batch_problem",
    "cumulative_leaves",
    "earned_by_account",
    "entry_problem",
    "expected_charge",
    "free_value",
    "mispriced",
    "paid_value",
    "payouts",
    "restoration_problem",
    "restored_amount",
    "scale_free",
    "self_dealing",
    "split_entry",
    "verifier_pay",
    "verifier_problem",
    "verifiers_of",
]

NO_PAYER = "no payer: requests nobody paid for are never paid on chain"
"""The refusal of a receipt for free work (no payer settlement): listed in the batch's
`refused`, never a problem for the worker (`sogni-node rewards` counts it as unpaid)."""

MICRO = 1_000_000
"""Ledger micro units per Spark or SOGNI."""
WEI_PER_MICRO_SOGNI = 10**18 // MICRO
WORK_UNITS_PER_SPARK = 43_200


class Valued(NamedTuple):
    """One receipt's value and split, as the batch records them."""

    paid_value: int
    free_value: int
    take_bps: int
    split: Split


def paid_value(s: PayerSettlement, rules: PayoutRules) -> int:
    """Base units of SOGNI the payer paid for the job (paid Spark at the rate, and SOGNI)."""
    return s.spark_paid * rules.wei_per_spark // MICRO + s.sogni * WEI_PER_MICRO_SOGNI


def free_value(s: PayerSettlement, rules: PayoutRules) -> int:
    """The job's free (Daily Boost) Spark at the rate, before the emission budget."""
    return s.spark_free * rules.wei_per_spark // MICRO


def scale_free(raw: int, requested: int, budget: int) -> int:
    """`raw` scaled so that the epoch's free value fits `budget` (pro rata, rounded down)."""
    if requested <= budget:
        return raw
    return raw * budget // requested


def split_entry(
    s: PayerSettlement,
    model_id: str,
    rules: PayoutRules,
    take_bps: int,
    free_requested: int,
) -> Valued:
    """The value and split of one receipt paid from settlement `s`."""
    paid = paid_value(s, rules)
    free = scale_free(free_value(s, rules), free_requested, rules.free_budget_wei)
    return Valued(paid, free, take_bps, rules.split(paid + free, model_id, take_bps))


def expected_charge(
    work_units: int, price_factor_bps: int, steps_done: int, steps: int, discount_bps: int = 0
) -> int:
    """Micro-Spark a payer is charged for a job of the signed offer's `work_units` at its
    `price_factor_bps`, with `steps_done` of `steps` rendered and the payer's stake discount
    `discount_bps` off the image's price (as billing charges it: `stake_benefits.discounted`
    rounds the discounted price down, never below 1 micro)."""
    price = Fraction(work_units * MICRO, WORK_UNITS_PER_SPARK) * Fraction(price_factor_bps, BPS)
    per_image = int((price * 2 + 1) // 2)  # round half up, as pricing does
    if discount_bps > 0:
        per_image = max(1, per_image * (BPS - discount_bps) // BPS)
    return per_image * max(0, min(steps_done, steps)) // steps


def mispriced(offer: JobOffer, receipt: Receipt, paid: PayerSettlement) -> int | None:
    """What the signed offer prices the job at (micro-Spark), less the payer's published stake
    discount, when the payer's settlement is worth something else; None when they agree
    (SOGNI's Spark value may be off by rounding)."""
    charged = expected_charge(
        offer.work_units,
        offer.price_factor_bps,
        receipt.steps_done,
        offer.steps,
        paid.discount_bps,
    )
    slack = 0 if paid.token_type == "spark" else _sogni_slack(charged, paid)
    return charged if abs(paid.spark_equiv - charged) > slack else None


def _sogni_slack(charged: int, paid: PayerSettlement) -> int:
    """How far a SOGNI payment's Spark value may be off by rounding: the ledger values a job
    from its micro-SOGNI, itself rounded down (`floor(floor(S k/s) P/S)` against `floor(P
    k/s)` for a partial job), so by up to one micro-SOGNI's worth of micro-Spark, `P/S`:
    1 at SOGNI's reference price, more when a SOGNI is worth more Spark."""
    per_sogni = -(-max(charged, paid.spark_equiv) // max(paid.sogni, 1))  # ceil(P/S)
    return 1 + per_sogni


def verifier_pay(
    value: int, take: int, job_steps: int, work: Sequence[tuple[str, int]]
) -> list[VerifierPay]:
    """What each `(verifier, steps)` of `work` is paid from one receipt's `take`.

    A step is worth the job's value over its steps: a verifier gets
    `value * steps // job_steps`. When that adds up to more than `take`, every amount is
    scaled by `take / owed`, rounded down (pro rata, so the sum never exceeds the take and no
    order matters). Pure arithmetic on what it is given: `verifiers_of` decides who counts.
    """
    if job_steps <= 0:
        raise ValueError(f"a job of {job_steps} steps")
    owed = [value * steps // job_steps for _, steps in work]
    total = sum(owed)
    if total > take:
        owed = [x * take // total for x in owed]
    return [
        VerifierPay(account=account, steps=steps, amount=str(x))
        for (account, steps), x in zip(work, owed, strict=True)
    ]


def verifiers_of(
    work: Iterable[tuple[str, int]],
    *,
    worker: str,
    value: int,
    take: int,
    job_steps: int,
    payee: str | None = None,
    free_payer: str | None = None,
) -> list[VerifierPay]:
    """The settler's verifier list for one receipt from the recorded `(account, steps)` work
    (the account each verifier is paid at: its payout address when it advertised one, else
    its wallet): checksummed, one per account, sorted by lowercase address, the receipt's own
    worker and payee left out (neither is paid for checking itself: a worker's payout account
    never earns verifying its own work), each account's steps capped at the job's.
    `free_payer`: the payer of a receipt paid with free (Daily Boost) Spark, never paid for
    checking it either (`self_dealing`'s rule; the coordinator does not ask it to,
    `Billing.payer_accounts`, but work recorded before that rule must not pay it)."""
    steps_of: dict[str, int] = {}
    for wallet, steps in work:
        if steps <= 0 or eip712.same_address(wallet, worker):
            continue
        if payee is not None and eip712.same_address(wallet, payee):
            continue
        if free_payer is not None and eip712.same_address(wallet, free_payer):
            continue
        account = to_checksum_address(wallet)
        steps_of[account] = steps_of.get(account, 0) + steps
    listed = [(a, min(steps_of[a], job_steps)) for a in sorted(steps_of, key=lambda a: a.lower())]
    return verifier_pay(value, take, job_steps, listed)


def verifier_problem(e: BatchEntry, value: int, take: int, job_steps: int) -> str | None:
    """Why entry `e`'s verifier pay is not what `verifier_pay` gives for the verifiers and
    steps it lists (out of a take of `take`), or None."""
    seen: set[str] = set()
    previous = ""
    for v in e.verifiers:
        account = to_checksum_address(v.account)  # ValueError: malformed
        if v.account != account:
            return f"verifier {v.account} is not a checksummed address"
        if eip712.same_address(account, e.worker):
            return f"the worker {e.worker} is paid as a verifier of its own receipt"
        if eip712.same_address(account, e.payee):
            return f"the payout address {e.payee} is paid as a verifier of its own receipt"
        if account.lower() in seen or account.lower() < previous:
            return "verifiers are not listed once each, sorted by account"
        seen.add(account.lower())
        previous = account.lower()
        if not 0 < v.steps <= job_steps:
            return f"verifier {account} is paid for {v.steps} steps of a {job_steps}-step job"
    want = verifier_pay(value, take, job_steps, [(v.account, v.steps) for v in e.verifiers])
    got = [int(v.amount) for v in e.verifiers]
    if sum(got) > take:
        return f"verifiers are paid {sum(got)}, more than the take of {take}"
    for v, w in zip(e.verifiers, want, strict=True):
        if int(v.amount) != int(w.amount):
            return (
                f"verifier {v.account} is paid {v.amount} for {v.steps} steps, the rules give "
                f"{w.amount}"
            )
    return None


def earned_by_account(
    entries: Iterable[BatchEntry], restorations: Iterable[Restoration] = ()
) -> dict[str, int]:
    """Account -> what a batch's entries pay it (workers, creators and verifiers), and its
    restorations (disputes won)."""
    earned: dict[str, int] = {}

    def add(account: str, amount: int) -> None:
        a = to_checksum_address(account)
        earned[a] = earned.get(a, 0) + amount

    for e in entries:
        add(e.payee, int(e.worker_amount))
        if e.creator is not None and int(e.creator_amount):
            add(e.creator, int(e.creator_amount))
        for v in e.verifiers:
            if int(v.amount):
                add(v.account, int(v.amount))
    for r in restorations:
        add(r.payee, int(r.amount))
    return earned


def _payee_take(batch: ReceiptsBatch, payee: str) -> int | str:
    """The take rate the paid account's stake in the batch's snapshot gives (tier 0 when no
    stake was read), or why there is none."""
    rules = batch.rules
    if batch.stake_block is None:
        return rules.take_rates_bps[0]
    stake = batch.stakes.get(to_checksum_address(payee))
    if stake is None:
        return f"no stake recorded for {payee} at block {batch.stake_block}"
    return rules.take_bps(int(stake))


def restored_amount(rules: PayoutRules, micro_spark: int, model_id: str, take_bps: int) -> int:
    """What a payee is paid for a refused job whose dispute it won: its value at the epoch's
    rate, less the take, as the worker's share of any receipt."""
    value = micro_spark * rules.wei_per_spark // MICRO
    return rules.split(value, model_id, take_bps).worker


def restoration_problem(batch: ReceiptsBatch, r: Restoration) -> str | None:
    """Why a published restoration does not add up: its take rate is not the payee's stake
    tier in the batch's snapshot, or its amount not what the rules give.

    Arithmetic only: that its case was won, by a worker this payee stands for, is on the
    Disputes contract (`audit_cli.check_chain` reads it), and that a case pays once is the
    folder audit's (`epoch_audit`, across epochs)."""
    take = _payee_take(batch, r.payee)
    if isinstance(take, str):
        return take
    if r.take_bps != take:
        return f"take rate is {r.take_bps} bps, the payee's stake tier gives {take}"
    want = restored_amount(batch.rules, r.micro_spark, r.model_id, take)
    if r.micro_spark < 0 or int(r.amount) != want:
        return f"amount is {r.amount}, the rules give {want}"
    return None


def payouts(
    entries: Iterable[BatchEntry], earned: Mapping[str, int], cumulative: Mapping[str, int]
) -> list[Payout]:
    """The epoch file's payouts: what each account earned, its new cumulative total, and how
    many of the batch's receipts pay it (by checksummed payee: payout address, else worker)."""
    counts: dict[str, int] = {}
    for e in entries:
        payee = to_checksum_address(e.payee)
        counts[payee] = counts.get(payee, 0) + 1
    return [
        Payout(
            account=a,
            amount=str(earned[a]),
            cumulative_amount=str(cumulative[a]),
            receipts=counts.get(a, 0),
        )
        for a in sorted(earned)
    ]


def cumulative_leaves(
    previous: Mapping[str, int], earned: Mapping[str, int]
) -> list[tuple[str, int]]:
    """The cumulative tree's leaves: every account ever paid with its running total, sorted."""
    cumulative = dict(previous)
    for account, amount in earned.items():
        cumulative[account] = cumulative.get(account, 0) + amount
    return sorted(cumulative.items())


def batch_problem(batch: ReceiptsBatch) -> str | None:
    """What is wrong with a batch as a whole (before its entries are checked), or None."""
    requested = sum(free_value(e.settlement, batch.rules) for e in batch.receipts)
    if str(requested) != batch.free_requested:
        return (
            f"freeRequested is {batch.free_requested} but the batch's free Spark is worth "
            f"{requested}"
        )
    if batch.stake_block is None and batch.stakes:
        return "stakes are listed without the block they were read at"
    return None


def self_dealing(payer: str, spark_free: int, worker: str, payee: str) -> str | None:
    """Why a receipt would pay its own payer back free (Daily Boost) Spark, or None.

    A payer rendering its own free requests (as worker, or by naming itself as the payout
    address) would turn the free emission into SOGNI for itself: such a receipt is refused.
    Paid Spark or SOGNI is the payer's own money: paying it back is allowed."""
    if spark_free <= 0:
        return None
    if eip712.same_address(payee, payer):
        return f"self-dealing: the payer {payer} is this receipt's payout account (free Spark)"
    if eip712.same_address(worker, payer):
        return f"self-dealing: the payer {payer} rendered its own free (Daily Boost) request"
    return None


def entry_problem(batch: ReceiptsBatch, e: BatchEntry) -> str | None:
    """Why entry `e` of `batch` is not exactly what the rules pay for its receipt, or None.

    Recomputed from the entry alone: both signatures (the worker's receipt, the
    coordinator's offer; under the EIP-712 version the receipt was signed in), the receipt
    answering its offer, the payer's charge matching the offer's price, no self-dealing, the
    take rate matching the payee's stake at the snapshot block, the value and split, and the
    verifiers paid from the take (`verifier_problem`).
    """
    receipt, offer = e.receipt(), e.offer.offer()
    try:
        domain = _signed_domain(batch, e, receipt)
        if domain is None:
            return "the receipt is not signed by its worker under this chain and distributor"
        if not eip712.same_address(
            eip712.recover_offer_signer(domain, offer, e.offer.signature_bytes), e.coordinator
        ):
            return "the offer is not signed by the coordinator the receipt names"
        if eip712.offer_hash(domain, offer) != receipt.offer_hash:
            return "the receipt does not answer the published offer"
    except SignatureError as exc:
        return f"bad signature: {exc}"
    if offer.job_id != receipt.job_id or offer.model_id != receipt.model_id:
        return "the offer is for another job or model"
    if receipt.price_factor_bps != offer.price_factor_bps:
        return "the receipt's price factor differs from its offer's"
    if receipt.steps_done > offer.steps or receipt.work_units != (
        offer.work_units * receipt.steps_done // offer.steps
    ):
        return "the receipt's steps or work units do not follow from its offer"
    charged = mispriced(offer, receipt, e.settlement)
    if charged is not None:
        return (
            f"the payer's settlement is worth {e.settlement.spark_equiv} micro-Spark, "
            f"the offer prices it at {charged}"
        )
    s = e.settlement
    why = _authorization_problem(batch, e, domain)
    if why is not None:
        return why
    if s.token_type == "spark" and (s.sogni or s.spark_free + s.spark_paid != s.spark_equiv):
        return "the Spark settlement's parts do not add up"
    if s.token_type == "sogni" and (s.spark_free or s.spark_paid):
        return "a SOGNI settlement carries Spark"
    if batch.format == RECEIPTS_FORMAT:  # the rule came with it: older epochs predate it
        why = self_dealing(s.payer, s.spark_free, e.worker, e.payee)
        if why is not None:
            return why
    rules = batch.rules
    take = _payee_take(batch, e.payee)
    if isinstance(take, str):
        return take
    if e.take_bps != take:
        return f"take rate is {e.take_bps} bps, the payee's stake tier gives {take}"
    v = split_entry(s, e.model_id, rules, take, int(batch.free_requested))
    got = (int(e.paid_value), int(e.free_value), int(e.worker_amount), int(e.creator_amount))
    want = (v.paid_value, v.free_value, v.split.worker, v.split.creator_amount)
    if got != want:
        return (
            f"paid/free/worker/creator amounts are {'/'.join(map(str, got))}, the rules give "
            f"{'/'.join(map(str, want))}"
        )
    if v.split.creator_amount and (e.creator or "").lower() != (v.split.creator or "").lower():
        return f"creator share goes to {e.creator}, the rules say {v.split.creator}"
    return verifier_problem(e, v.split.value, v.split.take, offer.steps)


def _signed_domain(batch: ReceiptsBatch, e: BatchEntry, receipt: Receipt) -> Domain | None:
    """The batch's domain at the EIP-712 version its worker signed the receipt under (the
    offer was signed under the same one), or None when the worker signed it under none."""
    domain = Domain(batch.chain_id, batch.verifying_contract)
    try:
        version = eip712.verify_receipt(domain, receipt, e.signature_bytes, e.worker)
    except SignatureError:
        return None
    return domain.at(version)


def _authorization_problem(batch: ReceiptsBatch, e: BatchEntry, domain: Domain) -> str | None:
    """Why the entry's payer evidence does not prove the payer authorized this very job."""
    auth = e.settlement.authorization
    if auth is None:
        return "no payer authorization is published for this job"
    if auth.network_id != batch.network_id:
        return f"the payer authorized network {auth.network_id!r}, not {batch.network_id!r}"
    digest = bytes.fromhex(auth.request_hash.removeprefix("0x"))
    if eip712.job_id_of(digest, auth.index) != e.receipt().job_id:
        return "the job id is not derived from the authorized request"
    try:
        eip712.recover_authorization_signer(
            domain,
            e.settlement.payer,
            digest,
            auth.expiry,
            auth.network_id,
            bytes.fromhex(auth.signature.removeprefix("0x")),
        )
    except SignatureError:
        return "the payer authorization is not signed by the payer"
    return None
