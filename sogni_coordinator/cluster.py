"""Several coordinators of one network on one PostgreSQL (issue #18): who renders, who delivers.

Why this shape: a request belongs to the coordinator its client is attached to (its
*owner*, `cluster_requests.owner`), but any coordinator with idle nodes may render its jobs.
So a submitted request's jobs go into the shared queue (`queue/postgres.py`), and each
coordinator leases jobs for its own connected nodes when they have credit (only jobs of
models those nodes serve), renews its leases while the nodes render, and hands a job back
to the queue when its node declines it or is lost. A coordinator that dies stops renewing;
its leases expire and the jobs are leased again elsewhere.

Whoever receives a job's result stores the image in the shared result store (`results_dir`,
one folder every coordinator of the network reads, or the database itself with
`result_store = "database"`: `sogni_coordinator.results`) and commits the receipt; the same
transaction completes the job in the shared queue (its one `queue_receipts` row) and
NOTIFYs the request's owner (`Store.shared_queue`). The owner reads the request's jobs back
from the shared tables (on that NOTIFY, and every `REFRESH_SECONDS` in case one was
missed), delivers each image once, bills it from the request's reservation, and ends the
request. A client whose coordinator died resumes at another one: `adopt` moves the owner
column to that coordinator in one statement (the old owner's claim is lost: it stops
delivering and billing that request when it notices), and rebuilds the mailbox and the
reservation from the shared database. Each coordinator beats in `cluster_members`; a request
whose owner stopped beating and that still has live jobs or an open reservation is taken
over by a live coordinator (no client needed): it is billed, refunded and kept for a resume.

A node holding a finished result whose coordinator died delivers it to another coordinator
of the network: every offer is recorded in `cluster_offers` (written in batches off the
event loop), so the receiver checks the result against the shared offer and job records
(signed by a coordinator in `network_signers`, made to this wallet, job still live) and the
receipts table's primary key decides a race between two deliveries.

What the NOTIFYs carry is also in tables, so a missed one costs a moment, never an outcome:
a cancel is written to `cluster_cancels` (the lease loop reads those of the requests it
renders), results to `queue_receipts` and `jobs` (the owner re-reads every second). The
models each coordinator's nodes serve are published in `cluster_models`, so every
coordinator accepts a request for a model some node of the network serves.

The catalog and the pricing factors are one per network: each coordinator publishes a
digest of those it quotes with (`cluster_members.terms`) when it joins, and refuses to start
when a live coordinator of the network published another (`NetworkTermsDiffer`, one line
naming what differs), so two coordinators never price one request differently.

psycopg runs only in worker threads; each connection has a lock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec
import psycopg
import trio

from sogni_coordinator.billing import Refusal
from sogni_coordinator.db import DatabaseBusy
from sogni_coordinator.delivery import Mailbox, short
from sogni_coordinator.job_state import STORED_LIVE, JobState
from sogni_coordinator.jobs import Job, NodeLink, RequestState
from sogni_coordinator.prompt_crypto import PromptKeyError
from sogni_coordinator.queue.base import Lease, LeaseLost, NewJob, QueueError
from sogni_coordinator.queue.postgres import BOUNDED, PostgresQueue, migrate
from sogni_coordinator.storage import location
from sogni_coordinator.store import JobOutcome, Store, StoredJob
from sogni_protocol import eip712
from sogni_protocol.catalog import Catalog, ModelEntry, default_catalog
from sogni_protocol.cli_errors import Refused, register
from sogni_protocol.errors import SignatureError
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import Cancel, JobFailed, JobOffer, JobProgress, Result
from sogni_protocol.pricing import ScalingFactors, default_factors

log = get_logger(__name__)

_DB_ERRORS = (psycopg.Error, sqlite3.Error, DatabaseBusy)
"""What a round of the cluster's loops may meet from the shared database (an outage, another
coordinator holding the write lock past `db.WRITE_DEADLINE`): logged, and the next round
tries again; never the end of the daemon."""

__all__ = ["Cluster", "NetworkTermsDiffer", "network_terms"]

T = TypeVar("T")

COMPONENT = "cluster"
REFRESH_SECONDS = 1.0
"""An owner re-reads its requests' jobs this often even without a NOTIFY."""
LEASE_BATCH = 64
STALL_WARNING = 10.0
EMPTY_LEASE_PAUSE = 0.05
"""After a lease that found nothing, at most this often again (a NOTIFY meanwhile is kept)."""
OFFER_BACKLOG = 10_000
"""Offers waiting to be recorded; beyond that they are dropped (only failover loses)."""
_WAIT_SLICE = 0.25
QUEUE_ATTEMPTS = 50
"""Leases a job may take in the shared queue. The dispatcher's own count (its
`MAX_ATTEMPTS` of node failures) gives up first; this bounds leases lost to coordinators
dying, after which the owner fails the job (`_fail_dead`)."""
PROGRESS_TAG = "p:"
"""NOTIFY payload prefix: `p:<request>:<job>:<step>:<steps>`, a lessee's node progress."""
PROGRESS_EVERY = 0.5
"""A lessee relays its nodes' progress to the owners at most this often (one NOTIFY per
job that moved): at most 2 frames a second per job reach the owner's client."""
CANCEL_TAG = "c:"
"""NOTIFY payload prefix on `Store.notify_channel`: the request's client cancelled."""
CANCEL_READ_EVERY = 0.5
"""The lease loop reads the shared cancels of the other coordinators' requests it renders
at most this often (a NOTIFY missed costs at most this much more rendering)."""
CANCEL_KEEP = 24 * 3600.0
"""Seconds a cancel row is kept (every job of its request ended long before)."""
CANCEL_PRUNE_EVERY = 60.0
"""Each coordinator deletes cancel rows older than `CANCEL_KEEP` this often."""
HOLD_UNPLACED = 10.0
"""Seconds a leased job may wait here for a node before it goes back to the shared queue."""
NOT_QUEUED = (
    "the network's shared queue did not take the request: nothing was charged; send it again"
    " (a paid one authorized anew: its signature is spent)"
)
UNREGISTERED_GRACE = 600.0
"""Seconds an open reservation may have no `cluster_requests` row before a coordinator takes
it and refunds it: its coordinator died between reserving and registering the request
(milliseconds apart), and no client ever heard it was accepted."""
_UNREGISTERED_WHERE = """r.state = 'open'
  AND NOT EXISTS (SELECT 1 FROM cluster_requests c
                  WHERE c.request_id = decode(r.request_id, 'hex'))"""
