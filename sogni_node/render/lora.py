"""Apply up to 8 LoRAs, each with a strength, to a loaded diffusers pipeline for one render.

Why a hand-written merge rather than diffusers' `load_lora_weights` + `set_adapters`: that path
needs peft (and accelerate), wraps every targeted layer in adapter modules and leaves them
there; a node keeps one pipeline per model across jobs with different LoRAs. Merging
`W += strength * scale * (up @ down)` into the plain weights costs nothing per step, and the
originals of the touched layers are saved and copied back afterwards, so the next job sees the
exact base weights (identical output bytes). Strength 0 touches nothing.

Reads `.safetensors` files in the two common key layouts:
- kohya (sd-scripts, A1111): `lora_unet_<module_with_underscores>.lora_down.weight`,
  `.lora_up.weight`, optional `.alpha`; `lora_te_` (`lora_te1_`/`lora_te2_` on SDXL) for text
  encoders;
- diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (older files:
  `.lora.down.weight` / `.lora.up.weight`), `text_encoder.<module>...`.
Linear and Conv2d targets are supported (LoCon convs included); other adapter types (LoHa,
LoKr, DoRA) are refused rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sogni_node.render.backend import Lora
from sogni_protocol.ids import MAX_LORAS

_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_DIFFUSERS_PREFIXES = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
_DOWN_UP = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)


class LoraError(ValueError):
    """A LoRA list or file that cannot be applied (too many, wrong model, unsupported keys)."""


@dataclass(frozen=True)
class _Delta:
    component: str
    module: str
    """Dotted module name (diffusers layout) or underscored name (kohya layout)."""
    underscored: bool
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    """alpha / rank when the file has an alpha, else 1."""


def check_lora_count(loras: Sequence[Any]) -> None:
    """Refuse more than `MAX_LORAS` before any file is read."""
    if len(loras) > MAX_LORAS:
        raise LoraError(f"at most {MAX_LORAS} LoRAs per job, got {len(loras)}")


def read_lora(path: Path) -> list[_Delta]:
    """Parse a LoRA `.safetensors` file into per-module down/up pairs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:  # a truncated or foreign file: say so in one line
        raise LoraError(f"{path.name}: not a readable safetensors file ({exc})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for down_sfx, up_sfx in _DOWN_UP:
            if key.endswith(down_sfx):
                pairs.setdefault(key[: -len(down_sfx)], {})["down"] = value
                break
            if key.endswith(up_sfx):
                pairs.setdefault(key[: -len(up_sfx)], {})["up"] = value
                break
        else:
            if key.endswith(".alpha"):
                pairs.setdefault(key[: -len(".alpha")], {})["alpha"] = value
            else:
                raise LoraError(f"{path.name}: unsupported LoRA key {key!r}")
    deltas = []
    for base, parts in pairs.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{path.name}: {base!r} lacks its down or up matrix")
        component, module, underscored = _split_base(path, base)
        rank = parts["down"].shape[0]
        alpha = parts.get("alpha")
        scale = float(alpha) / rank if alpha is not None else 1.0
        deltas.append(_Delta(component, module, underscored, parts["down"], parts["up"], scale))
    if not deltas:
        raise LoraError(f"{path.name}: no LoRA weights found")
    return deltas


def _split_base(path: Path, base: str) -> tuple[str, str, bool]:
    for prefix, component in _KOHYA_PREFIXES.items():
        if base.startswith(prefix):
            return component, base[len(prefix) :], True
    for prefix, component in _DIFFUSERS_PREFIXES.items():
        if base.startswith(prefix):
            return component, base[len(prefix) :], False
    raise LoraError(f"{path.name}: LoRA key {base!r} names no unet or text encoder")


def _targets(pipe: Any) -> dict[str, dict[str, torch.nn.Module]]:
    """component -> {dotted name and underscored name -> Linear/Conv2d module}."""
    found: dict[str, dict[str, torch.nn.Module]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        names: dict[str, torch.nn.Module] = {}
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                continue
            spellings = [name]
            if component != "unet" and not name.startswith("text_model."):
                # transformers 5 dropped CLIPTextModel's `text_model.` level; LoRA files
                # (trained against transformers 4) still name it.
                spellings.append("text_model." + name)
            for spelling in spellings:
                names[spelling] = module
                names["_" + spelling.replace(".", "_")] = module  # "_" marks kohya spelling
        found[component] = names
    return found


def _delta_weight(delta: _Delta, weight: torch.Tensor, where: str) -> torch.Tensor:
    down = delta.down.to(torch.float32)
    up = delta.up.to(torch.float32)
    product = up.flatten(1) @ down.flatten(1)
    if product.numel() != weight.numel() or product.shape[0] != weight.shape[0]:
        raise LoraError(
            f"{where}: LoRA shape {tuple(up.shape)}x{tuple(down.shape)} does not fit "
            f"weight {tuple(weight.shape)}"
        )
    return product.reshape(weight.shape) * delta.scale


class LoraMismatch(LoraError):
    """A LoRA built for another model: some of its layers are not this model's, or not of
    this model's shape. Its message names the file, how many layers and the first misfit
    (layer names and shapes only), so a node can log it and refuse the job with it."""


Plan = list[tuple[torch.nn.Module, torch.Tensor]]


def _plan(pipe: Any, loras: Sequence[Lora]) -> Plan:
    """Every weight change the LoRAs make, computed before any is applied; `LoraMismatch`
    naming the first file that does not fit (all its misfit layers counted)."""
    targets = _targets(pipe) if loras else {}
    plan: Plan = []
    for lora in loras:
        name = Path(lora.path).name
        deltas = read_lora(lora.path)
        misfits: list[str] = []
        for delta in deltas:
            module = targets.get(delta.component, {}).get(
                "_" + delta.module if delta.underscored else delta.module
            )
            where = f"{delta.component}.{delta.module}"
            if module is None:
                misfits.append(f"{where} matches no Linear/Conv2d layer of this model")
                continue
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            try:
                plan.append((module, _delta_weight(delta, weight, where) * lora.strength))
            except LoraError as exc:
                misfits.append(str(exc))
        if misfits:
            raise LoraMismatch(
                f"LoRA {name} was built for another model: {len(misfits)} of {len(deltas)} "
                f"layers do not fit this one (first: {misfits[0]})"
            )
    return plan


def lora_fit_problem(pipe: Any, path: Path) -> str | None:
    """Why the LoRA file at `path` cannot be applied to `pipe` (unreadable, unsupported or
    built for another model), or None if it fits. Changes no weight."""
    try:
        _plan(pipe, [Lora(Path(path), 1.0)])
    except LoraError as exc:
        return str(exc)
    return None


@contextmanager
def applied_loras(pipe: Any, loras: Sequence[Lora]) -> Iterator[list[Lora]]:
    """Merge `loras` in order into `pipe`'s UNet/text encoder weights for the `with` block.

    Every file is read and matched before any weight changes, so a bad file (`LoraError`;
    `LoraMismatch` for one built for another model) leaves the pipeline untouched; on exit
    (also on error) the touched weights are restored bit-exactly. Not re-entrant: hold the
    pipeline's lock around the block. Yields the LoRAs that were merged.
    """
    check_lora_count(loras)
    active = [lora for lora in loras if lora.strength != 0.0]
    plan = _plan(pipe, active)
    saved: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for module, change in plan:
                weight = module.weight
                assert isinstance(weight, torch.Tensor)
                if id(module) not in saved:
                    saved[id(module)] = (module, weight.detach().clone())
                weight.add_(change.to(device=weight.device, dtype=weight.dtype))
        yield active
    finally:
        with torch.no_grad():
            for module, original in saved.values():
                weight = module.weight
                assert isinstance(weight, torch.Tensor)
                weight.copy_(original)
