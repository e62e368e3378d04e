"""Where a node keeps the trajectories it committed to, until nobody can ask for them.

Why: a receipt signs the root of the render's trajectory; a coordinator may later challenge
a few steps, and the node must reveal those latents with their proofs. The tensors stay on
disk (`data_dir/trajectories/<job id>.safetensors`, about 8 MiB for a 30-step SDXL render)
for `retention` seconds after the render, then are deleted; a node that lost one cannot
answer its challenge (a failed check), so the window must outlast the coordinator's.
"""

from __future__ import annotations

import time
from pathlib import Path

from sogni_node.render.trajectory import Trajectory
from sogni_protocol.logs import get_logger

__all__ = ["TrajectoryFiles"]

log = get_logger(__name__)


class TrajectoryFiles:
    def __init__(self, folder: Path, retention: float) -> None:
        self.folder = Path(folder)
        self.retention = retention

    def path(self, job_id: bytes) -> Path:
        return self.folder / f"{job_id.hex()}.safetensors"

    def keep(self, job_id: bytes, trajectory: Trajectory, now: float | None = None) -> Path:
        """Write `trajectory` for `job_id` (blocking: call off the event loop), then delete
        those past the retention window."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(job_id)
        trajectory.save(path)
        self.prune(time.time() if now is None else now)
        return path

    def load(self, job_id: bytes) -> Trajectory | None:
        """The kept trajectory of `job_id` (checked against its root), or None."""
        path = self.path(job_id)
        return Trajectory.load(path) if path.is_file() else None

    def prune(self, now: float) -> int:
        """Delete trajectories older than the retention window; returns how many."""
        gone = 0
        for path in self.folder.glob("*.safetensors"):
            try:
                if now - path.stat().st_mtime > self.retention:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                continue
        if gone:
            log.debug("trajectories_pruned", count=gone)
        return gone
