"""One SDK WebSocket at `/`: authenticate, announce, read jobRequests and cancels.

The upgrade carries the `api-key` header and the `appId` query parameter. A bad key is
accepted then closed with 4021 (the SDKs sign out; Python's `create` raises); an address
with too many failed keys gets 1013 (try again later) before any lookup. One socket per
(key, appId): a newer one closes the older with 4015. Every frame is decoded strictly
(`frames.py`): a malformed one closes the socket with its code. One writer task owns the
socket's send side; each project streams into it from its own task in the session's nursery,
and a lost socket only detaches the projects (the dispatcher keeps rendering): the app's
next socket resumes them at once (the SDKs wait for events, they do not re-send an accepted
jobRequest), and a re-sent jobRequest resumes them too (after a 1001, or from another
appId). That socket's `authenticated` lists those still in flight (`activeProjects`), so an
app that restarted tracks them again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from sogni_coordinator.gateway.core import AuthedKey, Gateway
from sogni_coordinator.gateway.frames import (
    CLOSE_AUTH,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_REPLACED,
    CLOSE_RESTARTING,
    CLOSE_TRY_LATER,
    CancelFrame,
    ChangeNetwork,
    ClientFrame,
    FrameError,
    JobRequestFrame,
    LlmJobRequest,
    SetSubscriptions,
    encode_frame,
    read_frame,
    subscriptions_from_query,
)
from sogni_coordinator.gateway.projects import Project, ProjectRefused, job_id_of
from sogni_protocol.logs import get_logger

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from sogni_coordinator.delivery import Cursor

log = get_logger(__name__)

__all__ = ["Session", "serve_socket"]

OUTBOX = 256
"""Frames queued for a slow socket before its projects wait."""
SWARM_POLL = 1.0
"""How often the worker counts are compared and re-sent when they changed."""
MAX_IGNORED = 256
"""Well-formed frames of unserved types one socket may send before it is closed (1008)."""
SEND_TIMEOUT = 30.0
"""Longest wait for this socket's turn to write (hypercorn's per-connection send lock). The
write itself runs in hypercorn's shielded scope, out of this deadline's reach: a socket whose
app stops reading is dropped by the listener's own send deadline (`sogni_net.http`
`SEND_TIMEOUT`, no progress for that long), and the session ends on the
`websocket.disconnect` that follows (later sends to the dropped socket are discarded)."""


def _kind(exc: BaseException) -> str:
    """The failure's type for a log line (a group: its first leaf's), never its message."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return type(exc).__name__


def _restarting(job_id: str) -> dict[str, Any]:
    """`jobError` 1001 without `imgID`: the SDKs re-send the jobRequest after reconnecting."""
    return {
        "jobID": job_id,
        "error": 1001,
        "error_message": "the server could not take this project now: it is re-sent",
        "isFromWorker": False,
    }


