"""`GET /status`: one self-contained HTML page of the coordinator's network for its operator.

Connected nodes by tier and model, queue depth, receipts per five minutes over the last hour
(an inline SVG chart), recent epochs and the season's leaderboards. No external assets (the
page must work on an air-gapped operator's machine) and no script: it refreshes itself with
a meta tag. It shows wallet addresses and earnings, never prompts or images; like `/metrics`
it belongs on a loopback listener unless the operator opens it (docs/OPERATIONS.md).

`snapshot` reads the database, so the route runs it in a worker thread; `render` is pure.
"""

from __future__ import annotations

import datetime as dt
import html
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sogni_coordinator.model_stake import by_stake
from sogni_coordinator.seasons import BOARD_RULES, BOARDS, Row, board_rows
from sogni_coordinator.seasons.stakers import StakeChange
from sogni_protocol.catalog import Catalog

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute

    from sogni_coordinator.dispatch import Dispatcher

__all__ = [
    "BUCKET_SECONDS",
    "REFRESH_SECONDS",
    "StatusSnapshot",
    "render",
    "snapshot",
    "status_routes",
]

BUCKET_SECONDS = 300
"""Width of one bar of the throughput chart; twelve bars make the last hour."""
BUCKETS = 12
REFRESH_SECONDS = 10
CACHE_SECONDS = 5.0
"""How long one snapshot serves every `GET /status`: each runs the season boards and the
stake history, and the page is public (it shares the gateway's listener), so a burst of
requests made one snapshot each, all in the thread pool image checks and key lookups use."""
TOP = 10
"""Rows shown per leaderboard."""
WEI_PER_SOGNI = 10**18


class CoordinatorView(Protocol):
    """What the page reads (`http_api.CoordinatorView` has it)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def signer(self) -> str: ...

    @property
    def dispatcher(self) -> Dispatcher: ...


@dataclass(frozen=True)
class StatusSnapshot:
    """What the page shows, read at one moment."""

    generated_at: float
    peer_id: str
    signer: str
    nodes: int
    nodes_by_tier: dict[str, int]
    nodes_by_model: dict[str, int]
    jobs: dict[str, int]
    """Live jobs per state: queued, running, cancelling."""
    throughput: list[int]
    """Receipts stored per `BUCKET_SECONDS`, the last hour, oldest first."""
    epochs: list[tuple[int, str, int, int, int]]
    """The last epochs, newest first: (epoch, state, total wei, paid, refused)."""
    season: int | None
    boards: dict[str, list[Row] | None]
    """Each season board's top `TOP`; None: not readable here (stakers without a chain)."""


