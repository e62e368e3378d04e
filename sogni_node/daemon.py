"""`sogni-node start`: the node daemon, and its graceful shutdown.

On SIGINT/SIGTERM the node stops taking offers (it advertises zero free slots), gives the
running jobs `shutdown_grace` seconds to finish, cancels the rest at their next step and
hands them back to their coordinator, then says goodbye; the log names which jobs finished
and which were handed back.

One job cannot stop the daemon: each job's failures stay in its own task (`sogni_node.pull`),
and a session that fails in an unexpected way is logged and reconnected like a broken stream.
Results wait in `<data_dir>/results` until their coordinator acks them; on start the daemon
prunes those older than `RESULT_KEEP_SECONDS`, which no re-offer will ask for any more.

Models and LoRAs installed while the node runs (`sogni-node models add`, `loras add`, from
another process) are served without a restart: `sogni_node.live_install` notices the index
change, and every session sends its coordinator a re-signed `CapabilitiesUpdate`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import msgspec
import trio

from sogni_net import (
    Host,
    TransportError,
    open_host,
    parse_listen,
    require_http_extra,
    serve_http,
)
from sogni_node import partner
from sogni_node.benchmark import saved_speed
from sogni_node.config import DATA_DIR_LOCK, NodeConfig
from sogni_node.hardware import HardwareError, HardwareInfo, probe
from sogni_node.http_api import JOURNAL_PROBE_SECONDS, NodeView, build_app
from sogni_node.journal import SYNC_INTERVAL, Journal
from sogni_node.live_install import InstalledModels, watch_installed
from sogni_node.models.loras import LoraLibrary
from sogni_node.models.registry import ModelRegistry
from sogni_node.payout import payout_of, signed_form
from sogni_node.pull import NodeIdentity, PullSession, pull_forever
from sogni_node.render.backend import Backend
from sogni_node.trajectory_files import TrajectoryFiles
from sogni_node.trust import NetworkSigners
from sogni_node.worker import Worker
from sogni_protocol import eip712, folder_lock
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.folder_lock import FolderBusy
from sogni_protocol.ids import CAPABILITIES_TOPIC
from sogni_protocol.image_encoding import encoder_build, encodes_like_network
from sogni_protocol.logs import adopt_library_loggers, get_logger, quiet_progress_bars
from sogni_protocol.messages import (
    OPEN_PIXELS_FEATURE,
    RERENDER_FEATURE,
    RERENDER_SEED_FEATURE,
    RERENDER_WEIGHTS_FEATURE,
    SIGNER_SET_FEATURE,
    Capabilities,
    NodeHello,
    RenderMeta,
    Result,
    decode,
    encode,
)
from sogni_wallet.keystore import Wallet, unlock_wallet

if TYPE_CHECKING:
    from trio_typing import TaskStatus  # trio-typing's stubs shadow trio's own types


log = get_logger(__name__)

ADVERT_TTL = 3600
"""How long a capability binding stays valid; sessions re-sign on every (re)connect."""

RESULT_KEEP_SECONDS = 7 * 86400
"""How long an unacked result is kept for a re-offer. A coordinator re-offers a job within
minutes (restart, reconnect) or gives it to another node; a week covers a long outage."""


@dataclass
class ShutdownReport:
    finished: list[str] = field(default_factory=list)
    handed_back: list[str] = field(default_factory=list)


def capabilities(
    peer_id: str,
    wallet: str,
    worker: Worker,
    hw: HardwareInfo,
    backend: Backend,
    models: list[str],
    speed: float = 0.0,
    machine_id: str = "",
    payout: str | None = None,
    version: str = "",
) -> Capabilities:
    """This node's advert; `payout` (its payout account, None: its wallet) tells the
    coordinator where work it verifies is paid and whom it may not verify for; `version`
    names `SIGNER_SET_FEATURE` when the node reads a signer set in the `Welcome`, and
    `OPEN_PIXELS_FEATURE` (it opens a lossy image's pixels when challenged) and
    `RERENDER_FEATURE` (it renders a job again for a check; `RERENDER_SEED_FEATURE`: with the
    worker's leaf 0 measured against the seed's noise), `RERENDER_WEIGHTS_FEATURE` (with a
    quantized worker's weights: `_rounds_weights`)."""
    return Capabilities(
        peer_id=peer_id,
        version=version,
        wallet=wallet,
        expiry=int(time.time()) + ADVERT_TTL,
        models=models,
        slots=worker.slots,
        backend=backend.name,
        device=hw.device,
        max_pixels=hw.max_pixels,
        warm_models=worker.warm_models(),
        speed=speed,
        loras=worker.lora_ids(),
        machine_id=machine_id,
        payout=payout,
        mode=getattr(backend, "dtype_name", ""),  # same-path re-checks (docs/VERIFICATION.md)
    )


def _rounds_weights(backend: Backend) -> bool:
    """This node can re-render with a quantized worker's weights: a diffusers backend with
    plain weights and both quantization libraries installed (the backend's module is looked
    up, not imported: another backend never loads torch for this)."""
    module = sys.modules.get("sogni_node.render.diffusers_backend")
    if module is None or not isinstance(backend, module.DiffusersBackend):
        return False
    from sogni_node.render.quantize import can_round_weights

    return backend.quantize == "none" and can_round_weights()


def _warn_if_encoder_differs() -> None:
    """One line at start when this machine's JPEG/WebP encoder gives other bytes than the
    network's (`encodes_like_network`): its checked lossy jobs may fail the codec rule
    (docs/IMAGE_CHECK.md), so the operator hears it before a refusal does."""
    differs = [fmt for fmt, alike in encodes_like_network().items() if not alike]
    if differs:
        log.warning(
            "image_encoder_differs",
            formats=differs,
            encoder=encoder_build(),
            hint="checked jobs in these formats may be refused; install Pillow's PyPI wheel "
            "(pip install --force-reinstall pillow)",
        )


async def run_node(
    config: NodeConfig,
    wallet: Wallet,
    backend: Backend,
    models: list[str],
    *,
    stop: trio.Event,
    on_event: Callable[[dict[str, object]], None] | None = None,
    task_status: TaskStatus[Host] = trio.TASK_STATUS_IGNORED,
) -> ShutdownReport:
    """Pull and render until `stop` is set, then drain; returns what finished and what didn't.

    `on_event` gets the launcher announcements: `ready` (peerId, addrs, http) once the host
    and the HTTP listener are up, `connected` (coordinator) after each welcome.
    """
    started = time.monotonic()
    hw = probe(config.device)
    if config.max_pixels:  # the operator's limit wins over the probe's suggestion
        hw = msgspec.structs.replace(hw, max_pixels=config.max_pixels)
    new_worker: Callable[..., Worker] = Worker
    if parse_listen(config.http_listen) is not None:  # metrics for /metrics
        require_http_extra()  # say what to install, not ModuleNotFoundError
        from sogni_node.metrics import metered

        new_worker = metered(models)
    worker = new_worker(backend, config.slots, LoraLibrary(config.models_dir))
    models = list(models)  # ours to change: `models add` while we run extends it
    registry = getattr(backend, "registry", None)
    installed = InstalledModels(
        config.models_dir,
        registry if isinstance(registry, ModelRegistry) else None,
        models,
        unload=getattr(backend, "unload", None),
    )
    journal = Journal(config.journal_path, config.data_dir / "results")
    trajectories = TrajectoryFiles(
        config.data_dir / "trajectories", config.trajectory_retention_seconds
    )
    identity = NodeIdentity(
        wallet_address=wallet.address,
        wallet_key=wallet.private_key,
        domain=Domain(config.chain_id, config.verifying_contract),
        trusted=frozenset(a.lower() for a in config.trusted_coordinators),
        payout=payout_of(config.payout_address, wallet.address),
        network=NetworkSigners(
            config.network_signers_path,
            Domain(config.chain_id, config.verifying_contract),
            config.network_operators,
            config.network_id,
            config.network_signers_file,
        )
        if config.network_operators
        else None,
    )
    sessions: set[PullSession] = set()
    report = ShutdownReport()
    try:
        try:
            pruned = await trio.to_thread.run_sync(journal.prune_results, RESULT_KEEP_SECONDS)
        except OSError as exc:  # a tidy-up: never a reason not to start
            log.warning("results_not_pruned", error=type(exc).__name__)
        else:
            if pruned:
                log.info("results_pruned", files=pruned)
        _warn_if_encoder_differs()
        salad = await trio.to_thread.run_sync(partner.salad_identity)  # None: not on Salad
        machine_id = salad.machine_id if salad else ""
        async with open_host(
            key_path=config.node_key_path,
            listen=[config.listen],
            pubsub_topics=[CAPABILITIES_TOPIC],
        ) as host:
            host.set_topic_validator(CAPABILITIES_TOPIC, plain_advert)
            speed = saved_speed(config.bench_path)

            def new_caps() -> Capabilities:
                return capabilities(
                    host.peer_id,
                    wallet.address,
                    worker,
                    hw,
                    backend,
                    list(models),  # a copy: `installed` changes the list while we run
                    speed,
                    machine_id,
                    identity.payout,
                    # the words of what this node reads or does beyond the base protocol
                    " ".join(
                        [SIGNER_SET_FEATURE] * (identity.network is not None)
                        + [OPEN_PIXELS_FEATURE, RERENDER_FEATURE, RERENDER_SEED_FEATURE]
                        + [RERENDER_WEIGHTS_FEATURE] * _rounds_weights(backend)
                    ),
                )

            def announce() -> None:
                """A model or LoRA was added or removed: tell every coordinator."""
                worker.models_changed(list(models))  # metric labels for the new ones
                caps = new_caps()
                log.info("capabilities_changed", models=caps.models, loras=len(caps.loras))
                for session in list(sessions):
                    session.update_capabilities(caps)

            def connected(addr: str, event: dict[str, object]) -> None:
                peer = addr.rpartition("/p2p/")[2]
                log.info("coordinator_connected", coordinator=event["coordinator"], peer=peer)
                if on_event is not None:
                    on_event(event)

            def new_session(addr: str) -> PullSession:
                caps = new_caps()
                return PullSession(
                    host,
                    addr,
                    identity,
                    worker,
                    journal,
                    caps,
                    heartbeat_interval=config.heartbeat_interval,
                    heartbeat_timeout=config.heartbeat_timeout,
                    on_connected=lambda event: connected(addr, event),
                    trajectories=trajectories,
                    direct=config.direct_channels,
                )

            pulls_stop = trio.Event()
            async with trio.open_nursery() as nursery:
                http_url = None
                if parse_listen(config.http_listen) is not None:
                    view = NodeView(
                        host.peer_id,
                        wallet.address,
                        worker,
                        lambda: _connected(sessions),
                        len(config.coordinators),
                        started,
                        models,  # the live list: `models add` while it runs extends it
                        journal_fault=lambda: journal.write_fault,
                    )
                    from sogni_node.metrics import observe

                    view = observe(view, nursery, journal)
                    http_url = await nursery.start(serve_http, build_app(view), config.http_listen)
                log.info(
                    "node_ready",
                    peer=host.peer_id,
                    addrs=host.addrs,
                    wallet=wallet.address,
                    payout=identity.payout or wallet.address,
                    machine_id=machine_id or None,
                    device=hw.device,
                    slots=config.slots,
                    coordinators=len(config.coordinators),
                    http=http_url,
                )
                if on_event is not None:
                    on_event(
                        {
                            "event": "ready",
                            "peerId": host.peer_id,
                            "addrs": host.addrs,
                            "http": http_url,
                        }
                    )
                task_status.started(host)

                def all_ready() -> None:
                    """A job ended: every coordinator may offer into the freed slot."""
                    for session in list(sessions):
                        session.offer_ready()

                several = all_ready if len(config.coordinators) > 1 else None
                for addr in config.coordinators:
                    nursery.start_soon(
                        pull_forever,
                        lambda a=addr: new_session(a),
                        addr,
                        sessions,
                        pulls_stop,
                        several,
                    )
                nursery.start_soon(
                    _advertise, host, identity, lambda: new_caps(), config.advert_interval
                )
                nursery.start_soon(_sync_journal, journal)
                nursery.start_soon(_probe_journal, journal, all_ready)
                nursery.start_soon(_prune_forever, journal)
                nursery.start_soon(watch_installed, config.models_dir, installed, announce)
                urls = [u for u in config.network_signers_urls if u.startswith("http")]
                if identity.network is not None and urls:
                    nursery.start_soon(
                        _refresh_signer_set, identity.network, urls, config.network_signers_refresh
                    )
                if config.coordinators:  # to another of a network, or back to its own
                    nursery.start_soon(
                        functools.partial(
                            _forward_orphans,
                            journal,
                            sessions,
                            identity,
                            orphan_after=config.forward_results_after,
                        )
                    )
                await stop.wait()
                await _drain(worker, sessions, config.shutdown_grace, report)
                pulls_stop.set()
                for session in list(sessions):
                    session.finish()
                with trio.move_on_after(5):
                    await _all_closed(sessions)
                nursery.cancel_scope.cancel()
    finally:
        journal.close()
    log.info("node_stopped", finished=report.finished, handed_back=report.handed_back)
    return report


async def _advertise(
    host: Host, identity: NodeIdentity, caps: Callable[[], Capabilities], interval: float
) -> None:
    """Gossip a signed capability advert every `interval` seconds (coordinators rate-limit)."""
    while True:
        advert = caps()
        hello = NodeHello(
            capabilities=advert,
            binding_signature=eip712.sign_binding(identity.wallet_key, identity.domain, advert),
        )
        try:
            await host.publish(CAPABILITIES_TOPIC, encode(hello))
        except (TransportError, ValueError) as exc:
            log.warning("advert_not_published", error=str(exc))
        await trio.sleep(interval)


async def _sync_journal(journal: Journal, interval: float = SYNC_INTERVAL) -> None:
    """Make the journal's commits without a fsync (offers taken, acks) durable within
    `interval` seconds (`Journal.sync`; usually the next receipt's fsync'd commit has)."""
    while True:
        await trio.sleep(interval)
        if journal.unsynced:
            try:
                await trio.to_thread.run_sync(journal.sync)
            except OSError as exc:  # the next receipt's commit syncs it all the same
                log.warning("journal_not_synced", error=type(exc).__name__)


async def _probe_journal(
    journal: Journal, on_writable: Callable[[], None], interval: float = JOURNAL_PROBE_SECONDS
) -> None:
    """While the journal cannot be written (a write met a full disk, a read-only or failing
    volume: `Journal.write_fault`), the node takes no job (`PullSession.capacity` is 0, offers
    are declined); every `interval` seconds this tries a kept image's worth of writes
    (`Journal.probe_write`), and once one works it calls `on_writable` (every session
    advertises its slots again)."""
    while True:
        await trio.sleep(interval)
        if journal.writable:
            continue
        try:
            back = await trio.to_thread.run_sync(journal.probe_write)
        except Exception as exc:  # a bug in the probe must not end the daemon
            log.error("journal_probe_failed", error=type(exc).__name__)
            continue
        if back:
            on_writable()


PRUNE_INTERVAL = 3600.0
"""Seconds between prunes of kept results while the node runs (it pruned only at start: an
image whose ack was lost with its stream stayed on disk as long as the daemon ran)."""


async def _prune_forever(journal: Journal, interval: float = PRUNE_INTERVAL) -> None:
    """`Journal.prune_results` every `interval`, sparing every file younger than an hour (a
    render's image is written before its receipt commits)."""
    while True:
        await trio.sleep(interval)
        try:
            pruned = await trio.to_thread.run_sync(
                functools.partial(journal.prune_results, RESULT_KEEP_SECONDS, unknown_after=3600)
            )
        except OSError as exc:  # a tidy-up: the next round tries again
            log.warning("results_not_pruned", error=type(exc).__name__)
        else:
            if pruned:
                log.info("results_pruned", files=pruned)


SIGNER_SET_FETCH_TIMEOUT = 10.0
"""Seconds one fetch of the signer set may take, end to end (`NetworkSigners.fetch`)."""


async def _refresh_signer_set(network: NetworkSigners, urls: list[str], interval: float) -> None:
    """Fetch the network's signer set from each coordinator's HTTP listener now and every
    `interval` seconds; a newer valid set is kept (the next handshake uses it). Whatever one
    fetch meets (a listener that answers garbage or never finishes, a full disk when a newer
    set is written) is one log line: the held set stays and the daemon runs on."""
    timeout = SIGNER_SET_FETCH_TIMEOUT
    while True:
        for url in urls:
            fetch = functools.partial(network.fetch, url, timeout)
            with trio.move_on_after(2 * timeout) as late:  # `fetch` bounds itself; belt
                try:
                    await trio.to_thread.run_sync(fetch, abandon_on_cancel=True)  # type: ignore[call-arg]
                except Exception as exc:
                    log.error("signer_set_refresh_failed", url=url, error=type(exc).__name__)
            if late.cancelled_caught:
                log.warning("signer_set_not_fetched", url=url, error="TimeoutError")
        await trio.sleep(interval)


async def _forward_orphans(
    journal: Journal,
    sessions: set[PullSession],
    identity: NodeIdentity,
    *,
    interval: float = 2.0,
    orphan_after: float = 10.0,
) -> None:
    """Deliver results kept for a coordinator that is gone to another of its network, and
    those an earlier session to a coordinator left unanswered to its session now.

    A result waits for its coordinator's ack; when that coordinator has had no open session
    for `orphan_after` seconds, the same `Result` (receipt and signature unchanged) goes to a
    connected coordinator whose network set names both, which accepts it against the shared
    offer record. One whose coordinator is connected again (a lost stream, a restart), at
    least `orphan_after` s old and never sent on the session now open, goes to that session:
    a cancelled job waits there for its partial receipt (`Dispatcher.PARTIAL_WAIT`). Each
    (job, coordinator) is tried once per session; a refusal keeps the result (a re-offer
    still gets it, `PullSession._resend`).
    """
    started = trio.current_time()
    last_seen: dict[str, float] = {}
    tried: dict[tuple[bytes, str], PullSession | None] = {}
    while True:
        await trio.sleep(interval)
        now = trio.current_time()
        live = {
            s.coordinator.lower(): s for s in sessions if s.coordinator and not s.closed.is_set()
        }
        for key in live:
            last_seen[key] = now
        if not live:
            continue
        try:
            since = time.time() - RESULT_KEEP_SECONDS  # older ones are pruned: no image
            entries = await trio.to_thread.run_sync(journal.unacked, since)
        except Exception as exc:  # the journal is busy or broken: next round
            log.error("orphans_not_read", error=type(exc).__name__)
            continue
        wall = time.time()
        for entry in entries:
            job_id, owner = entry.receipt.job_id, entry.receipt.coordinator.lower()
            own = live.get(owner)
            if own is not None:  # back: what an earlier session of it left unanswered
                if (
                    wall - entry.recorded_at < orphan_after
                    or tried.get((job_id, owner)) is own
                    or own.answered_here(job_id)
                ):
                    continue
                key, target = owner, own
            elif now - last_seen.get(owner, started) < orphan_after:
                continue
            else:
                targets = [
                    (key, s)
                    for key, s in live.items()
                    if owner in s.network_keys
                    and (job_id, key) not in tried
                    and job_id not in s.jobs
                ]
                if not targets:
                    continue
                key, target = targets[0]
            tried[(job_id, key)] = target  # once per session, even if its image is gone (pruned)
            try:
                kept = await trio.to_thread.run_sync(journal.stored_result, job_id)
            except Exception as exc:  # the journal is busy or broken: the next re-offer gets it
                log.error("orphan_not_read", job=job_id.hex()[:16], error=type(exc).__name__)
                continue
            if kept is None or kept.image is None or kept.entry.accepted is not None:
                continue
            receipt = signed_form(entry.receipt, entry.domain_version, identity.payout)
            meta = entry.meta or RenderMeta(backend="", device="", dtype="", threads=0)
            target.forward(
                Result(
                    job_id=job_id,
                    image=kept.image,
                    receipt=receipt,
                    signature=entry.signature,
                    meta=meta,
                )
            )
            if target is own:
                log.info("result_resent", job=job_id.hex()[:16], to=key)
            else:
                log.info("result_forwarded", job=job_id.hex()[:16], dead=owner, to=key)


CANCEL_WAIT = 30.0
"""Seconds a stopping node waits for its cancelled renders to stop before it says goodbye:
they stop at their next step, but one still loading a model (minutes) cannot be stopped, and
the coordinator should hear of the others first. The process itself still ends only once
that load has returned (a render thread is never abandoned mid-write)."""
RESULT_KEEP_WAIT = 10.0
"""Seconds a stopping node waits, after its renders ended, for their results to be journaled
and queued (a fsync'd write each) before it says goodbye."""


async def _drain(
    worker: Worker, sessions: set[PullSession], grace: float, report: ShutdownReport
) -> None:
    worker.draining = True
    for session in list(sessions):
        session.offer_ready()  # zero slots: no more offers
    running = set(worker.running)
    log.info("node_draining", running=len(running), grace_seconds=grace)
    with trio.move_on_after(grace):
        await worker.wait_idle()
    handed_back = set(worker.cancel_all("node shutting down"))
    with trio.move_on_after(CANCEL_WAIT) as waited:
        await worker.wait_idle()  # cancelled renders stop at their next step
    if waited.cancelled_caught:  # one still loading its model: the goodbye goes out first
        log.warning("renders_not_stopped", running=len(worker.running), waited=CANCEL_WAIT)
    # A render's slot is free before its result is kept and sent (`Worker.finishing`): the
    # goodbye must follow those results, or the coordinator ends the session first and
    # re-queues work that was done.
    with trio.move_on_after(RESULT_KEEP_WAIT):
        while worker.finishing:
            await next(iter(worker.finishing.values())).wait()
    report.handed_back = sorted(j.hex() for j in handed_back)
    report.finished = sorted(j.hex() for j in running - handed_back)


def _connected(sessions: set[PullSession]) -> int:
    """Pull sessions that got a welcome and are still open."""
    return sum(1 for s in sessions if s.coordinator and not s.closed.is_set())


async def _all_closed(sessions: set[PullSession]) -> None:
    for session in list(sessions):
        await session.closed.wait()


def _announce(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


def build_backend(config: NodeConfig, registry: ModelRegistry, hw: HardwareInfo) -> Backend:
    """The renderer `start` and `bench` both use, so the measured speed is the served one.

    `auto` is diffusers on the probed device (CUDA, MPS or CPU): Core ML needs a conversion
    of minutes per model, so a Mac owner opts in with `backend = "coreml"`.
    """
    from sogni_node.render import create_backend

    if config.backend == "coreml":  # Apple Silicon; converts on first use, predicts on macOS
        return create_backend("coreml", registry, cache_dir=config.models_dir / "coreml")
    return create_backend(
        "diffusers",
        registry,
        device=hw.device,
        threads=config.threads or None,
        dtype=None if config.dtype == "auto" else config.dtype,
        quantize=config.quantize,
        compile=config.compile,
    )


def run(config: NodeConfig, *, announce: bool = False) -> ShutdownReport:
    """Blocking entry point used by the CLI: runs until SIGINT or SIGTERM.

    With `announce`, one JSON line per event (`ready`, `connected`) goes to stdout, so a
    launcher knows when the node is usable without guessing. These announcements are for
    launchers; operators and tests read the stable log events of docs/EVENTS.md.
    """
    with private_files():
        busy = FolderBusy(f"a node is already running on {config.data_dir}")
        with folder_lock.hold(config.data_dir, DATA_DIR_LOCK, busy):  # for the process's life
            return _run(config, announce=announce)


@contextmanager
def private_files() -> Iterator[None]:
    """Umask 077 while the daemon runs: every file it writes (journal, kept images,
    trajectories, keys, the signer set) is its owner's alone, whatever the shell's umask;
    the data folder itself, when made here, is 0700."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _exit_now(code: int) -> NoReturn:
    """End the process at once (a second Ctrl-C): no drain, no goodbye. The journal loses
    nothing a crash would not (`sogni_node.journal`); coordinators re-queue the jobs."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


async def watch_signals(stop: trio.Event, exit_now: Callable[[int], object] = _exit_now) -> None:
    """The first SIGINT or SIGTERM starts the drain (`stop`); a second one while it drains
    stops the process at once (`exit_now(130)`), with one line saying so."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.is_set():
                log.info(
                    "signal_received",
                    signal=name,
                    hint="draining; send it again to stop at once",
                )
                stop.set()
                continue
            log.warning(
                "forced_stop",
                signal=name,
                hint="second signal while draining: stopping now; running jobs are not "
                "waited for (their coordinators give them to other nodes)",
            )
            exit_now(130)
            return


def _run(config: NodeConfig, *, announce: bool) -> ShutdownReport:
    from sogni_node.models.defaults import default_registry

    quiet_progress_bars()  # before torch, diffusers and transformers are imported
    wallet = unlock_wallet(config.keystore, config.password_env)
    registry = default_registry(config.models_dir, test_model=config.test_model)
    try:
        backend = build_backend(config, registry, probe(config.device))
    except ValueError as exc:  # a quant mode this device can't run, a missing extra
        raise HardwareError(str(exc)) from None
    adopt_library_loggers()  # those imported with the backend: into the structured log
    quiet_progress_bars()
    models = registry.ids()
    on_event = _announce if announce else None

    async def main() -> ShutdownReport:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, stop)
            report = await run_node(config, wallet, backend, models, stop=stop, on_event=on_event)
            nursery.cancel_scope.cancel()
        return report

    return trio.run(main)


def plain_advert(origin: str, data: bytes) -> bool:
    """The node's gossip validator: relay only what could be an advert of its origin, unexpired
    (a strict decode, no signature: coordinators check bindings). Without one a node relayed
    any bytes up to the topic's frame limit across the mesh."""
    try:
        msg = decode(data)
    except ProtocolError:
        return False
    return (
        isinstance(msg, NodeHello)
        and msg.capabilities.peer_id == origin
        and msg.capabilities.expiry > time.time()
    )
