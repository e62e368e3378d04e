"""Render with Hugging Face diffusers on CUDA, Apple MPS or CPU.

Why this shape: pipelines are big, so each model is loaded once (lazily, from a local folder,
never from a hub) and kept; a lock per pipeline serialises renders because a diffusers
pipeline holds per-call state (scheduler, interrupt flag) and is not re-entrant. Each render
gets a fresh scheduler from the model's saved config, so a job's scheduler choice never leaks
into the next job.

Randomness is pinned to the job's seed on the CPU (see `noise`): the initial latent is drawn by
`initial_latents` and passed in as ``latents=``, and each step of a stochastic scheduler gets
its own CPU generator keyed by (seed, step). Every render records its trajectory (see
`trajectory`): leaf 0 is that initial latent, leaf k the latent after step k with the
scheduler state step k + 1 needs, and `RenderOutput.trajectory` carries the Merkle root over
them and the tensors to open any step later.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.utils import is_accelerate_available

from sogni_node.models.registry import ModelRegistry, ModelSpec
from sogni_node.render.backend import RenderCancelled, RenderError, RenderJob, RenderOutput
from sogni_node.render.encoding import encode_image, float_image_to_uint8
from sogni_node.render.lora import LoraError, applied_loras, lora_fit_problem
from sogni_node.render.noise import initial_latents, pin_step_noise
from sogni_node.render.residency import Residency, module_bytes
from sogni_node.render.trajectory import TrajectoryRecorder
from sogni_protocol.logs import get_logger

logger = logging.getLogger(__name__)
events = get_logger(__name__)
"""Structured events operators read (docs/EVENTS.md): `lora_refused`."""


class _SchedulerClass(Protocol):
    """A diffusers scheduler class (SchedulerMixin + ConfigMixin), as a type for mypy."""

    def from_config(self, config: Any, **kwargs: Any) -> Any: ...


SCHEDULERS: Mapping[str, tuple[_SchedulerClass, Mapping[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": (LCMScheduler, {}),
}
"""Job scheduler names (as in the Sogni API) -> diffusers class and config overrides."""

DEVICES = ("cpu", "cuda", "mps")

_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def check_scheduler(name: str | None) -> None:
    """Raise ValueError naming an unknown scheduler (cheap, before any model is loaded)."""
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")


def parse_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """None picks float16 on CUDA and float32 elsewhere (bf16 is >20x slower on AVX2 CPUs)."""
    if dtype is None:
        return torch.float16 if device == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}") from None


class _RedactTruncatedPrompt(logging.Filter):
    """diffusers logs the cut-off tail of an over-long prompt; replace it with a neutral line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "truncated" in str(record.msg):
            record.msg = "prompt truncated to the text encoder's token limit (text withheld)"
            record.args = ()
        return True


def _install_redaction(pipe: Any) -> None:
    module_logger = logging.getLogger(type(pipe).__module__)
    if not any(isinstance(f, _RedactTruncatedPrompt) for f in module_logger.filters):
        module_logger.addFilter(_RedactTruncatedPrompt())


@dataclass
class _Loaded:
    pipe: Any  # a DiffusionPipeline subclass; diffusers' stubs don't declare its components
    lock: threading.Lock
    scheduler_cls: _SchedulerClass
    scheduler_config: Mapping[str, Any]
    spec: ModelSpec
    """The registry entry it was loaded from: one replaced or removed meanwhile is stale."""
    users: int = 0
    """Renders holding it, counted from the moment `holding` hands it out (before they take
    `lock`): another model's load never evicts it from under them. Under `_pipes_lock`."""


def _default_budget(device: str) -> int:
    """Half of the device's memory: room for activations and the rest of the system. On
    the CPU and MPS, the memory this process may use: a container's limit, not the host's
    (a partner image on a 64 GB host limited to 8 GB would load models until killed)."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory // 2)
    from sogni_node.hardware import system_memory

    return system_memory() // 2


class LoraRefused(RenderError):
    """A job's LoRA cannot be applied to its model (built for another model, unreadable),
    found before any step. Its message names files, layers and shapes only, never the
    prompt, so it may travel as the job's hand-back reason: `refusal` holds it."""

    @property
    def refusal(self) -> str:
        return str(self)


