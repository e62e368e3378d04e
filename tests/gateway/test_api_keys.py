"""API keys of the SDK gateway: hashed at rest, looked up in constant time, revocable, a
daily limit per key, and an account that the coordinator's `credit`/`balance` commands and
the ledger treat like any payer. Real SQLite, the real CLI (in-process)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from eth_utils import is_checksum_address
from typer.testing import CliRunner

import sogni_coordinator.api_keys as api_keys_module
from sogni_coordinator.api_keys import (
    KEY_PREFIX,
    ApiKeyError,
    ApiKeys,
    account_address,
    account_private_key,
)
from sogni_coordinator.cli import app as coordinator_app
from sogni_coordinator.ledger import Ledger
from sogni_coordinator.store import Store

runner = CliRunner()
DAY = 86400.0
NOON = 1_790_000_000.0 - 1_790_000_000.0 % DAY + DAY / 2


def _env(tmp: Path) -> dict[str, str]:
    return {"SOGNI_COORDINATOR_DATA_DIR": str(tmp), "SOGNI_COORDINATOR_LOG_LEVEL": "warning"}


def _all_bytes(db: Path) -> bytes:
    """The database as it lies on disk, WAL included (a fresh key may still be there)."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())


def test_keys_are_stored_hashed_never_in_plaintext(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    keys = ApiKeys(path)
    key, account = keys.create("my app")
    assert key.startswith(KEY_PREFIX) and len(key) >= len(KEY_PREFIX) + 43  # 256 random bits
    assert is_checksum_address(account)
    raw = _all_bytes(path)
    secret = key.removeprefix(KEY_PREFIX).encode()
    assert key.encode() not in raw and secret not in raw and secret[:16] not in raw
    assert hashlib.sha256(key.encode()).digest() in raw  # what is there instead
    keys.close()
    # the plaintext is also absent after a checkpoint folds the WAL into the main file
    reopened = ApiKeys(path)
    reopened._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert key.encode() not in _all_bytes(path)
    record = reopened.lookup(key)
    assert record is not None and record.account == account and record.name == "my app"
    reopened.close()


def test_the_account_is_the_address_of_the_payer_key_derived_from_the_api_key(
    tmp_path: Path,
) -> None:
    from eth_account import Account

    keys = ApiKeys(tmp_path / "c.db")
    key, account = keys.create("signer")
    other, other_account = keys.create("signer 2")
    keys.close()
    assert account == account_address(key) != other_account == account_address(other)
    # the gateway signs the payer authorization with this key: its address is the account
    assert Account.from_key(account_private_key(key)).address == account
    # and it is not the hash kept at rest (knowing the file gives no signing key)
    assert account_private_key(key) != hashlib.sha256(key.encode()).digest()
    try:
        from sogni_coordinator.gateway import payer  # the gateway's own derivation
    except ImportError:
        return
    assert payer.account_address(key) == account


def test_lookup_finds_only_the_exact_key_and_compares_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = ApiKeys(tmp_path / "c.db")
    key, account = keys.create("a")
    other, _ = keys.create("b")
    compared: list[tuple[bytes, bytes]] = []
    real = api_keys_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(api_keys_module.hmac, "compare_digest", spy)
    found = keys.lookup(key)
    assert found is not None and found.account == account
    assert compared == [(hashlib.sha256(key.encode()).digest(),) * 2]
    record_b = keys.lookup(other)
    assert record_b is not None and record_b.account != account
    # near misses, other keys' prefixes, junk a header could carry: all unknown
    for bad in (
        key[:-1],
        key + "x",
        key.upper(),
        " " + key,
        "",
        KEY_PREFIX,
        "x" * 10_000,
        "\ud800",
        hashlib.sha256(key.encode()).hexdigest(),
    ):
        assert keys.lookup(bad) is None, bad
    keys.close()


def test_revoked_key_is_marked_and_revoking_twice_or_unknown_is_false(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path / "c.db")
    key, _ = keys.create("a")
    record = keys.lookup(key)
    assert record is not None and not record.revoked
    assert keys.revoke(record.key_id) is True
    assert keys.revoke(record.key_id) is False
    assert keys.revoke("key_nope") is False
    again = keys.lookup(key)
    assert again is not None and again.revoked  # the gateway refuses it with 4021
    assert [r.revoked for r in keys.list()] == [True]
    keys.close()


def test_daily_limit_counts_per_utc_day_and_refunds_never_go_negative(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path / "c.db")
    key, account = keys.create("limited", daily_limit_spark=2.5)
    record = keys.lookup(key)
    assert record is not None and record.daily_limit_micro == 2_500_000
    assert keys.spent_today(account, now=NOON) == 0
    keys.record_spend(account, 2_000_000, now=NOON)
    keys.record_spend(account.lower(), 400_000, now=NOON)  # the account's case does not matter
    assert keys.spent_today(account, now=NOON) == 2_400_000
    assert record.allows(keys.spent_today(account, now=NOON), 100_000)
    assert not record.allows(keys.spent_today(account, now=NOON), 100_001)
    # cheating with a big "refund" cannot buy headroom beyond zero
    keys.record_spend(account, -10_000_000, now=NOON)
    assert keys.spent_today(account, now=NOON) == 0
    keys.record_spend(account, 2_500_000, now=NOON)
    assert not record.allows(keys.spent_today(account, now=NOON), 1)
    # the next UTC day starts from zero; the previous day's total is not touched
    assert keys.spent_today(account, now=NOON + DAY / 2 + 1) == 0
    assert keys.spent_today(account, now=NOON) == 2_500_000
    with pytest.raises(TypeError):
        keys.record_spend(account, 1.5, now=NOON)  # type: ignore[arg-type]
    unlimited, _ = keys.create("open")
    rec = keys.lookup(unlimited)
    assert rec is not None and rec.daily_limit_micro is None and rec.allows(10**15, 10**15)
    keys.close()


def test_try_spend_checks_and_records_in_one_step_even_from_many_threads(tmp_path: Path) -> None:
    import threading

    keys = ApiKeys(tmp_path / "c.db")
    _, account = keys.create("racy", daily_limit_spark=1)
    limit = 1_000_000
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def spend() -> None:
        barrier.wait()
        results.append(keys.try_spend(account, 300_000, limit, now=NOON))

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True] * 3  # 3 x 0.3 fits in 1, a 4th does not
    assert keys.spent_today(account, now=NOON) == 900_000
    assert keys.try_spend(account, 100_000, limit, now=NOON)  # exactly the limit is fine
    assert not keys.try_spend(account, 1, limit, now=NOON)
    assert keys.try_spend(account, 10**12, None, now=NOON)  # no limit
    with pytest.raises(ValueError):
        keys.try_spend(account, -5, limit, now=NOON)  # no headroom bought with a negative
    keys.close()


