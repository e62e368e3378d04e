"""A test season on the local network: a real coordinator and node on 127.0.0.1 rendering the
tiny diffusers model on both tiers for a payer who was referred, a stake on the in-process
chain, a work epoch, then the season's close. All five boards are produced (the Workers
boards with the node's hardware as its handshake advertised it), the airdrop epoch audits
clean from the files and against the chain, and claims pay the winners and nobody else."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account

from sogni_app.api import render
from sogni_chain import ChainRevert, connect
from sogni_coordinator.audit_cli import check_chain
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons import BOARDS, board_rows
from sogni_coordinator.seasons.stakers import stake_changes
from sogni_coordinator.settlement.airdrop import SeasonCloser
from sogni_coordinator.settlement.epochs import Settler, epoch_claims
from sogni_coordinator.store import Store
from sogni_node.journal import Journal
from sogni_node.rewards import audit, load_published
from sogni_protocol.catalog import Season
from sogni_protocol.epoch_audit import iter_published
from sogni_protocol.payout_rules import SOGNI, SettlementConfig
from tests.e2e.conftest import backend, registry, start_net, tiny_request  # noqa: F401
from tests.settlement.settle_env import Net, make_net

pytestmark = pytest.mark.filterwarnings("ignore")
POOLS = {"artists": 20, "ambassadors": 30, "stakers": 30, "workers-relaxed": 5, "workers-fast": 15}


def _setup_chain() -> tuple[Net, Any]:
    chain = connect()
    n = make_net("embedded", chain)
    staker = chain.accounts[3]
    n.d.token.transfer(staker, 500 * SOGNI, sender=n.treasury)
    n.d.token.approve(n.d.staking.address, 500 * SOGNI, sender=staker)
    n.d.staking.stake(500 * SOGNI, sender=staker)
    airdropper = chain.accounts[2]
    n.d.distributor.grant_role("AIRDROP_ROLE", airdropper, sender=n.treasury)
    n.d.distributor.set_airdrop_cap(1, sum(POOLS.values()) * SOGNI, sender=n.treasury)
    return n, airdropper


async def test_a_season_on_the_local_network(tmp_path: Path, backend: Any) -> None:  # noqa: F811
    chain_net, airdropper = await trio.to_thread.run_sync(_setup_chain)
    domain = chain_net.domain
    where: dict[str, Any] = {
        "chain_id": domain.chain_id,
        "verifying_contract": domain.verifying_contract,
    }
    payer, ambassador = Account.create(), Account.create()
    async with start_net(tmp_path, **where) as net:
        ledger = Ledger(net.config.database)
        try:
            ledger.refer(payer.address, ambassador.address)
            ledger.credit_purchase(payer.address, 1)
        finally:
            ledger.close()
        node = await net.add_node(backend, "worker", **where)
        with trio.fail_after(60):
            for request in (tiny_request(2), tiny_request(1, network="relaxed")):
                result = await render(net.addr, request, payer_key=bytes(payer.key), domain=domain)
                assert len(result.images) == request.number_of_images
        node.stop.set()
        with trio.fail_after(30):
            await node.done.wait()

    worker = node.wallet.address
    wall, chain_now = time.time(), float(chain_net.chain.timestamp())
    season = Season(
        1,
        dt.datetime.fromtimestamp(min(wall, chain_now) - 3600, dt.UTC),
        dt.datetime.fromtimestamp(max(wall, chain_now) + 1, dt.UTC),
        tuple(POOLS.items()),
    )
    stakes = await trio.to_thread.run_sync(stake_changes, chain_net.d)
    store = Store(net.config.database)
    ledger = Ledger(net.config.database)
    try:
        rows = {b: board_rows(ledger, b, season, stakes=stakes) for b in BOARDS}
        rules = SettlementConfig().rules(local=True)
        publish = tmp_path / "epochs"
        work = Settler(
            store, chain_net.d, sender=chain_net.settler, rules=rules, publish_dir=publish
        ).close_epoch()
        closer = SeasonCloser(
            store,
            chain_net.d,
            sender=airdropper,
            rules=rules,
            publish_dir=publish,
            clock=lambda: season.end.timestamp() + 1,
        )
        prizes = closer.close(season, stakes).epoch
        record = store.epoch_record(prizes.epoch)
        assert record is not None
        claims = {c["account"].lower(): c for c in epoch_claims(record)["claims"]}
    finally:
        ledger.close()
        store.close()

    # all five boards, with the right winners; the Workers boards show the node's hardware
    lower = worker.lower()
    assert [r.address for r in rows["workers-fast"]] == [lower]
    assert [r.address for r in rows["workers-relaxed"]] == [lower]
    assert rows["workers-fast"][0].hardware == "cpu"
    assert [r.address for r in rows["artists"]] == [payer.address.lower()]
    assert {r.address for r in rows["ambassadors"]} == {
        payer.address.lower(),
        ambassador.address.lower(),
    }
    assert [r.address for r in rows["stakers"]] == [chain_net.chain.accounts[3].address.lower()]
    assert all(r.days_active == 1 for b in ("artists", "workers-fast") for r in rows[b])

    # the airdrop epoch audits clean, from the files and against the chain
    assert work is not None and (work.epoch, prizes.epoch) == (1, 2)
    published = list(iter_published(publish))
    assert [a.audit.problem for a in published] == [None, None]
    assert check_chain(published, chain_net.d).problems == []

    # the worker claims its work pay and both workers' prizes with one proof ...
    want = work.payouts[worker] + (POOLS["workers-fast"] + POOLS["workers-relaxed"]) * SOGNI
    mine = claims[lower]
    assert int(mine["cumulativeAmount"]) == want
    dist = chain_net.d.distributor

    # the node's own rewards audit (journal vs published files vs chain) counts the prizes
    with Journal(tmp_path / "worker" / "journal.db") as journal:
        report = audit(worker, journal.receipts(), load_published(publish), distributor=dist)
    assert report.ok, report.problems
    assert report.verified == 3 and report.earned == want
    assert [e.earned for e in report.epochs] == [work.payouts[worker], want - work.payouts[worker]]

    def claim_all() -> None:
        dist.claim(worker, want, mine["proof"], sender=chain_net.treasury)
        for winner in (payer.address, ambassador.address):
            c = claims[winner.lower()]
            dist.claim(winner, int(c["cumulativeAmount"]), c["proof"], sender=chain_net.treasury)
        # ... and nobody else can: not a stranger with its proof, not the worker again
        with pytest.raises(ChainRevert, match="InvalidProof"):
            dist.claim(Account.create().address, want, mine["proof"], sender=chain_net.treasury)
        with pytest.raises(ChainRevert, match="NothingToClaim"):
            dist.claim(worker, want, mine["proof"], sender=chain_net.treasury)

    await trio.to_thread.run_sync(claim_all)
    assert chain_net.d.token.balance_of(worker) == want
    artists_prize = POOLS["artists"] * SOGNI
    assert chain_net.d.token.balance_of(payer.address) > artists_prize  # + its ambassador share
