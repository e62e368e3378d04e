"""Accounts and balances: an append-only double-entry journal in SQLite (WAL).

Every operation is one transaction of entries `(account, asset, amount)` whose amounts sum
to zero per asset; a balance is the sum of an account's entries. Amounts are integers in
micro units (1e-6 Spark or SOGNI). Assets: `spark_paid`, `spark_free` (Daily Boost, kept
apart) and `sogni`.

Accounts: a payer is its wallet address (lower case). System accounts: `treasury` (issues
Spark: card purchases, Daily Boost), `chain` (SOGNI deposited from chain), `reserved:<request>`,
`worker:<address>`, `platform`, `creator:<model>`. Only the issuers may go negative.

Referrals (`refer`, `ledger_referrals`) link a referred account to its referrer for the season
boards (`sogni_coordinator.seasons`), which also read `season_jobs` and `purchases`.

Request path: `reserve` on accept, `settle` per receipt, `refund` on finish or cancel. Open
reservations stay in `ledger_reservations`, so a restarted coordinator takes them back.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
from eth_utils import to_checksum_address

from sogni_coordinator.db import Database
from sogni_protocol.epoch_files import PayerAuthorization, PayerSettlement
from sogni_protocol.messages import Receipt
from sogni_protocol.pricing import MICRO, Quote

Asset = Literal["spark_paid", "spark_free", "sogni"]
ASSETS: tuple[Asset, ...] = ("spark_paid", "spark_free", "sogni")
TREASURY = "treasury"
CHAIN = "chain"
PLATFORM = "platform"
ISSUERS = frozenset({TREASURY, CHAIN})
BPS = 10_000

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS ledger_tx (
    tx_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    ref         TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_entries (
    tx_id       INTEGER NOT NULL REFERENCES ledger_tx(tx_id),
    account     TEXT NOT NULL,
    asset       TEXT NOT NULL CHECK (asset IN ('spark_paid', 'spark_free', 'sogni')),
    amount      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_entries_account ON ledger_entries(account, asset);
CREATE TABLE IF NOT EXISTS ledger_boosts (
    payer       TEXT NOT NULL,
    day         TEXT NOT NULL,
    tx_id       INTEGER NOT NULL REFERENCES ledger_tx(tx_id),
    PRIMARY KEY (payer, day)
);
CREATE TABLE IF NOT EXISTS ledger_reservations (
    request_id  TEXT PRIMARY KEY,
    payer       TEXT NOT NULL,
    token_type  TEXT NOT NULL CHECK (token_type IN ('spark', 'sogni')),
    amount      INTEGER NOT NULL,
    spark_equiv INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_jobs (
    tx_id       INTEGER PRIMARY KEY REFERENCES ledger_tx(tx_id),
    job_id      TEXT UNIQUE,
    request_id  TEXT NOT NULL,
    payer       TEXT NOT NULL,
    worker      TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    spark_free  INTEGER NOT NULL,
    spark_paid  INTEGER NOT NULL,
    sogni       INTEGER NOT NULL,
    sogni_spark INTEGER NOT NULL,
    settled_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_jobs_time ON ledger_jobs(settled_at);
CREATE TABLE IF NOT EXISTS ledger_authorizations (
    digest      TEXT PRIMARY KEY,
    expiry      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_authorizations_expiry ON ledger_authorizations(expiry);
"""
_V2_AUTHORIZATION_EVIDENCE = """
ALTER TABLE ledger_reservations ADD COLUMN auth_signature BLOB;
ALTER TABLE ledger_reservations ADD COLUMN auth_expiry INTEGER;
ALTER TABLE ledger_reservations ADD COLUMN network_id TEXT;
"""
"""A paid request keeps its payer's signed authorization: epochs publish it as the evidence
that the payer agreed to pay for the job (NULL for older reservations)."""

_V3_REFERRALS = """
CREATE TABLE ledger_referrals (
    referred    TEXT PRIMARY KEY,
    referrer    TEXT NOT NULL,
    created_at  REAL NOT NULL,
    CHECK (referred != referrer)
);
CREATE INDEX ledger_referrals_referrer ON ledger_referrals(referrer);
"""
"""Who referred whom (season Ambassadors board, no-farming links): one referrer per account,
never oneself, never a cycle (`Ledger.refer` walks the chain up before inserting)."""

_V4_DISCOUNT = """
ALTER TABLE ledger_reservations ADD COLUMN discount_bps INTEGER NOT NULL DEFAULT 0;
"""
"""The payer's stake discount a request was priced with (basis points off each image): an
epoch publishes it with the settlement, so the charge checks against the signed offer's
price less that discount (`epoch_math.mispriced`)."""

