"""The gateway's state and its two jobs: authenticate API keys, run SDK projects.

One `Gateway` per coordinator, beside the libp2p client protocol and on the same
`Dispatcher`: a project is submitted with `Dispatcher.submit` like any client's request,
its payer is the API key's account (the authorization signed in-process with the wallet
derived from the key, `api_keys.account_private_key`), and its events are read from the
dispatcher's cursor, translated into SDK frames, with images saved for download and
acknowledged. A project outlives its socket and the coordinator process: it is recorded in
the database (`key_projects`) before it is submitted, with its resume token once accepted and
each image's outcome before the image is acknowledged, so a repeated jobRequest, even after a
restart, re-attaches with `Dispatcher.resume` and never submits (or charges) again.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from sogni_coordinator.api_keys import GATEWAY_PEER, account_address, account_private_key
from sogni_coordinator.billing import Refusal
from sogni_coordinator.db import DATABASE_ERRORS, storage_fault
from sogni_coordinator.delivery import Cursor
from sogni_coordinator.gateway.config import GatewayConfig
from sogni_coordinator.gateway.failures import failure_of, image_error, project_error
from sogni_coordinator.gateway.limits import SharedLimits, limiters
from sogni_coordinator.gateway.models import ModelBook, sid_of
from sogni_coordinator.gateway.projects import (
    Outcome,
    Project,
    ProjectBook,
    ProjectRefused,
    job_id_of,
    parse_job_request,
)
from sogni_coordinator.gateway.results import ImageStore
from sogni_coordinator.job_state import JobState
from sogni_coordinator.key_projects import ProjectRecord, seal_token
from sogni_protocol import eip712
from sogni_protocol.catalog import Catalog
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import (
    JobFailed,
    JobImage,
    JobProgress,
    Message,
    RenderRequest,
    RequestDone,
)
from sogni_protocol.pricing import quote

if TYPE_CHECKING:
    from pathlib import Path

    from sogni_coordinator.dispatch import Dispatcher
    from sogni_coordinator.key_projects import KeyProjects

log = get_logger(__name__)

__all__ = ["AuthedKey", "Gateway", "KeyRecord", "KeyStore", "UrlSigner"]

AUTHORIZATION_SECONDS = 3600
"""Lifetime of the payer authorization the gateway signs for a project."""
SWEEP_SECONDS = 60.0
ERRORS = {"insufficient_funds": (4024, "insufficientFunds")}
INTERRUPTED = (
    "the coordinator stopped while this project was being submitted; it is not resumed "
    "(nor charged again): start a new project"
)
LOST = "the network no longer knows this project: start a new project"
UNAVAILABLE_CODE = 5003
"""`jobError` code of a project the coordinator could not store (disk full, database away):
the gateway's code for HTTP 503, with the libp2p refusal's text (`client_session.UNAVAILABLE`,
"nothing was charged; try again later or another coordinator")."""
SWARM_CACHE = 0.5
"""Seconds one count of the nodes per model (`Gateway.swarm`) serves every socket asking."""
QUEUE_TICK = 0.5
"""Seconds between looks at a queued project's place in the queue (a changed one is sent as
`jobState queued`; the SDKs expect the server's queue updates about this often)."""


class Send(Protocol):
    """Queue one frame (type, payload) for a socket; `then` runs once it is written."""

    def __call__(
        self, name: str, data: dict[str, Any], *, then: Callable[[], None] | None = None
    ) -> Awaitable[None]: ...


class KeyRecord(Protocol):
    """`api_keys.ApiKeyRecord` (read-only)."""

    @property
    def key_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def account(self) -> str: ...
    @property
    def revoked(self) -> bool: ...
    @property
    def daily_limit_micro(self) -> int | None: ...


class KeyStore(Protocol):
    """`sogni_coordinator.api_keys.ApiKeys` (blocking: called off the trio thread)."""

    def lookup(self, key: str) -> KeyRecord | None: ...
    def spent_today(self, account: str) -> int: ...
    def record_spend(self, account: str, micro: int) -> None: ...
    def try_spend(self, account: str, micro: int, limit_micro: int | None) -> bool: ...


class UrlSigner(Protocol):
    """`sogni_coordinator.result_urls.ResultUrls`."""

    def sign(
        self, image_id: str, *, base_url: str, ttl: float = 3600, now: float | None = None
    ) -> str: ...
    def verify(self, image_id: str, exp: str, sig: str, now: float | None = None) -> bool: ...


@dataclass(frozen=True)
class AuthedKey:
    """An API key that passed `authenticate`: its record, and the plaintext for signing."""

    record: KeyRecord
    secret: str

    @property
    def key_id(self) -> str:
        return self.record.key_id


