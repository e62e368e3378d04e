"""Referral codes: a short code per payer account, and applying one (`Ledger.refer`).

A code is the HMAC of the account under a random secret this coordinator keeps in its own
table, so codes are stable across restarts, cannot be derived from an address by anyone else
(nobody can attach a referral to an account that never handed out its code) and need no
registration. A code is remembered when it is first shown, which is how `use` finds its
account. The rules (no self-referral, one referrer, no cycle) are the ledger's; off a local
network the code's owner must also be a customer (`use(eligible=Billing.is_customer)`: it
bought Spark, deposited SOGNI or staked), as for the Daily Boost: otherwise a script mints a
chain of fresh wallets, each the referrer of the next, for nothing (docs/ECONOMICS.md,
"Referral codes").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from sogni_coordinator.db import Database
from sogni_coordinator.ledger import Ledger, ReferralRefused

__all__ = ["CODE_LENGTH", "ReferralCodes", "ReferralRefused", "close_beside", "codes_beside"]

CODE_LENGTH = 10
"""Base32 characters: 50 bits, so guessing a live code among a million takes ~10^9 tries."""

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS referral_secret (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    secret BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS referral_codes (
    code       TEXT PRIMARY KEY,
    account    TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
"""
MIGRATIONS = (_SCHEMA_V1,)
_ALPHABET = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def _account(address: str) -> str:
    a = address.strip().lower()
    if len(a) != 42 or not a.startswith("0x") or any(c not in "0123456789abcdef" for c in a[2:]):
        raise ReferralRefused(f"not an account address: {address[:60]!r}")
    return a


def normalise_code(code: str) -> str:
    """Upper case, no spaces or dashes; `ReferralRefused` if it cannot be a code."""
    c = code.strip().upper().replace("-", "").replace(" ", "")
    if len(c) != CODE_LENGTH or not set(c) <= _ALPHABET:
        raise ReferralRefused(
            f"not a referral code: {code[:40]!r} (codes are {CODE_LENGTH} letters A-Z and 2-7)"
        )
    return c


class ReferralCodes(Database):
    """Codes of payer accounts, beside the ledger (own component `referral_codes`)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, component="referral_codes", migrations=MIGRATIONS)
        with self._tx() as db:
            row = db.execute("SELECT secret FROM referral_secret WHERE id = 1").fetchone()
            if row is None:
                db.execute("INSERT INTO referral_secret VALUES (1, ?)", (secrets.token_bytes(32),))
        with self._lock:
            got = self._db.execute("SELECT secret FROM referral_secret WHERE id = 1").fetchone()
        self._secret = bytes(got[0])

    def derive(self, account: str) -> str:
        mac = hmac.new(self._secret, _account(account).encode(), hashlib.sha256).digest()
        return base64.b32encode(mac).decode()[:CODE_LENGTH]

    def code_for(self, account: str, now: float | None = None) -> str:
        """The account's code (the same every time), remembered for `use`."""
        acct = _account(account)
        code = self.derive(acct)
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO referral_codes VALUES (?, ?, ?)",
                (code, acct, time.time() if now is None else now),
            )
        return code

    def owner(self, code: str) -> str | None:
        """The account whose code this is, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT account FROM referral_codes WHERE code = ?", (normalise_code(code),)
            ).fetchone()
        return None if row is None else str(row[0])

    def use(
        self,
        ledger: Ledger,
        referred: str,
        code: str,
        now: float | None = None,
        *,
        eligible: Callable[[str], bool] | None = None,
    ) -> str:
        """Record that the code's owner referred `referred`; returns the referrer.
        `ReferralRefused` (one line) for an unknown code, oneself, a second referrer, a cycle,
        and, with `eligible` (off a local network: `Billing.is_customer`), a code whose owner
        fails it: a fresh wallet's code refers nobody."""
        acct = _account(referred)
        referrer = self.owner(code)
        if referrer is None:
            raise ReferralRefused(f"unknown referral code {normalise_code(code)}")
        if referrer == acct:
            raise ReferralRefused("this is your own referral code: an account cannot refer itself")
        if eligible is not None and not eligible(referrer):
            raise ReferralRefused(
                f"the owner of code {normalise_code(code)} has never bought Spark, deposited "
                "SOGNI or staked on this network: only a customer's code refers anyone"
            )
        ledger.refer(acct, referrer, now)
        return referrer

    def referrer_of(self, ledger: Ledger, account: str) -> str | None:
        got = ledger.referrals().get(_account(account))
        return None if got is None else got[0]


_OPEN: dict[str, ReferralCodes] = {}


def codes_beside(ledger: Ledger) -> ReferralCodes:
    """The codes kept in the ledger's database, opened on first use and shared by the gateway
    and the client protocol; `close_beside` when the ledger closes."""
    key = ledger.location
    got = _OPEN.get(key)
    if got is None:
        got = _OPEN[key] = ReferralCodes(key)
    return got


def close_beside(ledger: Ledger) -> None:
    got = _OPEN.pop(ledger.location, None)
    if got is not None:
        got.close()