def snapshot(
    view: CoordinatorView,
    catalog: Catalog | None,
    now: float | None = None,
    stakes: Callable[[], Sequence[StakeChange]] | None = None,
) -> StatusSnapshot:
    """Read the page's facts (blocking: database reads, and `stakes`, the Staking contract's
    history, when given)."""
    now = time.time() if now is None else now
    d = view.dispatcher
    by_tier: Counter[str] = Counter()
    by_model: Counter[str] = Counter()
    usable = [link for link in list(d.nodes.values()) if d.usable(link)]
    for link in usable:  # blacklisted or blocked nodes render nothing: not counted
        for tier in d.router.classify(link.device, link.wallet)[0]:
            by_tier[tier] += 1
        for model in link.models:
            by_model[model] += 1
    start = now - BUCKET_SECONDS * BUCKETS
    bars = [0] * BUCKETS
    for t in d.store.receipt_times(start):
        bars[min(BUCKETS - 1, max(0, int((t - start) // BUCKET_SECONDS)))] += 1
    epochs = list(reversed(d.store.epoch_summaries()[-5:]))
    season = None
    boards: dict[str, list[Row] | None] = {}
    if catalog is not None and d.billing is not None:
        s = catalog.season_at(dt.datetime.fromtimestamp(now, dt.UTC))
        season = s.number
        for board in BOARDS:
            if board == "stakers" and stakes is None:
                boards[board] = None
                continue
            boards[board] = board_rows(d.billing.ledger, board, s, TOP, stakes=stakes, now=now)
    return StatusSnapshot(
        generated_at=now,
        peer_id=view.peer_id,
        signer=view.signer,
        nodes=len(usable),
        nodes_by_tier=dict(sorted(by_tier.items())),
        nodes_by_model={m: by_model[m] for m in by_stake(d.model_stake, sorted(by_model))},
        jobs=d.job_counts(),
        throughput=bars,
        epochs=epochs,
        season=season,
        boards=boards,
    )


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:16px;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:1em;flex-wrap:wrap}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:8em}
.card b{display:block;font-size:22px}
svg rect{fill:#4a7bd0}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: list[str], rows: list[list[object]], numeric: set[int], id_: str) -> str:
    if not rows:
        return f'<p id="{id_}" class="empty">none</p>'
    head = "".join(
        f'<th class="{"n" if i in numeric else ""}">{_e(h)}</th>' for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"n" if i in numeric else ""}">{_e(c)}</td>' for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f'<table id="{id_}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _chart(bars: list[int]) -> str:
    width, height, gap = 24, 80, 4
    top = max(bars) or 1
    rects = "".join(
        f'<rect x="{i * (width + gap)}" y="{height - round(height * v / top)}" width="{width}" '
        f'height="{round(height * v / top)}" data-count="{v}"><title>{v}</title></rect>'
        for i, v in enumerate(bars)
    )
    total = len(bars) * (width + gap)
    return (
        f'<svg id="throughput" width="{total}" height="{height}" viewBox="0 0 {total} {height}" '
        f'role="img" aria-label="receipts per five minutes, last hour">{rects}</svg>'
        f"<p>{sum(bars)} receipts in the last hour (bars of {BUCKET_SECONDS // 60} minutes, "
        "oldest on the left)</p>"
    )


def render(s: StatusSnapshot) -> str:
    """The page, from a snapshot (no I/O)."""
    cards = "".join(
        f'<div class="card" id="{_e(k)}"><b>{_e(v)}</b>{_e(label)}</div>'
        for k, v, label in (
            ("nodes", s.nodes, "nodes connected"),
            ("queued", s.jobs.get("queued", 0), "jobs queued"),
            ("running", s.jobs.get("running", 0), "jobs rendering"),
        )
    )
    tiers = _table(["tier", "nodes"], [[t, n] for t, n in s.nodes_by_tier.items()], {1}, "tiers")
    models = _table(
        ["model", "nodes"], [[m, n] for m, n in s.nodes_by_model.items()], {1}, "models"
    )
    epochs = _table(
        ["epoch", "state", "SOGNI", "paid receipts", "refused"],
        [[e, st, f"{t / WEI_PER_SOGNI:.6f}", p, r] for e, st, t, p, r in s.epochs],
        {0, 2, 3, 4},
        "epochs",
    )
    boards = ""
    if s.season is not None:
        for board, rows in s.boards.items():
            boards += f"<h2>{_e(BOARD_RULES[board].title)}, season {s.season}</h2>"
            if rows is None:
                boards += (
                    f'<p id="{_e(board)}" class="empty">needs the chain: '
                    f"<code>sogni-coordinator leaderboard {_e(board)}</code></p>"
                )
                continue
            hw = board.startswith("workers")  # the page's Hardware column
            boards += _table(
                ["rank", "wallet", *(["hardware"] if hw else []), "points", "days", "prize SOGNI"],
                [
                    [
                        r.rank,
                        r.address,
                        *([r.hardware or "-"] if hw else []),
                        f"{r.points:.3f}",
                        r.days_active,
                        f"{r.prize:.2f}",
                    ]
                    for r in rows
                ],
                {0, 3, 4, 5} if hw else {0, 2, 3, 4},
                board,
            )
    stamp = dt.datetime.fromtimestamp(s.generated_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>Sogni coordinator status</title><style>{_STYLE}</style></head><body>"
        "<h1>Sogni coordinator</h1>"
        f'<p>signer <code id="signer">{_e(s.signer)}</code> &middot; peer '
        f'<code id="peer">{_e(s.peer_id)}</code> &middot; <span id="generated">{stamp}</span></p>'
        f'<div class="cards">{cards}</div>'
        f"<h2>Nodes by tier</h2>{tiers}<h2>Nodes by model</h2>{models}"
        f"<h2>Throughput</h2>{_chart(s.throughput)}"
        f"<h2>Recent epochs</h2>{epochs}{boards}"
        "</body></html>"
    )


def status_routes(
    view: CoordinatorView, stakes: Callable[[], Sequence[StakeChange]] | None = None
) -> list[BaseRoute]:
    """`GET /status`: the page, read in a worker thread (database reads; `stakes`, a reader
    of the Staking contract's history, fills the Stakers board)."""
    import trio
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from sogni_protocol.catalog import load_catalog

    try:
        catalog: Catalog | None = load_catalog()
    except (OSError, ValueError):  # no seasons configured: the page leaves the boards out
        catalog = None

    lock = trio.Lock()  # one snapshot at a time; who waited for it reads the fresh copy
    cached: list[tuple[float, str]] = []
    limiter = trio.CapacityLimiter(1)  # never the shared thread pool's other work

    async def page(request: Request) -> Response:
        del request
        async with lock:
            if not cached or trio.current_time() - cached[0][0] >= CACHE_SECONDS:
                s = await trio.to_thread.run_sync(
                    snapshot, view, catalog, None, stakes, limiter=limiter
                )
                cached[:] = [(trio.current_time(), render(s))]
            body = cached[0][1]
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    return [Route("/status", page, methods=["GET"])]
