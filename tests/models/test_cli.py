"""`sogni-node models ...` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from sogni_node.cli import app

runner = CliRunner()


def _run(models: Path, *args: str) -> tuple[int, str]:
    cmd, *rest = args
    result = runner.invoke(app, ["models", cmd, *rest, "--models-dir", str(models)])
    return result.exit_code, result.output


def test_models_cli(
    tiny_folder: Path, tiny_checkpoint: Path, tiny_config_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    assert _run(models, "verify") == (
        0,
        "no models installed: nothing to verify (built-in models ship with the node)\n",
    )
    assert _run(models, "list") == (
        0,
        "sogni-shapes-64  sd15  64x64  steps=8 guidance=5.0  (built-in)\n"
        "no models installed (add one with `sogni-node models add PATH`)\n",
    )
    code, out = _run(models, "add", str(tiny_folder), "--id", "tiny")
    assert code == 0 and "added tiny (sd15)" in out
    # a single file whose layout is not the standard class's (an A1111 export of a custom
    # model): one line saying what to pass, never a `size mismatch` dump (issue #15)
    code, out = _run(models, "add", str(tiny_checkpoint), "--id", "nocfg")
    (error,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 3 and "other sizes than the standard sd15 layout" in error, out
    assert "--config-dir" in error and len(error) < 400
    assert "size mismatch" not in out and "Traceback" not in out
    code, out = _run(models, "add", str(tiny_checkpoint), "--config-dir", str(tiny_config_dir))
    assert code == 0 and "added tiny_sd_v1_-test (sd15)" in out
    code, out = _run(models, "add", str(tiny_folder), "--id", "tiny")
    assert code == 3 and "already installed" in out  # refused

    code, out = _run(models, "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert sorted(listed) == ["sogni-shapes-64", "tiny", "tiny_sd_v1_-test"]
    assert listed["sogni-shapes-64"]["builtIn"] is True
    assert listed["tiny_sd_v1_-test"]["format"] == "single-file"

    assert _run(models, "verify") == (0, "tiny: ok\ntiny_sd_v1_-test: ok\n")
    unet = models / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:100])
    code, out = _run(models, "verify")
    assert code == 1
    assert "tiny: BAD:" in out and "truncated" in out and "tiny_sd_v1_-test: ok" in out
    code, out = _run(models, "verify", "tiny_sd_v1_-test", "--quick", "--json")
    assert code == 0 and json.loads(out) == {"tiny_sd_v1_-test": {"ok": True, "problems": []}}

    assert _run(models, "remove", "tiny") == (0, "removed tiny\n")
    assert not (models / "tiny").exists()
    code, out = _run(models, "remove", "tiny")
    assert code == 3 and "not installed" in out
    code, out = _run(models, "list")
    assert code == 0 and out.splitlines()[1].startswith("tiny_sd_v1_-test  sd15  512x512")


def test_a_broken_lora_file_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"garbage")
    result = runner.invoke(
        app, ["loras", "add", str(bogus), "--models-dir", str(tmp_path / "models")]
    )
    assert result.exit_code == 3, result.output
    assert "bogus.safetensors: not a readable safetensors file" in result.output
    assert "LoRA .safetensors" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "models" / "bogus.safetensors").exists()
