"""`sogni gov`: the verbs on the embedded chain (through GovClient, what the commands call),
and their one-line refusals."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sogni_app.cli import app
from sogni_app.governance_cli import GovClient, format_proposal
from sogni_chain.governance import DEV_SETTINGS
from sogni_protocol.cli_errors import BadUsage, Refused

from .gov_env import GovNet


def _client(g: GovNet, who: object) -> GovClient:
    return GovClient(g.chain, g.d.addresses, g.gov, who)  # type: ignore[arg-type]


def test_propose_vote_queue_execute_with_clear_refusals(gnet: GovNet) -> None:
    g = gnet
    alice, bob = (_client(g, s) for s in g.stakers[:2])
    outsider = _client(g, g.outsider)

    with pytest.raises(Refused, match="not enough votes to propose"):
        outsider.propose("cheaper", take_rates_bps=[2000, 1500, 1000, 500])
    with pytest.raises(BadUsage, match="nothing to propose"):
        alice.propose("nothing")

    p = alice.propose("cheaper work", take_rates_bps=[2000, 1500, 1000, 500])
    ident = str(p.proposal_id)[:8]  # a prefix is enough
    assert p.state == "Pending"
    with pytest.raises(Refused, match="has not started"):
        alice.vote(ident, "for")
    g.to_voting()
    with pytest.raises(Refused, match=r"cannot queue .* yet: voting ends at"):
        alice.queue(ident)
    assert alice.vote(ident, "for").votes_for > 0
    with pytest.raises(Refused, match="already voted"):
        alice.vote(ident, "against")
    with pytest.raises(Refused, match="not a staker at this proposal's snapshot"):
        outsider.vote(ident, "for")
    bob.vote(ident, "abstain", reason="no view")
    g.to_end_of_vote()
    with pytest.raises(Refused, match=r"voting on .* is closed: the proposal is Succeeded"):
        bob.vote(ident, "for")
    with pytest.raises(Refused, match="queue it first"):
        alice.execute(ident)
    queued = outsider.queue(ident)
    assert queued.state == "Queued"
    line = format_proposal(queued)
    assert "Queued" in line and "eta" in line and "abstain 100,000" in line
    with pytest.raises(Refused, match=r"too early to execute .* \(in \d+ s\)"):
        outsider.execute(ident)
    g.chain.advance_time(DEV_SETTINGS.timelock_delay + 2)
    assert outsider.execute(ident).state == "Executed"
    assert outsider.parameters()["take_rates_bps"] == [2000, 1500, 1000, 500]
    with pytest.raises(BadUsage, match="no proposal 1234"):
        outsider.find("1234")


def test_bad_input_is_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(
        app, ["gov", "propose", "--description", "x", "--take-rates", "20%,10%"]
    )
    assert result.exit_code == 2
    assert "--take-rates must be comma-separated whole bps" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["gov", "vote", "1234", "maybe"])
    assert result.exit_code == 2 and "for, against or abstain" in result.output


def test_no_chain_is_one_line_and_exit_4() -> None:
    result = CliRunner().invoke(app, ["gov", "list", "--rpc", "http://127.0.0.1:9"])
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output
