"""Gateway tests: an in-process coordinator and a real node on 127.0.0.1 (tiny model)."""

from __future__ import annotations

from pathlib import Path

from sogni_coordinator.api_keys import ApiKeys
from sogni_coordinator.ledger import Ledger
from tests.e2e.conftest import backend, registry  # noqa: F401  (fixtures)


def create_key(database: Path | str, name: str = "app", **kw: float | None) -> tuple[str, str]:
    """A new API key and its account, as `sogni-coordinator api-keys create` makes them."""
    keys = ApiKeys(database)
    try:
        return keys.create(name, **kw)
    finally:
        keys.close()


def funded_key(database: Path | str, name: str = "app", spark: int = 10) -> str:
    """`create_key`'s key, its account credited `spark` Spark (bought, as by card)."""
    key, account = create_key(database, name)
    ledger = Ledger(database)
    try:
        ledger.credit_purchase(account, spark)
    finally:
        ledger.close()
    return key


def spark_of(database: Path | str, account: str) -> int:
    """`account`'s Spark (free and paid, micro units) in the coordinator's ledger."""
    ledger = Ledger(database)
    try:
        have = ledger.balance(account)
    finally:
        ledger.close()
    return have["spark_free"] + have["spark_paid"]
