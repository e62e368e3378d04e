"""Warm models stay within the memory budget; the least recently used goes first."""

import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from sogni_node.models.defaults import default_registry
from sogni_node.models.registry import ModelRegistry
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


def test_a_warm_models_job_never_waits_for_another_models_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold model loading (minutes for a real checkpoint) held the one lock every job
    took: a warm model's render, a cancel and the warm list all waited behind it. Now
    only another load waits; a job cancelled before its load never starts one."""
    from sogni_node.render.backend import RenderCancelled, RenderJob

    c = _loading_cold(tmp_path, monkeypatch, warm=True)
    backend, loading, release, cold = c.backend, c.loading, c.release, c.thread
    cold.start()
    try:
        assert loading.wait(30)
        job = RenderJob(
            model_id="sogni-tiny-sd",
            prompt="x",
            negative_prompt="",
            steps=2,
            guidance=5.0,
            scheduler=None,
            width=64,
            height=64,
            seed=1,
        )
        done: list[object] = []
        warm = threading.Thread(
            target=lambda: done.append(backend.render(job, lambda _s: None, lambda: False))
        )
        warm.start()
        warm.join(60)
        assert done and backend.warm_models() == ["sogni-tiny-sd"]  # while "cold" loads
        with pytest.raises(RenderCancelled):
            backend.render(replace(job, model_id="cold"), lambda _s: None, lambda: True)
    finally:
        release.set()
        cold.join(60)
    assert set(backend.warm_models()) == {"sogni-tiny-sd", "cold"}


def test_a_model_removed_or_replaced_while_it_loads_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models remove` while a job loads that model: the unload found nothing to drop and
    the load then kept the old weights, which a re-added model of that id rendered with.
    Now a pipeline is kept only if its registry entry is still the one it was loaded from,
    and a warm one whose entry was replaced is dropped."""

    c = _loading_cold(tmp_path, monkeypatch)
    registry, backend, loading, release, cold = (
        c.registry,
        c.backend,
        c.loading,
        c.release,
        c.thread,
    )
    cold.start()
    assert loading.wait(30)
    registry.unregister("cold")  # what the watcher does on `models remove`
    backend.unload("cold")
    release.set()
    cold.join(60)
    assert backend.warm_models() == []
    monkeypatch.undo()  # loads as usual from here
    backend.load("sogni-tiny-sd")
    first = backend._get("sogni-tiny-sd")
    registry.replace(replace(registry.get("sogni-tiny-sd")))  # re-added: a new entry
    assert backend._get("sogni-tiny-sd") is not first  # loaded anew, never the old pipeline


@dataclass
class _Cold:
    """The tiny model, a copy of it named `cold`, and a load of `cold` (in `thread`, not
    started) that holds until `release` is set; `loading` says it began."""

    registry: ModelRegistry
    backend: DiffusersBackend
    loading: threading.Event
    release: threading.Event
    thread: threading.Thread


def _loading_cold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, warm: bool = False) -> _Cold:
    """`warm`: the tiny model is loaded first, as usual."""
    from sogni_node.render import diffusers_backend

    registry = default_registry(tmp_path, test_model=True)
    registry.register(replace(registry.get("sogni-tiny-sd"), model_id="cold"))
    backend = DiffusersBackend(registry, device="cpu", threads=1)
    if warm:
        backend.load("sogni-tiny-sd")
    loading, release = threading.Event(), threading.Event()
    real = diffusers_backend.DiffusionPipeline.from_pretrained

    def slow_load(*args: object, **kwargs: object) -> object:
        loading.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusers_backend.DiffusionPipeline, "from_pretrained", slow_load)
    thread = threading.Thread(target=backend.load, args=("cold",))
    return _Cold(registry, backend, loading, release, thread)


def test_a_model_handed_to_a_render_is_not_evicted_before_the_render_locks_it(
    tmp_path: Path,
) -> None:
    """A render got its pipeline, then another model's load evicted it before the render
    took its lock (busy meant "locked"): two models in memory over the budget, the evicted
    one loaded again by the next job. Now a pipeline counts as busy from the moment it is
    handed out until the render lets go."""
    registry = default_registry(tmp_path, test_model=True)
    registry.register(replace(registry.get("sogni-tiny-sd"), model_id="sogni-tiny-copy"))
    probe = DiffusersBackend(registry, device="cpu", threads=1)
    probe.load("sogni-tiny-sd")
    size = module_bytes(probe._pipes.items()[0][1].pipe)
    backend = DiffusersBackend(registry, device="cpu", threads=1, memory_budget=size)
    with backend.holding("sogni-tiny-sd") as held:
        assert not held.lock.locked()  # handed out, its render not yet started
        backend.load("sogni-tiny-copy")
        assert set(backend.warm_models()) == {"sogni-tiny-sd", "sogni-tiny-copy"}
    assert backend.warm_models() == ["sogni-tiny-copy"]  # let go: back within the budget


def test_a_model_larger_than_the_budget_stays_loaded_alone_after_its_render() -> None:
    """Trimming when a render let go evicted a lone model over the budget (an 8 GB GPU's
    SDXL): the node reloaded it from disk for every job and advertised nothing warm."""
    lru: Residency[str] = Residency(100)
    lru.admit("big", "BIG", 150)
    assert lru.trim(busy=[]) == [] and lru.warm() == ["big"]
    lru.admit("small", "S", 10)  # another model: the big one, least recent, makes room
    assert lru.warm() == ["small"]
