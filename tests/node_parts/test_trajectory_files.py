"""A node keeps each committed trajectory until its challenge window closes, then drops it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sogni_node.render.trajectory import TrajectoryRecorder
from sogni_node.trajectory_files import TrajectoryFiles


def _trajectory(seed: int):  # type: ignore[no-untyped-def]
    rec = TrajectoryRecorder()
    gen = torch.Generator("cpu").manual_seed(seed)
    for step in range(3):
        rec.record(step, torch.randn((1, 4, 8, 8), generator=gen), timestep=None)
    return rec.finish()


def test_kept_loaded_checked_and_pruned_after_the_window(tmp_path: Path) -> None:
    files = TrajectoryFiles(tmp_path / "trajectories", retention=3600)
    first, second = _trajectory(1), _trajectory(2)
    path = files.keep(b"\x01" * 32, first, now=1_000.0)
    loaded = files.load(b"\x01" * 32)
    assert loaded is not None and loaded.root == first.root and loaded.n_steps == first.n_steps
    assert files.load(b"\x09" * 32) is None
    os.utime(path, (1_000.0, 1_000.0))  # rendered long ago
    files.keep(b"\x02" * 32, second, now=1_000.0 + 3_601)
    assert not path.exists() and files.load(b"\x02" * 32) is not None


def test_keep_lists_the_folder_at_most_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = TrajectoryFiles(tmp_path / "trajectories", retention=3600)
    listings: list[float] = []
    prune = files.prune
    monkeypatch.setattr(files, "prune", lambda now: listings.append(now) or prune(now))
    old = files.keep(b"\x01" * 32, _trajectory(1), now=1_000.0)
    os.utime(old, (1_000.0, 1_000.0))
    for i in range(2, 12):  # ten more jobs within the minute: no listing
        files.keep(bytes([i]) * 32, _trajectory(i), now=1_000.0 + i)
    assert listings == [1_000.0]
    files.keep(b"\x20" * 32, _trajectory(3), now=1_000.0 + 3_601)  # past the window
    assert listings == [1_000.0, 4_601.0] and not old.exists()
    files.keep(b"\x21" * 32, _trajectory(4), now=900.0)  # the clock went back: lists again
    assert listings[-1] == 900.0
