"""Decode a committed final latent into the image an honest render of it delivers.

Why: the step checks prove the committed latents are honest steps of the model; nothing in
them ties the delivered image to the last latent x_N. A verifier node decodes x_N here, the
way `sogni_node.render.diffusers_backend.DiffusersBackend.render` does at the end of its
pipeline call, and the coordinator compares that image with the delivered one
(docs/IMAGE_CHECK.md).

What the pipeline does after its last step, and so what `decode_final` does (diffusers
`StableDiffusionPipeline.__call__`, `output_type="np"`): cast the latent to the pipeline's
compute dtype (leaf N stores those values exactly as float32), divide by the VAE's
`scaling_factor` (SDXL-style VAEs: un-normalise by `latents_mean`/`latents_std` first; the
SDXL family's pipelines, those with `upcast_vae`, decode in float32 when a float16 VAE asks
for `force_upcast`; StableDiffusionPipeline ignores the flag), `vae.decode`, the safety checker
when the pipeline has one, `image_processor.postprocess(..., output_type="np")`, then the
backend's own `float_image_to_uint8`. Encoding is left to the caller: the verifier answers a
lossless PNG whatever format the job asked for, with the node's encoder
(`sogni_protocol.image_encoding`); for a JPEG or WebP job the coordinator puts those pixels
through that same encoder and compares like with like
(`sogni_coordinator.image_verify.reference_image`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from sogni_node.render.encoding import encode_image, float_image_to_uint8

__all__ = ["decode_final", "decode_png", "final_latent_shape"]


def final_latent_shape(pipe: Any, *, width: int, height: int) -> tuple[int, ...] | None:
    """(1, C, H/f, W/f) for a UNet pipeline with a VAE; None when this pipeline's latents
    are packed otherwise (Flux) and cannot be checked this way."""
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if unet is None or vae is None or not isinstance(scale, int):
        return None
    return (1, int(unet.config.in_channels), height // scale, width // scale)


@torch.no_grad()
def decode_final(
    pipe: Any,
    latents: torch.Tensor,
    *,
    width: int,
    height: int,
    dtype: torch.dtype | None = None,
) -> npt.NDArray[np.uint8]:
    """HxWx3 uint8: the image `pipe` delivers for final latent `latents` (float32, on the CPU)
    when its loop ran in `dtype` (the backend's compute dtype; default the VAE's).

    Raises ValueError when `latents` is not a final latent of a `width` x `height` render of
    this pipeline (wrong shape, not finite): the worker's leaf, not this node, is at fault."""
    shape = final_latent_shape(pipe, width=width, height=height)
    if shape is None:
        raise NotImplementedError(f"{type(pipe).__name__} latents cannot be decoded here")
    if tuple(latents.shape) != shape:
        raise ValueError(f"final latent of shape {tuple(latents.shape)}, expected {shape}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("the final latent is not finite")
    vae = pipe.vae
    device = pipe._execution_device
    dtype = dtype or vae.dtype  # the latents' dtype in the pipeline's loop (the backend's)
    x = latents.to(device=device, dtype=dtype)
    # Upcast only where the pipeline itself does: the SDXL family (`upcast_vae`) decodes a
    # float16 VAE asking for `force_upcast` in float32; StableDiffusionPipeline never reads
    # the flag and decodes in float16 (a float32 decode here differed by a level on ~3% of
    # pixel-channels: no CPU float16 PNG matched before this).
    upcast = (
        vae.dtype == torch.float16
        and bool(getattr(vae.config, "force_upcast", False))
        and hasattr(pipe, "upcast_vae")
    )
    if upcast:
        vae.to(torch.float32)
    try:
        x = x.to(next(iter(vae.post_quant_conv.parameters())).dtype) if upcast else x
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            c = x.shape[1]
            m = torch.tensor(mean).view(1, c, 1, 1).to(x.device, x.dtype)
            s = torch.tensor(std).view(1, c, 1, 1).to(x.device, x.dtype)
            x = x * s / vae.config.scaling_factor + m
        else:
            x = x / vae.config.scaling_factor
        image = vae.decode(x, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    has_nsfw = None
    if getattr(pipe, "safety_checker", None) is not None:
        image, has_nsfw = pipe.run_safety_checker(image, device, dtype)
    denormalize = [True] * image.shape[0] if has_nsfw is None else [not n for n in has_nsfw]
    out = np.asarray(
        pipe.image_processor.postprocess(image, output_type="np", do_denormalize=denormalize)
    )
    if out.ndim != 4 or out.shape[0] != 1:
        raise RuntimeError(f"the VAE returned images of shape {out.shape}")
    return float_image_to_uint8(out[0])


def decode_png(
    pipe: Any,
    latents: torch.Tensor,
    *,
    width: int,
    height: int,
    dtype: torch.dtype | None = None,
) -> bytes:
    """`decode_final` as a lossless PNG (the backend's deterministic encoder)."""
    pixels = decode_final(pipe, latents, width=width, height=height, dtype=dtype)
    return encode_image(pixels, "png")
