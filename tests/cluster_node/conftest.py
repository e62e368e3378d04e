"""Fixtures of the cluster tests: the e2e tests' real diffusers backend."""

from tests.e2e.conftest import backend, registry  # noqa: F401  (fixtures)
