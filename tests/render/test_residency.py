"""Warm models stay within the memory budget; the least recently used goes first."""

from pathlib import Path

import pytest

from sogni_node.models.defaults import default_registry
from sogni_node.render.diffusers_backend import DiffusersBackend
from sogni_node.render.residency import Residency, module_bytes


def test_lru_eviction_within_budget_and_busy_models_kept() -> None:
    evicted: list[str] = []
    lru: Residency[str] = Residency(100, on_evict=lambda m, _v: evicted.append(m))
    assert lru.admit("a", "A", 40) == []
    assert lru.admit("b", "B", 40) == []
    assert lru.get("a") == "A"  # a is now the most recent
    assert lru.admit("c", "C", 40) == ["b"]
    assert lru.warm() == ["c", "a"] and evicted == ["b"]
    assert lru.admit("d", "D", 90, busy=["c"]) == ["a"]  # c renders: kept even over budget
    assert set(lru.warm()) == {"c", "d"}
    with pytest.raises(ValueError, match="budget"):
        Residency(0)


def test_backend_evicts_a_model_that_no_longer_fits(tmp_path: Path) -> None:
    registry = default_registry(tmp_path, test_model=True)
    backend = DiffusersBackend(registry, device="cpu", threads=1)
    backend.load("sogni-tiny-sd")
    size = module_bytes(backend._pipes.items()[0][1].pipe)
    assert size > 0 and backend.warm_models() == ["sogni-tiny-sd"]
    small = DiffusersBackend(registry, device="cpu", threads=1, memory_budget=size)
    spec = registry.get("sogni-tiny-sd")
    from dataclasses import replace

    registry.register(replace(spec, model_id="sogni-tiny-copy"))
    small.load("sogni-tiny-sd")
    small.load("sogni-tiny-copy")
    assert small.warm_models() == ["sogni-tiny-copy"]


def test_a_model_removed_from_the_store_is_dropped_and_its_memory_freed() -> None:
    freed: list[str] = []
    cache: Residency[str] = Residency(100, on_evict=lambda model, _value: freed.append(model))
    cache.admit("a", "pipe-a", 40)
    cache.admit("b", "pipe-b", 40)
    assert cache.drop("a") and freed == ["a"]
    assert cache.warm() == ["b"] and cache.used_bytes == 40
    assert not cache.drop("a") and freed == ["a"]  # not loaded: nothing to free
