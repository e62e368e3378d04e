"""eip712's fast keccak and remembered EIP-55 checksums give the reference libraries' bytes."""

from __future__ import annotations

import os

from eth_hash.auto import keccak as reference_keccak
from eth_utils import to_checksum_address

from sogni_protocol import eip712


def test_keccak_and_checksums_match_eth_hash_and_eth_utils() -> None:
    for size in (0, 1, 31, 32, 33, 135, 136, 137, 1000):
        data = os.urandom(size)
        assert eip712.keccak(data) == reference_keccak(data)
    for _ in range(300):
        raw = os.urandom(20)
        assert eip712._checksum_of(raw) == to_checksum_address(raw)
        assert eip712._checksum_of(raw) == to_checksum_address(raw)  # from memory
