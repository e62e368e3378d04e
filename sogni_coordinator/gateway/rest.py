"""The SDKs' REST calls, the result downloads and the WebSocket route, all at the host root.

Every call but the downloads needs the `api-key` header (401 `{status:"error"}` without a
valid one, and failures counted per address like the socket's). Downloads need none: the
signed URL is the authorization; the image is found by its id in the gateway's index.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import msgspec

from sogni_coordinator.gateway.core import AuthedKey, Gateway
from sogni_coordinator.gateway.projects import (
    Project,
    ProjectRefused,
    estimate_body,
    parse_estimate,
)
from sogni_coordinator.gateway.referral import account_referral, apply_referral
from sogni_coordinator.gateway.report_route import gateway_report
from sogni_coordinator.gateway.socket import base_url_of, client_address, serve_socket
from sogni_coordinator.model_stake import by_stake
from sogni_net.http import SlowBody, read_body
from sogni_protocol.errors import DECODE_ERRORS
from sogni_protocol.pricing import quote
from sogni_protocol.stake_benefits import discounted

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute
    from starlette.websockets import WebSocket

__all__ = ["gateway_routes"]

REFERRAL_BODY_LIMIT = 1024
"""Bytes of a `POST /v1/account/referral` body (`{"code": "..."}`); more is refused unread."""


_ESTIMATE = (
    "{tokenType}/{network}/{model}/{imageCount}/{stepCount}/{previewCount}/{cnEnabled}/"
    "{denoise}/{width}/{height}"
)
"""The path of the SDKs' `estimateCost` after `/api/v2/job/estimate/` (`parse_estimate`)."""
_ESTIMATE_V3 = "{guidance}/{sampler}/{contextImages}"
"""What v3 adds (sent when the app names a sampler or context images)."""


class _ReferralBody(msgspec.Struct):
    code: str


def _error(status: int, code: int, message: str, *, retry_after: int | None = None) -> Response:
    """`{status:"error", message, errorCode}`; a 429 also says how long to wait, as the
    SDKs read it (`retryAfter` in the body, else the `Retry-After` header): their
    `ApiError.retryAfter` was undefined, so an app could not know when to try again."""
    from starlette.responses import JSONResponse

    body: dict[str, Any] = {"status": "error", "message": message, "errorCode": code}
    headers = {"Cache-Control": "no-store"}
    if retry_after is not None:
        body["retryAfter"] = retry_after
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(body, status_code=status, headers=headers)


def rest_retry_after(requests_per_minute: int) -> int:
    """Seconds until a key over `requests_per_minute` has its next REST call (one token of
    its bucket refills in 60 / rate s), at least 1."""
    return max(1, math.ceil(60 / requests_per_minute))


FAILED_AUTH_RETRY_AFTER = 60
"""Seconds an address blocked for failed keys waits: the failure window (one minute)."""
MAX_SYNC_PROJECTS = 1000
"""Projects one `/api/v1/artist/projects/sync` answer lists at most."""


def _ok(data: Any) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"status": "success", "data": data}, headers={"Cache-Control": "no-store"})


