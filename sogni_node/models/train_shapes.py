"""Train `sogni-shapes-64`: a small real text-to-image model of coloured shapes, on CPU.

Why: the embedded default model must follow prompts (so a requester sees the colours it asked
for) yet train in minutes on a laptop CPU and render in well under a second. The data are
synthetic, drawn on the fly ("a red circle on a blue background"), so nothing is downloaded.

Two phases, both seeded and with step counts derived only from `--minutes`, so the same
command, torch version, CPU kind and thread count rebuild the same weights:

1. a small AutoencoderKL (64 px <-> 4x16x16 latents) learns to reconstruct the shapes;
2. a small CLIP text encoder and UNet learn v-prediction on those latents under a zero
   terminal-SNR schedule (the first sampling step then sees pure noise, as in training, so the
   colours come from the prompt), with 10% empty captions for classifier-free guidance.

Run: `python -m sogni_node.models.train_shapes --out DIR [--minutes N] [--seed S]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sogni_node.models import registry as _registry

logger = logging.getLogger(__name__)

SHAPES_MODEL_ID = _registry.SHAPES_MODEL_ID
IMAGE_SIZE = _registry.SHAPES_IMAGE_SIZE
DEFAULT_STEPS = _registry.SHAPES_DEFAULT_STEPS
DEFAULT_GUIDANCE = _registry.SHAPES_DEFAULT_GUIDANCE
DEFAULT_MINUTES = 15.0
DEFAULT_SEED = 1234

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 225),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 20),
    "purple": (140, 40, 190),
}
"""Colour words -> RGB. Far enough apart that the nearest palette entry names a colour."""

SHAPES = ("circle", "square", "triangle")

_MAX_TOKENS = 20
"""Caption token limit (CLIP uses 77): captions are short and this keeps attention cheap."""

_VAE_CHANNELS = (8, 16, 32)
_LATENT_CHANNELS = 4
_VAE_SHARE = 0.27
"""Share of the time budget spent on the autoencoder; the rest trains UNet + text encoder."""
_VAE_STEPS_PER_MIN = 125
_UNET_STEPS_PER_MIN = 80
"""Step rates measured here (1 thread, shared busy 2-core VM). Fixed, so step counts (hence the
weights) depend on --minutes only, never on how fast the machine happens to be today."""
_VAE_BATCH = 16
_UNET_BATCH = 32
_CFG_DROPOUT = 0.1
_COLOUR_JITTER = 12


@dataclass(frozen=True)
class Scene:
    """One training image: a shape of one colour centred near the middle of another colour."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    radius: float
    jitter: tuple[int, ...] = (0, 0, 0, 0, 0, 0)

    @property
    def caption(self) -> str:
        shape = f"{_article(self.colour)} {self.colour} {self.shape}"
        return f"{shape} on {_article(self.background)} {self.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: random.Random, jitter: bool = True) -> Scene:
    """Draw a scene; shape and background colours always differ."""
    colours = list(PALETTE)
    colour = rng.choice(colours)
    background = rng.choice([c for c in colours if c != colour])
    j = _COLOUR_JITTER if jitter else 0
    return Scene(
        colour=colour,
        shape=rng.choice(SHAPES),
        background=background,
        cx=rng.uniform(24.0, 40.0),
        cy=rng.uniform(24.0, 40.0),
        radius=rng.uniform(11.0, 19.0),
        jitter=tuple(rng.randint(-j, j) for _ in range(6)),
    )


