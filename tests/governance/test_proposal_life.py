"""A proposal's whole life on the embedded chain: stakers' votes change the take rate, the
timelock executes it, and the coordinator's next epoch settles with the new rate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from sogni_chain import ChainRevert, Deployment
from sogni_chain.governance import (
    DEV_SETTINGS,
    GovernanceAddresses,
    minter_action,
    parameter_actions,
)
from sogni_coordinator.network_params import NetworkParamsReader, network_params_for
from sogni_coordinator.settlement.epochs import Settler
from sogni_coordinator.store import Store
from sogni_coordinator.verification_config import VerificationConfig
from sogni_devnet.paid_work import signed_receipt, store_receipts, worker
from sogni_protocol.eip712 import Domain
from sogni_protocol.payout_rules import SOGNI, SettlementConfig

from .gov_env import GovNet


def _settler(store: Store, g: GovNet, tmp: Path, reader: NetworkParamsReader) -> Settler:
    return Settler(
        store,
        g.d,
        sender=g.settler,
        rules=SettlementConfig().rules(),
        publish_dir=tmp / "epochs",
        params=reader,
    )


def test_handover_leaves_the_timelock_in_charge(gnet: GovNet) -> None:
    g = gnet
    assert g.d.staking.default_admin() == g.gov.timelock
    assert g.d.distributor.default_admin() == g.gov.timelock
    assert g.params.owner() == g.gov.timelock
    tl = g.d.staking  # the deployer kept no role anywhere
    assert not tl.has_role("DEFAULT_ADMIN_ROLE", g.treasury)
    assert g.votes.get_votes(g.stakers[0]) == 100_000 * SOGNI  # a first stake self-delegates


def test_the_licence_is_governed_and_only_a_proposal_names_its_minter(gnet: GovNet) -> None:
    """The deployer kept the WorkerLicense's admin and MINTER_ROLE after the handover: one
    key could mint fast-tier licences, blacklist or burn anyone's, alone and at once."""
    g = gnet
    lic = g.d.license
    assert lic.default_admin() == g.gov.timelock
    assert not lic.has_role("DEFAULT_ADMIN_ROLE", g.treasury)
    assert not lic.has_role("MINTER_ROLE", g.treasury)
    with pytest.raises(ChainRevert, match="AccessControl"):
        lic.mint_batch([g.outsider], sender=g.treasury)
    with pytest.raises(ChainRevert, match="AccessControl"):
        lic.set_transfer_cooldown(0, sender=g.treasury)
    action = minter_action(g.chain, g.d.addresses, g.outsider.address)
    pid = g.governor.propose([action], "licence sales", sender=g.stakers[0])
    p = g.pass_and_queue(pid)
    g.chain.advance_time(DEV_SETTINGS.timelock_delay + 2)
    g.governor.execute(p)
    (token,) = lic.mint_batch([g.stakers[1]], sender=g.outsider)
    assert lic.owner_of(token) == g.stakers[1].address


