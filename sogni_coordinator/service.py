"""A running coordinator: libp2p host, dispatcher and store, owned by one nursery."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

from sogni_coordinator.adverts import AdvertBook
from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.billing import Billing
from sogni_coordinator.block_watch import apply_blocks
from sogni_coordinator.block_watch import watch as watch_reports
from sogni_coordinator.chain_link import connect_chain, publish_dir
from sogni_coordinator.claim_relay import ClaimRelay, serve_relay
from sogni_coordinator.client_session import serve_client
from sogni_coordinator.cluster import Cluster
from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.data_dir_lock import hold
from sogni_coordinator.dispatch import Dispatcher
from sogni_coordinator.disputes import attach_disputes
from sogni_coordinator.epoch_serving import EpochFolder, serve_epochs
from sogni_coordinator.gateway import open_gateway
from sogni_coordinator.http_api import CoordinatorView, build_app
from sogni_coordinator.key_rotation import chain_for, chain_path
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.model_stake import ModelStakeBoard
from sogni_coordinator.network_signers import SIGNER_SET_FILE, WelcomeSet
from sogni_coordinator.node_session import serve_node
from sogni_coordinator.referrals import close_beside
from sogni_coordinator.reports import Reports
from sogni_coordinator.reputation import Reputation
from sogni_coordinator.results import open_results
from sogni_coordinator.routing import Router
from sogni_coordinator.safety.screen import image_safety_from
from sogni_coordinator.seasons.hardware import HardwareLog
from sogni_coordinator.settlement.rules import payout_rules
from sogni_coordinator.settlement.timer import run_epoch_timer
from sogni_coordinator.staking_benefits import PayerBenefits
from sogni_coordinator.store import Store
from sogni_net import (
    Channel,
    ChannelClosed,
    Handler,
    ReadTimeout,
    WriteTimeout,
    open_host,
    parse_listen,
    require_http_extra,
    serve_http,
)
from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.catalog import default_catalog
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import ProtocolError
from sogni_protocol.ids import (
    CAPABILITIES_TOPIC,
    CLIENT_PROTOCOL,
    EPOCHS_PROTOCOL,
    JOBS_PROTOCOL,
    RELAY_PROTOCOL,
)
from sogni_protocol.logs import get_logger

if TYPE_CHECKING:
    from trio_typing import TaskStatus  # trio-typing's stubs shadow trio's own types

log = get_logger(__name__)

_STREAM_ENDS = (ChannelClosed, ReadTimeout, WriteTimeout, ProtocolError)
"""How a handler may end that `sogni_net.Host` takes as the stream's end (closed, timed out,
a peer's bad frame), not as the handler failing: it logs anything else `handler_failed`."""


@runtime_checkable
class HandlerMeter(Protocol):
    """A dispatcher that counts failed stream handlers (`metrics.MeteredDispatcher`)."""

    def handler_failed(self, protocol: str) -> None: ...


def counted(protocol: str, handler: Handler, meter: object) -> Handler:
    """`handler`, counting in `meter` (`handler_failures_total{protocol}`) each stream it
    fails with what the host logs as `handler_failed`; the exception goes on to the host
    (which logs it and resets the stream). `handler` itself when `meter` counts nothing."""
    if not isinstance(meter, HandlerMeter):
        return handler

    async def serve(channel: Channel) -> None:
        try:
            await handler(channel)
        except _STREAM_ENDS:
            raise
        except Exception:
            meter.handler_failed(protocol)
            raise

    return serve


@dataclass(frozen=True)
class Signer:
    address: str
    private_key: bytes = field(repr=False)


@dataclass(frozen=True)
class RunningCoordinator:
    peer_id: str
    addrs: list[str]
    address: str
    dispatcher: Dispatcher
    adverts: AdvertBook
    http_url: str | None = None
    """Where `http_listen` is served (real port), None when it is off."""


