"""A season's prizes as an airdrop epoch on the in-process chain: all five boards scored from a
real coordinator database and real stake events, planned, posted with AIRDROP_ROLE, audited
from the files and against the chain, claimed together with work pay; and every way to cheat
it refused (over the cap, twice, the wrong key, tampered evidence, a claim beyond the leaf)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from sogni_chain import ChainRevert
from sogni_coordinator.audit_cli import check_chain
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.stakers import stake_changes
from sogni_coordinator.settlement.airdrop import AirdropResult, SeasonCloser
from sogni_coordinator.settlement.epochs import SettlementError, epoch_claims
from sogni_coordinator.store import Store
from sogni_protocol.airdrop import decode_evidence, encode_evidence
from sogni_protocol.catalog import SEASON_BOARDS, Season
from sogni_protocol.epoch_audit import audit_folder, iter_published
from sogni_protocol.epoch_files import content_hash
from sogni_protocol.merkle import MerkleTree
from tests.settlement.settle_env import (
    PAYER,
    Net,
    rules,
    settler,
    signed_receipt,
    store_receipts,
    worker,
)

SOGNI = 10**18
FAST, RELAXED = worker(11), worker(12)
AMBASSADOR = "0x" + "ab" * 20
POOLS = {
    "artists": 200,
    "ambassadors": 300,
    "stakers": 300,
    "workers-relaxed": 50,
    "workers-fast": 150,
}
PRIZES = sum(POOLS.values()) * SOGNI


def _season(net: Net, number: int = 3, *, ends_in: float = 2.0) -> Season:
    """A season around now, on the wall clock (the ledger's) and the chain's (the stakes')."""
    wall, chain = time.time(), float(net.chain.timestamp())
    start = dt.datetime.fromtimestamp(min(wall, chain) - 3600, dt.UTC)
    end = dt.datetime.fromtimestamp(max(wall, chain) + ends_in, dt.UTC)
    return Season(number, start, end, tuple(POOLS.items()))


def _play_season(net: Net, store: Store) -> None:
    """Work on both tiers paid by PAYER (referred by AMBASSADOR), and a stake on chain."""
    ledger = Ledger(store.path)
    ledger.refer(PAYER, AMBASSADOR)
    ledger.close()
    store_receipts(
        store,
        [
            signed_receipt(FAST, net.domain),
            signed_receipt(FAST, net.domain),
            signed_receipt(RELAXED, net.domain, price_factor_bps=5_000),
        ],
    )
    staker = net.chain.accounts[3]
    net.d.token.transfer(staker, 1_000 * SOGNI, sender=net.treasury)
    net.d.token.approve(net.d.staking.address, 1_000 * SOGNI, sender=staker)
    net.d.staking.stake(1_000 * SOGNI, sender=staker)


def _closer(net: Net, store: Store, tmp: Path, season: Season) -> SeasonCloser:
    airdropper = net.chain.accounts[2]
    net.d.distributor.grant_role("AIRDROP_ROLE", airdropper, sender=net.treasury)
    net.d.distributor.set_airdrop_cap(season.number, PRIZES, sender=net.treasury)
    return SeasonCloser(
        store,
        net.d,
        sender=airdropper,
        rules=rules(),
        publish_dir=tmp / "epochs",
        clock=lambda: season.end.timestamp() + 1,
    )


def _close(net: Net, store: Store, tmp: Path, season: Season) -> AirdropResult:
    return _closer(net, store, tmp, season).close(season, stake_changes(net.d))


def _claim_of(store: Store, epoch: int, account: str) -> tuple[int, list[str]]:
    record = store.epoch_record(epoch)
    assert record is not None
    for c in epoch_claims(record)["claims"]:
        if c["account"].lower() == account.lower():
            return int(c["cumulativeAmount"]), c["proof"]
    raise AssertionError(f"{account} has no leaf")


def test_season_airdrop_pays_all_boards_audits_clean_and_claims(
    net: Net, store: Store, tmp_path: Path
) -> None:
    _play_season(net, store)
    work = settler(store, net, tmp_path).close_epoch()
    assert work is not None and work.epoch == 1
    season = _season(net)

    result = _close(net, store, tmp_path, season)
    assert (result.epoch.epoch, result.epoch.posted, result.already) == (2, True, False)
    assert net.d.distributor.airdrop_epoch_of(season.number) == 2
    assert net.d.distributor.airdrop_season_of(2) == season.number

    # the evidence holds every board, each paying its whole pool (one winner each here)
    ev = decode_evidence(next((tmp_path / "epochs" / "airdrops").rglob("0x*.json")).read_bytes())
    assert sorted(b.board for b in ev.boards) == sorted(SEASON_BOARDS)
    winners = {b.board: [r.account for r in b.rows] for b in ev.boards}
    assert winners["workers-fast"] == [FAST.address.lower()]
    assert winners["workers-relaxed"] == [RELAXED.address.lower()]
    assert winners["artists"] == [PAYER.lower()]
    assert sorted(winners["ambassadors"]) == sorted([PAYER.lower(), AMBASSADOR])
    assert winners["stakers"] == [net.chain.accounts[3].address.lower()]
    assert sum(int(r.prize_wei) for b in ev.boards for r in b.rows) == PRIZES

    # the whole folder recomputes, and matches the chain
    published = list(iter_published(tmp_path / "epochs"))
    assert [a.audit.problem for a in published] == [None, None]
    assert check_chain(published, net.d).problems == []

    class WorkOnly:  # a distributor that says epoch 2 was a work root: the kinds must agree
        def __init__(self, real: Any) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def airdrop_season_of(self, epoch: int) -> int:
            return 0

    lying = SimpleNamespace(distributor=WorkOnly(net.d.distributor), staking=net.d.staking)
    assert check_chain(published, lying).problems == [  # type: ignore[arg-type]
        "epoch 2: epoch-000002.json: it is season 3's airdrop, the distributor posted it as "
        "a work epoch"
    ]

    # the fast worker claims work pay and prize at once; its leaf is exactly their sum
    fast_work = work.payouts[FAST.address]
    amount, proof = _claim_of(store, 2, FAST.address)
    assert amount == fast_work + POOLS["workers-fast"] * SOGNI
    with pytest.raises(ChainRevert, match="InvalidProof"):  # a wei beyond the leaf
        net.d.distributor.claim(FAST.address, amount + 1, proof, sender=net.treasury)
    tx = net.d.distributor.claim(FAST.address, amount, proof, sender=net.treasury)
    assert tx.event("Claimed")["amount"] == amount
    assert net.d.token.balance_of(FAST.address) == amount

    # someone who won nothing cannot claim with a winner's proof
    loser = worker(99).address
    with pytest.raises(ChainRevert, match="InvalidProof"):
        net.d.distributor.claim(loser, amount, proof, sender=net.treasury)

    # the next work epoch builds on the airdrop's leaves and audits clean too
    store_receipts(store, [signed_receipt(FAST, net.domain)])
    nxt = settler(store, net, tmp_path).close_epoch()
    assert nxt is not None and nxt.epoch == 3
    after, _ = _claim_of(store, 3, FAST.address)
    assert after == amount + nxt.payouts[FAST.address]
    assert audit_folder(tmp_path / "epochs").problems == []


def test_close_is_idempotent_and_refused_before_the_season_ends(
    net: Net, store: Store, tmp_path: Path
) -> None:
    empty = _season(net, number=4)
    with pytest.raises(SettlementError, match="no winners"):  # nothing played yet
        _closer(net, store, tmp_path, empty).close(empty, [])
    _play_season(net, store)
    season = _season(net, ends_in=3600)
    closer = _closer(net, store, tmp_path, season)
    closer._clock = time.time  # the real now: before the end
    with pytest.raises(SettlementError, match="only after it ends"):
        closer.close(season, [])
    closer._clock = lambda: season.end.timestamp()
    first = closer.close(season, stake_changes(net.d))
    again = closer.close(season, stake_changes(net.d))
    assert again.already and again.epoch.epoch == first.epoch.epoch == 1
    assert net.d.distributor.latest_epoch() == 1


def test_over_cap_twice_and_wrong_key_are_refused(net: Net, store: Store, tmp_path: Path) -> None:
    _play_season(net, store)
    season = _season(net)
    closer = _closer(net, store, tmp_path, season)
    dist = net.d.distributor

    # over the season's cap: the closer refuses before planning anything ...
    dist.set_airdrop_cap(season.number, PRIZES - 1, sender=net.treasury)
    with pytest.raises(SettlementError, match="over its airdrop cap"):
        closer.close(season, stake_changes(net.d))
    assert store.last_epoch_record() is None
    # ... and the contract refuses such a root from the airdrop key anyway
    airdropper = net.chain.accounts[2]
    with pytest.raises(ChainRevert, match="AirdropCapExceeded"):
        dist.post_airdrop_root(
            1, season.number, b"\x01" * 32, PRIZES, b"\x02" * 32, sender=airdropper
        )
    # a season nobody capped gets nothing
    with pytest.raises(ChainRevert, match="AirdropCapExceeded"):
        dist.post_airdrop_root(1, 77, b"\x01" * 32, 1, b"\x02" * 32, sender=airdropper)
    # not even a root that adds nothing (it could move every unclaimed leaf elsewhere)
    with pytest.raises(ChainRevert, match="AirdropCapExceeded"):
        dist.post_airdrop_root(1, 77, b"\x01" * 32, 0, b"\x02" * 32, sender=airdropper)
    # the settlement key (work epochs) may not post an airdrop, nor the airdrop key a work root
    # (dev chains give the settlement key both roles for local networks: take it back here)
    assert dist.has_role("AIRDROP_ROLE", net.settler)
    dist.revoke_role("AIRDROP_ROLE", net.settler, sender=net.treasury)
    with pytest.raises(ChainRevert, match="AccessControl"):
        dist.post_airdrop_root(1, season.number, b"\x01" * 32, 1, b"\x02" * 32, sender=net.settler)
    with pytest.raises(ChainRevert, match="AccessControl"):
        dist.post_root(1, b"\x01" * 32, 1, b"\x02" * 32, sender=airdropper)
    # a work root's growth cap is not the airdrop's
    with pytest.raises(ChainRevert, match="AccessControl"):
        dist.set_airdrop_cap(season.number, 10**30, sender=airdropper)

    dist.set_airdrop_cap(season.number, PRIZES, sender=net.treasury)
    closer.close(season, stake_changes(net.d))
    # twice for one season: refused on chain, and the cap is frozen once it is paid
    with pytest.raises(ChainRevert, match="AirdropAlreadyPosted"):
        dist.post_airdrop_root(
            2, season.number, b"\x01" * 32, PRIZES + 1, b"\x02" * 32, sender=airdropper
        )
    with pytest.raises(ChainRevert, match="AirdropAlreadyPosted"):
        dist.set_airdrop_cap(season.number, 10**30, sender=net.treasury)


def test_audit_finds_tampered_evidence(net: Net, store: Store, tmp_path: Path) -> None:
    _play_season(net, store)
    season = _season(net)
    _close(net, store, tmp_path, season)
    folder = tmp_path / "epochs"
    path = next((folder / "airdrops").rglob("0x*.json"))
    raw = path.read_bytes()

    # a leaf above what the prizes give (root rebuilt to match): found, named
    epoch_path = folder / "epoch-000001.json"
    honest = epoch_path.read_bytes()
    doc = json.loads(honest)
    doc["leaves"] = [[a, str(int(v) + (a == FAST.address))] for a, v in doc["leaves"]]
    doc["root"] = MerkleTree([(a, int(v)) for a, v in doc["leaves"]]).root_hex
    doc["total"] = str(sum(int(v) for _, v in doc["leaves"]))
    epoch_path.write_text(json.dumps(doc))
    (folder / "epoch-000001.tree.json").unlink()
    problem = audit_folder(folder).first_problem or ""
    assert f"account {FAST.address}: leaf is " in problem and "the prizes give" in problem
    epoch_path.write_bytes(honest)

    # edited in place: the bytes no longer hash to the name (and the posted hash)
    path.write_bytes(raw.replace(b'"pointsMicro":"', b'"pointsMicro":"9', 1))
    assert "edited after publication" in (audit_folder(folder).first_problem or "")

    # re-published consistently (new hash, epoch file pointing at it): the points are wrong
    ev = decode_evidence(raw)
    board = next(b for b in ev.boards if b.board == "workers-fast")
    row = board.rows[0]
    forged_row = msgspec.structs.replace(row, inputs={**row.inputs, "paidSpark": "1"})
    forged_board = msgspec.structs.replace(board, rows=[forged_row])
    forged = msgspec.structs.replace(
        ev, boards=[forged_board if b is board else b for b in ev.boards]
    )
    data = encode_evidence(forged)
    h = content_hash(data)
    new = path.parent / f"0x{h.hex()}.json"
    new.write_bytes(data)
    path.write_bytes(raw)
    doc = json.loads(epoch_path.read_bytes())
    doc["receiptsHash"] = "0x" + h.hex()
    doc["receiptsFile"] = f"airdrops/season-{season.number}/0x{h.hex()}.json"
    epoch_path.write_text(json.dumps(doc))
    problem = audit_folder(folder).first_problem or ""
    assert "workers-fast" in problem and "its inputs give" in problem
    # and the chain holds the honest evidence's hash, not this one
    published = list(iter_published(folder))
    assert any("receiptsHash" in p for p in check_chain(published, net.d).problems)


async def test_nodes_fetch_the_epochs_after_a_season_airdrop(
    net: Net, store: Store, tmp_path: Path
) -> None:
    """A node fetches a folder holding an airdrop epoch over libp2p and HTTP: the index
    names the season's evidence (`airdrops/season-N/0x...json`), which is served, fetched
    and audited like a receipts batch. Before, the index named `receipts/<hash>.json`,
    which does not exist, and every node's fetch failed from the first season's end."""
    from sogni_node.epoch_fetch import fetch_epochs
    from tests.node_parts.test_epoch_fetch import _files, serving

    _play_season(net, store)
    assert settler(store, net, tmp_path).close_epoch() is not None
    _close(net, store, tmp_path, _season(net))
    published = tmp_path / "epochs"
    assert any(published.glob("airdrops/season-*/0x*.json"))
    async with serving(published) as (addr, url):
        by_p2p = await fetch_epochs([addr], tmp_path / "a")
        by_http = await fetch_epochs([url], tmp_path / "b")
    assert by_p2p.epochs == by_http.epochs == 2
    assert _files(by_p2p.path) == _files(published) == _files(by_http.path)
