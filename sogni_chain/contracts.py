"""Typed wrappers for the four contracts, with small surfaces.

Each wrapper is bound to a :class:`~sogni_chain.chain.Chain`, an address and a default
sender; every transaction method takes ``sender=`` to act as someone else. Amounts are in
token base units (1 SOGNI = 10**18). Reverts raise :class:`~sogni_chain.errors.ChainRevert`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3

from sogni_protocol import eip712
from sogni_protocol.eip712 import Domain

from .chain import Chain, Signer, Tx

__all__ = [
    "DISTRIBUTOR_DOMAIN_NAME",
    "DISTRIBUTOR_DOMAIN_VERSION",
    "MAX_BPS",
    "Distributor",
    "Eip712Domain",
    "License",
    "Staking",
    "Token",
    "sign_stake_authorization",
    "stake_authorization_typed_data",
]

_ZERO32 = bytes(32)

DISTRIBUTOR_DOMAIN_NAME = "SogniSupernet"
"""The reward distributor's EIP-712 domain name (shared with offers and receipts)."""
DISTRIBUTOR_DOMAIN_VERSION = "3"
"""The domain version the deployed RewardDistributor reports (``eip712Domain()``)."""
MAX_BPS = 10_000
"""``stakeBps`` is in basis points: 10,000 stakes the whole claim."""

_EIP712_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_STAKE_AUTHORIZATION_TYPE = [
    {"name": "account", "type": "address"},
    {"name": "cumulativeAmount", "type": "uint256"},
    {"name": "stakeBps", "type": "uint16"},
    {"name": "deadline", "type": "uint64"},
]


def stake_authorization_typed_data(
    *,
    chain_id: int,
    distributor: str,
    account: str,
    cumulative_amount: int,
    stake_bps: int,
    deadline: int,
) -> dict[str, Any]:
    """The EIP-712 document a worker signs to let anyone submit ``claimAndStake`` for it.

    ``StakeAuthorization(address account,uint256 cumulativeAmount,uint16 stakeBps,
    uint64 deadline)`` under the distributor's domain (``"SogniSupernet"``, version ``"3"``,
    ``chain_id``, ``distributor``), in the ``full_message`` shape of eth-account's
    ``encode_typed_data`` (and of ``eth_signTypedData_v4`` in wallets).
    """
    if not 0 <= stake_bps <= MAX_BPS:
        raise ValueError(f"stake_bps must be 0..{MAX_BPS}, not {stake_bps}")
    return {
        "types": {
            "EIP712Domain": _EIP712_DOMAIN_TYPE,
            "StakeAuthorization": _STAKE_AUTHORIZATION_TYPE,
        },
        "primaryType": "StakeAuthorization",
        "domain": {
            "name": DISTRIBUTOR_DOMAIN_NAME,
            "version": DISTRIBUTOR_DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": Web3.to_checksum_address(distributor),
        },
        "message": {
            "account": Web3.to_checksum_address(account),
            "cumulativeAmount": cumulative_amount,
            "stakeBps": stake_bps,
            "deadline": deadline,
        },
    }


def sign_stake_authorization(
    signer: LocalAccount,
    *,
    chain_id: int,
    distributor: str,
    cumulative_amount: int,
    stake_bps: int,
    deadline: int,
) -> bytes:
    """``signer``'s 65-byte signature of its own :func:`stake_authorization_typed_data`."""
    document = stake_authorization_typed_data(
        chain_id=chain_id,
        distributor=distributor,
        account=signer.address,
        cumulative_amount=cumulative_amount,
        stake_bps=stake_bps,
        deadline=deadline,
    )
    return bytes(signer.sign_message(encode_typed_data(full_message=document)).signature)


def _b32(value: bytes | str) -> bytes:
    raw = (
        bytes.fromhex(value[2:] if value.startswith("0x") else value)
        if isinstance(value, str)
        else bytes(value)
    )
    if len(raw) != 32:
        raise ValueError("expected 32 bytes")
    return raw


