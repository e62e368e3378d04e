"""SDXL through the model store: folder and A1111-layout single-file import, detection, render.

The tiny SDXL model (conftest.build_tiny_sdxl) has random weights, so images are noise; what
matters is that a single file converts back to exactly the folder's weights and renders the
same bytes, and that broken inputs are refused instead of installed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sogni_node.cli import app
from sogni_node.models.detect import detect_file, detect_folder, file_architecture
from sogni_node.models.single_file import (
    CONFIGS_DIR,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    clip_to_ldm,
    export_sdxl_single_file,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from sogni_node.models.store import ModelStore, ModelStoreError
from sogni_node.render import RenderJob
from sogni_node.render.diffusers_backend import DiffusersBackend

WEIGHTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
)


def _render(store: ModelStore, *jobs: tuple[str, int]) -> list[bytes]:
    """PNGs for (model id, seed) jobs at 64x64, 2 steps, the model's default scheduler."""
    backend = DiffusersBackend(store.registry(), device="cpu", threads=1)
    try:
        return [
            backend.render(
                RenderJob(mid, "a red circle", "", 2, 5.0, None, 64, 64, seed),
                lambda _s: None,
                lambda: False,
            ).image
            for mid, seed in jobs
        ]
    finally:
        backend.close()


def _link(target: Path, tmp_path: Path, name: str) -> Path:
    """The same model under another name (detection reads the name for turbo/lcm hints)."""
    link = tmp_path / name
    link.symlink_to(target)
    return link


def _same_weights(a: Path, b: Path, dtype: torch.dtype = torch.float32) -> None:
    for rel in WEIGHTS:
        want, got = load_file(str(a / rel)), load_file(str(b / rel))
        assert want.keys() == got.keys(), rel
        assert all(torch.equal(want[k].to(dtype), got[k]) for k in want), rel


