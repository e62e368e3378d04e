"""Class detection from configs and checkpoint keys, and default ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sogni_node.models.detect import (
    CLASS_DEFAULTS,
    DetectionError,
    check_model_id,
    default_model_id,
    detect_file,
    detect_folder,
    detect_keys,
)
from sogni_node.models.registry import MODEL_CLASSES

U = "model.diffusion_model."
SD15_KEYS = {
    f"{U}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    f"{U}output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
}
SDXL_KEYS = {
    f"{U}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    f"{U}label_emb.0.0.weight": (1280, 2816),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (
        49408,
        768,
    ),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
}
FLUX_KEYS = {
    "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
    "single_blocks.0.linear1.weight": (21504, 3072),
    "img_in.weight": (3072, 64),
}


def test_defaults_cover_every_class() -> None:
    assert set(CLASS_DEFAULTS) == set(MODEL_CLASSES)


@pytest.mark.parametrize(
    ("keys", "name", "expected"),
    [
        (SD15_KEYS, "cyberrealistic_v70", "sd15"),
        (SD15_KEYS, "dreamshaper_lcm", "lcm"),
        (SDXL_KEYS, "juggernautXL_v9", "sdxl"),
        (SDXL_KEYS, "dreamshaperXL_v21TurboDPMSDE", "sdxl-turbo"),
        (SDXL_KEYS, "sdxl_lightning_4step", "sdxl-turbo"),
        (FLUX_KEYS, "flux1-schnell-fp8", "flux"),
        ({f"{U}{k}": v for k, v in FLUX_KEYS.items()}, "flux1-dev", "flux"),
    ],
)
def test_detect_keys(keys: dict[str, tuple[int, ...]], name: str, expected: str) -> None:
    assert detect_keys(keys, name, keys) == expected


def test_detect_keys_by_context_dim_without_text_encoder() -> None:
    keys = {k: v for k, v in SD15_KEYS.items() if k.startswith(U)}
    assert detect_keys(keys, "unet-only", keys) == "sd15"


def test_detect_keys_refuses_sd2_and_unknown() -> None:
    sd2 = {f"{U}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
    with pytest.raises(DetectionError, match="SD 2"):
        detect_keys(sd2, "v2", sd2)
    with pytest.raises(DetectionError, match="unrecognised"):
        detect_keys({"foo.weight": (1,)}, "x")


def test_detect_file_reads_header_only(tiny_checkpoint: Path) -> None:
    assert detect_file(tiny_checkpoint) == "sd15"


def test_detect_file_rejects_non_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(DetectionError, match="not a safetensors file"):
        detect_file(bad)


def _folder(tmp_path: Path, pipeline: str, sub: str, cfg: dict[str, object]) -> Path:
    folder = tmp_path / pipeline
    (folder / sub).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (folder / sub / "config.json").write_text(json.dumps(cfg))
    return folder


def test_detect_folder(tiny_folder: Path, tmp_path: Path) -> None:
    assert detect_folder(tiny_folder) == "sd15"
    sdxl = _folder(
        tmp_path,
        "StableDiffusionXLPipeline",
        "unet",
        {"cross_attention_dim": 2048, "addition_embed_type": "text_time"},
    )
    assert detect_folder(sdxl) == "sdxl"
    assert detect_folder(sdxl, name="sdxl-turbo") == "sdxl-turbo"
    flux = _folder(
        tmp_path, "FluxPipeline", "transformer", {"_class_name": "FluxTransformer2DModel"}
    )
    assert detect_folder(flux) == "flux"
    sd15 = _folder(tmp_path, "StableDiffusionPipeline", "unet", {"cross_attention_dim": 768})
    (sd15 / "scheduler").mkdir()
    (sd15 / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "LCMScheduler"}')
    assert detect_folder(sd15) == "lcm"
    with pytest.raises(DetectionError, match=r"model_index\.json"):
        detect_folder(tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CyberRealistic_V7.0 768.safetensors", "cyberrealistic_v7.0_768"),
        ("flux1-schnell-fp8.safetensors", "flux1-schnell-fp8"),
        ("My  Model (final)!!", "my_model_-final"),
    ],
)
def test_default_model_id(name: str, expected: str) -> None:
    assert default_model_id(Path(name)) == expected
    check_model_id(expected)


def test_check_model_id_rejects_odd_names() -> None:
    check_model_id("coreml-juggernautXL_v9Rundiffusionphoto2")  # catalog ids keep their case
    for bad in ("", "-x", "a/b", "a b", "x" * 200):
        with pytest.raises(ValueError, match="bad model id"):
            check_model_id(bad)
