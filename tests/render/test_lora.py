"""LoRA merge on the tiny model: strengths, order, restore, the 8-LoRA limit, bad files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sogni_node.models.tiny import write_tiny_lora
from sogni_node.render.encoding import encode_png, float_image_to_uint8
from sogni_node.render.lora import (
    MAX_LORAS,
    Lora,
    LoraError,
    applied_loras,
    check_lora_count,
)

UNET_ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"
TE_ATTN = "text_model.encoder.layers.0.self_attn"


@pytest.fixture(scope="module")
def pipe(tiny_path: Path) -> Any:
    from diffusers import DiffusionPipeline

    p: Any = DiffusionPipeline.from_pretrained(str(tiny_path), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def _render(pipe: Any) -> bytes:
    out = pipe(
        prompt="red circle",
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    )
    return encode_png(float_image_to_uint8(np.asarray(out.images)[0]))


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


@pytest.fixture(scope="module")
def base_bytes(pipe: Any) -> bytes:
    return _render(pipe)


def _kohya_lora(path: Path, seed: int, rank: int = 4) -> Path:
    """kohya layout: underscored names, lora_down/lora_up and alpha."""
    return write_tiny_lora(path, seed, rank)


def _diffusers_lora(path: Path, seed: int, rank: int = 2) -> Path:
    """diffusers/peft layout: dotted names, lora_A/lora_B, no alpha."""
    g = torch.Generator().manual_seed(seed)
    t = {
        f"unet.{UNET_ATTN}.attn1.to_v.lora_A.weight": torch.randn(rank, 64, generator=g),
        f"unet.{UNET_ATTN}.attn1.to_v.lora_B.weight": torch.randn(64, rank, generator=g),
        f"text_encoder.{TE_ATTN}.v_proj.lora_A.weight": torch.randn(rank, 32, generator=g),
        f"text_encoder.{TE_ATTN}.v_proj.lora_B.weight": torch.randn(32, rank, generator=g),
    }
    save_file(t, str(path))
    return path


def _weights(pipe: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()} | {
        "te." + k: v.clone() for k, v in pipe.text_encoder.state_dict().items()
    }


def test_strength_one_changes_and_restores(pipe: Any, base_bytes: bytes, tmp_path: Path) -> None:
    before = _weights(pipe)
    lora = Lora(_kohya_lora(tmp_path / "a.safetensors", 1), 1.0)
    with applied_loras(pipe, [lora]) as active:
        assert active == [lora]
        changed = _render(pipe)
    assert changed != base_bytes
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit-exactly
    assert _render(pipe) == base_bytes


def test_strength_zero_is_identical(pipe: Any, base_bytes: bytes, tmp_path: Path) -> None:
    lora = Lora(_kohya_lora(tmp_path / "a.safetensors", 1), 0.0)
    with applied_loras(pipe, [lora]) as active:
        assert active == []
        assert _render(pipe) == base_bytes


def test_two_loras_in_order(pipe: Any, base_bytes: bytes, tmp_path: Path) -> None:
    a = Lora(_kohya_lora(tmp_path / "a.safetensors", 1), 0.8)
    b = Lora(_diffusers_lora(tmp_path / "b.safetensors", 2), 1.0)
    te = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 4 / 5
    q_proj = te.encoder.layers[0].self_attn.q_proj.weight
    v_proj = te.encoder.layers[0].self_attn.v_proj.weight
    q0, v0 = q_proj.clone(), v_proj.clone()
    with applied_loras(pipe, [a]):
        only_a = _render(pipe)
        q_a = q_proj.clone()
    with applied_loras(pipe, [a, b]) as active:
        assert active == [a, b]
        both = _render(pipe)
        assert torch.equal(q_proj, q_a)  # b leaves a's layers alone
        assert not torch.equal(v_proj, v0)
    assert len({base_bytes, only_a, both}) == 3
    with applied_loras(pipe, [b, a]):
        reversed_ = _render(pipe)
    # Merges add up, so order only moves float rounding: the images stay close (measured: 0
    # in each of 17 emulated CPU code paths, `python -m bench cpuvar`; 1 allows one rounding).
    assert int(np.abs(_pixels(both) - _pixels(reversed_)).max()) <= 1
    assert torch.equal(q_proj, q0) and torch.equal(v_proj, v0)


def test_nine_loras_refused(pipe: Any, tmp_path: Path) -> None:
    path = _kohya_lora(tmp_path / "a.safetensors", 1)
    with (
        pytest.raises(LoraError, match=f"at most {MAX_LORAS} LoRAs per job, got 9"),
        applied_loras(pipe, [Lora(path, 0.1)] * 9),
    ):
        pass
    check_lora_count([None] * 8)


def test_wrong_model_lora_refused_without_changes(pipe: Any, tmp_path: Path) -> None:
    before = _weights(pipe)
    good = Lora(_kohya_lora(tmp_path / "a.safetensors", 1))
    bad_path = tmp_path / "bad.safetensors"
    save_file(
        {
            "lora_unet_mid_block_nonexistent.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_mid_block_nonexistent.lora_up.weight": torch.zeros(8, 2),
        },
        str(bad_path),
    )
    with (
        pytest.raises(LoraError, match="matches no Linear/Conv2d"),
        applied_loras(pipe, [good, Lora(bad_path)]),
    ):
        pass
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_keys_and_strength(tmp_path: Path, pipe: Any) -> None:
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoraError, match="unsupported LoRA key"), applied_loras(pipe, [Lora(path)]):
        pass
    with pytest.raises(ValueError, match="finite"):
        Lora(path, float("nan"))
