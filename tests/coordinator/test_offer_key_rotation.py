"""`keys rotate` and the rotation chain file: the old keystore kept, each link signed by the
key it replaces, an interrupted rotation finished rather than repeated, a tampered chain
file refused (the coordinator would not start on it), and the CLI's one-line answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from eth_account import Account

from sogni_coordinator.key_rotation import (
    RotationError,
    chain_for,
    chain_path,
    load_chain,
    rotate,
)
from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain
from sogni_protocol.messages import KeyRotation, SignedKeyRotation
from sogni_wallet.keystore import create_keystore, keystore_address, load_wallet

DOMAIN = Domain(31337, "0x" + "00" * 20)
PASSWORD = "rotate-me"
FAST = 2**4  # scrypt cost for test keystores


def _setup(tmp_path: Path) -> tuple[Path, str]:
    keystore = tmp_path / "signer.json"
    first = create_keystore(keystore, PASSWORD, kdf_n=FAST)
    return keystore, first


def test_rotate_twice_keeps_old_keys_and_a_verifying_chain(tmp_path: Path) -> None:
    keystore, first = _setup(tmp_path)
    one = rotate(keystore, PASSWORD, tmp_path, DOMAIN, kdf_n=FAST)
    two = rotate(keystore, PASSWORD, tmp_path, DOMAIN, kdf_n=FAST)
    assert (one.old, one.new, two.old) == (first, two.old, one.new)
    assert keystore_address(keystore) == two.new
    assert load_wallet(keystore, PASSWORD).address == two.new
    for done in (one, two):  # each old keystore is kept, private
        assert load_wallet(done.backup, PASSWORD).address == done.old
        assert done.backup.name == f"signer.json.{done.old}.bak"
        assert done.backup.stat().st_mode & 0o777 == 0o600
    chain = load_chain(chain_path(tmp_path))
    assert [(c.rotation.old_key, c.rotation.new_key) for c in chain] == [
        (first, one.new),
        (one.new, two.new),
    ]
    assert chain_for(DOMAIN, chain_path(tmp_path), two.new, 2e9) == chain
    assert chain_for(DOMAIN, chain_path(tmp_path), one.new, 2e9) == chain[:1]  # restored key
    assert chain_for(DOMAIN, chain_path(tmp_path), first, 2e9) == []
    assert not keystore.with_name("signer.json.new").exists()


def test_an_interrupted_rotation_is_finished_not_repeated(tmp_path: Path) -> None:
    keystore, first = _setup(tmp_path)
    old_bytes = keystore.read_bytes()
    done = rotate(keystore, PASSWORD, tmp_path, DOMAIN, kdf_n=FAST)
    # as if it crashed after writing the link, before renaming the new keystore
    os.replace(keystore, keystore.with_name("signer.json.new"))
    keystore.write_bytes(old_bytes)
    again = rotate(keystore, PASSWORD, tmp_path, DOMAIN, kdf_n=FAST)
    assert again.resumed and (again.old, again.new) == (first, done.new)
    assert keystore_address(keystore) == done.new
    assert len(load_chain(chain_path(tmp_path))) == 1


def test_a_keystore_that_is_not_the_chain_end_is_refused(tmp_path: Path) -> None:
    keystore, _ = _setup(tmp_path)
    rotate(keystore, PASSWORD, tmp_path, DOMAIN, kdf_n=FAST)
    create_keystore(keystore, PASSWORD, kdf_n=FAST, force=True)  # replaced by hand
    with pytest.raises(RotationError, match="put the keystore of"):
        rotate(keystore, PASSWORD, tmp_path, DOMAIN, kdf_n=FAST)


def test_a_tampered_chain_file_stops_the_coordinator(tmp_path: Path) -> None:
    keystore, _ = _setup(tmp_path)
    done = rotate(keystore, PASSWORD, tmp_path, DOMAIN, kdf_n=FAST)
    path = chain_path(tmp_path)
    [link] = load_chain(path)
    thief = Account.create()  # someone rewrites the link to hand over to their own key
    forged = SignedKeyRotation(
        rotation=KeyRotation(old_key=link.rotation.old_key, new_key=thief.address, not_before=1),
        signature=link.signature,
    )
    path.write_bytes(msgspec.json.encode(forged) + b"\n")
    with pytest.raises(RotationError, match="not signed by the key it replaces"):
        chain_for(DOMAIN, path, thief.address, 2e9)
    path.write_text("{not json\n")
    with pytest.raises(RotationError, match="line 1 is not JSON"):
        chain_for(DOMAIN, path, done.new, 2e9)
    signed = eip712.sign_key_rotation(
        bytes(thief.key), DOMAIN, KeyRotation(old_key=thief.address, new_key=done.new, not_before=1)
    )
    path.write_bytes(msgspec.json.encode(signed) + b"\n")  # valid, but from an unrelated key
    assert chain_for(DOMAIN, path, done.new, 2e9) == [signed]  # nodes decide whom they trust


def test_cli_rotates_in_one_line_and_refuses_in_one_line(tmp_path: Path) -> None:
    keystore, first = _setup(tmp_path)
    env = {
        **os.environ,
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_PASSWORD": PASSWORD,
    }

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sogni_coordinator", "keys", "rotate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    done = run()
    assert done.returncode == 0, done.stderr
    new = keystore_address(keystore)
    assert f"offer key {first} -> {new}" in done.stdout
    assert "restart the coordinator" in done.stdout
    create_keystore(keystore, PASSWORD, kdf_n=FAST, force=True)  # replaced by hand
    refused = run()
    assert refused.returncode == 3
    assert "Traceback" not in refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and f"ends at key {new}" in refused.stderr