_V5_ENTRIES_BY_TX = """
CREATE INDEX ledger_entries_tx ON ledger_entries(tx_id);
CREATE INDEX ledger_tx_ref ON ledger_tx(ref, kind);
"""
"""A transaction's entries by its id: a settlement's replay and the purchases list join on it
(without it each scanned every entry of the ledger); an account's purchases and deposits by
its address (`has_paid`, the Daily Boost's eligibility)."""

MIGRATIONS = (
    _SCHEMA_V1,
    _V2_AUTHORIZATION_EVIDENCE,
    _V3_REFERRALS,
    _V4_DISCOUNT,
    _V5_ENTRIES_BY_TX,
)
"""The ledger's schema versions in order (`Database` applies the missing ones on open)."""


class LedgerError(Exception):
    """An operation the ledger refuses; the message says why."""


class InsufficientFunds(LedgerError):
    """The payer cannot afford the quote."""

    def __init__(self, payer: str, quote: Quote, needed: int, available: int) -> None:
        unit = "Spark" if quote.token_type == "spark" else "SOGNI"
        super().__init__(
            f"{payer} needs {needed / MICRO:.6f} {unit} for this request "
            f"but has {available / MICRO:.6f}"
        )
        self.payer = payer
        self.quote = quote
        self.needed = needed
        self.available = available


class ReferralRefused(LedgerError):
    """A referral that would refer an account to itself, give it a second referrer, or close
    a cycle."""


class SelfDealing(LedgerError):
    """A receipt that would pay free (Daily Boost) Spark to its own payer, or to an account
    referral-linked to it (`Ledger.settle(refuse_self_dealing=True)`): never settled."""


class BoostAlreadyClaimed(LedgerError):
    """The Daily Boost was already claimed this UTC day."""


class Replayed(LedgerError):
    """A payer authorization that was already used (kept in the database until it expires, so
    a restart does not forget it)."""


@dataclass(frozen=True)
class Reservation:
    """Funds held for a request. Amounts in micro units of their asset."""

    request_id: str
    payer: str
    token_type: Literal["spark", "sogni"]
    spark_free: int
    spark_paid: int
    sogni: int
    per_image: int
    """Price of one image in the paying unit: the `job_value` of a complete job."""

    @property
    def total(self) -> int:
        return self.spark_free + self.spark_paid + self.sogni


@dataclass(frozen=True)
class Settlement:
    """Where one job's value went (micro units, per asset)."""

    request_id: str
    worker: int
    platform: int
    creator: int
    spark_free: int
    spark_paid: int
    sogni: int


@dataclass(frozen=True)
class SeasonJob:
    """One settled job as the season boards read it: the ledger's row, plus what the store
    (same file) says of it when its tables are there (None: not recorded)."""

    job_id: str | None
    payer: str
    payee: str
    """Who the ledger paid: the receipt's payout address, else the signing wallet."""
    signer: str | None
    """The wallet that signed the receipt (store `receipts.worker`)."""
    payout: str | None
    """The payout address the stored receipt names (None: none, or no receipt stored)."""
    network: str | None
    """`fast` or `relaxed`: the tier the request ran on (store `requests.network`)."""
    check: str | None
    """The sampled check's state (`pending`, `passed`, `skipped`); None: not sampled."""
    refused: bool
    """An epoch refused to pay the receipt (store `settled_receipts.status = 'refused'`)."""
    spark_free: int
    spark_paid: int
    sogni: int
    sogni_spark: int
    settled_at: float


def _hex(value: bytes | str) -> str:
    return value.hex() if isinstance(value, bytes) else value


def _unhex(value: str | None) -> bytes | None:
    """The bytes of a hex id; None for an id that is not hex (set by hand in tests)."""
    try:
        return bytes.fromhex(value) if value else None
    except ValueError:
        return None


_receipt_decoder = msgspec.msgpack.Decoder(Receipt)


def _receipt_payout(blob: object) -> str | None:
    """The payout address a stored receipt (MessagePack) names, lower case; None if none."""
    try:
        receipt = _receipt_decoder.decode(blob if isinstance(blob, bytes) else b"")
    except (msgspec.DecodeError, TypeError):
        return None
    return None if receipt.payout is None else str(receipt.payout).lower()


def _addr(value: str) -> str:
    return value.lower()


def _as_spark(sogni: int, spark_equiv: int, amount: int) -> int:
    """Micro-SOGNI of a reservation at its Spark value (`spark_equiv` for `amount`)."""
    return sogni * spark_equiv // amount if amount else 0


