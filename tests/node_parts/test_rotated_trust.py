"""The node's persisted trust in rotated coordinator keys (`sogni_node.trust`): private file,
each key tied to the configured key it derives from, and dropped with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account

from sogni_node.trust import TRUST_FILE, TrustedKeys, TrustFileError


def _addr() -> str:
    return str(Account.create().address)


def test_rotated_keys_persist_privately_and_follow_their_root(tmp_path: Path) -> None:
    root, a, b = _addr(), _addr(), _addr()
    configured = {root.lower()}
    store = TrustedKeys.in_dir(tmp_path)
    added = store.add([(root, a), (a, b)], configured)
    assert [(e.handed_over_by, e.key, e.root) for e in added] == [(root, a, root), (a, b, root)]
    assert (tmp_path / TRUST_FILE).stat().st_mode & 0o777 == 0o600
    again = TrustedKeys.in_dir(tmp_path)  # a node restart
    assert again.load(configured) == {a.lower(): root.lower(), b.lower(): root.lower()}
    assert again.add([(root, a)], configured) == []  # known already: nothing rewritten
    # the operator stops trusting the root: everything trusted through it goes too
    assert again.load({_addr().lower()}) == {}


def test_a_link_from_an_untrusted_key_adds_nothing(tmp_path: Path) -> None:
    store = TrustedKeys.in_dir(tmp_path)
    assert store.add([(_addr(), _addr())], {_addr().lower()}) == []
    assert not (tmp_path / TRUST_FILE).exists()


def test_a_damaged_trust_file_is_an_error_not_a_trust(tmp_path: Path) -> None:
    (tmp_path / TRUST_FILE).write_text('{"keys": [{"key": "nope"}]}')
    with pytest.raises(TrustFileError):
        TrustedKeys.in_dir(tmp_path).load({_addr().lower()})
