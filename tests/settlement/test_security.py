"""Coordinator-level security: who may post, what a claim must prove, which receipts are
accepted (the dispatcher's domain comes from the addresses file), and replays."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import trio
from PIL import Image

from sogni_chain import ChainRevert
from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.dispatch import Dispatcher, ResultRefused
from sogni_coordinator.jobs import NodeLink
from sogni_coordinator.settlement.epochs import SettlementError, Settler, epoch_claims
from sogni_coordinator.store import Store
from sogni_node.config import NodeConfig
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import (
    Capabilities,
    Message,
    Offer,
    Receipt,
    RenderMeta,
    RenderRequest,
    Result,
)
from sogni_protocol.settings import DEFAULT_CHAIN_ID, UNDEPLOYED_CONTRACT

from .settle_env import MODEL, Net, rules, settler, signed_receipt, store_receipts, worker


# --- posting and claiming ------------------------------------------------------------------
def test_only_the_settlement_role_posts(net: Net, store: Store, tmp_path: Path) -> None:
    store_receipts(store, [signed_receipt(worker(1), net.domain)])
    intruder = Settler(
        store, net.d, sender=net.treasury, rules=rules(), publish_dir=tmp_path / "epochs"
    )
    with pytest.raises(SettlementError, match="AccessControlUnauthorizedAccount"):
        intruder.close_epoch()
    assert net.d.distributor.root_of(1) is None
    result = settler(store, net, tmp_path).close_epoch()  # the real settler finishes the plan
    assert result is not None and result.resumed


def test_wrong_amount_or_proof_reverts(net: Net, store: Store, tmp_path: Path) -> None:
    a, b = worker(1), worker(2)
    store_receipts(store, [signed_receipt(a, net.domain), signed_receipt(b, net.domain)])
    assert settler(store, net, tmp_path).close_epoch() is not None
    claims = {c["account"]: c for c in epoch_claims(store.epoch_record(1))["claims"]}  # type: ignore[arg-type]
    ca, cb = claims[a.address], claims[b.address]
    dist = net.d.distributor
    for account, amount, proof in [
        (a.address, int(ca["cumulativeAmount"]) + 1, ca["proof"]),  # more than earned
        (a.address, int(ca["cumulativeAmount"]), cb["proof"]),  # someone else's proof
        (b.address, int(ca["cumulativeAmount"]), ca["proof"]),  # someone else's leaf
    ]:
        with pytest.raises(ChainRevert) as err:
            dist.claim(account, amount, proof, sender=net.treasury)
        assert err.value.error == "InvalidProof"
    assert dist.total_claimed() == 0


def test_replayed_receipt_is_not_paid_in_a_later_epoch(
    net: Net, store: Store, tmp_path: Path
) -> None:
    a = worker(1)
    original = signed_receipt(a, net.domain)
    store_receipts(store, [original])
    s = settler(store, net, tmp_path)
    first = s.close_epoch()
    assert first is not None and first.payouts == {a.address: 650_000_000_000_000_000}
    # the same receipt again: the store refuses it (one receipt per job) ...
    receipt, signature, *_ = original
    assert not store.store_receipt(receipt, signature, b"\x00" * 32)
    # ... and the next epoch pays only new work; the leaf grows by that alone
    store_receipts(store, [signed_receipt(a, net.domain)])
    second = s.close_epoch()
    assert second is not None and second.paid_receipts == 1
    assert second.payouts == first.payouts
    assert store.receipt_settlement(receipt.job_id) == (1, "paid", "")
    leaves = {c["account"]: c for c in epoch_claims(store.epoch_record(2))["claims"]}  # type: ignore[arg-type]
    assert int(leaves[a.address]["cumulativeAmount"]) == 2 * 650_000_000_000_000_000


# --- the receipt domain comes from the addresses file --------------------------------------
def _addresses_file(net: Net, tmp_path: Path) -> Path:
    path = tmp_path / "addresses.json"
    net.d.addresses.save(path)
    return path


def test_configs_take_the_domain_from_the_addresses_file(net: Net, tmp_path: Path) -> None:
    path = _addresses_file(net, tmp_path)
    for cls in (CoordinatorConfig, NodeConfig):
        cfg = cls(data_dir=tmp_path, addresses_file=path)  # type: ignore[call-arg]
        assert cfg.chain_id == net.d.addresses.chain_id == DEFAULT_CHAIN_ID
        assert cfg.verifying_contract == net.d.addresses.distributor != UNDEPLOYED_CONTRACT
        with pytest.raises(ValueError, match="contradicts"):
            cls(data_dir=tmp_path, addresses_file=path, chain_id=8453)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="contradicts"):
            cls(  # type: ignore[call-arg]
                data_dir=tmp_path, addresses_file=path, verifying_contract="0x" + "22" * 20
            )
        with pytest.raises(ValueError, match="not found"):
            cls(data_dir=tmp_path, addresses_file=tmp_path / "missing.json")  # type: ignore[call-arg]


async def _dispatcher_and_offer(
    cfg: CoordinatorConfig, store: Store, node_wallet: str
) -> tuple[Dispatcher, NodeLink, Offer]:
    """A dispatcher built as the service builds it, with one job offered to one node."""
    coordinator = worker(50)
    dispatcher = Dispatcher(
        store,
        signer_key=coordinator.key,
        signer_address=coordinator.address,
        domain=Domain(cfg.chain_id, cfg.verifying_contract),
    )
    send, receive = trio.open_memory_channel[Message](10)
    caps = Capabilities(
        peer_id="peer-1",
        wallet=node_wallet,
        expiry=0,
        models=[MODEL],
        slots=1,
        backend="test",
        device="cpu",
        max_pixels=0,
    )
    link = dispatcher.node_joined("peer-1", caps, send)
    request = RenderRequest(
        model_id=MODEL, positive_prompt="p", steps=8, guidance=4.0, width=64, height=64, seed=1
    )
    await dispatcher.submit(request, client_peer="client", allowed_models={MODEL})
    dispatcher.ready(link, 1)
    dispatcher.match()
    offer = receive.receive_nowait()
    assert isinstance(offer, Offer)
    return dispatcher, link, offer


def _result(key: object, domain: Domain, offer: Offer, dispatcher: Dispatcher) -> Result:
    buf = io.BytesIO()  # a real 64x64 PNG: the coordinator decodes every delivered image
    Image.new("RGB", (64, 64), (0, 90, 200)).save(buf, format="PNG")
    image = buf.getvalue()
    receipt = Receipt(
        job_id=offer.offer.job_id,
        offer_hash=eip712.offer_hash(dispatcher.domain, offer.offer),
        worker=key.address,  # type: ignore[attr-defined]
        coordinator=offer.offer.coordinator,
        model_id=offer.offer.model_id,
        result_hash=hashlib.sha256(image).digest(),
        steps_done=offer.offer.steps,
        work_units=offer.offer.work_units,
        completed_at=1_700_000_000,
    )
    return Result(
        job_id=receipt.job_id,
        image=image,
        receipt=receipt,
        signature=eip712.sign_receipt(key.key, domain, receipt),  # type: ignore[attr-defined]
        meta=RenderMeta(backend="test", device="cpu", dtype="fp32", threads=1),
    )


@pytest.mark.parametrize("wrong", ["chain", "distributor"])
async def test_dispatcher_refuses_receipts_for_another_chain_or_distributor(
    net: Net, store: Store, tmp_path: Path, wrong: str
) -> None:
    cfg = CoordinatorConfig(data_dir=tmp_path, addresses_file=_addresses_file(net, tmp_path))
    node = worker(7)
    dispatcher, link, offer = await _dispatcher_and_offer(cfg, store, node.address)
    assert dispatcher.domain == net.domain
    other = (
        Domain(net.domain.chain_id + 1, net.domain.verifying_contract)
        if wrong == "chain"
        else Domain(net.domain.chain_id, "0x" + "33" * 20)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.receipts.run)  # receipts are committed in groups
        with pytest.raises(ResultRefused, match="signature"):
            await dispatcher.accept_result(link, _result(node, other, offer, dispatcher))
        assert store.receipts() == []
        # the same receipt signed under the deployed distributor's domain is accepted, once
        good = _result(node, net.domain, offer, dispatcher)
        await dispatcher.accept_result(link, good)
        assert len(store.receipts()) == 1
        with pytest.raises(ResultRefused, match="already receipted"):
            await dispatcher.accept_result(link, good)
        nursery.cancel_scope.cancel()
