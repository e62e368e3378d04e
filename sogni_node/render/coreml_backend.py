"""Render with Core ML packages on Apple Silicon (the relaxed-tier Mac nodes).

Why this shape: Core ML only predicts on macOS, but conversion (see `coreml_convert`) works
anywhere, so `prepare()` runs on Linux too and `render()` fails there with an error that says
where the packages are. The denoising loop is written against three plain `predict(dict) ->
dict` callables, so the same loop is tested on Linux with torch stand-ins and runs on macOS with
`coremltools.models.MLModel.predict`. Tokenizer and scheduler stay in Python (diffusers), as in
Apple's ml-stable-diffusion. Randomness is pinned as in the diffusers backend
(`sogni_node.render.noise`): the initial latent is `initial_latents(seed, shape)` and the k-th
scheduler step draws from `step_generator(seed, k)`, so a verifier regenerates both; the loop
records the trajectory (leaf 0 and the latent after every step, `TrajectoryRecorder`) that the
receipt commits to (docs/TRAJECTORY.md).
"""

from __future__ import annotations

import json
import platform
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sogni_node.models.registry import ModelRegistry
from sogni_node.render.backend import RenderCancelled, RenderError, RenderJob, RenderOutput
from sogni_node.render.coreml_convert import (
    ConvertedModel,
    convert_pipeline,
    is_complete,
    model_cache_folder,
    precision_dir,
)
from sogni_node.render.encoding import encode_image, float_image_to_uint8
from sogni_node.render.trajectory import TrajectoryRecorder

Predict = Callable[[Mapping[str, npt.NDArray[Any]]], Mapping[str, npt.NDArray[Any]]]
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")


class BackendUnavailable(RenderError):
    """This backend cannot render on this machine (wrong OS, missing runtime)."""


@dataclass(frozen=True)
class CoreMLParts:
    """The three converted models as predict callables, plus what the loop needs to know."""

    text_encoder: Predict
    unet: Predict
    vae_decoder: Predict
    latent_shape: tuple[int, int, int]
    max_tokens: int
    vae_scaling_factor: float


def is_macos() -> bool:
    return platform.system() == "Darwin"


class CoreMLBackend:
    """`Backend` over Core ML packages converted from the registry's diffusers folders."""

    name = "coreml"
    supports_loras = False

    def __init__(
        self,
        registry: ModelRegistry,
        cache_dir: Path,
        nbits: int | None = 6,
        compute_units: str = "ALL",
    ) -> None:
        precision_dir(nbits)  # validates nbits
        if compute_units not in COMPUTE_UNITS:
            raise ValueError(f"compute_units must be one of {COMPUTE_UNITS}, got {compute_units!r}")
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        self.nbits = nbits
        self.compute_units = compute_units
        self._loaded: dict[tuple[str, int, int], tuple[CoreMLParts, threading.Lock]] = {}
        self._load_lock = threading.Lock()

    @property
    def dtype_name(self) -> str:
        return "float16" if self.nbits is None else f"palettized{self.nbits}"

    def prepare(
        self, model_id: str, width: int | None = None, height: int | None = None
    ) -> ConvertedModel:
        """Convert (or find in the cache) the packages for a model; works on any OS."""
        spec = self.registry.get(model_id)
        return convert_pipeline(
            spec.path,
            self.cache_dir,
            nbits=self.nbits,
            width=width or spec.width,
            height=height or spec.height,
        )

    def package_folder(self, job: RenderJob) -> Path:
        """Where this job's packages are, or would be after `prepare`."""
        spec = self.registry.get(job.model_id)
        return model_cache_folder(self.cache_dir, spec.path, job.width, job.height, self.nbits)

    def render(
        self,
        job: RenderJob,
        on_step: Callable[[int], None],
        should_cancel: Callable[[], bool],
    ) -> RenderOutput:
        """Blocking render; run it off the trio thread. See `Backend.render`."""
        from sogni_node.render.diffusers_backend import check_scheduler

        check_scheduler(job.scheduler)
        if job.loras:  # converted packages have their weights baked in
            raise RenderError(f"model {job.model_id!r}: the Core ML backend cannot apply LoRAs")
        if not is_macos():
            folder = self.package_folder(job)
            where = (
                f"converted packages are at {folder}"
                if is_complete(folder)
                else f"converted packages would be at {folder} (not converted yet)"
            )
            raise BackendUnavailable(
                f"Core ML predictions need macOS (this is {platform.system()}); {where}"
            )
        parts, lock = self._get(job)  # pragma: no cover - macOS only
        spec = self.registry.get(job.model_id)  # pragma: no cover
        recorder = TrajectoryRecorder()  # pragma: no cover
        with lock:  # pragma: no cover
            pixels = run_coreml_pipeline(
                parts, spec.path, job, on_step, should_cancel, recorder=recorder
            )
        return RenderOutput(  # pragma: no cover
            image=encode_image(float_image_to_uint8(pixels), job.output_format),
            steps_done=job.steps,
            backend=self.name,
            device=f"coreml:{self.compute_units.lower()}",
            dtype=self.dtype_name,
            threads=1,
            trajectory=recorder.finish(),
        )

    def _get(self, job: RenderJob) -> tuple[CoreMLParts, threading.Lock]:  # pragma: no cover
        key = (job.model_id, job.width, job.height)
        with self._load_lock:
            if key not in self._loaded:
                converted = self.prepare(job.model_id, job.width, job.height)
                self._loaded[key] = (load_parts(converted, self.compute_units), threading.Lock())
            return self._loaded[key]

    def close(self) -> None:
        with self._load_lock:
            self._loaded.clear()


