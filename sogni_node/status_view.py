"""`sogni-node status`: what a node owner wants to see at a glance, live in the terminal.

The running daemon (its `/healthz` on `http_listen`: coordinators connected, slots, jobs
rendering, warm models), the journal (jobs today and how fast they went against the
benchmark's speed), and rewards from the published epochs (earned; claimable when a chain is
configured). Each part is read on its own, so a stopped daemon or a missing chain leaves a
line that says so instead of failing the view.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sogni_node.benchmark import saved_speed
from sogni_node.config import DATA_DIR_LOCK, NodeConfig
from sogni_node.journal import Journal
from sogni_protocol import folder_lock
from sogni_protocol.settings import READ_ONLY_SENDER

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["NodeStatus", "StatusCache", "collect", "epochs_folder", "render"]

WEI_PER_SOGNI = 10**18
CHAIN_RECHECK_SECONDS = 60.0
"""With a chain, how long a cached audit's claimable amount stands (a claim changes it
without touching the journal)."""

_Rewards = tuple[int | None, int | None, str | None]


@dataclass
class StatusCache:
    """What the live view keeps between readings: the rewards audit (every journalled
    receipt against every published epoch) is redone only when the journal, the epochs or
    the account changed, or, with a chain, `CHAIN_RECHECK_SECONDS` after the last one."""

    key: tuple[object, ...] | None = None
    rewards: _Rewards = (None, None, None)
    at: float = 0.0
    audits: int = 0
    """Audits run (tests, and an operator's curiosity)."""


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def journal_stamp(cfg: NodeConfig) -> tuple[object, ...]:
    """Changes whenever the journal does (a commit grows its WAL; a checkpoint writes it)."""
    return tuple(_stamp(Path(f"{cfg.journal_path}{end}")) for end in ("", "-wal"))


@dataclass
class NodeStatus:
    """One reading of the node's state; every part may be missing, with the reason."""

    wallet: str | None
    daemon: dict[str, Any] | None
    daemon_error: str | None
    jobs_today: int
    work_units_today: int
    speed_today: float | None
    """Reference render seconds per second over today's jobs (as `bench` measures speed)."""
    bench_speed: float
    models_today: dict[str, int] = field(default_factory=dict)
    unacked: int = 0
    earned_wei: int | None = None
    claimable_wei: int | None = None
    rewards_error: str | None = None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("earned_wei", "claimable_wei"):
            out[k] = None if out[k] is None else str(out[k])
        return out


def _daemon(cfg: NodeConfig, timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    listen = cfg.http_listen
    if listen == "off":  # the data folder's lock still tells whether one runs
        running = folder_lock.held(cfg.data_dir, DATA_DIR_LOCK)
        if running:
            return {"status": "running"}, None  # no live figures: they need the listener
        if running is None:
            return None, "cannot tell whether a node runs (http_listen = off, its lock unreadable)"
        return None, f"no node daemon runs on {cfg.data_dir} (start it with `sogni-node start`)"
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "[::]"):
        host = "127.0.0.1"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=timeout) as r:
            return json.loads(r.read()), None
    except urllib.error.HTTPError as exc:  # 503 while draining still carries the facts
        try:
            return json.loads(exc.read()), None
        except ValueError:
            return None, f"the daemon answered HTTP {exc.code}"
    except (OSError, ValueError):
        return None, f"no node daemon answers on {listen} (start it with `sogni-node start`)"


def _has_epochs(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("epoch-*.json"))


def _newest_epoch(folder: Path) -> tuple[int, float]:
    """(highest epoch number, newest file time) of a folder of published epochs."""
    numbers = [
        (int(m[1]), p.stat().st_mtime)
        for p in folder.glob("epoch-*.json")
        if (m := re.fullmatch(r"epoch-(\d+)\.json", p.name))
    ]
    return max(numbers, default=(0, 0.0))


def epochs_folder(cfg: NodeConfig) -> Path | None:
    """The published epochs the view reads: `epochs_dir` when set, else the newest copy
    `sogni-node rewards` fetched and checked (`data_dir/epochs/<source>/`, replaced only
    by a copy that passed `audit_folder`), the configured sources' first; None: none yet."""
    if cfg.epochs_dir is not None:
        return cfg.epochs_dir if _has_epochs(cfg.epochs_dir) else None
    cache = cfg.epochs_cache
    if not cache.is_dir():
        return None
    from sogni_node.epoch_fetch import source_key

    sources = [cache / source_key(s) for s in (cfg.epoch_sources or cfg.coordinators)]
    ours = [f for f in sources if _has_epochs(f)]
    others = [  # staging (".x.partial") and swap leftovers (".old") are not checked copies
        f
        for f in sorted(cache.iterdir())
        if not f.name.startswith(".") and not f.name.endswith(".old") and _has_epochs(f)
    ]
    candidates = ours or others
    return max(candidates, key=_newest_epoch) if candidates else None


def _cached_rewards(
    cfg: NodeConfig,
    wallet: str,
    journal: Journal,
    stamp: tuple[object, ...],
    cache: StatusCache | None,
) -> _Rewards:
    """`_rewards`, from `cache` while nothing it reads changed."""
    if cache is None:
        return _rewards(cfg, wallet, journal)
    folder = epochs_folder(cfg)
    key = (stamp, wallet, folder, _newest_epoch(folder) if folder is not None else None)
    now = time.monotonic()
    fresh = cfg.chain_url is None or now - cache.at < CHAIN_RECHECK_SECONDS
    if cache.key == key and fresh:
        return cache.rewards
    cache.rewards = _rewards(cfg, wallet, journal)
    cache.key, cache.at = key, now
    cache.audits += 1
    return cache.rewards


