"""Tests call `configure_logging` (directly or via the `sogni*` CLIs in-process); undo it after
each test so every test sees the logging setup it expects."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ours = {name: logging.getLogger(name).level for name in ("sogni_node", "sogni_coordinator")}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, lvl in ours.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)
    structlog.reset_defaults()
