"""Claims from anywhere, without gas: a running coordinator serves its published epochs and
relays claims; `sogni-node rewards [claim]` fetches, checks and claims through it.

The coordinator runs in-process (`run_coordinator`: libp2p and HTTP on 127.0.0.1) against a
shared anvil; the node CLI runs in a worker thread (typer's runner), as its own trio program.
Skipped without anvil. The matured-root rules run on the embedded chain.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner, Result

from sogni_chain import ChainRevert
from sogni_coordinator.chain_link import publish_dir
from sogni_coordinator.claim_relay import MAX_WAITING, SENDER_FACTOR, ClaimRelay, RelayRefusal
from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.service import RunningCoordinator, Signer, run_coordinator
from sogni_coordinator.store import Store
from sogni_net import open_host
from sogni_node.cli import app as node_app
from sogni_node.epoch_fetch import RelayFailed, relay_claim
from sogni_node.journal import Journal
from sogni_node.rewards import NotMatured, load_published, plan_claim
from sogni_protocol import ids
from sogni_protocol.relay_messages import RelayClaim, RelayRefused, decode, encode
from sogni_wallet.keystore import create_keystore

from .conftest import _net
from .settle_env import Net, settler, signed_receipt, store_receipts, worker

PASSWORD = "claims-anywhere"
runner = CliRunner()


@pytest.fixture
def anvil_net(request: pytest.FixtureRequest, _nets: dict[str, Net]) -> Iterator[Net]:
    """The shared anvil deployment (skipped without anvil), reverted after the test."""
    yield from _net("anvil", request, _nets)


@dataclass
class Coordinator:
    running: RunningCoordinator
    config: CoordinatorConfig

    @property
    def addr(self) -> str:
        return self.running.addrs[0]


@asynccontextmanager
async def coordinator(net: Net, tmp: Path, **cfg: Any) -> AsyncIterator[Coordinator]:
    """A coordinator on the shared chain whose key posts roots and relays claims (of any
    amount on this local chain unless `cfg` sets `relay_min_claim`)."""
    addresses = tmp / "addresses.json"
    net.d.addresses.save(addresses)
    config = CoordinatorConfig(
        data_dir=tmp / "coordinator",
        listen="/ip4/127.0.0.1/tcp/0",
        http_listen="127.0.0.1:0",
        chain_url=net.chain.url,
        addresses_file=addresses,
        log_level="warning",
        **cfg,
    )
    signer = Signer(net.settler.address, bytes(net.settler.key))
    async with trio.open_nursery() as nursery:
        running = await nursery.start(run_coordinator, config, signer)
        yield Coordinator(running, config)
        nursery.cancel_scope.cancel()


def close_epoch(net: Net, config: CoordinatorConfig, receipts: list[Any]) -> None:
    """Receipts paid in the coordinator's store, then an epoch closed into its publish dir."""
    store = Store(config.database)
    try:
        store_receipts(store, receipts)
        s = settler(store, net, config.data_dir)
        s.publish_dir = publish_dir(config)
        assert s.close_epoch() is not None
    finally:
        store.close()


def node_env(tmp: Path, key: LocalAccount, net: Net, coordinator_addr: str) -> dict[str, Any]:
    ndir = tmp / f"node-{key.address[2:8]}"
    create_keystore(ndir / "wallet.json", PASSWORD, kdf_n=2, private_key=key.key)
    return {
        "SOGNI_NODE_DATA_DIR": str(ndir),
        "SOGNI_NODE_PASSWORD": PASSWORD,
        "SOGNI_NODE_CHAIN_URL": net.chain.url,
        "SOGNI_NODE_ADDRESSES_FILE": str(tmp / "addresses.json"),
        "SOGNI_NODE_COORDINATORS": coordinator_addr,
        "SOGNI_NODE_CONFIG": None,
        "SOGNI_NODE_EPOCHS_DIR": None,
        "SOGNI_NODE_AUTO_STAKE_SHARE": None,
    }


async def node(args: list[str], env: dict[str, Any]) -> Result:
    """`sogni-node ARGS` in a worker thread (it runs its own trio loop)."""
    return await trio.to_thread.run_sync(lambda: runner.invoke(node_app, args, env=env))


def ok(result: Result) -> Any:
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