@pytest.mark.parametrize(
    ("name", "limit"),
    [("", None), ("x" * 101, None), ("a\nb", None), ("ok", -1.0), ("ok", float("nan"))],
)
def test_create_refuses_bad_names_and_limits(
    tmp_path: Path, name: str, limit: float | None
) -> None:
    keys = ApiKeys(tmp_path / "c.db")
    with pytest.raises(ApiKeyError):
        keys.create(name, limit)
    assert keys.list() == []
    keys.close()


def test_keys_share_the_coordinator_database_with_store_and_ledger(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.db"
    store, ledger, keys = Store(path), Ledger(path), ApiKeys(path)
    _, account = keys.create("shared")
    ledger.credit_purchase(account, 7)
    assert ledger.balance(account)["spark_paid"] == 7_000_000
    versions = dict(keys._db.execute("SELECT component, version FROM schema_versions").fetchall())
    assert versions["api_keys"] == 1 and "store" in versions and "ledger" in versions
    for db in (keys, ledger, store):
        db.close()


def test_cli_create_list_revoke_and_the_account_works_with_credit_and_balance(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    made = runner.invoke(
        coordinator_app,
        ["api-keys", "create", "--name", "demo", "--daily-limit", "3", "--json"],
        env=env,
    )
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    key, account = created["apiKey"], created["account"]
    assert set(created) == {"apiKey", "account"} and is_checksum_address(account)

    credited = runner.invoke(coordinator_app, ["credit", account, "12"], env=env)
    assert credited.exit_code == 0, credited.output
    shown = runner.invoke(coordinator_app, ["balance", account, "--json"], env=env)
    assert json.loads(shown.stdout)["balance"]["spark_paid"] == 12_000_000
    readable = runner.invoke(coordinator_app, ["balance", account], env=env)
    assert "paid Spark  12.000000" in readable.stdout

    listed = json.loads(
        runner.invoke(coordinator_app, ["api-keys", "list", "--json"], env=env).stdout
    )
    assert [(r["name"], r["account"], r["dailyLimitSpark"], r["revoked"]) for r in listed] == [
        ("demo", account, 3.0, False)
    ]
    assert key not in json.dumps(listed)  # shown once, at create
    text = runner.invoke(coordinator_app, ["api-keys", "list"], env=env).stdout
    assert listed[0]["keyId"] in text and "active" in text and key not in text

    # the readable create prints the key and the account once, with what to do next
    plain = runner.invoke(coordinator_app, ["api-keys", "create", "--name", "second"], env=env)
    assert plain.exit_code == 0 and KEY_PREFIX in plain.stdout and "credit 0x" in plain.stdout

    revoked = runner.invoke(coordinator_app, ["api-keys", "revoke", listed[0]["keyId"]], env=env)
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    again = runner.invoke(coordinator_app, ["api-keys", "revoke", listed[0]["keyId"]], env=env)
    assert again.exit_code == 3 and "already revoked" in again.output
    unknown = runner.invoke(coordinator_app, ["api-keys", "revoke", "key_nope"], env=env)
    assert unknown.exit_code == 3 and "no API key 'key_nope'" in unknown.output
    assert "Traceback" not in unknown.output
    bad = runner.invoke(coordinator_app, ["api-keys", "create", "--name", " "], env=env)
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output

    keys = ApiKeys(tmp_path / "coordinator.db")
    record = keys.lookup(key)
    assert record is not None and record.revoked and record.account == account
    keys.close()
    # the database file is the operator's alone (the store's own setting, kept)
    assert not stat.S_IMODE(os.stat(tmp_path / "coordinator.db").st_mode) & 0o002