class _Bound:
    NAME: ClassVar[str]

    def __init__(self, chain: Chain, address: str, sender: Signer | None = None) -> None:
        self.chain = chain
        self.contract = chain.contract(self.NAME, address)
        self.address: ChecksumAddress = self.contract.address
        self.sender = sender if sender is not None else chain.accounts[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address})"

    def _send(self, name: str, *args: Any, sender: Signer | None = None) -> Tx:
        fn = self.contract.get_function_by_name(name)(*args)
        return self.chain.send(fn, sender=sender if sender is not None else self.sender)

    def _call(self, name: str, *args: Any, block: int | str = "latest") -> Any:
        return self.chain.call(self.contract.get_function_by_name(name)(*args), block=block)

    def _acct(self, who: Signer) -> ChecksumAddress:
        return self.chain.address_of(who)

    def has_role(self, role: str, account: Signer) -> bool:
        """``role`` by name, e.g. ``"SETTLEMENT_ROLE"`` or ``"DEFAULT_ADMIN_ROLE"``."""
        return bool(self._call("hasRole", self._role(role), self._acct(account)))

    def grant_role(self, role: str, account: Signer, *, sender: Signer | None = None) -> Tx:
        return self._send("grantRole", self._role(role), self._acct(account), sender=sender)

    def revoke_role(self, role: str, account: Signer, *, sender: Signer | None = None) -> Tx:
        return self._send("revokeRole", self._role(role), self._acct(account), sender=sender)

    @staticmethod
    def _role(name: str) -> bytes:
        return _ZERO32 if name == "DEFAULT_ADMIN_ROLE" else Web3.keccak(text=name)

    # Two-step admin handover (OpenZeppelin AccessControlDefaultAdminRules): grant_role and
    # revoke_role refuse DEFAULT_ADMIN_ROLE; the admin begins a transfer, and the new admin
    # accepts it once `default_admin_delay()` seconds have passed.

    def default_admin(self) -> ChecksumAddress:
        return Web3.to_checksum_address(self._call("defaultAdmin"))

    def default_admin_delay(self) -> int:
        return int(self._call("defaultAdminDelay"))

    def pending_default_admin(self) -> tuple[ChecksumAddress, int]:
        """``(new admin, timestamp after which it may accept)``; zero address when none."""
        new_admin, schedule = self._call("pendingDefaultAdmin")
        return Web3.to_checksum_address(new_admin), int(schedule)

    def begin_default_admin_transfer(
        self, new_admin: Signer, *, sender: Signer | None = None
    ) -> Tx:
        return self._send("beginDefaultAdminTransfer", self._acct(new_admin), sender=sender)

    def cancel_default_admin_transfer(self, *, sender: Signer | None = None) -> Tx:
        return self._send("cancelDefaultAdminTransfer", sender=sender)

    def accept_default_admin_transfer(self, *, sender: Signer) -> Tx:
        """Sent by the new admin, after the delay."""
        return self._send("acceptDefaultAdminTransfer", sender=sender)


