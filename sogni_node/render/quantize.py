"""Quantized weights and torch.compile for a diffusers pipeline's denoiser.

Why: the denoiser (`pipe.unet`, or `pipe.transformer` in Flux-style pipelines) holds most of
a pipeline's weights and runs at every step, so it is the only part worth quantizing; the
text encoders and the VAE run once per image and stay in the compute dtype.

Only `nn.Linear` layers whose sides are multiples of 16 are quantized. Linear layers carry
the attention and feed-forward weights, every backend here has kernels for them, and on the
shipped model quantizing the convolutions as well cost 5-8 dB of PSNR (quanto int8 and int4)
for little memory. The multiple-of-16 rule skips odd-shaped layers that int8/fp8 matmul
kernels reject; every Linear of SD 1.5, SDXL and Flux passes it.

torchao and optimum-quanto are optional (`pip install 'sogni-supernet[quant]'`) and are
imported only when a mode needs them; their import-time log noise is muted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

PROJECT = "sogni-supernet"
QUANT_EXTRA = f"pip install '{PROJECT}[quant]'"

QUANT_MODES: tuple[str, ...] = (
    "none",  # weights in the compute dtype
    "int8",  # torchao int8 weight-only: half/quarter the weight memory, any device
    "int8-dynamic",  # torchao int8 weights + per-token int8 activations: int8 matmuls on CUDA
    "fp8",  # torchao float8 (e4m3) weight-only: CUDA with compute capability >= 8.9 only
    "quanto-int8",  # optimum-quanto int8 weights (quantize + freeze)
    "quanto-int4",  # optimum-quanto int4 weights, group size 128
)
"""Values of the node's `quantize` setting."""

_PACKAGE: dict[str, str] = {
    "int8": "torchao",
    "int8-dynamic": "torchao",
    "fp8": "torchao",
    "quanto-int8": "optimum.quanto",
    "quanto-int4": "optimum.quanto",
}

FP8_MIN_CAPABILITY = (8, 9)
"""float8 weights need Ada (sm_89) or Hopper (sm_90) and later GPUs."""

COMPILE_MODES: tuple[str, ...] = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)

_NOISY_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "optimum.quanto",
    "diffusers.quantizers.torchao.torchao_quantizer",
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or half-imported
        return False


@functools.cache
def int8_matmul_is_exact() -> bool:
    """Whether `torch._int_mm`, which torchao's int8-dynamic mode calls on CPU (u8 x s8 on
    VNNI CPUs without AMX, s8 x s8 otherwise), gives exact int32 products here: oneDNN's
    AVX2/AVX-512 int8 kernels without VNNI saturate 16-bit partial sums, and the render
    comes out at ~23 dB with colours off by ~100 (measured in BENCHMARKS.md, CPU variation)."""
    g = torch.Generator().manual_seed(0)
    b = torch.randint(-128, 128, (64, 64), dtype=torch.int8, generator=g)
    for a in (
        torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=g),
        torch.randint(0, 256, (32, 64), dtype=torch.uint8, generator=g),
    ):
        if not torch.equal(torch._int_mm(a, b), a.to(torch.int32) @ b.to(torch.int32)):
            return False
    return True


def check_quant_mode(mode: str, device: str) -> None:
    """Raise ValueError for an unknown mode, a mode the device can't run, or a missing package.

    Cheap (nothing heavy is imported), so a backend can fail at construction rather than at
    its first job.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(QUANT_MODES)}")
    if mode == "none":
        return
    dev = torch.device(device)
    if mode == "fp8":
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"quantization mode 'fp8' needs a CUDA GPU with compute capability >= "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Ada, Hopper or later); "
                f"device {device!r} can't run it: use 'int8' instead"
            )
        capability = torch.cuda.get_device_capability(dev)
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(
                f"quantization mode 'fp8' needs CUDA compute capability >= "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}; this GPU has "
                f"{capability[0]}.{capability[1]}: use 'int8' instead"
            )
    if mode == "int8-dynamic" and dev.type == "cpu" and not int8_matmul_is_exact():
        raise ValueError(
            "quantization mode 'int8-dynamic' gives wrong images on this CPU (its int8 matrix "
            "multiply saturates: oneDNN without VNNI); use 'int8' or 'quanto-int8' instead"
        )
    _require_package(mode, f"quantization mode {mode!r}")


def _require_package(mode: str, what: str) -> None:
    """ValueError naming the extra to install when `mode`'s library is missing."""
    package = _PACKAGE[mode]
    if not _installed(package):
        raise ValueError(
            f"{what} needs the {package!r} package, which is not installed; "
            f"install the quant extra: {QUANT_EXTRA}"
        )


