"""Keep models warm within a memory budget; evict the least recently used.

Loading a real checkpoint costs seconds to minutes, so a node keeps the models it used
recently in (V)RAM, as many as fit in `budget_bytes`, and advertises them as warm so
coordinators prefer it for them. A model being rendered is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Residency(Generic[T]):
    """LRU of loaded models with their sizes; `admit` evicts what no longer fits."""

    def __init__(self, budget_bytes: int, on_evict: Callable[[str, T], None] | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._on_evict = on_evict
        self._items: OrderedDict[str, tuple[T, int]] = OrderedDict()

    def get(self, model_id: str) -> T | None:
        item = self._items.get(model_id)
        if item is None:
            return None
        self._items.move_to_end(model_id)
        return item[0]

    def admit(self, model_id: str, value: T, size: int, busy: Iterable[str] = ()) -> list[str]:
        """Add a loaded model; returns the ids evicted to make room (never those in `busy`).

        A model larger than the whole budget is still admitted (alone): refusing it would
        make the node unable to render it at all.
        """
        self._items[model_id] = (value, size)
        self._items.move_to_end(model_id)
        return self.trim(busy)

    def trim(self, busy: Iterable[str] = ()) -> list[str]:
        """Evict the least recently used models (never those in `busy`, never the most
        recently used: a model larger than the whole budget stays loaded alone) until
        within the budget: also once a render lets go of a model kept over it."""
        keep = set(busy) | set(list(self._items)[-1:])
        evicted = []
        for victim in list(self._items):
            if self.used_bytes <= self.budget_bytes:
                break
            if victim in keep:
                continue
            old, _ = self._items.pop(victim)
            evicted.append(victim)
            if self._on_evict is not None:
                self._on_evict(victim, old)
        return evicted

    def items(self) -> list[tuple[str, T]]:
        """Without touching the recency order."""
        return [(model_id, value) for model_id, (value, _) in self._items.items()]

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def warm(self) -> list[str]:
        """Most recently used first."""
        return list(reversed(self._items))

    def drop(self, model_id: str) -> bool:
        """Forget a model (removed or replaced in the store); False if it was not loaded.
        A render holding it finishes with it; the next job of that id loads it anew."""
        item = self._items.pop(model_id, None)
        if item is not None and self._on_evict is not None:
            self._on_evict(model_id, item[0])
        return item is not None

    def clear(self) -> None:
        self._items.clear()


def module_bytes(pipe: object) -> int:
    """Bytes of all parameters and buffers of a diffusers pipeline's torch modules."""
    import torch

    total = 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                total += tensor.numel() * tensor.element_size()
    return total
