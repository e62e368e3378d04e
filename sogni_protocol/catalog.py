"""The model catalog: model classes with baseline render seconds, and economic constants.

Loaded from `configs/catalog.toml` (or `$SOGNI_CATALOG`); see docs/ECONOMICS.md. A model not
in the catalog is priced as the SDXL class, the whitepaper's reference.
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CATALOG = CONFIGS / "catalog.toml"
REFERENCE_CLASS = "sdxl"


class CatalogError(ValueError):
    """The catalog file is malformed."""


@dataclass(frozen=True)
class ModelEntry:
    """A model's pricing baseline: render seconds at its default steps and size."""

    model_id: str
    model_class: str
    baseline_render_seconds: float
    default_steps: int
    default_width: int
    default_height: int
    name: str = ""
    creator: str | None = None
    """The model creator's registered address (checksummed): the creator share of its jobs
    goes there (docs/ECONOMICS.md, "Model creators"); None: the share stays with the network."""

    @property
    def default_pixels(self) -> int:
        return self.default_width * self.default_height


SEASON_BOARDS = ("artists", "ambassadors", "stakers", "workers-relaxed", "workers-fast")
"""The season leaderboards (seed 003), by id."""
DEFAULT_SEASON_PRIZES: dict[str, int] = {
    "artists": 2_000_000,
    "ambassadors": 3_000_000,
    "stakers": 3_000_000,
    "workers-relaxed": 500_000,
    "workers-fast": 1_500_000,
}
"""Whole SOGNI per board: Season 7 of the leaderboard page (10,000,000 in all)."""


@dataclass(frozen=True)
class Season:
    """A leaderboard season: the UTC half-open range [start, end), with its prize pools."""

    number: int
    start: dt.datetime
    end: dt.datetime
    prizes: tuple[tuple[str, int], ...] = tuple(DEFAULT_SEASON_PRIZES.items())
    """(board id, whole SOGNI) for each board with a prize pool."""

    def prize_pool(self, board: str) -> int:
        """Whole SOGNI to be awarded on `board` this season (0: none)."""
        return dict(self.prizes).get(board, 0)


@dataclass(frozen=True)
class Catalog:
    """Model classes and models, plus `[economics]` and `[seasons]`."""

    classes: dict[str, ModelEntry]
    models: dict[str, ModelEntry]
    sogni_usd_price: float = 0.005
    relaxed_price_factor: float = 0.5
    daily_boost_spark: int = 50
    season_first_number: int = 1
    season_first_start: dt.date = dt.date(2024, 1, 1)
    season_length_days: int = 42
    fixed_seasons: dict[int, Season] = field(default_factory=dict)
    season_prizes: tuple[tuple[str, int], ...] = tuple(DEFAULT_SEASON_PRIZES.items())
    """`[seasons.prizes]`: each regular season's pools (a fixed season may set its own)."""

    def model(self, model_id: str) -> ModelEntry:
        """The model's entry; an unknown model is priced as the reference (SDXL) class."""
        if model_id in self.models:
            return self.models[model_id]
        ref = self.classes[REFERENCE_CLASS]
        return ModelEntry(
            model_id,
            REFERENCE_CLASS,
            ref.baseline_render_seconds,
            ref.default_steps,
            ref.default_width,
            ref.default_height,
        )

    def season(self, number: int) -> Season:
        """Season `number`: a fixed entry, else the regular `length_days` grid."""
        if number in self.fixed_seasons:
            return self.fixed_seasons[number]
        if number < self.season_first_number:
            raise CatalogError(f"season {number} precedes season {self.season_first_number}")
        first = dt.datetime.combine(self.season_first_start, dt.time(), dt.UTC)
        offset = (number - self.season_first_number) * self.season_length_days
        start = first + dt.timedelta(days=offset)
        end = start + dt.timedelta(days=self.season_length_days)
        return Season(number, start, end, self.season_prizes)

    def season_at(self, when: dt.datetime) -> Season:
        """The season containing `when` (fixed seasons first)."""
        for s in self.fixed_seasons.values():
            if s.start <= when < s.end:
                return s
        first = dt.datetime.combine(self.season_first_start, dt.time(), dt.UTC)
        n = (when - first).days // self.season_length_days
        return self.season(self.season_first_number + max(0, n))


_REFERENCE = ModelEntry(REFERENCE_CLASS, REFERENCE_CLASS, 43.2, 20, 1024, 1024)


