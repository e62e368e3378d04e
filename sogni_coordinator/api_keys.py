"""API keys of the SDK gateway: each key is a payer account of the ledger.

Why keys are accounts: an app written for Sogni's official SDKs authenticates with an API key,
not a wallet, yet its renders must be paid like any other. Each key's ledger account is the
address of a secp256k1 key derived from the API key (`account_private_key`): billing charges
only with the payer's EIP-712 authorization, and the gateway, holding the key while the app
is connected, signs it in-process; the coordinator keeps only a hash, so it cannot sign for
the account otherwise. The operator funds the account with `sogni-coordinator credit ACCOUNT N`
and reads it with `balance ACCOUNT`, as for any payer.

At rest only the sha256 of a key is kept: the key has 256 bits of entropy, so its hash cannot
be reversed, and a stolen database file does not hand out working keys. A key is looked up by
its hash and the stored hash is compared in constant time. The plaintext is returned once, by
`create`. An optional daily limit caps what a key spends per UTC day (`spent_today`,
`record_spend`), on top of its balance. The tables live in the coordinator's database as
their own component (`api_keys`, see `db.Database`); the projects each key started
(`key_projects.KeyProjects`, component `api_key_projects`) are opened and closed with it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import coincurve
from eth_utils import keccak, to_checksum_address

from sogni_coordinator.db import Database
from sogni_coordinator.key_projects import KeyProjects
from sogni_protocol.pricing import MICRO

GATEWAY_PEER = "api-key:"
"""How the gateway names the client of a request it submits for a key (`api-key:<key id>`):
billing then leaves the key's checks to the gateway, which made them (`account_refusal`)."""
KEY_PREFIX = "sk-sogni-"
"""Marks a string as one of these keys (in logs of a leak scanner, a config file)."""
MAX_KEY_LENGTH = 200
"""Longer candidates are refused before hashing: the header is attacker-controlled."""
MAX_NAME_LENGTH = 100

_ACCOUNT_DOMAIN = b"sogni-api-key-account/v1:"
_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id            TEXT PRIMARY KEY,
    key_hash          BLOB NOT NULL UNIQUE,
    name              TEXT NOT NULL,
    account           TEXT NOT NULL UNIQUE,
    revoked           INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
    daily_limit_micro INTEGER CHECK (daily_limit_micro IS NULL OR daily_limit_micro >= 0),
    created_at        REAL NOT NULL,
    revoked_at        REAL
);
CREATE TABLE IF NOT EXISTS api_key_spend (
    account     TEXT NOT NULL,
    day         TEXT NOT NULL,
    micro       INTEGER NOT NULL CHECK (micro >= 0),
    PRIMARY KEY (account, day)
);
"""

MIGRATIONS = (_SCHEMA_V1,)
"""The api_keys component's schema versions in order (`Database` applies the missing ones)."""


class ApiKeyError(ValueError):
    """A request `ApiKeys` refuses (bad name, bad limit); the message says what to fix."""


@dataclass(frozen=True)
class ApiKeyRecord:
    """What is known about a key, never the key itself."""

    key_id: str
    name: str
    account: str
    """Checksummed 0x address: the key's ledger account."""
    revoked: bool
    daily_limit_micro: int | None
    """Micro-Spark the key may spend per UTC day; None: no limit beyond its balance."""
    created_at: float

    def allows(self, spent_today: int, micro: int) -> bool:
        """Whether spending `micro` more today stays within the daily limit."""
        return self.daily_limit_micro is None or spent_today + micro <= self.daily_limit_micro


def account_private_key(api_key: str) -> bytes:
    """The payer key of `api_key`'s account: a valid secp256k1 key, deterministic in the API
    key (256 random bits), domain-separated from the hash stored at rest."""
    seed = hashlib.sha256(_ACCOUNT_DOMAIN + api_key.encode("utf-8")).digest()
    while not 0 < int.from_bytes(seed, "big") < _SECP256K1_ORDER:  # ~2^-128: for completeness
        seed = hashlib.sha256(seed).digest()
    return seed


def account_address(api_key: str) -> str:
    """The checksummed address of `api_key`'s ledger account."""
    public = coincurve.PrivateKey(account_private_key(api_key)).public_key.format(compressed=False)
    return to_checksum_address(keccak(public[1:])[-20:])


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _day(now: float | None) -> str:
    moment = dt.datetime.fromtimestamp(time.time() if now is None else now, tz=dt.UTC)
    return moment.strftime("%Y-%m-%d")


def _record(row: tuple[object, ...]) -> ApiKeyRecord:
    key_id, name, account, revoked, limit, created = row
    return ApiKeyRecord(
        key_id=str(key_id),
        name=str(name),
        account=to_checksum_address(str(account)),
        revoked=bool(revoked),
        daily_limit_micro=None if limit is None else int(str(limit)),
        created_at=float(str(created)),
    )


_COLUMNS = "key_id, name, account, revoked, daily_limit_micro, created_at"


