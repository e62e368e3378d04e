"""The models a node offers when nothing else is said: the embedded trained model, the models
installed with `sogni-node models add`, and, only when asked, the random-weights test model.

Why the test model is opt-in: its images are noise, so a production node that advertised it
would be paid for noise and a newcomer's first render would show nothing recognisable.
Tests, benchmarks and a node started with `test_model = true` still get it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sogni_node.models.registry import (
    SHAPES_DIR,
    SHAPES_MODEL_ID,
    ModelRegistry,
    shapes_model_spec,
    tiny_model_spec,
)
from sogni_node.models.store import ModelStore

__all__ = ["default_registry"]

logger = logging.getLogger(__name__)


def default_registry(models_dir: Path, *, test_model: bool = False) -> ModelRegistry:
    """The shipped shapes model, every model installed in `models_dir`, and with `test_model`
    the tiny random model (built into `models_dir` if missing).

    The shapes model is read in place from the package; an install that lacks its files only
    logs a warning. Installed models are checked (file sizes) and a damaged one is left out
    with a warning.
    """
    specs = []
    if (SHAPES_DIR / "model_index.json").is_file():
        specs.append(shapes_model_spec())
    else:
        logger.warning("embedded model %s missing at %s", SHAPES_MODEL_ID, SHAPES_DIR)
    if test_model:
        specs.append(tiny_model_spec(models_dir))
    built_in = {s.model_id for s in specs}
    if (models_dir / "index.json").is_file():
        installed = ModelStore(models_dir).specs(verify=True)
        specs += [s for s in installed if s.model_id not in built_in]
    return ModelRegistry(specs)
