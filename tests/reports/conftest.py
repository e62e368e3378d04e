"""Report tests: an in-process coordinator and real nodes on 127.0.0.1 (tiny model)."""

from __future__ import annotations

from tests.e2e.conftest import backend, registry  # noqa: F401  (fixtures)
