"""A dispute on the local network: real nodes over libp2p on 127.0.0.1 (the tiny model), a
real coordinator service on a shared chain (anvil) with Disputes deployed.

A rogue worker commits to made-up latents; an honest node's re-run of the challenged step
catches it, and the coordinator signs the refusal. The rogue disputes it on chain; the
running coordinator's DisputeDesk re-runs the step on the nodes of two more wallets (never
the worker's, never the first verifier's), publishes the bundle at its HTTP URL and opens
the vote with its hash. A juror's client fetches the bundle there, checks the hash and reads
the real nodes' verdicts: both re-checks fail the rogue's step."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from sogni_app.api import render
from sogni_app.dispute_cli import JurorClient, SaltBox
from sogni_chain.anvil import Anvil
from sogni_chain.disputes import DEV_DISPUTE_PARAMS, CaseState, Refusal, open_dispute
from sogni_node.dispute_cli import pick_refusal
from sogni_protocol.ids import RESULT_FRAME_LIMIT
from sogni_protocol.messages import Challenge, ChallengeAnswer, VerifyRefused, VerifyStep
from tests.e2e import conftest as e2e
from tests.e2e.conftest import (
    deploy_for_coordinator,
    receive_skipping,
    rogue_node,
    start_net,
    tiny_request,
)
from tests.e2e.rogue_kit import EVERY, heartbeats, made_up_trajectory, rogue_result, wire

pytestmark = pytest.mark.filterwarnings("ignore")

SOGNI = 10**18
LATENTS = (1, 4, 16, 16)  # the tiny model's latent at 64 x 64
registry, backend, anvil = e2e.registry, e2e.backend, e2e.anvil  # tiny model, CPU, own anvil


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


async def test_a_dispute_is_rechecked_by_other_wallets_real_nodes(
    anvil: Anvil, tmp_path: Path, backend: Any
) -> None:
    path = tmp_path / "addresses.json"
    # signer: the coordinator's offer key, settles and signs refusals
    chain, treasury, signer, d = deploy_for_coordinator(
        anvil.url, path, disputes=DEV_DISPUTE_PARAMS
    )
    assert d.disputes is not None
    d.disputes.grant_role("REPORTER_ROLE", signer.address)
    async with (
        start_net(
            tmp_path,
            signer_key=bytes(signer.key),
            chain_url=anvil.url,
            addresses_file=path,
            verification=EVERY,
            chain_poll_seconds=0.2,
        ) as net,
        rogue_node(net) as (channel, acct),
        trio.open_nursery() as beats,
    ):
        beats.start_soon(heartbeats, channel)
        dispatcher = net.coordinator.dispatcher
        http = net.coordinator.http_url
        assert http is not None

        # the rogue is caught by the honest node's re-run and refused (as test_rogue_checks)
        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(render, net.addr, tiny_request(1, scheduler="euler"))
                committed = made_up_trajectory(3, seed=11, shape=LATENTS)
                job_id = await rogue_result(net, channel, acct, committed)
                challenge = await receive_skipping(channel, (Challenge,))
                honest = await net.add_node(backend, "honest", addresses_file=path)
                while len(dispatcher.nodes) < 2:
                    await trio.sleep(0.05)
                openings = [wire(committed, k) for k in challenge.steps]
                await channel.send(
                    ChallengeAnswer(job_id=job_id, openings=openings), limit=RESULT_FRAME_LIMIT
                )
                ask = await receive_skipping(
                    channel, (VerifyStep,), timeout=120, limit=RESULT_FRAME_LIMIT
                )
                await channel.send(VerifyRefused(check_id=ask.check_id, reason="no"))
        url = f"{http}/disputes/refusals/0x{job_id.hex()}"
        body = await trio.to_thread.run_sync(_get_json, url)
        mine = pick_refusal(body, "0x" + job_id.hex(), acct.address)
        assert "a red circle" not in json.dumps(body)

        # two more wallets' nodes join; the rogue disputes with its bond
        others = [await net.add_node(backend, n, addresses_file=path) for n in ("carol", "dave")]
        worker = chain.add_key(bytes(acct.key))
        chain.send_eth(worker.address, 10**18, sender=treasury)
        d.token.transfer(worker.address, 50 * SOGNI)
        refusal = Refusal.from_json(mine)
        open_dispute(d.disputes, d.token.address, worker=worker, refusal=refusal)

        # the running coordinator re-checks on carol's and dave's nodes, then opens the vote
        with trio.fail_after(90):
            while d.disputes.case(refusal.case_id).state is not CaseState.VOTING:
                await trio.sleep(0.1)
        case = d.disputes.case(refusal.case_id)
        juror = JurorClient(chain, d.disputes, SaltBox(tmp_path / "juror"), None)
        fetched = await trio.to_thread.run_sync(juror.bundle, case)
        assert fetched is not None
        uri, bundle = fetched
        assert uri == f"{http}/disputes/bundles/0x{refusal.case_id.hex()}"
        rechecks = bundle["rechecks"]
        # one per wallet not yet heard on this job: carol and dave (the worker and the
        # honest first verifier are never asked); each re-run fails the made-up step
        assert len(rechecks) == 2, rechecks
        assert {r["verifier"] for r in rechecks} == {"v1", "v2"}
        assert all(not r["passed"] for r in rechecks), rechecks
        assert all(r["distance"] > r["tolerance"] for r in rechecks)
        assert {r["step"] for r in rechecks} <= set(challenge.steps)
        text = json.dumps(bundle).lower()
        assert "a red circle" not in text
        assert text.count(acct.address.lower()) == 1  # only as the disputing worker
        for h in (honest, *others):  # verifiers are named v1, v2: their wallets stay hidden
            assert h.wallet.address.lower() not in text
        beats.cancel_scope.cancel()
