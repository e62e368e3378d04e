"""Where a node keeps the trajectories it committed to, until nobody can ask for them.

Why: a receipt signs the root of the render's trajectory; a coordinator may later challenge
a few steps, and the node must reveal those latents with their proofs. The tensors stay on
disk (`data_dir/trajectories/<job id>.safetensors`, about 8 MiB for a 30-step SDXL render)
for `retention` seconds after the render, then are deleted; a node that lost one cannot
answer its challenge (a failed check), so the window must outlast the coordinator's.

For a JPEG or WebP render the lossless pixels it was encoded from are kept beside it
(`<job id>.pixels.png`, same retention): a challenge of the final leaf may ask for them
(`Challenge.pixels`; docs/IMAGE_CHECK.md, "Opened pixels"). A PNG job's delivered image is
its pixels already.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sogni_node.render.trajectory import Trajectory
from sogni_protocol.logs import get_logger

__all__ = ["TrajectoryFiles"]

PRUNE_EVERY = 60.0
"""Seconds between two listings of the folder by `keep` at most (a quarter of the retention
when shorter): a busy node keeps thousands of trajectories within the window, and listing
them on every job would cost it more than the job's own write."""

log = get_logger(__name__)


class TrajectoryFiles:
    def __init__(self, folder: Path, retention: float) -> None:
        self.folder = Path(folder)
        self.retention = retention
        self._pruned_at: float | None = None

    def path(self, job_id: bytes) -> Path:
        return self.folder / f"{job_id.hex()}.safetensors"

    def keep(self, job_id: bytes, trajectory: Trajectory, now: float | None = None) -> Path:
        """Write `trajectory` for `job_id` (blocking: call off the event loop), then delete
        those past the retention window (at most every `PRUNE_EVERY` seconds)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.path(job_id)
        trajectory.save(path)
        os.chmod(path, 0o600)  # the latents of a render: its owner's only, whatever the umask
        now = time.time() if now is None else now
        every = min(PRUNE_EVERY, self.retention / 4)
        if self._pruned_at is None or not 0 <= now - self._pruned_at < every:
            self.prune(now)
        return path

    def pixels_path(self, job_id: bytes) -> Path:
        return self.folder / f"{job_id.hex()}.pixels.png"

    def keep_pixels(self, job_id: bytes, png: bytes) -> Path:
        """Write the lossless pixels of `job_id`'s lossy image (blocking: off the event loop),
        atomically, so a challenge never reads half a file."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.pixels_path(job_id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # a leftover .tmp keeps its mode through O_TRUNC
            f.write(png)
        tmp.replace(path)
        return path

    def load_pixels(self, job_id: bytes) -> bytes | None:
        """The kept pixels of `job_id` (a PNG), or None (a PNG job, expired, lost)."""
        try:
            return self.pixels_path(job_id).read_bytes()
        except FileNotFoundError:
            return None

    def load(self, job_id: bytes) -> Trajectory | None:
        """The kept trajectory of `job_id` (checked against its root), or None."""
        path = self.path(job_id)
        return Trajectory.load(path) if path.is_file() else None

    def prune(self, now: float) -> int:
        """Delete trajectories (and kept pixels) older than the retention window; returns how
        many files."""
        self._pruned_at = now
        gone = 0
        kept = [*self.folder.glob("*.safetensors"), *self.folder.glob("*.pixels.png")]
        for path in kept:
            try:
                if now - path.stat().st_mtime > self.retention:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                continue
        if gone:
            log.debug("trajectories_pruned", count=gone)
        return gone