def test_take_rate_proposal_from_vote_to_next_epoch(
    gnet: GovNet, store: Store, tmp_path: Path
) -> None:
    g = gnet
    me = worker(1)
    domain = Domain(g.d.addresses.chain_id, g.d.addresses.distributor)
    reader = NetworkParamsReader(g.params)
    settler = _settler(store, g, tmp_path, reader)

    # Epoch 1, before any vote: the config's tier-0 take (30 %) and creator share (5 %).
    store_receipts(store, [signed_receipt(me, domain)])
    first = settler.close_epoch()
    assert first is not None and first.payouts == {me.address: SOGNI * 65 // 100}

    pid = g.propose_take_rates([2000, 1500, 1000, 500])
    assert g.governor.state(pid) == "Pending"
    g.to_voting()
    assert g.governor.state(pid) == "Active"
    g.governor.cast_vote(pid, "for", sender=g.stakers[0])
    g.governor.cast_vote(pid, "against", sender=g.stakers[1])
    g.governor.cast_vote(pid, "for", reason="cheaper for workers", sender=g.stakers[2])
    p = g.governor.proposal(pid)
    assert (p.votes_for, p.votes_against, p.votes_abstain) == (200_000 * SOGNI, 100_000 * SOGNI, 0)
    g.to_end_of_vote()
    assert g.governor.state(pid) == "Succeeded"
    g.governor.queue(g.governor.proposal(pid))
    queued = g.governor.proposal(pid)
    assert queued.state == "Queued"
    assert queued.eta >= g.chain.timestamp() + DEV_SETTINGS.timelock_delay - 2

    # Executed, but the rules of an epoch are read at its close: nothing changes before.
    g.chain.advance_time(DEV_SETTINGS.timelock_delay + 2)
    g.governor.execute(queued)  # anyone (here the outsider) may execute a ripe proposal
    assert g.governor.state(pid) == "Executed"
    assert g.params.snapshot().take_rates_bps == [2000, 1500, 1000, 500]

    # Epoch 2: take 20 % at tier 0, so the worker keeps 75 %.
    store_receipts(store, [signed_receipt(me, domain)])
    second = settler.close_epoch()
    assert second is not None and second.payouts == {me.address: SOGNI * 75 // 100}
    assert settler.rules.take_rates_bps == [2000, 1500, 1000, 500]


def test_cooldown_and_claim_delay_move_only_through_a_proposal(gnet: GovNet) -> None:
    g = gnet
    actions = parameter_actions(
        g.chain,
        g.d.addresses,
        g.gov,
        unstake_cooldown=2 * 86_400,
        claim_delay=3_600,
        emission_budget_sogni=5_000,
        verification_rate_bps=500,
    )
    pid = g.governor.propose(actions, "windows", sender=g.stakers[0])
    p = g.pass_and_queue(pid)
    g.chain.advance_time(DEV_SETTINGS.timelock_delay + 2)
    g.governor.execute(p)
    assert g.votes.cooldown() == 2 * 86_400
    assert g.d.distributor.claim_delay() == 3_600
    snap = g.params.snapshot()
    assert (snap.emission_budget_sogni, snap.verification_rate_bps) == (5_000, 500)
    reader = NetworkParamsReader(g.params)
    rules = reader.rules_for_epoch(SettlementConfig().rules())
    assert rules.free_budget_wei == 5_000 * SOGNI
    assert reader.verification_rate(0.0) == 0.05
    checks = SimpleNamespace(policy=VerificationConfig(rate=0.2))  # what `Checks` exposes
    reader.follow_verification(checks)
    assert checks.policy.rate == 0.05


def test_no_governance_file_means_config_only(gnet: GovNet, tmp_path: Path) -> None:
    g = gnet
    assert network_params_for(g.chain, tmp_path / "addresses.json") is None
    g.gov.save(tmp_path / "addresses.governance.json")
    reader = network_params_for(g.chain, tmp_path / "addresses.json")
    assert reader is not None
    base = SettlementConfig(take_rates_bps=[2900, 2400, 1900, 1400]).rules()
    assert reader.rules_for_epoch(base) == base  # nothing governed yet: config stays
    assert reader.verification_rate(0.25) == 0.25


def test_governed_deploy_writes_its_file_beside_the_addresses(tmp_path: Path) -> None:
    """`python -m sogni_chain deploy --governed`'s path: the coordinator finds the file."""
    from sogni_chain import connect, deploy_all

    chain = connect()
    out = tmp_path / "addresses.json"
    addresses = deploy_all(chain, chain.accounts[0], path=out, governed=True)
    reader = network_params_for(chain, out)
    assert reader is not None and reader.read() is not None
    gov = GovernanceAddresses.load(tmp_path / "addresses.governance.json", chain_id=chain.chain_id)
    assert Deployment(chain, addresses).staking.default_admin() == gov.timelock
