"""Which settled jobs score on the Artists and Workers boards: no farming.

A job counts only when
- the ledger settled it within the season (its receipt was paid from the reservation),
- no epoch refused its receipt,
- its check, if it was sampled, passed (`skipped` does not: nobody checked the work), and
- its payer is not its worker: not the receipt's signing wallet, not its payout address, and
  not linked to either by a direct referral (one referred the other).
"""

from __future__ import annotations

from sogni_coordinator.ledger import Ledger, SeasonJob
from sogni_protocol.catalog import Season


def self_dealing(job: SeasonJob, referrals: dict[str, tuple[str, float]]) -> bool:
    """The payer pays itself: same wallet, its payout address, or referral-linked to either."""
    workers = {job.payee} | {w for w in (job.signer, job.payout) if w}
    if job.payer in workers:
        return True
    for w in workers:
        if referrals.get(w, ("",))[0] == job.payer or referrals.get(job.payer, ("",))[0] == w:
            return True
    return False


def counts(job: SeasonJob, referrals: dict[str, tuple[str, float]]) -> bool:
    """Whether `job` scores on the Artists and Workers boards."""
    if job.refused or job.check not in (None, "passed"):
        return False
    return not self_dealing(job, referrals)


def counted_jobs(ledger: Ledger, season: Season) -> list[SeasonJob]:
    """The season's settled jobs that score (see the module docstring)."""
    referrals = ledger.referrals()
    jobs = ledger.season_jobs(season.start.timestamp(), season.end.timestamp())
    return [j for j in jobs if counts(j, referrals)]