def _rewards(cfg: NodeConfig, wallet: str, journal: Journal) -> _Rewards:
    folder = epochs_folder(cfg)
    if folder is None:
        return None, None, "no published epochs here yet (`sogni-node rewards` fetches them)"
    from sogni_node.rewards import PublicationError, audit, load_published

    try:
        epochs = load_published(folder)
    except PublicationError as exc:
        return None, None, f"published epochs are inconsistent: {exc}"
    distributor = None
    if cfg.chain_url is not None and cfg.addresses_file is not None:
        try:
            from sogni_chain import Addresses, Deployment, connect

            chain = connect(cfg.chain_url, keys=[])  # reads only: no keys
            distributor = Deployment(
                chain,
                Addresses.load(cfg.addresses_file, chain_id=chain.chain_id),
                sender=READ_ONLY_SENDER,
            ).distributor
        except Exception as exc:  # the chain is optional here: report it, show the rest
            return None, None, f"cannot reach the chain ({type(exc).__name__})"
    account = cfg.payout_address or wallet  # rewards go where the receipts say
    report = audit(account, journal.receipts(), epochs, distributor=distributor, worker=wallet)
    return report.earned, report.claimable, None


def collect(
    cfg: NodeConfig,
    wallet: str | None,
    *,
    timeout: float = 2.0,
    cache: StatusCache | None = None,
) -> NodeStatus:
    """Read everything the view shows (blocking: HTTP, SQLite, files); with `cache` (the
    live view's), the rewards audit only when the journal or the epochs changed."""
    daemon, daemon_error = _daemon(cfg, timeout)
    midnight = dt.datetime.combine(dt.date.today(), dt.time()).timestamp()  # the local day
    jobs, units, seconds = 0, 0, 0.0
    models: dict[str, int] = {}
    earned = claimable = None
    rewards_error: str | None = "no wallet: create one with `sogni-node keys create`"
    unacked = 0
    if cfg.journal_path.exists():
        stamp = journal_stamp(cfg)  # before opening: closing may checkpoint it
        with Journal(cfg.journal_path, check=False) as journal:  # the daemon checks it
            for model, secs, wu in journal.render_times(midnight):
                jobs += 1
                units += wu
                seconds += secs
                models[model] = models.get(model, 0) + 1
            unacked = len(journal.unacked())
            if wallet is not None:
                earned, claimable, rewards_error = _cached_rewards(
                    cfg, wallet, journal, stamp, cache
                )
    elif wallet is not None:
        rewards_error = "no jobs journalled yet"
    return NodeStatus(
        wallet=wallet,
        daemon=daemon,
        daemon_error=daemon_error,
        jobs_today=jobs,
        work_units_today=units,
        speed_today=(units / 1000 / seconds) if seconds > 0 else None,
        bench_speed=saved_speed(cfg.bench_path),
        models_today=models,
        unacked=unacked,
        earned_wei=earned,
        claimable_wei=claimable,
        rewards_error=rewards_error,
    )


def _sogni(wei: int | None) -> str:
    return "-" if wei is None else f"{wei / WEI_PER_SOGNI:,.6f} SOGNI"


def render(s: NodeStatus) -> RenderableType:
    """A rich table of one reading."""
    from rich.table import Table

    t = Table(title=f"sogni-node  {time.strftime('%H:%M:%S')}", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("wallet", s.wallet or "-")
    d = s.daemon
    if d is None:
        t.add_row("daemon", f"[yellow]{s.daemon_error}[/]")
    elif "uptimeSeconds" not in d:  # seen by its data folder's lock only
        t.add_row("daemon", "running (http_listen = off: no live figures)")
    else:
        t.add_row("daemon", f"{d.get('status', '?')}, up {d.get('uptimeSeconds', 0):.0f} s")
        t.add_row(
            "coordinators",
            f"{d.get('coordinators', 0)} connected of {d.get('configuredCoordinators', 0)}",
        )
        t.add_row("slots", f"{d.get('runningJobs', 0)} rendering of {d.get('slots', 0)}")
        warm = d.get("warmModels")
        if isinstance(warm, list):
            t.add_row("warm models", ", ".join(map(str, warm)) or "none")
    per_model = ", ".join(f"{m} {n}" for m, n in sorted(s.models_today.items()))
    t.add_row("jobs today", f"{s.jobs_today}" + (f" ({per_model})" if per_model else ""))
    bench = f"{s.bench_speed:.2f}x" if s.bench_speed else "not measured (`sogni-node bench`)"
    today = f"{s.speed_today:.2f}x" if s.speed_today is not None else "-"
    t.add_row("speed", f"today {today} the reference render, benchmark {bench}")
    if s.unacked:
        t.add_row("unacknowledged", f"{s.unacked} results wait for their coordinator's answer")
    if s.rewards_error is None:
        t.add_row("earned", _sogni(s.earned_wei))
        t.add_row(
            "claimable",
            _sogni(s.claimable_wei) if s.claimable_wei is not None else "- (no chain configured)",
        )
    else:
        t.add_row("rewards", s.rewards_error)
    return t