def test_folder_and_single_file_import_render_the_same_image(
    tiny_sdxl_folder: Path,
    tiny_sdxl_checkpoint: Path,
    tiny_sdxl_config_dir: Path,
    tmp_path: Path,
) -> None:
    assert detect_file(tiny_sdxl_checkpoint) == "sdxl"
    store = ModelStore(tmp_path / "models")
    folder = store.add(tiny_sdxl_folder)
    single = store.add(tiny_sdxl_checkpoint, config_dir=tiny_sdxl_config_dir)
    assert (folder.model_id, folder.model_class, folder.source_format) == (
        "tiny-sdxl",
        "sdxl",
        "diffusers",
    )
    assert (single.model_id, single.model_class, single.source_format) == (
        "tiny_sdxl_-test",
        "sdxl",
        "single-file",
    )
    assert sorted(single.files) == sorted(WEIGHTS)
    assert (single.width, single.steps, single.scheduler) == (1024, 20, "dpmpp_2m_karras")
    index = json.loads((store.path(single) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    _same_weights(tiny_sdxl_folder, store.path(single))

    a, b, other_seed = _render(
        store, (folder.model_id, 7), (single.model_id, 7), (single.model_id, 8)
    )
    assert a.startswith(b"\x89PNG")
    assert a == b  # the weights round-trip exactly, so the bytes do too
    assert other_seed != a


def test_turbo_and_lcm_by_name(
    tiny_sdxl_folder: Path,
    tiny_sdxl_checkpoint: Path,
    tiny_sdxl_config_dir: Path,
    tmp_path: Path,
) -> None:
    turbo_dir = _link(tiny_sdxl_folder, tmp_path, "tiny-sdxl-turbo")
    assert detect_folder(turbo_dir) == "sdxl-turbo"
    assert detect_file(tiny_sdxl_checkpoint, name="dreamshaperXL_lightning.safetensors") == (
        "sdxl-turbo"
    )
    store = ModelStore(tmp_path / "models")
    turbo = store.add(turbo_dir)
    assert (turbo.model_class, turbo.steps, turbo.guidance, turbo.scheduler) == (
        "sdxl-turbo",
        5,
        1.0,
        "euler_a",
    )
    (png,) = _render(store, (turbo.model_id, 7))  # the class's default scheduler: euler_a
    assert png.startswith(b"\x89PNG")

    # An SDXL-based LCM: LCM defaults, SDXL size and (the bug) an SDXL pipeline with both
    # text encoders, not the SD 1.5 skeleton the `lcm` class used to pick.
    lcm_file = _link(tiny_sdxl_checkpoint, tmp_path, "tinyXL_lcm.safetensors")
    assert file_architecture(lcm_file) == "sdxl"
    lcm = store.add(lcm_file, config_dir=tiny_sdxl_config_dir)
    assert (lcm.model_class, lcm.steps, lcm.scheduler, lcm.width) == ("lcm", 4, "lcm", 1024)
    _same_weights(tiny_sdxl_folder, store.path(lcm))


def test_class_that_does_not_fit_the_checkpoint_is_refused(
    tiny_sdxl_checkpoint: Path,
    tiny_checkpoint: Path,
    tiny_sdxl_config_dir: Path,
    tiny_config_dir: Path,
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match=r"class 'sd15' does not fit this sdxl model"):
        store.add(tiny_sdxl_checkpoint, model_class="sd15", config_dir=tiny_sdxl_config_dir)
    with pytest.raises(ModelStoreError, match=r"class 'sdxl-turbo' does not fit this sd15"):
        store.add(tiny_checkpoint, model_class="sdxl-turbo")
    # An SD 1.5 config folder for an SDXL file would lose text_encoder_2: refused up front.
    with pytest.raises(ModelStoreError, match=r"not a sdxl pipeline layout.*text_encoder_2"):
        store.add(tiny_sdxl_checkpoint, config_dir=tiny_config_dir)
    assert store.installed() == [] and not list((tmp_path / "models").iterdir())


def test_config_dir_without_tokenizer_gets_one(
    tiny_sdxl_folder: Path,
    tiny_sdxl_checkpoint: Path,
    tiny_sdxl_config_dir: Path,
    tmp_path: Path,
) -> None:
    """transformers builds an *empty* tokenizer from a folder without vocabulary: refuse it."""
    bare = tmp_path / "bare-config"
    shutil.copytree(
        tiny_sdxl_config_dir, bare, ignore=shutil.ignore_patterns("vocab.json", "merges.txt")
    )
    for sub in ("tokenizer", "tokenizer_2"):
        (bare / sub / "tokenizer.json").unlink()
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="needs a CLIP tokenizer for 'tokenizer'"):
        store.add(tiny_sdxl_checkpoint, model_id="none", config_dir=bare)

    explicit = store.add(
        tiny_sdxl_checkpoint,
        model_id="explicit",
        config_dir=bare,
        tokenizer_dir=tiny_sdxl_folder / "tokenizer",
    )
    store.add(tiny_sdxl_folder)  # now an installed SDXL model can lend its tokenizers
    borrowed = store.add(tiny_sdxl_checkpoint, model_id="borrowed", config_dir=bare)
    want = json.loads((tiny_sdxl_folder / "tokenizer_2" / "vocab.json").read_text())
    for model in (explicit, borrowed):
        for sub in ("tokenizer", "tokenizer_2"):
            assert json.loads((store.path(model) / sub / "vocab.json").read_text()) == want
    a, b = _render(store, ("tiny-sdxl", 7), ("borrowed", 7))
    assert a == b


def test_incomplete_checkpoints_are_refused(
    tiny_sdxl_checkpoint: Path,
    tiny_sdxl_config_dir: Path,
    sdxl_builder: Callable[..., Path],
    tmp_path: Path,
) -> None:
    state = load_file(str(tiny_sdxl_checkpoint))
    store = ModelStore(tmp_path / "models")

    # One UNet tensor missing: diffusers would keep its random init without a word.
    missing = tmp_path / "missing.safetensors"
    gone = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    save_file({k: v for k, v in state.items() if k != gone}, str(missing))
    with pytest.raises(ModelStoreError, match=rf"lacks 1 tensor.*{gone}"):
        store.add(missing, config_dir=tiny_sdxl_config_dir)

    # No VAE at all: diffusers raises a bare Exception subclass, which used to escape.
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_")}, str(no_vae))
    with pytest.raises(ModelStoreError, match=r"cannot convert no_vae.*AutoencoderKL") as err:
        store.add(no_vae, config_dir=tiny_sdxl_config_dir)
    assert "from_single_file" not in str(err.value)

    # Equal encoder widths: diffusers would silently load CLIP-L into text_encoder_2 too.
    same = sdxl_builder(tmp_path / "same-width", width_2=32)
    same_file = export_sdxl_single_file(same, tmp_path / "same.safetensors")
    with pytest.raises(ModelStoreError, match="same hidden size"):
        store.add(same_file, config_dir=same)
    assert store.installed() == [] and not list((tmp_path / "models").iterdir())


def test_real_like_fp16_checkpoint_with_extra_keys(
    tiny_sdxl_folder: Path, tiny_sdxl_checkpoint: Path, tiny_sdxl_config_dir: Path, tmp_path: Path
) -> None:
    """Released SDXL files are fp16 and carry `position_ids` and `logit_scale` too."""
    state = {k: v.half() for k, v in load_file(str(tiny_sdxl_checkpoint)).items()}
    state[f"{SDXL_CLIP_PREFIX}text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state[f"{SDXL_OPEN_CLIP_PREFIX}logit_scale"] = torch.tensor(4.6052)
    path = tmp_path / "realish.safetensors"
    save_file(state, str(path))
    store = ModelStore(tmp_path / "models")
    model = store.add(path, config_dir=tiny_sdxl_config_dir)
    _same_weights(tiny_sdxl_folder, store.path(model), torch.float16)
    (png,) = _render(store, (model.model_id, 7))  # loaded as float32, as the backend asks
    assert png.startswith(b"\x89PNG")


def test_cli_adds_sdxl_single_file(
    tiny_sdxl_checkpoint: Path, tiny_sdxl_config_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    runner = CliRunner()
    base = ["models", "add", str(tiny_sdxl_checkpoint), "--models-dir", str(models)]
    result = runner.invoke(
        app, [*base, "--class", "sd15", "--config-dir", str(tiny_sdxl_config_dir)]
    )
    assert result.exit_code == 3 and "does not fit" in result.output
    result = runner.invoke(app, [*base, "--config-dir", str(tiny_sdxl_config_dir)])
    assert result.exit_code == 0, result.output
    assert "added tiny_sdxl_-test (sdxl)" in result.output
    result = runner.invoke(app, ["models", "verify", "--models-dir", str(models)])
    assert (result.exit_code, result.output) == (0, "tiny_sdxl_-test: ok\n")


def test_bundled_sdxl_skeleton_matches_the_released_layout() -> None:
    """Real SDXL weights cannot be used here, so check the full-size skeleton on the meta device:
    its original-layout names must be what diffusers recognises as SDXL base, and diffusers'
    own converters must map them back onto every parameter."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CONFIGS_DIR / "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(cfg / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(cfg / "vae")))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(cfg / "text_encoder")))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(str(cfg / "text_encoder_2"))
        )
    ckpt = {
        **unet_to_ldm(unet.state_dict(), dict(unet.config)),
        **vae_to_ldm(vae.state_dict(), dict(vae.config)),
        **clip_to_ldm(te.state_dict(), SDXL_CLIP_PREFIX),
        **open_clip_to_ldm(te2.state_dict(), SDXL_OPEN_CLIP_PREFIX),
    }
    assert infer_diffusers_model_type(ckpt) == "xl_base"
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight"
    ] == (
        1280,
        2048,
    )
    assert shapes[f"{SDXL_OPEN_CLIP_PREFIX}transformer.resblocks.31.attn.in_proj_weight"] == (
        3840,
        1280,
    )
    for model, converted in (
        (unet, convert_ldm_unet_checkpoint(ckpt, dict(unet.config))),
        (vae, convert_ldm_vae_checkpoint(ckpt, dict(vae.config))),
        (te2, convert_open_clip_checkpoint(te2, ckpt, prefix=SDXL_OPEN_CLIP_PREFIX)),
    ):
        params = model.state_dict()
        assert converted.keys() == params.keys()
        assert all(converted[k].shape == params[k].shape for k in params)