def load_parts(converted: ConvertedModel, compute_units: str) -> CoreMLParts:  # pragma: no cover
    """Load the packages with the Core ML runtime (macOS only)."""
    import coremltools as ct

    units = ct.ComputeUnit[compute_units]

    def model(path: Path) -> Predict:
        predict: Predict = ct.models.MLModel(str(path), compute_units=units).predict
        return predict

    manifest = converted.manifest
    return CoreMLParts(
        text_encoder=model(converted.text_encoder),
        unet=model(converted.unet),
        vae_decoder=model(converted.vae_decoder),
        latent_shape=tuple(manifest["latent_shape"]),  # type: ignore[arg-type]
        max_tokens=int(manifest["max_tokens"]),
        vae_scaling_factor=float(manifest["vae_scaling_factor"]),
    )


def run_coreml_pipeline(
    parts: CoreMLParts,
    model_dir: Path,
    job: RenderJob,
    on_step: Callable[[int], None],
    should_cancel: Callable[[], bool],
    *,
    recorder: TrajectoryRecorder | None = None,
) -> npt.NDArray[np.float32]:
    """Text encoder -> guided denoising loop -> VAE decoder; returns HxWx3 floats in [0, 1].

    Mirrors diffusers' StableDiffusionPipeline as the diffusers backend runs it (the same
    pinned initial noise and per-step noise for a seed, the same guidance formula), so a
    Mac's image is close to a CUDA node's for the same job. The UNet package has batch 2
    (unconditional, conditional), so it always runs both halves. `recorder` gets leaf 0 (the
    unscaled initial noise) and the latents after each step, with the scheduler's carried
    state and the step's timestep, as the diffusers backend records them.
    """
    import torch
    from transformers import CLIPTokenizer

    from sogni_node.render.diffusers_backend import SCHEDULERS
    from sogni_node.render.noise import initial_latents, pin_step_noise, takes_generator

    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
    sched_config = json.loads(
        (model_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")
    )
    if job.scheduler is None:
        import diffusers

        scheduler: Any = getattr(diffusers, sched_config["_class_name"]).from_config(sched_config)
    else:
        cls, overrides = SCHEDULERS[job.scheduler]
        scheduler = cls.from_config(sched_config, **overrides)

    def encode(text: str) -> npt.NDArray[np.float32]:
        ids = tokenizer(
            text, padding="max_length", max_length=parts.max_tokens, truncation=True
        ).input_ids
        out = parts.text_encoder({"input_ids": np.asarray([ids], dtype=np.int32)})
        return np.asarray(out["last_hidden_state"], dtype=np.float32)

    hidden = np.concatenate([encode(job.negative_prompt), encode(job.prompt)])
    channels, lat_h, lat_w = parts.latent_shape
    if (job.height // lat_h, job.width // lat_w) != (job.height / lat_h, job.width / lat_w):
        raise RenderError(f"model {job.model_id!r}: packages are for another image size")
    pin_step_noise(scheduler, job.seed)  # step k draws from step_generator(seed, k)
    step_kwargs: dict[str, Any] = {"generator": None} if takes_generator(scheduler) else {}
    latents = initial_latents(job.seed, (1, channels, lat_h, lat_w))
    if recorder is not None:
        recorder.record(0, latents, scheduler)
    scheduler.set_timesteps(job.steps, device="cpu")
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = parts.unet(
            {
                "sample": model_in.numpy().astype(np.float32),
                "timestep": np.full((2,), float(t), dtype=np.float32),
                "encoder_hidden_states": hidden,
            }
        )["noise_pred"]
        uncond, cond = torch.from_numpy(np.asarray(noise, dtype=np.float32)).chunk(2)
        guided = uncond + job.guidance * (cond - uncond) if job.guidance > 1.0 else cond
        latents = scheduler.step(guided, t, latents, **step_kwargs).prev_sample
        if recorder is not None:
            recorder.record(i + 1, latents, scheduler, t)
        on_step(i + 1)
        if should_cancel():
            raise RenderCancelled(i + 1)
    z = (latents / parts.vae_scaling_factor).numpy().astype(np.float32)
    image = np.asarray(parts.vae_decoder({"z": z})["image"], dtype=np.float32)
    result: npt.NDArray[np.float32] = np.clip(image[0] / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
    return result
