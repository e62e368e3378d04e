"""`sogni dispute`: stakers judge workers' disputes (contracts/src/Disputes.sol).

Why commit-reveal: a vote is sent as a hash first, so a later juror cannot copy the early
ones; `vote` keeps the salt in the user's data dir (``disputes/votes.json``, mode 0600) so
`reveal` can open the vote once the commit window closes. A vote never revealed does not
count and earns nothing. `JurorClient` holds the logic (tests drive it on the embedded
chain); the typer commands only connect and print.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sogni_app.chain_cli_common import format_sogni, format_when, keystore_signer
from sogni_protocol.cli_errors import BadUsage, Refused, Unavailable
from sogni_protocol.settings import READ_ONLY_SENDER
from sogni_wallet.addresses import Addresses

if TYPE_CHECKING:  # `sogni --help` imports no web3 (tests/cli/test_bare_install.py)
    from sogni_chain import Chain, Signer
    from sogni_chain.disputes import Case, Disputes

__all__ = ["JurorClient", "SaltBox", "dispute_app"]


dispute_app = typer.Typer(
    help="Disputes: stakers judge workers' appeals against refusals and slashes.",
    no_args_is_help=True,
)

RpcOpt = Annotated[
    str, typer.Option("--rpc", envvar="SOGNI_CHAIN_URL", help="JSON-RPC url of the chain.")
]
AddressesOpt = Annotated[
    Path, typer.Option("--addresses", envvar="SOGNI_ADDRESSES", help="Addresses file.")
]
KeystoreOpt = Annotated[
    Path,
    typer.Option("--keystore", envvar="SOGNI_KEYSTORE", help="Juror wallet: a keystore v3 file."),
]
PasswordEnvOpt = Annotated[
    str,
    typer.Option("--password-env", help="Env var holding the keystore password (else a prompt)."),
]
DataDirOpt = Annotated[
    Path,
    typer.Option("--data-dir", envvar="SOGNI_CLIENT_DIR", help="Where vote salts are kept."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
CaseArg = Annotated[str, typer.Argument(help="Case id (or a unique prefix, from `list`).")]
DEFAULT_RPC = "http://127.0.0.1:8545"
DEFAULT_ADDRESSES = Path(".cache/addresses.json")
DEFAULT_KEYSTORE = Path("~/.sogni/client/payer.json")
DEFAULT_DATA_DIR = Path("~/.sogni/client")


class SaltBox:
    """Vote salts by (chain, contract, case, juror), in one JSON file readable only by the
    user: losing it loses the reveal (and the reward), leaking it only reveals the vote."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir.expanduser() / "disputes" / "votes.json"

    def _read(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise Refused(f"cannot read the saved votes {self.path}: {exc}") from None
        return raw if isinstance(raw, dict) else {}

    @staticmethod
    def key(chain_id: int, contract: str, case_id: bytes, juror: str) -> str:
        return f"{chain_id}:{contract.lower()}:0x{case_id.hex()}:{juror.lower()}"

    def put(self, key: str, for_worker: bool, salt: bytes) -> None:
        votes = self._read()
        votes[key] = {"forWorker": for_worker, "salt": "0x" + salt.hex()}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(votes, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def get(self, key: str) -> tuple[bool, bytes] | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict):
            return None
        return bool(entry["forWorker"]), bytes.fromhex(str(entry["salt"])[2:])


@dataclass
class JurorClient:
    """One chain's Disputes contract, seen by one juror."""

    chain: Chain
    disputes: Disputes
    salts: SaltBox
    account: Signer | None = None
    from_block: int = 0

    def _me(self) -> Signer:
        if self.account is None:
            raise BadUsage("this command signs: give --keystore")
        return self.account

    def case(self, ident: str) -> Case:
        return self.disputes.case(self._find(ident))

    def _find(self, ident: str) -> bytes:
        from sogni_chain.disputes import DisputeRefused, find_case

        try:
            return find_case(self.disputes, ident, self.from_block)
        except DisputeRefused as exc:
            raise BadUsage(str(exc)) from None

    def cases(self) -> list[Case]:
        return [self.disputes.case(c) for c in self.disputes.case_ids(self.from_block)]

    def _key(self, case_id: bytes) -> str:
        me = self.chain.address_of(self._me())
        return SaltBox.key(self.chain.chain_id, self.disputes.address, case_id, me)

    def vote(self, ident: str, for_worker: bool) -> Case:
        """Commit a vote; the salt is saved before the transaction is sent."""
        from sogni_chain import ChainRevert
        from sogni_chain.disputes import DisputeRefused, check_commit, new_salt

        case_id, me = self._find(ident), self._me()
        try:
            check_commit(self.disputes, case_id, me)
        except DisputeRefused as exc:
            raise Refused(str(exc)) from None
        salt = new_salt()
        self.salts.put(self._key(case_id), for_worker, salt)
        try:
            self.disputes.commit_vote(case_id, for_worker, salt, sender=me)
        except ChainRevert as exc:
            raise Refused(f"the vote was refused: {exc}") from None
        return self.disputes.case(case_id)

    def reveal(self, ident: str) -> Case:
        from sogni_chain import ChainRevert
        from sogni_chain.disputes import DisputeRefused, check_reveal

        case_id, me = self._find(ident), self._me()
        saved = self.salts.get(self._key(case_id))
        try:
            check_reveal(self.disputes, case_id, me)
        except DisputeRefused as exc:
            raise Refused(str(exc)) from None
        if saved is None:
            raise Refused(f"nothing to reveal: no saved vote for this case in {self.salts.path}")
        try:
            self.disputes.reveal_vote(case_id, saved[0], saved[1], sender=me)
        except ChainRevert as exc:
            raise Refused(f"the reveal was refused: {exc}") from None
        return self.disputes.case(case_id)

    def bundle(self, case: Case) -> tuple[str, dict[str, Any]] | None:
        """The case's published bundle, fetched and verified; None before voting opens and
        when the worker opened its stalled vote (on the original evidence: no bundle)."""
        if case.bundle_hash in (bytes(32), case.evidence_hash):
            return None
        uri = self.disputes.bundle_uri(case.case_id, self.from_block)
        if uri is None:
            raise Unavailable(f"no VotingOpened event names the bundle of 0x{case.case_id.hex()}")
        return uri, fetch_bundle(uri, case.bundle_hash)

    def claim(self, ident: str) -> int:
        from sogni_chain import ChainRevert

        case_id, me = self._find(ident), self._me()
        if self.disputes.reward_of(case_id, me) == 0:
            raise Refused("no reward: only majority jurors who revealed share a kept bond")
        try:
            tx = self.disputes.claim_reward(case_id, sender=me)
        except ChainRevert as exc:
            raise Refused(f"the claim was refused: {exc}") from None
        return int(tx.event("RewardClaimed")["amount"])


MAX_BUNDLE_BYTES = 4 * 1024 * 1024
"""A bundle is distances and verdicts, never latents: anything bigger is not one."""


def fetch_bundle(uri: str, expected: bytes) -> dict[str, Any]:
    """The evidence bundle published at `uri` (the reporter's HTTP route, or a file URI),
    checked against the keccak256 the contract holds: jurors judge exactly what was
    committed, not what a server says today."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from eth_hash.auto import keccak

    parsed = urllib.parse.urlparse(uri)
    try:
        if parsed.scheme in ("http", "https"):
            with urllib.request.urlopen(uri, timeout=10) as r:
                body = r.read(MAX_BUNDLE_BYTES + 1)
        elif parsed.scheme == "file":
            with open(urllib.request.url2pathname(parsed.path), "rb") as f:
                body = f.read(MAX_BUNDLE_BYTES + 1)
        else:
            raise Refused(f"the bundle URI {uri!r} is neither http(s) nor file")
    except urllib.error.HTTPError as exc:
        raise Unavailable(f"fetching the bundle from {uri} failed: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"cannot fetch the bundle from {uri}: {reason}") from None
    if len(body) > MAX_BUNDLE_BYTES:
        raise Refused(f"the bundle at {uri} is over {MAX_BUNDLE_BYTES} bytes: not a bundle")
    got = keccak(body)
    if got != expected:
        raise Refused(
            f"the bundle at {uri} hashes to 0x{got.hex()}, not the 0x{expected.hex()} on chain:"
            " do not judge on it"
        )
    try:
        bundle = json.loads(body)
    except ValueError:
        raise Refused(f"the bundle at {uri} matches its hash but is not JSON") from None
    if not isinstance(bundle, dict):
        raise Refused(f"the bundle at {uri} is not a JSON object")
    return bundle


def format_bundle(uri: str, bundle: dict[str, Any]) -> str:
    lines = [f"fetched   {uri} (keccak256 matches the chain)"]
    if bundle.get("reason"):
        lines.append(f"refused   {bundle['reason']}")
    for f in bundle.get("failures") or []:  # a slash's failed checks
        lines.append(
            f"failed    job {str(f.get('jobId'))[:18]}  {f.get('modelId')}  "
            f"{f.get('steps')} steps  {f.get('reason')}"
        )
    rechecks = bundle.get("rechecks") or []
    if not rechecks:
        lines.append("re-checks none (the vote is on the original evidence)")
    for r in rechecks:
        verdict = "passed" if r.get("passed") else "failed"
        lines.append(
            f"re-check  step {r.get('step')}  {r.get('verifier')}  distance {r.get('distance')}"
            f" / tolerance {r.get('tolerance')}  {verdict}"
        )
    return "\n".join(lines)


def case_dict(c: Case) -> dict[str, Any]:
    return {
        "caseId": "0x" + c.case_id.hex(),
        "kind": c.kind,
        "state": c.state.label,
        "worker": c.worker,
        "bond": str(c.bond),
        "amount": str(c.amount),
        "windowEnd": c.window_end,
        "evidenceDeadline": c.evidence_deadline,
        "voteBy": c.vote_by,
        "commitEnd": c.commit_end,
        "revealEnd": c.reveal_end,
        "snapshot": c.snapshot,
        "evidenceHash": "0x" + c.evidence_hash.hex(),
        "bundleHash": "0x" + c.bundle_hash.hex(),
        "forWorker": str(c.for_worker),
        "againstWorker": str(c.against_worker),
        "rewardPool": str(c.reward_pool),
    }


def _phase(c: Case, now: int) -> str:
    from sogni_chain.disputes import CaseState

    if c.state is CaseState.PROPOSED:
        return f"slash proposed; disputable until {format_when(c.window_end)}"
    if c.upheld_by_default(now):
        return (
            f"no vote was opened by {format_when(c.vote_by)}: upheld, anyone may resolve it"
        )
    if c.vote_stalled(now):
        return (
            f"the vote is not open: the worker (or anyone) may open it on the original "
            f"evidence until {format_when(c.vote_by)}, or the dispute is lost"
        )
    if c.state is CaseState.DISPUTED:
        return f"re-checking; voting opens by {format_when(c.evidence_deadline)}"
    if c.state is CaseState.VOTING:
        if now < c.commit_end:
            return f"voting until {format_when(c.commit_end)}"
        if now < c.reveal_end:
            return f"revealing until {format_when(c.reveal_end)}"
        return "voting over: anyone may resolve it"
    return c.state.label


def format_case(c: Case, now: int, *, long: bool = False) -> str:
    line = f"0x{c.case_id.hex()[:16]}  {c.kind:<7}  {c.worker}  {_phase(c, now)}"
    if not long:
        return line
    from sogni_chain.disputes import CaseState

    lines = [
        f"case      0x{c.case_id.hex()}",
        f"kind      {c.kind}" + (f" ({format_sogni(c.amount)} SOGNI of stake)" if c.amount else ""),
        f"worker    {c.worker}",
        f"state     {_phase(c, now)}",
        f"bond      {format_sogni(c.bond)} SOGNI",
        f"evidence  0x{c.evidence_hash.hex()}",
    ]
    if c.vote_by:
        lines.append(f"vote by   {format_when(c.vote_by)} (else the case is upheld)")
    if c.bundle_hash != bytes(32) and c.bundle_hash == c.evidence_hash:
        lines.append("bundle    none: the vote was opened on the original evidence")
    elif c.bundle_hash != bytes(32):
        lines.append(f"bundle    0x{c.bundle_hash.hex()} (with the re-checks)")
    if c.state in (CaseState.VOTING, CaseState.WORKER_WON, CaseState.WORKER_LOST):
        lines.append(
            f"votes     for the worker {format_sogni(c.for_worker)}, "
            f"against {format_sogni(c.against_worker)} (revealed, stake-weighted)"
        )
    return "\n".join(lines)


def _client(
    rpc: str, addresses_path: Path, keystore: Path | None, password_env: str, data_dir: Path
) -> JurorClient:
    from sogni_chain import connect
    from sogni_chain.disputes import Disputes

    try:
        chain = connect(rpc, keys=[])  # the juror's own key only (keystore_signer)
    except ValueError as exc:
        raise BadUsage(str(exc)) from None
    except ConnectionError as exc:
        raise Unavailable(str(exc), "start the chain or give --rpc") from None
    addresses = Addresses.load(addresses_path, chain_id=chain.chain_id)
    if addresses.disputes is None:
        raise Unavailable(f"{addresses_path} names no Disputes contract", "deploy it first")
    account = keystore_signer(chain, keystore, password_env)
    return JurorClient(
        chain,
        Disputes(chain, addresses.disputes, READ_ONLY_SENDER if account is None else account),
        SaltBox(data_dir),
        account,
        addresses.deployed_at_block,
    )


@dispute_app.command("list")
def list_cmd(
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """Every dispute and proposed slash: id, kind, worker, phase."""
    c = _client(rpc, addresses, None, "", data_dir)
    cases, now = c.cases(), c.chain.timestamp()
    if as_json:
        typer.echo(json.dumps([case_dict(x) for x in cases]))
    elif not cases:
        typer.echo("no disputes")
    else:
        for x in cases:
            typer.echo(format_case(x, now))


@dispute_app.command("show")
def show_cmd(
    case: CaseArg,
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: JsonOpt = False,
) -> None:
    """One case: windows, bond, the revealed votes, and the evidence bundle (fetched from the
    URI the coordinator published and checked against the hash on chain)."""
    c = _client(rpc, addresses, None, "", data_dir)
    found = c.case(case)
    fetched = c.bundle(found)
    if as_json:
        out = case_dict(found)
        if fetched is not None:
            out["bundleUri"], out["bundle"] = fetched
        typer.echo(json.dumps(out))
    else:
        typer.echo(format_case(found, c.chain.timestamp(), long=True))
        if fetched is not None:
            typer.echo(format_bundle(*fetched))


@dispute_app.command("vote")
def vote_cmd(
    case: CaseArg,
    for_worker: Annotated[
        bool | None,
        typer.Option("--for-worker/--against-worker", help="Side with the worker, or not."),
    ] = None,
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_KEYSTORE_PASSWORD",
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Commit a hidden vote (stake-weighted); reveal it with `reveal` after voting closes."""
    if for_worker is None:
        raise BadUsage("say --for-worker or --against-worker")
    c = _client(rpc, addresses, keystore, password_env, data_dir)
    found = c.vote(case, for_worker)
    typer.echo(
        f"voted {'for' if for_worker else 'against'} the worker on 0x{found.case_id.hex()[:16]} "
        f"(hidden); reveal between {format_when(found.commit_end)} "
        f"and {format_when(found.reveal_end)}: "
        f"sogni dispute reveal 0x{found.case_id.hex()[:16]}"
    )


@dispute_app.command("reveal")
def reveal_cmd(
    case: CaseArg,
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_KEYSTORE_PASSWORD",
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Open the vote you committed (an unrevealed vote does not count and earns nothing)."""
    c = _client(rpc, addresses, keystore, password_env, data_dir)
    found = c.reveal(case)
    typer.echo(
        f"revealed on 0x{found.case_id.hex()[:16]}: "
        f"for the worker {format_sogni(found.for_worker)}, "
        f"against {format_sogni(found.against_worker)} SOGNI of votes so far"
    )


@dispute_app.command("claim")
def claim_cmd(
    case: CaseArg,
    rpc: RpcOpt = DEFAULT_RPC,
    addresses: AddressesOpt = DEFAULT_ADDRESSES,
    keystore: KeystoreOpt = DEFAULT_KEYSTORE,
    password_env: PasswordEnvOpt = "SOGNI_KEYSTORE_PASSWORD",
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Take your share of a kept bond (majority jurors who revealed)."""
    c = _client(rpc, addresses, keystore, password_env, data_dir)
    typer.echo(f"claimed {format_sogni(c.claim(case))} SOGNI")