class Gateway:
    def __init__(
        self,
        dispatcher: Dispatcher,
        keys: KeyStore,
        urls: UrlSigner,
        records: KeyProjects,
        *,
        config: GatewayConfig,
        catalog: Catalog,
        configured_models: set[str],
        results_dir: Path,
        network_id: str,
        shared_limits: SharedLimits | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.keys = keys
        self.urls = urls
        self.records = records
        self.config = config
        self.book = ModelBook(catalog, frozenset(configured_models))
        self.configured = set(configured_models)
        self.images = ImageStore(results_dir, config.retention_seconds, dispatcher.results)
        self.projects = ProjectBook(keep=config.retention_seconds)
        self.network_id = network_id
        self.shared_limits = shared_limits
        """Rate limits counted across the network (several coordinators on PostgreSQL)."""
        self.failed_auth, self.job_rate, self.rest_rate = limiters(
            config.jobs_per_minute,
            config.requests_per_minute,
            config.failed_auth_per_minute,
            shared_limits,
        )
        self.sockets: dict[tuple[str, str], Any] = {}
        """(key id, appId) -> the socket session holding it (`socket.Session`)."""
        self._swarm: dict[str, tuple[float, dict[str, int]]] = {}
        """`swarm`'s last count per network, and when (monotonic)."""
        self._positions: dict[bytes, int] = {}
        self._positions_at = -math.inf
        """`queue_position`'s last count of the dispatcher's queue, and when (monotonic)."""

    async def run(self) -> None:
        """Index stored images, then delete expired images and forget ended projects."""
        await trio.to_thread.run_sync(self.images.load)
        try:
            while True:
                try:
                    await self.images.sweep()
                    self.projects.sweep()
                    await self.records.call(self.records.prune, self.config.retention_seconds)
                except (*DATABASE_ERRORS, OSError) as exc:  # swept next time; serving goes on
                    log.error("gateway_sweep_failed", error=str(exc)[:200])
                await trio.sleep(SWEEP_SECONDS)
        finally:
            if self.shared_limits is not None:  # its connection, off the event loop
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.shared_limits.close)

    # --- keys ---------------------------------------------------------------------------
    async def authenticate(self, secret: str | None, address: str) -> AuthedKey | None:
        """The key's record, or None (a failure counted against `address`)."""
        if secret and 8 <= len(secret) <= 256 and secret.isprintable():
            record = await trio.to_thread.run_sync(self.keys.lookup, secret)
            if record is not None and not record.revoked:
                if record.account.lower() == account_address(secret).lower():
                    return AuthedKey(record, secret)
                log.error("gateway_key_account_mismatch", key=record.key_id)
        await self.failed_auth.failed_async(address)
        return None

    def advertised(self) -> set[str]:
        return self.dispatcher.known_models()

    def swarm(self, network: str) -> dict[str, int]:
        """`swarmModels` of a socket on `network`: per servable model, the connected nodes
        that may take that network's jobs (the router's tiers, blocked nodes aside). Counted
        over every network's nodes, a relaxed app saw fast-only nodes as its workers (and
        waited on `noWorkers`). One count per network serves every socket for
        `SWARM_CACHE` s (each socket looks once a second)."""
        now = time.monotonic()
        cached = self._swarm.get(network)
        if cached is not None and now - cached[0] < SWARM_CACHE:
            return dict(cached[1])
        counts = dict.fromkeys(self.book.served(self.advertised()), 0)
        router = self.dispatcher.router
        for link in self.dispatcher.nodes.values():
            if (
                network not in router.classify(link.device, link.wallet)[0]
                or router.reputation.blacklisted(link.wallet)
                or link.wallet.lower() in router.blocked_nodes
            ):
                continue
            for model in link.models & counts.keys():  # never one the gateway would refuse
                counts[model] += 1
        self._swarm[network] = (now, counts)
        return dict(counts)

    def worker_counts(self, network: str) -> dict[str, int]:
        """`GET /api/v1/status/network/{network}/models`: `swarm(network)` keyed by each
        model's `SID` (as `/api/v1/models/list` gives it), which the SDKs'
        `getAvailableModels` maps back to the models."""
        return {str(sid_of(m)): n for m, n in self.swarm(network).items()}

    async def balances(self, account: str) -> dict[str, Any]:
        """`{sogni, spark}` as the SDKs read them (decimal strings of whole tokens)."""
        billing = self.dispatcher.billing
        have: Mapping[Any, int] = dict.fromkeys(("spark_free", "spark_paid", "sogni"), 0)
        held: Mapping[Any, int] = have
        if billing is not None:
            ledger = billing.ledger
            have = await trio.to_thread.run_sync(ledger.balance, account)
            held = await trio.to_thread.run_sync(ledger.reserved_for, account)

        def side(net: int, debit: int, premium: int | None) -> dict[str, str]:
            out = {
                "settled": _tokens(net + debit),
                "credit": "0",
                "debit": _tokens(debit),
                "net": _tokens(net),
                "relaxedUnclaimed": "0",
                "fastUnclaimed": "0",
            }
            if premium is not None:
                out["premiumCredit"] = _tokens(premium)
            return out

        spark = have["spark_free"] + have["spark_paid"]
        spark_held = held["spark_free"] + held["spark_paid"]
        return {
            "sogni": side(have["sogni"], held["sogni"], None),
            "spark": side(spark, spark_held, have["spark_paid"]),
        }

    # --- projects -----------------------------------------------------------------------
    async def open_project(
        self, key: AuthedKey, data: dict[str, Any], network: str, app_id: str = ""
    ) -> tuple[Project, Cursor | None]:
        """The project of this jobRequest, submitted once, and a cursor over what it still
        owes (None when it already ended or was cancelled). Raises `ProjectRefused`."""
        job_id = job_id_of(data)
        project = await self.project(key, job_id)
        if project is not None:  # the SDK re-sent it (reconnect, 1001, restart): resume
            return project, await self.reattach(project)
        if not await self.job_rate.take_async(key.key_id):
            raise ProjectRefused(4029, "rateLimited", "too many projects: wait a minute")
        served = self.book.served(self.advertised())
        req = parse_job_request(data, book=self.book, served=served, network=network)
        project = self.projects.get(key.key_id, job_id)  # a twin raced us through _recall
        if project is not None:
            return project, await self.reattach(project)
        project = Project(
            key.key_id,
            job_id,
            req.number_of_images,
            app_id=app_id,
            model_id=req.model_id,
            steps=req.steps,
            network=req.network,
            token_type=req.token_type,
        )
        self.projects.add(project)
        try:
            submission = await self._submit_recorded(key, project, req)
        except BaseException as exc:
            project.refusal = (
                exc
                if isinstance(exc, ProjectRefused)
                else ProjectRefused(5000, "projectInterrupted", "try again")
            )
            self.projects.drop(project)
            raise
        finally:
            project.ready.set()
        log.info(
            "gateway_project_accepted",
            key=key.key_id,
            project=job_id,
            images=req.number_of_images,
            model=req.model_id,
        )
        return project, submission.events

    async def project(self, key: AuthedKey, job_id: str) -> Project | None:
        """The key's project `job_id`: in memory, or as the database kept it."""
        return self.projects.get(key.key_id, job_id) or await self._recall(key, job_id)

    async def _recall(self, key: AuthedKey, job_id: str) -> Project | None:
        """The project as the database kept it (after a restart, or once swept from memory)."""
        record = await trio.to_thread.run_sync(self.records.get, key.key_id, job_id)
        known = self.projects.get(key.key_id, job_id)
        if record is None or known is not None:
            return known
        project = _from_record(record, key.secret)
        self.projects.add(project)
        log.info("gateway_project_recalled", key=key.key_id, project=job_id)
        return project

    async def untold(self, key: AuthedKey, app_id: str) -> list[Project]:
        """The projects `app_id` started with this key whose end it was not sent: in memory,
        and (after a restart) recalled from the database. A new socket of that app gets them."""
        stored = await trio.to_thread.run_sync(self.records.in_flight, key.key_id, app_id)
        found = {p.job_id: p for p in self.projects.untold(key.key_id, app_id)}
        for job_id in stored:
            if job_id not in found:
                project = await self._recall(key, job_id)
                if project is not None:
                    found[job_id] = project
        return list(found.values())

    async def reattach(self, project: Project) -> Cursor | None:
        """A cursor over what a known project still owes; None when nothing more will come."""
        await project.ready.wait()
        if project.refusal is not None:
            raise project.refusal
        if self.dispatcher.cluster is not None:
            await self._refresh(project)
        if project.done or project.cancelled:
            return None
        try:  # with several coordinators: also a request another one accepted (adopted)
            resumed = await self._resume(project)
        except Refusal:
            if len(project.outcomes) < project.count:
                project.told = True  # nothing to push: a re-send hears this
                raise ProjectRefused(5000, "projectLost", LOST) from None
            project.done = True  # every outcome is known: replay them
            return None
        log.info("gateway_project_resumed", key=project.key_id, project=project.job_id)
        return resumed.events

    async def _refresh(self, project: Project) -> None:
        """What other coordinators' gateways recorded of this project since this one last
        saw it (the app was served elsewhere meanwhile, behind one address or after a
        failover): their images' outcomes, its end, its cancel. Their images were
        acknowledged there, so the resumed request will not send them here again."""
        record = await trio.to_thread.run_sync(self.records.get, project.key_id, project.job_id)
        if record is None:
            return
        project.outcomes.update(record.outcomes)  # the first outcome recorded wins
        project.cancelled = project.cancelled or record.cancelled
        if record.ended_at is not None and not project.done:
            project.done, project.ended_at = True, record.ended_at

    async def _resume(self, project: Project) -> Any:
        """`Dispatcher.resume_anywhere`, one at a time per project."""
        async with project.resuming:
            return await self.dispatcher.resume_anywhere(project.request_id, project.token)

    async def _take_over(self, project: Project) -> None:
        """With several coordinators, adopt a request this one does not run (its coordinator
        died, or the app moved here) so that a cancel here reaches it: without this the
        cancel would only be recorded, and the request rendered and charged in full."""
        d = self.dispatcher
        rid = project.request_id
        if d.cluster is None or rid in d.requests or rid in d.mailboxes:
            return  # one coordinator, or run (or ended) here
        try:
            resumed = await self._resume(project)
        except Refusal:
            return  # the network no longer knows it: nothing left to stop
        d.detach(resumed.events)

    async def _submit_recorded(self, key: AuthedKey, project: Project, req: RenderRequest) -> Any:
        """Record the project, submit it, record its resume token; on a refusal (or a
        cancellation before the dispatcher took it) the record goes and the jobID is free.
        Storage that fails meanwhile (disk full, the database away) is `unavailable`: a
        project-level `jobError` `UNAVAILABLE_CODE` in one line, as the libp2p client is
        refused, not a session torn down 1011 (whose SDK re-sent the project at once)."""
        reached = trio.Event()  # set once `Dispatcher.submit` is called: it counts its own
        try:
            return await self._record_and_submit(key, project, req, reached)
        except (*DATABASE_ERRORS, OSError) as exc:
            fault = storage_fault(exc)
            if fault is None:
                raise
            raise self._unavailable(key, project, fault, counted=reached.is_set()) from None

    def _unavailable(
        self, key: AuthedKey, project: Project, fault: str, *, counted: bool
    ) -> ProjectRefused:
        """The refusal of a project that could not be stored, logged; counted as a render
        request refused `unavailable` unless `Dispatcher.submit` counted it."""
        # here, not at the top: client_session -> dispatch -> gateway.limits -> this package
        from sogni_coordinator.client_session import UNAVAILABLE, RequestMeter

        log.error(
            "gateway_project_unavailable", key=key.key_id, project=project.job_id, error=fault
        )
        if not counted and isinstance(self.dispatcher, RequestMeter):
            self.dispatcher.request_refused("unavailable")
        return ProjectRefused(UNAVAILABLE_CODE, "unavailable", UNAVAILABLE.format(fault=fault))

    async def _record_and_submit(
        self, key: AuthedKey, project: Project, req: RenderRequest, reached: trio.Event
    ) -> Any:
        records = self.records
        if not await records.call(
            records.begin, key.key_id, project.job_id, project.img_ids, project.app_id
        ):
            raise ProjectRefused(4000, "duplicateProject", "this jobID is already in use")

        async def record(request_id: bytes, token: bytes) -> None:
            # before the submit: a crash after the dispatcher accepted (and charged) it, but
            # before this record said so, left a project that could not be resumed while
            # its request rendered and was charged ("projectInterrupted")
            sealed = seal_token(token, key.secret, request_id)
            with trio.CancelScope(shield=True):
                await records.call(records.accepted, key.key_id, project.job_id, request_id, sealed)

        try:
            submission = await self._submit(key, req, record, reached)
        except BaseException:
            with trio.CancelScope(shield=True):  # nothing was submitted (submit is atomic)
                await records.call(records.forget, key.key_id, project.job_id)
            raise
        accepted = submission.accepted
        project.request_id = accepted.request_id
        project.token = accepted.resume_token
        project.cost_micro = accepted.cost_micro
        return submission

    async def _submit(
        self,
        key: AuthedKey,
        req: RenderRequest,
        record: Callable[[bytes, bytes], Awaitable[None]],
        reached: trio.Event,
    ) -> Any:
        """Check the key's daily limit, sign the request with the key's account, `record`
        its request id and resume token, then submit it (`reached` set just before)."""
        account = key.record.account
        limit = key.record.daily_limit_micro
        reserved = quote(req).spark_micro  # the check and the write in one transaction
        if not await trio.to_thread.run_sync(self.keys.try_spend, account, reserved, limit):
            raise ProjectRefused(
                4025, "dailyLimitReached", "this API key's daily spend limit is reached"
            )
        token = os.urandom(32)
        try:
            signed = eip712.sign_request(
                account_private_key(key.secret),
                self.dispatcher.domain,
                msgspec.structs.replace(
                    req,
                    payer=account,
                    network_id=self.network_id,
                    nonce=os.urandom(16),
                    expiry=int(time.time()) + AUTHORIZATION_SECONDS,
                ),
            )
            billing = self.dispatcher.billing
            charged = billing is not None and billing.charges(signed)
            if charged:  # known by the hash it is signed under: recorded before it is charged
                await record(eip712.request_hash(signed), token)
            reached.set()
            submission = await self.dispatcher.submit(
                signed,
                client_peer=GATEWAY_PEER + key.key_id,
                allowed_models=self.configured,
                token=token,
            )
        except BaseException as exc:  # not accepted: the day's spend gets its share back
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self.keys.record_spend, account, -reserved)
                except (*DATABASE_ERRORS, OSError) as again:  # the same full disk, likely:
                    fault = storage_fault(again)  # the day's spend stays counted (a limit
                    if fault is None:  # reached early), and the app hears why it failed
                        raise
                    log.error("spend_not_restored", key=key.key_id, error=fault)
            if not isinstance(exc, Refusal):
                raise
            code, error = ERRORS.get(exc.code, (4000, exc.code))
            message = (
                exc.reason.split("; quote:")[0] if exc.code == "insufficient_funds" else exc.reason
            )
            raise ProjectRefused(code, error, message[:500]) from None
        if not charged:  # a free one's id is drawn at random: known only now
            await record(submission.accepted.request_id, token)
        if req.token_type == "spark":  # the price charged (a stake discount) wins; a SOGNI
            correction = submission.accepted.cost_micro - reserved  # cost is micro-SOGNI: the
            if correction:  # limit counts Spark, so it stays at the Spark list price
                with trio.CancelScope(shield=True):  # accepted: the record must follow it,
                    try:  # and a failure here must not make it look unaccepted (a re-send
                        await trio.to_thread.run_sync(  # would be charged again)
                            self.keys.record_spend, account, correction
                        )
                    except Exception as exc:  # the day's spend stays at the list price
                        log.error("spend_not_corrected", key=key.key_id, error=type(exc).__name__)
        return submission

    async def cancel(self, key: AuthedKey, job_id: str) -> Project | None:
        """Cancel the key's project (recalled from the database after a restart); None when
        there is no such accepted project, or it has ended (nothing left to cancel)."""
        job_id = job_id.upper()
        project = await self.project(key, job_id)
        if project is None or not project.request_id:
            return None
        if project.done and not project.cancelled:  # rendered: nothing left to cancel (its
            return None  # results are still replayed to a re-sent `jobRequest`)
        if not project.done:  # first: if it fails, nothing says cancelled and a retry redoes it
            await self._take_over(project)
        if not project.cancelled:
            project.cancelled = True
            await self.records.call(self.records.cancel, key.key_id, job_id)
        if not project.done:
            self.dispatcher.cancel_request(project.request_id)
            await self.dispatcher.durable()  # `didCancel` only once the jobs' end is stored
        return project

    async def active(self, key: AuthedKey) -> list[str]:
        """jobIDs of the key's projects in flight (`/api/v1/artist/projects/active`): those in
        memory and those the database holds from before a restart."""
        stored = await trio.to_thread.run_sync(self.records.in_flight, key.key_id)
        live = [p.job_id for p in self.projects.in_flight(key.key_id)]
        return list(dict.fromkeys(live + stored))

    async def in_flight_projects(
        self, key: AuthedKey, app_id: str | None, *, limit: int
    ) -> list[Project]:
        """The key's projects in flight (`/api/v1/artist/projects/sync`), only those
        `app_id` started unless it is None: in memory and (after a restart) recalled from
        the database, oldest first, at most `limit`."""
        if app_id is not None and not 0 < len(app_id) <= 128:
            return []  # no socket could have started it (`serve_socket` refuses that appId)
        stored = await trio.to_thread.run_sync(self.records.in_flight, key.key_id, app_id)
        found = {
            p.job_id: p
            for p in self.projects.in_flight(key.key_id)
            if app_id is None or p.app_id == app_id
        }
        for job_id in stored:
            if len(found) >= limit:
                break
            if job_id not in found:
                project = await self._recall(key, job_id)
                if project is not None:
                    found[job_id] = project
        running = self.still_running(list(found.values()))
        running.sort(key=lambda p: p.started_at)
        return running[:limit]

    def queue_position(self, project: Project, *, first: bool = False) -> int:
        """`jobState queued`'s `queuePosition`: how many other projects (requests) of the
        same network and model wait ahead of this one in the dispatcher's queue, in the
        order it serves them (payer tiers first, then arrival). 0 when none of its images
        waits here (being rendered, or, with several coordinators, still in the network's
        shared queue, which has no place to tell). One pass over the queue serves every
        project asking within half a `QUEUE_TICK`; a project's `first` look counts again if
        the last pass did not see it (it may have been submitted since)."""
        now = time.monotonic()
        rid = project.request_id
        missed = first and rid not in self._positions
        if missed or now - self._positions_at > QUEUE_TICK / 2:
            self._positions, self._positions_at = self._count_queue(), now
        return self._positions.get(rid, 0)

    def _count_queue(self) -> dict[bytes, int]:
        """Request id -> requests of its (network, model) with an image waiting before its
        first waiting image. Entries no longer waiting (started, cancelled) are skipped, as
        the dispatcher's matcher skips them."""
        d = self.dispatcher
        ahead: dict[tuple[str, str], int] = {}
        positions: dict[bytes, int] = {}
        for job in d.queue:
            if job.request_id in positions:
                continue
            if job.state is not JobState.QUEUED or d.jobs.get(job.job_id) is not job:
                continue
            lane = (job.network, job.params.model_id)
            positions[job.request_id] = ahead.get(lane, 0)
            ahead[lane] = positions[job.request_id] + 1
        return positions

    def still_running(self, projects: list[Project]) -> list[Project]:
        """Those of `projects` still in flight: not ended, cancelled or refused."""
        return [p for p in projects if not (p.done or p.cancelled) and p.refusal is None]

    def completed(self, projects: list[Project]) -> list[Project]:
        """Those of `projects` that ended with at least one image made (not cancelled):
        what `authenticated.unclaimedCompletedProjects` lists."""
        return [
            p
            for p in projects
            if p.done
            and not p.cancelled
            and p.refusal is None
            and any(o.ok for o in p.outcomes.values())
        ]

    def recovered_completed(self, project: Project, base_url: str) -> dict[str, Any]:
        """An ended project as the SDKs read `unclaimedCompletedProjects` (`RecoveredProject`,
        status `completed`): each image's outcome in `completedWorkerJobs` (`imgID`,
        `jobCompleted` with `performedSteps`, `seedUsed` and a fresh signed `resultUrl`, or
        `jobError` with the failure's code as `reason`). The SDKs replay these through their
        own event handlers: a client still tracking the project completes it, and a
        restarted one rebuilds it and gets its result URLs (`completedProjectsRecovered`).
        Its frames are still pushed after `authenticated` (the SDKs ignore a finished
        project's)."""
        entry = self.recovered(project)
        jobs: list[dict[str, Any]] = []
        for index in sorted(project.outcomes):
            outcome = project.outcomes[index]
            img = project.img_ids[index]
            job: dict[str, Any] = {"id": project.job_id, "imgID": img}
            if outcome.ok:
                url = self.urls.sign(img, base_url=base_url, ttl=self.config.result_ttl_seconds)
                job.update(
                    status="jobCompleted",
                    performedSteps=outcome.steps,
                    seedUsed=outcome.seed,
                    resultUrl=url,
                )
            else:
                job.update(status="jobError", reason=image_error(outcome.error)["error"])
            jobs.append(job)
        entry.update(status="completed", completedWorkerJobs=jobs)
        if project.ended_at is not None:
            entry["updateTime"] = int(project.ended_at * 1000)
        return entry

    def recovered(self, project: Project) -> dict[str, Any]:
        """An in-flight project as the SDKs read `authenticated.activeProjects` (their
        `RecoveredProject`): its id, app, model, image and step counts, times (ms) and
        status (`queued`, or `active` once a node took one of its images). The prompt and
        the request itself (`clientRequestData`) are not kept, so not sent: an SDK that did
        not know the project rebuilds it from these fields, and its events follow on the
        socket. What a project recalled from the database does not record (model, steps,
        network) is asked of the dispatcher, when it runs the request here."""
        model, steps, network, token = (
            project.model_id,
            project.steps,
            project.network,
            project.token_type,
        )
        d = self.dispatcher
        box = d.mailboxes.get(project.request_id) if not model else None
        for job_id in box.job_ids if box is not None else ():
            job = d.jobs.get(job_id)
            if job is not None:  # a live image of its request: they differ only by seed
                model, steps, network = job.params.model_id, job.params.steps, job.network
                break
        active = project.started or bool(project.outcomes)
        entry: dict[str, Any] = {
            "id": project.job_id,
            "appId": project.app_id,
            "jobType": "image",
            "model": {"id": model, "name": self.book.name(model) if model else ""},
            "imageCount": project.count,
            "stepCount": steps,
            "createTime": int(project.started_at * 1000),
            "updateTime": int(time.time() * 1000),
            "status": "active" if active else "queued",
            "workerJobs": [],
            "completedWorkerJobs": [],
        }
        if network:
            entry["network"] = network
        if token:
            entry["tokenType"] = token
        return entry

    async def stream(
        self, project: Project, events: Cursor | None, send: Send, base_url: str
    ) -> None:
        """Send what the project owes this socket: outcomes already known, then the events
        of its cursor; exactly one result or error per image, then `jobCompleted`."""
        sent: set[int] = set()
        job = project.job_id
        try:
            if project.cancelled and events is None:  # a repeat after a cancel: its end only
                # (a fresh project cancelled before its stream began follows its events: the
                # dispatcher's cancellation ends it the way the SDKs expect, "canceled")
                await _send_cancelled(project, send)
                return
            position = 0 if events is None else self.queue_position(project, first=True)
            if events is None or not project.outcomes:
                await send("jobState", {"type": "queued", "jobID": job, "queuePosition": position})
            for index in sorted(project.outcomes):
                sent.add(index)
                await self._send_outcome(project, index, send, base_url)
            if events is None:
                await self._finish(project, send)
                return
            started: set[int] = set()
            while True:
                # While no image of it is seen rendering, its place in the queue is looked
                # at every QUEUE_TICK and sent again when it changed (the SDKs show it).
                queued = not (project.started or project.outcomes or project.cancelled)
                try:
                    msg = await _next_event(events, QUEUE_TICK if queued else None)
                except StopAsyncIteration:
                    break
                if msg is None:
                    now = self.queue_position(project)
                    if now != position and not project.started:
                        position = now
                        await send(
                            "jobState", {"type": "queued", "jobID": job, "queuePosition": now}
                        )
                    continue
                if isinstance(msg, JobProgress | JobImage | JobFailed):
                    project.started = True
                if isinstance(msg, JobProgress):
                    if msg.index in sent or project.cancelled or msg.index >= project.count:
                        continue
                    img = project.img_ids[msg.index]
                    if msg.index not in started:
                        started.add(msg.index)
                        await send(
                            "jobState",
                            {
                                "type": "jobStarted",
                                "jobID": job,
                                "imgID": img,
                                "workerName": "supernet",
                                "jobIndex": msg.index,
                            },
                        )
                    await send(
                        "jobProgress",
                        {"jobID": job, "imgID": img, "step": msg.step, "stepCount": msg.steps},
                    )
                elif isinstance(msg, JobImage):
                    await self._keep_image(project, msg)
                elif (
                    isinstance(msg, JobFailed)
                    and msg.index < project.count
                    and msg.index not in project.outcomes
                ):
                    failed = Outcome(ok=False, error=failure_of(msg.reason))
                    await self._record(project, msg.index, failed)
                # outcomes an earlier attachment recorded meanwhile are sent here too
                for index in sorted(set(project.outcomes) - sent):
                    sent.add(index)
                    await self._send_outcome(project, index, send, base_url)
                if isinstance(msg, RequestDone):
                    for index in range(project.count):  # exactly one outcome per image
                        if index not in project.outcomes:
                            await self._record(project, index, Outcome(ok=False, error="imageLost"))
                    for index in sorted(set(project.outcomes) - sent):
                        sent.add(index)
                        await self._send_outcome(project, index, send, base_url)
                    project.done = True
                    project.ended_at = time.time()
                    await self.records.call(
                        self.records.ended, project.key_id, job, project.ended_at
                    )
                    await self._finish(project, send)
        finally:
            if events is not None:
                self.dispatcher.detach(events)

    async def _keep_image(self, project: Project, msg: JobImage) -> None:
        """Store the image for download, then acknowledge it (the dispatcher deletes its copy)."""
        if msg.index < project.count and msg.index not in project.outcomes:
            img = project.img_ids[msg.index]
            try:
                await self.images.save(img, msg.image)
                outcome = Outcome(ok=True, seed=msg.seed, steps=msg.receipt.steps_done)
            except (OSError, ValueError) as exc:
                log.error(
                    "gateway_image_not_stored", project=project.job_id, error=type(exc).__name__
                )
                outcome = Outcome(ok=False, error="imageNotStored")
            await self._record(project, msg.index, outcome)
        await self.dispatcher.ack_images(project.request_id, [msg.job_id])

    async def _record(self, project: Project, index: int, outcome: Outcome) -> None:
        """Keep an image's outcome, durably before its image is acknowledged: after a
        restart the resumed request no longer sends it."""
        project.outcomes[index] = outcome
        await self.records.call(
            self.records.record_outcome, project.key_id, project.job_id, index, outcome
        )

    async def _send_outcome(self, project: Project, index: int, send: Send, base_url: str) -> None:
        if project.cancelled:
            return
        outcome = project.outcomes[index]
        img = project.img_ids[index]
        if outcome.ok:
            url = self.urls.sign(img, base_url=base_url, ttl=self.config.result_ttl_seconds)
            await send(
                "jobResult",
                {
                    "jobID": project.job_id,
                    "imgID": img,
                    "performedStepCount": outcome.steps,
                    "lastSeed": str(outcome.seed),
                    "resultUrl": url,
                },
            )
        else:
            await send(
                "jobError",
                {
                    "jobID": project.job_id,
                    "imgID": img,
                    **image_error(outcome.error),
                    "isFromWorker": False,
                },
            )

    async def _finish(self, project: Project, send: Send) -> None:
        if project.cancelled:
            return

        # Told only once written: marked when queued, an end lost with its socket (the
        # writer stalls, then drops the queue) was never replayed to the app's next socket,
        # and the SDKs marked the project lost (rendered and charged, never returned).
        def told() -> None:  # the first write only: a replay does not extend its window
            if not project.told:
                project.told, project.told_at = True, time.time()

        if any(o.ok for o in project.outcomes.values()):
            await send("jobState", {"type": "jobCompleted", "jobID": project.job_id}, then=told)
        else:  # the images' own reason: the SDKs take the project's error from this frame
            await send(
                "jobError",
                {
                    "jobID": project.job_id,
                    **project_error(project.outcomes),
                    "isFromWorker": False,
                },
                then=told,
            )

    async def result_url(self, img_id: str, base_url: str) -> str | None:
        """A fresh signed URL for a stored image (`/v1/image/downloadUrl`)."""
        if await self.images.find(img_id) is None:  # in the database: any coordinator's
            return None
        return self.urls.sign(img_id, base_url=base_url, ttl=self.config.result_ttl_seconds)


