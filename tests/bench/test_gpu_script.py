"""bench/gpu/sdxl_speed.py in its CPU mode: the whole flow (random SDXL-shaped model from the
bundled config, plain diffusers reference, the node's backend, PSNR, JSON) in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "sdxl_speed.py"


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_tiny_cpu_run_reports_the_reference_and_the_node_backend(tmp_path: Path) -> None:
    out = tmp_path / "sdxl.json"
    proc = _script("--device", "cpu", "--tiny", "--runs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line == json.loads(out.read_text())
    assert line["device"] == "cpu" and line["tiny"] and (line["size"], line["steps"]) == (64, 2)
    assert line["reference"]["median_s"] > 0 and line["reference"]["first_render_s"] > 0
    [node] = line["candidates"]
    assert node["skipped"] is None and node["median_s"] > 0
    # same network, same noise, same scheduler, fp32 both: the node's path changes nothing
    assert node["psnr_db_vs_fp16"] == "inf" or node["psnr_db_vs_fp16"] >= 40
    assert line["best"] == node["name"] and line["speedup"] > 0


def test_a_missing_gpu_is_one_line() -> None:
    if torch.cuda.is_available():
        return  # the error is for machines without CUDA; nothing to check here
    proc = _script("--device", "cuda")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "sdxl_speed: device 'cuda' but torch sees no CUDA GPU"
