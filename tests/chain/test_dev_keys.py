"""Public dev keys (anvil's mnemonic) sign only on a local dev chain: on any other chain id
`connect` refuses them, so `chain deploy --chain-url` cannot burn a real chain's funds from a
key the whole world knows."""

from __future__ import annotations

import pytest

from sogni_chain import anvil_dev_keys, connect
from sogni_chain.anvil import Anvil

from .chain_env import anvil_missing_reason


def test_dev_keys_only_on_a_dev_chain() -> None:
    reason = anvil_missing_reason()
    if reason:
        pytest.skip(reason)
    with Anvil(chain_id=8453) as node:  # a real network's id, served locally
        with pytest.raises(ValueError, match="not a local dev chain"):
            connect(node.url)
        own = connect(node.url, keys=[anvil_dev_keys(1)[0]])  # named keys: the caller's choice
        assert own.chain_id == 8453
    with Anvil() as dev:
        assert connect(dev.url).chain_id == 31337
