"""One exception for every revert, whichever chain raised it.

eth-tester raises ``TransactionFailed`` whose message embeds the raw revert bytes as a Python
``repr``; anvil (through web3) raises ``ContractLogicError`` with the revert data as hex. Callers
should not care: both become :class:`ChainRevert`, with custom errors decoded against the ABIs
of all our artifacts (including OpenZeppelin's errors), ``Error(string)`` and ``Panic(uint256)``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from eth_abi import decode as abi_decode
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

__all__ = ["ChainRevert", "ErrorDecoder"]

_PANIC_CODES = {
    0x01: "assertion failed",
    0x11: "arithmetic overflow or underflow",
    0x12: "division or modulo by zero",
    0x21: "invalid enum value",
    0x22: "invalid storage byte array",
    0x31: "pop on empty array",
    0x32: "array index out of bounds",
    0x41: "out of memory",
    0x51: "call to a zero-initialized internal function",
}
_ERROR_STRING = keccak(b"Error(string)")[:4]
_PANIC = keccak(b"Panic(uint256)")[:4]
_PREFIX = re.compile(r"^(?:execution reverted:?\s*)", re.IGNORECASE)


class ChainRevert(Exception):
    """A call or transaction reverted.

    ``reason`` is human-readable (``"NothingToClaim(account=0x…, …)"``, a ``require`` string,
    or ``"Panic(0x11: arithmetic overflow or underflow)"``); ``error`` is the custom error's
    name (or ``"Error"``/``"Panic"``), ``args`` its decoded arguments, ``data`` the raw bytes.
    """

    def __init__(
        self,
        reason: str,
        *,
        error: str | None = None,
        args: Mapping[str, Any] | None = None,
        data: bytes | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.args_by_name: dict[str, Any] = dict(args or {})
        self.data = data

    def __repr__(self) -> str:
        return f"ChainRevert({self.reason!r})"


def _canonical_type(param: Mapping[str, Any]) -> str:
    kind = str(param["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_canonical_type(c) for c in param.get("components", []))
        return f"({inner}){kind[len('tuple') :]}"
    return kind


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


class ErrorDecoder:
    """Maps 4-byte selectors to the custom errors declared in a set of ABIs."""

    def __init__(self, abis: Iterable[Sequence[Mapping[str, Any]]] = ()) -> None:
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for abi in abis:
            self.add_abi(abi)

    def add_abi(self, abi: Sequence[Mapping[str, Any]]) -> None:
        for item in abi:
            if item.get("type") != "error":
                continue
            types = [_canonical_type(p) for p in item.get("inputs", [])]
            names = [str(p.get("name") or f"arg{i}") for i, p in enumerate(item.get("inputs", []))]
            selector = keccak(f"{item['name']}({','.join(types)})".encode())[:4]
            self._errors[selector] = (str(item["name"]), types, names)

    def decode(self, data: bytes) -> ChainRevert:
        """Turn raw revert data into a :class:`ChainRevert`."""
        if not data:
            return ChainRevert("reverted without a reason", data=data)
        selector, body = data[:4], data[4:]
        try:
            if selector == _ERROR_STRING:
                (message,) = abi_decode(["string"], body)
                return ChainRevert(
                    str(message), error="Error", args={"message": message}, data=data
                )
            if selector == _PANIC:
                (code,) = abi_decode(["uint256"], body)
                text = _PANIC_CODES.get(code, "unknown panic")
                return ChainRevert(
                    f"Panic(0x{code:02x}: {text})", error="Panic", args={"code": code}, data=data
                )
            if selector in self._errors:
                name, types, names = self._errors[selector]
                values = [
                    to_checksum_address(v) if t == "address" else v
                    for t, v in zip(types, abi_decode(types, body), strict=True)
                ]
                shown = ", ".join(f"{n}={_fmt(v)}" for n, v in zip(names, values, strict=True))
                return ChainRevert(
                    f"{name}({shown})",
                    error=name,
                    args=dict(zip(names, values, strict=True)),
                    data=data,
                )
        except Exception:  # malformed payload: fall through to the raw form
            pass
        return ChainRevert(f"unknown error 0x{data.hex()}", data=data)

    def from_exception(self, exc: BaseException) -> ChainRevert:
        """Convert eth-tester's ``TransactionFailed`` or web3's ``ContractLogicError``."""
        data = _revert_data(exc)
        if data is not None:
            return self.decode(data)
        message = str(exc.args[0]) if exc.args else str(exc)
        reason = _PREFIX.sub("", message).strip() or "reverted without a reason"
        return ChainRevert(reason, data=None)


def _revert_data(exc: BaseException) -> bytes | None:
    """Raw revert bytes from either chain's exception, when they can be recovered."""
    data = getattr(exc, "data", None)
    if isinstance(data, Mapping):  # some nodes nest it: {"data": "0x…"}
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    if isinstance(data, bytes):
        return data
    # eth-tester: "execution reverted: b'\\x…'" (the bytes' repr) or a decoded string
    first = exc.args[0] if exc.args else ""
    if isinstance(first, BaseException) and first.args:
        first = first.args[0]
    if isinstance(first, bytes):
        return first
    text = _PREFIX.sub("", str(first)).strip()
    if text.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
        return value if isinstance(value, bytes) else None
    return None
