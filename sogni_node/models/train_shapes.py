"""Train `sogni-shapes-64`: a small real text-to-image model of coloured shapes, on CPU.

Why: the embedded default model must follow prompts (so a requester sees the colours it asked
for) yet train in minutes on a laptop CPU and render in well under a second. The data are
synthetic, drawn on the fly ("a red circle on a blue background"), so nothing is downloaded.

Two phases, both seeded with fixed step counts, so the same command, torch version, CPU kind
and thread count rebuild the same weights (about 30 minutes on two threads of a 2-core CPU):

1. a small AutoencoderKL (64 px <-> 4x16x16 latents) learns to reconstruct the shapes;
2. a small CLIP text encoder and UNet learn v-prediction on those latents under a zero
   terminal-SNR schedule (the first sampling step then sees pure noise, as in training, so the
   colours come from the prompt), with 10% empty captions for classifier-free guidance. The
   UNet also gets the pooled prompt in its time embedding, so every block knows the shape.

Captions (issue #17) may carry a size word, a position and one of four word orders; see
`random_training_scene`. docs/MODEL.md has the recipe, its cost and its measured adherence.

Run: `python -m sogni_node.models.train_shapes --out DIR [--seed S]`.
"""

from __future__ import annotations

import argparse
import dataclasses
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
DEFAULT_VAE_STEPS = 1188
DEFAULT_UNET_STEPS = 6000
DEFAULT_PROCS = 1
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

