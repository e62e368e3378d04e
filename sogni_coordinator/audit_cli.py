"""`sogni-coordinator epoch audit`: recompute a published epochs folder, optionally against
the chain.

The files alone (`sogni_protocol.epoch_audit`) prove that every payout follows from signed
receipts, signed offers, payer authorizations and the published rules, and that the roots are
the trees of those payouts. With a chain (`--chain-url`) it also checks that those roots,
receipts hashes and totals are what the distributor holds, that the stake snapshot each
batch states (which sets its take rates) is what the staking contract held at that block, and,
when the addresses file names a Disputes contract, that each restoration (a won dispute's pay)
is for a refusal case its worker won there: the files alone cannot tell a won case from an
invented one.

Deliberately imports nothing from `chain_cli` (which registers this command: importing back
would be an import cycle); it uses the same building blocks (config loader, `connect`, the
addresses file, `Deployment`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer

from sogni_protocol.airdrop import airdrop_season
from sogni_protocol.cli_errors import BadUsage, Refused, Unavailable
from sogni_protocol.epoch_audit import (
    AuditedEpoch,
    AuditReport,
    PublishedFolderError,
    iter_published,
)
from sogni_protocol.epoch_files import epoch_filename
from sogni_protocol.settings import READ_ONLY_SENDER

if TYPE_CHECKING:
    from sogni_chain import Chain, Distributor, Staking
    from sogni_chain.disputes import Case
    from sogni_coordinator.config import CoordinatorConfig

__all__ = ["ChainCheck", "audit", "check_chain"]


class Contracts(Protocol):
    """What the chain check reads: a `sogni_chain.Deployment` is one (with its `disputes`,
    if deployed: see `CaseReader`)."""

    distributor: Distributor
    staking: Staking


class CaseReader(Protocol):
    """What the restoration check reads: `sogni_chain.disputes.Disputes` is one."""

    @property
    def address(self) -> str: ...

    def case(self, case_id: bytes) -> Case: ...


@dataclass
class _Contracts:
    distributor: Distributor
    staking: Staking


@dataclass
class ChainCheck:
    """The published epochs against the distributor and the staking contract."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    epochs: int = 0
    """Epochs whose root, receiptsHash (and total) were compared."""
    stakes: int = 0
    """Stake snapshot entries compared."""
    cases: int = 0
    """Restorations compared with their dispute case on the Disputes contract."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "epochs": self.epochs,
            "stakes": self.stakes,
            "cases": self.cases,
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


def check_chain(audited: Sequence[AuditedEpoch], contracts: Contracts) -> ChainCheck:
    """Compare each readable epoch's root, receiptsHash and total with the distributor's, and
    every stake its batch states with the staking contract's at the batch's stake block.

    With a Disputes contract (`contracts.disputes`, a `Deployment`'s when deployed) each
    restoration must name a refusal case its worker won there (`_restoration_problem`);
    without one, batches paying restorations get a note that they were not checked.

    An epoch file the chain has no root for is a note when it is the last one (planned, not
    posted yet), a problem otherwise; a root posted with no epoch file is a problem (a payout
    nobody can audit). One problem per epoch: the first found.
    """
    check = ChainCheck()
    dist, staking = contracts.distributor, contracts.staking
    disputes: CaseReader | None = getattr(contracts, "disputes", None)
    payouts = _payout_addresses(audited)
    if disputes is None and any(a.batch is not None and a.batch.restorations for a in audited):
        check.notes.append(
            "restorations (won disputes) not checked: no Disputes contract is named (pass "
            "--config with the addresses file that names it)"
        )
    last = max((a.audit.epoch for a in audited), default=0)
    total_of = getattr(dist, "total_of", None)
    if total_of is None:
        check.notes.append("totalOf not checked: this sogni_chain's Distributor has no total_of")
    for a in audited:
        ef, n = a.file, a.audit.epoch
        if ef is None:
            continue
        where = epoch_filename(n)
        onchain = dist.root_of(n)
        if onchain is None:
            if n == last:
                check.notes.append(f"epoch {n}: not on chain yet (planned, or posting failed)")
            else:
                check.problems.append(
                    f"epoch {n}: the distributor has no root for it, though later epochs are "
                    "published"
                )
            continue
        check.epochs += 1
        if "0x" + onchain.hex() != ef.root.lower():
            check.problems.append(
                f"epoch {n}: {where}: root is {ef.root}, the distributor's rootOf({n}) is "
                f"0x{onchain.hex()}"
            )
            continue
        posted_hash = "0x" + dist.receipts_hash_of(n).hex()
        if posted_hash != ef.receipts_hash.lower():
            check.problems.append(
                f"epoch {n}: {where}: receiptsHash is {ef.receipts_hash}, the distributor's "
                f"receiptsHashOf({n}) is {posted_hash}"
            )
            continue
        season_of = getattr(dist, "airdrop_season_of", None)
        if season_of is not None:  # a work epoch must not pass for an airdrop, nor back
            said, posted = airdrop_season(ef.receipts_file) or 0, int(season_of(n))
            if said != posted:
                check.problems.append(
                    f"epoch {n}: {where}: it is "
                    + (f"season {said}'s airdrop" if said else "a work epoch")
                    + ", the distributor posted it as "
                    + (f"season {posted}'s airdrop" if posted else "a work epoch")
                )
                continue
        if total_of is not None:
            posted_total = int(total_of(n))
            if str(posted_total) != ef.total:
                check.problems.append(
                    f"epoch {n}: {where}: total is {ef.total}, the distributor's totalOf({n}) "
                    f"is {posted_total}"
                )
                continue
        problem = _stake_problem(a, staking, check)
        if problem is None and disputes is not None:
            problem = _restoration_problem(a, disputes, payouts, check)
        if problem is not None:
            check.problems.append(problem)
    posted = dist.latest_epoch()
    if posted > last:
        check.problems.append(
            f"epoch {last + 1}: the distributor has roots up to epoch {posted}, the folder's "
            f"files stop at epoch {last} (a posted root nobody can audit)"
        )
    return check


def _stake_problem(a: AuditedEpoch, staking: Staking, check: ChainCheck) -> str | None:
    batch = a.batch
    if batch is None or batch.stake_block is None:
        return None
    block = batch.stake_block
    for worker, stated in sorted(batch.stakes.items()):
        onchain = staking.active_stake(worker, block=block)
        check.stakes += 1
        if str(onchain) != stated:
            return (
                f"epoch {a.audit.epoch}: receipts file {a.file.receipts_file if a.file else '?'}: "
                f"worker {worker}: stake at block {block} is {stated} in the batch, "
                f"{onchain} on chain (its take rate rests on it)"
            )
    return None


def _payout_addresses(audited: Sequence[AuditedEpoch]) -> dict[str, set[str]]:
    """Worker (lowercase) -> the payout addresses its signed receipts in the batches name."""
    out: dict[str, set[str]] = {}
    for a in audited:
        for e in a.batch.receipts if a.batch is not None else []:
            if e.payout is not None:
                out.setdefault(e.worker.lower(), set()).add(e.payout.lower())
    return out


def _restoration_problem(
    a: AuditedEpoch, disputes: CaseReader, payouts: dict[str, set[str]], check: ChainCheck
) -> str | None:
    """The first restoration of the epoch's batch that no refusal case won by its worker on
    `disputes` justifies: an unknown case, a slash, a case not (yet) won by the worker.

    The payee is the case's worker, or a payout address one of that worker's signed receipts
    in the batches names; any other payee (a worker whose receipts never reached a batch) is
    a note: the refused receipt that names it is not published."""
    from sogni_chain.disputes import CaseState

    batch = a.batch
    if batch is None:
        return None
    where = f"epoch {a.audit.epoch}: receipts file {a.file.receipts_file if a.file else '?'}"
    for r in batch.restorations:
        try:
            case_id = bytes.fromhex(r.case_id.removeprefix("0x"))
        except ValueError:
            continue  # the file audit names a malformed case id
        if len(case_id) != 32:
            continue
        case = disputes.case(case_id)
        check.cases += 1
        if case.kind != "refusal":
            what = "no case" if case.kind == "none" else f"a {case.kind} case"
            return (
                f"{where}: restoration of case {r.case_id} pays {r.payee}, but it is {what} on "
                f"Disputes {disputes.address}, not a disputed refusal"
            )
        if case.state is not CaseState.WORKER_WON:
            return (
                f"{where}: restoration of case {r.case_id} pays {r.payee}, but the case is "
                f"{case.state.label} on Disputes {disputes.address}, not won by its worker"
            )
        payee, worker = r.payee.lower(), case.worker.lower()
        if payee != worker and payee not in payouts.get(worker, set()):
            check.notes.append(
                f"{where}: restoration of case {r.case_id} pays {r.payee}, the case's worker "
                f"is {case.worker}: no published receipt of that worker names {r.payee} as "
                "its payout address, so the chain cannot tie them"
            )
    return None


# --- the command ----------------------------------------------------------------------------
def audit(
    published: Annotated[
        Path,
        typer.Option(
            "--published",
            help="The coordinator's publish folder (epoch-NNNNNN.json, receipts/).",
        ),
    ],
    chain_url: Annotated[
        str | None,
        typer.Option(
            "--chain-url",
            help="JSON-RPC url: also check roots, receipts hashes, totals and stake snapshots "
            "on chain (default: config chain_url, if --config is given).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file (its addresses file).", exists=True),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Recompute every published epoch from its files (and check them against the chain).

    Exits 0 when everything recomputes, 3 naming the first mismatch, 4 when the folder or the
    chain cannot be read. See docs/AUDIT.md.
    """
    cfg = _load_config(config) if config is not None else None
    try:
        audited = list(iter_published(published))
    except PublishedFolderError as exc:
        raise Unavailable(str(exc), "pass the coordinator's publish folder") from None
    report = AuditReport.of(a.audit for a in audited)

    url = chain_url or (cfg.chain_url if cfg is not None else None)
    chain_check: ChainCheck | None = None
    if url is not None:
        chain_check = _check_against_chain(audited, url, cfg)

    problems = report.problems + (chain_check.problems if chain_check else [])
    if as_json:
        out = report.as_json()
        out["chain"] = chain_check.as_json() if chain_check is not None else None
        out["ok"] = not problems
        out["firstProblem"] = problems[0] if problems else None
        typer.echo(json.dumps(out, indent=2))
    else:
        _print_table(published, report, chain_check)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise Refused(
            problems[0] + more,
            "the published epochs do not recompute: see docs/AUDIT.md",
        )


def _print_table(folder: Path, report: AuditReport, chain_check: ChainCheck | None) -> None:
    for e in report.epochs:
        state = "ok" if e.problem is None else "MISMATCH"
        typer.echo(
            f"epoch {e.epoch:>6}  {e.receipts:>6} receipts  total {e.total:>28}  "
            f"{e.root or '-'}  {state}"
        )
    if chain_check is not None:
        for note in chain_check.notes:
            typer.echo(f"note: {note}")
        typer.echo(
            f"chain: {chain_check.epochs} roots, {chain_check.stakes} stakes and "
            f"{chain_check.cases} dispute cases compared, {len(chain_check.problems)} mismatches"
        )
    if report.ok and (chain_check is None or chain_check.ok):
        where = "files and chain" if chain_check is not None else "files"
        typer.echo(f"audit ok: {len(report.epochs)} epochs of {folder} recompute ({where})")


def _load_config(path: Path) -> CoordinatorConfig:
    from sogni_coordinator.cli_config import load_cli_config
    from sogni_protocol.logs import configure_logging

    cfg = load_cli_config(path)
    configure_logging(cfg.log_level, json=cfg.log_json, capture_warnings=False)
    return cfg


def _check_against_chain(
    audited: list[AuditedEpoch], url: str, cfg: CoordinatorConfig | None
) -> ChainCheck:
    from web3.exceptions import Web3Exception

    files = [a.file for a in audited if a.file is not None]
    if not files:
        raise Refused("no epoch file could be read: nothing to compare with the chain")
    chain_id, distributor = files[0].chain_id, files[0].distributor
    chain = _connect(url)
    try:
        if chain.chain_id != chain_id:
            raise BadUsage(
                f"the chain at {url} is chain {chain.chain_id}, the epochs were settled on "
                f"chain {chain_id}",
                "point --chain-url at that chain",
            )
        contracts = _contracts(chain, distributor, cfg)
        return check_chain(audited, contracts)
    except (OSError, Web3Exception) as exc:
        raise Unavailable(
            f"the chain at {url} did not answer: {' '.join(str(exc).split())}",
            "check the url; stake snapshots at old blocks need an archive node",
        ) from None


def _connect(url: str) -> Chain:
    """`connect` to a shared chain: the embedded one has no history to check against."""
    from sogni_chain import connect

    if url == "embedded":
        raise BadUsage(
            "the embedded chain lives only inside one process: nothing to audit against",
            "pass the JSON-RPC url of the chain the epochs were posted on",
        )
    try:
        return connect(url, keys=[])  # reads only: no keys, on any chain
    except ConnectionError:
        raise
    except ValueError as exc:
        raise BadUsage(str(exc), "use http(s)://host:port") from exc


def _contracts(chain: Chain, distributor: str, cfg: CoordinatorConfig | None) -> Contracts:
    """The distributor the epochs were settled on and its staking contract: from the
    coordinator's addresses file with a config (which must name that distributor), else the
    distributor's own `staking()`."""
    from eth_utils import to_checksum_address

    from sogni_chain import Addresses, Deployment, Distributor, Staking

    if cfg is not None:
        path = (
            cfg.addresses_file
            if cfg.addresses_file is not None
            else cfg.data_dir / "addresses.json"
        )
        addresses = Addresses.load(path, chain_id=chain.chain_id)  # AddressesFileError: exit 4
        if addresses.distributor.lower() != distributor.lower():
            raise Refused(
                f"the epochs were settled on distributor {distributor}, the addresses file "
                f"{path} names {addresses.distributor}",
                "audit with the config of the coordinator that published them",
            )
        deployment = Deployment(chain, addresses, sender=READ_ONLY_SENDER)
        if not deployment.is_deployed():
            raise Unavailable(
                f"no contracts at the addresses in {path} (was the chain reset?)",
                "point --chain-url at the chain the epochs were posted on",
            )
        return deployment
    if not chain.w3.eth.get_code(to_checksum_address(distributor)):
        raise Unavailable(
            f"no distributor contract at {distributor} on chain {chain.chain_id} "
            "(was the chain reset?)",
            "point --chain-url at the chain the epochs were posted on",
        )
    dist = Distributor(chain, distributor, READ_ONLY_SENDER)
    staking_address = chain.call(dist.contract.functions.staking())
    return _Contracts(dist, Staking(chain, staking_address, READ_ONLY_SENDER))
