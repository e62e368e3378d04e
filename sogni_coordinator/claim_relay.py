"""Gasless claims: the coordinator submits a node's claim and pays its gas.

Why: a new node's wallet holds SOGNI it earned but no ETH, and the distributor's `claim`
(and `claimAndStake`, with the worker's EIP-712 `StakeAuthorization`) may be sent by anyone:
the tokens always go to the claiming account, the sender receives nothing. So a coordinator
can relay claims at the cost of a little gas, which it must not waste:

- every claim is checked before anything is sent: the proof against the newest *matured*
  root (the one the contract checks), the amount against what was already claimed, the
  stake authorization's deadline and signer; then the transaction's gas is estimated, so
  anything that would revert is refused without a transaction (`Chain.send`);
- per claiming account, at most `attempts` requests per `window` seconds (refused or not),
  so nobody makes the coordinator read the chain for free in a loop;
- a claim must add at least `min_claim` to what the account already claimed: anyone may ask
  for anyone's claim (the proofs are public), so without a floor a stranger spends the
  coordinator's gas on dust;
- transactions go out one at a time (one nonce sequence for the relayer key).

`ClaimRelay.relay` answers `RelayDone` or raises `RelayRefusal` (code and reason, as in
`RelayRefused`); `serve_relay` is the `/sogni/relay/1.0.0` handler, and the HTTP API's
`POST /relay/claim` calls the same method.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from sogni_net import Channel
from sogni_protocol import ids, merkle
from sogni_protocol.logs import get_logger
from sogni_protocol.relay_messages import (
    RelayClaim,
    RelayDone,
    RelayRefused,
    decode,
    encode,
)

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress

    from sogni_chain import Distributor, Signer

__all__ = ["ClaimRelay", "RelayRefusal", "serve_relay"]

log = get_logger(__name__)

REQUEST_TIMEOUT = 15.0
"""How long a relay stream may take to deliver its one request."""
SEND_TIMEOUT = 10.0
MAX_DEADLINE_AHEAD = 7 * 24 * 3600
"""A stake authorization valid for longer than this is refused (it would outlive its use)."""


class RelayRefusal(Exception):
    """Nothing was sent: `code` and `reason` as in `RelayRefused`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    def message(self) -> RelayRefused:
        return RelayRefused(code=self.code, reason=self.reason[:1024])


MAX_ACCOUNTS_TRACKED = 100_000
"""Accounts the rate limit remembers; past it, the least recently asked for is forgotten."""
MAX_WAITING = 8
"""Claims waiting for the chain at once; more are refused `busy` at once. Anyone may name
any account, so without a bound a stream of junk claims queued up before honest ones."""
SENDER_FACTOR = 4
"""A sender may ask this many times an account's attempts per window (it may claim for
several accounts: an operator's workers)."""
ROOT_CACHE_SECONDS = 10.0
"""How long the newest matured root is reused: a claim's proof is checked against it before
any chain read (junk proofs cost no RPC), refreshed at most this often."""


@dataclass
class _Window:
    """Sliding-window counter of requests per account, least recently asked first."""

    window: float
    attempts: int
    clock: Callable[[], float]
    seen: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def admit(self, account: str) -> float | None:
        """None when admitted (and counted), else the seconds until the next one is."""
        now = self.clock()
        times = self.seen.setdefault(account, deque())
        self.seen.move_to_end(account)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.attempts:
            return times[0] + self.window - now
        times.append(now)
        while len(self.seen) > MAX_ACCOUNTS_TRACKED:  # bounded memory, O(1) per request
            self.seen.popitem(last=False)
        return None


