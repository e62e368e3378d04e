"""Per-job options on the real CPU backend: LoRAs from the node's library, JPEG/WebP output."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from typer.testing import CliRunner

from sogni_node.cli import app
from sogni_node.models import TINY_MODEL_ID
from sogni_node.models.loras import LoraLibrary, LoraLibraryError
from sogni_node.models.registry import SHAPES_MODEL_ID, shapes_model_spec
from sogni_node.models.tiny import write_tiny_lora
from sogni_node.render import RenderError, RenderJob
from sogni_node.render.diffusers_backend import DiffusersBackend
from sogni_node.render.encoding import encode_image
from sogni_node.worker import _render_job
from sogni_protocol.image_types import extension_of, format_of
from sogni_protocol.messages import JobParams, LoraRef

JOB = RenderJob(
    model_id=TINY_MODEL_ID,
    prompt="a red circle on a blue background",
    negative_prompt="",
    steps=3,
    guidance=5.0,
    scheduler=None,
    width=64,
    height=64,
    seed=77,
)


def _render(backend: DiffusersBackend, job: RenderJob) -> bytes:
    return backend.render(job, lambda _i: None, lambda: False).image


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


@pytest.fixture
def library(tmp_path: Path) -> LoraLibrary:
    lib = LoraLibrary(tmp_path / "models")
    lib.add(write_tiny_lora(tmp_path / "Glow Style.safetensors", seed=1))
    lib.add(write_tiny_lora(tmp_path / "b.safetensors", seed=2), "ink")
    return lib


# --- the library ---------------------------------------------------------------------------


def test_add_lists_and_resolves_in_the_jobs_order(library: LoraLibrary) -> None:
    assert library.ids() == ["glow_style", "ink"]
    loras = library.resolve([LoraRef(id="ink", strength=0.5), LoraRef(id="glow_style")])
    assert [(lora.path.name, lora.strength) for lora in loras] == [
        ("ink.safetensors", 0.5),
        ("glow_style.safetensors", 1.0),
    ]


def test_bad_additions_are_refused_naming_the_problem(library: LoraLibrary, tmp_path: Path) -> None:
    with pytest.raises(LoraLibraryError, match="'ink' is already installed"):
        library.add(write_tiny_lora(tmp_path / "ink.safetensors", seed=3), "ink")
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": np.zeros((2, 2), np.float32)}, str(loha))
    with pytest.raises(ValueError, match=r"loha.safetensors: unsupported LoRA key"):
        library.add(loha)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoraLibraryError, match=r"expected a LoRA .safetensors file"):
        library.add(tmp_path / "notes.txt")
    assert library.ids() == ["glow_style", "ink"]


def test_changed_truncated_or_unknown_files_are_refused(library: LoraLibrary) -> None:
    path = library.check("ink")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LoraLibraryError, match=r"'ink'.*does not match its recorded sha256"):
        library.check("ink")
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(LoraLibraryError, match=r"'ink'.*truncated or changed"):
        library.resolve([LoraRef(id="ink")])
    with pytest.raises(LoraLibraryError, match="'nope' is not installed"):
        library.resolve([LoraRef(id="nope")])
    with pytest.raises(LoraLibraryError, match="at most 8 LoRAs per job, got 9"):
        library.resolve([LoraRef(id="glow_style")] * 9)
    assert library.verify() == {"glow_style": None, "ink": library.verify("ink")["ink"]}
    assert library.verify("ink")["ink"] is not None


def test_loras_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    models = ["--models-dir", str(tmp_path / "models")]
    src = write_tiny_lora(tmp_path / "detail.safetensors", seed=4)

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["loras", *args, *models])
        return result.exit_code, result.output

    assert run("list") == (0, "no LoRAs installed\n")
    assert run("add", str(src)) == (0, "added LoRA detail\n")
    code, out = run("list")
    assert code == 0 and out.startswith("detail  ")
    assert run("verify") == (0, "detail: ok\n")
    (tmp_path / "models" / "loras" / "detail.safetensors").write_bytes(b"x")
    code, out = run("verify")
    assert code == 1 and "detail: BAD:" in out
    assert run("remove", "detail") == (0, "removed LoRA detail\n")
    code, out = run("remove", "detail")
    assert code == 3 and "not installed" in out  # refused


# --- rendering with LoRAs ------------------------------------------------------------------


def test_wire_params_become_a_job_with_checked_files(library: LoraLibrary) -> None:
    params = JobParams(
        model_id=TINY_MODEL_ID,
        positive_prompt="x",
        steps=3,
        guidance=5.0,
        width=64,
        height=64,
        seed=1,
        loras=[LoraRef(id="glow_style", strength=0.75)],
        output_format="webp",
    )
    job = _render_job(params, library)
    assert [(lora.path, lora.strength) for lora in job.loras] == [
        (library.check("glow_style"), 0.75)
    ]
    assert job.output_format == "webp"
    with pytest.raises(ValueError, match="no LoRA library"):
        _render_job(params, None)


def test_a_lora_job_changes_the_image_and_the_next_job_is_untouched(
    backend: DiffusersBackend, library: LoraLibrary
) -> None:
    base = _render(backend, JOB)
    one = library.resolve([LoraRef(id="glow_style")])
    styled = _render(backend, replace(JOB, loras=one))
    assert styled != base
    assert _render(backend, replace(JOB, loras=one)) == styled  # deterministic with LoRAs too
    both = library.resolve([LoraRef(id="glow_style"), LoraRef(id="ink", strength=-0.5)])
    assert _render(backend, replace(JOB, loras=both)) not in (base, styled)
    assert _render(backend, JOB) == base  # weights restored bit-exactly


def test_a_lora_for_another_model_fails_the_job_clearly(
    backend: DiffusersBackend, tmp_path: Path
) -> None:
    lib = LoraLibrary(tmp_path / "models")
    other = tmp_path / "sdxl_only.safetensors"
    save_file(
        {
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros(
                (2, 32), np.float32
            ),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros(
                (32, 2), np.float32
            ),
        },
        str(other),
    )
    lib.add(other)
    job = replace(JOB, loras=lib.resolve([LoraRef(id="sdxl_only")]))
    with pytest.raises(RenderError, match=r"sdxl_only.safetensors.*matches no Linear/Conv2d"):
        _render(backend, job)


# --- output formats ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_are_deterministic_plain_and_close_to_png(
    backend: DiffusersBackend, fmt: str
) -> None:
    spec = shapes_model_spec()  # a real picture: lossy codecs are meant for those, not noise
    shapes = replace(
        JOB, model_id=SHAPES_MODEL_ID, steps=spec.default_steps, guidance=spec.default_guidance
    )
    png = _render(backend, shapes)
    data = _render(backend, replace(shapes, output_format=fmt))
    assert _render(backend, replace(shapes, output_format=fmt)) == data
    assert format_of(data) == fmt and extension_of(data) == {"jpeg": "jpg", "webp": "webp"}[fmt]
    img = Image.open(io.BytesIO(data))
    assert img.size == (64, 64)
    assert not img.info.get("exif") and not img.info.get("icc_profile") and not img.getexif()
    mse = float(np.mean((_pixels(data) - _pixels(png)) ** 2))
    # measured: jpeg 31.7 dB, webp 31.7 dB at 64x64 (small images are the worst case)
    psnr = 10 * np.log10(255**2 / max(mse, 1e-9))
    assert psnr > 28, f"{fmt} is {psnr:.1f} dB from the PNG"


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown output format 'gif'"):
        encode_image(np.zeros((8, 8, 3), np.uint8), "gif")
    assert format_of(b"GIF89a") is None and extension_of(b"GIF89a") == "bin"
