"""Core ML conversion, palettization, cache and the Linux refusal (coremltools runs on Linux).

One module-scoped conversion feeds every test: converting even the tiny model costs seconds.
"""

from __future__ import annotations

import io
import platform
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sogni_node.models import ModelRegistry
from sogni_node.models.tiny import TINY_MODEL_ID
from sogni_node.render.backend import RenderJob
from sogni_node.render.diffusers_backend import DiffusersBackend

ct = pytest.importorskip("coremltools", reason="coremltools not installed (the `coreml` extra)")
pytest.importorskip("sklearn", reason="scikit-learn not installed (k-means palettization)")

from sogni_node.render.coreml_backend import (  # noqa: E402
    BackendUnavailable,
    CoreMLBackend,
    CoreMLParts,
    run_coreml_pipeline,
)
from sogni_node.render.coreml_convert import (  # noqa: E402
    PACKAGES,
    ConvertedModel,
    convert_pipeline,
    package_bytes,
)

pytestmark = pytest.mark.skipif(
    platform.system() == "Darwin", reason="checks the non-macOS behaviour"
)


@pytest.fixture(scope="module")
def coreml_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("coreml")


@pytest.fixture(scope="module")
def converted(tiny_path: Path, coreml_cache: Path) -> dict[int | None, ConvertedModel]:
    return {nb: convert_pipeline(tiny_path, coreml_cache, nbits=nb) for nb in (None, 6, 4)}


def _op_counts(package: Path) -> Counter[str]:
    model = ct.models.MLModel(str(package), skip_model_load=True)
    program = model.get_spec().mlProgram
    return Counter(
        op.type
        for fn in program.functions.values()
        for block in fn.block_specializations.values()
        for op in block.operations
    )


def test_conversion_writes_three_mlprograms(converted: dict[int | None, ConvertedModel]) -> None:
    fp16 = converted[None]
    assert not fp16.cache_hit
    for name in PACKAGES:
        spec = ct.models.MLModel(str(fp16.folder / name), skip_model_load=True).get_spec()
        assert spec.WhichOneof("Type") == "mlProgram", name
    unet_inputs = {
        i.name
        for i in ct.models.MLModel(str(fp16.unet), skip_model_load=True)
        .get_spec()
        .description.input
    }
    assert unet_inputs == {"sample", "timestep", "encoder_hidden_states"}
    assert fp16.manifest["latent_shape"] == [4, 16, 16]


def test_palettization_shrinks_packages(converted: dict[int | None, ConvertedModel]) -> None:
    sizes = {nb: {n: package_bytes(c.folder / n) for n in PACKAGES} for nb, c in converted.items()}
    for name in PACKAGES:
        assert sizes[None][name] > sizes[6][name] > sizes[4][name], (name, sizes)
    assert sizes[6][PACKAGES[1]] < 0.6 * sizes[None][PACKAGES[1]]
    assert _op_counts(converted[None].unet)["constexpr_lut_to_dense"] == 0
    for nb in (6, 4):
        assert _op_counts(converted[nb].unet)["constexpr_lut_to_dense"] > 10
        assert converted[nb].manifest["nbits"] == nb


def test_second_call_hits_the_cache(
    tiny_path: Path, coreml_cache: Path, converted: dict[int | None, ConvertedModel]
) -> None:
    for nb in (None, 6, 4):
        again = convert_pipeline(tiny_path, coreml_cache, nbits=nb)
        assert again.cache_hit and again.folder == converted[nb].folder
        assert again.seconds < 1.0


def test_bad_nbits_refused(tiny_path: Path, coreml_cache: Path) -> None:
    with pytest.raises(ValueError, match="nbits"):
        convert_pipeline(tiny_path, coreml_cache, nbits=3)


def _job(**kw: Any) -> RenderJob:
    base: dict[str, Any] = dict(
        model_id=TINY_MODEL_ID,
        prompt="red circle",
        negative_prompt="",
        steps=3,
        guidance=5.0,
        scheduler=None,
        width=64,
        height=64,
        seed=7,
    )
    return RenderJob(**(base | kw))


def test_render_on_linux_says_where_packages_are(
    registry: ModelRegistry, coreml_cache: Path, converted: dict[int | None, ConvertedModel]
) -> None:
    backend = CoreMLBackend(registry, coreml_cache, nbits=6)
    assert backend.prepare(TINY_MODEL_ID).cache_hit
    with pytest.raises(BackendUnavailable) as info:
        backend.render(_job(), lambda _k: None, lambda: False)
    message = str(info.value)
    assert message == (
        f"Core ML predictions need macOS (this is {platform.system()}); "
        f"converted packages are at {converted[6].folder}"
    )
    assert "red circle" not in message


def test_render_before_conversion_says_not_converted(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    with pytest.raises(BackendUnavailable, match=r"need macOS .*not converted yet"):
        CoreMLBackend(registry, tmp_path, nbits=4).render(_job(), lambda _k: None, lambda: False)


def _torch_parts(pipe: Any) -> CoreMLParts:
    """The Core ML models' inputs/outputs, computed by the torch modules they came from."""

    def t(x: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x))

    def text(d: Any) -> dict[str, Any]:
        return {"last_hidden_state": pipe.text_encoder(t(d["input_ids"]).long())[0].numpy()}

    def unet(d: Any) -> dict[str, Any]:
        out = pipe.unet(t(d["sample"]), t(d["timestep"]), t(d["encoder_hidden_states"]))
        return {"noise_pred": out.sample.numpy()}

    def vae(d: Any) -> dict[str, Any]:
        return {"image": pipe.vae.decode(t(d["z"])).sample.numpy()}

    return CoreMLParts(text, unet, vae, (4, 16, 16), 77, float(pipe.vae.config.scaling_factor))


def test_macos_loop_matches_diffusers(
    registry: ModelRegistry, tiny_path: Path, backend: DiffusersBackend
) -> None:
    """The loop run on Macs, fed torch stand-ins, reproduces the diffusers image."""
    from diffusers import DiffusionPipeline

    pipe: Any = DiffusionPipeline.from_pretrained(str(tiny_path), local_files_only=True)
    job = _job(negative_prompt="blue")
    steps: list[int] = []
    with torch.no_grad():
        pixels = run_coreml_pipeline(
            _torch_parts(pipe), tiny_path, job, steps.append, lambda: False
        )
    expected = backend.render(job, lambda _k: None, lambda: False)
    ref = np.asarray(Image.open(io.BytesIO(expected.image)), dtype=np.float32) / 255
    assert steps == [1, 2, 3]
    assert pixels.shape == ref.shape
    assert float(np.abs(pixels - ref).max()) < 2 / 255
