"""The tiny model builds offline, reproducibly and atomically, and loads with plain diffusers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from sogni_node.models import TINY_MODEL_ID, ensure_tiny_model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_layout(model_cache: Path, tiny_path: Path) -> None:
    assert tiny_path == model_cache / TINY_MODEL_ID
    for rel in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ):
        assert (tiny_path / rel).is_file(), rel
    # The temporary build folder was renamed away, not left behind.
    assert [p.name for p in model_cache.iterdir()] == [TINY_MODEL_ID]


def test_reloads_with_plain_diffusers(tiny_path: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, local_files_only=True)
    assert pipe.safety_checker is None
    assert pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.text_encoder.config.hidden_size == 32
    assert pipe.unet.config.cross_attention_dim == 32
    assert pipe.vae.config.latent_channels == 4
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


def test_tokenizer_loads_offline_and_knows_words(tiny_path: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(tiny_path / "tokenizer", local_files_only=True)
    assert tok.model_max_length == 77
    ids = tok("A Red circle").input_ids
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    # Words outside the tiny vocabulary fall back to byte-level pieces, never to unknown.
    assert tok.unk_token_id not in tok("zebra ünïcode 🙂").input_ids[1:-1]


def test_ensure_is_idempotent(model_cache: Path, tiny_path: Path) -> None:
    before = (tiny_path / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model(model_cache) == tiny_path
    assert (tiny_path / "model_index.json").stat().st_mtime_ns == before


def test_build_is_reproducible_and_keeps_global_rng(tmp_path: Path, tiny_path: Path) -> None:
    rng_before = torch.get_rng_state()
    other = ensure_tiny_model(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert _sha(other / rel) == _sha(tiny_path / rel), rel
