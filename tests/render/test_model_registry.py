"""ModelRegistry: ids, defaults, config parsing and the unknown-model error."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from sogni_node.models import TINY_MODEL_ID, ModelRegistry, ModelSpec, UnknownModelError
from sogni_node.models.registry import SHAPES_MODEL_ID


def test_default_registers_tiny(registry: ModelRegistry, tiny_path: Path) -> None:
    assert registry.ids() == [SHAPES_MODEL_ID, TINY_MODEL_ID]
    spec = registry.get(TINY_MODEL_ID)
    assert spec.path == tiny_path
    assert spec.model_class == "sd15"
    assert (spec.width, spec.height) == (64, 64)
    assert spec.default_steps >= 1


def test_unknown_model(registry: ModelRegistry) -> None:
    with pytest.raises(UnknownModelError, match="no-such-model") as info:
        registry.get("no-such-model")
    assert info.value.model_id == "no-such-model"
    assert TINY_MODEL_ID in str(info.value)  # the message lists what is available
    assert isinstance(info.value, LookupError)
    again = pickle.loads(pickle.dumps(info.value))
    assert again.model_id == "no-such-model" and str(again) == str(info.value)


def test_from_config(tmp_path: Path) -> None:
    reg = ModelRegistry.from_config(
        {
            "b-model": {"path": str(tmp_path / "b"), "class": "sdxl", "steps": 30},
            "a-model": {"path": tmp_path / "a", "guidance": 1.0, "width": 768, "height": 768},
        }
    )
    assert reg.ids() == ["a-model", "b-model"]
    assert "a-model" in reg and len(reg) == 2
    b = reg.get("b-model")
    assert (b.model_class, b.default_steps, b.path) == ("sdxl", 30, tmp_path / "b")
    a = reg.get("a-model")
    assert (a.default_guidance, a.width, a.model_class) == (1.0, 768, "sd15")


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"path": "x", "class": "dalle"},
        {"path": "x", "colour": "red"},
        {"path": "x", "steps": 0},
    ],
)
def test_bad_config(cfg: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelRegistry.from_config({"m": cfg})


def test_duplicate_id(tmp_path: Path) -> None:
    spec = ModelSpec(model_id="m", path=tmp_path)
    with pytest.raises(ValueError, match="twice"):
        ModelRegistry([spec, spec])
