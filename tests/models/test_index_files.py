"""The model and LoRA indexes are files people edit by hand: a malformed one is an error
naming the file (it was a KeyError/TypeError traceback, and in a running daemon its end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from sogni_node.live_install import watch_installed
from sogni_node.models.loras import LoraLibrary, LoraLibraryError
from sogni_node.models.store import ModelStore, ModelStoreError


@pytest.mark.parametrize(
    "index",
    [
        [],
        {"version": 1, "models": {"x": 5}},
        {"version": 1, "models": {"x": {"folder": "x", "class": "sd15"}}},  # no files
    ],
)
def test_a_malformed_model_index_is_an_error_naming_it(tmp_path: Path, index: object) -> None:
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ModelStoreError, match=str(tmp_path / "index.json")):
        ModelStore(tmp_path).installed()


def test_a_malformed_lora_index_is_an_error_naming_it(tmp_path: Path) -> None:
    library = LoraLibrary(tmp_path)
    library.root.mkdir(parents=True)
    (library.root / "index.json").write_text(json.dumps({"version": 1, "loras": {"x": 5}}))
    with pytest.raises(LoraLibraryError, match="malformed entry"):
        library.installed()


async def test_a_bad_index_while_running_keeps_the_daemon_and_its_last_list(
    tmp_path: Path,
) -> None:
    """The LoRA index made unreadable mid-run ended the daemon (exit 3) through the
    capabilities announcement; now it is logged and the last announced list stands."""
    calls: list[int] = []

    class Installed:
        def installed_specs(self) -> list[object]:
            return []

        def apply(self, specs: list[object]) -> None:
            pass

        def unload_dropped(self) -> None:
            pass

    def announce() -> None:
        calls.append(1)
        LoraLibrary(tmp_path).ids()  # what the daemon's announcement reads

    loras = tmp_path / "loras"
    loras.mkdir()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: watch_installed(tmp_path, Installed(), announce, interval=0.01)  # type: ignore[arg-type]
        )
        await trio.sleep(0.05)
        (loras / "index.json").write_text("not json")
        with trio.fail_after(10):
            while not calls:
                await trio.sleep(0.01)
        await trio.sleep(0.05)  # a few more polls: it is still running
        nursery.cancel_scope.cancel()
    assert calls


def test_a_full_disk_while_adding_a_model_is_the_disk_full_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`shutil.copytree` gathers its errors in a `shutil.Error` (a list, no errno): the CLI
    showed a traceback for ENOSPC instead of "the disk is full" (exit 4)."""
    import errno
    import shutil

    from sogni_node.models.store import _copy_folder

    def full(src: Path, dst: Path) -> None:
        raise shutil.Error([(str(src), str(dst), "[Errno 28] No space left on device: 'x'")])

    monkeypatch.setattr(shutil, "copytree", full)
    with pytest.raises(OSError) as info:
        _copy_folder(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "b")
