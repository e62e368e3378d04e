"""Keystore v3 wallets: roundtrip, wrong password, 0600 atomic files, no silent overwrite.

Keystores here use scrypt N=2 (`kdf_n`), since the production N=2**18 takes ~1 s each.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from eth_account import Account

from sogni_wallet.keystore import (
    KeystoreError,
    KeystoreExists,
    KeystoreNotFound,
    WrongPassword,
    create_keystore,
    keystore_address,
    load_wallet,
    password_from_env_or_prompt,
    unlock_wallet,
)

N = 2


def test_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "wallet.json"
    address = create_keystore(path, "pw", kdf_n=N)
    wallet = load_wallet(path, "pw")
    assert wallet.address == address
    assert Account.from_key(wallet.private_key).address == address
    assert keystore_address(path) == address
    doc = json.loads(path.read_text())
    assert doc["version"] == 3 and doc["crypto"]["kdf"] == "scrypt"
    assert doc["crypto"]["kdfparams"]["n"] == N


def test_private_key_not_in_repr(tmp_path: Path) -> None:
    key = bytes(range(1, 33))
    create_keystore(tmp_path / "w.json", "pw", kdf_n=N, private_key=key)
    wallet = load_wallet(tmp_path / "w.json", "pw")
    assert wallet.private_key == key
    assert key.hex() not in repr(wallet) and "private_key" not in repr(wallet)


def test_file_mode_0600_and_no_temp_left(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    create_keystore(path, "pw", kdf_n=N)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["wallet.json"]


def test_wrong_password(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    create_keystore(path, "right", kdf_n=N)
    with pytest.raises(WrongPassword, match=f"^wrong password for keystore {path}$"):
        load_wallet(path, "wrong")


def test_missing_file_says_how_to_create(tmp_path: Path) -> None:
    with pytest.raises(KeystoreNotFound, match="sogni-node keys create"):
        load_wallet(tmp_path / "nope.json", "pw")
    with pytest.raises(KeystoreNotFound, match="sogni-coordinator keys create"):
        keystore_address(tmp_path / "nope.json", create_hint="sogni-coordinator keys create")


def test_not_a_keystore(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    path.write_text("{}")
    with pytest.raises(KeystoreError, match="not a Web3 Secret Storage"):
        load_wallet(path, "pw")
    path.write_text("garbage")
    with pytest.raises(KeystoreError, match="not JSON"):
        load_wallet(path, "pw")


def test_refuses_overwrite_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    first = create_keystore(path, "pw", kdf_n=N)
    with pytest.raises(KeystoreExists, match=first):
        create_keystore(path, "pw", kdf_n=N)
    assert load_wallet(path, "pw").address == first
    second = create_keystore(path, "pw2", kdf_n=N, force=True)
    assert second != first
    assert load_wallet(path, "pw2").address == second
    backups = list(tmp_path.glob("wallet.json.*.bak"))
    assert len(backups) == 1  # the replaced key is kept, not destroyed
    assert load_wallet(backups[0], "pw").address == first


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="power of two"):
        create_keystore(tmp_path / "w.json", "pw", kdf_n=3)
    with pytest.raises(KeystoreError, match="empty"):
        create_keystore(tmp_path / "w.json", "", kdf_n=N)


def test_password_from_env_or_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    assert password_from_env_or_prompt("PW", env={"PW": "secret"}) == "secret"
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(KeystoreError, match=r"set \$PW"):
        password_from_env_or_prompt("PW", env={})


def test_password_prompt_on_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    answers = iter(["a", "b"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    with pytest.raises(KeystoreError, match="differ"):
        password_from_env_or_prompt("PW", env={}, confirm=True)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "typed")
    assert password_from_env_or_prompt("PW", env={}, confirm=True) == "typed"


def test_unlock_wallet(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    with pytest.raises(KeystoreNotFound):
        unlock_wallet(path, "PW", env={"PW": "pw"})
    address = create_keystore(path, "pw", kdf_n=N)
    assert unlock_wallet(path, "PW", env={"PW": "pw"}).address == address


def test_a_malformed_keystore_is_named_in_words(tmp_path: Path) -> None:
    """The message was a Python repr (`KeyError('kdf')`, a TypeError about comparing str
    and int): it says what is wrong with the file now."""
    import json

    from sogni_wallet.keystore import KeystoreError, create_keystore, load_wallet

    path = tmp_path / "k.json"
    create_keystore(path, "pw", kdf_n=2)
    document = json.loads(path.read_text())
    del document["crypto"]["kdf"]
    path.write_text(json.dumps(document))
    with pytest.raises(KeystoreError) as info:
        load_wallet(path, "pw")
    assert "kdf field is missing" in str(info.value) and "KeyError" not in str(info.value)
