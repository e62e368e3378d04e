"""Closing a season: its five boards' prizes as one airdrop epoch on the distributor.

Same two steps as a work epoch (`epochs.Settler`): plan (boards -> evidence file -> prizes on
top of the previous epoch's cumulative leaves -> epoch file, committed as the next epoch's
plan), then post, here with `postAirdropRoot` (AIRDROP_ROLE, once per season, growth capped
by the season's `airdropCap`). Idempotent: a season already planned is finished, one already
posted is returned as is; a season that has not ended is refused. The tree stays the one
cumulative tree, so a winner's prize and work pay are claimed together, with one proof.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from eth_utils import to_checksum_address

from sogni_chain import Deployment, Signer
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.seasons.prizes import season_inputs
from sogni_coordinator.seasons.stakers import StakeChange
from sogni_coordinator.settlement.epochs import (
    EpochConflict,
    EpochResult,
    SettlementBusy,
    SettlementError,
    Settler,
)
from sogni_coordinator.storage.session_lock import LockHeld, exclusive
from sogni_coordinator.store import EpochRecord, Store
from sogni_protocol import epoch_math
from sogni_protocol.airdrop import (
    AIRDROP_FORMAT,
    AirdropEvidence,
    airdrop_filename,
    airdrop_season,
    board_prizes,
    encode_evidence,
    prizes_by_account,
)
from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.catalog import SEASON_BOARDS, Season
from sogni_protocol.epoch_files import EPOCH_FORMAT, EpochFile, Payout, content_hash, decode_epoch
from sogni_protocol.epoch_files import encode as encode_file
from sogni_protocol.logs import get_logger
from sogni_protocol.merkle import MerkleTree
from sogni_protocol.payout_rules import PayoutRules

__all__ = ["AirdropResult", "SeasonCloser"]

log = get_logger(__name__)
WEI_PER_SOGNI = 10**18


@dataclass(frozen=True)
class AirdropResult:
    season: int
    epoch: EpochResult
    already: bool
    """True when the season had been closed before (nothing new was planned or posted)."""


class SeasonCloser:
    """Pays a season's prizes through `deployment`'s distributor; `sender` holds AIRDROP_ROLE."""

    def __init__(
        self,
        store: Store,
        deployment: Deployment,
        *,
        sender: Signer,
        rules: PayoutRules,
        publish_dir: str | Path,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ledger = ledger if ledger is not None else Ledger(store.path)
        self.deployment = deployment
        self.settler = Settler(
            store,
            deployment,
            sender=sender,
            rules=rules,
            publish_dir=publish_dir,
            ledger=self.ledger,
            read_stake=False,
            clock=clock,
        )
        self._clock = clock

    def close(self, season: Season, stakes: Sequence[StakeChange]) -> AirdropResult:
        """Plan (unless planned) and post `season`'s airdrop; `stakes`: the Staking contract's
        changes (the Stakers board). Under the same one-closer lock as work epochs."""
        try:
            with exclusive(self.store.location, "epoch-close"):
                return self._close(season, stakes)
        except LockHeld:
            raise SettlementBusy(
                "another coordinator of this network is closing an epoch; try again when it is done"
            ) from None

    def _close(self, season: Season, stakes: Sequence[StakeChange]) -> AirdropResult:
        end = season.end.timestamp()
        if self._clock() < end:
            raise SettlementError(
                f"season {season.number} ends at {season.end:%Y-%m-%d %H:%M} UTC: its prizes "
                "are paid only after it ends"
            )
        record = self.find(season.number)
        if record is not None:
            already = record.state == "posted"
            return AirdropResult(season.number, self.settler.post(record), already)
        onchain = self.deployment.distributor.airdrop_epoch_of(season.number)
        if onchain:
            raise EpochConflict(
                f"season {season.number}'s airdrop is epoch {onchain} on chain, but this "
                "database has no plan for it: restore the database"
            )
        pending = self.store.last_epoch_record(state="planned")
        if pending is not None:
            raise SettlementError(
                f"epoch {pending.epoch} is planned and not posted yet: finish it first "
                "(sogni-coordinator epoch close)"
            )
        record = self.plan(season, stakes)
        return AirdropResult(season.number, self.settler.post(record), False)

    def find(self, season: int) -> EpochRecord | None:
        """The epoch this database planned for `season`'s airdrop, if any."""
        for number, _state, _total, _paid, _refused in reversed(self.store.epoch_summaries()):
            record = self.store.epoch_record(number)
            assert record is not None
            if airdrop_season(decode_epoch(record.plan).receipts_file) == season:
                return record
        return None

    def plan(self, season: Season, stakes: Sequence[StakeChange]) -> EpochRecord:
        """Commit the airdrop epoch's plan and publish its evidence and epoch file."""
        settler = self.settler
        last = self.store.last_epoch_record()
        db_epoch = last.epoch if last is not None else 0
        if self.deployment.distributor.latest_epoch() > db_epoch:
            raise EpochConflict(
                f"the distributor has epochs past this database's {db_epoch}: restore it"
            )
        epoch = db_epoch + 1
        domain = settler.domain
        boards = season_inputs(self.ledger, season, stakes)
        evidence = AirdropEvidence(
            format=AIRDROP_FORMAT,
            season=season.number,
            start=int(season.start.timestamp()),
            end=int(season.end.timestamp()),
            epoch=epoch,
            chain_id=domain.chain_id,
            distributor=to_checksum_address(domain.verifying_contract),
            boards=[
                board_prizes(
                    b,
                    season.prize_pool(b) * WEI_PER_SOGNI,
                    {a.lower(): i for a, i in boards[b].by_account.items()},
                )
                for b in SEASON_BOARDS
            ],
        )
        won: dict[str, int] = {
            str(to_checksum_address(a)): v for a, v in prizes_by_account(evidence).items()
        }
        if not won:
            raise SettlementError(f"season {season.number} has no winners: nothing to pay")
        previous = dict(decode_epoch(last.plan).leaf_ints()) if last is not None else {}
        previous_total = sum(previous.values())
        leaves = epoch_math.cumulative_leaves(previous, won)
        total = sum(v for _, v in leaves)
        cap = self.deployment.distributor.airdrop_cap(season.number)
        if total - previous_total > cap:
            raise SettlementError(
                f"season {season.number}'s prizes add {total - previous_total} base units, over "
                f"its airdrop cap of {cap}: governance sets it (setAirdropCap)"
            )
        raw = encode_evidence(evidence)
        evidence_hash = content_hash(raw)
        name = airdrop_filename(season.number, evidence_hash)
        atomic_write_bytes(settler.publish_dir / name, raw)
        tree = MerkleTree(leaves)
        cumulative = dict(leaves)
        plan = EpochFile(
            format=EPOCH_FORMAT,
            epoch=epoch,
            chain_id=domain.chain_id,
            distributor=to_checksum_address(domain.verifying_contract),
            root=tree.root_hex,
            total=str(total),
            receipts_hash="0x" + evidence_hash.hex(),
            receipts_file=name,
            closed_at=int(self._clock()),
            previous_total=str(previous_total),
            stake_block=None,
            rules=settler.rules,
            payouts=[
                Payout(
                    account=a, amount=str(won[a]), cumulative_amount=str(cumulative[a]), receipts=0
                )
                for a in sorted(won)
            ],
            leaves=[(a, str(v)) for a, v in leaves],
        )
        try:
            self.store.save_epoch_plan(
                epoch,
                root=tree.root,
                total=total,
                receipts_hash=evidence_hash,
                plan=encode_file(plan),
                paid=[],
                refused=[],
                evidence=raw,
            )
        except sqlite3.IntegrityError as exc:
            raise EpochConflict(f"another closer planned epoch {epoch} first: {exc}") from None
        log.info(
            "airdrop_planned",
            season=season.number,
            epoch=epoch,
            winners=len(won),
            prizes=str(total - previous_total),
        )
        record = self.store.epoch_record(epoch)
        assert record is not None
        settler._publish(record, tree)
        return record