def gateway_routes(gateway: Gateway) -> list[BaseRoute]:
    from starlette.responses import FileResponse, JSONResponse
    from starlette.responses import Response as BytesResponse
    from starlette.routing import Route, WebSocketRoute

    async def auth(request: Request) -> AuthedKey | Response:
        address = client_address(request)
        if await gateway.failed_auth.blocked_async(address):
            return _error(
                429,
                4029,
                "too many failed API keys from this address: wait a minute",
                retry_after=FAILED_AUTH_RETRY_AFTER,
            )
        key = await gateway.authenticate(request.headers.get("api-key"), address)
        if key is None:
            return _error(401, 4021, "missing, unknown or revoked API key")
        if not await gateway.rest_rate.take_async(key.key_id):
            return _error(
                429,
                4029,
                "too many requests for this API key: slow down",
                retry_after=rest_retry_after(gateway.config.requests_per_minute),
            )
        return key

    async def me(request: Request) -> Response:
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        record = key.record
        out = {"username": record.name, "currentEmail": "", "walletAddress": record.account}
        out.update(await account_referral(gateway, record.account))
        return _ok(out)

    async def use_referral(request: Request) -> Response:
        """`POST {"code": "..."}`: the key's account was referred by the code's owner."""
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        try:
            raw = await read_body(request, REFERRAL_BODY_LIMIT)
        except SlowBody as exc:
            return _error(408, 4008, str(exc))
        try:  # typed: deep nesting stops at the first wrong type (`json_depth`)
            code = msgspec.json.decode(raw or b"", type=_ReferralBody).code
        except DECODE_ERRORS:
            return _error(400, 4000, 'send a JSON body {"code": "REFERRAL-CODE"}')
        fault = await apply_referral(gateway, key.record.account, code)
        if fault is not None:
            return _error(400, 4000, fault)
        return _ok(await account_referral(gateway, key.record.account))

    async def models_list(request: Request) -> Response:
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        listing = gateway.book.listing(gateway.advertised())
        order = by_stake(gateway.dispatcher.model_stake, [m["id"] for m in listing])
        rank = {m: i for i, m in enumerate(order)}  # staked models first (model_stake.py)
        return JSONResponse(sorted(listing, key=lambda m: rank[m["id"]]))

    async def tiers(request: Request) -> Response:
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        return JSONResponse(gateway.book.tiers(gateway.advertised()))

    async def worker_counts(request: Request) -> Response:
        """The SDKs' `getAvailableModels(network)`: `{SID: workerCount}` (bare), the nodes
        that may take that network's jobs per model (`swarmModels` keyed by SID)."""
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        network = str(request.path_params["network"])
        if network not in ("fast", "relaxed"):
            return _error(400, 4000, "network must be fast or relaxed")
        return JSONResponse(gateway.worker_counts(network), headers={"Cache-Control": "no-store"})

    async def sync(request: Request) -> Response:
        """The SDKs' recovery snapshot (`sync()`, `listProjectsElsewhere()`): the key's
        projects in flight as `authenticated.activeProjects` lists them, only those of
        the `appId` asked for when one is (`Gateway.in_flight_projects`); with an `appId`,
        also that app's projects that ended while it was away (or in the last
        `REPLAY_TOLD` s) with an image made, as `unclaimedCompletedProjects` (read-only:
        the SDKs announce one once per client)."""
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        app_id = request.query_params.get("appId")
        projects = await gateway.in_flight_projects(key, app_id, limit=MAX_SYNC_PROJECTS)
        ended: list[Project] = []
        if app_id is not None and 0 < len(app_id) <= 128:  # those its sockets are owed
            ended = gateway.completed(await gateway.untold(key, app_id))[:MAX_SYNC_PROJECTS]
        base = base_url_of(gateway, request.url)
        body = {
            "activeProjects": [gateway.recovered(p) for p in projects],
            "unclaimedCompletedProjects": [gateway.recovered_completed(p, base) for p in ended],
            "serverTime": int(time.time() * 1000),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def size_presets(request: Request) -> Response:
        """Sogni's size presets scaled to the model's native size (a bare array)."""
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        network = str(request.path_params["network"])
        model = str(request.path_params["model"])
        if network not in ("fast", "relaxed"):
            return _error(400, 4000, "network must be fast or relaxed")
        served = gateway.book.served(gateway.advertised())
        if model not in served:
            return _error(404, 4004, f"unknown model {model[:128]!r}: this network serves {served}")
        return JSONResponse(gateway.book.size_presets(model), headers={"Cache-Control": "no-store"})

    async def estimate(request: Request) -> Response:
        """The SDKs' `estimateCost`: what the project would reserve, for this key's account
        (its stake discount taken off), in the shape they read (`projects.estimate_body`)."""
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        params = {k: str(v) for k, v in request.path_params.items()}
        served = gateway.book.served(gateway.advertised())
        try:
            req = parse_estimate(params, request.query_params, book=gateway.book, served=served)
        except ProjectRefused as exc:
            status = 404 if exc.code == 4004 else 400
            return _error(status, exc.code, exc.message)
        billing = gateway.dispatcher.billing
        catalog = gateway.book.catalog
        free = billing is None or billing.mode == "off"
        if billing is not None:
            catalog = billing.catalog or catalog
        priced = quote(req, catalog)
        if not free and billing is not None and billing.benefits is not None:
            account = key.record.account
            await billing.benefits.warm(account)
            priced = discounted(priced, billing.benefits.discount_bps(account))
        body = estimate_body(req, priced, catalog, name=gateway.book.name(req.model_id), free=free)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def balance(request: Request) -> Response:
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        return _ok(await gateway.balances(key.record.account))

    async def download_url(request: Request) -> Response:
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        img = request.query_params.get("imageId", "").upper()
        job_id = request.query_params.get("jobId", "").upper()
        if 0 < len(job_id) <= 64:  # what the SDKs send: the key's own project, by its id
            project = await gateway.project(key, job_id)
            found = project is not None and img in project.img_ids
        else:  # older callers: the image id alone
            hit = gateway.projects.by_image(img)
            found = hit is not None and hit[0].key_id == key.key_id
        url = await gateway.result_url(img, base_url_of(gateway, request.url)) if found else None
        if url is None:
            return _error(404, 4004, "unknown image")
        return _ok({"downloadUrl": url})

    async def active(request: Request) -> Response:
        """The SDKs' watchdog asks after 2 silent minutes: every project in flight, bare."""
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        jobs = await gateway.active(key)
        return JSONResponse(
            {"projects": [{"id": job} for job in jobs]}, headers={"Cache-Control": "no-store"}
        )

    async def result(request: Request) -> Response:
        image_id = str(request.path_params["image_id"])
        exp = request.query_params.get("exp", "")
        sig = request.query_params.get("sig", "")
        if len(image_id) > 64 or len(exp) > 32 or len(sig) > 256:
            return _error(404, 4004, "unknown image")
        if not gateway.urls.verify(image_id, exp, sig):
            return _error(403, 4003, "this result URL is invalid or has expired")
        stored = await gateway.images.find(image_id, data=True)
        if stored is None:
            return _error(404, 4004, "this image is no longer kept")
        if stored.path is None:  # a row of the network's database (result_store)
            return BytesResponse(
                stored.data, media_type=stored.media_type, headers={"Cache-Control": "private"}
            )
        return FileResponse(
            stored.path, media_type=stored.media_type, headers={"Cache-Control": "private"}
        )

    async def report(request: Request) -> Response:
        """A content report on one of the key's projects (docs/SAFETY.md, "Reports")."""
        key = await auth(request)
        if not isinstance(key, AuthedKey):
            return key
        return await gateway_report(gateway, key, request)

    async def socket(ws: WebSocket) -> None:
        await serve_socket(ws, gateway)

    return [
        Route("/v1/account/me", me, methods=["GET"]),
        Route("/v1/account/referral", use_referral, methods=["POST"]),
        Route("/api/v1/models/list", models_list, methods=["GET"]),
        Route("/api/v2/models/tiers", tiers, methods=["GET"]),
        Route(
            "/api/v1/size-presets/network/{network}/model/{model}", size_presets, methods=["GET"]
        ),
        Route(f"/api/v2/job/estimate/{_ESTIMATE}", estimate, methods=["GET"]),
        Route(f"/api/v3/job/estimate/{_ESTIMATE}/{_ESTIMATE_V3}", estimate, methods=["GET"]),
        Route("/v4/account/balance", balance, methods=["GET"]),
        Route("/v1/image/downloadUrl", download_url, methods=["GET"]),
        Route("/api/v1/artist/projects/active", active, methods=["GET"]),
        Route("/api/v1/artist/projects/sync", sync, methods=["GET"]),
        Route("/api/v1/status/network/{network}/models", worker_counts, methods=["GET"]),
        Route("/results/{image_id}", result, methods=["GET"]),
        Route("/v1/report", report, methods=["POST"]),
        WebSocketRoute("/", socket),
    ]