def _date(value: Any, what: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise CatalogError(f"{what}: expected a date YYYY-MM-DD, got {value!r}") from None


def _prizes(raw: Any, what: str) -> tuple[tuple[str, int], ...]:
    """A `prizes` table: board id -> whole SOGNI (>= 0); boards left out get no pool."""
    if not isinstance(raw, dict):
        raise CatalogError(f"{what}: prizes must be a table of board = whole SOGNI")
    out = []
    for board, amount in raw.items():
        if board not in SEASON_BOARDS:
            raise CatalogError(f"{what}: unknown board {board!r}; expected {SEASON_BOARDS}")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
            raise CatalogError(f"{what}: prize pool of {board} must be whole SOGNI >= 0")
        out.append((str(board), amount))
    return tuple(out)


def _entry(model_id: str, cls: str, raw: dict[str, Any], base: ModelEntry | None) -> ModelEntry:
    def pick(key: str, kind: type) -> Any:
        if key in raw:
            value = raw[key]
        elif base is not None:
            value = getattr(base, key)
        else:
            raise CatalogError(f"{model_id}: missing {key}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok or float(value) <= 0:
            raise CatalogError(f"{model_id}: {key} must be a positive {kind.__name__}")
        return value

    return ModelEntry(
        model_id,
        cls,
        pick("baseline_render_seconds", float),
        pick("default_steps", int),
        pick("default_width", int),
        pick("default_height", int),
        str(raw.get("name", "")),
    )


def _creator(model_id: str, value: Any) -> str:
    """A model's `creator`: a non-zero 0x address (mixed case only with a valid checksum)."""
    from eth_utils import is_address, to_checksum_address

    if not (isinstance(value, str) and value.startswith("0x") and is_address(value)):
        raise CatalogError(f"{model_id}: creator must be a 0x address (40 hex digits, non-zero)")
    checksummed = str(to_checksum_address(value))
    mixed = value[2:] not in (value[2:].lower(), value[2:].upper())
    if int(value, 16) == 0 or (mixed and value != checksummed):
        raise CatalogError(
            f"{model_id}: creator must be a 0x address (40 hex digits, non-zero, a valid "
            "checksum if mixed case)"
        )
    return checksummed


def parse_catalog(data: dict[str, Any]) -> Catalog:
    """Build a `Catalog` from the parsed TOML tables."""
    classes = {name: _entry(name, name, raw, None) for name, raw in data.get("classes", {}).items()}
    classes.setdefault(REFERENCE_CLASS, _REFERENCE)
    models: dict[str, ModelEntry] = {}
    for model_id, raw in data.get("models", {}).items():
        cls = raw.get("class", REFERENCE_CLASS)
        if cls not in classes:
            raise CatalogError(f"{model_id}: unknown class {cls!r}")
        models[model_id] = _entry(model_id, cls, raw, classes[cls])
        if "creator" in raw:
            models[model_id] = replace(models[model_id], creator=_creator(model_id, raw["creator"]))
    econ = data.get("economics", {})
    seasons = data.get("seasons", {})
    default_prizes = _prizes(seasons.get("prizes", DEFAULT_SEASON_PRIZES), "seasons.prizes")
    fixed = {}
    for raw in seasons.get("fixed", []):
        n = int(raw["number"])
        start, end = _date(raw["start"], f"season {n}"), _date(raw["end"], f"season {n}")
        fixed[n] = Season(
            n,
            dt.datetime.combine(start, dt.time(), dt.UTC),
            dt.datetime.combine(end, dt.time(), dt.UTC),
            _prizes(raw["prizes"], f"season {n}") if "prizes" in raw else default_prizes,
        )
    catalog = Catalog(
        classes=classes,
        models=models,
        sogni_usd_price=float(econ.get("sogni_usd_price", 0.005)),
        relaxed_price_factor=float(econ.get("relaxed_price_factor", 0.5)),
        daily_boost_spark=int(econ.get("daily_boost_spark", 50)),
        season_first_number=int(seasons.get("first_number", 1)),
        season_first_start=_date(seasons.get("first_start", "2024-01-01"), "first_start"),
        season_length_days=int(seasons.get("length_days", 42)),
        fixed_seasons=fixed,
        season_prizes=default_prizes,
    )
    if catalog.sogni_usd_price <= 0 or not 0 < catalog.relaxed_price_factor <= 1:
        raise CatalogError("sogni_usd_price must be > 0 and relaxed_price_factor in (0, 1]")
    return catalog


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Read a catalog file: `path`, else `$SOGNI_CATALOG`, else `configs/catalog.toml`."""
    chosen = Path(path or os.environ.get("SOGNI_CATALOG") or DEFAULT_CATALOG).expanduser()
    if path is None and not chosen.exists():
        return parse_catalog({})
    with chosen.open("rb") as f:
        return parse_catalog(tomllib.load(f))


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    """The catalog at the default location, read once."""
    return load_catalog()