async def _next_event(events: Cursor, wait: float | None) -> Message | None:
    """The cursor's next message; None when `wait` s pass without one. Raises
    `StopAsyncIteration` at its end. A wait cut short loses nothing: the cursor marks a
    message sent only as it hands it out."""
    if wait is None:
        return await events.__anext__()
    with trio.move_on_after(wait):
        return await events.__anext__()
    return None


async def _send_cancelled(project: Project, send: Send) -> None:
    """What a cancelled project's repeat gets: the confirmation (ends a cancel still waiting
    for it) and a project-level `artistCanceled` error (the SDKs' code 5004)."""
    await send("artistCancelConfirmation", {"jobID": project.job_id, "didCancel": True})
    await send(
        "jobError",
        {
            "jobID": project.job_id,
            "error": "artistCanceled",
            "error_message": "this project was cancelled",
            "isFromWorker": False,
        },
    )


def _from_record(record: ProjectRecord, secret: str) -> Project:
    """A project rebuilt from its database row; its resume token unsealed with the key."""
    project = Project(
        record.key_id,
        record.job_id,
        len(record.img_ids),
        app_id=record.app_id,
        img_ids=list(record.img_ids),
        outcomes=dict(record.outcomes),
        cancelled=record.cancelled,
        done=record.ended_at is not None,
        ended_at=record.ended_at,
        started_at=record.created_at,
    )
    if record.request_id is None or record.token_sealed is None:
        project.refusal = ProjectRefused(5000, "projectInterrupted", INTERRUPTED)
        project.ended_at = time.time()  # swept from memory after the retention
        project.told = True  # nothing to push: a re-send hears the refusal
    else:
        project.request_id = record.request_id
        project.token = seal_token(record.token_sealed, secret, record.request_id)
    project.ready.set()
    return project


def _tokens(micro: int) -> str:
    """Micro units as a decimal string of whole tokens (`"1.5"`, `"0.000125"`)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return sign + text