class Token(_Bound):
    """SOGNI (ERC-20 + EIP-2612 permit)."""

    NAME = "SogniToken"

    def total_supply(self) -> int:
        return int(self._call("totalSupply"))

    def balance_of(self, account: Signer) -> int:
        return int(self._call("balanceOf", self._acct(account)))

    def allowance(self, owner: Signer, spender: Signer) -> int:
        return int(self._call("allowance", self._acct(owner), self._acct(spender)))

    def transfer(self, to: Signer, amount: int, *, sender: Signer | None = None) -> Tx:
        return self._send("transfer", self._acct(to), amount, sender=sender)

    def approve(self, spender: Signer, amount: int, *, sender: Signer | None = None) -> Tx:
        return self._send("approve", self._acct(spender), amount, sender=sender)

    def nonces(self, owner: Signer) -> int:
        return int(self._call("nonces", self._acct(owner)))

    def sign_permit(
        self, owner: LocalAccount, spender: Signer, value: int, deadline: int
    ) -> tuple[int, bytes, bytes]:
        """EIP-2612 signature ``(v, r, s)`` by ``owner`` allowing ``spender`` ``value``."""
        message = encode_typed_data(
            full_message={
                "types": {
                    "EIP712Domain": _EIP712_DOMAIN_TYPE,
                    "Permit": [
                        {"name": "owner", "type": "address"},
                        {"name": "spender", "type": "address"},
                        {"name": "value", "type": "uint256"},
                        {"name": "nonce", "type": "uint256"},
                        {"name": "deadline", "type": "uint256"},
                    ],
                },
                "primaryType": "Permit",
                "domain": {
                    "name": "Sogni",
                    "version": "1",
                    "chainId": self.chain.chain_id,
                    "verifyingContract": self.address,
                },
                "message": {
                    "owner": owner.address,
                    "spender": self._acct(spender),
                    "value": value,
                    "nonce": self.nonces(owner),
                    "deadline": deadline,
                },
            }
        )
        signed = owner.sign_message(message)
        return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")

    def permit(
        self,
        owner: Signer,
        spender: Signer,
        value: int,
        deadline: int,
        signature: tuple[int, bytes, bytes],
        *,
        sender: Signer | None = None,
    ) -> Tx:
        """Submit a permit signature (anyone may pay the gas)."""
        v, r, s = signature
        return self._send(
            "permit",
            self._acct(owner),
            self._acct(spender),
            value,
            deadline,
            v,
            r,
            s,
            sender=sender,
        )

    # The reward distributor's per-account claimed amounts live in the balance's slot
    # (docs/CONTRACTS.md, "Storage layout (gas)"); only the bound distributor writes them.

    def distributor(self) -> ChecksumAddress:
        """The distributor bound to this token's claimed counters (zero address: none yet)."""
        return Web3.to_checksum_address(self._call("distributor"))

    def claimed_of(self, account: Signer) -> int:
        return int(self._call("claimedOf", self._acct(account)))

    def set_distributor(self, distributor: Signer, *, sender: Signer | None = None) -> Tx:
        """Bind the distributor: the token's deployer, once (later the distributor itself
        hands over, through ``Distributor.hand_over_claims``)."""
        return self._send("setDistributor", self._acct(distributor), sender=sender)


class Staking(_Bound):
    """Worker stake with a 7-day unstake cooldown, tier minimums and slashing."""

    NAME = "Staking"
    COOLDOWN_SECONDS = 7 * 24 * 3600

    def stake(self, amount: int, *, sender: Signer | None = None) -> Tx:
        """Needs a prior ``Token.approve(staking, amount)`` (or a permit)."""
        return self._send("stake", amount, sender=sender)

    def stake_for(self, account: Signer, amount: int, *, sender: Signer | None = None) -> Tx:
        """Stake ``amount`` of the sender's SOGNI for ``account`` (the sender needs to have
        approved staking); only ``account`` can unstake it."""
        return self._send("stakeFor", self._acct(account), amount, sender=sender)

    def request_unstake(self, amount: int, *, sender: Signer | None = None) -> Tx:
        return self._send("requestUnstake", amount, sender=sender)

    def withdraw(self, *, sender: Signer | None = None) -> Tx:
        return self._send("withdraw", sender=sender)

    def active_stake(self, account: Signer, block: int | None = None) -> int:
        """Active stake now, or as it was at block number ``block`` (a stake snapshot; on a
        real node, blocks older than its state history need an archive node)."""
        where: int | str = "latest" if block is None else block
        return int(self._call("activeStake", self._acct(account), block=where))

    def total_active(self) -> int:
        return int(self._call("totalActive"))

    def total_pending(self) -> int:
        return int(self._call("totalPending"))

    def pending_stake(self, account: Signer) -> tuple[int, int]:
        """``(amount, unlock timestamp)`` of the account's unstake bucket."""
        amount, unlock_at = self._call("pendingStake", self._acct(account))
        return int(amount), int(unlock_at)

    def cooldown(self) -> int:
        """Seconds an unstake request waits before it can be withdrawn."""
        return int(self._call("cooldown"))

    def set_cooldown(self, seconds: int, *, sender: Signer | None = None) -> Tx:
        """Governance: the unstake cooldown for later requests (1 to 30 days)."""
        return self._send("setCooldown", seconds, sender=sender)

    def frozen_until(self, account: Signer) -> int:
        """Unix time before which the account may not withdraw (a slash proposed against it)."""
        return int(self._call("frozenUntil", self._acct(account)))

    def freeze(self, account: Signer, until: int, *, sender: Signer | None = None) -> Tx:
        return self._send("freeze", self._acct(account), until, sender=sender)

    def delegation_of(self, account: Signer) -> tuple[ChecksumAddress, int]:
        """Whom the account's votes go to, and when that last changed (Staking's clock, unix
        seconds; 0: never). Disputes refuses a dispute opened in that very second."""
        delegatee, changed_at = self._call("delegationOf", self._acct(account))
        return Web3.to_checksum_address(delegatee), int(changed_at)

    def slash(
        self, account: Signer, amount: int, reason: str, *, sender: Signer | None = None
    ) -> Tx:
        """Takes from active, then pending stake; ``tx.event("Slashed")`` has the split."""
        return self._send("slash", self._acct(account), amount, reason, sender=sender)

    def set_tier_minimum(self, tier: int, minimum: int, *, sender: Signer | None = None) -> Tx:
        return self._send("setTierMinimum", tier, minimum, sender=sender)

    def tier_minimum(self, tier: int) -> int:
        return int(self._call("tierMinimum", tier))

    def meets_tier(self, account: Signer, tier: int) -> bool:
        return bool(self._call("meetsTier", self._acct(account), tier))


