"""What this machine can render on: device kind, its name and memory, a pixel budget.

Why: the node advertises `device` and `max_pixels` in its capabilities, and the coordinator
routes by them (a 24 GiB GPU takes 1024x1024 SDXL; a 4 GiB one should not be offered it).
Memory counts are what the renderer may use: GPU memory on CUDA, RAM (container-limited) on
CPU, unified memory on Apple Silicon. torch is imported lazily: `probe` is the only slow call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import msgspec

__all__ = [
    "HardwareError",
    "HardwareInfo",
    "compute_path",
    "cpu_flags",
    "probe",
    "suggest_max_pixels",
    "system_memory",
]

Device = Literal["cuda", "mps", "cpu"]

_GIB = 1024**3
_PIXEL_STEPS = (  # (usable memory, largest square side) — fp16 SD/SDXL rules of thumb
    (4 * _GIB, 512),
    (8 * _GIB, 768),
    (12 * _GIB, 1024),
    (24 * _GIB, 1536),
)
_MAX_SIDE = 2048  # the protocol's largest side


class HardwareError(RuntimeError):
    """A device was asked for (config `device`) that this machine does not have."""


class HardwareInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A probe's result; encodes to JSON as is (`sogni-node probe --json`)."""

    device: Device
    name: str
    memory_bytes: int
    """Memory the renderer can use: GPU memory, or RAM/unified memory on cpu/mps."""
    system_memory_bytes: int
    cpu_name: str
    cpu_count: int
    platform: str
    torch_version: str | None
    cuda_capability: tuple[int, int] | None = None
    cuda_device_count: int = 0
    max_pixels: int = 0
    """Suggested largest width*height per image (a heuristic; config `max_pixels` overrides)."""
    compute_path: str = ""
    """The code path its kernels take (`compute_path`): reduced-precision renders are checked
    only by a verifier on the same one."""


def suggest_max_pixels(device: Device, memory_bytes: int) -> int:
    """Largest square image (as pixels) that fits comfortably; a table, not a measurement.

    On cpu and mps only half of the memory counts, since the system shares it.
    """
    usable = memory_bytes if device == "cuda" else memory_bytes // 2
    for limit, side in _PIXEL_STEPS:
        if usable < limit:
            return side * side
    return _MAX_SIDE * _MAX_SIDE


def _import_torch() -> ModuleType | None:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        brand = _sysctl("machdep.cpu.brand_string")
        if brand:
            return brand
    return platform.processor() or platform.machine() or "unknown"


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cgroup_limit() -> int | None:
    """A container's memory limit (cgroup v2, then v1), which os.sysconf does not see."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(path).read_text().strip()
            if text != "max":
                value = int(text)
                if 0 < value < 2**60:  # v1 reports "unlimited" as a huge number
                    return value
    return None


def system_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit."""
    total = 0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total <= 0 and platform.system() == "Darwin":
        total = int(_sysctl("hw.memsize") or 0)
    limit = _cgroup_limit()
    return min(total, limit) if limit and total else (limit or total)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cuda(torch: Any) -> tuple[str, int, tuple[int, int], int] | None:
    try:
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        count = int(torch.cuda.device_count())
    except Exception:  # a broken driver must not stop a CPU probe
        return None
    return str(props.name), int(props.total_memory), (int(props.major), int(props.minor)), count


def _mps(torch: Any) -> bool:
    if platform.system() != "Darwin":
        return False
    try:
        return bool(torch.backends.mps.is_available())
    except Exception:
        return False


# --- the code path reduced-precision numbers depend on -------------------------------------
_ONEDNN_LADDER = (  # oneDNN's x86 ISA names, lowest first, and the cpuinfo flags each needs
    ("sse41", ("sse4_1",)),
    ("avx", ("avx",)),
    ("avx2", ("avx2", "fma")),
    ("avx2_vnni", ("avx2", "fma", "avx_vnni")),
    ("avx512_core", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    ("avx512_core_vnni", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")),
    ("avx512_core_bf16", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")),
    ("avx512_core_amx", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "amx_bf16")),
)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo `flags` or ARM `Features`); empty elsewhere.
    Read once: every receipt's mode names the path."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")) and ":" in line:
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _onednn_isa(flags: frozenset[str], env: dict[str, str]) -> str:
    """The highest oneDNN ISA this CPU has, capped by ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA
    as oneDNN caps it (its bf16 and int8 kernels are chosen by this)."""
    have = [name for name, needs in _ONEDNN_LADDER if all(f in flags for f in needs)]
    cap = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "all").lower()
    names = [name for name, _ in _ONEDNN_LADDER]
    if cap in names:
        have = [n for n in have if names.index(n) <= names.index(cap)]
    return have[-1] if have else "none"