def draw_scenes(scenes: list[Scene]) -> torch.Tensor:
    """Rasterise scenes to a (N, 3, 64, 64) tensor in [-1, 1] with 1-pixel anti-aliased edges.

    Each shape is a signed distance (positive inside), so edges are soft and all three shapes
    are drawn in one vectorised pass.
    """
    n = len(scenes)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx = torch.tensor([s.cx for s in scenes]).view(n, 1, 1)
    cy = torch.tensor([s.cy for s in scenes]).view(n, 1, 1)
    r = torch.tensor([s.radius for s in scenes]).view(n, 1, 1)
    dx, dy = xx - cx, yy - cy
    circle = r - torch.sqrt(dx * dx + dy * dy)
    square = 0.85 * r - torch.maximum(dx.abs(), dy.abs())
    inradius = 0.6 * r  # equilateral triangle pointing up, centroid at (cx, cy)
    sin30, cos30 = 0.5, math.sqrt(3) / 2
    triangle = torch.minimum(
        inradius - dy,
        torch.minimum(inradius - (cos30 * dx - sin30 * dy), inradius - (-cos30 * dx - sin30 * dy)),
    )
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes]).view(n, 1, 1)
    sd = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    alpha = (sd + 0.5).clamp(0.0, 1.0).unsqueeze(1)
    fg = torch.tensor(
        [[PALETTE[s.colour][i] + s.jitter[i] for i in range(3)] for s in scenes],
        dtype=torch.float32,
    )
    bg = torch.tensor(
        [[PALETTE[s.background][i] + s.jitter[3 + i] for i in range(3)] for s in scenes],
        dtype=torch.float32,
    )
    fg = fg.clamp(0, 255).view(n, 3, 1, 1) / 127.5 - 1.0
    bg = bg.clamp(0, 255).view(n, 3, 1, 1) / 127.5 - 1.0
    return bg * (1.0 - alpha) + fg * alpha


def nearest_colour(rgb: np.ndarray) -> str:
    """Palette name closest (Euclidean RGB) to one colour."""
    names = list(PALETTE)
    ref = np.array([PALETTE[k] for k in names], dtype=np.float64)
    return names[int(np.argmin(((ref - rgb.astype(np.float64)) ** 2).sum(axis=1)))]


def classify_image(image: np.ndarray) -> tuple[str | None, str]:
    """(shape colour, background colour) of an HxWx3 uint8 image, by nearest palette entry.

    Background: median of the 4-pixel border. Shape: median of the pixels in the central half
    that differ clearly from the background; None when there is no such region (no shape).
    """
    img = image.astype(np.float64)
    h, w = img.shape[:2]
    b = 4
    border = np.concatenate(
        [
            img[:b].reshape(-1, 3),
            img[-b:].reshape(-1, 3),
            img[:, :b].reshape(-1, 3),
            img[:, -b:].reshape(-1, 3),
        ]
    )
    bg = np.median(border, axis=0)
    centre = img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3)
    far = np.sqrt(((centre - bg) ** 2).sum(axis=1)) > 60.0
    if far.sum() < 16:  # fewer than 16 pixels: no visible shape
        return None, nearest_colour(bg)
    return nearest_colour(np.median(centre[far], axis=0)), nearest_colour(bg)


