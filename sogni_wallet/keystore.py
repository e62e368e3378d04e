"""Encrypted wallet keys: Web3 Secret Storage (keystore v3) files, for nodes and coordinators.

Why keystore v3: it is what every Ethereum wallet imports and exports, so a node operator can
move the reward key to MetaMask or a hardware-wallet workflow, and an encrypted file survives
a leaked disk image. The password comes from an env var (containers) or a terminal prompt.
Files are written 0600 and atomically, and an existing keystore is never silently replaced:
losing it loses whatever the key has earned.

Lives in `sogni_wallet`, below both daemons: nodes, coordinators (offer-signing key) and
the client all import it.
"""

from __future__ import annotations

import getpass
import json
import os
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_utils import to_checksum_address

from sogni_protocol.atomic import FileExists, atomic_write_bytes
from sogni_protocol.logs import get_logger

__all__ = [
    "DEFAULT_KDF_N",
    "KeystoreError",
    "KeystoreExists",
    "KeystoreNotFound",
    "Wallet",
    "WrongPassword",
    "create_keystore",
    "keystore_address",
    "load_wallet",
    "password_from_env_or_prompt",
    "unlock_wallet",
]

DEFAULT_KDF_N = 2**18
"""scrypt cost (N) for new keystores: geth's "standard" setting, ~1 s and 256 MiB to unlock."""

log = get_logger(__name__)


class KeystoreError(Exception):
    """A keystore that cannot be created, read or unlocked; the message says what to do."""


class KeystoreNotFound(KeystoreError):
    pass


class KeystoreExists(KeystoreError):
    pass


class WrongPassword(KeystoreError):
    pass


@dataclass(frozen=True)
class Wallet:
    """An unlocked key. `private_key` is kept out of repr so it cannot leak into logs."""

    address: str
    private_key: bytes = field(repr=False)


def _check_kdf_n(kdf_n: int) -> None:
    if kdf_n < 2 or kdf_n & (kdf_n - 1):
        raise ValueError(f"kdf_n must be a power of two >= 2, got {kdf_n}")


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write `data` to `path` 0600 and atomically; with `replace=False`, fail if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        atomic_write_bytes(path, data, mode=0o600, replace=replace)
    except FileExists:
        raise KeystoreExists(f"keystore {path} already exists") from None


def create_keystore(
    path: Path,
    password: str,
    *,
    kdf_n: int = DEFAULT_KDF_N,
    force: bool = False,
    private_key: bytes | None = None,
    create_hint: str = "sogni-node keys create",
) -> str:
    """Create a new key (or encrypt `private_key`) at `path`; returns its checksummed address.

    An existing keystore is refused unless `force`; even then it is first renamed to
    `<name>.<unix time>.bak`, because the old key may still hold unclaimed rewards.
    """
    _check_kdf_n(kdf_n)
    if not password:
        raise KeystoreError("refusing an empty keystore password: it would not protect the key")
    path = Path(path).expanduser()
    account = Account.from_key(private_key) if private_key is not None else Account.create()
    document = Account.encrypt(account.key, password, kdf="scrypt", iterations=kdf_n)
    data = json.dumps(document, indent=2).encode() + b"\n"
    if path.exists():
        if not force:
            raise KeystoreExists(
                f"keystore {path} already exists (address {keystore_address(path)}); "
                f"refusing to replace it. To replace it anyway (the old one is kept as "
                f".bak): {create_hint} --force"
            )
        backup = path.with_name(f"{path.name}.{int(time.time())}.bak")
        os.replace(path, backup)
        log.warning("keystore_backed_up", path=str(path), backup=str(backup))
    _write_private(path, data, replace=False)
    address = str(account.address)
    log.info("keystore_created", path=str(path), address=address)
    return address


