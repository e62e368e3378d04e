"""Session fixtures: tiny SD 1.5 and SDXL models as folders, as A1111-layout single files,
and as config-only folders (custom single-file skeletons)."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sogni_node.models import ensure_tiny_model
from sogni_node.models.single_file import export_sd15_single_file, export_sdxl_single_file


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "Tiny SD v1 (test).safetensors"
    return export_sd15_single_file(tiny_folder, out)


def _config_only(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    return dest


@pytest.fixture(scope="session")
def tiny_config_dir(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's configs and tokenizer, no weights: a custom single-file skeleton."""
    return _config_only(tiny_folder, tmp_path_factory.mktemp("cfg") / "tiny-config")


def build_tiny_sdxl(
    tokenizer_dir: Path, out: Path, seed: int = 20240602, width_2: int = 64
) -> Path:
    """A random tiny SDXL pipeline (two text encoders, `text_time` UNet) saved at `out`.

    Why: SDXL single-file import can only be tested offline at toy size. The encoders differ
    in width (32 vs 64, like CLIP-L 768 vs bigG 1280) because diffusers tells them apart in a
    single file by width (`width_2` = 32 builds the case it cannot handle); the second one's
    projection (48) is not square, so a transposed `text_projection` cannot round-trip unnoticed.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)

    def text_config(width: int, projection: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=projection,
            hidden_act=act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    time_dim, projection = 8, 48
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(32, 32, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(width_2, projection, "gelu"))
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # Two transformer layers in the inner block (and mid block), as SDXL stacks them.
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            cross_attention_dim=32 + width_2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + projection,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            sample_size=64,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=32,
            scaling_factor=0.13025,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe: Any = StableDiffusionXLPipeline(  # Any: diffusers' stubs lack save_pretrained
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    # Plain BPE files next to tokenizer.json, as real SDXL folders ship them (tiny.py does too).
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tokenizer_dir / name, out / sub / name)
    return out


@pytest.fixture(scope="session")
def sdxl_builder(tiny_folder: Path) -> Callable[..., Path]:
    """`build_tiny_sdxl` with the tiny SD tokenizer, for tests that need a variant."""
    return functools.partial(build_tiny_sdxl, tiny_folder / "tokenizer")


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tiny_folder / "tokenizer", tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tiny_sdxl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdxl-ckpt") / "Tiny SDXL (test).safetensors"
    return export_sdxl_single_file(tiny_sdxl_folder, out)


@pytest.fixture(scope="session")
def tiny_sdxl_config_dir(tiny_sdxl_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _config_only(tiny_sdxl_folder, tmp_path_factory.mktemp("sdxl-cfg") / "tiny-sdxl-config")
