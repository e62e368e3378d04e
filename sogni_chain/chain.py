"""A web3 connection that behaves the same on the embedded EVM and on anvil.

Why a wrapper at all: the two chains differ in how they fail (``TransactionFailed`` with a
bytes repr vs ``ContractLogicError`` with hex), how time moves (``time_travel`` vs
``evm_increaseTime``) and how snapshots work. :class:`Chain` hides those differences so the
coordinator, nodes and tests write one code path. Every transaction is signed locally with an
eth-account key (the dev accounts of both chains have known keys), so the same path also works
on a real RPC endpoint where nothing is unlocked.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from eth_account import Account
from eth_account.hdaccount import key_from_seed, seed_from_mnemonic
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from eth_tester.exceptions import TransactionFailed
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import Web3
from web3._utils.events import get_event_data
from web3.contract import Contract
from web3.exceptions import ContractLogicError
from web3.types import RPCEndpoint

from sogni_protocol.settings import DEV_CHAIN_IDS

from .artifacts import CONTRACT_NAMES, load_artifact
from .errors import ChainRevert, ErrorDecoder

__all__ = [
    "ANVIL_MNEMONIC",
    "Chain",
    "Event",
    "Signer",
    "Tx",
    "anvil_dev_keys",
    "connect",
]

#: anvil's (and hardhat's) default dev mnemonic; its accounts start with 10,000 ETH each.
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
EMBEDDED_ACCOUNTS = 10

#: A transaction sender: a local key, or an address whose key the Chain knows (or the node
#: has unlocked).
Signer = LocalAccount | str

_REVERTS: tuple[type[BaseException], ...] = (ContractLogicError, TransactionFailed)
GAS_HEADROOM = 64_000
"""Added to every estimate: Staking's vote checkpoints are keyed by timestamp, so a call
estimated in the same second as the last block updates a checkpoint in place but, mined a
second later, pushes new ones (about 20k gas each, up to three per call). Unused gas is not paid."""


def anvil_dev_keys(count: int = 10, mnemonic: str = ANVIL_MNEMONIC) -> list[str]:
    """Private keys of anvil's default accounts (BIP-44 ``m/44'/60'/0'/0/i``)."""
    seed = seed_from_mnemonic(mnemonic, "")
    return ["0x" + key_from_seed(seed, f"m/44'/60'/0'/0/{i}").hex() for i in range(count)]


@dataclass(frozen=True)
class Event:
    """A decoded log: contract event ``name`` emitted by ``address``."""

    name: str
    address: ChecksumAddress
    args: dict[str, Any]


@dataclass(frozen=True)
class Tx:
    """A mined, successful transaction."""

    hash: str
    gas_used: int
    block_number: int
    events: list[Event] = field(default_factory=list)
    contract_address: ChecksumAddress | None = None

    def event(self, name: str) -> dict[str, Any]:
        """Arguments of the first ``name`` event; ``KeyError`` if none was emitted."""
        for ev in self.events:
            if ev.name == name:
                return ev.args
        raise KeyError(f"no {name} event in {self.hash}")


class Chain:
    """One connected chain: web3, funded dev accounts, revert decoding, time and snapshots.

    Not thread-safe (nonces are read from the node before each send).
    """

    def __init__(
        self,
        w3: Web3,
        *,
        kind: Literal["embedded", "rpc"],
        keys: Iterable[str | bytes],
        url: str | None = None,
        tester: Any = None,
        gas_margin: float = 1.2,
    ) -> None:
        self.w3 = w3
        self.kind = kind
        self.url = url
        self._tester = tester
        self.gas_margin = gas_margin
        self.chain_id: int = w3.eth.chain_id
        self.accounts: list[LocalAccount] = []
        self._keys: dict[str, LocalAccount] = {}
        for key in keys:
            self.add_key(key)
        self._abis: dict[str, list[dict[str, Any]]] = {}
        self._nonce_lock = threading.Lock()
        """Nonce, sign and submit as one step: the epoch timer and the claim relayer may send
        from the same key on different threads."""
        self.errors = ErrorDecoder(load_artifact(n).abi for n in CONTRACT_NAMES)

    def __repr__(self) -> str:
        return f"Chain({self.kind}, chain_id={self.chain_id}, url={self.url!r})"

    # -- accounts --------------------------------------------------------------------------

    def add_key(self, key: str | bytes) -> LocalAccount:
        """Register a private key so transactions from its address are signed locally."""
        acct: LocalAccount = Account.from_key(key)
        if acct.address not in self._keys:
            self._keys[acct.address] = acct
            self.accounts.append(acct)
        return acct

    def address_of(self, who: Signer) -> ChecksumAddress:
        return who.address if isinstance(who, LocalAccount) else Web3.to_checksum_address(who)

    def _local(self, who: Signer) -> LocalAccount | None:
        if isinstance(who, LocalAccount):
            return who
        return self._keys.get(Web3.to_checksum_address(who))

    def eth_balance(self, who: Signer) -> int:
        return int(self.w3.eth.get_balance(self.address_of(who)))

    def send_eth(self, to: Signer, wei: int, *, sender: Signer) -> Tx:
        """Plain value transfer, e.g. to give a fresh key gas money."""
        return self._send_tx({"to": self.address_of(to), "value": wei}, sender)

    # -- contracts -------------------------------------------------------------------------

    def contract(self, name: str, address: str) -> Contract:
        """A web3 contract object for artifact ``name`` at ``address``."""
        abi = load_artifact(name).abi
        checksum = Web3.to_checksum_address(address)
        self._abis[checksum] = abi
        return self.w3.eth.contract(address=checksum, abi=abi)

    def deploy(self, name: str, *args: Any, sender: Signer) -> Tx:
        """Deploy artifact ``name``; the new address is ``tx.contract_address``."""
        art = load_artifact(name)
        factory = self.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
        tx = self.send(factory.constructor(*args), sender=sender)
        if tx.contract_address is None:  # pragma: no cover - a successful create has one
            raise ChainRevert(f"deploying {name} produced no contract address")
        self._abis[tx.contract_address] = art.abi
        return tx

    def call(self, fn: Any, *, sender: Signer | None = None, block: int | str = "latest") -> Any:
        """Run a view function; reverts raise :class:`ChainRevert`."""
        params: dict[str, Any] = {}
        if sender is not None:
            params["from"] = self.address_of(sender)
        try:
            return fn.call(params, block_identifier=block)
        except _REVERTS as exc:
            raise self.errors.from_exception(exc) from None

    def send(self, fn: Any, *, sender: Signer, value: int = 0, gas: int | None = None) -> Tx:
        """Send a contract call (or constructor) and wait for it to be mined.

        Gas is estimated first, so a reverting call fails here (as :class:`ChainRevert`)
        without spending gas; a transaction that is mined but fails is replayed to find out why.
        """
        frm = self.address_of(sender)
        base: dict[str, Any] = {"from": frm, "value": value}
        try:
            if gas is None:
                gas = int(fn.estimate_gas(base) * self.gas_margin) + GAS_HEADROOM
            tx = dict(fn.build_transaction({**base, "gas": gas}))
        except _REVERTS as exc:
            raise self.errors.from_exception(exc) from None
        return self._send_tx(tx, sender)

    def _send_tx(self, tx: dict[str, Any], sender: Signer) -> Tx:
        frm = self.address_of(sender)
        tx = {**tx, "from": frm, "chainId": self.chain_id}
        if "gas" not in tx:
            try:
                tx["gas"] = int(self.w3.eth.estimate_gas(cast(Any, tx)) * self.gas_margin)
            except _REVERTS as exc:
                raise self.errors.from_exception(exc) from None
        local = self._local(sender)
        if local is not None:
            if "maxFeePerGas" not in tx and "gasPrice" not in tx:
                tx.update(self._fees())
            with self._nonce_lock:
                tx["nonce"] = self.w3.eth.get_transaction_count(frm, "pending")
                signed = local.sign_transaction(tx)
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        else:
            tx_hash = self.w3.eth.send_transaction(cast(Any, tx))
        return self._mined(tx_hash, tx)

    def _fees(self) -> dict[str, int]:
        """EIP-1559 fees: the node's priority fee, and room for the base fee to double."""
        priority = int(self.w3.eth.max_priority_fee)
        base_fee = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0))
        return {"maxPriorityFeePerGas": priority, "maxFeePerGas": 2 * base_fee + priority}

    def build_unsigned(
        self,
        fn: Any,
        *,
        sender: Signer,
        nonce: int | None = None,
        gas: int | None = None,
        max_fee_per_gas: int | None = None,
        max_priority_fee_per_gas: int | None = None,
    ) -> dict[str, Any]:
        """An unsigned EIP-1559 transaction calling ``fn`` from ``sender``, for a key that
        signs elsewhere (e.g. an offline settlement key).

        Returns ``{"to", "data", "value", "chainId", "nonce", "gas", "maxFeePerGas",
        "maxPriorityFeePerGas", "type"}``: what ``Account.sign_transaction`` takes; send the
        result with :meth:`send_raw`. Gas is estimated (so a call that would revert fails here
        as :class:`ChainRevert`) unless given; the nonce is ``sender``'s pending count unless
        given. Fees are for now: a transaction signed long after may need fresh ones.
        """
        frm = self.address_of(sender)
        fees = self._fees()
        if max_priority_fee_per_gas is not None:
            fees["maxPriorityFeePerGas"] = max_priority_fee_per_gas
        if max_fee_per_gas is not None:
            fees["maxFeePerGas"] = max_fee_per_gas
        fees["maxFeePerGas"] = max(fees["maxFeePerGas"], fees["maxPriorityFeePerGas"])
        base: dict[str, Any] = {"from": frm, "value": 0}
        try:
            if gas is None:  # the same headroom as `send`: signed offline, mined later
                gas = int(fn.estimate_gas(base) * self.gas_margin) + GAS_HEADROOM
            built = dict(fn.build_transaction({**base, "gas": gas, **fees}))
        except _REVERTS as exc:
            raise self.errors.from_exception(exc) from None
        if nonce is None:
            nonce = int(self.w3.eth.get_transaction_count(frm, "pending"))
        return {
            "to": Web3.to_checksum_address(built["to"]),
            "data": HexBytes(built["data"]).to_0x_hex(),
            "value": 0,
            "chainId": self.chain_id,
            "nonce": nonce,
            "gas": gas,
            **fees,
            "type": 2,
        }

    def send_raw(self, raw: bytes | str) -> Tx:
        """Broadcast an already-signed transaction (e.g. :meth:`build_unsigned`'s, signed
        offline) and wait for it to be mined; a failure raises :class:`ChainRevert`."""
        try:
            tx_hash = self.w3.eth.send_raw_transaction(HexBytes(raw))
        except _REVERTS as exc:
            raise self.errors.from_exception(exc) from None
        return self._mined(tx_hash, None)

    def _mined(self, tx_hash: Any, tx: dict[str, Any] | None) -> Tx:
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
        if receipt["status"] != 1:
            if tx is None:  # a raw transaction: read back what was sent
                sent = self.w3.eth.get_transaction(tx_hash)
                tx = {
                    "from": sent["from"],
                    "to": sent.get("to"),
                    "data": HexBytes(sent["input"]).to_0x_hex(),
                    "value": int(sent["value"]),
                    "gas": int(sent["gas"]),
                }
            raise self._why_failed(tx, int(receipt["blockNumber"]))
        created = receipt.get("contractAddress")
        return Tx(
            hash=HexBytes(tx_hash).to_0x_hex(),
            gas_used=int(receipt["gasUsed"]),
            block_number=int(receipt["blockNumber"]),
            events=self._decode_logs(receipt["logs"]),
            contract_address=Web3.to_checksum_address(created) if created else None,
        )

    def _why_failed(self, tx: dict[str, Any], block: int) -> ChainRevert:
        replay = {k: tx[k] for k in ("from", "to", "data", "value", "gas") if k in tx}
        try:
            self.w3.eth.call(cast(Any, replay), block_identifier=max(block - 1, 0))
        except _REVERTS as exc:
            return self.errors.from_exception(exc)
        return ChainRevert("transaction failed (status 0, probably out of gas)")

    def _decode_logs(self, logs: Sequence[Any]) -> list[Event]:
        events: list[Event] = []
        for log in logs:
            address = Web3.to_checksum_address(log["address"])
            abi = self._abis.get(address)
            if abi is None or not log["topics"]:
                continue
            topic0 = bytes(log["topics"][0])
            for item in abi:
                if item.get("type") != "event" or item.get("anonymous"):
                    continue
                sig = f"{item['name']}({','.join(str(i['type']) for i in item['inputs'])})"
                indexed = sum(1 for i in item["inputs"] if i.get("indexed"))
                if keccak(sig.encode()) == topic0 and indexed + 1 == len(log["topics"]):
                    data = get_event_data(self.w3.codec, cast(Any, item), log)
                    events.append(Event(str(item["name"]), address, dict(data["args"])))
                    break
        return events

    # -- blocks, time, snapshots -----------------------------------------------------------

    def block_number(self) -> int:
        return int(self.w3.eth.block_number)

    def timestamp(self) -> int:
        """Timestamp of the latest block (what the next transaction sees, give or take)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def mine(self, blocks: int = 1) -> None:
        if self._tester is not None:
            self._tester.mine_blocks(blocks)
        else:
            for _ in range(blocks):
                self._rpc("evm_mine", [])

    def advance_time(self, seconds: int) -> int:
        """Move the clock forward and mine a block at the new time; returns its timestamp.

        Embedded: at least `seconds` after the latest block, and never before the pending
        block, which py-evm stamped with the wall clock when the latest was mined (on a
        loaded machine that can already be more than `seconds` later)."""
        if self._tester is not None:
            pending = int(self._tester.get_block_by_number("pending")["timestamp"])
            target = self.timestamp() + seconds
            if target > pending:
                self._tester.time_travel(target)
            else:  # the pending block is late enough already (time_travel to it is a no-op)
                self._tester.mine_blocks()
        else:
            self._rpc("evm_increaseTime", [seconds])
            self._rpc("evm_mine", [])
        return self.timestamp()

    def snapshot(self) -> Any:
        """Remember the current state; :meth:`revert` returns to it (tests use this)."""
        if self._tester is not None:
            return self._tester.take_snapshot()
        return self._rpc("evm_snapshot", [])

    def revert(self, snapshot: Any) -> None:
        """Return to ``snapshot``. On anvil a snapshot can be used once: take a new one."""
        if self._tester is not None:
            self._tester.revert_to_snapshot(snapshot)
        elif not self._rpc("evm_revert", [snapshot]):
            raise RuntimeError(f"anvil refused to revert to snapshot {snapshot}")

    def _rpc(self, method: str, params: list[Any]) -> Any:
        response = self.w3.provider.make_request(RPCEndpoint(method), params)
        if response.get("error"):
            raise RuntimeError(f"{method} failed: {response['error']}")
        return response.get("result")


def _embedded(accounts: int) -> Chain:
    from eth.vm.forks import CancunVM
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider

    # Cancun, like the compiler target and the anvil we start, so gas figures agree.
    backend = PyEVMBackend(
        genesis_state=PyEVMBackend.generate_genesis_state(num_accounts=accounts),
        vm_configuration=((0, CancunVM),),
    )
    tester = EthereumTester(backend)
    w3 = Web3(EthereumTesterProvider(tester))
    keys = [key.to_bytes() for key in backend.account_keys]
    return Chain(w3, kind="embedded", keys=keys, tester=tester)


def connect(
    url: str | None = None,
    *,
    keys: Sequence[str | bytes] | None = None,
    accounts: int = EMBEDDED_ACCOUNTS,
    timeout: float = 30.0,
) -> Chain:
    """Connect to a chain.

    ``None`` or ``"embedded"``: a fresh in-process EVM (eth-tester + py-evm, Cancun rules) with
    ``accounts`` funded accounts. ``http(s)://…``: a JSON-RPC node, e.g. anvil; ``keys`` are
    the accounts to sign with (default: anvil's dev keys).
    """
    if url is None or url == "embedded":
        return _embedded(accounts)
    if url.startswith(("http://", "https://")):
        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}))
        if not w3.is_connected():
            raise ConnectionError(f"no JSON-RPC node answers at {url}")
        if keys is None:
            chain_id = int(w3.eth.chain_id)
            if chain_id not in DEV_CHAIN_IDS:
                raise ValueError(
                    f"chain {chain_id} at {url} is not a local dev chain: refusing to sign with "
                    f"anvil's public dev keys there (anyone can spend from them); pass the "
                    f"keys to sign with"
                )
        return Chain(w3, kind="rpc", keys=keys if keys is not None else anvil_dev_keys(), url=url)
    raise ValueError(f"unsupported chain url {url!r}: use 'embedded' or http(s)://host:port")
