"""With Disputes deployed, the offline slash flow (settlement/slashes.py) proposes on
Disputes, never slashes Staking directly, and the stake moves only after the window."""

from __future__ import annotations

from pathlib import Path

import pytest

from sogni_chain import ChainRevert
from sogni_coordinator.settlement import slashes
from sogni_coordinator.store import Store

from .dispute_env import SOGNI, Env


def test_slash_goes_through_the_dispute_window(env: Env, tmp_path: Path) -> None:
    store = Store(tmp_path / "coordinator.db")
    worker = env.worker.address
    # the settlement key cannot slash Staking directly: only Disputes holds the role
    with pytest.raises(ChainRevert, match="NotSlasher"):
        env.d.staking.slash(worker, SOGNI, "x", sender=env.settlement)
    pid = store.propose_slash(worker, "5 failed result checks", [b"\x07" * 32])
    assert pid is not None
    assert slashes.can_slash(env.d, env.settlement.address)
    assert not slashes.can_slash(env.d, env.outsider.address)
    prepared = slashes.prepare(store, env.d, pid, env.settlement.address, tmp_path, share_bps=5_000)
    assert prepared.path is not None and prepared.amount == 500 * SOGNI
    import json

    unsigned = json.loads(prepared.path.read_text())
    assert unsigned["disputes"] == env.disputes.address
    assert unsigned["tx"]["to"] == env.disputes.address
    # a file re-pointed at Staking's slash (same binding) is refused before signing
    edited = dict(unsigned, disputes=None, evidence=None)
    with pytest.raises(slashes.SlashError, match="not the slash the file describes"):
        slashes.sign_offline(edited, bytes(env.settlement.key))
    signed = slashes.sign_offline(unsigned, bytes(env.settlement.key))
    done = slashes.submit(store, env.d, signed, tmp_path)
    assert done.slashed == 0 and done.case_id is not None
    (proposal,) = store.slash_proposals()
    assert proposal.state == "submitted" and done.case_id in proposal.note
    assert env.d.staking.active_stake(worker) == 1_000 * SOGNI  # nothing taken yet
    case_id = bytes.fromhex(done.case_id[2:])
    with pytest.raises(ChainRevert, match="WindowOpen"):
        env.disputes.execute_slash(case_id, sender=env.outsider)
    env.chain.advance_time(env.disputes.params().dispute_window)
    env.disputes.execute_slash(case_id, sender=env.outsider)
    assert env.d.staking.active_stake(worker) == 500 * SOGNI
    store.close()


def test_chain_deploy_with_disputes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`chain deploy --disputes`: Disputes slashes, the settlement key proposes, the offer key
    signs refusals and never slashes."""
    import json

    from typer.testing import CliRunner

    from sogni_chain import Addresses, Deployment, connect
    from sogni_coordinator import chain_cli
    from sogni_coordinator.cli import app as coordinator_app
    from sogni_wallet.keystore import create_keystore

    chain = connect(accounts=3)
    monkeypatch.setattr(chain_cli, "_connect", lambda url: chain)
    offer = create_keystore(tmp_path / "signer.json", "pw", kdf_n=2)
    settlement = create_keystore(tmp_path / "settlement.json", "pw", kdf_n=2)
    env = {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_SETTLEMENT_KEYSTORE": str(tmp_path / "settlement.json"),
        "SOGNI_COORDINATOR_LOG_LEVEL": "warning",
    }
    result = CliRunner().invoke(coordinator_app, ["chain", "deploy", "--disputes"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["disputes"]
    d = Deployment(chain, Addresses.load(tmp_path / "addresses.json"))
    assert d.disputes is not None
    assert d.staking.has_role("SLASHER_ROLE", d.disputes.address)
    assert not d.staking.has_role("SLASHER_ROLE", settlement)
    assert d.disputes.has_role("SLASHER_ROLE", settlement)
    assert d.disputes.has_role("REPORTER_ROLE", offer)
    assert not d.disputes.has_role("SLASHER_ROLE", offer)
