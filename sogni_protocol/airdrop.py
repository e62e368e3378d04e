"""A season's prize airdrop: the evidence file, the points and prize arithmetic, and its audit.

At season end the five boards' prizes are paid as one epoch of the distributor's ordinary
numbering and cumulative tree (`postAirdropRoot`: its own role, once per season, capped by
governance per season). The epoch file is an ordinary `EpochFile`; where a work epoch names a
receipts batch, an airdrop names its evidence, ``airdrops/season-<N>/0x<keccak>.json``:
per board, per account, the inputs to the points (Spark micro-units, stake wei-seconds), the
points, and the prize. Anyone recomputes points from inputs, prizes from points (the board's
pool, top-200 cut or share of all), and the leaves on top of the epoch before.

What the evidence cannot prove is that the inputs are the ledger's and the chain's (docs/AUDIT.md).
Pure: integers and files, nothing outside ``sogni_protocol``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import msgspec

from sogni_protocol.catalog import SEASON_BOARDS
from sogni_protocol.epoch_files import receipts_filename

__all__ = [
    "AIRDROP_FORMAT",
    "BOARD_INPUTS",
    "PRIZE_CUT",
    "AirdropEvidence",
    "BoardPrizes",
    "PrizeRow",
    "airdrop_filename",
    "airdrop_season",
    "board_prizes",
    "decode_evidence",
    "encode_evidence",
    "evidence_problem",
    "points_of",
    "prizes",
    "prizes_by_account",
]

AIRDROP_FORMAT = "sogni-airdrop-v1"
TOP_CUT = 200
PRIZE_CUT: dict[str, int | None] = {
    "artists": TOP_CUT,
    "ambassadors": None,
    "stakers": None,
    "workers-relaxed": TOP_CUT,
    "workers-fast": TOP_CUT,
}
"""Only ranks 1..cut share a board's pool; None: every account with points, by share."""
WEI_PER_MICRO_SOGNI = 10**12
DAY = 86_400
SECOND_LEVEL_TENTHS = 2
"""Ambassadors: 0.2 points per Spark bought by a second-level referral."""


def _artists(i: Mapping[str, int]) -> int:
    return i["freeSpark"] + 10 * (i["paidSpark"] + i["sogniSpark"])


def _workers(i: Mapping[str, int]) -> int:
    return i["paidSpark"] + i["sogniSpark"] + i["freeSpark"] // 10


def _ambassadors(i: Mapping[str, int]) -> int:
    return i["ownSpark"] + i["referredSpark"] + i["secondLevelSpark"] * SECOND_LEVEL_TENTHS // 10


def _stakers(i: Mapping[str, int]) -> int:
    return i["stakeWeiSeconds"] // WEI_PER_MICRO_SOGNI // DAY


BOARD_INPUTS: dict[str, tuple[str, ...]] = {
    "artists": ("freeSpark", "paidSpark", "sogniSpark"),
    "ambassadors": ("ownSpark", "referredSpark", "secondLevelSpark"),
    "stakers": ("stakeWeiSeconds",),
    "workers-relaxed": ("freeSpark", "paidSpark", "sogniSpark"),
    "workers-fast": ("freeSpark", "paidSpark", "sogniSpark"),
}
"""Each board's per-account inputs (Spark amounts in micro-Spark; stake in wei x seconds)."""
_POINTS: dict[str, Callable[[Mapping[str, int]], int]] = {
    "artists": _artists,
    "ambassadors": _ambassadors,
    "stakers": _stakers,
    "workers-relaxed": _workers,
    "workers-fast": _workers,
}
assert set(_POINTS) == set(BOARD_INPUTS) == set(PRIZE_CUT) == set(SEASON_BOARDS)


def points_of(board: str, inputs: Mapping[str, int]) -> int:
    """Micro-points of one account on `board` from its inputs (ValueError: wrong names)."""
    if set(inputs) != set(BOARD_INPUTS[board]):
        raise ValueError(f"{board} inputs are {sorted(BOARD_INPUTS[board])}, not {sorted(inputs)}")
    if any(v < 0 for v in inputs.values()):
        raise ValueError(f"{board} inputs must not be negative")
    return _POINTS[board](inputs)


