"""A tiny Stable-Diffusion-style pipeline built offline from configs.

Why: CPU tests and the embedded default need a model that renders in milliseconds and never
touches a model hub. The weights are random (seeded), so images are noise-like, but the whole
diffusers code path (tokenizer, text encoder, UNet, scheduler, VAE) runs exactly as for SD 1.5.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "sogni-tiny-sd"
"""Registry id and cache folder name of the tiny model."""

TINY_IMAGE_SIZE = 64
"""Native image size in pixels; the VAE downsamples by 4, so latents are 16x16."""

_VAE_SCALE = 4

TINY_DEFAULT_STEPS = 4
TINY_DEFAULT_GUIDANCE = 5.0

_INIT_SEED = 20240601
"""Fixed torch seed for the random init: the same torch version builds the same weights."""

_MAX_TOKENS = 77
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"

_WORD_TEXT = """
red green blue yellow orange purple pink brown black white gray grey gold silver
circle square triangle star heart cube sphere cone ring line dot
a an the of on in with and photo painting sky sun moon sea tree house cat dog
light dark small big background
"""
"""Colours, shapes and a few scene words that get whole-word tokens (merges are learned)."""

_WORDS = _WORD_TEXT.split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on the word list until every word is one token.

    Learning the merges (rather than hand-writing them) keeps their ranks consistent, so each
    listed word tokenizes to a single id, as in the real CLIP vocabulary.
    """
    seqs = [[*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for seq in seqs:
            pairs.update(itertools.pairwise(seq))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if (seq[i], seq[i + 1]) == best:
                    seq[i : i + 2] = [joined]
                i += 1


def write_tiny_tokenizer(folder: Path) -> None:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, config) with a tiny vocabulary.

    Layout follows CLIP: 256 byte symbols, the same with `</w>`, merged tokens, then specials.
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = _learn_merges(_WORDS)
    vocab_list += [a + b for a, b in merges]
    vocab_list += [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _MAX_TOKENS,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": _EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _build_pipeline(tokenizer_dir: Path):  # -> StableDiffusionPipeline (lazy import)
    """Build the pipeline with seeded random weights, leaving the global RNG untouched."""
    import torch  # lazy: the registry imports this module and must stay cheap to import
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_INIT_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=_MAX_TOKENS,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // _VAE_SCALE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            sample_size=TINY_IMAGE_SIZE,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            # Three blocks = two 2x downsamplings (scale 4): 64 px <-> 16x16 latents, which
            # halves the UNet cost per step compared with 32x32 latents.
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=32,
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def is_complete(folder: Path) -> bool:
    """A folder counts as built only when it holds model_index.json (written before rename)."""
    return (folder / "model_index.json").is_file()


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Return `cache_dir/sogni-tiny-sd`, building it first if it is missing.

    The build goes into a temporary sibling folder that is renamed into place, so a crash or a
    concurrent builder never leaves a half-written model that `from_pretrained` would load.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / TINY_MODEL_ID
    if is_complete(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_ID}.", dir=cache_dir))
    try:
        write_tiny_tokenizer(tmp / "_tokenizer_src")
        pipe = _build_pipeline(tmp / "_tokenizer_src")
        out = tmp / "model"
        pipe.save_pretrained(str(out), safe_serialization=True)
        # Keep the plain BPE files next to tokenizer.json so older/other loaders work too.
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tmp / "_tokenizer_src" / name, out / "tokenizer" / name)
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # a leftover from an interrupted non-atomic copy
        try:
            os.rename(out, final)
        except OSError:
            if not is_complete(final):  # lost a race only if the winner finished
                raise
        logger.info("built tiny model %s at %s", TINY_MODEL_ID, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


_UNET_ATTN = "down_blocks.1.attentions.0.transformer_blocks.0"
_TE_ATTN = "text_model.encoder.layers.0.self_attn"


def write_tiny_lora(path: Path, seed: int, rank: int = 4) -> Path:
    """A seeded LoRA for the tiny model in kohya layout (underscored names, down/up, alpha).

    Why: LoRA jobs need a real file to install and merge, and none can be downloaded; this one
    touches a UNet self- and cross-attention projection and a text-encoder projection.
    """
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, d_in, d_out in [
        (f"lora_unet_{_UNET_ATTN}.attn1.to_q", 64, 64),
        (f"lora_unet_{_UNET_ATTN}.attn2.to_k", 32, 64),
        (f"lora_te_{_TE_ATTN}.q_proj", 32, 32),
    ]:
        key = name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, d_in, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(d_out, rank, generator=g) * 0.5
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path
