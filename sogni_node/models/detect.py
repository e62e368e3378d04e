"""Detect a model's class from its configs or checkpoint keys; per-class render defaults.

Why: `models add` must work without the operator knowing diffusers internals, and a wrong class
means wrong pricing (catalog baselines are per class) and wrong defaults. Detection reads only
JSON configs and the safetensors header (no tensors), so it is cheap even for 7 GB files.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Sogni-style ids, e.g. `coreml-cyberrealistic_v70_768`, `flux1-schnell-fp8`."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")

_MAX_HEADER = 100 * 1024 * 1024
"""A safetensors header larger than this is treated as corrupt (real ones are a few MB)."""


class DetectionError(ValueError):
    """The class of a model could not be determined (pass it explicitly)."""


@dataclass(frozen=True)
class ClassDefaults:
    """Render defaults for a model class (steps, guidance, size, job scheduler name)."""

    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str | None
    """A name from the backend's SCHEDULERS; None keeps the model's saved scheduler."""


CLASS_DEFAULTS: Mapping[str, ClassDefaults] = {
    "sd15": ClassDefaults(20, 7.5, 512, 512, "dpmpp_2m_karras"),
    "sdxl": ClassDefaults(20, 7.0, 1024, 1024, "dpmpp_2m_karras"),
    # Turbo/Lightning distillations: few steps, little or no CFG (catalog: 5 steps, 1024 px).
    "sdxl-turbo": ClassDefaults(5, 1.0, 1024, 1024, "euler_a"),
    "lcm": ClassDefaults(4, 1.5, 512, 512, "lcm"),
    # Flux uses a flow-matching scheduler none of the job names map to: keep the saved one.
    "flux": ClassDefaults(4, 0.0, 1024, 1024, None),
}
"""Class -> defaults; steps and sizes agree with configs/catalog.toml where it lists them."""

ARCHITECTURES: Mapping[str, frozenset[str]] = {
    "sd15": frozenset({"sd15", "lcm"}),
    "sdxl": frozenset({"sdxl", "sdxl-turbo", "lcm"}),
    "flux": frozenset({"flux"}),
}
"""Architecture -> the classes that can label it (LCM distillations exist for both UNets)."""


def check_class_fits(model_class: str, architecture: str | None) -> None:
    """Refuse a class that cannot describe the detected architecture (e.g. `sdxl` on SD 1.5).

    Why: the class picks pricing, defaults and the single-file config skeleton, so a wrong
    `--class` would otherwise install a silently broken model.
    """
    if architecture is not None and model_class not in ARCHITECTURES[architecture]:
        fits = ", ".join(sorted(ARCHITECTURES[architecture]))
        raise DetectionError(
            f"class {model_class!r} does not fit this {architecture} model (use one of: {fits})"
        )


def class_defaults(model_class: str, architecture: str | None = None) -> ClassDefaults:
    """Defaults for a class; an SDXL-based LCM keeps LCM's steps and scheduler at SDXL's size."""
    d = CLASS_DEFAULTS[model_class]
    if model_class == "lcm" and architecture == "sdxl":
        xl = CLASS_DEFAULTS["sdxl"]
        return dataclasses.replace(d, width=xl.width, height=xl.height)
    return d


def default_model_id(path: Path) -> str:
    """Id from a file or folder name: lowercase, spaces to `_`, other odd characters to `-`."""
    name = path.name
    for suffix in WEIGHT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = name.strip().lower().replace(" ", "_")
    name = re.sub(r"[^a-z0-9._-]+", "-", name)
    name = re.sub(r"([._-])\1+", r"\1", name).strip("._-")
    if not name:
        raise ValueError(f"cannot derive a model id from {path.name!r}; pass --id")
    return name[:128]


def check_model_id(model_id: str) -> str:
    if not MODEL_ID_RE.match(model_id):
        raise ValueError(
            f"bad model id {model_id!r}: use letters, digits, '.', '_' or '-' (max 128), "
            "starting with a letter or digit"
        )
    return model_id


def _refine(base: str, name: str, scheduler_class: str = "") -> str:
    """Distilled variants are architecturally identical to their base: use name hints."""
    lowered = name.lower()
    if "lcm" in lowered or scheduler_class == "LCMScheduler":
        return "lcm"
    if base == "sdxl" and ("turbo" in lowered or "lightning" in lowered):
        return "sdxl-turbo"
    return base


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_architecture(folder: Path) -> str:
    """`sd15`, `sdxl` or `flux` for a diffusers folder, from model_index.json and configs."""
    index = _read_json(folder / "model_index.json")
    if not index:
        raise DetectionError(f"{folder} is not a diffusers folder (no readable model_index.json)")
    pipeline = str(index.get("_class_name", ""))
    unet = _read_json(folder / "unet" / "config.json")
    transformer = _read_json(folder / "transformer" / "config.json")
    if "Flux" in pipeline or "Flux" in str(transformer.get("_class_name", "")):
        return "flux"
    cross = unet.get("cross_attention_dim")
    if unet.get("addition_embed_type") == "text_time" or cross == 2048 or "XL" in pipeline:
        return "sdxl"
    if cross == 1024:
        raise DetectionError(f"{folder}: SD 2.x models (1024-dim text context) are not supported")
    if cross == 768 or (pipeline.startswith("StableDiffusion") and unet):
        return "sd15"
    raise DetectionError(f"{folder}: unknown pipeline {pipeline!r}; pass --class")


def detect_folder(folder: Path, name: str | None = None) -> str:
    """Class of a diffusers folder from model_index.json and the unet/transformer config."""
    base = folder_architecture(folder)
    if base == "flux":
        return base
    scheduler = str(
        _read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name", "")
    )
    return _refine(base, name or folder.name, scheduler)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: names, dtypes and shapes, without tensor data."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DetectionError(f"{path.name}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise DetectionError(f"{path.name}: not a safetensors file (bad header size)")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise DetectionError(f"{path.name}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise DetectionError(f"{path.name}: not a safetensors file (header is not an object)")
    return header


def keys_architecture(
    keys: Iterable[str],
    shapes: Mapping[str, Sequence[int]] | None = None,
    name: str = "",
) -> str:
    """`sd15`, `sdxl` or `flux` for a single-file checkpoint, from its tensor names and shapes."""
    keyset = set(keys)
    shapes = shapes or {}

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keyset)

    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        return "flux"
    if has("conditioner.embedders.1.") or has("model.diffusion_model.label_emb."):
        return "sdxl"
    if has("model.diffusion_model.input_blocks."):
        context = [
            int(shape[-1])
            for key, shape in shapes.items()
            if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight")
        ]
        if has("cond_stage_model.model.") or (context and context[0] == 1024):
            raise DetectionError(f"{name or 'checkpoint'}: SD 2.x checkpoints are not supported")
        if (context and context[0] == 768) or has("cond_stage_model.transformer."):
            return "sd15"
    raise DetectionError(f"{name or 'checkpoint'}: unrecognised checkpoint layout; pass --class")


def detect_keys(
    keys: Iterable[str],
    name: str = "",
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> str:
    """Class of a single-file checkpoint from its tensor names (and shapes, when known)."""
    base = keys_architecture(keys, shapes, name)
    return base if base == "flux" else _refine(base, name)


def _header_shapes(path: Path) -> tuple[dict[str, Sequence[int]], dict[str, Any]]:
    header = read_safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    shapes = {k: v.get("shape", []) for k, v in header.items() if isinstance(v, dict)}
    return shapes, meta if isinstance(meta, dict) else {}


def file_architecture(path: Path) -> str:
    """`sd15`, `sdxl` or `flux` for a `.safetensors` checkpoint, from its header only."""
    shapes, _ = _header_shapes(path)
    return keys_architecture(shapes.keys(), shapes, path.name)


def detect_file(path: Path, name: str | None = None) -> str:
    """Class of a single `.safetensors` checkpoint, from its header only."""
    shapes, meta = _header_shapes(path)
    hint = " ".join([name or path.name, str(meta.get("modelspec.architecture", ""))])
    return detect_keys(shapes.keys(), hint, shapes)