class DiffusersBackend:
    """`Backend` over diffusers pipelines from local folders in a `ModelRegistry`."""

    name = "diffusers"

    def __init__(
        self,
        registry: ModelRegistry,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        threads: int | None = None,
        memory_budget: int | None = None,
        quantize: str = "none",
        compile: bool = False,
    ) -> None:
        dev = torch.device(device)
        if dev.type not in DEVICES:
            raise ValueError(f"unsupported device {device!r}; expected one of {DEVICES}")
        if quantize != "none":
            from sogni_node.render.quantize import check_quant_mode

            check_quant_mode(quantize, dev.type)  # names a missing extra or a wrong device
        self.quantize = quantize
        self.compile = compile
        self.registry = registry
        self.device = str(dev)
        self.dtype = parse_dtype(dtype, dev.type)
        # Output bytes on CPU depend on the thread count, so it is fixed per backend and
        # recorded in every RenderOutput.
        self.threads = threads if threads is not None else torch.get_num_threads()
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if dev.type == "cpu" and self.dtype != torch.float32:
            logger.warning("dtype %s on CPU is much slower than float32", self.dtype)
        budget = memory_budget or _default_budget(dev.type)
        self._pipes: Residency[_Loaded] = Residency(budget, on_evict=self._evicted)
        self._load_lock = threading.Lock()
        """One model load at a time (each may take minutes and most of the memory)."""
        self._pipes_lock = threading.Lock()
        """Guards `_pipes` alone, held for microseconds: a warm model's job, `warm_models`
        and `unload` never wait for another model's load."""

    @property
    def dtype_name(self) -> str:
        """Recorded in receipts' metadata: the compute dtype plus what changes the numbers."""
        name = str(self.dtype).removeprefix("torch.")
        if self.quantize != "none":
            name += f"+{self.quantize}"
        if self.compile:
            name += "+compiled"
        device = torch.device(self.device).type
        # reduced precision: checked on the same path only. float32 off the CPU too: its
        # tolerance was measured across CPU code paths, and CUDA's float32 convolutions run
        # in TF32 by default (cuDNN), so a CPU verifier's step check could fail an honest GPU
        # node; a `float32@cuda-...` receipt gets the whole re-render instead
        if self.dtype != torch.float32 or device != "cpu":
            from sogni_node.hardware import compute_path

            name += f"@{compute_path(device)}"
        return name

    @property
    def supports_loras(self) -> bool:
        """LoRAs merge into plain weights; quantized ones would need re-quantizing per job."""
        return self.quantize == "none"

    def lora_fit(self, model_id: str, path: Path) -> str | None:
        """Why the LoRA file at `path` does not fit model `model_id` (None: it fits), checked
        against the loaded UNet and text encoders without changing them: `loras add --model`
        refuses a LoRA built for another model before any job asks for it."""
        with self.holding(model_id) as loaded, loaded.lock:
            return lora_fit_problem(loaded.pipe, path)

    def load(self, model_id: str) -> None:
        """Load a model now (e.g. at start-up) instead of on its first job."""
        self._get(model_id)

    def unload(self, model_id: str) -> None:
        """Drop a loaded model (removed or replaced in the store): its memory comes back once
        a render holding it ends, and the next job of that id loads the new files."""
        with self._pipes_lock:
            self._pipes.drop(model_id)

    def warm_models(self) -> list[str]:
        """Models loaded now, most recently used first (advertised to coordinators)."""
        with self._pipes_lock:
            return self._pipes.warm()

    def _evicted(self, model_id: str, _loaded: _Loaded) -> None:
        logger.info("evicted model %s to stay within the memory budget", model_id)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _warm(self, model_id: str, spec: ModelSpec, hold: bool) -> _Loaded | None:
        """The loaded pipeline of `spec`; one loaded from an entry since replaced or removed
        (`models remove`/`add` while the node runs) is dropped, never used. `hold`: counted
        as in use before the lock is let go."""
        with self._pipes_lock:
            loaded = self._pipes.get(model_id)
            if loaded is not None and loaded.spec is not spec:
                self._pipes.drop(model_id)
                return None
            if loaded is not None and hold:
                loaded.users += 1
            return loaded

    @contextlib.contextmanager
    def holding(
        self, model_id: str, should_cancel: Callable[[], bool] | None = None
    ) -> Iterator[_Loaded]:
        """The model's pipeline, loaded if need be, kept from eviction until the block ends."""
        loaded = self._get(model_id, should_cancel, hold=True)
        try:
            yield loaded
        finally:
            with self._pipes_lock:
                loaded.users -= 1
                self._pipes.trim(busy=self._busy())

    def _busy(self) -> list[str]:
        return [m for m, item in self._pipes.items() if item.users > 0]

    def _get(
        self, model_id: str, should_cancel: Callable[[], bool] | None = None, hold: bool = False
    ) -> _Loaded:
        spec = self.registry.get(model_id)  # UnknownModelError before taking any lock
        loaded = self._warm(model_id, spec, hold)
        if loaded is not None:  # warm: never behind another model's load
            return loaded
        with self._load_lock:
            if should_cancel is not None and should_cancel():  # while we waited for the lock
                raise RenderCancelled(0)
            spec = self.registry.get(model_id)  # as it is now: it may have changed meanwhile
            loaded = self._warm(model_id, spec, hold)  # loaded by the job we waited for?
            if loaded is None:
                started = time.perf_counter()
                pipe = DiffusionPipeline.from_pretrained(
                    str(spec.path),
                    dtype=self.dtype,
                    local_files_only=True,
                    # Low-memory loading needs accelerate; asking without it only logs a warning.
                    low_cpu_mem_usage=is_accelerate_available(),
                )
                pipe.to(self.device)
                if self.quantize != "none" or self.compile:
                    from sogni_node.render.quantize import compile_pipeline, quantize_pipeline

                    if self.quantize != "none":
                        quantize_pipeline(pipe, self.quantize)
                    if self.compile:
                        compile_pipeline(pipe)
                pipe.set_progress_bar_config(disable=True)
                _install_redaction(pipe)
                loaded = _Loaded(
                    pipe=pipe,
                    lock=threading.Lock(),
                    scheduler_cls=pipe.scheduler.__class__,
                    scheduler_config=dict(pipe.scheduler.config),
                    spec=spec,
                    users=1 if hold else 0,
                )
                size = module_bytes(pipe)
                with self._pipes_lock:  # kept only if its entry is still current: an unload
                    if model_id in self.registry and self.registry.get(model_id) is spec:
                        self._pipes.admit(model_id, loaded, size, busy=self._busy())
                logger.info(
                    "loaded model %s on %s/%s in %.2fs",
                    model_id,
                    self.device,
                    self.dtype_name,
                    time.perf_counter() - started,
                )
            return loaded

    def _scheduler(self, loaded: _Loaded, name: str | None) -> Any:
        if name is None:
            return loaded.scheduler_cls.from_config(loaded.scheduler_config)
        cls, overrides = SCHEDULERS[name]
        return cls.from_config(loaded.scheduler_config, **overrides)

    def render(
        self,
        job: RenderJob,
        on_step: Callable[[int], None],
        should_cancel: Callable[[], bool],
        *,
        weights: str = "",
    ) -> RenderOutput:
        """Blocking render; run it with `trio.to_thread.run_sync`. See `Backend.render`.

        `weights` (a re-render check only): compute with another node's quantized weights,
        `quantize.weights_as`; ValueError if this backend's own weights are quantized."""
        check_scheduler(job.scheduler)
        if weights and self.quantize != "none":
            raise ValueError(f"this node's weights are {self.quantize}: cannot use {weights}")
        if job.loras and not self.supports_loras:
            raise RenderError(
                f"model {job.model_id!r}: LoRAs cannot be applied to {self.quantize} weights"
            )
        if should_cancel():  # before a load that may take minutes
            raise RenderCancelled(0)
        with self.holding(job.model_id, should_cancel) as loaded:
            return self._render_on(loaded, job, on_step, should_cancel, weights)

    def _render_on(
        self,
        loaded: _Loaded,
        job: RenderJob,
        on_step: Callable[[int], None],
        should_cancel: Callable[[], bool],
        weights: str,
    ) -> RenderOutput:
        steps_done = 0
        caller_error: BaseException | None = None
        recorder: TrajectoryRecorder | None = None

        def step_end(
            pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal steps_done, caller_error
            steps_done = step_index + 1
            if recorder is not None:
                recorder.record(
                    steps_done, callback_kwargs["latents"], pipeline.scheduler, timestep
                )
            try:
                on_step(steps_done)
                cancel = should_cancel()
            except BaseException as exc:
                caller_error = exc  # the caller's own error: re-raised unchanged below
                raise
            if cancel:
                # Raising (rather than pipe._interrupt) also skips the VAE decode.
                raise RenderCancelled(steps_done)
            return callback_kwargs

        with loaded.lock:
            if should_cancel():  # asked while we waited for the pipeline
                raise RenderCancelled(0)
            # Process-global in torch; set here, on the rendering thread, so the recorded
            # count is the one actually used.
            torch.set_num_threads(self.threads)
            pipe = loaded.pipe
            scheduler = job.scheduler or loaded.spec.default_scheduler
            pipe.scheduler = self._scheduler(loaded, scheduler)
            pin_step_noise(pipe.scheduler, job.seed)
            # Only read where a pipeline draws noise itself (no `latents` below).
            generator = torch.Generator("cpu").manual_seed(job.seed)
            pinned: dict[str, Any] = {}
            shape = latent_shape(pipe, job.width, job.height)
            if shape is not None:
                latents = initial_latents(job.seed, shape, self.dtype, self.device)
                recorder = TrajectoryRecorder()
                recorder.record(0, latents, pipe.scheduler)
                pinned["latents"] = latents
            rounded: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if weights:
                from sogni_node.render.quantize import weights_as

                rounded = weights_as(pipe, weights)
            try:
                with rounded, applied_loras(pipe, job.loras):
                    result = pipe(
                        prompt=job.prompt,
                        negative_prompt=job.negative_prompt or None,
                        num_inference_steps=job.steps,
                        guidance_scale=job.guidance,
                        width=job.width,
                        height=job.height,
                        generator=generator,
                        output_type="np",
                        callback_on_step_end=step_end,
                        **pinned,
                    )
            except RenderCancelled:
                raise
            except LoraError as exc:  # names files and layers, never the prompt
                events.warning("lora_refused", model=job.model_id, reason=str(exc))
                raise LoraRefused(f"model {job.model_id!r}: {exc}") from None
            except Exception as exc:
                if exc is caller_error:
                    raise
                raise _private_error(exc, job) from _private_cause(exc, job)
        images = np.asarray(result.images)
        if images.ndim != 4 or images.shape[0] != 1:
            raise RenderError(f"model {job.model_id!r} returned images of shape {images.shape}")
        pixels = float_image_to_uint8(images[0])
        lossless = recorder is not None and job.output_format != "png"  # docs/IMAGE_CHECK.md
        return RenderOutput(
            image=encode_image(pixels, job.output_format),
            steps_done=steps_done,
            backend=self.name,
            device=self.device,
            dtype=self.dtype_name,
            threads=self.threads,
            trajectory=recorder.finish() if recorder is not None else None,
            pixels=encode_image(pixels, "png") if lossless else None,
        )

    def close(self) -> None:
        with self._load_lock, self._pipes_lock:
            self._pipes.clear()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def latent_shape(pipe: Any, width: int, height: int) -> tuple[int, ...] | None:
    """The initial latent's shape for UNet pipelines (SD 1.5, SDXL, LCM and turbo variants:
    what their ``prepare_latents`` draws); None for others (e.g. Flux packs its latents), which
    then draw from a seeded CPU generator and record no trajectory."""
    unet = getattr(pipe, "unet", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if unet is None or not isinstance(scale, int):
        return None
    return (1, int(unet.config.in_channels), height // scale, width // scale)


def _private_error(exc: Exception, job: RenderJob) -> RenderError:
    return RenderError(f"{type(exc).__name__} while rendering model {job.model_id!r}")


def _private_cause(exc: Exception, job: RenderJob) -> Exception | None:
    """Chain the original error for debugging unless its text quotes the prompt."""
    text = str(exc)
    for secret in (job.prompt, job.negative_prompt):
        if secret.strip() and secret.strip() in text:
            return None
    return exc
