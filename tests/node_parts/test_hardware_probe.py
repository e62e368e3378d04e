"""Hardware probe on this machine, and CUDA / Apple Silicon detection with fakes.

The suite runs on CPU-only machines and on GPU ones, so a real probe is checked against what
torch itself reports here, and a CPU probe is asked for explicitly (`probe("cpu")`). The CUDA
tests monkeypatch `torch.cuda.is_available`, `get_device_properties` and `device_count` with
fakes, and the MPS test swaps in a fake torch module and a fake `platform.system() ==
"Darwin"`: they check our reading of torch's answers, not the driver. Tests about a *missing*
GPU hide the real one (`_no_gpu`).
"""

from __future__ import annotations

import platform
from types import SimpleNamespace

import msgspec
import pytest
import torch

from sogni_node import hardware
from sogni_node.hardware import HardwareError, HardwareInfo, probe, suggest_max_pixels

GIB = 1024**3


def _torch_device() -> str:
    """The device torch itself says this machine has, in the probe's order of preference."""
    if torch.cuda.is_available():
        return "cuda"
    if platform.system() == "Darwin" and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any real GPU from the probe (no-op on a CPU-only machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_cpu_probe_on_this_machine() -> None:
    info = probe("cpu")  # config device = cpu: wins over a present GPU
    assert info.device == "cpu"
    assert info.name and info.cpu_name == info.name
    assert info.memory_bytes > 0 and info.memory_bytes == info.system_memory_bytes
    assert info.cpu_count >= 1
    assert info.torch_version == torch.__version__
    assert info.cuda_capability is None and info.cuda_device_count == 0
    assert info.max_pixels == suggest_max_pixels("cpu", info.memory_bytes)
    decoded = msgspec.json.decode(msgspec.json.encode(info), type=HardwareInfo)
    assert decoded == info


def test_auto_probe_finds_what_torch_finds() -> None:
    info = probe()
    assert info.device == _torch_device()
    assert info.torch_version == torch.__version__
    assert info.memory_bytes > 0 and info.system_memory_bytes > 0 and info.cpu_count >= 1
    assert info.max_pixels == suggest_max_pixels(info.device, info.memory_bytes)
    if info.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        assert info.name == props.name and info.memory_bytes == props.total_memory
        assert info.cuda_capability == torch.cuda.get_device_capability(0)
        assert info.cuda_device_count == torch.cuda.device_count() >= 1
    else:
        assert info.cuda_capability is None and info.cuda_device_count == 0
        assert info.memory_bytes == info.system_memory_bytes
        if info.device == "cpu":
            assert info.name == info.cpu_name
    assert probe(info.device) == info  # asking for the device found gives the same answer
    decoded = msgspec.json.decode(msgspec.json.encode(info), type=HardwareInfo)
    assert decoded == info


def test_asking_for_a_missing_device_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for device in ("cuda", "mps"):  # the real machine: whichever it lacks
        if device != _torch_device():
            with pytest.raises(HardwareError, match=device):
                probe(device)
    _no_gpu(monkeypatch)
    with pytest.raises(HardwareError, match="cuda"):
        probe("cuda")
    with pytest.raises(HardwareError, match="mps"):
        probe("mps")
    with pytest.raises(ValueError, match="unknown device"):
        probe("tpu")
    assert probe().device == "cpu"


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, memory: int = 24 * GIB) -> None:
    props = SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=memory, major=8, minor=9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cuda_detected_with_faked_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch)
    for asked in ("auto", "cuda"):
        info = probe(asked)
        assert info.device == "cuda"
        assert info.name == "NVIDIA GeForce RTX 4090"
        assert info.memory_bytes == 24 * GIB
        assert info.cuda_capability == (8, 9)
        assert info.cuda_device_count == 2
        assert info.max_pixels == 2048 * 2048
    assert probe("cpu").device == "cpu"  # config device = cpu wins over a present GPU


def test_small_gpu_gets_small_pixel_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, memory=6 * GIB)
    assert probe().max_pixels == 768 * 768


def test_broken_cuda_driver_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(index: int = 0) -> None:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # a Mac's MPS
    assert probe().device == "cpu"


def test_apple_silicon_detected_with_fake_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torch = SimpleNamespace(
        __version__="2.13.0",
        cuda=SimpleNamespace(is_available=lambda: False),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: True)),
    )
    monkeypatch.setattr(hardware, "_import_torch", lambda: fake_torch)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(hardware, "_cpu_name", lambda: "Apple M2 Pro")
    monkeypatch.setattr(hardware, "system_memory", lambda: 32 * GIB)
    info = probe()
    assert info.device == "mps"
    assert info.name == "Apple M2 Pro"
    assert info.memory_bytes == 32 * GIB
    assert info.platform == "Darwin-arm64"
    assert info.max_pixels == 1536 * 1536  # half of unified memory counts
    assert probe("mps").device == "mps"


def test_without_torch_probe_still_reports_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_import_torch", lambda: None)
    info = probe()
    assert info.device == "cpu" and info.torch_version is None


@pytest.mark.parametrize(
    ("device", "memory", "side"),
    [
        ("cuda", 3 * GIB, 512),
        ("cuda", 8 * GIB, 1024),
        ("cuda", 16 * GIB, 1536),
        ("cuda", 80 * GIB, 2048),
        ("cpu", 8 * GIB, 768),
        ("mps", 64 * GIB, 2048),
    ],
)
def test_suggest_max_pixels(device: hardware.Device, memory: int, side: int) -> None:
    assert suggest_max_pixels(device, memory) == side * side
