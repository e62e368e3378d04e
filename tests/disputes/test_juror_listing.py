"""What a juror's `sogni dispute show` says about a dispute's vote deadline: a stalled vote
names who may open it and until when, a vote missed names the default outcome, a vote the
worker opened is on the original evidence (no bundle to fetch), and a slash bundle lists the
failed checks it rests on."""

from __future__ import annotations

from dataclasses import replace

from eth_utils import to_checksum_address

from sogni_app.dispute_cli import JurorClient, case_dict, format_bundle, format_case
from sogni_chain.disputes import Case, CaseState

EVIDENCE = b"\x11" * 32
CASE = Case(
    case_id=b"\x01" * 32,
    worker=to_checksum_address("0x" + "22" * 20),
    kind="slash",
    state=CaseState.DISPUTED,
    window_end=1_000,
    evidence_deadline=2_000,
    commit_end=0,
    reveal_end=0,
    snapshot=999,
    evidence_hash=EVIDENCE,
    bundle_hash=bytes(32),
    bond=10**18,
    amount=10**21,
    for_worker=0,
    against_worker=0,
    reward_pool=0,
    vote_by=3_800,
)


def test_a_disputed_case_shows_its_vote_deadline_and_what_missing_it_means() -> None:
    assert "re-checking" in format_case(CASE, now=1_500)
    stalled = format_case(CASE, now=2_500, long=True)
    assert "may open it on the original evidence until 1970-01-01 01:03:20 UTC" in stalled
    assert "vote by   1970-01-01 01:03:20 UTC (else the case is upheld)" in stalled
    assert "upheld, anyone may resolve it" in format_case(CASE, now=3_800)
    assert case_dict(CASE)["voteBy"] == 3_800


def test_a_vote_the_worker_opened_has_no_bundle_to_fetch() -> None:
    opened = replace(CASE, state=CaseState.VOTING, bundle_hash=EVIDENCE, commit_end=5_000)
    assert "opened on the original evidence" in format_case(opened, now=4_000, long=True)

    class NoFetch(JurorClient):
        def __init__(self) -> None:  # no chain: bundle() must not reach for one
            pass

    assert NoFetch().bundle(opened) is None


def test_a_slash_bundle_lists_its_failed_checks() -> None:
    bundle = {
        "failures": [
            {"jobId": "0x" + "ab" * 32, "modelId": "sdxl", "steps": 20, "reason": "step 7 off"}
        ],
        "rechecks": [],
    }
    text = format_bundle("file:///b.json", bundle)
    assert "failed    job 0xabababababababab  sdxl  20 steps  step 7 off" in text
