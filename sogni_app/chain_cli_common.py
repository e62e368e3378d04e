"""What `sogni gov` and `sogni dispute` share: on-chain times and SOGNI amounts as people
read them, and the keystore unlock that turns ``--keystore`` into a chain signer.

Kept free of web3 imports at module level so `sogni --help` stays light
(tests/cli/test_bare_install.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sogni_chain import Chain, Signer

__all__ = ["SOGNI_WEI", "format_sogni", "format_when", "keystore_signer"]

SOGNI_WEI = 10**18


def format_when(ts: int) -> str:
    """A block timestamp in UTC, to the second."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_sogni(wei: int) -> str:
    """Whole SOGNI without decimals when exact, else four decimals."""
    whole, frac = divmod(wei, SOGNI_WEI)
    return f"{whole:,}" if frac == 0 else f"{wei / SOGNI_WEI:,.4f}"


def keystore_signer(chain: Chain, keystore: Path | None, password_env: str) -> Signer | None:
    """The account of ``--keystore`` added to ``chain``; None when no keystore is given
    (read-only commands)."""
    if keystore is None:
        return None
    from sogni_wallet.keystore import unlock_wallet

    wallet = unlock_wallet(keystore.expanduser(), password_env, create_hint="sogni keys create")
    return chain.add_key(wallet.private_key)