def reserved_account(request_id: bytes | str) -> str:
    return f"reserved:{_hex(request_id)}"


def worker_account(address: str) -> str:
    return f"worker:{_addr(address)}"


def creator_account(model_id: str) -> str:
    return f"creator:{model_id}"


@dataclass(frozen=True)
class OpenReservation:
    """A reservation not yet refunded, with what is still held (micro units, per asset)."""

    request_id: str
    payer: str
    token_type: Literal["spark", "sogni"]
    amount: int
    """What was reserved in total, in the paying unit."""
    left: dict[Asset, int]


def _timestamp(now: dt.datetime | float | None) -> float:
    if now is None:
        return time.time()
    return now.timestamp() if isinstance(now, dt.datetime) else float(now)


def utc_day(now: dt.datetime | float | None = None) -> str:
    """The UTC calendar day (`YYYY-MM-DD`) of `now`: the Daily Boost's unit."""
    return dt.datetime.fromtimestamp(_timestamp(now), dt.UTC).date().isoformat()


def next_utc_midnight(now: dt.datetime | float | None = None) -> int:
    """Unix time of the next 00:00 UTC after `now`: when the next Daily Boost opens."""
    day = dt.datetime.fromtimestamp(_timestamp(now), dt.UTC).date() + dt.timedelta(days=1)
    return int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp())


def partial_value(job_value: int, steps_done: int, steps: int) -> int:
    """Value of a cancelled job: the steps that were done (whitepaper), rounded down."""
    return job_value * max(0, min(steps_done, steps)) // steps