def _make_tokenizer(folder: Path) -> Any:
    """The tiny model's offline CLIP BPE tokenizer (it already knows every colour and shape)."""
    from transformers import CLIPTokenizer

    from sogni_node.models.tiny import write_tiny_tokenizer

    write_tiny_tokenizer(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["model_max_length"] = _MAX_TOKENS
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _make_scheduler() -> Any:
    """Euler, v-prediction, zero terminal SNR, trailing spacing: good images in ~8 steps."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


def _make_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        latent_channels=_LATENT_CHANNELS,
        block_out_channels=_VAE_CHANNELS,  # two 2x downsamplings: 64 px <-> 16x16 latents
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # One group: with one channel per group, GroupNorm would erase each image's mean
        # colour (a flat background normalises to zero), which is the very thing to keep.
        norm_num_groups=1,
    )


def _make_text_encoder(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_TOKENS,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _make_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=16,
        norm_num_groups=4,  # 8+ channels per group, so flat colour fields survive the norms
    )


def _lr(step: int, total: int, peak: float, warmup: int = 30) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_vae(steps: int, rng: random.Random) -> tuple[Any, float]:
    """Train the autoencoder; return it (eval mode) and the latent scaling factor (1/std)."""
    vae = _make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    started = time.perf_counter()
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, 2e-3))
        x = draw_scenes([random_scene(rng) for _ in range(_VAE_BATCH)])
        posterior = vae.encode(x).latent_dist
        # Deterministic (the mode): it trains several times faster here than sampling, and
        # the diffusion phase only ever uses the mode.
        recon = vae.decode(posterior.mode()).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info(
                "vae %d/%d rec %.4f kl %.3f (%.0fs)",
                step,
                steps,
                rec.item(),
                kl.item(),
                time.perf_counter() - started,
            )
    vae.eval()
    with torch.no_grad():
        x = draw_scenes([random_scene(rng) for _ in range(256)])
        std = float(vae.encode(x).latent_dist.mode().std())
    return vae, 1.0 / std


def train_diffusion(
    steps: int, rng: random.Random, vae: Any, scale: float, tokenizer: Any
) -> tuple[Any, Any]:
    """Train text encoder + UNet jointly on v-prediction; return the EMA copies."""
    import copy

    text_encoder = _make_text_encoder(tokenizer)
    unet = _make_unet()
    params = [*text_encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ema_te, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    ema_params = [*ema_te.parameters(), *ema_unet.parameters()]
    alphas = _make_scheduler().alphas_cumprod.float()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    token_cache: dict[str, torch.Tensor] = {}

    def tokens(caption: str) -> torch.Tensor:
        if caption not in token_cache:
            token_cache[caption] = tokenizer(
                caption,
                padding="max_length",
                max_length=_MAX_TOKENS,
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
        return token_cache[caption]

    started = time.perf_counter()
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, 1.5e-3))
        scenes = [random_scene(rng) for _ in range(_UNET_BATCH)]
        captions = [s.caption if rng.random() >= _CFG_DROPOUT else "" for s in scenes]
        with torch.no_grad():
            z0 = vae.encode(draw_scenes(scenes)).latent_dist.mode() * scale
        ids = torch.stack([tokens(c) for c in captions])
        t = torch.randint(0, len(alphas), (len(scenes),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * z0
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, cond).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params, strict=True):
                e.lerp_(p, 1.0 - decay)
        if step % 25 == 0 or step == steps - 1:
            logger.info(
                "unet %d/%d loss %.4f (%.0fs)",
                step,
                steps,
                loss.item(),
                time.perf_counter() - started,
            )
    return ema_te.eval(), ema_unet.eval()


def evaluate(model_dir: Path, n: int = 50, seed: int = 7, steps: int = DEFAULT_STEPS) -> float:
    """Fraction of `n` seeded prompts whose shape and background colours both come out right."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(seed)
    scenes = [random_scene(rng, jitter=False) for _ in range(n)]
    images = pipe(
        prompt=[s.caption for s in scenes],
        num_inference_steps=steps,
        guidance_scale=DEFAULT_GUIDANCE,
        generator=[torch.Generator().manual_seed(i) for i in range(n)],
        output_type="np",
    ).images
    good = 0
    for scene, img in zip(scenes, images, strict=True):
        shape_c, bg_c = classify_image((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        good += shape_c == scene.colour and bg_c == scene.background
    return good / n


def train(out: Path, minutes: float = DEFAULT_MINUTES, seed: int = DEFAULT_SEED) -> Path:
    """Train both phases and save a diffusers folder at `out` (replaced if present)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae_steps = max(1, round(minutes * _VAE_SHARE * _VAE_STEPS_PER_MIN))
    unet_steps = max(1, round(minutes * (1 - _VAE_SHARE) * _UNET_STEPS_PER_MIN))
    logger.info("training %s: %d vae steps, %d unet steps", SHAPES_MODEL_ID, vae_steps, unet_steps)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tokenizer = _make_tokenizer(tok_dir)
        vae, scale = train_vae(vae_steps, rng)
        vae.register_to_config(scaling_factor=scale)
        text_encoder, unet = train_diffusion(unet_steps, rng, vae, scale, tokenizer)
        pipe: Any = StableDiffusionPipeline(  # Any: diffusers' stubs lack save_pretrained
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_make_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
        if out.exists():
            shutil.rmtree(out)
        pipe.save_pretrained(str(out), safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tok_dir / name, out / "tokenizer" / name)
    _add_ddim_keys(out / "scheduler" / "scheduler_config.json")
    return out


def _add_ddim_keys(path: Path) -> None:
    """Make a job's `ddim` scheduler (built from this config) work: DDIM clips x0 to [-1, 1]
    by default, which wrecks unit-variance latents. Euler ignores these keys, as SD 1.5's own
    scheduler config carries them too."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update(clip_sample=False, set_alpha_to_one=False)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="step budget")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval", type=int, default=50, help="prompts to score after (0: skip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = train(args.out, args.minutes, args.seed)
    logger.info("saved %s in %.1f min", out, (time.perf_counter() - started) / 60)
    if args.eval:
        for steps in (DEFAULT_STEPS, 12):
            score = evaluate(out, n=args.eval, steps=steps)
            logger.info("colour adherence at %d steps: %.0f%%", steps, 100 * score)


if __name__ == "__main__":
    main()
