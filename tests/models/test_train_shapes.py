"""`train_shapes` rebuilds the same weights from the same command, in one process or several.

Why: the shipped `sogni-shapes-64` is only as trustworthy as the claim that its one command
rebuilds it (docs/MODEL.md). A full run takes ~30 minutes, so these run a few steps of each
phase through the same code path and save a real diffusers folder.
"""

from __future__ import annotations

from pathlib import Path

from sogni_node.models import train_shapes

_WEIGHTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


def _weights(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in _WEIGHTS}


def test_same_command_same_weights(tmp_path: Path) -> None:
    first = train_shapes.train(tmp_path / "a", vae_steps=3, unet_steps=3, procs=1)
    second = train_shapes.train(tmp_path / "b", vae_steps=3, unet_steps=3, procs=1)
    assert _weights(first) == _weights(second)


def test_data_parallel_run_saves_a_loadable_model(tmp_path: Path) -> None:
    """Two one-thread processes (gloo over a file store, no network) train the UNet phase from
    the autoencoder a one-process run trains, and save a folder the stock pipeline loads, with
    the scheduler keys a `ddim` job needs."""
    from diffusers import StableDiffusionPipeline

    out = train_shapes.train(tmp_path / "dp", vae_steps=3, unet_steps=3, procs=2)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.unet.config.in_channels == 4
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.vae.config.scaling_factor > 0
    single = train_shapes.train(tmp_path / "one", vae_steps=3, unet_steps=3, procs=1)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (single / vae).read_bytes()
