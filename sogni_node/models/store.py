"""Installed models: a folder per model under the node's models dir plus a sha256 index.

Why: jobs name models by id, and a node must never render with weights that changed after
install (a truncated download or a swapped file would give wrong images and failed checks).
Every weight file's sha256 and size is recorded at import and checked before use; the index
(`index.json`) is rewritten atomically so a crash never leaves it half-written. Single-file
checkpoints are converted once to a diffusers folder, so loading is always `from_pretrained`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sogni_node.models.detect import (
    CLASS_DEFAULTS,
    WEIGHT_SUFFIXES,
    DetectionError,
    check_class_fits,
    check_model_id,
    class_defaults,
    default_model_id,
    detect_file,
    detect_folder,
    file_architecture,
    folder_architecture,
    read_safetensors_header,
)
from sogni_node.models.registry import ModelRegistry, ModelSpec
from sogni_node.models.single_file import (
    TOKENIZER_FILES,
    SingleFileError,
    convert_single_file,
    skeleton_family,
)
from sogni_protocol.atomic import atomic_write_text

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1
_CHUNK = 1 << 20


class ModelStoreError(ValueError):
    """A store operation failed (unknown id, duplicate id, unreadable source)."""


class ModelIntegrityError(ModelStoreError):
    """An installed weight file is missing, truncated or changed since it was added."""

    def __init__(self, model_id: str, file: Path, problem: str) -> None:
        super().__init__(f"model {model_id!r}: {file} {problem}; re-add the model")
        self.model_id = model_id
        self.file = file
        self.problem = problem


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


@dataclass(frozen=True)
class StoredModel:
    """One index entry; `folder` is relative to the models dir."""

    model_id: str
    folder: str
    model_class: str
    source: str
    source_format: str
    """"diffusers" (a copied folder) or "single-file" (converted at import)."""
    files: dict[str, FileRecord]
    added_at: str
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str | None
    source_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "class": self.model_class,
            "source": self.source,
            "format": self.source_format,
            "source_sha256": self.source_sha256,
            "added_at": self.added_at,
            "steps": self.steps,
            "guidance": self.guidance,
            "width": self.width,
            "height": self.height,
            "scheduler": self.scheduler,
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in self.files.items()},
        }

    @classmethod
    def from_json(cls, model_id: str, d: dict[str, Any]) -> StoredModel:
        return cls(
            model_id=model_id,
            folder=str(d["folder"]),
            model_class=str(d["class"]),
            source=str(d.get("source", "")),
            source_format=str(d.get("format", "diffusers")),
            source_sha256=d.get("source_sha256"),
            files={k: FileRecord(str(v["sha256"]), int(v["size"])) for k, v in d["files"].items()},
            added_at=str(d.get("added_at", "")),
            steps=int(d["steps"]),
            guidance=float(d["guidance"]),
            width=int(d["width"]),
            height=int(d["height"]),
            scheduler=d.get("scheduler"),
        )


@dataclass
class VerifyResult:
    model_id: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES)
    )


def write_index(path: Path, data: Any) -> None:
    """Write an index (models or LoRAs) as sorted JSON, atomically and durably: the index is
    the only record of what was installed and its hashes, so a crash must leave the old one."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class ModelStore:
    """Models installed under `models_dir` (default: the node config's `models_dir`)."""

    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir)

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    # --- index -----------------------------------------------------------------------------

    def _load_index(self) -> dict[str, StoredModel]:
        try:
            raw = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ModelStoreError(f"model index {self.index_path} is corrupt: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != INDEX_VERSION:
            raise ModelStoreError(f"model index {self.index_path}: unsupported version")
        try:  # a file people edit by hand: any malformed entry is an error naming it
            return {mid: StoredModel.from_json(mid, d) for mid, d in raw.get("models", {}).items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelStoreError(
                f"model index {self.index_path}: a malformed entry ({type(exc).__name__}: "
                f"{exc}); fix it, or remove the model and add it again"
            ) from None

    def _save_index(self, models: dict[str, StoredModel]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"version": INDEX_VERSION, "models": {m: s.to_json() for m, s in models.items()}}
        write_index(self.index_path, data)

    def installed(self) -> list[StoredModel]:
        return [m for _, m in sorted(self._load_index().items())]

    def get(self, model_id: str) -> StoredModel:
        models = self._load_index()
        if model_id not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ModelStoreError(f"model {model_id!r} is not installed (installed: {known})")
        return models[model_id]

    def path(self, model: StoredModel) -> Path:
        return self.root / model.folder

    # --- add / remove ----------------------------------------------------------------------

    def add(
        self,
        source: Path,
        model_id: str | None = None,
        model_class: str | None = None,
        config_dir: Path | None = None,
        tokenizer_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> StoredModel:
        """Import a diffusers folder (copied) or a `.safetensors` checkpoint (converted).

        `config_dir` replaces the bundled config skeleton for single files (non-standard
        architectures); `tokenizer_dir` supplies CLIP tokenizer files it lacks.
        """
        say = progress or (lambda _msg: None)
        source = Path(source)
        if not source.exists():
            raise ModelStoreError(f"{source} does not exist")
        mid = check_model_id(model_id) if model_id else default_model_id(source)
        if mid in self._load_index():
            raise ModelStoreError(f"model {mid!r} is already installed; remove it first")
        is_file = source.is_file()
        if is_file and not source.name.lower().endswith(".safetensors"):
            raise ModelStoreError(f"{source.name}: only .safetensors single files are supported")
        try:
            architecture: str | None = (
                file_architecture(source) if is_file else folder_architecture(source)
            )
        except DetectionError:
            architecture = None  # unrecognised layout: an explicit --class decides
        if model_class is None:
            model_class = detect_file(source) if is_file else detect_folder(source)
        if model_class not in CLASS_DEFAULTS:
            raise ModelStoreError(
                f"unknown class {model_class!r}; expected one of {sorted(CLASS_DEFAULTS)}"
            )
        try:
            check_class_fits(model_class, architecture)
        except DetectionError as exc:
            raise ModelStoreError(f"{source.name}: {exc}") from None
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / mid
        if final.exists():
            raise ModelStoreError(f"{final} already exists but is not in the index; move it away")
        tmp = Path(tempfile.mkdtemp(prefix=f".{mid}.", dir=self.root))
        staged = tmp / "model"
        source_sha: str | None = None
        try:
            if is_file:
                say(f"hashing {source.name}")
                source_sha = sha256_file(source)
                say(f"converting {source.name} ({model_class}) to a diffusers folder")
                self._convert(source, staged, model_class, architecture, config_dir, tokenizer_dir)
            else:
                say(f"copying {source}")
                _copy_folder(source, staged)
            if not (staged / "model_index.json").is_file():
                raise ModelStoreError(f"{source}: no model_index.json after import")
            say("hashing weight files")
            files = {
                p.relative_to(staged).as_posix(): FileRecord(sha256_file(p), p.stat().st_size)
                for p in _weight_files(staged)
            }
            if not files:
                raise ModelStoreError(f"{source}: no weight files found")
            os.rename(staged, final)  # made durable by the index write's fsync of root
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        d = class_defaults(model_class, architecture)
        model = StoredModel(
            model_id=mid,
            folder=mid,
            model_class=model_class,
            source=source.name,
            source_format="single-file" if is_file else "diffusers",
            source_sha256=source_sha,
            files=files,
            added_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            steps=d.steps,
            guidance=d.guidance,
            width=d.width,
            height=d.height,
            scheduler=d.scheduler,
        )
        models = self._load_index()
        models[mid] = model
        self._save_index(models)
        logger.info("added model %s (%s) from %s", mid, model_class, source)
        return model

    def _convert(
        self,
        source: Path,
        dest: Path,
        model_class: str,
        architecture: str | None,
        config_dir: Path | None,
        tokenizer_dir: Path | None,
    ) -> None:
        try:
            family = skeleton_family(model_class, architecture)
            # Also with a config folder: it may lack tokenizers (then these fill them in).
            tokenizers = self._tokenizers(source, family, tokenizer_dir)
            convert_single_file(source, dest, family, config_dir, tokenizers)
        except SingleFileError as exc:
            raise ModelStoreError(str(exc)) from None

    def _tokenizers(self, checkpoint: Path, family: str, explicit: Path | None) -> dict[str, Path]:
        """Tokenizer folders per subfolder: `explicit`, else an installed model's.

        A candidate must have as many tokens as the checkpoint's embedding rows, so the tiny
        test tokenizer is never paired with a real CLIP text encoder. Any installed model
        may donate (an SDXL-based `lcm` has a `tokenizer_2`; SD 1.5, SDXL and Flux share the
        CLIP-L vocabulary); the files and the vocabulary size decide.
        """
        header = read_safetensors_header(checkpoint)
        rows = {
            int(v["shape"][0])
            for k, v in header.items()
            if isinstance(v, dict) and k.endswith("token_embedding.weight")
        }
        subs = ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)
        found: dict[str, Path] = {}
        for sub in subs:
            candidates = []
            if explicit is not None:
                candidates += [explicit / sub, explicit]
            candidates += [self.path(m) / sub for m in self.installed()]
            for cand in candidates:
                if all((cand / n).is_file() for n in TOKENIZER_FILES) and _vocab_fits(cand, rows):
                    found[sub] = cand
                    break
        return found

    def remove(self, model_id: str) -> StoredModel:
        """Drop the index entry first (so a crash never leaves an indexed, half-deleted model)."""
        models = self._load_index()
        model = self.get(model_id)
        del models[model_id]
        self._save_index(models)
        shutil.rmtree(self.path(model), ignore_errors=True)
        return model

    # --- integrity -------------------------------------------------------------------------

    def check(self, model_id: str, full: bool = True) -> StoredModel:
        """Raise ModelIntegrityError naming the first bad file; `full=False` checks sizes only."""
        model = self.get(model_id)
        folder = self.path(model)
        for rel, rec in sorted(model.files.items()):
            path = folder / rel
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise ModelIntegrityError(model_id, path, "is missing") from None
            if size < rec.size:
                raise ModelIntegrityError(
                    model_id, path, f"is truncated ({size} of {rec.size} bytes)"
                )
            if size != rec.size:
                raise ModelIntegrityError(
                    model_id, path, f"changed size ({size} bytes, expected {rec.size})"
                )
            if full and sha256_file(path) != rec.sha256:
                raise ModelIntegrityError(model_id, path, "changed (sha256 mismatch)")
        return model

    def verify(self, model_id: str | None = None, full: bool = True) -> list[VerifyResult]:
        """Check one model or all; each result lists its problems (empty means ok)."""
        ids = [model_id] if model_id else [m.model_id for m in self.installed()]
        results = []
        for mid in ids:
            result = VerifyResult(mid)
            try:
                self.check(mid, full=full)
            except ModelIntegrityError as exc:
                result.problems.append(str(exc))
            results.append(result)
        return results

    # --- registry --------------------------------------------------------------------------

    def spec(self, model_id: str, verify: bool = True) -> ModelSpec:
        """The model's ModelSpec, after checking its files (raises ModelIntegrityError)."""
        model = self.check(model_id) if verify else self.get(model_id)
        return ModelSpec(
            model_id=model.model_id,
            path=self.path(model),
            model_class=model.model_class,
            default_steps=model.steps,
            default_guidance=model.guidance,
            width=model.width,
            height=model.height,
            default_scheduler=model.scheduler,
        )

    def specs(self, verify: bool = True, strict: bool = False) -> list[ModelSpec]:
        """Specs of all installed models; bad ones are logged and skipped unless `strict`."""
        out = []
        for m in self.installed():
            try:
                out.append(self.spec(m.model_id, verify=verify))
            except ModelIntegrityError as exc:
                if strict:
                    raise
                logger.error("not serving %s", exc)
        return out

    def registry(self, verify: bool = True, strict: bool = False) -> ModelRegistry:
        """A ModelRegistry of every installed model (see `specs`)."""
        return ModelRegistry(self.specs(verify=verify, strict=strict))


def _vocab_fits(folder: Path, rows: set[int]) -> bool:
    if not rows:
        return True
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return len(vocab) in rows


def _copy_folder(source: Path, target: Path) -> None:
    """`shutil.copytree`, its failure raised as the first `OSError` it collected: its own
    `shutil.Error` holds a list of strings (no errno), so a full disk read as a traceback,
    not as "the disk is full" with what to do."""
    try:
        shutil.copytree(source, target)
    except shutil.Error as exc:
        errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        _src, dst, why = errors[0] if errors and len(errors[0]) == 3 else ("", "", str(exc))
        found = re.match(r"\[Errno (\d+)\] ([^:]+)", str(why))
        if found is None:
            raise ModelStoreError(f"copying {source} failed: {str(why)[:300]}") from None
        raise OSError(int(found.group(1)), found.group(2), str(dst)) from None
