"""Convert a diffusers Stable Diffusion pipeline to Core ML packages, optionally palettized.

Why: Mac nodes render with Core ML, which runs on the Neural Engine/GPU only from `.mlpackage`
files. As in Apple's ml-stable-diffusion, three parts are converted (text encoder, UNet, VAE
decoder) with fixed shapes, in fp16; palettizing weights to 6 or 4 bits (k-means lookup tables)
shrinks them about 2.5x/3.5x. Conversion runs on Linux too (only predictions need macOS), so
packages can be built once and shipped.

Conversion takes seconds to minutes, so results are cached under
`cache_dir/<weights sha256[:16]>-<W>x<H>/<fp16|6bit|4bit>/`; a folder is renamed into place only
when complete, so a crash never leaves a package that looks finished. Needs the `coreml` extra
(coremltools 9 with numpy<2.4, and scikit-learn for k-means).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEXT_ENCODER = "TextEncoder.mlpackage"
UNET = "Unet.mlpackage"
VAE_DECODER = "VAEDecoder.mlpackage"
PACKAGES = (TEXT_ENCODER, UNET, VAE_DECODER)
"""Package names as in Apple's ml-stable-diffusion."""

PALETTE_BITS = (6, 4)
"""Supported palettization widths (Apple ships 6-bit SD models; 4-bit is smaller still)."""

MANIFEST = "manifest.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HASHED_PARTS = ("text_encoder", "unet", "vae")
_PALETTIZE_MIN_WEIGHTS = 512
"""Smaller constants (biases, norms) stay fp16: a lookup table would not make them smaller."""


class CoreMLConversionError(RuntimeError):
    """Conversion failed or coremltools is missing."""


@dataclass(frozen=True)
class ConvertedModel:
    """Where a model's Core ML packages are and how they were made."""

    folder: Path
    nbits: int | None
    """None for plain fp16, else the palette width."""
    width: int
    height: int
    cache_hit: bool
    seconds: float
    """Time this call spent (near zero on a cache hit)."""

    @property
    def text_encoder(self) -> Path:
        return self.folder / TEXT_ENCODER

    @property
    def unet(self) -> Path:
        return self.folder / UNET

    @property
    def vae_decoder(self) -> Path:
        return self.folder / VAE_DECODER

    @property
    def manifest(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        return result


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the weight files of text encoder, UNet and VAE (relative names + bytes).

    Why these files: they decide the packages' contents; tokenizer and scheduler files do not.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted(
        p
        for part in _HASHED_PARTS
        if (model_dir / part).is_dir()
        for p in (model_dir / part).rglob("*")
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    )
    if not files:
        raise CoreMLConversionError(f"no weight files under {model_dir}")
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def precision_dir(nbits: int | None) -> str:
    """Folder name for a precision: `fp16`, `6bit`, `4bit`."""
    if nbits is None:
        return "fp16"
    if nbits not in PALETTE_BITS:
        raise ValueError(f"nbits must be one of {PALETTE_BITS} or None, got {nbits}")
    return f"{nbits}bit"


def model_cache_folder(
    cache_dir: Path, model_dir: Path, width: int, height: int, nbits: int | None
) -> Path:
    """The folder the packages for these settings live in (whether or not they exist yet)."""
    key = f"{weights_sha256(model_dir)[:16]}-{width}x{height}"
    return Path(cache_dir) / key / precision_dir(nbits)


def is_complete(folder: Path) -> bool:
    """The manifest is written last, before the rename, so it marks a finished folder."""
    return (folder / MANIFEST).is_file() and all((folder / p).exists() for p in PACKAGES)


def _import_ct() -> Any:
    try:
        import coremltools as ct
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CoreMLConversionError(
            "coremltools is not installed; install the `coreml` extra"
        ) from exc
    return ct


