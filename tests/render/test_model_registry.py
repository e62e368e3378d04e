"""ModelRegistry: ids, defaults, config parsing and the unknown-model error."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from sogni_node.models import TINY_MODEL_ID, ModelRegistry, ModelSpec, UnknownModelError
from sogni_node.models.defaults import default_registry
from sogni_node.models.registry import DEFAULT_MODEL_ID, SHAPES_MODEL_ID


def test_default_registry_leaves_out_the_test_model(tmp_path: Path) -> None:
    """A node advertises noise only when asked: no tiny model, and nothing built for it."""
    reg = default_registry(tmp_path)
    assert SHAPES_MODEL_ID in reg
    assert TINY_MODEL_ID not in reg
    assert reg.ids() == [SHAPES_MODEL_ID]
    assert DEFAULT_MODEL_ID == SHAPES_MODEL_ID == "sogni-shapes-64"
    assert list(tmp_path.iterdir()) == []


def test_test_model_flag_adds_the_tiny_model(model_cache: Path, tiny_path: Path) -> None:
    reg = default_registry(model_cache, test_model=True)
    assert SHAPES_MODEL_ID in reg and TINY_MODEL_ID in reg


def test_node_config_test_model_is_off_unless_set() -> None:
    from sogni_node.config import load_node_config

    assert load_node_config(None, env={}).test_model is False
    assert load_node_config(None, env={"SOGNI_NODE_TEST_MODEL": "1"}).test_model is True


def test_sogni_render_defaults_to_the_shapes_model() -> None:
    """`sogni render` without `--model` asks for the trained model, not the noise one."""
    import typer.main

    from sogni_app.cli import app

    render = typer.main.get_command(app).commands["render"]  # type: ignore[attr-defined]
    model = next(p for p in render.params if p.name == "model")
    assert model.default == SHAPES_MODEL_ID


def test_test_model_spec(registry: ModelRegistry, tiny_path: Path) -> None:
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