async def test_fetch_audit_and_claim_without_gas_through_the_coordinator(
    anvil_net: Net, tmp_path: Path
) -> None:
    net = anvil_net
    plain, halves, configured = worker(21), worker(22), worker(23)
    mine = [signed_receipt(plain, net.domain) for _ in range(2)]
    receipts = [*mine, signed_receipt(halves, net.domain), signed_receipt(configured, net.domain)]
    async with coordinator(net, tmp_path) as c:
        close_epoch(net, c.config, receipts)
        env = node_env(tmp_path, plain, net, c.addr)
        with Journal(Path(env["SOGNI_NODE_DATA_DIR"]) / "journal.db") as journal:
            for receipt, signature, *_ in mine:
                journal.record_receipt(
                    receipt, signature, chain_id=net.domain.chain_id,
                    verifying_contract=net.domain.verifying_contract,
                )  # fmt: skip
                journal.mark_acked(receipt.job_id, True)

        # `rewards` with no --epochs-dir: fetched from the coordinator, checked, audited
        report = ok(await node(["rewards", "--json"], env))
        assert report["ok"] and report["verifiedReceipts"] == 2, report
        # a mistyped local copy is an error, not "earned 0 SOGNI"
        typo = await node(["rewards", "--epochs-dir", str(tmp_path / "nowhere")], env)
        assert typo.exit_code == 4 and "does not exist" in typo.stderr, typo.output
        assert report["maturedEpoch"] == 1 and report["claimable"] == report["earned"] != "0"
        cache = Path(env["SOGNI_NODE_DATA_DIR"]) / "epochs" / c.running.peer_id
        assert Path(report["epochsDir"]) == cache and (cache / "epoch-000001.json").exists()
        due = int(report["earned"])

        # no ETH, no --relay: one line naming both ways out, non-zero exit
        assert net.chain.eth_balance(plain.address) == 0
        refused = await node(["rewards", "claim"], env)
        assert refused.exit_code == 3, refused.output
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith("error: ") and "ETH" in line and "--relay" in line, line
        assert "Traceback" not in refused.output and refused.stdout == ""

        # --relay: the coordinator pays the gas, the tokens come to the wallet
        nonce = net.chain.w3.eth.get_transaction_count(net.settler.address)
        claimed = ok(await node(["rewards", "claim", "--relay", "--json"], env))
        assert claimed["claimed"] == str(due) and claimed["staked"] == "0"
        assert claimed["relayer"] == c.addr and claimed["txHash"].startswith("0x")
        assert net.d.token.balance_of(plain.address) == due
        assert net.chain.eth_balance(plain.address) == 0
        assert net.chain.w3.eth.get_transaction_count(net.settler.address) == nonce + 1
        again = ok(await node(["rewards", "claim", "--relay", "--json"], env))
        assert again["claimed"] == "0" and again["txHash"] is None  # nothing due: nothing sent

        # --stake-share 0.5 through the relayer: half staked for the worker, the rest paid
        env2 = node_env(tmp_path, halves, net, c.addr)
        split = ok(
            await node(["rewards", "claim", "--relay", "--stake-share", "0.5", "--json"], env2)
        )
        amount = int(split["claimed"])
        assert int(split["staked"]) == amount * 5000 // 10_000 and amount > 0
        assert net.d.staking.active_stake(halves.address) == int(split["staked"])
        assert net.d.token.balance_of(halves.address) == amount - int(split["staked"])
        assert net.chain.eth_balance(halves.address) == 0

        # the config setting, written by `rewards auto-stake`, applies without the flag
        env3 = node_env(tmp_path, configured, net, c.addr)
        config_file = tmp_path / "node.toml"
        config_file.write_text("# my node\nslots = 1\n")
        set_share = ok(
            await node(["rewards", "auto-stake", "0.5", "--config", str(config_file)], env3)
        )
        assert set_share == {"autoStakeShare": 0.5, "config": str(config_file)}
        assert config_file.read_text().startswith("# my node\nslots = 1\n")
        auto = ok(
            await node(
                ["rewards", "claim", "--relay", "--config", str(config_file), "--json"], env3
            )
        )
        staked = int(auto["staked"])
        assert staked == int(auto["claimed"]) * 5000 // 10_000 > 0
        assert net.d.staking.active_stake(configured.address) == staked

        # a file tampered on the coordinator is refused by a node that fetches it fresh
        epoch_file = publish_dir(c.config) / "epoch-000001.json"
        epoch_file.write_bytes(epoch_file.read_bytes().replace(b'"total":"', b'"total":"1'))
        fresh = dict(env, SOGNI_NODE_DATA_DIR=str(tmp_path / "fresh-node"))
        (tmp_path / "fresh-node").mkdir()
        (tmp_path / "fresh-node" / "wallet.json").write_bytes(
            (Path(env["SOGNI_NODE_DATA_DIR"]) / "wallet.json").read_bytes()
        )
        (tmp_path / "fresh-node" / "wallet.json").chmod(0o600)
        tampered = await node(["rewards"], fresh)
        assert tampered.exit_code == 3, tampered.output
        assert "epoch 1" in tampered.stderr and "total" in tampered.stderr


