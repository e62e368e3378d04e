"""Governance reaches a running coordinator: stakers pass a proposal that lowers the take rate
and the verification rate on a shared chain (anvil, JSON-RPC), and the coordinator service
(`run_coordinator`, its epoch timer and dispatcher) settles its next epoch at the new take
rate and re-checks at the new verification rate. Skipped when anvil is not installed."""

from __future__ import annotations

from pathlib import Path

import trio

from sogni_chain.anvil import Anvil
from sogni_chain.governance import (
    DEV_SETTINGS,
    GovernanceAddresses,
    Governor,
    NetworkParameters,
    governance_path,
    parameter_actions,
)
from sogni_coordinator.store import Store
from sogni_coordinator.verification_config import VerificationConfig
from sogni_devnet.paid_work import signed_receipt, store_receipts, worker
from sogni_protocol.epoch_files import decode_epoch
from sogni_protocol.payout_rules import SOGNI, SettlementConfig
from tests.e2e import conftest as e2e
from tests.e2e.conftest import deploy_for_coordinator, start_net

STAKE = 100_000 * SOGNI


anvil = e2e.anvil  # a fresh anvil for this module


async def _posted(store: Store, epoch: int) -> None:
    with trio.fail_after(30):
        while (r := store.last_epoch_record(state="posted")) is None or r.epoch < epoch:
            await trio.sleep(0.05)


async def test_a_passed_proposal_applies_at_the_running_coordinators_next_epoch(
    anvil: Anvil, tmp_path: Path
) -> None:
    path = tmp_path / "addresses.json"
    # signer: the coordinator's offer key, also its settlement key (local)
    chain, treasury, signer, d = deploy_for_coordinator(anvil.url, path, governed=True)
    stakers = chain.accounts[3:6]
    for s in stakers:
        d.token.transfer(s.address, STAKE)
        d.token.approve(d.addresses.staking, STAKE, sender=s)
        d.staking.stake(STAKE, sender=s)
    chain.advance_time(2)  # the stakes are checkpointed before the proposal's snapshot
    gov = GovernanceAddresses.load(governance_path(path), chain_id=chain.chain_id)
    governor = Governor(chain, gov.governor, treasury)
    async with start_net(
        tmp_path,
        signer_key=bytes(signer.key),
        chain_url=anvil.url,
        addresses_file=path,
        settlement=SettlementConfig(epoch_seconds=0.5),
        verification=VerificationConfig(rate=0.2),
    ) as net:
        dispatcher = net.coordinator.dispatcher
        store = dispatcher.store
        me = worker(1)

        # Epoch 1 under the config: take 30 %, creator 5 %: the worker keeps 65 %.
        store_receipts(store, [signed_receipt(me, net.domain)])
        await _posted(store, 1)
        first = store.epoch_record(1)
        assert first is not None
        assert decode_epoch(first.plan).payouts[0].amount == str(SOGNI * 65 // 100)
        assert dispatcher.checks.policy.rate == 0.2

        actions = parameter_actions(
            chain,
            d.addresses,
            gov,
            take_rates_bps=[2000, 1500, 1000, 500],
            verification_rate_bps=500,
        )
        pid = governor.propose(actions, "cheaper, fewer re-checks", sender=stakers[0])
        chain.advance_time(DEV_SETTINGS.voting_delay + 2)
        for s in stakers:
            governor.cast_vote(pid, "for", sender=s)
        chain.advance_time(DEV_SETTINGS.voting_period + 2)
        governor.queue(governor.proposal(pid))
        chain.advance_time(DEV_SETTINGS.timelock_delay + 2)
        governor.execute(governor.proposal(pid))
        assert NetworkParameters(chain, gov.parameters).snapshot().take_rates_bps == [
            2000,
            1500,
            1000,
            500,
        ]

        # Epoch 2, closed by the service's timer: take 20 %, so the worker keeps 75 %; the
        # dispatcher now re-checks 5 % of jobs.
        store_receipts(store, [signed_receipt(me, net.domain)])
        await _posted(store, 2)
        second = store.epoch_record(2)
        assert second is not None
        plan = decode_epoch(second.plan)
        assert plan.payouts[0].amount == str(SOGNI * 75 // 100)
        assert list(plan.rules.take_rates_bps) == [2000, 1500, 1000, 500]
        assert dispatcher.checks.policy.rate == 0.05
        assert d.distributor.root_of(2) == second.root