class Ledger(Database):
    """The journal; safe to share between threads (the file's one connection and lock).
    `Billing` queues settlements and refunds (`submit`); reads and reservations see them."""

    def __init__(self, path: Path | str, *, daily_boost_spark: int = 50) -> None:
        super().__init__(path, component="ledger", migrations=MIGRATIONS)
        self.daily_boost_micro = daily_boost_spark * MICRO

    @staticmethod
    def _post(
        db: sqlite3.Connection,
        kind: str,
        ref: str,
        entries: list[tuple[str, Asset, int]],
        now: float | None = None,
    ) -> int:
        """Append one balanced transaction; zero amounts are dropped."""
        for asset in ASSETS:
            total = sum(a for _, s, a in entries if s == asset)
            assert total == 0, f"{kind}: {asset} entries sum to {total}, not 0"
        tx_id = int(
            db.execute(
                "INSERT INTO ledger_tx (kind, ref, created_at) VALUES (?, ?, ?) RETURNING tx_id",
                (kind, ref, time.time() if now is None else now),
            ).fetchone()[0]
        )
        db.executemany(
            "INSERT INTO ledger_entries (tx_id, account, asset, amount) VALUES (?, ?, ?, ?)",
            [(tx_id, acc, asset, amt) for acc, asset, amt in entries if amt != 0],
        )
        return tx_id

    @staticmethod
    def _balance(db: sqlite3.Connection, account: str, asset: Asset) -> int:
        row = db.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE account = ? AND asset = ?",
            (account, asset),
        ).fetchone()
        return int(row[0])

    # --- reads ------------------------------------------------------------------------------
    def balance(self, account: str) -> dict[Asset, int]:
        """Micro-unit balance of every asset of `account` (a payer address or system name)."""
        account = account if ":" in account or account in ISSUERS else _addr(account)
        with self._lock:
            return {a: self._balance(self._db, account, a) for a in ASSETS}

    def balances(self) -> dict[str, dict[Asset, int]]:
        """Every account with a non-zero balance."""
        with self._lock:
            rows = self._db.execute(
                "SELECT account, asset, SUM(amount) FROM ledger_entries"
                " GROUP BY account, asset HAVING SUM(amount) != 0"
            ).fetchall()
        out: dict[str, dict[Asset, int]] = {}
        for account, asset, amount in rows:
            out.setdefault(account, dict.fromkeys(ASSETS, 0))[asset] = int(amount)
        return out

    def reserved_for(self, payer: str) -> dict[Asset, int]:
        """What is held for the payer's open requests, per asset."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.asset, SUM(e.amount) FROM ledger_reservations r"
                " JOIN ledger_entries e ON e.account = 'reserved:' || r.request_id"
                " WHERE r.payer = ? AND r.state = 'open' GROUP BY e.asset",
                (_addr(payer),),
            ).fetchall()
        out = dict.fromkeys(ASSETS, 0)
        out.update({asset: int(amount) for asset, amount in rows})
        return out

    def boost_claimed(self, payer: str, day: str) -> bool:
        """Whether `payer` claimed the Daily Boost on UTC `day` (`YYYY-MM-DD`)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM ledger_boosts WHERE payer = ? AND day = ?", (_addr(payer), day)
            ).fetchone()
        return row is not None

    def open_reservations(self) -> list[OpenReservation]:
        """Reservations not refunded yet, oldest first: what a restarted coordinator reloads."""
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, payer, token_type, amount FROM ledger_reservations"
                " WHERE state = 'open' ORDER BY created_at, rowid"
            ).fetchall()
            return [
                OpenReservation(
                    rid,
                    payer,
                    token,
                    int(amount),
                    {a: self._balance(self._db, reserved_account(rid), a) for a in ASSETS},
                )
                for rid, payer, token, amount in rows
            ]

    def unsettled_of(self, job_ids: list[bytes]) -> list[bytes]:
        """Those of `job_ids` the ledger has not settled (one indexed lookup each)."""
        with self._lock:
            return [
                j
                for j in job_ids
                if self._db.execute(
                    "SELECT 1 FROM ledger_jobs WHERE job_id = ?", (_hex(j),)
                ).fetchone()
                is None
            ]

    def paid_value_of(self, request_id: bytes | str, steps_done: int, steps: int) -> int:
        """What `settle` would take now from the request's reservation for one image of
        `steps_done` of `steps`, in paid micro-Spark (a SOGNI payment at its Spark
        equivalent; free Spark, spent first, counts nothing: epochs pay it from their
        emission alone). 0 when the request has no reservation (no payer)."""
        rid = _hex(request_id)
        with self._lock:
            row = self._db.execute(
                "SELECT token_type, amount, spark_equiv FROM ledger_reservations"
                " WHERE request_id = ?",
                (rid,),
            ).fetchone()
            if row is None:
                return 0
            token, amount, spark_equiv = row
            images = (
                self._db.execute(
                    "SELECT images FROM requests WHERE request_id = ?", (bytes.fromhex(rid),)
                ).fetchone()
                if self._has_table("requests")
                else None
            )
            free_left = self._balance(self._db, reserved_account(rid), "spark_free")
        per_image = int(amount) // max(1, int(images[0]) if images else 1)
        value = partial_value(per_image, steps_done, steps)
        if token == "spark":
            return max(0, value - free_left)
        return _as_spark(value, int(spark_equiv), int(amount))

    def totals(self) -> dict[Asset, int]:
        """Sum of each asset over all accounts: always 0 (double entry)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT asset, SUM(amount) FROM ledger_entries GROUP BY asset"
            ).fetchall()
        out = dict.fromkeys(ASSETS, 0)
        out.update({asset: int(amount) for asset, amount in rows})
        return out

    # --- issuing ----------------------------------------------------------------------------
    def credit_purchase(self, payer: str, spark: int, *, micro: bool = False) -> int:
        """Credit paid Spark bought by card (operator command); returns the tx id."""
        amount = spark if micro else spark * MICRO
        if amount <= 0:
            raise LedgerError("a purchase must be positive")
        with self._tx() as db:
            return self._post(
                db,
                "purchase",
                _addr(payer),
                [(TREASURY, "spark_paid", -amount), (_addr(payer), "spark_paid", amount)],
            )

    def has_paid(self, account: str) -> bool:
        """The account ever bought Spark or deposited SOGNI here (the Daily Boost's test of a
        real customer: a fresh wallet costs nothing to make)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM ledger_tx WHERE kind IN ('purchase', 'deposit') AND ref = ? LIMIT 1",
                (_addr(account),),
            ).fetchone()
        return row is not None

    def deposit_sogni(self, payer: str, micro_sogni: int) -> int:
        """Credit SOGNI the payer deposited on chain (micro-SOGNI); returns the tx id."""
        if micro_sogni <= 0:
            raise LedgerError("a deposit must be positive")
        with self._tx() as db:
            return self._post(
                db,
                "deposit",
                _addr(payer),
                [(CHAIN, "sogni", -micro_sogni), (_addr(payer), "sogni", micro_sogni)],
            )

    def claim_daily_boost(self, payer: str, now: dt.datetime | float | None = None) -> int:
        """Grant the free Daily Boost Spark once per UTC day; returns the micro-Spark granted."""
        ts = _timestamp(now)
        day = utc_day(ts)
        payer = _addr(payer)
        with self._tx() as db:
            if db.execute(
                "SELECT 1 FROM ledger_boosts WHERE payer = ? AND day = ?", (payer, day)
            ).fetchone():
                raise BoostAlreadyClaimed(
                    f"{payer} already claimed the Daily Boost on {day} (UTC); "
                    "the next claim opens at 00:00 UTC"
                )
            amount = self.daily_boost_micro
            tx = self._post(
                db,
                "daily_boost",
                payer,
                [(TREASURY, "spark_free", -amount), (payer, "spark_free", amount)],
                ts,
            )
            db.execute("INSERT INTO ledger_boosts VALUES (?, ?, ?)", (payer, day, tx))
            return amount

    # --- request path -----------------------------------------------------------------------
    def reserve(
        self,
        request_id: bytes | str,
        payer: str,
        quote: Quote,
        token_type: Literal["spark", "sogni"] | None = None,
        *,
        authorization: bytes | None = None,
        authorization_expiry: float = 0.0,
        signature: bytes | None = None,
        network_id: str | None = None,
        discount_bps: int = 0,
    ) -> Reservation:
        """Hold the quote's price (free Spark before paid); `InsufficientFunds` if short.
        `discount_bps`: the stake discount already taken off `quote`, kept for the epoch.

        `authorization` (the digest of the payer's signed request) is remembered until
        `authorization_expiry`, in the same transaction: using it twice raises `Replayed`.
        The payer's `signature` and the `network_id` it names are kept with the reservation
        (an epoch publishes them as the evidence of who agreed to pay).
        """
        rid, payer = _hex(request_id), _addr(payer)
        token = token_type or quote.token_type
        account = reserved_account(rid)
        with self._tx() as db:
            if db.execute(
                "SELECT 1 FROM ledger_reservations WHERE request_id = ?", (rid,)
            ).fetchone():
                if authorization is not None:  # a paid request is known by its signed hash
                    raise Replayed("this signed request was already submitted")
                raise LedgerError(f"request {rid} is already reserved")
            if authorization is not None:
                db.execute("DELETE FROM ledger_authorizations WHERE expiry < ?", (time.time(),))
                if db.execute(
                    "SELECT 1 FROM ledger_authorizations WHERE digest = ?", (authorization.hex(),)
                ).fetchone():
                    raise Replayed("this signed request was already submitted")
            if token == "spark":
                need = quote.spark_micro
                free = self._balance(db, payer, "spark_free")
                paid = self._balance(db, payer, "spark_paid")
                if free + paid < need:
                    raise InsufficientFunds(payer, quote, need, free + paid)
                use_free = min(free, need)
                res = Reservation(
                    rid, payer, token, use_free, need - use_free, 0, quote.per_image.spark_micro
                )
            else:
                need = quote.sogni_micro
                have = self._balance(db, payer, "sogni")
                if have < need:
                    raise InsufficientFunds(payer, quote, need, have)
                res = Reservation(rid, payer, token, 0, 0, need, quote.per_image.sogni_micro)
            entries: list[tuple[str, Asset, int]] = []
            for asset, amount in (
                ("spark_free", res.spark_free),
                ("spark_paid", res.spark_paid),
                ("sogni", res.sogni),
            ):
                entries += [(payer, asset, -amount), (account, asset, amount)]  # type: ignore[list-item]
            self._post(db, "reserve", rid, entries)
            db.execute(
                "INSERT INTO ledger_reservations (request_id, payer, token_type, amount,"
                " spark_equiv, state, created_at, auth_signature, auth_expiry, network_id,"
                " discount_bps) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, ?, ?, ?)",
                (
                    rid,
                    payer,
                    token,
                    need,
                    quote.spark_micro,
                    time.time(),
                    signature,
                    int(authorization_expiry) if signature is not None else None,
                    network_id,
                    discount_bps,
                ),
            )
            if authorization is not None:
                db.execute(
                    "INSERT INTO ledger_authorizations VALUES (?, ?)",
                    (authorization.hex(), authorization_expiry),
                )
            return res

    def settle(
        self,
        request_id: bytes | str,
        job_value: int,
        worker: str,
        take_rate_bps: int,
        creator_share_bps: int,
        *,
        model_id: str = "",
        job_id: bytes | str | None = None,
        now: float | None = None,
        refuse_self_dealing: bool = False,
    ) -> Settlement:
        """Pay one receipt: `job_value` (micro, paying unit) from the reservation to the worker,
        the platform (take) and the model's creator (share; the platform if no model).

        Free Spark is spent before paid. Idempotent per `job_id`. `refuse_self_dealing`
        (billing's path): a job that would spend free (Daily Boost) Spark and pay it to the
        payer itself or an account referral-linked to it (`linked_accounts`) raises
        `SelfDealing`, nothing written: the free grant never becomes its payer's earnings (the
        request's refund returns the Spark; no epoch pays an unsettled receipt).
        """
        rid = _hex(request_id)
        if job_value < 0 or not 0 <= take_rate_bps + creator_share_bps <= BPS:
            raise LedgerError("job_value must be >= 0 and take + creator share <= 100%")
        account = reserved_account(rid)
        with self._tx() as db:
            row = db.execute(
                "SELECT payer, token_type, amount, spark_equiv, state FROM ledger_reservations"
                " WHERE request_id = ?",
                (rid,),
            ).fetchone()
            if row is None:
                raise LedgerError(f"request {rid} has no reservation")
            payer, token, amount, spark_equiv, state = row
            if job_id is not None:
                done = db.execute(
                    "SELECT spark_free, spark_paid, sogni FROM ledger_jobs WHERE job_id = ?",
                    (_hex(job_id),),
                ).fetchone()
                if done is not None:
                    return self._replay(db, rid, _hex(job_id), done)
            if state != "open":
                raise LedgerError(f"request {rid} is closed (refunded)")
            left = {a: self._balance(db, account, a) for a in ASSETS}
            if job_value > sum(left.values()):
                raise LedgerError(
                    f"job value {job_value} exceeds the {sum(left.values())} left reserved"
                )
            parts: dict[Asset, int] = dict.fromkeys(ASSETS, 0)
            if token == "spark":
                parts["spark_free"] = min(left["spark_free"], job_value)
                parts["spark_paid"] = job_value - parts["spark_free"]
            else:
                parts["sogni"] = job_value
            if refuse_self_dealing and parts["spark_free"] > 0:
                linked = self._linked(db, str(payer))
                if _addr(worker) in linked:
                    raise SelfDealing(
                        f"{_addr(worker)} is the payer {payer} or referral-linked to it: free "
                        "(Daily Boost) Spark is never paid to its payer's own accounts"
                    )
            creator = creator_account(model_id) if model_id else PLATFORM
            entries: list[tuple[str, Asset, int]] = []
            totals = {"take": 0, "creator": 0, "worker": 0}
            for asset, value in parts.items():
                take = value * take_rate_bps // BPS
                share = value * creator_share_bps // BPS
                pay = value - take - share
                totals["take"] += take
                totals["creator"] += share
                totals["worker"] += pay
                entries += [
                    (account, asset, -value),
                    (worker_account(worker), asset, pay),
                    (PLATFORM, asset, take),
                    (creator, asset, share),
                ]
            ts = time.time() if now is None else now
            tx = self._post(db, "settle", rid, entries, ts)
            sogni_spark = _as_spark(parts["sogni"], spark_equiv, amount)
            db.execute(
                "INSERT INTO ledger_jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    tx,
                    None if job_id is None else _hex(job_id),
                    rid,
                    payer,
                    _addr(worker),
                    model_id,
                    parts["spark_free"],
                    parts["spark_paid"],
                    parts["sogni"],
                    sogni_spark,
                    ts,
                ),
            )
            return Settlement(
                rid,
                totals["worker"],
                totals["take"],
                totals["creator"],
                parts["spark_free"],
                parts["spark_paid"],
                parts["sogni"],
            )

    @staticmethod
    def _replay(
        db: sqlite3.Connection, rid: str, job_id: str, done: tuple[int, int, int]
    ) -> Settlement:
        rows = db.execute(
            "SELECT e.account, SUM(e.amount) FROM ledger_entries e JOIN ledger_jobs j"
            " ON e.tx_id = j.tx_id WHERE j.job_id = ? AND e.amount > 0 GROUP BY e.account",
            (job_id,),
        ).fetchall()
        by = {acc: int(amt) for acc, amt in rows}
        platform = by.pop(PLATFORM, 0)
        worker = sum(v for k, v in by.items() if k.startswith("worker:"))
        creator = sum(v for k, v in by.items() if k.startswith("creator:"))
        return Settlement(rid, worker, platform, creator, *done)

    def refund(self, request_id: bytes | str) -> dict[Asset, int]:
        """Return what is still reserved to the payer and close the request (idempotent)."""
        rid = _hex(request_id)
        account = reserved_account(rid)
        with self._tx() as db:
            row = db.execute(
                "SELECT payer FROM ledger_reservations WHERE request_id = ?", (rid,)
            ).fetchone()
            if row is None:
                raise LedgerError(f"request {rid} has no reservation")
            left = {a: self._balance(db, account, a) for a in ASSETS}
            entries: list[tuple[str, Asset, int]] = []
            for asset, amount in left.items():
                entries += [(account, asset, -amount), (row[0], asset, amount)]
            if any(left.values()):
                self._post(db, "refund", rid, entries)
            db.execute(
                "UPDATE ledger_reservations SET state = 'closed' WHERE request_id = ?", (rid,)
            )
            return left

    # --- epoch source --------------------------------------------------------------------------
    def payer_settlements(
        self, jobs: list[tuple[bytes, bytes, int]]
    ) -> tuple[dict[bytes, PayerSettlement], dict[bytes, bool]]:
        """For `(job id, request id, image index)`: what each job's payer paid for it (jobs
        the ledger settled), with the payer's authorization; and, for the requests with a
        reservation (a request without one had no payer), whether it is still open (a
        closed one settled everything it ever will: the rest was refunded)."""
        settled: dict[bytes, PayerSettlement] = {}
        reserved: dict[bytes, bool] = {}
        with self._lock:
            # reservations first: a request's settles commit before its refund, so one read
            # closed here has every settle visible below. Read after the jobs (each SELECT
            # its own snapshot on PostgreSQL, or another process's refund in between), a
            # settled job could read unsettled and its request closed: refused for good.
            for rid in {r for _, r, _ in jobs}:
                row = self._db.execute(
                    "SELECT state FROM ledger_reservations WHERE request_id = ?", (rid.hex(),)
                ).fetchone()
                if row is not None:
                    reserved[rid] = row[0] == "open"
            for job_id, request_id, index in jobs:
                row = self._db.execute(
                    "SELECT j.payer, r.token_type, j.spark_free, j.spark_paid, j.sogni,"
                    " j.sogni_spark, r.auth_signature, r.auth_expiry, r.network_id,"
                    " r.discount_bps"
                    " FROM ledger_jobs j JOIN ledger_reservations r"
                    " ON r.request_id = j.request_id WHERE j.job_id = ?",
                    (job_id.hex(),),
                ).fetchone()
                if row is not None:
                    payer, token, free, paid, sogni, sogni_spark, sig, expiry, network, off = row
                    auth = None
                    if sig is not None:
                        auth = PayerAuthorization(
                            request_hash="0x" + request_id.hex(),
                            network_id=network,
                            expiry=expiry,
                            signature="0x" + bytes(sig).hex(),
                            index=index,
                        )
                    settled[job_id] = PayerSettlement(
                        payer=to_checksum_address(payer),
                        token_type=token,
                        spark_free=free,
                        spark_paid=paid,
                        sogni=sogni,
                        spark_equiv=free + paid if token == "spark" else sogni_spark,
                        authorization=auth,
                        discount_bps=off,
                    )
        return settled, reserved

    # --- leaderboard source -----------------------------------------------------------------
    def settled_jobs(self, start: float, end: float) -> list[tuple[str, str, int, int, int, int]]:
        """Settled jobs in [start, end): (payer, worker, free, paid, sogni, sogni_as_spark)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT payer, worker, spark_free, spark_paid, sogni, sogni_spark"
                " FROM ledger_jobs WHERE settled_at >= ? AND settled_at < ?",
                (start, end),
            ).fetchall()
        return [tuple(r) for r in rows]

    def _store_lookup(self, sql: str, keys: list[bytes]) -> dict[bytes, tuple[object, ...]]:
        """`sql` (with one `{}` for the IN list) over `keys` in chunks; first column keys."""
        out: dict[bytes, tuple[object, ...]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = sql.format(", ".join("?" * len(chunk)))
            for row in self._db.execute(q, chunk):
                out[bytes(row[0])] = tuple(row[1:])
        return out

    def season_jobs(self, start: float, end: float) -> list[SeasonJob]:
        """Settled jobs in [start, end) with their receipt's signer, tier, check and epoch
        verdict from the store's tables (left None/False where the store has no record)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, request_id, payer, worker, spark_free, spark_paid, sogni,"
                " sogni_spark, settled_at FROM ledger_jobs"
                " WHERE settled_at >= ? AND settled_at < ? ORDER BY tx_id",
                (start, end),
            ).fetchall()
            job_keys = [k for r in rows if (k := _unhex(r[0])) is not None]
            request_keys = sorted({k for r in rows if (k := _unhex(r[1])) is not None})
            signers: dict[bytes, tuple[object, ...]] = {}
            networks, checks, refused = dict(signers), dict(signers), dict(signers)
            if self._has_table("receipts"):
                signers = self._store_lookup(
                    "SELECT job_id, worker, receipt FROM receipts WHERE job_id IN ({})", job_keys
                )
            if self._has_table("requests"):
                networks = self._store_lookup(
                    "SELECT request_id, network FROM requests WHERE request_id IN ({})",
                    request_keys,
                )
            if self._has_table("checks"):
                checks = self._store_lookup(
                    "SELECT job_id, state FROM checks WHERE job_id IN ({})", job_keys
                )
            if self._has_table("settled_receipts"):
                refused = self._store_lookup(
                    "SELECT job_id, status FROM settled_receipts"
                    " WHERE status = 'refused' AND job_id IN ({})",
                    job_keys,
                )
        out = []
        for job_id, rid, payer, worker, free, paid, sogni, sogni_spark, at in rows:
            key = _unhex(job_id) or b""
            signer = signers.get(key)
            network = networks.get(_unhex(rid) or b"")
            check = checks.get(key)
            payout = None if signer is None else _receipt_payout(signer[1])
            out.append(
                SeasonJob(
                    job_id,
                    payer,
                    worker,
                    None if signer is None else str(signer[0]).lower(),
                    payout,
                    None if network is None else str(network[0]),
                    None if check is None else str(check[0]),
                    key in refused,
                    int(free),
                    int(paid),
                    int(sogni),
                    int(sogni_spark),
                    float(at),
                )
            )
        return out

    def purchases(self, start: float, end: float) -> list[tuple[str, int, float]]:
        """Card purchases of paid Spark in [start, end): (payer, micro-Spark, time)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t.ref, e.amount, t.created_at FROM ledger_tx t JOIN ledger_entries e"
                " ON e.tx_id = t.tx_id AND e.account = t.ref AND e.asset = 'spark_paid'"
                " WHERE t.kind = 'purchase' AND t.created_at >= ? AND t.created_at < ?"
                " ORDER BY t.tx_id",
                (start, end),
            ).fetchall()
        return [(str(p), int(a), float(t)) for p, a, t in rows]

    # --- referrals ------------------------------------------------------------------------------
    def refer(self, referred: str, referrer: str, now: float | None = None) -> None:
        """Record that `referrer` referred `referred`; `ReferralRefused` for oneself, a second
        referrer, or a cycle (`referrer` is already below `referred`)."""
        referred, referrer = _addr(referred), _addr(referrer)
        if referred == referrer:
            raise ReferralRefused("an account cannot refer itself")
        with self._tx() as db:
            row = db.execute(
                "SELECT referrer FROM ledger_referrals WHERE referred = ?", (referred,)
            ).fetchone()
            if row is not None:
                raise ReferralRefused(f"{referred} was already referred by {row[0]}")
            up: str | None = referrer
            while up is not None:  # the chain is acyclic, so this ends
                if up == referred:
                    raise ReferralRefused(
                        f"{referrer} is referred (directly or not) by {referred}: a cycle"
                    )
                nxt = db.execute(
                    "SELECT referrer FROM ledger_referrals WHERE referred = ?", (up,)
                ).fetchone()
                up = None if nxt is None else str(nxt[0])
            db.execute(
                "INSERT INTO ledger_referrals VALUES (?, ?, ?)",
                (referred, referrer, time.time() if now is None else now),
            )

    def linked_accounts(self, account: str) -> frozenset[str]:
        """`account` (lower case) and every account referral-linked to it: its referrer and
        the accounts it referred (one directly referred the other, the season boards' no-farming
        link). None of them may check, or be paid for, work the account paid for with free
        Spark (`Billing.payer_accounts`)."""
        with self._lock:
            return self._linked(self._db, account)

    @staticmethod
    def _linked(db: sqlite3.Connection, account: str) -> frozenset[str]:
        acct = _addr(account)
        up = db.execute("SELECT referrer FROM ledger_referrals WHERE referred = ?", (acct,))
        down = db.execute("SELECT referred FROM ledger_referrals WHERE referrer = ?", (acct,))
        return frozenset({acct, *(str(r[0]) for r in up), *(str(r[0]) for r in down)})

    def referrals(self) -> dict[str, tuple[str, float]]:
        """referred -> (referrer, when) for every referral."""
        with self._lock:
            rows = self._db.execute(
                "SELECT referred, referrer, created_at FROM ledger_referrals"
            ).fetchall()
        return {str(a): (str(b), float(t)) for a, b, t in rows}
