"""Every custom error of our contracts has a one-line friendly message."""

from __future__ import annotations

from typing import Any

from eth_abi import encode as abi_encode
from eth_hash.auto import keccak

from sogni_chain import CONTRACT_NAMES, load_artifact
from sogni_chain.errors import FRIENDLY, ErrorDecoder

_SAMPLE: dict[str, Any] = {
    "address": "0x" + "ab" * 20,
    "bytes32": b"\x01" * 32,
    "uint256": 1_500_000_000_000_000_000,
    "uint64": 1_800_000_000,
    "uint48": 1_800_000_000,
    "uint16": 10_001,
    "uint8": 1,
}
# our own errors (OpenZeppelin's ERC-20/721 and ECDSA ones keep their decoded form)
OURS = {
    "ZeroRoot",
    "RootAlreadyPosted",
    "EpochNotNext",
    "TotalDecreased",
    "GrowthCapExceeded",
    "Underfunded",
    "ClaimDelayTooLong",
    "NoRoot",
    "NotMatured",
    "InvalidProof",
    "NothingToClaim",
    "NotDistributor",
    "ClaimedOverflow",
    "InvalidSuccessor",
    "ClaimExceedsRootTotal",
    "StakeBpsTooHigh",
    "AuthorizationExpired",
    "InvalidStakeAuthorization",
    "ZeroAddress",
    "ZeroAmount",
    "InsufficientActiveStake",
    "NothingToWithdraw",
    "CooldownActive",
    "NothingToSlash",
    "NotSlasher",
    "EmptyBatch",
    "LicenseBlacklisted",
    "TransferCooldown",
    "AccessControlUnauthorizedAccount",
    "AccessControlEnforcedDefaultAdminRules",
    "AccessControlEnforcedDefaultAdminDelay",
    "AccessControlInvalidDefaultAdmin",
    "EnforcedPause",
}


def test_every_error_of_ours_has_a_one_line_message() -> None:
    errors: dict[str, list[dict[str, Any]]] = {}
    for name in CONTRACT_NAMES:
        for item in load_artifact(name).abi:
            if item.get("type") == "error":
                errors[item["name"]] = item["inputs"]
    assert set(errors) >= OURS, OURS - set(errors)
    decoder = ErrorDecoder(load_artifact(n).abi for n in CONTRACT_NAMES)
    for name in sorted(OURS):
        assert name in FRIENDLY, name
        types = [i["type"] for i in errors[name]]
        data = keccak(f"{name}({','.join(types)})".encode())[:4] + abi_encode(
            types, [_SAMPLE[t] for t in types]
        )
        err = decoder.decode(data)
        assert err.error == name
        assert err.hint and "\n" not in err.hint, name
        assert str(err) == f"{err.hint} [{err.reason}]"
    nothing = decoder.decode(
        keccak(b"NothingToClaim(address,uint256,uint256)")[:4]
        + abi_encode(["address", "uint256", "uint256"], ["0x" + "ab" * 20, 5 * 10**18, 5 * 10**18])
    )
    assert nothing.hint is not None and "already claimed 5 SOGNI of its 5 SOGNI" in nothing.hint