_UNREGISTERED = f"""
SELECT decode(r.request_id, 'hex') FROM ledger_reservations r
WHERE {_UNREGISTERED_WHERE}
  AND r.created_at < extract(epoch FROM clock_timestamp())::float8 - %(grace)s
LIMIT 64
"""
"""Open reservations no request row owns, stamped over the grace ago: candidates, claimed
only if still unregistered `UNREGISTERED_CONFIRM` seconds later (`_CLAIM_UNREGISTERED`)."""
_CLAIM_UNREGISTERED = f"""
INSERT INTO cluster_requests
SELECT decode(r.request_id, 'hex'), %(me)s, extract(epoch FROM clock_timestamp())::float8
FROM ledger_reservations r
WHERE r.request_id = ANY(%(ids)s) AND {_UNREGISTERED_WHERE}
ON CONFLICT DO NOTHING
RETURNING request_id
"""
"""Of the candidates, those still unregistered: claimed (one coordinator wins each) to
refund."""
UNREGISTERED_CONFIRM = 5.0
"""Seconds (this coordinator's monotonic clock) a candidate must stay unregistered before
it is claimed. `created_at` is the reserving coordinator's own clock: one running more than
`UNREGISTERED_GRACE` behind the database stamps every reservation "old" the moment it
writes it, and before, a look that fell between its reserve and its registering
(milliseconds) claimed and refunded a request whose client was being told "accepted". A
registering coordinator is done long before this; a dead one never is."""
BEAT_GAP_SHARE = 0.5
"""Of the live window (`live_window`): a gap between two of this coordinator's own heartbeats
longer than that means it was cut off from the database (an outage, a stall) or just
started; it then beats for a whole live window before taking any request over, so owners
cut off as long as it was have beaten again by then. Only a coordinator that stays silent
while the others beat is taken for dead (before, the first coordinator back after an outage
longer than the window took every other live owner's requests, ending their clients'
streams)."""
DEAD_GRACE = 5.0
"""Seconds a job stays dead in the queue before its owner fails it (a bury and the store's
own write of the job's end are two transactions)."""

_SCHEMA_V1 = """
CREATE TABLE cluster_requests (
    request_id  BYTEA PRIMARY KEY,
    owner       TEXT NOT NULL,
    claimed_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX cluster_requests_owner ON cluster_requests (owner);
CREATE TABLE cluster_offers (
    offer_hash  BYTEA PRIMARY KEY,
    job_id      BYTEA NOT NULL,
    coordinator TEXT NOT NULL,
    wallet      TEXT NOT NULL,
    offer       BYTEA NOT NULL,
    signature   BYTEA NOT NULL,
    made_at     DOUBLE PRECISION NOT NULL
);
CREATE INDEX cluster_offers_job ON cluster_offers (job_id);
CREATE TABLE cluster_members (
    coordinator TEXT PRIMARY KEY,
    seen_at     DOUBLE PRECISION NOT NULL
);
"""
_SCHEMA_V2 = """
CREATE TABLE cluster_cancels (
    request_id   BYTEA PRIMARY KEY,
    cancelled_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX cluster_cancels_at ON cluster_cancels (cancelled_at);
CREATE TABLE cluster_models (
    coordinator TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    PRIMARY KEY (coordinator, model_id)
);
"""
"""v2: cancels any coordinator can read back (a missed NOTIFY is not a lost cancel), and
the models each coordinator's connected nodes serve (a request for a model any node of the
network serves is accepted at every coordinator)."""
_SCHEMA_V3 = """
ALTER TABLE cluster_members ADD COLUMN terms TEXT;
"""
"""v3: each coordinator's catalog and pricing-factor digests (`network_terms`), compared
by every coordinator that joins (`NetworkTermsDiffer`)."""
MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3)

_offer_decoder = msgspec.msgpack.Decoder(JobOffer)
_NOW = "extract(epoch FROM clock_timestamp())::float8"
"""The database's clock: one clock for every coordinator."""
_HEARTBEAT = (
    f"INSERT INTO cluster_members VALUES (%s, {_NOW})"
    " ON CONFLICT (coordinator) DO UPDATE SET seen_at = EXCLUDED.seen_at"
)
_UNSETTLED = """(EXISTS (SELECT 1 FROM jobs j WHERE j.request_id = c.request_id
                   AND j.state IN ('queued', 'cancelling'))
           OR EXISTS (SELECT 1 FROM ledger_reservations r
                      WHERE r.request_id = encode(c.request_id, 'hex') AND r.state = 'open'))"""
"""SQL: request `c` has jobs to follow or a reservation to settle."""
_ORPHANS = f"""
UPDATE cluster_requests SET owner = %(me)s, claimed_at = {_NOW}
WHERE request_id IN (
    SELECT c.request_id FROM cluster_requests c
    WHERE c.owner <> %(me)s
      AND {_UNSETTLED}
      AND NOT EXISTS (SELECT 1 FROM cluster_members m WHERE m.coordinator = c.owner
                      AND m.seen_at > {_NOW} - %(after)s)
    LIMIT 64 FOR UPDATE OF c SKIP LOCKED)
RETURNING request_id
"""
"""Requests whose owner stopped beating, with jobs to follow or a reservation to settle:
taken over so they are billed and ended."""


TERMS_LIMIT = 1024
"""Bytes of a published `terms` value read back; a longer one is unreadable (differs)."""
_TERMS_LOCK = 0x736F676E6974  # "sognit": joins compare and publish one at a time
TERMS_TODO = (
    "run the same release with the same configs/catalog.toml, $SOGNI_CATALOG and"
    " configs/pricing_factors.toml on every coordinator of the network, or stop the others first"
)


class NetworkTermsDiffer(Exception):
    """A live coordinator of this network quotes with another catalog or pricing factors:
    this one refuses to join (one price per request, whichever coordinator takes it)."""


register(NetworkTermsDiffer, Refused, TERMS_TODO)


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _entry(e: ModelEntry) -> list[object]:
    return [
        e.model_class,
        e.baseline_render_seconds,
        e.default_steps,
        e.default_width,
        e.default_height,
        e.creator,
    ]


def network_terms(catalog: Catalog, factors: ScalingFactors) -> dict[str, str]:
    """What a coordinator quotes and bills with, one digest per part (so a refusal can name
    the part that differs): the catalog's classes, models and economics, and the factors."""
    return {
        "catalog classes": _digest({k: _entry(v) for k, v in catalog.classes.items()}),
        "catalog models": _digest({k: _entry(v) for k, v in catalog.models.items()}),
        "catalog prices": _digest(
            [catalog.sogni_usd_price, catalog.relaxed_price_factor, catalog.daily_boost_spark]
        ),
        "pricing factors": _digest([factors.overhead_steps, factors.pixel_exponent]),
    }


def _terms_fault(mine: dict[str, str], theirs: list[tuple[str, str | None]]) -> str | None:
    """Why this coordinator may not join beside the live `theirs` (coordinator, published
    terms), or None when every one published the same terms."""
    for coordinator, raw in theirs:
        if raw is None:
            return (
                f"coordinator {coordinator} of this network is live and publishes no catalog"
                " digest (a release before this check)"
            )
        try:
            published = json.loads(raw) if len(raw) <= TERMS_LIMIT else None
        except ValueError:
            published = None
        if not isinstance(published, dict):
            return f"coordinator {coordinator} published an unreadable catalog digest"
        differ = [part for part in mine if published.get(part) != mine[part]]
        if any(p not in mine for p in published):  # a release that digests more parts
            differ.append("release")
        if differ:
            return (
                f"this coordinator's {', '.join(differ)} differ from live coordinator"
                f" {coordinator}'s"
            )
    return None


def _progress_item(payload: str) -> tuple[bytes, bytes, int, int] | None:
    """`p:<request>:<job>:<step>:<steps>` checked (ids of 32 bytes, 0 <= step <= steps <
    2**16), else None."""
    parts = payload.removeprefix(PROGRESS_TAG).split(":")
    if len(parts) != 4 or len(payload) > 200:
        return None
    try:
        request_id, job_id = bytes.fromhex(parts[0]), bytes.fromhex(parts[1])
        step, steps = int(parts[2]), int(parts[3])
    except ValueError:
        return None
    if len(request_id) != 32 or len(job_id) != 32 or not 0 <= step <= steps < 2**16:
        return None
    return request_id, job_id, step, steps