class ClaimRelay:
    """Submits claims for others with `sender` (the coordinator's funded key)."""

    def __init__(
        self,
        distributor: Distributor,
        sender: Signer,
        *,
        window: float = 600.0,
        attempts: int = 5,
        min_claim: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.distributor = distributor
        self.sender = sender
        self.min_claim = min_claim
        """The least a relayed claim must add (base units): no gas for strangers' dust."""
        self._limits = _Window(window, attempts, clock)
        """Claims per account, counted once their proof holds: anyone may name any account,
        and junk naming a victim used up its attempts (a lock-out from gasless claims)."""
        self._senders = _Window(window, attempts * SENDER_FACTOR, clock)
        """Claims per sender (peer id, IP address), junk included."""
        self._chain_limiter = trio.CapacityLimiter(1)
        self._in_flight: set[str] = set()
        self._clock = clock
        self._root: tuple[float, int, bytes] | None = None
        """(when read, epoch, root): the newest matured root, reused `ROOT_CACHE_SECONDS`
        (written by the one thread `_chain_limiter` lets in)."""

    @property
    def address(self) -> str:
        return str(self.distributor.chain.address_of(self.sender))

    async def relay(self, claim: RelayClaim, sender: str = "") -> RelayDone:
        """Check `claim`, then submit it; `RelayRefusal` when it is not sent. `sender`: who
        asks (peer id, IP address), limited apart from the account it names."""
        account = claim.account.lower()
        if len(self._in_flight) >= MAX_WAITING:  # before the account's count: a stranger's
            # junk keeping the relay busy must not use up an honest account's attempts
            raise RelayRefusal("busy", "this coordinator is relaying other claims: retry shortly")
        if sender and (wait := self._senders.admit(sender)) is not None:
            raise RelayRefusal(
                "rate_limited", f"too many relay requests from you: retry in {wait:.0f} s"
            )
        if account in self._in_flight:
            raise RelayRefusal("busy", f"a claim for {claim.account} is already being relayed")
        self._in_flight.add(account)
        try:
            done = await trio.to_thread.run_sync(
                self._check_and_send, claim, limiter=self._chain_limiter
            )
        finally:
            self._in_flight.discard(account)
        log.info(
            "claim_relayed",
            account=claim.account,
            epoch=done.epoch,
            amount=done.amount,
            staked=done.staked,
            tx="0x" + done.tx_hash.hex(),
        )
        return done

    # --- blocking: runs in a worker thread, one at a time --------------------------------
    def _check_and_send(self, claim: RelayClaim) -> RelayDone:
        from sogni_chain import ChainRevert

        try:
            return self._checked_send(claim)
        except ChainRevert as exc:
            raise RelayRefusal("would_revert", str(exc)) from None
        except RelayRefusal:
            raise
        except Exception as exc:  # RPC down, or the node refused the transaction
            text = str(exc)
            if "insufficient funds" in text.lower():
                log.error("relayer_unfunded", relayer=self.address)
                raise RelayRefusal(
                    "relayer_unfunded", "this coordinator has no ETH left for gas"
                ) from None
            log.warning("relay_failed", error=repr(exc))
            raise RelayRefusal("unavailable", f"the chain did not answer: {text[:200]}") from None

    def _checked_send(self, claim: RelayClaim) -> RelayDone:
        d = self.distributor
        account = d.chain.address_of(claim.account)
        amount = int(claim.cumulative_amount)
        cached = self._root
        if (
            cached is not None
            and self._clock() - cached[0] < ROOT_CACHE_SECONDS
            and not merkle.verify(cached[2], (account, amount), claim.proof)
        ):
            raise RelayRefusal(  # no chain read for a proof of no matured root
                "invalid_proof",
                f"the amount and proof are not a leaf of epoch {cached[1]}'s root, the newest "
                f"matured one as read at most {ROOT_CACHE_SECONDS:g} s ago (claims verify "
                "against it; retry shortly if a newer root has just matured)",
            )
        if d.paused():
            raise RelayRefusal("paused", "claims are paused by governance")
        epoch = d.matured_epoch()
        if epoch == 0:
            opens = d.matures_at(1)
            raise RelayRefusal(
                "not_matured",
                "no reward root has matured yet"
                + (f": claims open at unix time {opens}" if opens else ""),
            )
        root = d.root_of(epoch)
        if root is not None:
            self._root = (self._clock(), epoch, root)
        if root is None or not merkle.verify(root, (account, amount), claim.proof):
            raise RelayRefusal(
                "invalid_proof",
                f"the amount and proof are not a leaf of epoch {epoch}'s root, the newest "
                "matured one (claims verify against it)",
            )
        wait = self._limits.admit(account.lower())  # a real leaf: only its owner's
        if wait is not None:  # claims (or a replay of them) count against it
            raise RelayRefusal(
                "rate_limited",
                f"too many relay requests for {claim.account}: retry in {wait:.0f} s",
            )
        already = d.claimed(account)
        if amount <= already:
            raise RelayRefusal(
                "nothing_to_claim", f"{account} already claimed {already} of its {amount}"
            )
        if amount - already < self.min_claim:
            raise RelayRefusal(
                "below_minimum",
                f"{account} has {amount - already} to claim; this coordinator relays claims of "
                f"at least {self.min_claim}: claim with the wallet's own ETH, or when more is due",
            )
        if claim.stake_bps > 0:
            self._check_authorization(claim, account, amount)
            tx = d.claim_and_stake(
                account,
                amount,
                claim.proof,
                claim.stake_bps,
                claim.deadline,
                claim.signature,
                sender=self.sender,
            )
            split = tx.event("AutoStaked")
            staked, paid = int(split["staked"]), int(split["paid"])
        else:
            tx = d.claim(account, amount, claim.proof, sender=self.sender)
            staked, paid = 0, int(tx.event("Claimed")["amount"])
        claimed = tx.event("Claimed")
        return RelayDone(
            tx_hash=bytes.fromhex(tx.hash.removeprefix("0x")),
            account=account,
            epoch=int(claimed["epoch"]),
            amount=str(int(claimed["amount"])),
            staked=str(staked),
            paid=str(paid),
        )

    def _check_authorization(
        self, claim: RelayClaim, account: ChecksumAddress, amount: int
    ) -> None:
        from eth_account import Account
        from eth_account.messages import encode_typed_data

        d = self.distributor
        now = d.chain.timestamp()
        if claim.deadline < now:
            raise RelayRefusal("expired", f"the stake authorization expired at {claim.deadline}")
        if claim.deadline > now + MAX_DEADLINE_AHEAD:
            raise RelayRefusal(
                "bad_authorization", "the stake authorization's deadline is too far ahead"
            )
        if not claim.signature:
            raise RelayRefusal(
                "bad_authorization", "staking part of a relayed claim needs the account's signature"
            )
        if len(d.chain.w3.eth.get_code(account)) > 0:
            return  # a contract wallet (ERC-1271): the gas estimate asks it
        document = d.stake_authorization(account, amount, claim.stake_bps, claim.deadline)
        try:
            signer = Account.recover_message(
                encode_typed_data(full_message=document), signature=claim.signature
            )
        except Exception:
            signer = ""
        if str(signer).lower() != account.lower():
            raise RelayRefusal(
                "bad_authorization",
                f"the stake authorization is not signed by {account} for exactly these values",
            )


async def serve_relay(channel: Channel, relay: ClaimRelay | None) -> None:
    """`/sogni/relay/1.0.0`: one `RelayClaim`, one answer, then the stream closes."""
    payload = await channel.receive_raw(limit=ids.RELAY_FRAME_LIMIT, timeout=REQUEST_TIMEOUT)
    request = decode(payload)  # InvalidMessage: the host logs and resets the stream
    answer: RelayDone | RelayRefused
    if not isinstance(request, RelayClaim):
        answer = RelayRefused(code="bad_request", reason="expected a relayClaim")
    elif relay is None:
        answer = RelayRefused(code="no_chain", reason="this coordinator has no settlement chain")
    else:
        try:
            answer = await relay.relay(request, sender=channel.remote_peer_id)
        except RelayRefusal as refusal:
            log.info("relay_refused", account=request.account, code=refusal.code)
            answer = refusal.message()
    await channel.send_raw(encode(answer), limit=ids.RELAY_FRAME_LIMIT, timeout=SEND_TIMEOUT)
