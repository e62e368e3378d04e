"""The audit of an airdrop epoch (`sogni_protocol.airdrop`) from the published files.

Called by `epoch_audit` for an epoch whose `receiptsFile` names airdrop evidence: the evidence
must be the bytes its hash names, for this epoch, chain, distributor and season; its points and
prizes must follow from its inputs; and the epoch's leaves must be the previous epoch's plus
each winner's prizes (total, root, tree dump and payouts list too).
"""

from __future__ import annotations

import json
from pathlib import Path

from eth_utils import to_checksum_address

from sogni_protocol import epoch_math
from sogni_protocol.airdrop import (
    AirdropEvidence,
    airdrop_filename,
    decode_evidence,
    evidence_problem,
    prizes_by_account,
)
from sogni_protocol.epoch_files import EpochFile, Payout, content_hash, epoch_filename
from sogni_protocol.merkle import MerkleTree

__all__ = ["airdrop_problem", "read_evidence"]


def read_evidence(folder: Path, ef: EpochFile, season: int) -> AirdropEvidence | str:
    """The evidence `ef` names, or why it cannot be used."""
    try:
        digest = bytes.fromhex(ef.receipts_hash.removeprefix("0x"))
    except ValueError:
        digest = b""
    if len(digest) != 32:
        return f"receiptsHash {ef.receipts_hash} is not a 32-byte hash"
    name = airdrop_filename(season, digest)
    if ef.receipts_file != name:
        return f"receiptsFile is {ef.receipts_file}, its receiptsHash names {name}"
    try:
        raw = (folder / name).read_bytes()  # derived from the hash, never followed
    except OSError as exc:
        return f"airdrop evidence {name} cannot be read: {exc.strerror or exc}"
    if content_hash(raw) != digest:
        return (
            f"airdrop evidence {name}: its bytes hash to 0x{content_hash(raw).hex()}, not the "
            "receiptsHash its name gives (edited after publication)"
        )
    try:
        return decode_evidence(raw)
    except ValueError as exc:
        return f"airdrop evidence {name} is not valid: {' '.join(str(exc).split())}"


def airdrop_problem(
    folder: Path, ef: EpochFile, season: int, leaves: dict[str, int], total: int
) -> str | None:
    """Why airdrop epoch `ef` of `season` does not recompute on top of `leaves` and `total`
    (the epoch before's), or None."""
    where = epoch_filename(ef.epoch)
    ev = read_evidence(folder, ef, season)
    if isinstance(ev, str):
        return f"{where}: {ev}"
    src = f"airdrop evidence {ef.receipts_file}"
    if (ev.season, ev.epoch, ev.chain_id) != (season, ef.epoch, ef.chain_id) or (
        ev.distributor.lower() != ef.distributor.lower()
    ):
        return (
            f"{src} is for season {ev.season}, epoch {ev.epoch}, chain {ev.chain_id}, "
            f"distributor {ev.distributor}; {where} is season {season}'s epoch {ef.epoch} on "
            f"chain {ef.chain_id}, distributor {ef.distributor}"
        )
    why = evidence_problem(ev)
    if why is not None:
        return f"{src}: {why}"
    try:
        won: dict[str, int] = {
            str(to_checksum_address(a)): v for a, v in prizes_by_account(ev).items()
        }
        got = [(a, int(v)) for a, v in ef.leaves]
    except ValueError as exc:
        return f"{src}: malformed: {' '.join(str(exc).split())}"
    want = epoch_math.cumulative_leaves(leaves, won)
    if got != want:
        got_map = dict(got)
        for account, amount in want:
            if got_map.get(account) != amount:
                return (
                    f"{where}: account {account}: leaf is {got_map.get(account)}, the prizes "
                    f"give {amount} ({leaves.get(account, 0)} before + {won.get(account, 0)})"
                )
        return f"{where}: leaves that no prize or earlier epoch pays, or not sorted once each"
    if int(ef.previous_total) != total:
        return f"{where}: previousTotal is {ef.previous_total}, the epoch before's is {total}"
    if int(ef.total) != sum(v for _, v in want):
        return f"{where}: total is {ef.total}, the leaves sum to {sum(v for _, v in want)}"
    tree = MerkleTree(want)
    if ef.root.lower() != tree.root_hex:
        return f"{where}: root is {ef.root}, the leaves build {tree.root_hex}"
    dump = folder / epoch_filename(ef.epoch, "tree.json")
    if dump.exists() and json.loads(dump.read_bytes()) != tree.dump():
        return f"{dump.name} is not the tree of the epoch file's leaves"
    cumulative = dict(want)
    payouts = [
        Payout(account=a, amount=str(won[a]), cumulative_amount=str(cumulative[a]), receipts=0)
        for a in sorted(won)
    ]
    if ef.payouts != payouts:
        return f"{where}: the payouts list is not each winner's prizes"
    return None