def compute_path(device: str = "cpu", env: dict[str, str] | None = None) -> str:
    """A name for the code path this process's kernels take, e.g.
    `cpu-x86_64-avx512-avx512_core_bf16-torch2.13`: the architecture, torch's ATen CPU
    capability (`ATEN_CPU_CAPABILITY` can lower it), oneDNN's ISA (capped by
    `ONEDNN_MAX_CPU_ISA`) and torch's minor version.

    Why: bfloat16 on the CPU is bit-exact across thread counts and batches on one code path
    but differs by up to 0.1 (normalised step distance) between the AVX-512-BF16 and the AVX2
    paths (docs/VERIFICATION.md), so a reduced-precision render declares its mode with this
    path (`DiffusersBackend.dtype_name`) and only a verifier with the same string re-runs its
    steps. Equal strings are the claim "same kernels"; they are compared, never parsed.
    Other devices: the device kind and, for CUDA, its compute capability (unmeasured)."""
    env = dict(os.environ) if env is None else env
    torch = _import_torch()
    version = ".".join(str(torch.__version__).split("+")[0].split(".")[:2]) if torch else "none"
    if device.startswith("cuda") and torch is not None:
        cuda = _cuda(torch)
        cap = f"sm{cuda[2][0]}{cuda[2][1]}" if cuda else "none"
        return f"cuda-{cap}-torch{version}"
    if device != "cpu":
        return f"{device}-torch{version}"
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower() or "unknown"
    )
    aten = "none"
    if torch is not None:
        with contextlib.suppress(Exception):
            aten = str(torch.backends.cpu.get_cpu_capability()).lower()
    flags = cpu_flags()
    isa = _onednn_isa(flags, env) if arch == "x86_64" else ("bf16" if "bf16" in flags else "base")
    return f"cpu-{arch}-{aten}-{isa}-torch{version}"


def probe(device: str = "auto") -> HardwareInfo:
    """Detect the best device (`auto`: cuda, then mps, then cpu), or check the one asked for."""
    if device not in ("auto", "cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {device!r}")
    torch = _import_torch()
    memory = system_memory()
    cpu_name = _cpu_name()
    common: dict[str, Any] = {
        "system_memory_bytes": memory,
        "cpu_name": cpu_name,
        "cpu_count": _cpu_count(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "torch_version": str(torch.__version__) if torch is not None else None,
    }
    if device in ("auto", "cuda") and torch is not None:
        cuda = _cuda(torch)
        if cuda is not None:
            name, memory, capability, count = cuda
            return HardwareInfo(
                device="cuda",
                name=name,
                memory_bytes=memory,
                cuda_capability=capability,
                cuda_device_count=count,
                max_pixels=suggest_max_pixels("cuda", memory),
                compute_path=compute_path("cuda"),
                **common,
            )
    if device == "cuda":
        raise HardwareError("device = cuda, but torch finds no CUDA GPU (or no CUDA build)")
    if device in ("auto", "mps") and torch is not None and _mps(torch):
        return HardwareInfo(
            device="mps",
            name=cpu_name,  # the chip (e.g. "Apple M2 Pro") is the GPU
            memory_bytes=memory,
            max_pixels=suggest_max_pixels("mps", memory),
            compute_path=compute_path("mps"),
            **common,
        )
    if device == "mps":
        raise HardwareError("device = mps, but torch finds no Apple Silicon GPU (MPS)")
    return HardwareInfo(
        device="cpu",
        name=cpu_name,
        memory_bytes=memory,
        max_pixels=suggest_max_pixels("cpu", memory),
        compute_path=compute_path("cpu"),
        **common,
    )