class ApiKeys(Database):
    """The key table of one coordinator database (safe to share between threads)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, component="api_keys", migrations=MIGRATIONS)
        try:
            self.projects = KeyProjects(path)
            """The projects the keys started (`key_projects.py`): closed with the keys."""
        except BaseException:
            super().close()
            raise

    def close(self) -> None:
        self.projects.close()
        super().close()

    def create(self, name: str, daily_limit_spark: float | None = None) -> tuple[str, str]:
        """A new key and its fresh account: `(plaintext key, account)`. The plaintext is not
        stored; whoever calls this must hand it over now."""
        name = name.strip()
        if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise ApiKeyError(f"a key name is 1-{MAX_NAME_LENGTH} printable characters")
        limit: int | None = None
        if daily_limit_spark is not None:
            if not daily_limit_spark >= 0 or daily_limit_spark > 1e12:  # also refuses NaN
                raise ApiKeyError("the daily limit is a Spark amount from 0 to 1e12")
            limit = round(daily_limit_spark * MICRO)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        account = account_address(key)
        with self._tx() as db:
            db.execute(
                "INSERT INTO api_keys (key_id, key_hash, name, account, daily_limit_micro, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, _hash(key), name, account.lower(), limit, time.time()),
            )
        return key, account

    def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record of `key` (revoked ones too: the caller refuses them), or None."""
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            return None
        try:
            digest = _hash(key)
        except UnicodeEncodeError:  # lone surrogates: not a key of ours
            return None
        with self._lock:
            row = self._db.execute(
                f"SELECT key_hash, {_COLUMNS} FROM api_keys WHERE key_hash = ?", (digest,)
            ).fetchone()
        if row is None or not hmac.compare_digest(bytes(row[0]), digest):
            return None
        return _record(row[1:])

    def get(self, key_id: str) -> ApiKeyRecord | None:
        """The record with this public id."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def revoke(self, key_id: str) -> bool:
        """Refuse the key from now on; False when there is no such key or it was revoked.
        Its account and balance stay (the operator may still read or move them)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked = 1, revoked_at = ? WHERE key_id = ? AND revoked = 0",
                (time.time(), key_id),
            )
        return cur.rowcount == 1

    def account_refusal(self, account: str, micro: int) -> str | None:
        """Why an API key's account may not have `micro` more reserved now, for a request
        signed with the key's derived account key outside the gateway (the native client
        protocol): the key was revoked, or today's spend would pass its daily limit; None
        when allowed (the spend is then recorded, in the caller's transaction when one is
        open, as the reservation's) or when `account` is no key's. Without this a revoked or
        limited key's holder, who can derive the account key (`account_private_key`), spent
        the account freely over the native protocol."""
        with self._lock:
            row = self._db.execute(
                "SELECT revoked, daily_limit_micro FROM api_keys WHERE account = ?",
                (account.lower(),),
            ).fetchone()
        if row is None:
            return None
        if row[0]:
            return "this account's API key was revoked: the account can no longer pay"
        limit = None if row[1] is None else int(row[1])
        if not self.try_spend(account, micro, limit):
            return "this account's API key has reached its daily spend limit"
        return None

    def list(self) -> list[ApiKeyRecord]:
        """Every key, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
            ).fetchall()
        return [_record(row) for row in rows]

    def spent_today(self, account: str, now: float | None = None) -> int:
        """Micro-Spark recorded for `account` this UTC day."""
        with self._lock:
            row = self._db.execute(
                "SELECT micro FROM api_key_spend WHERE account = ? AND day = ?",
                (account.lower(), _day(now)),
            ).fetchone()
        return 0 if row is None else int(row[0])

    def record_spend(self, account: str, micro: int, now: float | None = None) -> None:
        """Add `micro` to today's spend of `account`. A negative amount (a refund of what was
        recorded at reservation) lowers it, never below zero."""
        if isinstance(micro, bool) or not isinstance(micro, int):
            raise TypeError("micro is an int")
        day = _day(now)
        with self._tx() as db:
            db.execute(
                "INSERT INTO api_key_spend (account, day, micro) VALUES (?, ?, MAX(0, ?)) "
                "ON CONFLICT (account, day) DO UPDATE SET micro = MAX(0, api_key_spend.micro + ?)",
                (account.lower(), day, micro, micro),
            )
            # a week of history is plenty for an operator's question; older days go
            week_ago = _day((time.time() if now is None else now) - 7 * 86400)
            db.execute("DELETE FROM api_key_spend WHERE day < ?", (week_ago,))

    def try_spend(
        self, account: str, micro: int, limit_micro: int | None, now: float | None = None
    ) -> bool:
        """Record `micro` for today only if that keeps `account` within `limit_micro` (None:
        no limit): the check and the write are one transaction, so two projects submitted at
        once cannot both pass a limit that has room for one. False: nothing recorded."""
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
            raise ValueError("micro is a non-negative int")
        day = _day(now)
        with self._tx() as db:
            row = db.execute(
                "SELECT micro FROM api_key_spend WHERE account = ? AND day = ?",
                (account.lower(), day),
            ).fetchone()
            spent = 0 if row is None else int(row[0])
            if limit_micro is not None and spent + micro > limit_micro:
                return False
            db.execute(
                "INSERT INTO api_key_spend (account, day, micro) VALUES (?, ?, ?) "
                "ON CONFLICT (account, day) DO UPDATE"
                " SET micro = api_key_spend.micro + excluded.micro",
                (account.lower(), day, micro),
            )
        return True