class License(_Bound):
    """Fast-worker licence NFTs."""

    NAME = "WorkerLicense"

    def mint_batch(self, to: Sequence[Signer], *, sender: Signer | None = None) -> list[int]:
        """Mint one licence per address; returns the new token ids in order."""
        tx = self._send("mintBatch", [self._acct(a) for a in to], sender=sender)
        return [int(ev.args["tokenId"]) for ev in tx.events if ev.name == "Transfer"]

    def has_valid_license(self, account: Signer) -> bool:
        return bool(self._call("hasValidLicense", self._acct(account)))

    def valid_balance(self, account: Signer) -> int:
        """How many of the account's licences are not blacklisted."""
        return int(self._call("validBalance", self._acct(account)))

    def owner_of(self, token_id: int) -> ChecksumAddress:
        return Web3.to_checksum_address(self._call("ownerOf", token_id))

    def balance_of(self, account: Signer) -> int:
        return int(self._call("balanceOf", self._acct(account)))

    def is_blacklisted(self, token_id: int) -> bool:
        return bool(self._call("blacklisted", token_id))

    def blacklist(self, token_id: int, *, sender: Signer | None = None) -> Tx:
        return self._send("blacklist", token_id, sender=sender)

    def unblacklist(self, token_id: int, *, sender: Signer | None = None) -> Tx:
        return self._send("unblacklist", token_id, sender=sender)

    def burn(self, token_id: int, *, sender: Signer | None = None) -> Tx:
        return self._send("burn", token_id, sender=sender)

    def transfer(self, to: Signer, token_id: int, *, sender: Signer | None = None) -> Tx:
        """Reverts ``TransferCooldown`` within ``transfer_cooldown()`` of its last transfer."""
        frm = self._acct(sender if sender is not None else self.sender)
        return self._send("transferFrom", frm, self._acct(to), token_id, sender=sender)

    def transfer_cooldown(self) -> int:
        """Seconds a transferred licence must stay with its new holder."""
        return int(self._call("transferCooldown"))

    def set_transfer_cooldown(self, seconds: int, *, sender: Signer | None = None) -> Tx:
        return self._send("setTransferCooldown", seconds, sender=sender)

    def transferable_at(self, token_id: int) -> int:
        """Timestamp from which ``token_id`` may be transferred again (0: any time)."""
        return int(self._call("transferableAt", token_id))


