"""Single-file checkpoints (A1111 / original SD key layout) <-> diffusers folders, offline.

Why: many community models ship as one `.safetensors` file, but the render backend loads
diffusers folders. Converting once at import time (with `from_single_file(config=<local
skeleton>, local_files_only=True)`) keeps model hubs out of the picture and makes every later
load a plain `from_pretrained`. The reverse (`export_sd15_single_file`, `export_sdxl_single_file`)
exists so tests and operators can produce a checkpoint in the original layout from a folder.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sogni_node.models.detect import WEIGHT_SUFFIXES, DetectionError, read_safetensors_header

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
"""Bundled config skeletons: one diffusers folder layout (JSON only) per model class."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

TOKENIZER_FILES = ("vocab.json", "merges.txt")
_TOKENIZER_SUBFOLDERS = {"sd15": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
_PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
_COMPONENTS = {
    "sd15": ("scheduler", "text_encoder", "tokenizer", "unet", "vae"),
    "sdxl": (
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "unet",
        "vae",
    ),
}
"""Components a converted pipeline must have; diffusers treats the text parts as optional."""


class SingleFileError(ValueError):
    """A checkpoint could not be converted (unsupported class, missing tokenizer, bad keys)."""


def skeleton_family(model_class: str, architecture: str | None = None) -> str:
    """Config skeleton for a checkpoint: its architecture when known, else the class's.

    The architecture (from the tensor names) wins because a class is only a label: `lcm`
    exists for SD 1.5 and SDXL, and a wrong `--class` must not pick the wrong skeleton.
    """
    if architecture in _PIPELINES:
        return str(architecture)
    if architecture is None and model_class in ("sdxl", "sdxl-turbo"):
        return "sdxl"
    if architecture is None and model_class in ("sd15", "lcm"):
        return "sd15"
    raise SingleFileError(
        f"single-file import of class {model_class!r} is not supported (only sd15/lcm and "
        "sdxl/sdxl-turbo); convert it to a diffusers folder first"
    )


def _has_bpe(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TOKENIZER_FILES)


def _has_tokenizer(folder: Path) -> bool:
    """BPE files, or the `tokenizer.json` that transformers >= 5 saves instead."""
    return _has_bpe(folder) or (folder / "tokenizer.json").is_file()


def _weights(path: str) -> bool:
    return path.lower().endswith(WEIGHT_SUFFIXES)


def prepare_config_dir(
    family: str,
    dest: Path,
    tokenizer_dirs: dict[str, Path] | None = None,
    source: Path | None = None,
) -> Path:
    """Copy a config skeleton (`source`, default the bundled one) to `dest`, adding tokenizers.

    The skeletons ship JSON configs only: the real CLIP BPE vocabulary is ~2 MB, so tokenizer
    files come from `tokenizer_dirs` (subfolder name -> folder with vocab.json + merges.txt),
    typically taken from an installed diffusers model. A skeleton without a tokenizer must be
    refused: transformers would silently build an empty one and every prompt would be lost.
    """
    src = source if source is not None else CONFIGS_DIR / family
    index_path = src / "model_index.json"
    if not index_path.is_file():
        raise SingleFileError(f"no config skeleton for {family!r} at {src} (no model_index.json)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SingleFileError(f"{index_path}: {exc}") from None
    missing = [c for c in _COMPONENTS[family] if not (index.get(c) or [None])[0]]
    if missing:
        raise SingleFileError(
            f"config folder {src} is not a {family} pipeline layout (no {', '.join(missing)})"
        )
    # A full diffusers folder works as a skeleton too; its weights are not needed.
    shutil.copytree(
        src, dest, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if _weights(n)]
    )
    for sub in _TOKENIZER_SUBFOLDERS[family]:
        if _has_tokenizer(dest / sub):
            continue
        tok = (tokenizer_dirs or {}).get(sub)
        if tok is None or not _has_bpe(tok):
            raise SingleFileError(
                f"single-file {family} import needs a CLIP tokenizer for {sub!r} "
                "(vocab.json + merges.txt); pass --tokenizer DIR or first add a diffusers "
                f"{family} model folder that has one"
            )
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for name in (*TOKENIZER_FILES, "special_tokens_map.json"):
            if (tok / name).is_file():
                shutil.copyfile(tok / name, dest / sub / name)
    return dest


def _check_text_encoders(cfg: Path) -> None:
    """diffusers routes SDXL's two text encoders by width: equal widths load CLIP-L twice."""
    widths = []
    for sub in ("text_encoder", "text_encoder_2"):
        try:
            config = json.loads((cfg / sub / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # transformers reports an unreadable config itself
        widths.append(config.get("hidden_size"))
    if widths[0] == widths[1]:
        raise SingleFileError(
            f"config folder: text_encoder and text_encoder_2 have the same hidden size "
            f"({widths[0]}), so diffusers cannot tell them apart in a single file"
        )


def convert_single_file(
    checkpoint: Path,
    dest: Path,
    family: str,
    config_dir: Path | None = None,
    tokenizer_dirs: dict[str, Path] | None = None,
) -> Path:
    """Convert `checkpoint` into a diffusers folder at `dest` (must not exist), offline.

    `config_dir` overrides the bundled skeleton (a diffusers folder whose JSON configs
    describe the checkpoint's architecture, e.g. for non-standard sizes); tokenizers it lacks
    come from `tokenizer_dirs`. The result is checked against the checkpoint, because
    diffusers leaves weights the file lacks at their random init without a word.
    """
    import diffusers  # lazy: heavy

    pipeline_cls: Any = getattr(diffusers, _PIPELINES[family])
    extra: dict[str, Any] = {}
    if family == "sd15":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    with tempfile.TemporaryDirectory(prefix=".sogni-cfg.") as tmp:
        cfg = prepare_config_dir(family, Path(tmp) / "config", tokenizer_dirs, config_dir)
        if family == "sdxl":
            _check_text_encoders(cfg)
        try:
            pipe = pipeline_cls.from_single_file(
                str(checkpoint), config=str(cfg), local_files_only=True, **extra
            )
        except Exception as exc:  # diffusers raises bare Exception subclasses, too
            # Drop diffusers' advice to pass the component in Python: not an option here.
            reason = str(exc).split("\nPlease load the component")[0].strip()
            if "size mismatch" in reason:  # not the class's standard layout: one line, no dump
                mismatched = reason.count("size mismatch")
                component = reason.split("loading state_dict for ", 1)[-1].split(":", 1)[0]
                reason = (
                    f"its {component} has {mismatched} layers of other sizes than the standard "
                    f"{family} layout (a custom or resized model): pass --config-dir with its "
                    "diffusers config folder, or --class if it is another class"
                )
            raise SingleFileError(f"cannot convert {checkpoint.name}: {reason}") from exc
        pipe.save_pretrained(str(dest), safe_serialization=True)
        del pipe
        # Keep plain BPE files next to tokenizer.json, as tiny.py does, for other loaders.
        for sub in _TOKENIZER_SUBFOLDERS[family]:
            if _has_bpe(cfg / sub) and (dest / sub).is_dir():
                for name in TOKENIZER_FILES:
                    if not (dest / sub / name).exists():
                        shutil.copyfile(cfg / sub / name, dest / sub / name)
    check_converted(dest, checkpoint, family)
    return dest


def check_converted(folder: Path, checkpoint: Path, family: str) -> None:
    """Every weight in the converted `folder` must come from `checkpoint` (names and sizes).

    Maps the folder's tensor names back to the original layout (from the safetensors
    headers, no tensor data) and looks each up in the checkpoint. A component whose prefix the
    checkpoint does not use at all (e.g. a VAE stored as `vae.*`) is left to diffusers.
    """
    ckpt = {
        k: math.prod(v["shape"])
        for k, v in read_safetensors_header(checkpoint).items()
        if isinstance(v, dict) and "shape" in v
    }
    try:
        expected = _ldm_state(folder, family, _meta_tensors)
    except (OSError, SingleFileError, DetectionError) as exc:
        raise SingleFileError(f"{checkpoint.name}: converted folder is incomplete: {exc}") from None
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX)
    used = {p for p in prefixes if any(k.startswith(p) for k in ckpt)}

    def found(key: str) -> int | None:  # diffusers also reads CLIP keys without `text_model.`
        return ckpt.get(key, ckpt.get(key.replace(".text_model.", ".", 1)))

    bad = [
        k
        for k, v in expected.items()
        if any(k.startswith(p) for p in used) and found(k) != math.prod(v.shape)
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise SingleFileError(
            f"{checkpoint.name} lacks {len(bad)} tensor(s) the {family} config needs or has "
            f"them in another size ({shown}); a truncated file or a config that does not fit"
        )


def _meta_tensors(path: str) -> dict[str, Any]:
    """A safetensors file's tensors as shape-only meta tensors (reads the header only)."""
    import torch

    header = read_safetensors_header(Path(path))
    return {
        k: torch.empty(v["shape"], device="meta")
        for k, v in header.items()
        if isinstance(v, dict) and "shape" in v
    }


# --- diffusers -> original (LDM) layout ------------------------------------------------------

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTN_TO_LDM = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _rename_head(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    head, _, tail = rest.partition(".")
    for new, old in table:
        if head == new:
            return f"{old}.{tail}"
    return rest


def unet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Inverse of diffusers' `convert_ldm_unet_checkpoint` for SD-style UNets (any depth)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping: Any = DIFFUSERS_TO_LDM_MAPPING  # untyped nested dict in diffusers
    fixed: dict[str, str] = dict(mapping["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(mapping["unet"]["addition_embed_type"])
    per = int(config["layers_per_block"]) + 1
    up_types = list(config["up_block_types"])
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        m = re.match(
            r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
            r"\.(\d+)\.(.*)",
            key,
        )
        if m:
            side, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if side == "down":
                if kind == "downsamplers":
                    new = f"input_blocks.{(b + 1) * per}.0.op.{rest.removeprefix('conv.')}"
                else:
                    idx = 1 + b * per + j
                    part = _rename_head(rest, _RESNET_TO_LDM) if kind == "resnets" else rest
                    new = f"input_blocks.{idx}.{0 if kind == 'resnets' else 1}.{part}"
            elif kind == "upsamplers":
                slot = 2 if "CrossAttn" in up_types[b] else 1
                new = f"output_blocks.{b * per + per - 1}.{slot}.{rest}"
            else:
                part = _rename_head(rest, _RESNET_TO_LDM) if kind == "resnets" else rest
                new = f"output_blocks.{b * per + j}.{0 if kind == 'resnets' else 1}.{part}"
            out[new] = value
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            if m[1] == "resnets":
                out[f"middle_block.{2 * int(m[2])}.{_rename_head(m[3], _RESNET_TO_LDM)}"] = value
            else:
                out[f"middle_block.1.{m[3]}"] = value
            continue
        raise SingleFileError(f"no original-layout name for UNet key {key!r}")
    return {UNET_PREFIX + k: v for k, v in out.items()}


def vae_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Inverse of diffusers' `convert_ldm_vae_checkpoint` (attention weights become 1x1 convs)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping: Any = DIFFUSERS_TO_LDM_MAPPING
    fixed: dict[str, str] = dict(mapping["vae"])
    n_up = len(config["up_block_types"])
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        m = re.match(
            r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|"
            r"upsamplers)\.(\d+)\.(.*)",
            key,
        )
        if m:
            part, side, b, kind, j, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
            ldm_b = b if side == "down" else n_up - 1 - b
            if kind == "resnets":
                rest = rest.replace("conv_shortcut", "nin_shortcut")
                out[f"{part}.{side}.{ldm_b}.block.{j}.{rest}"] = value
            else:
                sample = "downsample" if side == "down" else "upsample"
                out[f"{part}.{side}.{ldm_b}.{sample}.{rest}"] = value
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            if m[2] == "resnets":
                rest = m[4].replace("conv_shortcut", "nin_shortcut")
                out[f"{m[1]}.mid.block_{int(m[3]) + 1}.{rest}"] = value
            else:
                rest = m[4]
                for new, old in _VAE_ATTN_TO_LDM:
                    if rest.startswith(new):
                        rest = old + rest[len(new) :]
                if value.ndim == 2:
                    value = value[:, :, None, None]
                out[f"{m[1]}.mid.attn_1.{rest}"] = value
            continue
        raise SingleFileError(f"no original-layout name for VAE key {key!r}")
    return {VAE_PREFIX + k: v for k, v in out.items()}


def clip_to_ldm(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A transformers CLIP text encoder in the original `<prefix>text_model.*` layout."""
    # transformers >= 5.6 saves CLIPTextModel flat; the original layout keeps `text_model.`.
    return {
        prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in state.items()
    }


_OPEN_CLIP_BLOCK = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_ldm(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Inverse of diffusers' `convert_open_clip_checkpoint` (SDXL's second text encoder).

    OpenCLIP fuses q/k/v into one `in_proj` matrix and stores `text_projection` transposed
    (hidden x projection), which is how SDXL checkpoints ship `conditioner.embedders.1.model`.
    """
    import torch

    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    for key, value in state.items():
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight":
            out["text_projection"] = value.T
            continue
        if name in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[name]] = value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)", name)
        if m is None:
            raise SingleFileError(f"no original-layout name for text encoder key {key!r}")
        i, rest = int(m[1]), m[2]
        proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if proj:
            qkv.setdefault((i, proj[2]), {})[proj[1]] = value
            continue
        for new, old in _OPEN_CLIP_BLOCK:
            if rest.startswith(new):
                rest = old + rest[len(new) :]
                break
        else:
            raise SingleFileError(f"no original-layout name for text encoder key {key!r}")
        out[f"transformer.resblocks.{i}.{rest}"] = value
    for (i, kind), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise SingleFileError(f"text encoder layer {i}: incomplete q/k/v {kind}")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = fused
    return {prefix + k: v for k, v in out.items()}


def _ldm_state(folder: Path, family: str, load: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """A `family` diffusers folder's weights under their original-layout names."""
    state: dict[str, Any] = {}
    for sub, convert in (("unet", unet_to_ldm), ("vae", vae_to_ldm)):
        config = json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))
        state.update(
            convert(load(str(folder / sub / "diffusion_pytorch_model.safetensors")), config)
        )
    text = load(str(folder / "text_encoder" / "model.safetensors"))
    if family == "sd15":
        state.update(clip_to_ldm(text, CLIP_PREFIX))
    else:
        state.update(clip_to_ldm(text, SDXL_CLIP_PREFIX))
        text_2 = load(str(folder / "text_encoder_2" / "model.safetensors"))
        state.update(open_clip_to_ldm(text_2, SDXL_OPEN_CLIP_PREFIX))
    return state


def _export(folder: Path, out_path: Path, family: str) -> Path:
    from safetensors.torch import load_file, save_file

    state = _ldm_state(folder, family, load_file)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_path))
    return out_path


def export_sd15_single_file(folder: Path, out_path: Path) -> Path:
    """Write an SD 1.5-style diffusers folder as one original-layout `.safetensors` file."""
    return _export(folder, out_path, "sd15")


def export_sdxl_single_file(folder: Path, out_path: Path) -> Path:
    """Write an SDXL diffusers folder as one original-layout (A1111 / SGM) `.safetensors` file.

    CLIP-L goes under `conditioner.embedders.0.transformer.`, the OpenCLIP-style second
    encoder under `conditioner.embedders.1.model.`, the UNet (with `label_emb`) and VAE as
    for SD 1.5.
    """
    return _export(folder, out_path, "sdxl")