_VAE_CHANNELS = (16, 32, 64)
_LATENT_CHANNELS = 4
_VAE_BATCH = 16
_VAE_LR = 3e-3
_VAE_EDGE_WEIGHT = 0.0
"""Extra VAE loss weight on pixels within 2 px of an edge (0: the plain loss, as shipped).
An experiment knob: the VAE rounds square corners, but a full run with 2.0 and 8 latent
channels scored far worse (docs/MODEL.md, "Limits")."""
_VAE_LATENT_NOISE = 0.0
"""Train the decoder on noisy latents: z + u * this * std(z) * noise, u uniform in [0, 1) per
image (0: the plain loss, as shipped). An experiment knob (issue #17): the shipped decoder
turns a square's latent into a circle under modest noise, so the UNet has to hit a narrow
target; noise forces the encoder to spread a shape's identity over a margin the UNet can
reach."""
_UNET_BATCH = 16
"""16 since session 19 (32 before, same samples in half the steps): twice the updates for the
same compute, which an under-trained model uses better (docs/MODEL.md)."""
_CONTRAST_WEIGHT = 0.0
"""UNet loss weight on where the scene's latent differs from the same scene with the other
shape (circle <-> square; triangle -> circle): 1 + this x that difference, scaled to 1 at its
largest per image. 0: the plain loss, as shipped. An experiment knob (docs/MODEL.md,
"Limits", session 9: 4 raised shape from 71% to 83% but lost the position words)."""
_PLACEMENT_JITTER = 0.0
"""How far (px) a shape's centre strays from where its caption puts it: unqualified and small
scenes around the middle, positioned scenes along the other axis. 0 as shipped since session
19 (8 before). Issue #17: the mean of squares jittered by +-8 px is a rounded blob, which is
what an under-trained model draws at the high-noise steps where the outline is chosen."""
_JITTER_POSITIONED = True
"""Whether `_PLACEMENT_JITTER` also scales the cross-axis stray of positioned scenes (True,
as in session 14's J = 2 run) or leaves them at the shipped stray. An experiment knob."""
_CONTRAST_OF = {"circle": "square", "square": "circle", "triangle": "circle"}
_CONTRAST_BELOW = 1000
"""Apply the contrast weight only at timesteps below this (1000: all). An experiment knob:
layout is decided at high noise, shape detail at low noise."""
_POSITION_CONTRAST = 0.0
"""Extra weight where a positioned scene differs from the same scene mirrored (left <->
right, top <-> bottom). An experiment knob, 0 as shipped."""
_CONTRAST_SCOPE = "image"
"""How the contrast weight is scaled and where it applies: "image" (to 1 at each image's
largest difference, every scene, as in session 9's runs), "batch" (to 1 at the batch's
largest: a small shape's cells weigh less than a large one's), "unplaced" (per image, only
scenes without a position word). An experiment knob."""
_CONTRAST_UNTIL = 1.0
"""Fraction of the UNet steps during which the contrast weight applies (1.0: all, as
before); the rest train on the plain loss. An experiment knob: does a plain finish restore
the position words the weight costs while keeping its shape gain?"""
_MIRROR = {
    "on the left": "on the right",
    "on the right": "on the left",
    "at the top": "at the bottom",
    "at the bottom": "at the top",
}
_RADIUS_SPREAD = 1.0
"""How far an unqualified scene's radius strays from 15 px (`--radius-spread`): the drawn
radius 11-19 is pulled towards 15 by this / 4, so 4 draws as before session 23 and 1 (as
shipped since) gives 14-16: a caption without a size word then stands for one size, not a
range whose average is a soft-edged pyramid. UNet phase only: the autoencoder still learns
every size."""
_POSITION_SHARE = 0.35
"""Share of the UNet phase's captions with a position word (`--position-share`; the
autoencoder's scenes keep `_P_POSITION`, 0.25): 0.35 since session 23, when one size per
unqualified caption made those captions easier and left/right harder (docs/MODEL.md)."""
_FOCUS_SHARE = 0.75
"""Share of each UNet batch drawn at the timesteps the default 8-step trailing sampler visits
(the rest uniform over all timesteps). 0.75 as shipped since session 19 (0.5 before)."""
_CHANNELS_LAST = True
"""Train the convolutions in channels-last memory layout: the same model, ~10-25% faster per
step on this CPU (the VAE encode most), numerically not bit-identical to the default layout."""
_LATENT_POOL = 0
"""Scenes drawn and encoded once before the UNet phase, its batches then drawn from them
(0: a fresh batch encoded every step, as shipped). An experiment knob: a batch's encode is
a fifth of a UNet step on one thread. Shape and the unseen word orders scored lower with
a pool in both runs that had one (docs/MODEL.md, runs B and D)."""
_FUSED_STEP = True
"""Fused AdamW and foreach clipping and EMA in the UNet phase (`--fused-step`; on since
session 23: with `_CLASSIC_ATTENTION`, ~12% of a UNet step; the VAE phase keeps plain AdamW)."""
_CLASSIC_ATTENTION = True
"""Train the UNet with diffusers' classic attention (bmm + softmax) instead of PyTorch's
fused CPU kernel, whose backward is slow on these tiny sequences (`--classic-attention`)."""
"""Fused AdamW and one foreach call for the EMA: the same update in fewer kernel launches,
which matter at these small batches (numerically not bit-identical to the per-tensor loop).
Off as shipped (an experiment knob)."""
_SHAPE_WEIGHTS: tuple[float, float, float] | None = (1.0, 2.0, 1.0)
"""Relative odds of circle, square and triangle in the UNet phase's scenes (None: the even
draw, as before session 23; the VAE phase always draws evenly). Squares are the class the
model misses, so half of its scenes are squares (issue #17)."""
_FOCUS_WEIGHTS: tuple[float, ...] | None = (1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0)
"""Relative odds of the default sampler's 8 timesteps (999 first) in the focused share of each
UNet batch (None: even, as before session 23): a square's x0 prediction keeps its corners at
the first step and loses them at the next three, so those get twice the updates (#17)."""
_SCALE_SHIFT = False
"""ResNet blocks take the time (and pooled prompt) embedding as a scale and a shift of their
normalised features (ADM's AdaGN) instead of a shift alone. An experiment knob (issue #17):
the 16x16 blocks, which draw the outline, see the shape word only through this embedding."""
_EMA_DECAY = 0.995
"""Decay of the weights' moving average that is saved (warmed up as (1 + step) / (10 + step))."""
_UNET_LR = 1.5e-3
_CFG_DROPOUT = 0.1
_COLOUR_JITTER = 12


POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
SIZES = ("small", "large")
_FORMS = (
    "{a_c} {c} {s} on {a_b} {b} background",
    "{b} background, {c} {s}",
    "{a_b} {b} background with {a_c} {c} {s}",
    "{c} {s} on {b}",
)
"""Caption word orders. The first (the model card's form) is the most common in training."""
_FORM_WEIGHTS = (0.7, 0.1, 0.1, 0.1)
_P_POSITION = 0.25
_P_SIZE = 0.2


