"""Rotating the coordinator's offer key without losing in-flight work, over libp2p on
127.0.0.1 with the real coordinator, node, journal and the tiny diffusers model.

The node trusts only the old key. A job is mid-render when the coordinator stops; the key is
rotated (`key_rotation.rotate`, as `sogni-coordinator keys rotate` does) and the coordinator
restarts on the same data with the new key. The node follows the signed chain in the
`Welcome`, persists the new key, and answers the re-offer of the in-flight job with its kept
image, re-signed for the new key (never rendered twice): every job has exactly one receipt,
each passes settlement's offer check (the offer signed by the key its receipt names), and
later offers under the new key are rendered. A node trusting neither key refuses the
coordinator; a chain with a link signed by another key is refused.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from eth_account import Account
from structlog.testing import capture_logs

from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.key_rotation import chain_path, load_chain, rotate
from sogni_coordinator.service import Signer, run_coordinator
from sogni_coordinator.settlement.epochs import Settler
from sogni_net import Channel, open_host
from sogni_node.config import NodeConfig
from sogni_node.daemon import run_node
from sogni_node.journal import Journal
from sogni_node.trust import TrustedKeys
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.ids import (
    CLIENT_PROTOCOL,
    CONTROL_FRAME_LIMIT,
    JOBS_PROTOCOL,
    RESULT_FRAME_LIMIT,
)
from sogni_protocol.messages import (
    NO_TRAJECTORY,
    Challenge,
    ChallengeAnswer,
    ChallengeRefused,
    JobOffer,
    JobParams,
    KeyRotation,
    NodeHello,
    Offer,
    RequestAccepted,
    Result,
    SignedKeyRotation,
    Welcome,
)
from sogni_wallet.keystore import Wallet, create_keystore, load_wallet

from .conftest import MODEL, CountingSlowBackend, Net, free_port, tiny_request, until

PASSWORD = "rotate-me"
FAST = 2**4  # scrypt cost for test keystores


def _refused(logs: list[dict[str, Any]]) -> list[str]:
    return [str(e["error"]) for e in logs if e["event"] == "coordinator_refused"]


def _acked(path: Path) -> int:
    """Receipts the node has journaled as accepted (read beside the running node, as
    `sogni-node status` does)."""
    journal = Journal(path)
    try:
        return journal.counts()["accepted"]
    finally:
        journal.close()


def _node_config(tmp_path: Path, coordinator: str, trusted: str, domain: Domain) -> NodeConfig:
    """A node dialling a hand-driven coordinator host that trusts only `trusted`."""
    return NodeConfig(
        data_dir=tmp_path / "node",
        coordinators=[coordinator],
        trusted_coordinators=[trusted],
        chain_id=domain.chain_id,
        verifying_contract=domain.verifying_contract,
        threads=1,
        http_listen="off",
    )


async def test_rotated_key_keeps_in_flight_work_and_nodes_follow_it(
    tmp_path: Path, backend: Any
) -> None:
    data_dir = tmp_path / "coordinator"
    keystore = data_dir / "signer.json"
    old = Account.create()
    create_keystore(keystore, PASSWORD, kdf_n=FAST, private_key=bytes(old.key))
    config = CoordinatorConfig(
        data_dir=data_dir,
        listen=f"/ip4/127.0.0.1/tcp/{free_port()}",
        models=[MODEL],
        heartbeat_interval=0.5,
        heartbeat_timeout=3.0,
        http_listen="off",
    )
    domain = Domain(config.chain_id, config.verifying_contract)
    slow = CountingSlowBackend(backend, step_seconds=0.4, nth=2)
    with capture_logs() as logs:
        async with trio.open_nursery() as nodes:
            async with trio.open_nursery() as first, open_host(key_path=None, listen=()) as client:
                signer = Signer(old.address, bytes(old.key))
                running = await first.start(run_coordinator, config, signer)
                net = Net(tmp_path, nodes, running, signer, config)
                node = await net.add_node(slow, "node0")  # trusts the old key only
                channel = await client.open_channel(running.addrs[0], CLIENT_PROTOCOL)
                await channel.send(tiny_request(3))
                accepted = await channel.receive(timeout=10)
                assert isinstance(accepted, RequestAccepted)
                await slow.nth_started.wait()  # image 2 mid-render (pipelined: it may start
                # before image 1's result is committed, so wait for that receipt)
                await until(lambda: running.dispatcher.store.counts().get("done", 0) == 1, 10)
                # and for its ack in the node's journal: stopped between commit and ack, the
                # receipt would wait for `forward_results_after` to be acked by the new key
                await until(lambda: _acked(tmp_path / "node0" / "journal.db") == 1, 10)
                first.cancel_scope.cancel()  # the coordinator stops here

            done = await trio.to_thread.run_sync(
                lambda: rotate(keystore, PASSWORD, data_dir, domain, kdf_n=FAST)
            )
            assert done.old == old.address
            wallet = load_wallet(keystore, PASSWORD)
            assert wallet.address == done.new
            async with trio.open_nursery() as second:
                signer = Signer(wallet.address, wallet.private_key)
                running = await second.start(run_coordinator, config, signer)
                store = running.dispatcher.store
                await until(lambda: store.counts().get("done", 0) == 3, 60)
                # later offers under the new key are rendered too
                net = Net(tmp_path, nodes, running, signer, config)
                async with open_host(key_path=None, listen=()) as client:
                    channel = await client.open_channel(running.addrs[0], CLIENT_PROTOCOL)
                    await channel.send(tiny_request(1, seed=9))
                    more = await channel.receive(timeout=10)
                    assert isinstance(more, RequestAccepted)
                    await until(lambda: store.counts().get("done", 0) == 4, 60)
                # a node that trusts neither key refuses this coordinator
                await net.add_node(backend, "stranger", trusted=[Account.create().address])
                await until(lambda: bool(_refused(logs)), 30)
                receipts = store.receipts()
                second.cancel_scope.cancel()
            node.stop.set()
            with trio.fail_after(30):
                await node.done.wait()
            nodes.cancel_scope.cancel()

    jobs = [*accepted.job_ids, *more.job_ids]
    per_job = Counter(r.receipt.job_id for r in receipts)
    assert set(per_job) == set(jobs) and set(per_job.values()) == {1}  # receipted once each
    assert slow.calls == 4  # the in-flight image was delivered from the kept result
    by_job = {r.receipt.job_id: r for r in receipts}
    assert by_job[accepted.job_ids[0]].receipt.coordinator == old.address
    for job in jobs[1:]:  # the in-flight one included: re-signed for the new key's offer
        assert by_job[job].receipt.coordinator == done.new
    for r in receipts:  # settlement's own check: each offer signed by the key its receipt names
        assert Settler._refusal(SimpleNamespace(domain=domain), r, None) is None  # type: ignore[arg-type]

    journal = Journal(tmp_path / "node0" / "journal.db")
    try:  # the node's own record: one accepted receipt per job, naming the key it was paid by
        kept = {r.receipt.job_id: r for r in journal.receipts()}
    finally:
        journal.close()
    assert {job: kept[job].accepted for job in jobs} == dict.fromkeys(jobs, True)
    assert kept[jobs[1]].receipt.coordinator == done.new
    assert kept[jobs[1]].receipt.result_hash == by_job[jobs[1]].receipt.result_hash

    trust = TrustedKeys.in_dir(tmp_path / "node0").load({old.address.lower()})
    assert trust == {done.new.lower(): old.address.lower()}
    rotated = [e for e in logs if e["event"] == "coordinator_key_rotated"]
    assert [(e["old"], e["new"]) for e in rotated] == [(old.address, done.new)]
    [reason] = set(_refused(logs))
    assert "is not in trusted_coordinators nor reachable from them" in reason
    assert [link.rotation.new_key for link in load_chain(chain_path(data_dir))] == [done.new]


async def test_a_forged_rotation_chain_is_refused(tmp_path: Path, backend: Any) -> None:
    """A coordinator presents a chain from the node's trusted key to its own, but the link is
    signed by another key: the node refuses the session and names why."""
    trusted, intruder, rogue = Account.create(), Account.create(), Account.create()
    domain = Domain(31337, "0x" + "00" * 20)
    rotation = KeyRotation(old_key=trusted.address, new_key=rogue.address, not_before=1)
    forged = SignedKeyRotation(
        rotation=rotation,
        signature=eip712._sign(bytes(intruder.key), eip712.key_rotation_document(domain, rotation)),
    )
    welcomed = trio.Event()

    async def on_node(channel: Channel) -> None:
        hello = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
        assert isinstance(hello, NodeHello)
        await channel.send(
            Welcome(
                coordinator=rogue.address,
                chain_id=domain.chain_id,
                verifying_contract=domain.verifying_contract,
                heartbeat_interval=0.5,
                rotations=[forged],
            )
        )
        welcomed.set()
        await trio.sleep(5)

    acct = Account.create()
    stop = trio.Event()
    with capture_logs() as logs:
        async with open_host(key_path=None, listen=["/ip4/127.0.0.1/tcp/0"]) as host:
            host.set_stream_handler(JOBS_PROTOCOL, on_node)
            config = _node_config(tmp_path, host.addrs[0], trusted.address, domain)
            wallet = Wallet(acct.address, bytes(acct.key))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_node(config, wallet, backend, [MODEL], stop=stop))
                await until(lambda: bool(_refused(logs)), 30)
                stop.set()
    assert welcomed.is_set()
    reason = _refused(logs)[0]
    assert "sent key rotations that do not verify" in reason
    assert "not signed by the key it replaces" in reason
    assert not any(e["event"] == "coordinator_key_rotated" for e in logs)
    assert TrustedKeys.in_dir(tmp_path / "node").load({trusted.address.lower()}) == {}


async def test_a_challenge_about_work_offered_under_the_old_key_is_answered(
    tmp_path: Path, backend: Any
) -> None:
    """A receipt held for a check when the coordinator restarts under a new key: the check's
    challenge names a job the node rendered for the old key, and the node still answers it
    (its journal's offer names a key on the chain), so an honest node is not struck."""
    domain = Domain(31337, "0x" + "00" * 20)
    old, new = Account.create(), Account.create()
    link = eip712.sign_key_rotation(
        bytes(old.key),
        domain,
        KeyRotation(old_key=old.address, new_key=new.address, not_before=int(time.time())),
    )
    welcomes = [(old.address, []), (new.address, [link])]
    streams_send, streams = trio.open_memory_channel[Channel](2)
    release = trio.Event()

    async def on_node(channel: Channel) -> None:
        hello = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
        assert isinstance(hello, NodeHello)
        key, rotations = welcomes.pop(0)
        await channel.send(
            Welcome(
                coordinator=key,
                chain_id=domain.chain_id,
                verifying_contract=domain.verifying_contract,
                heartbeat_interval=0.5,
                rotations=rotations,
            )
        )
        await streams_send.send(channel)
        with trio.move_on_after(30):
            await release.wait()

    async def next_of(channel: Channel, kind: type) -> Any:
        with trio.fail_after(60):
            while True:
                msg = await channel.receive(limit=RESULT_FRAME_LIMIT, timeout=60)
                if isinstance(msg, kind):
                    return msg

    params = JobParams(
        model_id=MODEL,
        positive_prompt="a red circle",
        steps=3,
        guidance=4.0,
        width=64,
        height=64,
        seed=3,
    )
    offer = JobOffer(
        job_id=os.urandom(32),
        coordinator=old.address,
        model_id=MODEL,
        params_hash=eip712.params_hash(params),
        steps=3,
        width=64,
        height=64,
        seed=3,
        work_units=3000,
        deadline=int(time.time()) + 600,
    )
    signature = eip712.sign_digest(bytes(old.key), eip712.offer_hash(domain, offer))
    acct = Account.create()
    stop = trio.Event()
    with capture_logs() as logs:
        async with open_host(key_path=None, listen=["/ip4/127.0.0.1/tcp/0"]) as host:
            host.set_stream_handler(JOBS_PROTOCOL, on_node)
            config = _node_config(tmp_path, host.addrs[0], old.address, domain)
            wallet = Wallet(acct.address, bytes(acct.key))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_node(config, wallet, backend, [MODEL], stop=stop))
                first = await streams.receive()
                await first.send(Offer(offer=offer, params=params, signature=signature))
                result = await next_of(first, Result)
                assert result.receipt.coordinator == old.address
                assert result.receipt.trajectory_root != NO_TRAJECTORY
                await first.close()  # the coordinator stops; it comes back with the new key
                second = await streams.receive()
                challenge = Challenge(
                    job_id=offer.job_id, steps=[1], deadline=int(time.time()) + 60
                )
                await second.send(challenge)
                answer = await next_of(second, ChallengeAnswer | ChallengeRefused)
                release.set()
                stop.set()
    assert isinstance(answer, ChallengeAnswer), answer
    assert [o.step for o in answer.openings] == [1]
    assert [(e["old"], e["new"]) for e in logs if e["event"] == "coordinator_key_rotated"] == [
        (old.address, new.address)
    ]
