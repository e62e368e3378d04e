"""Deploy and wire the four contracts, and remember where they are.

``deploy_all`` is what a local network (embedded or anvil) runs once; the resulting
:class:`Addresses` file is what coordinators and nodes read afterwards. It carries the chain id
so a file written for one chain is never used against another.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from sogni_protocol.settings import DEV_CHAIN_IDS
from sogni_wallet.addresses import Addresses

from .chain import Chain, Signer
from .contracts import Distributor, License, Staking, Token
from .disputes import DisputeParams, Disputes, deploy_disputes
from .model_stake import ModelStake, deploy_model_stake

__all__ = [
    "DEV_ADMIN_TRANSFER_DELAY",
    "DEV_CLAIM_DELAY",
    "DEV_MAX_TOTAL_GROWTH",
    "LIVE_ADMIN_TRANSFER_DELAY",
    "LIVE_CLAIM_DELAY",
    "LIVE_MAX_TOTAL_GROWTH",
    "Addresses",
    "Deployment",
    "deploy_all",
    "deploy_defaults",
]

_SOGNI = 10**18
DEV_CLAIM_DELAY = 0
"""On dev chains a posted root is claimable at once."""
LIVE_CLAIM_DELAY = 24 * 3600
"""Elsewhere a root waits a day before claims use it: time to pause a bad one."""
DEV_MAX_TOTAL_GROWTH = 10**9 * _SOGNI
LIVE_MAX_TOTAL_GROWTH = 10**9 * _SOGNI
"""Generous caps on how much one epoch's root may add to the total (a stop against a runaway
or compromised settlement key, not an economic limit); governance tunes them."""
DEV_ADMIN_TRANSFER_DELAY = 0
LIVE_ADMIN_TRANSFER_DELAY = 2 * 24 * 3600
"""Seconds between beginning an admin handover and the new admin accepting it."""


def deploy_defaults(chain_id: int) -> dict[str, int]:
    """``claim_delay``, ``max_total_growth`` and ``admin_transfer_delay`` for a chain: the
    dev values on local dev chains (``DEV_CHAIN_IDS``), the live ones elsewhere."""
    if chain_id in DEV_CHAIN_IDS:
        return {
            "claim_delay": DEV_CLAIM_DELAY,
            "max_total_growth": DEV_MAX_TOTAL_GROWTH,
            "admin_transfer_delay": DEV_ADMIN_TRANSFER_DELAY,
        }
    return {
        "claim_delay": LIVE_CLAIM_DELAY,
        "max_total_growth": LIVE_MAX_TOTAL_GROWTH,
        "admin_transfer_delay": LIVE_ADMIN_TRANSFER_DELAY,
    }


class Deployment:
    """The four wrappers for one :class:`Addresses`, sharing a default sender."""

    def __init__(self, chain: Chain, addresses: Addresses, sender: Signer | None = None) -> None:
        if addresses.chain_id != chain.chain_id:
            raise ValueError(
                f"addresses are for chain {addresses.chain_id}, connected to {chain.chain_id}"
            )
        self.chain = chain
        self.addresses = addresses
        self.token = Token(chain, addresses.token, sender)
        self.staking = Staking(chain, addresses.staking, sender)
        self.license = License(chain, addresses.license, sender)
        self.distributor = Distributor(chain, addresses.distributor, sender)
        self.disputes = Disputes(chain, addresses.disputes, sender) if addresses.disputes else None
        ms = addresses.model_stake
        self.model_stake = ModelStake(chain, ms, sender) if ms else None

    def is_deployed(self) -> bool:
        """True when all four addresses hold code (a stale file after a chain reset has none)."""
        return all(
            len(self.chain.w3.eth.get_code(a)) > 0
            for a in (
                self.token.address,
                self.staking.address,
                self.license.address,
                self.distributor.address,
            )
        )


def deploy_all(
    chain: Chain,
    treasury: Signer,
    *,
    governance: Signer | None = None,
    coordinator: Signer | None = None,
    slasher: Signer | None = None,
    distributor_funding: int = 0,
    path: str | Path | None = None,
    claim_delay: int | None = None,
    max_total_growth: int | None = None,
    admin_transfer_delay: int | None = None,
    disputes: DisputeParams | None = None,
    governed: bool = False,
    guardian: Signer | None = None,
) -> Addresses:
    """Deploy SogniToken, Staking, WorkerLicense and RewardDistributor and wire them.

    - the whole token supply goes to ``treasury`` (which must be able to sign, to fund);
    - ``governance`` (default: the treasury) deploys everything and is the single
      DEFAULT_ADMIN_ROLE holder of staking, licence and distributor (tier minimums, slashing,
      licence minting/blacklisting, pausing claims, claim delay, growth cap), handed over in
      two steps ``admin_transfer_delay`` seconds apart;
    - ``coordinator`` (default: governance) gets SETTLEMENT_ROLE on the distributor: the key
      that posts roots (ideally its own key, not the coordinator's online offer key);
    - ``slasher``, if given, gets SLASHER_ROLE on staking; with ``disputes`` (its parameters)
      Disputes.sol is deployed too, holds Staking's SLASHER_ROLE and ``slasher`` proposes
      slashes there (executed after the dispute window); ``coordinator`` signs refusals;
    - ``distributor_funding`` SOGNI move from the treasury to the distributor;
    - on dev chains the settlement key also gets AIRDROP_ROLE (season prizes; elsewhere
      governance grants it), each season's cap still set by governance (``setAirdropCap``);
    - ``guardian`` gets the distributor's GUARDIAN_ROLE (pause claims, nothing else; the
      admin unpauses); on dev chains it defaults to governance (the deployer);
    - slashed stake goes to the treasury;
    - ``claim_delay`` (seconds before a posted root is claimable), ``max_total_growth`` (cap
      on how much one root's total may exceed the previous one's) and
      ``admin_transfer_delay`` default to :func:`deploy_defaults` for the chain: 0, 10**9
      SOGNI and 0 on dev chains; 1 day, 10**9 SOGNI and 2 days elsewhere.

    With ``path`` the addresses are also saved there. ``governed``: stakers' Governor and
    timelock take over staking's and the distributor's admin (``sogni_chain.governance``;
    its addresses go to ``<path stem>.governance.json``).
    """
    defaults = deploy_defaults(chain.chain_id)
    delay = defaults["claim_delay"] if claim_delay is None else claim_delay
    cap = defaults["max_total_growth"] if max_total_growth is None else max_total_growth
    admin_delay = (
        defaults["admin_transfer_delay"] if admin_transfer_delay is None else admin_transfer_delay
    )
    gov = governance if governance is not None else treasury
    gov_addr = chain.address_of(gov)
    treasury_addr = chain.address_of(treasury)
    settlement = chain.address_of(coordinator) if coordinator is not None else gov_addr

    token_tx = chain.deploy("SogniToken", treasury_addr, sender=gov)
    token = token_tx.contract_address
    staking = chain.deploy(
        "Staking", token, gov_addr, treasury_addr, admin_delay, sender=gov
    ).contract_address
    license_ = chain.deploy("WorkerLicense", gov_addr, admin_delay, sender=gov).contract_address
    distributor = chain.deploy(
        "RewardDistributor",
        token,
        staking,
        gov_addr,
        settlement,
        admin_delay,
        delay,
        cap,
        sender=gov,
    ).contract_address
    assert token and staking and license_ and distributor  # set by Chain.deploy
    # the distributor keeps its claimed counters in the token (balance and claimed in one
    # slot); the deployer binds it, once
    bound = Token(chain, token, gov)
    bound.set_distributor(distributor)
    if bound.distributor() != distributor:
        raise RuntimeError(f"token {token} is bound to {bound.distributor()}, not {distributor}")

    addresses = Addresses(
        chain_id=chain.chain_id,
        token=token,
        staking=staking,
        license=license_,
        distributor=distributor,
        deployed_at_block=token_tx.block_number,
        model_stake=deploy_model_stake(chain, token, sender=gov),
    )
    if disputes is not None:  # slashes go through Disputes' window; it alone slashes Staking
        addresses = replace(
            addresses,
            disputes=deploy_disputes(
                chain,
                token=token,
                staking=staking,
                governance=gov,
                treasury=treasury,
                slasher=slasher,
                reporters=(settlement,),
                params=disputes,
                admin_transfer_delay=admin_delay,
            ),
        )
    elif slasher is not None:
        Staking(chain, staking, gov).grant_role("SLASHER_ROLE", slasher)
    if distributor_funding:
        Token(chain, token, treasury).transfer(distributor, distributor_funding)
    if chain.chain_id in DEV_CHAIN_IDS:  # a local network pays its seasons' prizes itself
        Distributor(chain, distributor, gov).grant_role("AIRDROP_ROLE", settlement)
    if guardian is not None or chain.chain_id in DEV_CHAIN_IDS:  # fast pause, no proposal
        Distributor(chain, distributor, gov).grant_role(
            "GUARDIAN_ROLE", guardian if guardian is not None else gov
        )
    if governed:
        from .governance import deploy_governance, governance_path

        deploy_governance(chain, addresses, gov, path=governance_path(path) if path else None)
    if path is not None:
        addresses.save(path)
    return addresses


def main(argv: list[str] | None = None, *, debug: bool = False) -> int:
    """Deploy to a dev chain with its default accounts and write the addresses file.

    Account 0 is treasury and governance, account 1 the coordinator (settlement role).
    Nothing listening at the url, or a bad addresses file, is one line and exit 4
    (`sogni_protocol.cli_errors`).
    """
    from sogni_protocol.cli_errors import debug_requested, run

    return run(lambda: _deploy_main(argv), debug=debug or debug_requested([]))


def _deploy_main(argv: list[str] | None) -> int:
    import argparse

    from .chain import connect

    parser = argparse.ArgumentParser(description="Deploy the Sogni contracts to a dev chain.")
    parser.add_argument("--url", default="http://127.0.0.1:8545", help="JSON-RPC url")
    parser.add_argument("--out", default=".cache/addresses.json", help="addresses file")
    parser.add_argument(
        "--fund-distributor", type=int, default=1_000_000, help="SOGNI moved to the distributor"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep an existing addresses file if its code exists"
    )
    parser.add_argument(
        "--claim-delay",
        type=int,
        default=None,
        help="seconds before a posted root is claimable (default: 0 on dev chains, else 1 day)",
    )
    parser.add_argument(
        "--max-total-growth",
        type=int,
        default=None,
        help="whole SOGNI one epoch's root may add to the total (default: 10**9)",
    )
    parser.add_argument(
        "--governed", action="store_true", help="also deploy stakers' Governor and timelock"
    )
    parser.add_argument(
        "--guardian", default=None, help="address that may pause claims (default: the deployer)"
    )
    args = parser.parse_args(argv)
    chain = connect(args.url)
    if args.reuse and Path(args.out).is_file():
        existing = Addresses.load(args.out, chain_id=chain.chain_id)
        if Deployment(chain, existing).is_deployed():
            print(f"already deployed: {args.out}")
            return 0
    treasury, coordinator = chain.accounts[0], chain.accounts[1]
    addresses = deploy_all(
        chain,
        treasury,
        coordinator=coordinator,
        distributor_funding=args.fund_distributor * 10**18,
        path=args.out,
        claim_delay=args.claim_delay,
        max_total_growth=None if args.max_total_growth is None else args.max_total_growth * _SOGNI,
        governed=args.governed,
        guardian=args.guardian,
    )
    print(json.dumps(asdict(addresses), indent=2, sort_keys=True))
    return 0
