"""Keys never leak: not through a repr, a traceback's locals, a lax keystore file, the
environment of child processes, or public dev keys on a real chain."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sogni_coordinator.service import Signer
from sogni_wallet.keystore import KeystoreError, create_keystore, load_wallet, unlock_wallet

KEY = bytes(range(1, 33))


def test_no_key_in_a_repr() -> None:
    assert KEY.hex() not in repr(Signer("0xabc", KEY)) and str(KEY) not in repr(Signer("0x", KEY))


@pytest.mark.parametrize("module", ["sogni_coordinator.cli", "sogni_app.cli", "sogni_node.cli"])
def test_no_key_in_the_traceback_of_an_unexpected_error(module: str) -> None:
    """A bug (not an expected failure) still shows a traceback, but never a local's value."""
    script = textwrap.dedent(
        f"""
        from {module} import app

        @app.command("boom")
        def boom() -> None:
            private_key = bytes.fromhex("{KEY.hex()}")
            raise RuntimeError("a bug, with a key in a local: " + str(len(private_key)))

        app(["boom"], prog_name="x")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOGNI_")}
    env.update(COLUMNS="200", TERM="xterm-256color", FORCE_COLOR="1")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode != 0 and "RuntimeError" in done.stderr  # it did fail, loudly
    assert KEY.hex() not in done.stderr + done.stdout
    assert "\\x01\\x02\\x03" not in done.stderr + done.stdout


def test_a_keystore_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    create_keystore(path, "pw", kdf_n=2)
    assert load_wallet(path, "pw").address  # 0600 as written: fine
    path.chmod(0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        load_wallet(path, "pw")
    path.chmod(0o400)  # read-only for the owner is fine too
    assert load_wallet(path, "pw").address


def test_the_env_password_is_gone_once_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wallet.json"
    create_keystore(path, "pw", kdf_n=2)
    monkeypatch.setenv("SOGNI_TEST_PASSWORD", "pw")
    wallet = unlock_wallet(path, "SOGNI_TEST_PASSWORD")
    assert wallet.address and "SOGNI_TEST_PASSWORD" not in os.environ
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('SOGNI_TEST_PASSWORD'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.stdout.strip() == "None"
