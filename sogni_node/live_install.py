"""Models and LoRAs installed while the node runs are served without a restart.

`sogni-node models add` and `loras add` run in a process of their own and change only the
index files under the models folder. The daemon polls those files' stamps (cheap: two
`stat` calls every `POLL_SECONDS`); when one changes it registers the newly installed models
with the running backend, and the caller re-signs its capabilities and announces them to
every coordinator (`CapabilitiesUpdate`), so routing and the node's own offer checks use
them from the next offer on.

Removed models leave the advertised list (their files are gone) but stay registered: a job
already running on one finishes or fails on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from sogni_node.models.loras import INDEX_NAME as LORA_INDEX
from sogni_node.models.loras import LoraLibraryError
from sogni_node.models.registry import ModelRegistry, ModelSpec
from sogni_node.models.store import INDEX_NAME as MODEL_INDEX
from sogni_node.models.store import (
    ModelIntegrityError,
    ModelStore,
    ModelStoreError,
    StoredModel,
)
from sogni_protocol.logs import get_logger

log = get_logger(__name__)

POLL_SECONDS = 2.0
"""How often the index files are looked at: a model or LoRA added is served within this."""

Stamp = tuple[tuple[int, int, int] | None, ...]


def index_stamp(models_dir: Path) -> Stamp:
    """(mtime, inode, size) of the model and LoRA indexes (None: absent). Both are rewritten
    by an atomic rename, so any change moves the inode or the mtime."""
    out: list[tuple[int, int, int] | None] = []
    for path in (models_dir / MODEL_INDEX, models_dir / "loras" / LORA_INDEX):
        try:
            st = path.stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_ino, st.st_size))
    return tuple(out)


class InstalledModels:
    """The advertised model list of a running node, kept in step with the model store.

    `models` is the list the daemon advertises (mutated in place). Models installed with
    `models add` are registered with `registry` (the backend's) when they appear; ids that
    were never in the store (built-in models) are never dropped.
    """

    def __init__(
        self,
        models_dir: Path,
        registry: ModelRegistry | None,
        models: list[str],
        unload: Callable[[str], None] | None = None,
    ):
        self.store = ModelStore(models_dir)
        self.registry = registry
        self.models = models
        self.unload = unload
        """Drops a loaded model from the backend (removed or replaced in the store)."""
        self._from_store: set[str] = set()
        self._files: dict[str, FileStamp] = {}
        """Store model id -> its files' digests when registered: a re-add with other files
        under the same id is told apart from the model already served."""
        self._read: dict[str, FileStamp] = {}
        self._unloads: list[str] = []

    def installed_specs(self) -> list[ModelSpec]:
        """Specs of the installed models; a model not yet registered has its files checked
        first (sha256, as at start-up) and is left out if one is bad. Blocking: run it off
        the event loop."""
        if not self.store.index_path.is_file():
            return []
        specs = []
        read: dict[str, FileStamp] = {}
        for model in self.store.installed():
            files = _stamp(model)
            new = (
                self.registry is None
                or model.model_id not in self.registry
                or self._files.get(model.model_id, files) != files
            )
            try:
                specs.append(self.store.spec(model.model_id, verify=new))
            except ModelIntegrityError as exc:
                log.error("model_not_served", model=model.model_id, error=str(exc))
                continue
            read[model.model_id] = files
        self._read = read
        return specs

    def apply(self, specs: list[ModelSpec]) -> bool:
        """Register new specs, drop removed store models; True if the advertised list changed.
        On the event loop: the registry's dict is only ever written here and at start-up."""
        before = list(self.models)
        now = {s.model_id for s in specs}
        for spec in specs:
            model_id, files = spec.model_id, self._read.get(spec.model_id, ())
            if self.registry is not None and model_id not in self.registry:
                self.registry.register(spec)
                self._files[model_id] = files
            elif self.registry is not None and model_id in self._files:  # ours, not built in
                old = self.registry.get(model_id)
                if self._files[model_id] != files or old.path != spec.path:
                    self.registry.replace(spec)  # re-added under its id: never the old weights
                    self._unload(model_id)
                    log.info("model_replaced", model=model_id)
                elif old != spec:  # the same files, other defaults: no reload needed
                    self.registry.replace(spec)
                self._files[model_id] = files
            if self.registry is not None and model_id not in self.models:
                self.models.append(model_id)
        for gone in self._from_store - now:
            if gone in self.models:
                self.models.remove(gone)
            if gone in self._files:  # registered from the store here: a built-in id stays
                if self.registry is not None:
                    self.registry.unregister(gone)
                del self._files[gone]
                self._unload(gone)
        self._from_store = now & set(self.models)
        self.models.sort()
        return self.models != before

    def _unload(self, model_id: str) -> None:
        if self.unload is not None:
            self._unloads.append(model_id)

    def unload_dropped(self) -> None:
        """Blocking (a model load may hold the backend's lock): drop the pipelines of the
        models `apply` removed or replaced. Run it off the event loop after `apply`."""
        dropped, self._unloads = self._unloads, []
        for model_id in dropped:
            if self.unload is not None:
                self.unload(model_id)


FileStamp = tuple[tuple[str, str], ...]
"""A stored model's files and their sha256 digests, as its index entry records them."""


def _stamp(model: StoredModel) -> FileStamp:
    return tuple(sorted((name, f.sha256) for name, f in model.files.items()))


async def watch_installed(
    models_dir: Path,
    installed: InstalledModels,
    announce: Callable[[], None],
    *,
    interval: float = POLL_SECONDS,
) -> None:
    """Poll the indexes; on a change, reload the models and call `announce` (re-sign and send
    the capabilities). Runs until cancelled; a bad index is logged and retried next time."""
    last = await trio.to_thread.run_sync(index_stamp, models_dir)
    try:
        installed.apply(await trio.to_thread.run_sync(installed.installed_specs))
        await trio.to_thread.run_sync(installed.unload_dropped)
    except (ModelStoreError, OSError) as exc:
        log.warning("models_not_reloaded", error=str(exc))
    while True:
        await trio.sleep(interval)
        stamp = await trio.to_thread.run_sync(index_stamp, models_dir)
        if stamp == last:
            continue
        try:
            specs = await trio.to_thread.run_sync(installed.installed_specs)
        except (ModelStoreError, OSError) as exc:  # e.g. an index mid-rewrite by hand
            log.warning("models_not_reloaded", error=str(exc))
            continue  # `last` unchanged: tried again at the next poll
        last = stamp
        installed.apply(specs)
        try:
            announce()
        except (ModelStoreError, LoraLibraryError, OSError) as exc:  # the last list stands
            log.warning("capabilities_not_announced", error=str(exc))
        await trio.to_thread.run_sync(installed.unload_dropped)