async def run_coordinator(
    config: CoordinatorConfig,
    signer: Signer,
    *,
    task_status: TaskStatus[RunningCoordinator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. `task_status.started` reports the listening addresses. The
    data folder is this process's alone meanwhile (`data_dir_lock`: `DataDirBusy` when
    another coordinator runs on it)."""
    with hold(config.data_dir, "starting another one on it"):
        await _serve(config, signer, task_status=task_status)


async def _serve(
    config: CoordinatorConfig,
    signer: Signer,
    *,
    task_status: TaskStatus[RunningCoordinator],
) -> None:
    started = time.monotonic()
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys, prompts' keys
    store = Store(config.database)
    closers: list[ApiKeys] = []  # closed after the nursery (the gateway's key store)
    ledger = Ledger(config.database, daily_boost_spark=default_catalog().daily_boost_spark)
    reputation = Reputation(config.database)
    reports = Reports(config.database)
    hardware = HardwareLog(config.database)  # the Workers boards' Hardware column
    cluster: Cluster | None = None
    try:
        domain = Domain(config.chain_id, config.verifying_contract)
        rules = payout_rules(config)  # [settlement] + the catalog's model creators
        billing = Billing(
            ledger,
            domain,
            mode=config.billing,
            rules=rules,
            network_id=config.network_id,
            boost_for_anyone=config.local,
        )
        # an API key's account pays only while its key is live and within its daily limit,
        # whichever protocol its (derivable) account key signs requests over
        billing.key_accounts = key_accounts = ApiKeys(config.database)
        closers.append(key_accounts)
        link = connect_chain(config, signer.private_key, store)
        router = Router(reputation, tiers=config.tiers, fast_min_stake=config.fast_min_stake)
        standing = (
            link.standing_cache(poll_interval=config.chain_poll_seconds)
            if link is not None
            else None
        )
        if standing is not None:  # chain reads off the loop, cached; routing reads memory
            router.standing = standing
            billing.standing = standing
            billing.benefits = PayerBenefits(config.staking_benefits, standing)
        new_dispatcher: Callable[..., Dispatcher] = Dispatcher
        if parse_listen(config.http_listen) is not None:  # metrics for /metrics
            require_http_extra()  # say what to install, not ModuleNotFoundError
            from sogni_coordinator.metrics import metered

            new_dispatcher = metered({*default_catalog().models, *config.models})
        dispatcher = new_dispatcher(
            store,
            signer_key=signer.private_key,
            signer_address=signer.address,
            domain=domain,
            billing=billing,
            router=router,
            deadline_floor=config.job_deadline_floor,
            deadline_base=config.job_deadline_base,
            results=await trio.to_thread.run_sync(open_results, config),  # results/
            prompt_retention=config.prompt_retention_seconds,
            verification=config.verification,
            verification_log=config.data_dir / "verifications.jsonl",
            content_policy=config.content.policy(),
            image_safety=image_safety_from(config.content),  # docs/SAFETY.md
        )
        dispatcher.hardware = hardware
        dispatcher.no_node_grace = config.no_node_grace
        if link is not None and link.settler.params is not None:  # docs/GOVERNANCE.md
            link.settler.params.follow_verification(dispatcher.checks)
        rotations = chain_for(domain, chain_path(config.data_dir), signer.address, time.time())
        if rotations:  # nodes that trust an older key follow the chain to this one
            log.info(
                "offer_key_rotations",
                links=len(rotations),
                oldest=rotations[0].rotation.old_key,
                signer=signer.address,
            )
        dispatcher.reports = reports  # content reports and the blocks they lead to
        desk = attach_disputes(  # refusals signed, disputes followed (docs/GOVERNANCE.md)
            link, dispatcher, signer.private_key, publish_dir(config), config.database
        )
        reports.refresh()
        apply_blocks(reports, dispatcher)
        if store.postgres:  # one of several coordinators on one database (cluster.py)
            cluster = await Cluster.open(
                config.database,
                me=signer.address,
                signers=config.network_signers,
                lease_ttl=config.lease_seconds,
            )
            cluster.attach(dispatcher)
            restored = await cluster.restore()
            if restored:
                log.info("requests_restored", requests=restored)
        restored = dispatcher.restore()
        if restored:
            log.info("jobs_restored", jobs=restored)
        allowed = set(config.models)
        welcome_set = WelcomeSet(config.data_dir / SIGNER_SET_FILE)

        async def on_node(channel: Channel) -> None:
            await serve_node(
                channel,
                dispatcher,
                heartbeat_interval=config.heartbeat_interval,
                heartbeat_timeout=config.heartbeat_timeout,
                rotations=rotations,
                signer_set=welcome_set,
            )

        async def on_client(channel: Channel) -> None:
            await serve_client(channel, dispatcher, allowed_models=allowed)

        book = AdvertBook(dispatcher.domain, connected=lambda peer: peer in dispatcher.nodes)
        epochs = EpochFolder(publish_dir(config))
        relay = None
        if link is not None:  # relaying needs gas only, no role: the online coordinator key
            relayer = link.deployment.chain.add_key(signer.private_key)
            relay = ClaimRelay(link.deployment.distributor, relayer, min_claim=config.relay_floor)
        async with open_host(
            key_path=config.node_key_path,
            listen=[config.listen],
            pubsub_topics=[CAPABILITIES_TOPIC],
            direct=config.direct_port >= 0,
            direct_port=max(config.direct_port, 0),
        ) as host:
            host.set_topic_validator(CAPABILITIES_TOPIC, book.validate)
            # failures counted by protocol (`handler_failures_total`) when metrics are on
            host.set_stream_handler(
                JOBS_PROTOCOL, counted("node", on_node, dispatcher), direct=True
            )
            host.set_stream_handler(
                CLIENT_PROTOCOL, counted("client", on_client, dispatcher), direct=True
            )
            host.set_stream_handler(
                EPOCHS_PROTOCOL, counted("epochs", partial(serve_epochs, folder=epochs), dispatcher)
            )
            host.set_stream_handler(
                RELAY_PROTOCOL, counted("relay", partial(serve_relay, relay=relay), dispatcher)
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dispatcher.run)
                nursery.start_soon(dispatcher.results.run)  # retention sweep; closes it
                if cluster is not None:
                    nursery.start_soon(cluster.run)
                nursery.start_soon(watch_reports, reports, dispatcher)
                if standing is not None:
                    nursery.start_soon(standing.run)
                if link is not None:
                    await nursery.start(
                        run_epoch_timer, link.settler, config.settlement.epoch_seconds
                    )
                if link is not None and link.deployment.model_stake is not None:
                    dispatcher.model_stake = ModelStakeBoard(
                        link.deployment.model_stake,
                        first_block=link.deployment.addresses.deployed_at_block,
                        poll_seconds=config.chain_poll_seconds,
                    )
                    nursery.start_soon(dispatcher.model_stake.run)
                http_url = None
                if parse_listen(config.http_listen) is not None:
                    from sogni_coordinator.metrics import observe

                    stakes = None
                    if link is not None:  # the Stakers board reads the Staking contract
                        from sogni_coordinator.seasons.stakers import StakeHistory

                        stakes = StakeHistory(link.deployment).changes
                    view = CoordinatorView(
                        host.peer_id,
                        signer.address,
                        dispatcher,
                        started,
                        epochs,
                        relay,
                        stakes,
                        signer_set=config.data_dir / SIGNER_SET_FILE,
                    )
                    view = observe(view, store, config.database, host, nursery)
                    gateway_config = config.gateway
                    if gateway_config.enabled:  # REST and WebSocket for the Sogni SDKs
                        gateway, keys = open_gateway(
                            gateway_config,
                            dispatcher,
                            database=config.database,
                            data_dir=config.data_dir,
                            configured_models=allowed,
                            network_id=config.network_id,
                            url_key_file=config.result_url_key_file,
                            results_dir=(
                                config.results_dir / "gateway"
                                if config.results_dir is not None
                                else None
                            ),
                        )
                        closers.append(keys)
                        nursery.start_soon(gateway.run)
                        view = replace(view, gateway=gateway)
                    http_url = await nursery.start(serve_http, build_app(view), config.http_listen)
                if desk is not None:  # bundles are published at this server's URL
                    desk.public_url = config.gateway.public_url or http_url
                    nursery.start_soon(desk.run, config.chain_poll_seconds)
                info = {
                    "peerId": host.peer_id,
                    "addrs": host.addrs,
                    "address": signer.address,
                    "chainId": domain.chain_id,
                    "verifyingContract": domain.verifying_contract,
                    "networkId": config.network_id,
                    "http": http_url,
                }
                # atomic: a `sogni` command reading it mid-write saw an empty file
                atomic_write_bytes(
                    config.data_dir / "coordinator.json", json.dumps(info, indent=2).encode()
                )
                log.info(
                    "coordinator_ready",
                    peer=host.peer_id,
                    addrs=host.addrs,
                    signer=signer.address,
                    http=http_url,
                    direct=host.direct_port,
                )
                task_status.started(
                    RunningCoordinator(
                        host.peer_id,
                        list(host.addrs),
                        signer.address,
                        dispatcher,
                        book,
                        http_url=http_url,
                    )
                )
    finally:
        if cluster is not None:
            with trio.CancelScope(shield=True):
                await cluster.aclose()
        for closer in closers:
            closer.close()
        reports.close()
        hardware.close()
        reputation.close()
        close_beside(ledger)  # referral codes (referrals.py), in the ledger's database
        ledger.close()
        store.close()