def _stopping(exc: BaseException) -> bool:
    """`exc` is a cancellation from outside the session (its own ends are caught by its
    scope): the coordinator is shutting down."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


def network_of(force_worker_id: str | None, config: Any) -> str:
    """The SDK's `forceWorkerId` query parameter: `fast` (or any worker id) the fast network,
    empty the relaxed one, absent the gateway's `default_network` (an operator's relaxed
    default made apps asking for fast get relaxed)."""
    if force_worker_id is None:
        return str(config.default_network)
    return "relaxed" if force_worker_id == "" else "fast"


def client_address(ws: Any) -> str:
    client = ws.client
    return client.host if client is not None else "?"


def base_url_of(gateway: Gateway, scope_url: Any) -> str:
    if gateway.config.public_url:
        return gateway.config.public_url.rstrip("/")
    scheme = "https" if scope_url.scheme in ("https", "wss") else "http"
    return f"{scheme}://{scope_url.netloc}"


class Session:
    def __init__(self, gateway: Gateway, ws: WebSocket, key: AuthedKey, app_id: str) -> None:
        self.gateway = gateway
        self.ws = ws
        self.key = key
        self.app_id = app_id
        self.send_in, self.send_out = trio.open_memory_channel[
            tuple[str, Callable[[], None] | None]
        ](OUTBOX)
        self.close_code = 1000
        self.scope = trio.CancelScope()
        self.network = network_of(ws.query_params.get("forceWorkerId"), gateway.config)
        self.subscriptions = subscriptions_from_query(
            ws.query_params.get("socketEventSubscriptions")
        )
        self.base_url = base_url_of(gateway, ws.url)
        self.swarm_sent: tuple[str, dict[str, int]] = (self.network, {})
        """The network and counts of the last `swarmModels` sent."""
        self.ignored = 0
        """Frames of types this gateway does not serve, read on this socket."""
        self.live: set[str] = set()
        self.listed: set[str] = set()
        """jobIDs `authenticated.activeProjects` named (in flight as the socket opened)."""
        self.interrupted: list[str] = []
        """jobIDs whose jobRequest failed on this side: told `jobError` 1001 ("server
        restarting") as the socket closes, so the SDK re-sends them after reconnecting."""

    def close(self, code: int) -> None:
        """End this session (from another task): the socket closes with `code`."""
        self.close_code = code
        self.scope.cancel()

    async def send(
        self, name: str, data: dict[str, Any], *, then: Callable[[], None] | None = None
    ) -> None:
        """Queue a frame for the writer; `then` runs once it has been written."""
        await self.send_in.send((encode_frame(name, data), then))

    async def run(self) -> None:
        slot = (self.key.key_id, self.app_id)
        older = self.gateway.sockets.get(slot)
        if older is not None:
            older.close(CLOSE_REPLACED)
        self.gateway.sockets[slot] = self
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write)
                    owed = await self._owed()
                    await self._hello(owed)
                    self._resume_in_flight(nursery, owed)
                    nursery.start_soon(self._swarm)
                    await self._read(nursery)
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # a database outage, a bug: this socket ends, not the daemon
            self.close_code = CLOSE_INTERNAL  # the SDKs reconnect (after 1000 they would not)
            log.error("gateway_session_failed", key=self.key.key_id, error=_kind(exc))
        except BaseException as exc:
            if _stopping(exc):  # the coordinator stops: after 1000 the SDKs would wait forever
                self.close_code = CLOSE_RESTARTING
            raise
        finally:
            if self.gateway.sockets.get(slot) is self:
                del self.gateway.sockets[slot]
            # Last words (1001s, the close code) within 1 s: a write stuck on a client that
            # stopped reading is beyond this deadline, but ends at the listener's send
            # deadline, or at its SHUTDOWN_GRACE when the coordinator stops.
            with trio.move_on_after(1) as shield:
                shield.shield = True
                try:
                    for job_id in self.interrupted:  # the writer is gone: sent here
                        await self.ws.send_text(encode_frame("jobError", _restarting(job_id)))
                    await self.ws.close(code=self.close_code)
                except Exception:  # already closed by the peer: nothing to tell it
                    pass

    async def _hello(self, owed: list[Project]) -> None:
        """`authenticated` (its `activeProjects`: this app's projects in flight, which
        stream here next; its `unclaimedCompletedProjects`: those that ended while the app
        was away, with their result URLs, whose frames follow too), the worker counts and
        the balance."""
        record = self.key.record
        active = self.gateway.still_running(owed)
        ended = self.gateway.completed(owed)
        self.listed = {p.job_id for p in active}
        await self.send(
            "authenticated",
            {
                "clientType": "artist",
                "username": record.name,
                "address": record.account,
                "activeProjects": [self.gateway.recovered(p) for p in active],
                "unclaimedCompletedProjects": [
                    self.gateway.recovered_completed(p, self.base_url) for p in ended
                ],
                "subscriptionEntitlement": {"active": False, "subscription": None},
            },
        )
        await self._send_swarm()
        await self.send("balanceUpdate", await self.gateway.balances(record.account))

    async def _write(self) -> None:
        """The only sender; a send that fails or times out ends the session (a stalled one
        is ended by the listener, which drops the connection: see SEND_TIMEOUT)."""
        try:
            async for text, then in self.send_out:
                with trio.fail_after(SEND_TIMEOUT):
                    await self.ws.send_text(text)
                if then is not None:
                    then()
        except Exception as exc:  # closed by the peer, or too slow: nothing more to send
            log.info("gateway_socket_send_failed", key=self.key.key_id, error=type(exc).__name__)
            self.scope.cancel()

    async def _send_swarm(self) -> None:
        """`swarmModels` of this socket's network (the nodes that may take its jobs)."""
        self.swarm_sent = (self.network, self.gateway.swarm(self.network))
        await self.send("swarmModels", self.swarm_sent[1])

    async def _swarm(self) -> None:
        """Re-send `swarmModels` when the counts changed (nodes came or went)."""
        while True:
            await trio.sleep(SWARM_POLL)
            if self.gateway.swarm(self.network) != self.swarm_sent[1]:
                await self._send_swarm()

    async def _read(self, nursery: trio.Nursery) -> None:
        limit = self.gateway.config.frame_limit_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes")
            try:
                frame = read_frame(raw, limit)
                if isinstance(frame, SetSubscriptions):
                    self.subscriptions = frame.apply(self.subscriptions)
            except FrameError as exc:
                log.info("gateway_bad_frame", key=self.key.key_id, code=exc.code, error=exc.reason)
                self.close_code = exc.code
                return
            await self._on(nursery, frame)

    async def _on(self, nursery: trio.Nursery, frame: ClientFrame) -> None:
        """One well-formed frame from the app (the SDKs wait for the replies sent here)."""
        if isinstance(frame, JobRequestFrame):
            await self._job_request(nursery, frame.data)
        elif isinstance(frame, CancelFrame):
            await self._cancel(frame.data)
        elif isinstance(frame, ChangeNetwork):  # the SDK's switchNetwork: later projects
            self.network = frame.network
            await self.send("changeNetwork", {"network": frame.network})
            # the SDKs empty their model list on `changeNetwork` and fill it again from
            # the next `swarmModels`: without one, `waitForModels` timed out after a switch
            await self._send_swarm()
        elif isinstance(frame, SetSubscriptions):
            await self.send(
                "socketEventSubscriptionsUpdated", {"socketEventSubscriptions": self.subscriptions}
            )
        elif isinstance(frame, LlmJobRequest):
            await self.send(
                "llmJobError",
                {
                    "jobID": frame.job_id,
                    "error": "llmNotSupported",
                    "error_message": "this network renders images only",
                    "isFromWorker": False,
                },
            )
        else:  # a well-formed frame of a type this gateway does not serve
            self.ignored += 1
            if self.ignored > MAX_IGNORED:  # a flood, not an SDK: its socket ends
                log.info("gateway_frames_flooded", key=self.key.key_id)
                self.close(CLOSE_POLICY)
            elif self.ignored == 1:  # one line per socket, not one per frame
                log.info("gateway_frame_ignored", key=self.key.key_id, type=frame.name)

    async def _job_request(self, nursery: trio.Nursery, data: dict[str, Any]) -> None:
        raw_id = data.get("jobID")
        shown = raw_id.upper() if isinstance(raw_id, str) and len(raw_id) <= 64 else ""
        try:
            job_id = job_id_of(data)
            if job_id in self.live:  # already streaming (or replaying) on this socket: a
                return  # re-send adds nothing, and never a second task per re-send
            if len(self.live) >= self.gateway.config.max_projects_per_socket:
                raise ProjectRefused(4029, "tooManyProjects", "too many projects in flight")
            self.live.add(job_id)
            try:
                project, events = await self.gateway.open_project(
                    self.key, data, self.network, self.app_id
                )
            except BaseException:
                self.live.discard(job_id)
                raise
        except ProjectRefused as exc:
            log.info("gateway_project_refused", key=self.key.key_id, error=exc.error)
            await self.send(
                "jobError",
                {
                    "jobID": shown,
                    "error": exc.code,
                    "error_message": exc.message,
                    "isFromWorker": False,
                },
            )
            return
        except BaseException:  # the database away, a bug, the coordinator stopping: the
            if shown:  # session ends (1011/1012) and the SDK re-sends this request once it
                self.interrupted.append(shown)  # has reconnected (an accepted one resumes)
            raise

        nursery.start_soon(self._stream, project, events)

    async def _stream(self, project: Project, events: Cursor | None) -> None:
        try:
            await self.gateway.stream(project, events, self.send, self.base_url)
        finally:
            self.live.discard(project.job_id)
        await self.send("balanceUpdate", await self.gateway.balances(self.key.record.account))

    async def _owed(self) -> list[Project]:
        """This app's projects that stream to this socket (`_resume_in_flight`): still
        running first (a replay of an end may wait), at most `max_projects_per_socket`."""
        owed = await self.gateway.untold(self.key, self.app_id)
        owed.sort(key=lambda p: p.told)
        return owed[: self.gateway.config.max_projects_per_socket]

    def _resume_in_flight(self, nursery: trio.Nursery, owed: list[Project]) -> None:
        """This app's projects still in flight (its older socket dropped, or the coordinator
        restarted) stream here at once: the SDKs wait for their events without re-sending
        an accepted jobRequest. A re-sent one finds them already streaming."""
        for project in owed:
            if project.job_id not in self.live:
                self.live.add(project.job_id)
                nursery.start_soon(self._reattached, project)

    async def _reattached(self, project: Project) -> None:
        try:
            events = await self.gateway.reattach(project)
        except ProjectRefused as exc:  # lost or interrupted
            log.info("gateway_project_not_resumed", key=self.key.key_id, error=exc.error)
            self.live.discard(project.job_id)
            if project.job_id in self.listed:  # `authenticated` said it runs: it does not
                await self.send(
                    "jobError",
                    {
                        "jobID": project.job_id,
                        "error": exc.code,
                        "error_message": exc.message,
                        "isFromWorker": False,
                    },
                )
            return
        await self._stream(project, events)

    async def _cancel(self, data: dict[str, Any]) -> None:
        job_id = data.get("jobID")
        if not isinstance(job_id, str) or len(job_id) > 64:
            self.close_code = CLOSE_POLICY
            self.scope.cancel()
            return
        project = await self.gateway.cancel(self.key, job_id)
        if project is not None:
            log.info("gateway_project_cancelled", key=self.key.key_id, project=project.job_id)
        confirmation: dict[str, Any] = {"jobID": job_id.upper(), "didCancel": project is not None}
        if project is None:  # the Python SDK shows this text (else a generic one)
            confirmation["error_message"] = "no project of this key with this jobID is in flight"
        await self.send("artistCancelConfirmation", confirmation)


