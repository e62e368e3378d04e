"""Installed LoRAs: one `.safetensors` file per id under `<models_dir>/loras`, with a sha256 index.

Why a library of its own: jobs name LoRAs by id (`JobParams.loras`), the node advertises the
ids it has, and a LoRA file is small and model-agnostic enough that it needs no class
detection or conversion, only the same promise the model store gives: what renders is what was
installed. Files are parsed at `add` (a LoHa or a checkpoint is refused there, not mid-job),
their sha256 recorded, and checked again before first use and whenever size or mtime change.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

from sogni_node.models.detect import check_model_id
from sogni_node.models.store import sha256_file, write_index
from sogni_node.render.backend import Lora
from sogni_protocol.ids import MAX_LORAS

INDEX_NAME = "index.json"
INDEX_VERSION = 1


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


class LoraLibraryError(ValueError):
    """Unknown id, duplicate id, unreadable or changed file, too many LoRAs in a job."""


class LoraRequest(Protocol):
    """What a job says about one LoRA (`sogni_protocol.messages.LoraRef` fits)."""

    @property
    def id(self) -> str: ...

    @property
    def strength(self) -> float: ...


@dataclass(frozen=True)
class StoredLora:
    lora_id: str
    file: str
    sha256: str
    size: int
    added_at: str


class LoraLibrary:
    """LoRAs installed under `models_dir/loras` (thread-safe: render threads resolve ids)."""

    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir) / "loras"
        self._checked: dict[str, tuple[int, int]] = {}
        """id -> (size, mtime_ns) at its last successful sha256 check."""
        self._lock = threading.Lock()

    # --- index -----------------------------------------------------------------------------

    def _load(self) -> dict[str, StoredLora]:
        path = self.root / INDEX_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise LoraLibraryError(f"LoRA index {path} is corrupt: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != INDEX_VERSION:
            raise LoraLibraryError(f"LoRA index {path}: unsupported version")
        known = {f.name for f in fields(StoredLora)} - {"lora_id"}
        try:  # a file people edit by hand; fields a newer version added are left out
            return {
                i: StoredLora(lora_id=i, **{k: v for k, v in d.items() if k in known})
                for i, d in raw.get("loras", {}).items()
            }
        except (AttributeError, TypeError, ValueError) as exc:
            raise LoraLibraryError(
                f"LoRA index {path}: a malformed entry ({type(exc).__name__}: {exc}); fix it, "
                "or remove the LoRA and add it again"
            ) from None

    def _save(self, loras: dict[str, StoredLora]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        entries = {
            i: {k: v for k, v in asdict(s).items() if k != "lora_id"} for i, s in loras.items()
        }
        write_index(self.root / INDEX_NAME, {"version": INDEX_VERSION, "loras": entries})

    def installed(self) -> list[StoredLora]:
        return [s for _, s in sorted(self._load().items())]

    def ids(self) -> list[str]:
        return sorted(self._load())

    def get(self, lora_id: str) -> StoredLora:
        loras = self._load()
        if lora_id not in loras:
            known = ", ".join(sorted(loras)) or "none"
            raise LoraLibraryError(f"LoRA {lora_id!r} is not installed (installed: {known})")
        return loras[lora_id]

    # --- changes ---------------------------------------------------------------------------

    def add(
        self,
        source: Path,
        lora_id: str | None = None,
        fits: Callable[[Path], str | None] | None = None,
    ) -> StoredLora:
        """Copy a LoRA file in after checking that it parses as a supported LoRA and, with
        `fits` (the file -> why it does not fit a model, or None), that it fits that model."""
        from sogni_node.render.lora import read_lora  # torch: only when adding

        source = Path(source)
        if not source.is_file() or source.suffix.lower() != ".safetensors":
            raise LoraLibraryError(f"{source}: expected a LoRA .safetensors file")
        lora_id = lora_id or source.stem.lower().replace(" ", "_")
        check_model_id(lora_id)
        loras = self._load()
        if lora_id in loras:
            raise LoraLibraryError(f"LoRA {lora_id!r} is already installed; remove it first")
        read_lora(source)  # LoraError (a ValueError) names the file and the bad key
        problem = fits(source) if fits is not None else None
        if problem is not None:
            raise LoraLibraryError(problem)
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / f"{lora_id}.safetensors"
        tmp = target.with_suffix(".part")
        shutil.copyfile(source, tmp)
        _fsync_file(tmp)  # the index (fsynced) must never name a file still only in cache
        stored = StoredLora(
            lora_id=lora_id,
            file=target.name,
            sha256=sha256_file(tmp),
            size=tmp.stat().st_size,
            added_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        tmp.replace(target)  # made durable by the index write's fsync of the same folder
        loras[lora_id] = stored
        self._save(loras)
        return stored

    def remove(self, lora_id: str) -> StoredLora:
        stored = self.get(lora_id)
        loras = self._load()
        del loras[lora_id]
        self._save(loras)
        (self.root / stored.file).unlink(missing_ok=True)
        with self._lock:
            self._checked.pop(lora_id, None)
        return stored

    # --- use -------------------------------------------------------------------------------

    def check(self, lora_id: str) -> Path:
        """The file of an installed LoRA, after its size and sha256 match the index."""
        stored = self.get(lora_id)
        path = self.root / stored.file
        try:
            st = path.stat()
        except FileNotFoundError:
            raise LoraLibraryError(f"LoRA {lora_id!r}: {path} is missing; re-add it") from None
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._checked.get(lora_id) == stamp:
                return path
        if st.st_size != stored.size:
            raise LoraLibraryError(
                f"LoRA {lora_id!r}: {path} is {st.st_size} bytes, expected {stored.size} "
                "(truncated or changed); re-add it"
            )
        if sha256_file(path) != stored.sha256:
            raise LoraLibraryError(
                f"LoRA {lora_id!r}: {path} does not match its recorded sha256; re-add it"
            )
        with self._lock:
            self._checked[lora_id] = stamp
        return path

    def verify(self, lora_id: str | None = None) -> dict[str, str | None]:
        """id -> problem (None when the file is intact)."""
        ids = [lora_id] if lora_id is not None else self.ids()
        problems: dict[str, str | None] = {}
        for i in ids:
            with self._lock:
                self._checked.pop(i, None)
            try:
                self.check(i)
                problems[i] = None
            except LoraLibraryError as exc:
                problems[i] = str(exc)
        return problems

    def resolve(self, wanted: Sequence[LoraRequest]) -> tuple[Lora, ...]:
        """Job entries -> checked files with strengths, in the job's order."""
        if len(wanted) > MAX_LORAS:
            raise LoraLibraryError(f"at most {MAX_LORAS} LoRAs per job, got {len(wanted)}")
        return tuple(Lora(self.check(w.id), float(w.strength)) for w in wanted)