def prizes(pool_wei: int, cut: int | None, points: Mapping[str, int]) -> dict[str, int]:
    """Account -> prize: ranked by points (ties: by address), the top `cut` (None: all with
    points) share `pool_wei` in proportion to points, rounded down (dust stays unpaid)."""
    ordered = sorted((a for a, p in points.items() if p > 0), key=lambda a: (-points[a], a))
    paid = ordered if cut is None else ordered[:cut]
    total = sum(points[a] for a in paid)
    return {a: pool_wei * points[a] // total for a in paid} if total else {}


class PrizeRow(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """One account on one board: its inputs, its points and its prize (decimal strings)."""

    account: str
    inputs: dict[str, str]
    points_micro: str
    prize_wei: str


class BoardPrizes(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    board: str
    pool_wei: str
    cut: int | None
    rows: list[PrizeRow]
    """Every account with points, by rank."""


class AirdropEvidence(msgspec.Struct, kw_only=True, frozen=True, rename="camel"):
    """What an airdrop epoch pays and why (content-addressed, like a receipts batch)."""

    format: str
    season: int
    start: int
    end: int
    """The season's UTC range [start, end) in unix seconds."""
    epoch: int
    chain_id: int
    distributor: str
    boards: list[BoardPrizes]


def board_prizes(board: str, pool_wei: int, inputs: Mapping[str, Mapping[str, int]]) -> BoardPrizes:
    """A board's evidence from each account's inputs (accounts as the leaves will name them)."""
    cut = PRIZE_CUT[board]
    points = {a: points_of(board, i) for a, i in inputs.items()}
    won = prizes(pool_wei, cut, points)
    ordered = sorted((a for a, p in points.items() if p > 0), key=lambda a: (-points[a], a))
    rows = [
        PrizeRow(
            account=a,
            inputs={k: str(v) for k, v in sorted(inputs[a].items())},
            points_micro=str(points[a]),
            prize_wei=str(won.get(a, 0)),
        )
        for a in ordered
    ]
    return BoardPrizes(board=board, pool_wei=str(pool_wei), cut=cut, rows=rows)


def prizes_by_account(evidence: AirdropEvidence) -> dict[str, int]:
    """Account -> its prizes over all boards (accounts with none left out)."""
    out: dict[str, int] = {}
    for b in evidence.boards:
        for r in b.rows:
            if int(r.prize_wei):
                out[r.account] = out.get(r.account, 0) + int(r.prize_wei)
    return out


def evidence_problem(ev: AirdropEvidence) -> str | None:
    """Why the evidence's points or prizes are not what its inputs give, or None.

    Checked: the format, every board once, its cut, each row's points from its inputs, the
    ranking, and each prize from the points and the pool."""
    if ev.format != AIRDROP_FORMAT:
        return f"unknown airdrop format {ev.format!r}"
    if ev.season <= 0 or ev.end <= ev.start:
        return f"season {ev.season} from {ev.start} to {ev.end} is not a season"
    names = [b.board for b in ev.boards]
    if sorted(names) != sorted(SEASON_BOARDS) or len(set(names)) != len(names):
        return f"boards are {names}, expected each of {list(SEASON_BOARDS)} once"
    for b in ev.boards:
        if b.cut != PRIZE_CUT[b.board]:
            return f"{b.board}: cut is {b.cut}, the board pays {PRIZE_CUT[b.board]}"
        accounts = [r.account for r in b.rows]
        if len(set(a.lower() for a in accounts)) != len(accounts):
            return f"{b.board}: an account is listed twice"
        try:
            inputs = {r.account: {k: int(v) for k, v in r.inputs.items()} for r in b.rows}
            want = board_prizes(b.board, int(b.pool_wei), inputs)
        except (ValueError, KeyError) as exc:
            return f"{b.board}: malformed: {' '.join(str(exc).split())}"
        if want.rows == b.rows:
            continue
        got_by = {r.account: r for r in b.rows}
        for w in want.rows:
            g = got_by.get(w.account)
            if g is None:  # pragma: no cover - same accounts in, same accounts out
                return f"{b.board}: account {w.account}: missing"
            if g.points_micro != w.points_micro:
                return (
                    f"{b.board}: account {w.account}: points are {g.points_micro}, its inputs "
                    f"give {w.points_micro}"
                )
            if g.prize_wei != w.prize_wei:
                return (
                    f"{b.board}: account {w.account}: prize is {g.prize_wei}, its points give "
                    f"{w.prize_wei}"
                )
        return f"{b.board}: rows are not listed by rank (points, then address), with points"
    return None


def encode_evidence(ev: AirdropEvidence) -> bytes:
    return msgspec.json.encode(ev, order="sorted")


def decode_evidence(data: bytes) -> AirdropEvidence:
    ev = msgspec.json.decode(data, type=AirdropEvidence)
    if ev.format != AIRDROP_FORMAT:
        raise ValueError(f"unknown airdrop evidence format {ev.format!r}")
    return ev


_AIRDROP_FILE = re.compile(r"^airdrops/season-([1-9]\d{0,8})/0x[0-9a-f]{64}\.json$")


def airdrop_filename(season: int, evidence_hash: bytes) -> str:
    """Where an airdrop's evidence is published, relative to the epochs folder."""
    return f"airdrops/season-{season}/0x{evidence_hash.hex()}.json"


def evidence_filename(receipts_file: str, digest: bytes) -> str:
    """Where an epoch's evidence hashing to `digest` is published: its season's airdrop
    folder when the epoch's `receiptsFile` names one, else `receipts/` (a receipts batch)."""
    season = airdrop_season(receipts_file)
    if season is not None:
        return airdrop_filename(season, digest)
    return f"receipts/{receipts_filename(digest)}"


def airdrop_season(receipts_file: str) -> int | None:
    """The season an epoch file's `receiptsFile` says it paid the prizes of; None: a work
    epoch (anything not exactly an airdrop evidence name)."""
    m = _AIRDROP_FILE.match(receipts_file)
    return int(m.group(1)) if m else None