@dataclass(frozen=True)
class Scene:
    """One training image: a shape of one colour on a background of another.

    `position` and `size` are the optional caption words ("on the left", "small"); without
    them the shape sits near the middle at a medium size (the original placement).
    """

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    radius: float
    jitter: tuple[int, ...] = (0, 0, 0, 0, 0, 0)
    position: str | None = None
    size: str | None = None
    form: int = 0

    @property
    def caption(self) -> str:
        c = self.colour if self.size is None else f"{self.size} {self.colour}"
        s = self.shape if self.position is None else f"{self.shape} {self.position}"
        return _FORMS[self.form].format(
            a_c=_article(c), c=c, s=s, a_b=_article(self.background), b=self.background
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: random.Random, jitter: bool = True) -> Scene:
    """Draw a scene of the original form; shape and background colours always differ.

    Tests and benches draw their prompts with this, so its use of `rng` must not change.
    """
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


def random_training_scene(rng: random.Random, p_position: float = _P_POSITION) -> Scene:
    """A scene of any caption form, with position and size words some of the time.

    Placement: "on the left" etc. puts the centroid in that third (radius 8-13 so it fits);
    "in the centre" keeps it within 3 px of the middle; "small" is radius 5-8, "large" 21-25
    (centred, triangles lowered so their tip stays inside). Unqualified scenes keep the
    original radius (11-19) and sit in the middle; their centre, and a positioned shape's
    other coordinate, strays by up to `_PLACEMENT_JITTER` px (0 as shipped, 8 before).
    """
    base = random_scene(rng)
    form = rng.choices(range(len(_FORMS)), weights=_FORM_WEIGHTS)[0]
    position = rng.choice(POSITIONS) if rng.random() < p_position else None
    size = rng.choice(SIZES) if rng.random() < _P_SIZE else None
    if size == "large" and position not in (None, "in the centre"):
        size = None  # a large shape cannot sit in one third of the image
    cx, cy, r = base.cx, base.cy, base.radius
    scaled = _JITTER_POSITIONED or position in (None, "in the centre")
    if _PLACEMENT_JITTER != 8.0 and scaled:  # J = 8 draws as before session 19
        shrink = _PLACEMENT_JITTER / 8.0
        cx, cy = 32.0 + (cx - 32.0) * shrink, 32.0 + (cy - 32.0) * shrink
    if size == "small":
        r = rng.uniform(5.0, 8.0)
    elif size == "large":
        r = rng.uniform(21.0, 25.0)
        cx, cy = rng.uniform(30.0, 34.0), rng.uniform(30.0, 34.0)
        if base.shape == "triangle":
            cy += 0.3 * r  # centre the triangle's box, not its centroid
    if position is not None and size is None:
        r = rng.uniform(8.0, 13.0)
    edge_lo, edge_hi, mid = rng.uniform(11.0, 17.0), rng.uniform(47.0, 53.0), rng.uniform(29, 35)
    if position == "on the left":
        cx = edge_lo
    elif position == "on the right":
        cx = edge_hi
    elif position == "at the top":
        cy = edge_lo
    elif position == "at the bottom":
        cy = edge_hi
    elif position == "in the centre" and size != "large":
        cx, cy = mid, rng.uniform(29.0, 35.0)
    return Scene(
        colour=base.colour,
        shape=base.shape,
        background=base.background,
        cx=cx,
        cy=cy,
        radius=r,
        jitter=base.jitter,
        position=position,
        size=size,
        form=form,
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


_EXTRA_WORDS = ("left", "right", "top", "bottom", "centre", "large")
"""Scene words the tiny vocabulary lacks; each becomes one token too."""


def _make_tokenizer(folder: Path) -> Any:
    """The tiny model's offline CLIP BPE tokenizer, plus the position and size words."""
    from transformers import CLIPTokenizer

    from sogni_node.models import tiny

    tiny.write_tiny_tokenizer(folder)
    alphabet = list(tiny._bytes_to_unicode().values())
    merges = tiny._learn_merges([*tiny._WORDS, *_EXTRA_WORDS])
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
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


_UNET_CHANNELS = (32, 64)
_UNET_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")
_UNET_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_UNET_TEXT_EMBED: str | None = "text"


def _make_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        block_out_channels=_UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=_UNET_DOWN,
        up_block_types=_UNET_UP,
        cross_attention_dim=64,
        attention_head_dim=16,
        # Pool the prompt into the time embedding, so every ResNet block sees it (the stock
        # pipeline needs nothing more than encoder_hidden_states for this).
        addition_embed_type=_UNET_TEXT_EMBED,
        addition_embed_type_num_heads=4,
        norm_num_groups=4,  # 8+ channels per group, so flat colour fields survive the norms
        resnet_time_scale_shift="scale_shift" if _SCALE_SHIFT else "default",
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


def _edge_weight(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weight: 1, plus `_VAE_EDGE_WEIGHT` within 2 px of a colour edge."""
    hi = F.max_pool2d(x, 3, 1, 1)
    lo = -F.max_pool2d(-x, 3, 1, 1)
    edge = ((hi - lo).amax(dim=1, keepdim=True) > 0.1).float()
    return 1.0 + _VAE_EDGE_WEIGHT * F.max_pool2d(edge, 3, 1, 1)


def train_vae(steps: int, rng: random.Random) -> tuple[Any, float]:
    """Train the autoencoder; return it (eval mode) and the latent scaling factor (1/std).
    Always in one process (`--procs` parallelises the UNet phase only)."""
    vae = _make_vae()
    if _CHANNELS_LAST:
        vae.to(memory_format=torch.channels_last)
    # Plain AdamW even with `--fused-step`: the autoencoder's step is a small share of its
    # time, and the shipped VAE then trains the same with the UNet's knobs on or off.
    opt = torch.optim.AdamW(vae.parameters(), lr=_VAE_LR, weight_decay=0.0)
    started = time.perf_counter()
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, _VAE_LR))
        x = _layout(draw_scenes([random_training_scene(rng) for _ in range(_VAE_BATCH)]))
        posterior = vae.encode(x).latent_dist
        # Deterministic (the mode): it trains several times faster here than sampling, and
        # the diffusion phase only ever uses the mode.
        z = posterior.mode()
        if _VAE_LATENT_NOISE:
            u = torch.rand(z.shape[0], 1, 1, 1) * _VAE_LATENT_NOISE
            z = z + u * z.detach().std() * torch.randn_like(z)
        recon = vae.decode(z).sample
        if _VAE_EDGE_WEIGHT:
            w, err = _edge_weight(x), recon - x
            rec = (w * err * err).mean() + 0.5 * (w * err.abs()).mean()
        else:
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
        x = draw_scenes([random_training_scene(rng) for _ in range(256)])
        std = float(vae.encode(x).latent_dist.mode().std())
    return vae, 1.0 / std


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _share(batch: int) -> int:
    """This process's share of a global batch (data-parallel training: `--procs`)."""
    return batch // _world()


def _average_grads(params: list[torch.nn.Parameter]) -> None:
    """Step every process with the mean of all processes' gradients (one all-reduce over a
    flat buffer), so their weights stay identical; a no-op in a single process."""
    if _world() == 1:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:  # the same buffer layout on every process
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= _world()
    for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(mean)


def _latent_pool(rng: random.Random, vae: Any, scale: float) -> tuple[list[Scene], torch.Tensor]:
    """`_LATENT_POOL` scenes (this process's share) and their latents, encoded once: the
    UNet phase then draws its batches from them instead of encoding every batch (a fifth of
    a step's time on one thread). Empty when the pool is off."""
    scenes = [random_training_scene(rng) for _ in range(_share(_LATENT_POOL))]
    chunks = []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            x = _layout(draw_scenes(scenes[i : i + 256]))
            chunks.append(vae.encode(x).latent_dist.mode() * scale)
    latents = torch.cat(chunks).contiguous() if chunks else torch.empty(0)
    return scenes, latents


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if _CHANNELS_LAST else x


def _latent_diff(
    z0: torch.Tensor, others: list[Scene], vae: Any, scale: float, per: str = "image"
) -> torch.Tensor:
    """Where each scene's latent differs from its counterfactual, scaled to 1 at the most
    (per image, or over the whole batch with `per="batch"`)."""
    z_other = vae.encode(draw_scenes(others)).latent_dist.mode() * scale
    diff = (z0 - z_other).abs().mean(dim=1, keepdim=True)
    dims = (0, 1, 2, 3) if per == "batch" else (2, 3)
    return diff / diff.amax(dim=dims, keepdim=True).clamp_min(1e-6)


def _contrast_weight(
    scenes: list[Scene], z0: torch.Tensor, vae: Any, scale: float, t: torch.Tensor
) -> torch.Tensor:
    """Per-latent-pixel loss weight where the shape (and position) words matter."""
    others = [dataclasses.replace(s, shape=_CONTRAST_OF[s.shape]) for s in scenes]
    per = "batch" if _CONTRAST_SCOPE == "batch" else "image"
    weight = 1.0 + _CONTRAST_WEIGHT * _latent_diff(z0, others, vae, scale, per)
    applies = t < _CONTRAST_BELOW
    if _CONTRAST_SCOPE == "unplaced":
        applies &= torch.tensor([s.position is None for s in scenes])
    weight = torch.where(applies.view(-1, 1, 1, 1), weight, 1.0)
    if _POSITION_CONTRAST:
        mirrored = [_mirrored(s) for s in scenes]
        placed = torch.tensor([s.position in _MIRROR for s in scenes]).view(-1, 1, 1, 1)
        pos = _latent_diff(z0, mirrored, vae, scale)
        weight = weight + _POSITION_CONTRAST * torch.where(placed, pos, 0.0)
    return weight


def _unet_scene(rng: random.Random) -> Scene:
    """A UNet-phase scene: the training draw, an unqualified radius pulled in by
    `_RADIUS_SPREAD`, its shape redrawn by `_SHAPE_WEIGHTS` if set."""
    scene = random_training_scene(rng, _POSITION_SHARE)
    if _RADIUS_SPREAD != 4.0 and scene.position is None and scene.size is None:
        scene = dataclasses.replace(scene, radius=15.0 + (scene.radius - 15.0) * _RADIUS_SPREAD / 4)
    if _SHAPE_WEIGHTS is None:
        return scene
    shape = rng.choices(SHAPES, weights=_SHAPE_WEIGHTS)[0]
    # a large triangle sits 0.3 r lower so that its box, not its centroid, is centred
    lift = 0.3 * scene.radius if scene.size == "large" else 0.0
    cy = scene.cy - lift * (scene.shape == "triangle") + lift * (shape == "triangle")
    return dataclasses.replace(scene, shape=shape, cy=cy)


def _mirrored(scene: Scene) -> Scene:
    """The scene with its position word (and the shape) mirrored; unplaced scenes unchanged."""
    if scene.position not in _MIRROR:
        return scene
    return dataclasses.replace(
        scene, position=_MIRROR[scene.position], cx=IMAGE_SIZE - scene.cx, cy=IMAGE_SIZE - scene.cy
    )


def train_diffusion(
    steps: int, rng: random.Random, vae: Any, scale: float, tokenizer: Any
) -> tuple[Any, Any]:
    """Train text encoder + UNet jointly on v-prediction; return the EMA copies."""
    import copy

    text_encoder = _make_text_encoder(tokenizer)
    unet = _make_unet()
    if _CHANNELS_LAST:
        unet.to(memory_format=torch.channels_last)
    if _CLASSIC_ATTENTION:  # training only: the saved config loads the default processor
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    params = [*text_encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=_FUSED_STEP or None)
    ema_te, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    ema_params = [*ema_te.parameters(), *ema_unet.parameters()]
    alphas = _make_scheduler().alphas_cumprod.float()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    token_cache: dict[str, torch.Tensor] = {}
    focus_odds = torch.tensor(_FOCUS_WEIGHTS or (), dtype=torch.float64)

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

    pool, pool_z = _latent_pool(rng, vae, scale)
    started = time.perf_counter()
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, _UNET_LR))
        if pool:
            picked = torch.randint(0, len(pool), (_share(_UNET_BATCH),), generator=gen)
            scenes = [pool[i] for i in picked.tolist()]
        else:
            scenes = [_unet_scene(rng) for _ in range(_share(_UNET_BATCH))]
        captions = [s.caption if rng.random() >= _CFG_DROPOUT else "" for s in scenes]
        ids = torch.stack([tokens(c) for c in captions])
        t = torch.randint(0, len(alphas), (len(scenes),), generator=gen)
        # Half the batch at the timesteps an 8-step trailing sampler visits (999, 874, ...,
        # 124): the default render then runs on the steps the model saw most.
        if _FOCUS_WEIGHTS is None:
            focus = torch.randint(0, DEFAULT_STEPS, t.shape, generator=gen)
        else:  # the sampler's steps in its order (999 first), at these relative odds
            focus = torch.multinomial(focus_odds, len(t), replacement=True, generator=gen)
        focused = len(alphas) - 1 - focus * (len(alphas) // DEFAULT_STEPS)
        at_focus = (
            torch.arange(len(t)) % 2 == 0
            if _FOCUS_SHARE == 0.5  # the pre-session-19 draw, unchanged
            else torch.arange(len(t)) < round(_FOCUS_SHARE * len(t))
        )
        t = torch.where(at_focus, focused, t)
        with torch.no_grad():
            if pool:
                z0 = pool_z[picked]
            else:
                z0 = vae.encode(_layout(draw_scenes(scenes))).latent_dist.mode() * scale
            contrast = _CONTRAST_WEIGHT or _POSITION_CONTRAST
            contrast = contrast and step < _CONTRAST_UNTIL * steps
            weight = _contrast_weight(scenes, z0, vae, scale, t) if contrast else None
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = _layout(a.sqrt() * z0 + (1 - a).sqrt() * eps)
        target = a.sqrt() * eps - (1 - a).sqrt() * z0
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, cond).sample
        if weight is None:
            loss = F.mse_loss(pred, target)
        else:
            loss = (weight * (pred - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=_FUSED_STEP or None)
        opt.step()
        decay = min(_EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            if _FUSED_STEP:
                torch._foreach_lerp_(ema_params, params, 1.0 - decay)
            else:
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
    if _CHANNELS_LAST:  # saved weights in the usual layout (safetensors wants contiguous)
        ema_unet.to(memory_format=torch.contiguous_format)
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


def train(
    out: Path,
    seed: int = DEFAULT_SEED,
    vae_steps: int = DEFAULT_VAE_STEPS,
    unet_steps: int = DEFAULT_UNET_STEPS,
    procs: int = DEFAULT_PROCS,
) -> Path:
    """Train both phases and save a diffusers folder at `out` (replaced if present).

    `procs` > 1 trains the VAE here, as a one-process run does, then the UNet phase
    data-parallel in that many processes of one thread each (gloo over a file store, no
    network): each draws its share of every batch and all step with the mean gradient. On
    these small tensors two one-thread processes step the UNet ~1.2x faster than one process
    with two threads (docs/MODEL.md, sessions 19-20)."""
    logger.info(
        "training %s: %d vae steps, %d unet steps, %d process(es)",
        SHAPES_MODEL_ID,
        vae_steps,
        unet_steps,
        procs,
    )
    if procs == 1:
        _train(out, seed, vae_steps, unet_steps)
    else:
        import torch.multiprocessing as mp

        knobs = {name: globals()[name] for name in _KNOBS}
        with tempfile.TemporaryDirectory() as tmp:
            # The autoencoder trains here, as in a one-process run (two processes step it no
            # faster): every rank then starts the UNet phase from the same VAE, scale and RNGs.
            vae, scale, rng = _vae_phase(seed, vae_steps)
            handoff = Path(tmp) / "vae.pt"
            torch.save(
                {
                    "vae": vae.state_dict(),
                    "scale": scale,
                    "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                },
                handoff,
            )
            store = str(Path(tmp) / "store")
            args = (procs, store, str(out), seed, str(handoff), unet_steps, knobs)
            mp.spawn(_train_rank, args=args, nprocs=procs)
    _add_ddim_keys(out / "scheduler" / "scheduler_config.json")
    return out


_KNOBS = (
    "_CONTRAST_WEIGHT",
    "_CONTRAST_BELOW",
    "_POSITION_CONTRAST",
    "_CONTRAST_SCOPE",
    "_CONTRAST_UNTIL",
    "_PLACEMENT_JITTER",
    "_RADIUS_SPREAD",
    "_POSITION_SHARE",
    "_JITTER_POSITIONED",
    "_VAE_LATENT_NOISE",
    "_FOCUS_SHARE",
    "_CHANNELS_LAST",
    "_UNET_BATCH",
    "_FUSED_STEP",
    "_CLASSIC_ATTENTION",
    "_LATENT_POOL",
    "_SHAPE_WEIGHTS",
    "_SCALE_SHIFT",
    "_FOCUS_WEIGHTS",
    "_EMA_DECAY",
    "_UNET_LR",
)
"""Module settings a spawned training process must share with its parent (`main` sets them
from the command line; a spawned process imports this module afresh)."""


def _train_rank(
    rank: int,
    procs: int,
    store: str,
    out: str,
    seed: int,
    handoff: str,
    unet_steps: int,
    knobs: dict[str, Any],
) -> None:
    """One process of a data-parallel UNet phase, from the parent's trained VAE."""
    import torch.distributed as dist

    globals().update(knobs)
    torch.set_num_threads(1)
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s")
    state = torch.load(handoff, weights_only=False)
    vae = _make_vae()
    if _CHANNELS_LAST:
        vae.to(memory_format=torch.channels_last)
    vae.load_state_dict(state["vae"])
    vae.eval()
    torch.set_rng_state(state["torch_rng"])  # the same initial UNet on every rank
    rng = random.Random()
    if rank == 0:  # rank 0 goes on as a one-process run would
        rng.setstate(state["rng"])
    else:  # the others draw their own scenes and noise
        rng.seed(seed + 7919 * rank)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=procs)
    try:
        _train_unet(Path(out), unet_steps, rng, vae, state["scale"], rank)
    finally:
        dist.destroy_process_group()


def _train(out: Path, seed: int, vae_steps: int, unet_steps: int) -> None:
    """Both phases in this process."""
    vae, scale, rng = _vae_phase(seed, vae_steps)
    _train_unet(out, unet_steps, rng, vae, scale)


def _vae_phase(seed: int, vae_steps: int) -> tuple[Any, float, random.Random]:
    """The seeded start of every run and its autoencoder: the VAE, its scale and the scene
    RNG the UNet phase goes on with."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae, scale = train_vae(vae_steps, rng)
    return vae, scale, rng


def _train_unet(
    out: Path, unet_steps: int, rng: random.Random, vae: Any, scale: float, rank: int = 0
) -> None:
    """The diffusion phase on a trained VAE; rank 0 saves the pipeline folder."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        tokenizer = _make_tokenizer(tok_dir)
        vae.register_to_config(scaling_factor=scale)
        text_encoder, unet = train_diffusion(unet_steps, rng, vae, scale, tokenizer)
        vae.to(memory_format=torch.contiguous_format)
        if rank != 0:
            return
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


def _add_ddim_keys(path: Path) -> None:
    """Make a job's `ddim` scheduler (built from this config) work: DDIM clips x0 to [-1, 1]
    by default, which wrecks unit-variance latents. Euler ignores these keys, as SD 1.5's own
    scheduler config carries them too."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update(clip_sample=False, set_alpha_to_one=False)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (with --procs > 1: one each)"
    )
    parser.add_argument(
        "--procs", type=int, default=DEFAULT_PROCS, help="data-parallel processes (1: no spawn)"
    )
    parser.add_argument(
        "--contrast-weight",
        type=float,
        default=_CONTRAST_WEIGHT,
        help="UNet loss weight where circle and square differ (0: the shipped recipe)",
    )
    parser.add_argument(
        "--contrast-below", type=int, default=_CONTRAST_BELOW, help="only at timesteps below"
    )
    parser.add_argument(
        "--position-contrast",
        type=float,
        default=_POSITION_CONTRAST,
        help="UNet loss weight where mirrored positions differ (0: the shipped recipe)",
    )
    parser.add_argument(
        "--contrast-scope",
        choices=("image", "batch", "unplaced"),
        default=_CONTRAST_SCOPE,
        help="contrast weight scaled per image, per batch, or only on unplaced scenes",
    )
    parser.add_argument(
        "--contrast-until",
        type=float,
        default=_CONTRAST_UNTIL,
        help="fraction of the UNet steps with the contrast weight (1.0: all)",
    )
    parser.add_argument(
        "--placement-jitter",
        type=float,
        default=_PLACEMENT_JITTER,
        help="px a shape's centre strays from its caption's place (0 as shipped, 8 before)",
    )
    parser.add_argument(
        "--positioned-full-stray",
        action="store_true",
        help="positioned scenes keep the shipped cross-axis stray (jitter only the others)",
    )
    parser.add_argument(
        "--vae-latent-noise",
        type=float,
        default=_VAE_LATENT_NOISE,
        help="decoder trained on latents with up to this much relative noise (0: none)",
    )
    parser.add_argument(
        "--radius-spread",
        type=float,
        default=_RADIUS_SPREAD,
        help="px an unqualified scene's radius strays from 15 (1 as shipped; 4: 11-19)",
    )
    parser.add_argument(
        "--position-share",
        type=float,
        default=_POSITION_SHARE,
        help="share of UNet-phase captions with a position word",
    )
    parser.add_argument("--vae-steps", type=int, default=DEFAULT_VAE_STEPS)
    parser.add_argument("--unet-steps", type=int, default=DEFAULT_UNET_STEPS)
    parser.add_argument("--unet-batch", type=int, default=_UNET_BATCH, help="UNet batch size")
    parser.add_argument(
        "--focus-share",
        type=float,
        default=_FOCUS_SHARE,
        help="share of each UNet batch at the 8-step sampler's timesteps",
    )
    for switch, on, about in (
        ("--channels-last", _CHANNELS_LAST, "convolutions in channels-last layout (faster on CPU)"),
        ("--fused-step", _FUSED_STEP, "fused AdamW, foreach clipping and EMA in the UNet phase"),
        ("--classic-attention", _CLASSIC_ATTENTION, "UNet attention as bmm + softmax in training"),
    ):
        parser.add_argument(switch, action=argparse.BooleanOptionalAction, default=on, help=about)
    parser.add_argument(
        "--latent-pool", type=int, default=_LATENT_POOL, help="scenes encoded once (0: none)"
    )
    for flag, default, text in (
        ("--shape-weights", _SHAPE_WEIGHTS, "odds of circle,square,triangle, e.g. 1,2,1"),
        ("--focus-weights", _FOCUS_WEIGHTS, "odds of the 8 sampler timesteps, 999 first"),
    ):
        parser.add_argument(flag, type=_floats, default=default, help=text)
    parser.add_argument(
        "--ema-decay", type=float, default=_EMA_DECAY, help="decay of the saved weights' average"
    )
    parser.add_argument("--unet-lr", type=float, default=_UNET_LR, help="UNet phase's peak lr")
    parser.add_argument(
        "--scale-shift",
        action=argparse.BooleanOptionalAction,
        default=_SCALE_SHIFT,
        help="condition ResNet blocks by scale and shift (AdaGN), not shift alone",
    )
    parser.add_argument("--eval", type=int, default=50, help="prompts to score after (0: skip)")
    args = parser.parse_args(argv)
    if args.focus_weights is not None and len(args.focus_weights) != DEFAULT_STEPS:
        parser.error(f"--focus-weights needs {DEFAULT_STEPS} odds, one per sampler step")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    # each knob from its option (`_UNET_BATCH` <- `--unet-batch`), one the other way round
    inverted = {"_JITTER_POSITIONED": not args.positioned_full_stray}
    globals().update({n: getattr(args, n[1:].lower()) for n in _KNOBS if n not in inverted})
    globals().update(inverted)
    started = time.perf_counter()
    out = train(args.out, args.seed, args.vae_steps, args.unet_steps, args.procs)
    logger.info("saved %s in %.1f min", out, (time.perf_counter() - started) / 60)
    if args.eval:
        for steps in (DEFAULT_STEPS, 12):
            score = evaluate(out, n=args.eval, steps=steps)
            logger.info("colour adherence at %d steps: %.0f%%", steps, 100 * score)


if __name__ == "__main__":
    main()
