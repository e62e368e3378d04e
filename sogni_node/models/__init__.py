"""Local model storage: the registry (id -> folder) and the tiny offline test model."""

from sogni_node.models.registry import ModelRegistry, ModelSpec, UnknownModelError
from sogni_node.models.tiny import TINY_MODEL_ID, ensure_tiny_model

__all__ = [
    "TINY_MODEL_ID",
    "ModelRegistry",
    "ModelSpec",
    "UnknownModelError",
    "ensure_tiny_model",
]
