"""A LoRA built for another model is refused before rendering, with the reason: at
`loras add --model` and when a job applies it (the node logs the reason, the weights stay).

Real parts: the tiny diffusers model on CPU, real safetensors LoRA files: one of the right
layer names but another model's widths, one naming layers this model does not have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from structlog.testing import capture_logs
from typer.testing import CliRunner

from sogni_node.cli import app
from sogni_node.models.tiny import TINY_MODEL_ID, write_tiny_lora
from sogni_node.render.backend import Lora, RenderError, RenderJob
from sogni_node.render.diffusers_backend import DiffusersBackend, LoraRefused
from sogni_node.render.lora import LoraMismatch, applied_loras, lora_fit_problem

UNET_ATTN = "down_blocks_1_attentions_0_transformer_blocks_0"


def _wider_lora(path: Path, width: int = 320) -> Path:
    """The tiny model's layer names at another model's width (as SD 1.5's 320 channels)."""
    g = torch.Generator().manual_seed(7)
    key = f"lora_unet_{UNET_ATTN}_attn1_to_q"
    save_file(
        {
            f"{key}.lora_down.weight": torch.randn(4, width, generator=g),
            f"{key}.lora_up.weight": torch.randn(width, 4, generator=g),
            f"{key}.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    return path


def _foreign_lora(path: Path) -> Path:
    """Layers of an SDXL UNet, which the tiny model does not have."""
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{key}.lora_down.weight": torch.zeros(4, 640),
            f"{key}.lora_up.weight": torch.zeros(640, 4),
        },
        str(path),
    )
    return path


def _weights(pipe: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_the_fit_check_names_the_misfit_and_changes_nothing(
    backend: DiffusersBackend, tmp_path: Path
) -> None:
    wide = _wider_lora(tmp_path / "wide.safetensors")
    foreign = _foreign_lora(tmp_path / "sdxl.safetensors")
    good = write_tiny_lora(tmp_path / "good.safetensors", seed=1)
    assert backend.lora_fit(TINY_MODEL_ID, good) is None
    problem = backend.lora_fit(TINY_MODEL_ID, wide)
    assert problem is not None
    assert "wide.safetensors was built for another model: 1 of 1 layers" in problem
    assert "(4, 320)" in problem and "does not fit weight (64, 64)" in problem
    problem = backend.lora_fit(TINY_MODEL_ID, foreign)
    assert problem is not None and "matches no Linear/Conv2d layer" in problem

    pipe = backend._get(TINY_MODEL_ID).pipe
    before = _weights(pipe)
    assert lora_fit_problem(pipe, wide) is not None
    with pytest.raises(LoraMismatch), applied_loras(pipe, [Lora(good), Lora(wide)]):
        pass
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_job_with_a_misfit_lora_is_refused_and_the_node_logs_why(
    backend: DiffusersBackend, tmp_path: Path
) -> None:
    job = RenderJob(
        model_id=TINY_MODEL_ID,
        prompt="a red circle",
        negative_prompt="",
        steps=2,
        guidance=4.0,
        scheduler=None,
        width=64,
        height=64,
        seed=1,
        loras=(Lora(_wider_lora(tmp_path / "wide.safetensors")),),
    )
    with capture_logs() as logs, pytest.raises(RenderError, match="built for another model") as e:
        backend.render(job, lambda _s: None, lambda: False)
    assert isinstance(e.value, LoraRefused) and "a red circle" not in e.value.refusal
    [refused] = [e for e in logs if e["event"] == "lora_refused"]
    assert "does not fit weight (64, 64)" in refused["reason"]
    assert refused["model"] == TINY_MODEL_ID


def test_loras_add_with_a_model_refuses_a_misfit(tmp_path: Path) -> None:
    models = tmp_path / "models"
    runner = CliRunner()

    def add(path: Path) -> Any:
        return runner.invoke(
            app,
            ["loras", "add", str(path), "--model", TINY_MODEL_ID, "--models-dir", str(models)],
        )

    refused = add(_wider_lora(tmp_path / "wide.safetensors"))
    assert refused.exit_code == 3
    assert "does not fit model sogni-tiny-sd" in refused.output
    assert f"use a LoRA trained for {TINY_MODEL_ID}" in refused.output
    assert "Traceback" not in refused.output
    listed = runner.invoke(app, ["loras", "list", "--models-dir", str(models)])
    assert "no LoRAs installed" in listed.output  # nothing was installed

    added = add(write_tiny_lora(tmp_path / "glow.safetensors", seed=1))
    assert added.exit_code == 0, added.output
    assert f"added LoRA glow (fits {TINY_MODEL_ID})" in added.output

    unknown = runner.invoke(
        app,
        [
            "loras",
            "add",
            str(tmp_path / "wide.safetensors"),
            "--model",
            "nope",
            "--models-dir",
            str(models),
        ],
    )
    assert unknown.exit_code == 3 and "model 'nope' is not on this node" in unknown.output