MUST_TRIES = 12
"""Tries of a shared-queue call that a lapsed lease does not stand in for (`_Must`): about
three minutes of a database away, waiting longer each time."""


class _Must:
    """A queued shared-queue call that is tried again when the database fails it (a cancel,
    a give-up): the others (a release) are covered by their lease lapsing."""

    def __init__(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._fn = fn
        self.tries = 0

    def __call__(self) -> Awaitable[None]:
        return self._fn()


class Cluster:
    """This coordinator's part in the network: leases, owned requests, shared offers."""

    def __init__(
        self,
        url: str,
        queue: PostgresQueue,
        conn: psycopg.Connection[Any],
        listen: psycopg.Connection[Any],
        *,
        me: str,
        signers: Iterable[str],
        lease_ttl: float,
    ) -> None:
        self.url = url
        self.queue = queue
        self._conn = conn
        self._listen = listen
        self._lock = threading.Lock()
        self.me = me.lower()
        self.signers = frozenset(s.lower() for s in signers) | {self.me}
        """Coordinators of this network whose offers this one accepts results for."""
        self.lease_ttl = lease_ttl
        self.orphan_after = self.live_window(lease_ttl)
        """Seconds without a heartbeat after which a coordinator's requests are taken over
        (billed, refunded and kept for their client) by one that is alive."""
        self.leases: dict[bytes, Lease] = {}
        """Jobs this coordinator leased and holds now (in `Dispatcher.jobs`)."""
        self.counted: dict[bytes, set[bytes]] = {}
        """Owned request -> its jobs already counted as ended (delivered, failed, ...)."""
        self.dispatcher: Any = None
        """The `dispatch.Dispatcher` (not imported: it imports this module's type)."""
        self._poked = trio.Event()
        self._todo_send, self._todo = trio.open_memory_channel[Callable[[], Awaitable[None]]](
            OFFER_BACKLOG
        )
        self._offers: list[tuple[bytes, bytes, str, str, bytes, bytes, float]] = []
        self._offers_wake = trio.Event()
        self._progress: dict[bytes, tuple[bytes, int, int]] = {}
        """Job leased here -> (request, step, steps) not yet relayed to its owner."""
        self._closed = False
        self._taken_at: dict[bytes, float] = {}
        """Leased job -> when it joined the dispatcher's queue here (`_return_unplaced`)."""
        self._looped_at = time.monotonic()
        """When the lease loop last went round (at least every second): a watchdog reads it."""
        self._cancels_read = 0.0
        self._pruned_at = 0.0
        self._cancels_seen: set[bytes] = set()
        """Other coordinators' requests whose cancel this one applied already."""
        self.network_models: frozenset[str] = frozenset()
        """Models some node connected to a live coordinator of the network serves (read from
        `cluster_models` every `REFRESH_SECONDS`): `Dispatcher.model_fault` accepts them."""
        self._published: frozenset[str] | None = None
        self._unregistered: dict[bytes, float] = {}
        """Open reservations no request row owned when seen -> when first seen (monotonic):
        claimed once they stay so `UNREGISTERED_CONFIRM` seconds."""
        self._beat_at = -math.inf
        """When this coordinator's last heartbeat was written (monotonic)."""
        self._beats_since = math.inf
        """When its current run of heartbeats (none far apart: `BEAT_GAP_SHARE`) began: it
        takes no orphan over before that run is `orphan_after` long."""

    @classmethod
    async def open(
        cls,
        database: str | Any,
        *,
        me: str,
        signers: Iterable[str],
        lease_ttl: float,
        catalog: Catalog | None = None,
        factors: ScalingFactors | None = None,
    ) -> Cluster:
        """Connect to the shared database (queue, owner records, offers), migrate, join
        (`NetworkTermsDiffer` when the live coordinators quote otherwise), LISTEN.
        `catalog`/`factors`: what this coordinator quotes with (default: the package's)."""
        url = location(database)
        terms = network_terms(catalog or default_catalog(), factors or default_factors())
        after = cls.live_window(lease_ttl)
        queue = await PostgresQueue.open(url)
        try:
            conn, listen = await trio.to_thread.run_sync(
                cls._connect, url, Store.notify_channel, me.lower(), terms, after
            )
        except BaseException:
            await queue.aclose()
            raise
        return cls(url, queue, conn, listen, me=me, signers=signers, lease_ttl=lease_ttl)

    @staticmethod
    def live_window(lease_ttl: float) -> float:
        """Seconds since its last heartbeat within which a coordinator counts as live."""
        return max(3 * lease_ttl, 5 * REFRESH_SECONDS)

    @staticmethod
    def _connect(
        url: str, channel: str, me: str, terms: dict[str, str], after: float
    ) -> tuple[psycopg.Connection[Any], ...]:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10, options=BOUNDED)
        try:
            migrate(conn, COMPONENT, MIGRATIONS)
            Cluster._join(conn, me, terms, after)  # alive before its first request
            listen = psycopg.connect(url, autocommit=True, connect_timeout=10)
            listen.execute(f"LISTEN {channel}".encode())
        except BaseException:
            conn.close()
            raise
        return conn, listen

    @staticmethod
    def _join(conn: psycopg.Connection[Any], me: str, terms: dict[str, str], after: float) -> None:
        """Compare `terms` with those of the live coordinators and publish them with the
        first heartbeat, in one transaction under an advisory lock: two coordinators that
        join at once with different terms cannot both pass."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_TERMS_LOCK,))
            rows = conn.execute(
                "SELECT coordinator, left(terms, %s) FROM cluster_members"
                f" WHERE coordinator <> %s AND seen_at > {_NOW} - %s ORDER BY coordinator",
                (TERMS_LIMIT + 1, me, after),
            ).fetchall()
            fault = _terms_fault(terms, [(str(r[0])[:80], r[1]) for r in rows])
            if fault is not None:
                raise NetworkTermsDiffer(fault)
            conn.execute(
                f"INSERT INTO cluster_members (coordinator, seen_at, terms) VALUES (%s, {_NOW}, %s)"
                " ON CONFLICT (coordinator) DO UPDATE"
                " SET seen_at = EXCLUDED.seen_at, terms = EXCLUDED.terms",
                (me, json.dumps(terms, sort_keys=True)),
            )

    def attach(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        dispatcher.cluster = self
        dispatcher.store.shared_queue = self.me

    @property
    def d(self) -> Any:
        assert self.dispatcher is not None, "Cluster.attach first"
        return self.dispatcher

    async def _sql(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(self._locked, fn, *args))

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn` on the cluster's connection, opened again first if the server lost it (the
        call that met the loss raises; every caller's next round retries)."""
        with self._lock:
            if (self._conn.closed or self._conn.broken) and not self._closed:
                self._conn = psycopg.connect(
                    self.url, autocommit=True, connect_timeout=10, options=BOUNDED
                )
            return fn(*args)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.queue.aclose()

        def close() -> None:
            with self._lock:
                self._conn.close()
            self._listen.close()

        await trio.to_thread.run_sync(close)

    # --- what the dispatcher calls ----------------------------------------------------------
    async def submitted(self, request_id: bytes, jobs: Sequence[Job], priority: int = 0) -> None:
        """A stored request: this coordinator owns it, its jobs join the shared queue
        (`priority`: the payer's stake tier, leased first by every coordinator). Raises
        `Refusal` when the shared database did not take them."""

        def claim() -> None:
            self._conn.execute(
                "INSERT INTO cluster_requests VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (request_id, self.me, time.time()),
            )

        try:
            await self._sql(claim)
            await self.queue.enqueue(
                [
                    NewJob(
                        j.job_id, request_id, j.params.model_id.encode(), QUEUE_ATTEMPTS, priority
                    )
                    for j in jobs
                ]
            )
        except (*_DB_ERRORS, QueueError) as exc:  # the dispatcher undoes the stored request
            log.warning("request_not_queued", request=short(request_id), error=type(exc).__name__)
            try:  # owned by nobody: never adopted (its jobs end failed in `Dispatcher._unsubmit`)
                await self._sql(
                    lambda: self._conn.execute(
                        "DELETE FROM cluster_requests WHERE request_id = %s", (request_id,)
                    )
                )
            except _DB_ERRORS:
                pass  # the database is away: the failed jobs leave nothing to adopt anyway
            raise Refusal("unavailable", f"{NOT_QUEUED} ({type(exc).__name__})") from None
        self.counted[request_id] = set()

    def poke(self) -> None:
        """Credit or nodes changed: the lease loop looks again."""
        self._poked.set()

    def offered(
        self, job: Job, link: NodeLink, offer: JobOffer, offer_hash: bytes, signature: bytes
    ) -> None:
        """Record a signed offer for a node that may deliver its result elsewhere."""
        if len(self._offers) >= OFFER_BACKLOG:
            log.warning("cluster_offer_dropped", job=job.job_id.hex()[:16])
            return
        row = (
            offer_hash,
            job.job_id,
            offer.coordinator.lower(),
            link.wallet.lower(),
            msgspec.msgpack.encode(offer),
            signature,
            time.time(),
        )
        self._offers.append(row)
        self._offers_wake.set()

    def ended(self, job: Job) -> None:
        """A local job reached a terminal state (the dispatcher counted it if it owns it).
        A cancelled one leaves the shared queue now (else its lease would lapse and it would
        be leased again only to be buried)."""
        if self.leases.pop(job.job_id, None) is not None and job.state is JobState.CANCELLED:
            self._later(functools.partial(self._bury, [job.job_id]))
        counted = self.counted.get(job.request_id)
        if counted is not None:
            counted.add(job.job_id)

    def held_passed(self, job: Job) -> None:
        """A held (verification-sampled) receipt's check passed: `Store.mark_check` has
        completed its queue row and woken its owner in the check's own transaction (as
        `Store.store_receipts` does for a receipt stored without a check); the lease is
        over. A failed check gives the job back (`give_back`, through the dispatcher's
        requeue) or ends it (`ended`)."""
        self.leases.pop(job.job_id, None)

    def give_back(self, job: Job) -> None:
        """The job goes back to the shared queue (node lost, declined, deadline): another
        coordinator, or this one, leases it again."""
        self.d.jobs.pop(job.job_id, None)
        lease = self.leases.pop(job.job_id, None)
        if lease is not None:
            self._later(functools.partial(self._release, lease))

    def gave_up(self, job: Job) -> None:
        """Out of attempts: the job leaves the shared queue for good."""
        self.leases.pop(job.job_id, None)
        self._later(_Must(functools.partial(self._bury, [job.job_id])))

    def cancelled(self, request_id: bytes) -> None:
        """The client cancelled: jobs still in the shared queue end, and every coordinator
        is told (NOTIFY `c:<request>`) so the ones rendering its jobs stop their nodes (paid
        for the steps done, as any cancel: `_cancel_leased`)."""
        self._later(_Must(functools.partial(self._cancel_queued, request_id)))

    def _later(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            self._todo_send.send_nowait(fn)
        except trio.WouldBlock:
            log.error("cluster_backlog_full")  # the lease expires and the job comes back

    async def _release(self, lease: Lease) -> None:
        try:
            await self.queue.release(lease)
        except LeaseLost:
            pass  # expired meanwhile: it is back in the queue already

    async def _bury(self, job_ids: list[bytes]) -> None:
        await self.queue.bury(job_ids)

    async def _cancel_queued(self, request_id: bytes) -> None:
        def notify() -> None:  # the row outlives a missed NOTIFY (`_read_cancels`)
            with self._conn.transaction():
                self._conn.execute(
                    f"INSERT INTO cluster_cancels VALUES (%s, {_NOW}) ON CONFLICT DO NOTHING",
                    (request_id,),
                )
                self._conn.execute(
                    "SELECT pg_notify(%s, %s)",
                    (Store.notify_channel, CANCEL_TAG + request_id.hex()),
                )

        await self._sql(notify)
        buried = await self.queue.bury(request_id=request_id)
        if buried:
            await self.d.store.call(
                self.d.store.save_job_states, [(j, JobState.CANCELLED, 0) for j in buried]
            )
            await self.refresh(request_id)

    def progressed(self, job: Job, step: int) -> None:
        """A node here rendered a step of another coordinator's job: relayed in a batch."""
        self._progress[job.job_id] = (job.request_id, step, job.params.steps)

    async def _progress_forever(self) -> None:
        while True:
            await trio.sleep(PROGRESS_EVERY)
            if not self._progress:
                continue
            batch, self._progress = self._progress, {}
            payloads = [
                f"{PROGRESS_TAG}{r.hex()}:{j.hex()}:{step}:{steps}"
                for j, (r, step, steps) in batch.items()
            ]

            def send(items: list[str]) -> None:
                for payload in items:
                    self._conn.execute("SELECT pg_notify(%s, %s)", (Store.notify_channel, payload))

            try:
                await self._sql(send, payloads)
            except psycopg.Error as exc:  # progress is best effort: the result follows
                log.warning("cluster_progress_not_sent", error=type(exc).__name__)

    def _show_progress(self, items: list[tuple[bytes, bytes, int, int]]) -> None:
        """Progress another coordinator's node made on a request owned here: to its client,
        as the owner's own nodes' progress (the latest step per job)."""
        d = self.d
        for request_id, job_id, step, steps in items:
            state = d.requests.get(request_id)
            if state is None or not state.mailbox.attached:
                continue
            box = state.mailbox
            try:
                index = box.job_ids.index(job_id)
            except ValueError:
                continue
            if job_id in box.pending or job_id in box.acked:
                continue  # its image is here already
            box.progress[job_id] = JobProgress(job_id=job_id, index=index, step=step, steps=steps)
            box.notify()

    def _cancel_leased(self, request_id: bytes) -> None:
        """Another coordinator's client cancelled: the jobs of that request this one leased
        stop as the owner's own would (`Dispatcher.cancel_request`: running ones end with a
        partial receipt, paid pro rata, or a hand-back); those still waiting here leave the
        shared queue. The owner counts them from the shared tables."""
        d = self.d
        if request_id in d.requests:  # the owner itself: it cancelled already
            return
        mine = [j for j in d.jobs.values() if j.request_id == request_id]
        if not mine or request_id in self._cancels_seen:
            return
        self._cancels_seen.add(request_id)
        waiting = [j.job_id for j in mine if j.state is JobState.QUEUED]
        log.info("leased_jobs_cancelled", request=short(request_id), jobs=len(mine))
        d.cancel_request(request_id)
        if waiting:
            self._later(functools.partial(self._bury, waiting))

    # --- results for another coordinator's offer --------------------------------------------
    async def take_result(self, link: NodeLink, result: Result) -> Job | None:
        """A result for an offer this coordinator did not make: if some coordinator of the
        network made it to this node's wallet and the job is still live, the offer is
        attached to the job here (taken RUNNING if this coordinator does not hold it) so
        the usual checks and the receipt follow. Returns a job it created, else None."""
        offer_hash = result.receipt.offer_hash

        def read() -> tuple[Any, ...] | None:
            row = self._conn.execute(
                "SELECT job_id, coordinator, wallet, offer, signature FROM cluster_offers"
                " WHERE offer_hash = %s",
                (offer_hash,),
            ).fetchone()
            return None if row is None else tuple(row)

        row = await self._sql(read)
        if row is None:
            return None
        job_id, coordinator, wallet, blob, signature = row
        if bytes(job_id) != result.job_id or coordinator not in self.signers:
            return None
        if not eip712.same_address(wallet, link.wallet):
            return None
        offer = _offer_decoder.decode(bytes(blob))
        domain = self.d.domain
        try:
            signer = eip712.recover_offer_signer(domain, offer, bytes(signature))
        except SignatureError:
            return None
        if not eip712.same_address(signer, coordinator) or (
            eip712.offer_hash(domain, offer) != offer_hash
        ):
            return None
        held = self.d.jobs.get(result.job_id)
        if held is not None:  # leased again here after its lease lapsed: the first result wins
            held.offers[offer_hash] = link.peer_id
            held.signed_offers[offer_hash] = (offer, bytes(signature))
            return None
        stored = await trio.to_thread.run_sync(self.d.store.jobs_by_id, [result.job_id])
        if not stored or result.job_id in self.d.jobs:
            return None
        s = stored[0]
        # a cancelled job whose lessee died waiting for this node's partial receipt is
        # stored cancelling: taken so, the partial receipt is paid (restored running, it was
        # refused as "not cancelled" and the node's steps went unpaid)
        cancelling = s.state is JobState.CANCELLING
        job = Job.restored(s, JobState.CANCELLING if cancelling else JobState.RUNNING)
        job.offers[offer_hash] = link.peer_id
        job.signed_offers[offer_hash] = (offer, bytes(signature))
        self.d.jobs[job.job_id] = job
        log.info("result_for_network_offer", job=job.job_id.hex()[:16], coordinator=coordinator)
        return job

    # --- owning requests --------------------------------------------------------------------
    async def adopt(self, request_id: bytes, *, claim: bool = True) -> bool:
        """Make this coordinator the request's owner (`claim`: take it over from another,
        atomically) and rebuild what it owes its client and its reservation from the shared
        database. False if the network never had this request."""

        def take() -> bool:
            if claim:
                row = self._conn.execute(
                    "UPDATE cluster_requests SET owner = %s, claimed_at = %s"
                    " WHERE request_id = %s RETURNING 1",
                    (self.me, time.time(), request_id),
                ).fetchone()
                return row is not None
            return True

        if not await self._sql(take):
            return False
        d = self.d
        outcomes = await trio.to_thread.run_sync(d.store.job_outcomes, request_id)
        record = await trio.to_thread.run_sync(d.store.delivery, request_id)
        if record is None:
            return False
        if d.billing is not None:
            await trio.to_thread.run_sync(
                functools.partial(d.billing.restore, d.store, only={request_id})
            )
        box = d.mailboxes.get(request_id) or Mailbox.from_record(record, d.results)
        live = [o for o in outcomes if o.state in STORED_LIVE]
        if live and request_id not in d.requests:  # else `resume` reads it when asked
            d.mailboxes[request_id] = box
            ended = [o.state for o in outcomes if o.state not in STORED_LIVE]
            d.requests[request_id] = RequestState(
                request_id,
                len(live),
                box,
                delivered=ended.count(JobState.DONE),
                failed=ended.count(JobState.FAILED),
                cancelled=ended.count(JobState.CANCELLED),
            )
            self.counted[request_id] = {o.job_id for o in outcomes if o.state not in STORED_LIVE}
        log.info("request_adopted", request=short(request_id), live=len(live))
        return True

    async def restore(self) -> int:
        """After a restart: the requests this coordinator still owns with live jobs or an
        open reservation (settled and refunded by `adopt`: a restart within the orphan
        window would otherwise leave the payer's reservation open for good)."""

        def owned() -> list[bytes]:
            rows = self._conn.execute(
                f"SELECT c.request_id FROM cluster_requests c WHERE c.owner = %s AND {_UNSETTLED}",
                (self.me,),
            ).fetchall()
            return [bytes(r[0]) for r in rows]

        mine = await self._sql(owned)
        for request_id in mine:
            await self.adopt(request_id, claim=False)
        return len(mine)

    async def refresh(self, request_id: bytes) -> None:
        """Read back the request's jobs that other coordinators ended: deliver, bill, count."""
        if request_id not in self.d.requests:
            return
        outcomes = await trio.to_thread.run_sync(self.d.store.job_outcomes, request_id)
        self._apply(request_id, outcomes)

    async def _fail_dead(self, request_id: bytes) -> None:
        """Jobs the shared queue gave up on (their leases kept expiring) that no
        coordinator ended: failed, so the request ends."""

        def dead() -> list[bytes]:
            rows = self._conn.execute(
                "SELECT q.job_id FROM queue_jobs q JOIN jobs j ON j.job_id = q.job_id"
                " WHERE q.request_id = %s AND q.state = 'dead'"
                " AND q.updated_at < extract(epoch FROM clock_timestamp()) - %s"
                " AND j.state IN ('queued', 'cancelling')",
                (request_id, DEAD_GRACE),  # the database's clock, as the queue's
            ).fetchall()
            return [bytes(r[0]) for r in rows]

        gone = [j for j in await self._sql(dead) if j not in self.d.jobs]
        if gone:
            log.warning("jobs_dead_in_queue", request=short(request_id), jobs=len(gone))
            await self.d.store.call(
                self.d.store.save_job_states, [(j, JobState.FAILED, 0) for j in gone]
            )

    def _apply(self, request_id: bytes, outcomes: list[JobOutcome]) -> None:
        d = self.d
        state = d.requests.get(request_id)
        if state is None:
            return
        counted = self.counted.setdefault(request_id, set())
        box = state.mailbox
        changed = False
        for o in outcomes:
            if o.job_id in counted or o.job_id in d.jobs or o.state in STORED_LIVE:
                continue
            counted.add(o.job_id)
            changed = True
            receipt = o.receipt
            if receipt is not None and d.billing is not None:
                d.billing.settle(request_id, o.job_id, receipt.payee, receipt.steps_done, o.steps)
            if o.state is JobState.DONE:
                if o.delivered:
                    box.acked.add(o.job_id)
                elif o.offer_hash is not None:
                    box.add_image(o.job_id, d.results.key(request_id, o.index, o.offer_hash))
                    box.progress.pop(o.job_id, None)
                state.delivered += 1
            elif o.state is JobState.FAILED:
                box.add_failure(
                    JobFailed(
                        job_id=o.job_id,
                        index=o.index,
                        reason="the coordinator gave up on this image",
                    )
                )
                state.failed += 1
            else:
                state.cancelled += 1
            state.remaining -= 1
        if changed:
            box.notify()
            if state.remaining <= 0:
                self.counted.pop(request_id, None)
                d.finish_request(state)

    async def _check_claims(self) -> None:
        """Requests another coordinator adopted: stop delivering and billing them here."""
        d = self.d
        mine = list(d.requests)
        if not mine:
            return

        def owners() -> dict[bytes, str]:
            rows = self._conn.execute(
                "SELECT request_id, owner FROM cluster_requests WHERE request_id = ANY(%s)",
                (mine,),
            ).fetchall()
            return {bytes(r[0]): str(r[1]) for r in rows}

        for request_id, owner in (await self._sql(owners)).items():
            if owner != self.me and request_id in d.requests:
                del d.requests[request_id]
                self.counted.pop(request_id, None)
                if d.billing is not None:
                    d.billing.forget(request_id)
                box = d.mailboxes.pop(request_id, None)
                if box is not None:
                    box.generation += 1  # the attached stream ends: its client moved
                    box.notify()
                log.info("request_claim_lost", request=short(request_id), owner=owner)

    # --- tasks ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Lease, renew, record offers, follow owned requests; until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._lease_forever)
            nursery.start_soon(self._queue_wakeups)
            nursery.start_soon(self._renew_forever)
            nursery.start_soon(self._todo_forever)
            nursery.start_soon(self._offers_forever)
            nursery.start_soon(self._listen_forever)
            nursery.start_soon(self._refresh_forever)
            nursery.start_soon(self._progress_forever)

    def _want(self) -> int:
        """Jobs to lease now: the nodes' credit beyond the jobs waiting here. The queue is
        counted only up to that credit (more waiting changes nothing), so a pass, run on
        every poke, costs the credit, not the queue's length."""
        d = self.d
        credit = sum(link.credit for link in d.free)
        waiting = 0
        if credit > 0:
            for job in d.queue:
                if d._waiting(job):
                    waiting += 1
                    if waiting >= credit:
                        break
        return min(LEASE_BATCH, credit - waiting)

    async def _lease_forever(self) -> None:
        """Lease while the nodes have credit beyond the jobs waiting here. Never waits more
        than a second without looking again (a NOTIFY or a poke only makes it sooner), and
        a database error only delays the next look: nothing here can sleep for good."""
        d = self.d
        while True:
            self._looped_at = time.monotonic()
            try:
                await self._read_cancels()
            except (psycopg.Error, QueueError) as exc:  # the next pass reads again
                log.warning("cancels_not_read", error=type(exc).__name__)
            want = self._want()
            if want > 0:
                models = sorted({m for link in d.free for m in link.models})
                leases: list[Lease] = []
                try:
                    leases = await self.queue.lease(
                        self.me, want, self.lease_ttl, payloads=[m.encode() for m in models]
                    )
                    if leases:
                        await self._take(leases)
                        continue
                except QueueError as exc:
                    log.warning("lease_failed", error=str(exc))
                except _DB_ERRORS as exc:  # its leases lapse: none is lost
                    log.warning("lease_failed", error=type(exc).__name__)
                    await trio.sleep(EMPTY_LEASE_PAUSE * 10)
                await trio.sleep(EMPTY_LEASE_PAUSE)  # nodes' credit changes often; the queue less
            await self._wait_for_work(min(1.0, self.lease_ttl / 2))

    async def _read_cancels(self) -> None:
        """Cancels of other coordinators' requests this one renders, read from the shared
        table (at most every `CANCEL_READ_EVERY`): the NOTIFY is only the fast path, and a
        lessee whose LISTEN connection was down when it was sent still stops its nodes."""
        now = time.monotonic()
        if now - self._cancels_read < CANCEL_READ_EVERY:
            return
        self._cancels_read = now  # the scan of every job too: the loop runs on each poke
        d = self.d
        theirs = {j.request_id for j in d.jobs.values() if j.request_id not in d.requests}
        self._cancels_seen &= theirs
        ask = sorted(theirs - self._cancels_seen)
        if not ask:
            return

        def read() -> list[bytes]:
            rows = self._conn.execute(
                "SELECT request_id FROM cluster_cancels WHERE request_id = ANY(%s)", (ask,)
            ).fetchall()
            return [bytes(r[0]) for r in rows]

        for request_id in await self._sql(read):
            log.info("cancel_read_from_table", request=short(request_id))
            self._cancel_leased(request_id)

    async def _take(self, leases: list[Lease]) -> None:
        d = self.d
        stored = await trio.to_thread.run_sync(d.store.jobs_by_id, [x.job_id for x in leases])
        by_id = {s.job_id: s for s in stored}
        again = [x.job_id for x in leases if x.attempt > 1]
        barred = await self._failed_workers(again) if again else {}
        ended, done = [], []
        for lease in leases:
            s = by_id.get(lease.job_id)
            ours = d.jobs.get(lease.job_id)
            if s is not None and ours is not None:
                if ours.holders or d._waiting(ours):  # ours, leased again after our lease
                    self.leases[lease.job_id] = lease  # lapsed (an outage): still rendered,
                else:  # or waiting for a node, here; else a result for it is being accepted
                    self._later(functools.partial(self._release, lease))  # here: it decides
                continue
            if s is None:  # ended, or receipted and held by a check whose coordinator stopped
                done.append(lease.job_id)
                continue
            if s.state is JobState.CANCELLING:  # its lessee died awaiting a partial receipt
                self._await_partial(s, lease)
                continue
            if s.state is not JobState.QUEUED:
                ended.append(lease.job_id)
                continue
            self.leases[lease.job_id] = lease
            self._taken_at[lease.job_id] = time.monotonic()
            if lease.priority and lease.request_id not in d.requests:  # its tier, here too
                d.queue.tiers[lease.request_id] = lease.priority
            job = Job.restored(s)
            if job.job_id in barred:  # its receipt failed a check, at any coordinator
                d.excluded.setdefault(job.job_id, set()).update(barred[job.job_id])
            d._enqueue(job)
        if done:
            ended += await self._take_checks(done, {x.job_id: x for x in leases})
        if ended:
            await self.queue.bury(ended)

    def _await_partial(self, s: StoredJob, lease: Lease) -> None:
        """A leased job stored cancelling: the client cancelled while a node rendered it,
        and the coordinator that held it (and waited for the node's partial receipt) died.
        It waits here, under this lease, `dispatch.PARTIAL_WAIT` for that receipt (the node
        brings it when it reconnects: its offer is read back from `cluster_offers`), as after
        a single coordinator's restart; then it ends cancelled (`Dispatcher.sweep`). Buried
        at once instead, its owner failed it as dead and the node's steps went unpaid."""
        d = self.d
        job = Job.restored(s, JobState.CANCELLING)
        self.leases[job.job_id] = lease
        d.jobs[job.job_id] = job
        d._await_partial(job)
        log.info("cancelled_job_taken_over", job=job.job_id.hex()[:16])

    async def _take_checks(self, job_ids: list[bytes], leases: dict[bytes, Lease]) -> list[bytes]:
        """Of leased jobs the store has ended, those whose receipt is still held by a check:
        the coordinator running it stopped (its lease lapsed), so the check runs here, as
        after a restart (`Dispatcher.resume_check`), under this lease until it passes (the
        queue row done: `held_passed`) or fails (the job given back). Returns the rest
        (ended: buried)."""
        d = self.d
        try:
            held = await trio.to_thread.run_sync(d.store.pending_checks, job_ids)
        except PromptKeyError as exc:  # shredded before v8 kept held jobs' keys: buried
            log.error("held_checks_unreadable", jobs=len(job_ids), error=str(exc))
            return job_ids
        for c in held:
            job_id = c.job.job_id
            if job_id in d.checks.pending:  # still checked here: our own lease had lapsed
                self.leases[job_id] = leases[job_id]
            elif c.peer_id:
                log.info("check_taken_over", job=job_id.hex()[:16], worker=c.worker)
                self.leases[job_id] = leases[job_id]
                d.resume_check(c)
            else:  # it fails closed, its job queued again: leased anew, as any queued job
                await trio.to_thread.run_sync(d.fail_unnamed_check, c)
                await self._release(leases[job_id])
        taken = {c.job.job_id for c in held}
        return [j for j in job_ids if j not in taken]

    async def _failed_workers(self, job_ids: list[bytes]) -> dict[bytes, set[str]]:
        """Job -> wallets whose receipt for it failed a check (`failed_receipts`, shared):
        a job leased again after a failed check is offered to other wallets first, here as
        at the coordinator that ran the check (`Dispatcher.excluded`). Only jobs leased
        before (attempt > 1) are asked about: a first lease has no failed receipt."""

        def read() -> list[tuple[bytes, str]]:
            rows = self._conn.execute(
                "SELECT job_id, worker FROM failed_receipts WHERE job_id = ANY(%s)", (job_ids,)
            ).fetchall()
            return [(bytes(r[0]), str(r[1]).lower()) for r in rows]

        out: dict[bytes, set[str]] = {}
        try:
            rows = await self._sql(read)
        except psycopg.Error as exc:  # the jobs are leased: offer them all the same
            log.warning("failed_workers_not_read", error=type(exc).__name__)
            return out
        for job_id, worker in rows:
            out.setdefault(job_id, set()).add(worker)
        return out

    async def _wait_for_work(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._poked.wait()
        self._poked = trio.Event()

    async def _queue_wakeups(self) -> None:
        """Turn the queue's NOTIFYs into pokes. One wait at a time, never cancelled
        before shutdown: cancelling a wait on every poke (credit changes often) would leave
        a worker thread behind each time."""
        while True:
            if await self.queue.wait_for_work(1.0):
                self.poke()

    async def _renew_forever(self) -> None:
        """Every third of the lease, each lease is renewed; after a round the database
        failed, every `REFRESH_SECONDS` until one succeeds. A lease that lapsed meanwhile
        (an outage longer than the lease) is kept if nobody swept it (`lapsed=True`): the
        node renders on, rather than being stopped and the job rendered again from the
        start. One another coordinator took (or a receipt ended) is lost: its render stops."""
        failed = False
        while True:
            await trio.sleep(
                min(REFRESH_SECONDS, self.lease_ttl / 3) if failed else self.lease_ttl / 3
            )
            failed = False
            for job_id, lease in list(self.leases.items()):
                try:
                    renewed = await self.queue.renew(lease, self.lease_ttl, lapsed=True)
                except LeaseLost:
                    if self.leases.get(job_id) is lease:  # not replaced by a new lease meanwhile
                        self.lost(job_id)
                    continue
                except (QueueError, psycopg.Error) as exc:  # the others would wait as long
                    error = str(exc) if isinstance(exc, QueueError) else type(exc).__name__
                    log.warning("lease_renew_failed", error=error, leases=len(self.leases))
                    failed = True
                    break
                if self.leases.get(job_id) is lease:
                    self.leases[job_id] = renewed

    def _return_unplaced(self) -> None:
        """Leased jobs still waiting here after `HOLD_UNPLACED` seconds (the credit that
        leased them went elsewhere meanwhile) go back to the shared queue, where a
        coordinator whose nodes have credit takes them; and the dispatcher matches again
        (a wake-up it missed costs at most a second)."""
        d = self.d
        now = time.monotonic()
        # the leased jobs (when each was taken), not the whole queue: only they come back
        for job_id, taken in list(self._taken_at.items()):
            job = d.jobs.get(job_id)
            if (
                job is not None
                and job_id in self.leases
                and now - taken > HOLD_UNPLACED
                and d._waiting(job)
            ):
                log.info("leased_job_returned", job=job_id.hex()[:16])
                self.give_back(job)
        for job_id in [j for j in self._taken_at if j not in self.leases]:
            del self._taken_at[job_id]
        leased = {lease.request_id for lease in self.leases.values()}
        for request_id in [r for r in d.queue.tiers if r not in d.requests and r not in leased]:
            del d.queue.tiers[request_id]  # another's request whose jobs left here
        if d.queue and d.free:
            d._wake()

    def lost(self, job_id: bytes) -> None:
        """The lease lapsed and another coordinator took the job, or it was receipted
        elsewhere: stop rendering it here."""
        self.leases.pop(job_id, None)
        d = self.d
        job = d.jobs.pop(job_id, None)
        if job is None:
            return
        for link in list(job.holders):
            d._send_to_node(link, Cancel(job_id=job_id))
            d._forget_holder(job, link)
        log.info("lease_lost", job=job_id.hex()[:16])

    async def _todo_forever(self) -> None:
        async with trio.open_nursery() as retries:
            async for fn in self._todo:
                try:
                    await fn()
                except QueueError as exc:  # the call's own refusal: trying again changes nothing
                    log.warning("cluster_queue_call_failed", error=str(exc))
                except _DB_ERRORS as exc:  # a lease lapses: no job is lost, but
                    if isinstance(fn, _Must) and fn.tries + 1 < MUST_TRIES:
                        # a cancel or a give-up is not undone by a lapse: once lost, the jobs
                        # were leased, rendered and billed elsewhere (the client told
                        # "cancelled"); queued again later, not waited for here (every
                        # other call would wait behind it)
                        log.warning("cluster_queue_call_retried", error=type(exc).__name__)
                        retries.start_soon(self._again, fn)
                    else:
                        log.warning("cluster_queue_call_failed", error=type(exc).__name__)

    async def _again(self, fn: _Must) -> None:
        await trio.sleep(min(2.0**fn.tries, 30.0))
        fn.tries += 1
        self._later(fn)

    async def _offers_forever(self) -> None:
        while True:
            await self._offers_wake.wait()
            self._offers_wake = trio.Event()
            batch, self._offers = self._offers, []
            if not batch:
                continue

            def write(rows: list[tuple[bytes, bytes, str, str, bytes, bytes, float]]) -> None:
                with self._conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO cluster_offers VALUES (%s, %s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT DO NOTHING",
                        rows,
                    )

            try:
                await self._sql(write, batch)
            except psycopg.Error as exc:
                log.warning(
                    "cluster_offers_not_recorded", offers=len(batch), error=type(exc).__name__
                )

    async def _listen_forever(self) -> None:
        while True:
            stop = threading.Event()
            try:
                got, cancels, progress = await trio.to_thread.run_sync(
                    functools.partial(self._notified, stop),
                    abandon_on_cancel=True,  # type: ignore[call-arg]
                )
            finally:
                stop.set()
            for request_id in cancels:
                self._cancel_leased(request_id)
            self._show_progress(progress)
            try:
                for request_id in got:
                    await self.refresh(request_id)
            except sqlite3.Error as exc:  # the periodic refresh tries again
                log.warning("cluster_refresh_failed", error=type(exc).__name__)

    def _notified(
        self, stop: threading.Event
    ) -> tuple[list[bytes], list[bytes], list[tuple[bytes, bytes, int, int]]]:
        """What was NOTIFYed within a second (worker thread): requests with results, with
        cancels, and relayed progress."""
        out: list[bytes] = []
        cancels: list[bytes] = []
        progress: list[tuple[bytes, bytes, int, int]] = []
        deadline = time.monotonic() + REFRESH_SECONDS
        while not (stop.is_set() or self._closed) and time.monotonic() < deadline:
            try:
                if self._listen.closed or self._listen.broken:  # the periodic refresh covers
                    self._listen = psycopg.connect(  # what was NOTIFYed meanwhile
                        self.url, autocommit=True, connect_timeout=10
                    )
                    self._listen.execute(f"LISTEN {Store.notify_channel}".encode())
                for n in self._listen.notifies(timeout=_WAIT_SLICE, stop_after=1):
                    if n.payload.startswith(PROGRESS_TAG):
                        item = _progress_item(n.payload)
                        if item is not None:
                            progress.append(item)
                        continue
                    cancel = n.payload.startswith(CANCEL_TAG)
                    try:
                        request_id = bytes.fromhex(n.payload.removeprefix(CANCEL_TAG))
                    except ValueError:
                        continue
                    (cancels if cancel else out).append(request_id)
            except psycopg.OperationalError:
                time.sleep(_WAIT_SLICE)
                continue
            if out or cancels or progress:
                break
        return list(dict.fromkeys(out)), list(dict.fromkeys(cancels)), progress

    async def _sync_models(self) -> None:
        """Publish the models this coordinator's nodes serve (when they changed) and read
        those of every live coordinator's nodes (`network_models`)."""
        mine = frozenset(self.d.known_models())
        publish = mine if mine != self._published else None

        def sync() -> list[str]:
            if publish is not None:
                with self._conn.transaction():
                    self._conn.execute(
                        "DELETE FROM cluster_models WHERE coordinator = %s", (self.me,)
                    )
                    with self._conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO cluster_models VALUES (%s, %s)",
                            [(self.me, m) for m in sorted(publish)],
                        )
            rows = self._conn.execute(
                "SELECT DISTINCT m.model_id FROM cluster_models m JOIN cluster_members c"
                f" ON c.coordinator = m.coordinator WHERE c.seen_at > {_NOW} - %s",
                (self.orphan_after,),
            ).fetchall()
            return [str(r[0]) for r in rows]

        models = await self._sql(sync)
        if publish is not None:
            self._published = publish
        self.network_models = frozenset(models) | mine

    async def _adopt_orphans(self) -> None:
        prune = time.monotonic() - self._pruned_at > CANCEL_PRUNE_EVERY
        if prune:
            self._pruned_at = time.monotonic()

        def beat_and_take() -> list[bytes]:
            self._conn.execute(_HEARTBEAT, (self.me,))
            now = time.monotonic()
            if now - self._beat_at > self.orphan_after * BEAT_GAP_SHARE:  # cut off, or started
                self._beats_since = now
            self._beat_at = now
            if prune:  # now(), not clock_timestamp(): stable, so the index serves the range
                self._conn.execute(
                    "DELETE FROM cluster_cancels"
                    " WHERE cancelled_at < extract(epoch FROM now())::float8 - %s",
                    (CANCEL_KEEP,),
                )
            if now - self._beats_since < self.orphan_after:
                # the database was away for this one too: the others beat again first (taken
                # over on their stale heartbeats, every live owner lost its clients' requests)
                return []
            rows = self._conn.execute(
                _ORPHANS, {"me": self.me, "after": self.orphan_after}
            ).fetchall()
            return [bytes(r[0]) for r in rows]

        for request_id in await self._sql(beat_and_take):
            log.info("orphan_request_adopted", request=short(request_id))
            await self.adopt(request_id, claim=False)
        if prune:
            await self._refund_unregistered()
        elif self._unregistered:
            await self._claim_unregistered()

    async def _refund_unregistered(self) -> None:
        """Reservations whose coordinator died before registering their request: their
        stored jobs (if it got that far) end failed and the payer is refunded whole. Before,
        no coordinator ever looked at them: the funds stayed reserved for good."""

        def look() -> list[bytes]:
            rows = self._conn.execute(_UNREGISTERED, {"grace": UNREGISTERED_GRACE}).fetchall()
            return [bytes(r[0]) for r in rows]

        now = time.monotonic()
        for request_id in await self._sql(look):
            self._unregistered.setdefault(request_id, now)
        await self._claim_unregistered()

    async def _claim_unregistered(self) -> None:
        """Claim and refund the candidates seen unregistered `UNREGISTERED_CONFIRM` ago or
        more (`_refund_unregistered` finds them; the refresh loop comes back every second
        while some wait)."""
        now = time.monotonic()
        due = [r for r, seen in self._unregistered.items() if now - seen >= UNREGISTERED_CONFIRM]
        if not due:
            return

        def take() -> list[bytes]:
            rows = self._conn.execute(
                _CLAIM_UNREGISTERED, {"me": self.me, "ids": [h.hex() for h in due]}
            ).fetchall()
            return [bytes(r[0]) for r in rows]

        claimed = await self._sql(take)
        for request_id in due:
            del self._unregistered[request_id]
        d = self.d
        for request_id in claimed:
            outcomes = await trio.to_thread.run_sync(d.store.job_outcomes, request_id)
            live = [(o.job_id, JobState.FAILED, 0) for o in outcomes if o.state in STORED_LIVE]
            if live:
                await d.store.call(d.store.save_job_states, live)
            if d.billing is not None:
                await trio.to_thread.run_sync(
                    functools.partial(d.billing.restore, d.store, only={request_id})
                )
            log.warning("unregistered_request_refunded", request=short(request_id))

    async def _refresh_forever(self) -> None:
        while True:
            await trio.sleep(REFRESH_SECONDS)
            stalled = time.monotonic() - self._looped_at
            if stalled > STALL_WARNING:  # for the operator: it should go round every second
                log.warning(
                    "lease_loop_stalled",
                    seconds=round(stalled),
                    credit=sum(link.credit for link in self.d.free),
                    leases=len(self.leases),
                )
            self._return_unplaced()
            try:
                await self._adopt_orphans()
                await self._sync_models()
                await self._check_claims()
                for request_id in list(self.d.requests):
                    await self._fail_dead(request_id)
                    await self.refresh(request_id)
            except _DB_ERRORS as exc:  # the next round tries again
                log.warning("cluster_refresh_failed", error=type(exc).__name__)
            for request_id in [r for r in self.counted if r not in self.d.requests]:
                del self.counted[request_id]