async def test_the_relayer_checks_before_it_spends_gas(anvil_net: Net, tmp_path: Path) -> None:
    net = anvil_net
    me = worker(24)
    async with coordinator(net, tmp_path) as c:
        close_epoch(net, c.config, [signed_receipt(me, net.domain)])
        tree = load_published(publish_dir(c.config))[-1].tree
        amount, proof = tree.proof_for(me.address)
        nonce = net.chain.w3.eth.get_transaction_count(net.settler.address)

        async def ask(claim: RelayClaim) -> Any:
            async with open_host(key_path=None, listen=()) as host:
                channel = await host.open_channel(c.addr, ids.RELAY_PROTOCOL)
                async with channel:
                    await channel.send_raw(encode(claim), limit=ids.RELAY_FRAME_LIMIT)
                    payload = await channel.receive_raw(limit=ids.RELAY_FRAME_LIMIT, timeout=30)
            return decode(payload)

        inflated = RelayClaim(account=me.address, cumulative_amount=str(amount + 1), proof=proof)
        answer = await ask(inflated)
        assert isinstance(answer, RelayRefused) and answer.code == "invalid_proof"
        unsigned = RelayClaim(
            account=me.address, cumulative_amount=str(amount), proof=proof, stake_bps=5000,
            deadline=net.chain.timestamp() + 600,
        )  # fmt: skip
        answer = await ask(unsigned)
        assert isinstance(answer, RelayRefused) and answer.code == "bad_authorization"
        forged = RelayClaim(
            account=me.address, cumulative_amount=str(amount), proof=proof, stake_bps=5000,
            deadline=unsigned.deadline, signature=net.d.distributor.sign_stake_authorization(
                worker(25), amount, 5000, unsigned.deadline
            ),
        )  # fmt: skip
        answer = await ask(forged)
        assert isinstance(answer, RelayRefused) and answer.code == "bad_authorization"

        # the same refusal over HTTP
        body = json.dumps(
            {"account": me.address, "cumulativeAmount": str(amount + 1),
             "proof": ["0x" + p.hex() for p in proof]}
        ).encode()  # fmt: skip
        status, reply = await trio.to_thread.run_sync(_post, c.running.http_url, body)
        assert status == 422 and reply["error"] == "invalid_proof"
        # 64 KiB of nesting: refused, not a crash (an untyped decode overflows the C stack)
        status, reply = await trio.to_thread.run_sync(_post, c.running.http_url, b"[" * 65_000)
        assert status == 400 and "deeper" in reply["reason"]
        assert net.chain.w3.eth.get_transaction_count(net.settler.address) == nonce  # no tx
        assert net.d.token.balance_of(me.address) == 0

        # a good claim through the node's relay client, over HTTP
        good = RelayClaim(account=me.address, cumulative_amount=str(amount), proof=proof)
        via, done = await relay_claim([c.running.http_url or ""], good)
        assert via == c.running.http_url and done.amount == str(amount) and done.epoch == 1
        assert net.d.token.balance_of(me.address) == amount
        with pytest.raises(RelayFailed) as again:  # the junk above used none of its attempts
            await relay_claim([c.addr], good)
        assert again.value.code == "nothing_to_claim"
        assert net.chain.w3.eth.get_transaction_count(net.settler.address) == nonce + 1