@dataclass(frozen=True)
class Eip712Domain:
    """The distributor's EIP-712 domain, as it reports it (ERC-5267)."""

    name: str
    version: str
    chain_id: int
    verifying_contract: ChecksumAddress

    def as_dict(self) -> dict[str, Any]:
        """In the shape eth-account's ``encode_typed_data`` takes as ``domain``."""
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }


class Distributor(_Bound):
    """Per-epoch Merkle roots of cumulative payouts, claims, and the receipts' EIP-712 domain."""

    NAME = "RewardDistributor"

    def post_root(
        self,
        epoch: int,
        root: bytes | str,
        total: int,
        receipts_hash: bytes | str,
        *,
        sender: Signer | None = None,
    ) -> Tx:
        """Needs SETTLEMENT_ROLE. ``epoch`` must be ``latest_epoch() + 1`` (the first is 1);
        ``total`` may not be below the previous root's, nor exceed it by more than
        ``max_total_growth()``, and must be funded."""
        return self._send("postRoot", epoch, _b32(root), total, _b32(receipts_hash), sender=sender)

    def post_airdrop_root(
        self,
        epoch: int,
        season: int,
        root: bytes | str,
        total: int,
        evidence_hash: bytes | str,
        *,
        sender: Signer | None = None,
    ) -> Tx:
        """Needs AIRDROP_ROLE. Like :meth:`post_root`, but ``season``'s prizes: once per
        season, growth at most ``airdrop_cap(season)``."""
        return self._send(
            "postAirdropRoot", epoch, season, _b32(root), total, _b32(evidence_hash), sender=sender
        )

    def set_airdrop_cap(self, season: int, cap: int, *, sender: Signer | None = None) -> Tx:
        """DEFAULT_ADMIN_ROLE; refused once the season's airdrop is posted."""
        return self._send("setAirdropCap", season, cap, sender=sender)

    def airdrop_cap(self, season: int) -> int:
        return int(self._call("airdropCap", season))

    def airdrop_epoch_of(self, season: int) -> int:
        """The epoch that paid ``season``'s prizes (0: not posted)."""
        return int(self._call("airdropEpochOf", season))

    def airdrop_season_of(self, epoch: int) -> int:
        """The season whose prizes ``epoch`` paid (0: a work epoch); from the
        ``AirdropPosted`` events (the contract keeps only each season's epoch)."""
        logs = self.contract.events.AirdropPosted().get_logs(
            from_block=0, argument_filters={"epoch": epoch}
        )
        return int(logs[-1]["args"]["season"]) if logs else 0

    def build_post_root(
        self,
        epoch: int,
        root: bytes | str,
        total: int,
        receipts_hash: bytes | str,
        *,
        sender: Signer,
        nonce: int | None = None,
        gas: int | None = None,
        max_fee_per_gas: int | None = None,
        max_priority_fee_per_gas: int | None = None,
    ) -> dict[str, Any]:
        """An UNSIGNED ``postRoot`` transaction from ``sender`` (the settlement key's address),
        to be signed offline (``Account.sign_transaction(tx, key)``) and broadcast with
        ``chain.send_raw(signed.raw_transaction)``. Built by :meth:`Chain.build_unsigned`: gas
        is estimated now, so a root the contract would refuse fails here."""
        fn = self.contract.functions.postRoot(epoch, _b32(root), total, _b32(receipts_hash))
        return self.chain.build_unsigned(
            fn,
            sender=sender,
            nonce=nonce,
            gas=gas,
            max_fee_per_gas=max_fee_per_gas,
            max_priority_fee_per_gas=max_priority_fee_per_gas,
        )

    def claim(
        self,
        account: Signer,
        cumulative_amount: int,
        proof: Sequence[bytes | str],
        *,
        sender: Signer | None = None,
    ) -> Tx:
        """Pay ``account`` what it has not claimed yet; ``tx.event("Claimed")["amount"]``.

        The proof is against the newest *matured* root (``claimable_root()``, epoch
        ``matured_epoch()``), not necessarily the latest posted one. Reverts
        ``NothingToClaim`` when nothing is due, ``InvalidProof`` for a wrong amount or proof,
        ``NoRoot``/``NotMatured`` before the first root is posted/matured, ``EnforcedPause``
        while paused.
        """
        return self._send(
            "claim",
            self._acct(account),
            cumulative_amount,
            [_b32(p) for p in proof],
            sender=sender,
        )

    def claim_and_stake(
        self,
        account: Signer,
        cumulative_amount: int,
        proof: Sequence[bytes | str],
        stake_bps: int,
        deadline: int,
        signature: bytes | str = b"",
        *,
        sender: Signer | None = None,
    ) -> Tx:
        """Claim for ``account`` and stake ``stake_bps``/10,000 of it for ``account`` in the
        staking contract; the rest goes to ``account``. ``tx.event("AutoStaked")`` has the
        split. Unless the sender is ``account``, ``signature`` must be ``account``'s
        :meth:`sign_stake_authorization` of exactly these values (a relayer pays the gas and
        receives nothing)."""
        sig = (
            bytes.fromhex(signature.removeprefix("0x")) if isinstance(signature, str) else signature
        )
        return self._send(
            "claimAndStake",
            self._acct(account),
            cumulative_amount,
            [_b32(p) for p in proof],
            stake_bps,
            deadline,
            bytes(sig),
            sender=sender,
        )

    def stake_authorization(
        self, account: Signer, cumulative_amount: int, stake_bps: int, deadline: int
    ) -> dict[str, Any]:
        """The typed-data document ``account`` signs for :meth:`claim_and_stake`."""
        return stake_authorization_typed_data(
            chain_id=self.chain.chain_id,
            distributor=self.address,
            account=self._acct(account),
            cumulative_amount=cumulative_amount,
            stake_bps=stake_bps,
            deadline=deadline,
        )

    def sign_stake_authorization(
        self, signer: LocalAccount, cumulative_amount: int, stake_bps: int, deadline: int
    ) -> bytes:
        """``signer``'s signature letting anyone submit :meth:`claim_and_stake` for it."""
        return sign_stake_authorization(
            signer,
            chain_id=self.chain.chain_id,
            distributor=self.address,
            cumulative_amount=cumulative_amount,
            stake_bps=stake_bps,
            deadline=deadline,
        )

    def claimed(self, account: Signer) -> int:
        return int(self._call("claimed", self._acct(account)))

    def hand_over_claims(self, successor: Signer, *, sender: Signer | None = None) -> Tx:
        """Governance hands the token's claimed counters to ``successor``, the distributor
        replacing this one (which continues the same cumulative tree); claims here stop."""
        return self._send("handOverClaims", self._acct(successor), sender=sender)

    def _posted_log(self, epoch: int) -> Any | None:
        """``epoch``'s ``RootPosted`` log, or None: the history the contract keeps in events
        (it stores only the newest ``RING`` epochs, and no receipts hash)."""
        if epoch <= 0:
            return None
        logs = self.contract.events.RootPosted().get_logs(
            from_block=0, argument_filters={"epoch": epoch}
        )
        return logs[-1] if logs else None

    def root_of(self, epoch: int) -> bytes | None:
        """The root posted for ``epoch``, or None (from storage while the epoch is among the
        newest ``RING``, else from its ``RootPosted`` event)."""
        root = bytes(self._call("rootOf", epoch))
        if root != _ZERO32:
            return root
        log = self._posted_log(epoch)
        return bytes(log["args"]["root"]) if log is not None else None

    def receipts_hash_of(self, epoch: int) -> bytes:
        """The receipts file's content hash posted with ``epoch`` (zeros if none), from the
        ``RootPosted`` event."""
        log = self._posted_log(epoch)
        return bytes(log["args"]["receiptsHash"]) if log is not None else _ZERO32

    def roots_posted(self, from_block: int = 0) -> list[dict[str, Any]]:
        """All ``RootPosted`` events (epoch, root, total, receiptsHash), oldest first."""
        event = self.contract.events.RootPosted()
        logs = event.get_logs(from_block=from_block)
        return [dict(log["args"]) for log in logs]

    def latest_epoch(self) -> int:
        return int(self._call("latestEpoch"))

    def latest_root(self) -> bytes:
        """The most recently posted root (claims use :meth:`claimable_root`)."""
        return bytes(self._call("latestRoot"))

    def matured_epoch(self) -> int:
        """The newest epoch whose root has matured (claims verify against it); 0 if none."""
        return int(self._call("maturedEpoch"))

    def claimable_root(self) -> bytes | None:
        """The root claims are checked against now, or None before one has matured."""
        root = bytes(self._call("claimableRoot"))
        return root if root != _ZERO32 else None

    def total_of(self, epoch: int) -> int:
        """The ``total`` posted with ``epoch``'s root (0 if none)."""
        total = int(self._call("totalOf", epoch))
        if total or bytes(self._call("rootOf", epoch)) != _ZERO32:  # held: storage is right
            return total
        log = self._posted_log(epoch)
        return int(log["args"]["total"]) if log is not None else 0

    def posted_at(self, epoch: int) -> int:
        """Timestamp of the block that posted ``epoch``'s root (0 if none)."""
        posted = int(self._call("postedAt", epoch))
        if posted:
            return posted
        log = self._posted_log(epoch)
        if log is None:
            return 0
        return int(self.chain.w3.eth.get_block(log["blockNumber"])["timestamp"])

    def matures_at(self, epoch: int) -> int | None:
        """When ``epoch``'s root starts being used for claims (under the current delay)."""
        posted = self.posted_at(epoch)
        return posted + self.claim_delay() if posted else None

    def claim_delay(self) -> int:
        return int(self._call("claimDelay"))

    def max_total_growth(self) -> int:
        return int(self._call("maxTotalGrowth"))

    def set_claim_delay(self, seconds: int, *, sender: Signer | None = None) -> Tx:
        """DEFAULT_ADMIN_ROLE; at most 30 days; applies to roots already posted too."""
        return self._send("setClaimDelay", seconds, sender=sender)

    def set_max_total_growth(self, amount: int, *, sender: Signer | None = None) -> Tx:
        """DEFAULT_ADMIN_ROLE."""
        return self._send("setMaxTotalGrowth", amount, sender=sender)

    def total_claimed(self) -> int:
        return int(self._call("totalClaimed"))

    def paused(self) -> bool:
        return bool(self._call("paused"))

    def pause(self, *, sender: Signer | None = None) -> Tx:
        return self._send("pause", sender=sender)

    def unpause(self, *, sender: Signer | None = None) -> Tx:
        return self._send("unpause", sender=sender)

    def eip712_domain(self) -> Eip712Domain:
        _fields, name, version, chain_id, verifying, _salt, _ext = self._call("eip712Domain")
        return Eip712Domain(
            str(name), str(version), int(chain_id), Web3.to_checksum_address(verifying)
        )

    def domain_separator(self) -> bytes:
        return bytes(self._call("domainSeparator"))

    def protocol_domain(self) -> Domain:
        """The ``sogni_protocol.eip712.Domain`` that offers and receipts are signed under.

        Read from the contract (ERC-5267) and checked against the protocol's name and known
        versions, so a misconfigured distributor address fails here, not at every signature.
        The contract reports the version it was deployed under (the layout of the one type it
        verifies itself, `StakeAuthorization`); offers and receipts, checked off chain, are
        signed under the protocol's current version with the same name, chain and contract.
        """
        onchain = self.eip712_domain()
        if onchain.name != eip712.DOMAIN_NAME or onchain.version not in eip712.KNOWN_VERSIONS:
            raise ValueError(
                f"{self.address} has EIP-712 domain {onchain.name!r} v{onchain.version}, "
                f"expected {eip712.DOMAIN_NAME!r} v{'/'.join(eip712.KNOWN_VERSIONS)}"
            )
        return Domain(chain_id=onchain.chain_id, verifying_contract=onchain.verifying_contract)
