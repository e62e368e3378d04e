"""`sogni-node rewards [claim]` for a node whose receipts pay a payout address: it reports and
claims the payout account's rewards (relayed: the throwaway key has no ETH), refuses a stake
share it cannot sign for, and the signing key ends up holding nothing. Skipped without anvil."""

from __future__ import annotations

from pathlib import Path

import msgspec

from sogni_node.journal import Journal

from .settle_env import Net, signed_receipt, worker
from .test_claims_anywhere import anvil_net, close_epoch, coordinator, node, node_env, ok

__all__ = ["anvil_net"]  # the fixture, used by name

EPHEMERAL, PAYOUT = worker(31), worker(32)


async def test_rewards_and_a_relayed_claim_go_to_the_payout_address(
    anvil_net: Net, tmp_path: Path
) -> None:
    net = anvil_net
    mine = [signed_receipt(EPHEMERAL, net.domain, payout=PAYOUT.address) for _ in range(2)]
    async with coordinator(net, tmp_path) as c:
        close_epoch(net, c.config, mine)
        env = {**node_env(tmp_path, EPHEMERAL, net, c.addr)}
        env["SOGNI_NODE_PAYOUT_ADDRESS"] = PAYOUT.address.lower()
        with Journal(Path(env["SOGNI_NODE_DATA_DIR"]) / "journal.db") as journal:
            for receipt, signature, *_ in mine:
                # as the journal keeps it today: without the payout column (put back on read)
                journal.record_receipt(
                    msgspec.structs.replace(receipt, payout=None),
                    signature,
                    chain_id=net.domain.chain_id,
                    verifying_contract=net.domain.verifying_contract,
                )
                journal.mark_acked(receipt.job_id, True)

        report = ok(await node(["rewards", "--json"], env))
        assert report["account"] == PAYOUT.address
        assert report["ok"] and report["verifiedReceipts"] == 2, report
        assert report["claimable"] == report["earned"] != "0"

        staking = await node(["rewards", "claim", "--relay", "--stake-share", "0.5"], env)
        assert staking.exit_code == 2, staking.output
        assert "payout account" in staking.output and "Traceback" not in staking.output

        claimed = ok(await node(["rewards", "claim", "--relay", "--json"], env))
        assert claimed["account"] == PAYOUT.address and claimed["claimed"] == report["earned"]
    assert net.d.token.balance_of(PAYOUT.address) == int(report["earned"])
    assert net.d.token.balance_of(EPHEMERAL.address) == 0
    assert net.d.distributor.claimed(EPHEMERAL.address) == 0
