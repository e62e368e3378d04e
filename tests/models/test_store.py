"""ModelStore: folder and single-file import, render, sha256 checks, remove, verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sogni_node.models.registry import ModelRegistry
from sogni_node.models.store import ModelIntegrityError, ModelStore, ModelStoreError
from sogni_node.render import RenderJob
from sogni_node.render.diffusers_backend import DiffusersBackend

UNET = "unet/diffusion_pytorch_model.safetensors"


def _render(registry: ModelRegistry, model_id: str) -> bytes:
    spec = registry.get(model_id)
    backend = DiffusersBackend(registry, device="cpu", threads=1)
    try:
        job = RenderJob(model_id, "a red circle", "", 2, 5.0, None, 64, 64, 7)
        out = backend.render(job, lambda _s: None, lambda: False)
    finally:
        backend.close()
    assert spec.path.is_dir()
    return out.image


def test_folder_import_detects_and_renders(tiny_folder: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    model = store.add(tiny_folder)
    assert (model.model_id, model.model_class, model.source_format) == (
        "sogni-tiny-sd",
        "sd15",
        "diffusers",
    )
    assert UNET in model.files and len(model.files[UNET].sha256) == 64
    index = json.loads((tmp_path / "models" / "index.json").read_text())
    assert index["models"]["sogni-tiny-sd"]["class"] == "sd15"
    spec = store.registry().get("sogni-tiny-sd")
    assert (spec.default_steps, spec.width, spec.default_scheduler) == (20, 512, "dpmpp_2m_karras")
    assert _render(store.registry(), "sogni-tiny-sd").startswith(b"\x89PNG")


def test_single_file_import_round_trips_and_renders(
    tiny_folder: Path, tiny_checkpoint: Path, tiny_config_dir: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "models")
    model = store.add(tiny_checkpoint, config_dir=tiny_config_dir)
    assert model.model_id == "tiny_sd_v1_-test"
    assert (model.model_class, model.source_format) == ("sd15", "single-file")
    assert model.source_sha256 and len(model.source_sha256) == 64
    folder = store.path(model)
    for rel in (UNET, "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        want, got = load_file(str(tiny_folder / rel)), load_file(str(folder / rel))
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), rel
    assert _render(store.registry(), model.model_id).startswith(b"\x89PNG")


def test_single_file_without_tokenizer_is_refused_clearly(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="needs a CLIP tokenizer"):
        store.add(tiny_checkpoint, model_id="x")
    assert store.installed() == []
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # no leftovers


def _installed(tiny_folder: Path, tmp_path: Path) -> tuple[ModelStore, Path]:
    store = ModelStore(tmp_path / "models")
    model = store.add(tiny_folder, model_id="tiny")
    return store, store.path(model) / UNET


def test_corrupted_file_is_refused_naming_the_file(tiny_folder: Path, tmp_path: Path) -> None:
    store, unet = _installed(tiny_folder, tmp_path)
    data = bytearray(unet.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    unet.write_bytes(bytes(data))
    store.check("tiny", full=False)  # a size-only check cannot see it
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch") as err:
        store.check("tiny")
    assert err.value.file == unet and str(unet) in str(err.value)
    with pytest.raises(ModelIntegrityError):
        store.registry(strict=True)
    assert "tiny" not in store.registry()  # skipped (and logged), not served


def test_truncated_file_is_refused(tiny_folder: Path, tmp_path: Path) -> None:
    store, unet = _installed(tiny_folder, tmp_path)
    size = unet.stat().st_size
    with unet.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ModelIntegrityError, match=r"truncated \(\d+ of \d+ bytes\)"):
        store.check("tiny", full=False)
    with pytest.raises(ModelIntegrityError, match=r"diffusion_pytorch_model\.safetensors"):
        store.spec("tiny")
    unet.unlink()
    with pytest.raises(ModelIntegrityError, match="is missing"):
        store.check("tiny")


def test_verify_reports_per_model(tiny_folder: Path, tmp_path: Path) -> None:
    store, unet = _installed(tiny_folder, tmp_path)
    store.add(tiny_folder, model_id="tiny2")
    assert [(r.model_id, r.ok) for r in store.verify()] == [("tiny", True), ("tiny2", True)]
    unet.write_bytes(unet.read_bytes() + b"x")
    results = {r.model_id: r for r in store.verify()}
    assert not results["tiny"].ok and "changed size" in results["tiny"].problems[0]
    assert results["tiny2"].ok
    assert [r.ok for r in store.verify("tiny2")] == [True]


def test_remove_and_duplicates(tiny_folder: Path, tmp_path: Path) -> None:
    store, _ = _installed(tiny_folder, tmp_path)
    with pytest.raises(ModelStoreError, match="already installed"):
        store.add(tiny_folder, model_id="tiny")
    folder = store.path(store.get("tiny"))
    store.remove("tiny")
    assert not folder.exists() and store.installed() == []
    with pytest.raises(ModelStoreError, match="not installed"):
        store.remove("tiny")
    with pytest.raises(ModelStoreError, match="does not exist"):
        store.add(tmp_path / "nope")
