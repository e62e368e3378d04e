"""Session fixtures: build the tiny model once and share one CPU backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sogni_node.models import ModelRegistry, ensure_tiny_model
from sogni_node.models.defaults import default_registry
from sogni_node.render.diffusers_backend import DiffusersBackend


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_path(model_cache: Path) -> Path:
    return ensure_tiny_model(model_cache)


@pytest.fixture(scope="session")
def registry(model_cache: Path, tiny_path: Path) -> ModelRegistry:
    return default_registry(model_cache, test_model=True)


@pytest.fixture(scope="session")
def backend(registry: ModelRegistry) -> Iterator[DiffusersBackend]:
    b = DiffusersBackend(registry, device="cpu")
    yield b
    b.close()
