"""The dispute test world: contracts and Disputes on the embedded chain, a worker and three
jurors staked (300, 200, 100 SOGNI), a reporter (coordinator) and a settlement key; the juror
cap raised to 50 % so that no one here is capped."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from sogni_chain import Chain, Deployment, connect, deploy_all
from sogni_chain.disputes import DEV_DISPUTE_PARAMS, Disputes
from sogni_protocol.messages import JobParams, Receipt

SOGNI = 10**18
STAKES = {"worker": 1_000, "j1": 300, "j2": 200, "j3": 100}


@dataclass
class Env:
    chain: Chain
    d: Deployment
    disputes: Disputes
    gov: LocalAccount
    treasury: LocalAccount
    settlement: LocalAccount
    reporter: LocalAccount
    worker: LocalAccount
    jurors: list[LocalAccount]
    outsider: LocalAccount

    def approve_bond(self, who: LocalAccount | None = None) -> None:
        self.d.token.approve(
            self.disputes.address, self.disputes.params().bond, sender=who or self.worker
        )


def refused_job(
    job_id: bytes, worker: str, coordinator: str, prompt: str
) -> tuple[Receipt, JobParams]:
    """A finished 4-step job of model ``m`` and the params it ran with: what a coordinator's
    refusal record (``Reporter.refused``) is built from."""
    receipt = Receipt(
        job_id=job_id,
        offer_hash=b"\x00" * 32,
        worker=worker,
        coordinator=coordinator,
        model_id="m",
        result_hash=b"\x00" * 32,
        steps_done=4,
        work_units=10,
        completed_at=1,
    )
    params = JobParams(
        model_id="m",
        positive_prompt=prompt,
        steps=4,
        guidance=4.0,
        width=64,
        height=64,
        seed=1,
    )
    return receipt, params


def make_env() -> Env:
    chain = connect(accounts=10)
    a = chain.accounts
    gov, settlement, reporter, worker, j1, j2, j3, outsider = (
        a[0],
        a[1],
        a[2],
        a[3],
        a[4],
        a[5],
        a[6],
        a[7],
    )
    addresses = deploy_all(
        chain, gov, coordinator=settlement, slasher=settlement, disputes=DEV_DISPUTE_PARAMS
    )
    d = Deployment(chain, addresses, gov)
    assert d.disputes is not None
    disputes = d.disputes
    disputes.grant_role("REPORTER_ROLE", reporter)
    # Cap a juror at 50 % of all votes (not the default 10 %): these jurors' weights stay
    # their stakes, so the tests read plainly; test_juror_cap.py tests the default cap.
    disputes.set_juror_cap(5_000, sender=gov)
    for who, amount in zip((worker, j1, j2, j3), STAKES.values(), strict=True):
        d.token.transfer(who.address, (amount + 100) * SOGNI)
        d.token.approve(addresses.staking, amount * SOGNI, sender=who)
        d.staking.stake(amount * SOGNI, sender=who)
    d.token.transfer(outsider.address, 100 * SOGNI)
    chain.advance_time(10)  # stakes lie before any snapshot taken from now on
    assert disputes.params() == DEV_DISPUTE_PARAMS
    return Env(chain, d, disputes, gov, gov, settlement, reporter, worker, [j1, j2, j3], outsider)
