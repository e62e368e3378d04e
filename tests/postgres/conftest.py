"""One real PostgreSQL server per test session and a fresh database per test: the
`pg_server` and `pg_url` fixtures live in tests/conftest.py (every engine-parametrised
test uses them), started by `sogni_devnet.pg_cluster`."""