def convert_pipeline(
    model_dir: Path,
    cache_dir: Path,
    *,
    nbits: int | None = None,
    width: int | None = None,
    height: int | None = None,
) -> ConvertedModel:
    """Return the Core ML packages for a local diffusers SD folder, converting if not cached.

    `width`/`height` default to the UNet's native size; Core ML shapes are fixed at conversion,
    so each size is its own cache entry. Palettized variants are made from the cached fp16
    packages, so asking for 6 and 4 bits converts from torch only once.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    precision_dir(nbits)  # validate before any work
    if width is None or height is None:
        native = _native_size(model_dir)
        width = width or native
        height = height or native
    folder = model_cache_folder(cache_dir, model_dir, width, height, nbits)
    if is_complete(folder):
        return ConvertedModel(folder, nbits, width, height, True, time.perf_counter() - started)
    if nbits is None:
        _build(folder, lambda tmp: _convert_fp16(model_dir, tmp, width, height))
    else:
        base = convert_pipeline(model_dir, cache_dir, width=width, height=height)
        _build(folder, lambda tmp: _palettize(base.folder, tmp, nbits))
    seconds = time.perf_counter() - started
    logger.info("converted %s to Core ML (%s) in %.1fs", model_dir.name, folder.name, seconds)
    return ConvertedModel(folder, nbits, width, height, False, seconds)


def _native_size(model_dir: Path) -> int:
    unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text(encoding="utf-8"))
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text(encoding="utf-8"))
    return int(unet_cfg["sample_size"]) * _vae_scale(vae_cfg)


def _vae_scale(vae_config: Any) -> int:
    return int(2 ** (len(vae_config["block_out_channels"]) - 1))


def _build(folder: Path, write: Any) -> None:
    """Run `write(tmp)` in a temporary sibling, then rename it to `folder` (atomic publish)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        manifest = write(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if folder.exists() and not is_complete(folder):
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_fp16(model_dir: Path, out: Path, width: int, height: int) -> dict[str, Any]:
    ct = _import_ct()
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    pipe: Any = DiffusionPipeline.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    )
    scale = _vae_scale(pipe.vae.config)
    if width % scale or height % scale:
        raise ValueError(f"width and height must be multiples of {scale}")
    latent_h, latent_w = height // scale, width // scale
    tokens = int(pipe.tokenizer.model_max_length)
    hidden = int(pipe.text_encoder.config.hidden_size)
    latent_c = int(pipe.unet.config.in_channels)

    class _Text(torch.nn.Module):
        def __init__(self, enc: Any) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.enc(input_ids, return_dict=False)
            return out[0], out[1]

    class _Unet(torch.nn.Module):
        def __init__(self, unet: Any) -> None:
            super().__init__()
            self.unet = unet

        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor
        ) -> torch.Tensor:
            out: torch.Tensor = self.unet(
                sample, timestep, encoder_hidden_states=hidden, return_dict=False
            )[0]
            return out

    class _Decoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.vae.decode(z, return_dict=False)[0]
            return out

    def convert(
        module: torch.nn.Module, examples: dict[str, torch.Tensor], outputs: list[str], name: str
    ) -> None:
        with torch.no_grad():
            # check_trace=False: the check re-runs the model and costs as much as the trace.
            traced = torch.jit.trace(module.eval(), tuple(examples.values()), check_trace=False)
        inputs = [
            ct.TensorType(
                name=k, shape=v.shape, dtype=np.int32 if not v.is_floating_point() else np.float32
            )
            for k, v in examples.items()
        ]
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name=o) for o in outputs],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.macOS13,
        )
        mlmodel.save(str(out / name))

    # Batch 2 in the UNet: unconditional and conditional halves for classifier-free guidance.
    convert(
        _Text(pipe.text_encoder),
        {"input_ids": torch.zeros(1, tokens, dtype=torch.long)},
        ["last_hidden_state", "pooled_output"],
        TEXT_ENCODER,
    )
    convert(
        _Unet(pipe.unet),
        {
            "sample": torch.randn(2, latent_c, latent_h, latent_w),
            "timestep": torch.full((2,), 500.0),
            "encoder_hidden_states": torch.randn(2, tokens, hidden),
        },
        ["noise_pred"],
        UNET,
    )
    convert(
        _Decoder(pipe.vae),
        {"z": torch.randn(1, int(pipe.vae.config.latent_channels), latent_h, latent_w)},
        ["image"],
        VAE_DECODER,
    )
    return {
        "weights_sha256": weights_sha256(model_dir),
        "precision": "fp16",
        "nbits": None,
        "width": width,
        "height": height,
        "latent_shape": [latent_c, latent_h, latent_w],
        "max_tokens": tokens,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "coremltools": ct.__version__,
        "torch": torch.__version__,
    }


def _palettize(src: Path, out: Path, nbits: int) -> dict[str, Any]:
    ct = _import_ct()
    from coremltools.optimize import coreml as cto

    config = cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(
            mode="kmeans", nbits=nbits, weight_threshold=_PALETTIZE_MIN_WEIGHTS
        )
    )
    for name in PACKAGES:
        # skip_model_load: on Linux there is no Core ML runtime; the spec is all we need.
        model = ct.models.MLModel(str(src / name), skip_model_load=True)
        cto.palettize_weights(model, config).save(str(out / name))
    manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    manifest.update(precision=f"{nbits}bit", nbits=nbits, palettize_mode="kmeans")
    return manifest


def package_bytes(package: Path) -> int:
    """Total size of a `.mlpackage` folder (weights dominate)."""
    return sum(p.stat().st_size for p in Path(package).rglob("*") if p.is_file())
