"""Session fixtures: the tiny model as a folder, as an A1111-layout single file, and configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sogni_node.models import ensure_tiny_model
from sogni_node.models.single_file import export_sd15_single_file


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "Tiny SD v1 (test).safetensors"
    return export_sd15_single_file(tiny_folder, out)


@pytest.fixture(scope="session")
def tiny_config_dir(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's configs and tokenizer, no weights: a custom single-file skeleton."""
    dest = tmp_path_factory.mktemp("cfg") / "tiny-config"
    shutil.copytree(tiny_folder, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    return dest