async def serve_socket(ws: WebSocket, gateway: Gateway) -> None:
    """The WebSocket endpoint at `/`."""
    address = client_address(ws)
    if await gateway.failed_auth.blocked_async(address):
        await ws.accept()
        await ws.close(code=CLOSE_TRY_LATER)
        return
    key = await gateway.authenticate(ws.headers.get("api-key"), address)
    app_id = ws.query_params.get("appId", "")
    if key is None:
        log.info("gateway_auth_refused", address=address)
        await ws.accept()
        await ws.close(code=CLOSE_AUTH)
        return
    if not 0 < len(app_id) <= 128 or not app_id.isprintable():
        await ws.accept()
        await ws.close(code=CLOSE_POLICY, reason="appId is required")
        return
    await ws.accept()
    held = sum(1 for owner, app in gateway.sockets if owner == key.key_id and app != app_id)
    if held >= gateway.config.max_sockets_per_key:  # a re-connecting appId replaces its own
        log.info("gateway_socket_refused", key=key.key_id, sockets=held)
        await ws.close(code=CLOSE_TRY_LATER, reason="too many sockets for this API key")
        return
    log.info("gateway_socket_open", key=key.key_id)
    try:
        await Session(gateway, ws, key, app_id).run()
    finally:
        log.info("gateway_socket_closed", key=key.key_id)