def _post(base: str | None, body: bytes) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{base}/relay/claim", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_claims_use_the_newest_matured_root(net: Net, store: Store, tmp_path: Path) -> None:
    """With a claim delay, the proof comes from the matured epoch, not the latest file."""
    me = worker(26)
    net.d.distributor.set_claim_delay(3600, sender=net.treasury)
    s = settler(store, net, tmp_path)
    store_receipts(store, [signed_receipt(me, net.domain)])
    assert s.close_epoch() is not None
    with pytest.raises(NotMatured, match="claims open at"):
        plan_claim(net.d.distributor, me.address, load_published(tmp_path / "epochs"))
    net.chain.advance_time(3601)
    store_receipts(store, [signed_receipt(me, net.domain)])
    assert s.close_epoch() is not None
    epochs = load_published(tmp_path / "epochs")
    assert net.d.distributor.matured_epoch() == 1 and net.d.distributor.latest_epoch() == 2
    plan = plan_claim(net.d.distributor, me.address, epochs)
    assert plan is not None and plan.epoch == 1
    assert (
        plan.cumulative
        == epochs[0].tree.amount_of(me.address)
        < epochs[1].tree.amount_of(me.address)
    )

    relay = ClaimRelay(net.d.distributor, net.settler)
    latest_amount, latest_proof = epochs[1].tree.proof_for(me.address)
    with pytest.raises(RelayRefusal) as refused:
        await relay.relay(
            RelayClaim(account=me.address, cumulative_amount=str(latest_amount), proof=latest_proof)
        )
    assert refused.value.code == "invalid_proof" and "epoch 1" in refused.value.reason
    done = await relay.relay(
        RelayClaim(account=me.address, cumulative_amount=str(plan.cumulative), proof=plan.proof)
    )
    assert done.epoch == 1 and int(done.amount) == plan.cumulative
    assert net.d.token.balance_of(me.address) == plan.cumulative
    # per-sender rate limit: a burst of junk is refused before any chain read, and junk
    # naming an account never uses up that account's attempts (a lock-out from the relay)
    limited = ClaimRelay(net.d.distributor, net.settler, attempts=1)
    junk = RelayClaim(account=me.address, cumulative_amount="1", proof=[])
    for _ in range(SENDER_FACTOR):
        with pytest.raises(RelayRefusal) as bad:
            await limited.relay(junk, sender="stranger")
        assert bad.value.code == "invalid_proof"
    with pytest.raises(RelayRefusal) as burst:
        await limited.relay(junk, sender="stranger")
    assert burst.value.code == "rate_limited" and "from you" in burst.value.reason
    real = RelayClaim(account=me.address, cumulative_amount=str(plan.cumulative), proof=plan.proof)
    with pytest.raises(RelayRefusal) as claimed:  # the victim's own claim is still heard
        await limited.relay(real, sender="me")
    assert claimed.value.code == "nothing_to_claim"  # (it claimed above)
    with pytest.raises(RelayRefusal) as again:  # a real leaf counts against its account
        await limited.relay(real, sender="someone")
    assert again.value.code == "rate_limited" and me.address in again.value.reason
    with pytest.raises(ChainRevert):  # what the relayer refuses, the contract would revert
        net.d.distributor.claim(me.address, latest_amount, latest_proof, sender=net.settler)

    # junk claims naming fresh accounts each (the rate limit is per account): once the root
    # was read, their proofs are checked against it before any chain read
    reads: list[str] = []
    d = net.d.distributor

    def counted(name: str, real: Any) -> Any:
        def read(*args: object) -> object:
            reads.append(name)
            return real(*args)

        return read

    for name in ("paused", "matured_epoch", "root_of"):
        setattr(d, name, counted(name, getattr(d, name)))
    try:
        for i in range(5):
            junk = RelayClaim(account=worker(100 + i).address, cumulative_amount="7", proof=[])
            with pytest.raises(RelayRefusal) as bad:
                await relay.relay(junk)
            assert bad.value.code == "invalid_proof"
    finally:
        for name in ("paused", "matured_epoch", "root_of"):
            delattr(d, name)
    assert reads == []


async def test_the_relay_refuses_more_claims_than_it_lets_wait(net: Net) -> None:
    """Every claim waited for the one chain slot, with no bound: junk naming new accounts
    queued up ahead of honest claims. Past `MAX_WAITING`, a claim is refused `busy` at once."""
    relay = ClaimRelay(net.d.distributor, net.settler, attempts=1)
    relay._in_flight.update(f"0x{i:040x}" for i in range(MAX_WAITING))  # claims in flight
    honest = RelayClaim(account=worker(99).address, cumulative_amount="1", proof=[])
    for _ in range(3):  # told to retry, retried: never its own attempts used up for it
        with pytest.raises(RelayRefusal) as busy:
            await relay.relay(honest)
        assert busy.value.code == "busy"


async def test_the_relayer_pays_no_gas_for_a_strangers_dust(anvil_net: Net, tmp_path: Path) -> None:
    """Anyone may ask to relay anyone's claim (the proofs are public): a claim adding less
    than `relay_min_claim` is refused ("below_minimum", naming both amounts and the way out)
    and no transaction leaves the relayer's key; the same claim is relayed by a coordinator
    whose floor it meets."""
    net = anvil_net
    me = worker(41)
    receipts = [signed_receipt(me, net.domain)]
    probe = tmp_path / "probe"
    async with coordinator(net, probe) as c:
        close_epoch(net, c.config, receipts)
        amount, proof = load_published(publish_dir(c.config))[-1].tree.proof_for(me.address)
    dust = RelayClaim(account=me.address, cumulative_amount=str(amount), proof=proof)
    nonce = net.chain.w3.eth.get_transaction_count(net.settler.address)
    async with coordinator(net, probe, relay_min_claim=amount + 1) as c:
        with pytest.raises(RelayFailed) as refused:
            await relay_claim([c.addr], dust)
    assert refused.value.code == "below_minimum"
    assert str(amount) in refused.value.reason and "own ETH" in refused.value.reason
    assert net.chain.w3.eth.get_transaction_count(net.settler.address) == nonce  # no gas spent
    assert net.d.token.balance_of(me.address) == 0
    async with coordinator(net, probe, relay_min_claim=amount) as c:
        _, done = await relay_claim([c.addr], dust)
    assert done.amount == str(amount) and net.d.token.balance_of(me.address) == amount