def _read_document(path: Path, create_hint: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeystoreNotFound(f"no keystore at {path}; create one with `{create_hint}`") from None
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KeystoreError(f"{path} is not a keystore (not JSON)") from None
    if not isinstance(document, dict) or document.get("version") != 3 or "crypto" not in document:
        raise KeystoreError(f"{path} is not a Web3 Secret Storage (keystore v3) file")
    return document


def keystore_address(path: Path, *, create_hint: str = "sogni-node keys create") -> str:
    """The checksummed address recorded in a keystore, read without the password."""
    path = Path(path).expanduser()
    document = _read_document(path, create_hint)
    address = document.get("address")
    if not isinstance(address, str):
        raise KeystoreError(f"keystore {path} records no address; unlock it to learn it")
    try:
        return str(to_checksum_address("0x" + address.removeprefix("0x")))
    except ValueError:
        raise KeystoreError(f"keystore {path} records an invalid address") from None


def _check_private(path: Path) -> None:
    """Refuse a keystore others can read or write: its encryption is only as strong as its
    password, and a world-readable file invites an offline guessing attack."""
    if os.name == "nt":
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # reading it will say what is wrong
    if mode & 0o077:
        raise KeystoreError(
            f"keystore {path} is readable or writable by others (mode {mode:o}); "
            f"run `chmod 600 {path}` and try again"
        )


def load_wallet(
    path: Path, password: str, *, create_hint: str = "sogni-node keys create"
) -> Wallet:
    """Decrypt the keystore at `path`. Errors say what is wrong and how to fix it."""
    path = Path(path).expanduser()
    document = _read_document(path, create_hint)
    _check_private(path)
    try:
        key = bytes(Account.decrypt(document, password))
    except ValueError as exc:  # eth-keyfile: "MAC mismatch" (a ValueError subclass)
        if "mac mismatch" in str(exc).lower():
            raise WrongPassword(f"wrong password for keystore {path}") from None
        raise KeystoreError(f"cannot decrypt keystore {path}: {exc}") from None
    except (KeyError, TypeError, NotImplementedError) as exc:
        raise KeystoreError(f"keystore {path} is malformed: {_malformed(exc)}") from None
    address = str(Account.from_key(key).address)
    recorded = document.get("address")
    if isinstance(recorded, str) and recorded.lower().removeprefix("0x") != address[2:].lower():
        raise KeystoreError(f"keystore {path} decrypts to {address}, not its recorded address")
    return Wallet(address=address, private_key=key)


def password_from_env_or_prompt(
    env_name: str,
    *,
    confirm: bool = False,
    env: Mapping[str, str] | None = None,
    prompt: str = "Keystore password: ",
) -> str:
    """The password from `$env_name`, else typed at a terminal (twice with `confirm`).

    Refuses (rather than hangs) when there is no terminal: a daemon under systemd or in a
    container must be given the env var.
    """
    source = os.environ if env is None else env
    if env_name in source:
        return source[env_name]
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise KeystoreError(f"no keystore password: set ${env_name} (no terminal to prompt on)")
    password = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat password: ") != password:
        raise KeystoreError("the two passwords differ")
    return password


def unlock_wallet(
    path: Path,
    password_env: str,
    *,
    env: Mapping[str, str] | None = None,
    create_hint: str = "sogni-node keys create",
) -> Wallet:
    """What `start` does: fail fast if the keystore is missing, then ask for the password."""
    path = Path(path).expanduser()
    if not path.exists():
        raise KeystoreNotFound(f"no keystore at {path}; create one with `{create_hint}`")
    wallet = load_wallet(
        path, password_from_env_or_prompt(password_env, env=env), create_hint=create_hint
    )
    if env is None:  # read once: child processes (a shell-out, a crash reporter) never see it
        os.environ.pop(password_env, None)
    return wallet


def _malformed(exc: Exception) -> str:
    """What is wrong with a keystore's document, in words (never a Python repr)."""
    if isinstance(exc, KeyError):
        return f"its {exc.args[0]!s} field is missing (restore the file from a backup)"
    if isinstance(exc, NotImplementedError):
        return "it uses a cipher or key derivation this wallet does not support"
    return "a field of its crypto section has the wrong type (restore the file from a backup)"