@contextlib.contextmanager
def quiet_quant_imports() -> Iterator[None]:
    """Mute import-time warnings of the quantization libraries (e.g. torchao's optional CUDA
    kernels that fail to load on a CPU build), which are harmless and would alarm operators.

    diffusers imports torchao itself when it is installed (on the first model import), so a
    caller that wants a quiet start wraps its first diffusers import in this too.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _import(module: str, mode: str) -> Any:
    with quiet_quant_imports():
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(
                f"quantization mode {mode!r} could not import {module!r} ({exc}); "
                f"install the quant extra: {QUANT_EXTRA}"
            ) from exc


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser: `unet`, or `transformer` for Flux/SD3-style pipelines."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has no unet or transformer to quantize or compile")


def is_target(module: torch.nn.Module) -> bool:
    """A layer `quantize_pipeline` quantizes: nn.Linear with both sides multiples of 16."""
    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a torchao or quanto quantized weight (a tensor subclass over integer/fp8
    data), False for a plain tensor or parameter."""
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
        tensor, "__tensor_flatten__"
    )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really stores. A quantized weight reports its logical dtype (e.g.
    float32) from `element_size()`, so its inner tensors (int8 data, scales) are summed."""
    flatten: Callable[[], tuple[list[str], Any]] | None = getattr(
        tensor, "__tensor_flatten__", None
    )
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor.numel() * tensor.element_size()
    names, _ctx = flatten()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, counting quantized weights correctly."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def quantized_layers(module: torch.nn.Module) -> int:
    """How many layers of `module` hold a quantized weight."""
    weights = (getattr(m, "weight", None) for m in module.modules())
    return sum(isinstance(w, torch.Tensor) and is_quantized(w) for w in weights)


def _torchao_config(mode: str) -> Any:
    quantization = _import("torchao.quantization", mode)
    if mode == "int8":
        return quantization.Int8WeightOnlyConfig()
    if mode == "int8-dynamic":
        return quantization.Int8DynamicActivationInt8WeightConfig()
    return quantization.Float8WeightOnlyConfig()  # fp8


def quantize_pipeline(pipe: Any, mode: str) -> None:
    """Quantize the pipeline's denoiser in place ("none": nothing). Call after `pipe.to()`.

    Raises ValueError as `check_quant_mode` does, for the denoiser's device.
    """
    if mode == "none":
        return
    net = denoiser(pipe)
    device = next(net.parameters()).device
    check_quant_mode(mode, str(device))
    before = storage_bytes(net)
    _quantize_module(net, mode)
    _return_freed_memory(device)
    logger.info(
        "quantized %d of %d linear layers of the %s to %s: %.1f -> %.1f MB",
        quantized_layers(net),
        sum(isinstance(m, torch.nn.Linear) for m in net.modules()),
        type(net).__name__,
        mode,
        before / 1e6,
        storage_bytes(net) / 1e6,
    )


def _quantize_module(net: torch.nn.Module, mode: str) -> None:
    """Quantize `net`'s target layers in place with `mode`'s library (no device check)."""
    targets = [name for name, m in net.named_modules() if is_target(m)]
    if mode.startswith("quanto-"):
        quanto = _import("optimum.quanto", mode)
        qtype = quanto.qint8 if mode == "quanto-int8" else quanto.qint4
        with quiet_quant_imports():
            quanto.quantize(net, weights=qtype, include=targets)
            quanto.freeze(net)  # store the integer weights now, not re-quantize every call
    else:
        config = _torchao_config(mode)
        quantize_ = _import("torchao.quantization", mode).quantize_
        with quiet_quant_imports():
            quantize_(net, config, filter_fn=lambda m, _fqn: is_target(m))


def build_cpu_kernels() -> bool:
    """Compile optimum-quanto's CPU kernels now; False when quanto is not installed.

    Why: quanto builds its C++ unpacking kernels (which every int4 matmul on CPU calls) with
    torch's JIT extension loader the first time they are needed, into its own package folder:
    1-2 minutes of gcc on a 2-core machine, more under load. Left to the first int4 render, that
    build lands inside a job's deadline (or a test's). `make install` calls this once, so a
    fresh environment never compiles mid-render; later calls load the built library.
    """
    if not _installed("optimum.quanto"):
        return False
    with quiet_quant_imports():
        from optimum.quanto.library.extensions import get_extension

        get_extension("quanto_cpp").lib  # noqa: B018 - the property builds and loads it
    return True


_WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def can_round_weights() -> bool:
    """Both quantization libraries are installed, so `weights_as` can reproduce every mode
    (a node then names `RERENDER_WEIGHTS_FEATURE`)."""
    return all(_installed(package) for package in set(_PACKAGE.values()))


def parse_weights(weights: str) -> tuple[torch.dtype, str]:
    """`<dtype>+<mode>` (e.g. `bfloat16+quanto-int4`, the front of a quantized node's declared
    mode) -> (dtype, mode); ValueError naming what is wrong."""
    name, plus, mode = weights.partition("+")
    if not plus or name not in _WEIGHT_DTYPES or mode not in QUANT_MODES or mode == "none":
        raise ValueError(
            f"weights {weights!r} are not <dtype>+<mode> with dtype one of "
            f"{', '.join(_WEIGHT_DTYPES)} and mode one of {', '.join(QUANT_MODES[1:])}"
        )
    _require_package(mode, f"re-rendering with weights {weights!r}")
    return _WEIGHT_DTYPES[name], mode


def _round_trip(weight: torch.Tensor, dtype: torch.dtype, mode: str) -> torch.Tensor:
    """`weight` as a node holding it in `dtype`, quantized with `mode`, computes with it."""
    out_features, in_features = weight.shape
    layer = torch.nn.Linear(
        in_features, out_features, bias=False, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
    holder = torch.nn.Sequential(layer)  # the libraries replace children, not the root
    _quantize_module(holder, mode)
    quantized = getattr(holder[0], "weight")  # noqa: B009 (a tensor subclass now)
    return quantized.dequantize().to(weight.dtype)


@contextlib.contextmanager
def weights_as(pipe: Any, weights: str) -> Iterator[int]:
    """For the duration, the denoiser's target layers compute with the weights a node
    declaring `weights` (`parse_weights`) holds: cast to its dtype, quantized by its mode's
    own library, dequantized to this pipeline's dtype. Yields how many layers changed; the
    original weights are put back after, exactly.

    Why: a whole re-render of a 4-bit or fp8 node's job against plain float32 weights drifts
    beyond any bound a cheat could not also meet (docs/VERIFICATION.md, "Whole re-render");
    with the worker's own rounded weights the only drift left is the compute dtype's. The
    rounding runs on this device (fp8 weights are made on a CPU too: only fp8 *matmuls*
    need CUDA), layer by layer; the rounded weights and the originals (to put back) are both
    held for the render: one extra copy of the target layers (a float32 SDXL UNet's are
    ~10 GB), which a verifier's memory budget must allow.
    """
    dtype, mode = parse_weights(weights)
    net = denoiser(pipe)
    if quantized_layers(net):
        raise ValueError("the denoiser's weights are quantized already: cannot round them again")
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, torch.nn.Linear) and is_target(module):
                    param = module.weight
                    rounded = _round_trip(param.data, dtype, mode)
                    saved.append((param, param.data))
                    param.data = rounded
        yield len(saved)
    finally:
        for param, original in saved:
            param.data = original


def _return_freed_memory(device: torch.device) -> None:
    """Give the replaced full-precision weights' memory back to the system. On CPU glibc keeps
    most of it in its heap (measured: SDXL int8 at 8.0 GB RSS for 3.6 GB of weights); on CUDA
    torch's caching allocator keeps it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "cpu":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            pass


def default_compile_mode(device: torch.device | str) -> str:
    """CUDA: autotuned kernels without CUDA graphs (job shapes vary, and graphs keep memory
    per shape). Elsewhere "default": max-autotune's C++ GEMM tuning costs minutes of compile
    on a small CPU for no measured gain."""
    return "max-autotune-no-cudagraphs" if torch.device(device).type == "cuda" else "default"


def compile_pipeline(pipe: Any, mode: str | None = None) -> None:
    """torch.compile the pipeline's denoiser in place (`nn.Module.compile`, so the module
    keeps its class and config for the pipeline).

    Compilation happens on the first render and again for each new shape, which costs tens
    of seconds (CUDA) to minutes (CPU); it pays off only on a long-running node. `mode`
    None picks `default_compile_mode` for the denoiser's device.
    """
    net = denoiser(pipe)
    if mode is None:
        mode = default_compile_mode(next(net.parameters()).device)
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; known: {', '.join(COMPILE_MODES)}")
    net.compile(mode=mode)
    logger.info("%s will be compiled with torch.compile mode %s", type(net).__name__, mode)
