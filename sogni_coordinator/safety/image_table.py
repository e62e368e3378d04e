"""The `[image]` table of the policy file, read and validated (no matching here).

Separate from `image_policy` so the config loader can validate the table at start without
importing the prompt matcher back (`content_policy` loads this module)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from sogni_coordinator.safety.detector import CLASSES
from sogni_protocol.catalog import CONFIGS

__all__ = ["ImageTable", "ImageTableError", "read_image_table"]

SHIPPED = CONFIGS / "content_policy.toml"
Term = Annotated[str, Meta(min_length=2, max_length=80)]


class ImageTableError(ValueError):
    """A bad `[image]` table; the message names the file and the key."""


class ImageTable(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    adult: dict[str, float]
    minors: dict[str, float]
    negative_clothing: Annotated[list[Term], Meta(max_length=5000)] = []


def read_image_table(path: Path) -> ImageTable:
    """The table of `path`; a file without one (older than the image check) gets the shipped
    table. Raises `ImageTableError` naming the file and the key."""
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8")).get("image")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ImageTableError(f"{where}: cannot read the content policy: {exc}") from None
    if raw is None:
        if path.resolve() != SHIPPED.resolve():
            return read_image_table(SHIPPED)
        raise ImageTableError(f"{where}: image: the [image] table is missing (docs/SAFETY.md)")
    try:
        table = msgspec.convert(raw, ImageTable)
    except msgspec.ValidationError as exc:
        text, _, at = str(exc).rpartition(" - at `")
        key = at.rstrip("`").removeprefix("$.").removeprefix("$") if text else ""
        raise ImageTableError(f"{where}: image{'.' + key if key else ''}: {text or exc}") from None
    for name, limits in (("adult", table.adult), ("minors", table.minors)):
        unknown = sorted(set(limits) - set(CLASSES))
        if unknown:
            raise ImageTableError(
                f"{where}: image.{name}: unknown class {unknown[0]!r} (one of {', '.join(CLASSES)})"
            )
        for label, limit in limits.items():
            if not 0.0 < limit <= 1.0:
                raise ImageTableError(f"{where}: image.{name}.{label}: a score above 0, at most 1")
    return table
