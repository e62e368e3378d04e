"""The network signer set on the coordinator side: make it, show it, serve it.

`sogni-coordinator network signers sign` writes the operator-signed set of a network's
coordinator offer keys (`sogni_protocol.signer_set`) from the operator's keystore;
`... show` prints and checks one. Every coordinator of the network serves the file at
`GET /v1/network/signers` (`signer_set_routes`) and in the libp2p `Welcome` to nodes that
read it (`WelcomeSet`), so nodes and operators can fetch the
current set from any of them; a node accepts it only if its configured operator signed it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sogni_coordinator.config import load_coordinator_config
from sogni_protocol.atomic import atomic_write_bytes
from sogni_protocol.cli_errors import Refused, register
from sogni_protocol.eip712 import Domain
from sogni_protocol.logs import get_logger
from sogni_protocol.signer_set import (
    MAX_FILE_BYTES,
    NetworkSignerSet,
    SignedSignerSet,
    SignerSetError,
    check_signer_set,
    decode_signer_set,
    encode_signer_set,
    sign_signer_set,
)
from sogni_wallet.keystore import unlock_wallet

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

__all__ = ["SIGNER_SET_FILE", "WelcomeSet", "app", "signer_set_routes"]

log = get_logger(__name__)

SIGNER_SET_FILE = "network_signers.json"
"""Where a coordinator keeps the set it serves, in its `data_dir`."""

register(SignerSetError, Refused, None)

app = typer.Typer(add_completion=False, help="The network's operator-signed signer set.")
signers_app = typer.Typer(add_completion=False, help="Sign or show a network signer set.")
app.add_typer(signers_app, name="signers")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", exists=True)
]


@signers_app.command("sign")
def sign_cmd(
    signers: Annotated[list[str], typer.Argument(help="Coordinator offer-key addresses.")],
    operator_keystore: Annotated[
        Path, typer.Option("--operator-keystore", help="The network operator's keystore.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The set file to write.")],
    serial: Annotated[
        int, typer.Option("--serial", help="0: one more than the set in --out, else 1.")
    ] = 0,
    password_env: Annotated[
        str, typer.Option("--password-env", help="Env var holding the keystore password.")
    ] = "SOGNI_OPERATOR_PASSWORD",
    config: ConfigOpt = None,
) -> None:
    """Sign the set of `signers` for this coordinator's network, chain and distributor."""
    cfg = load_coordinator_config(config)
    domain = Domain(cfg.chain_id, cfg.verifying_contract)
    if serial <= 0:
        serial = 1
        if out.exists():
            serial = decode_signer_set(out.read_bytes()).set.serial + 1
    wallet = unlock_wallet(
        operator_keystore, password_env, create_hint="sogni-coordinator keys create"
    )
    try:
        unsigned = NetworkSignerSet(
            network_id=cfg.network_id,
            serial=serial,
            signers=[s.strip() for s in signers],
            issued_at=int(time.time()),
        )
        signed = sign_signer_set(wallet.private_key, domain, unsigned)
        fault = check_signer_set(domain, signed, [signed.operator], cfg.network_id)
    except (ValueError, TypeError) as exc:
        raise SignerSetError(str(exc)) from None
    if fault is not None:  # e.g. a malformed address
        raise SignerSetError(fault)
    atomic_write_bytes(out, encode_signer_set(signed))
    typer.echo(
        f"signed set {serial} of network {cfg.network_id}: {len(signers)} signers, "
        f"operator {signed.operator} -> {out}"
    )


@signers_app.command("show")
def show_cmd(
    path: Annotated[Path, typer.Argument(help="A signer set file.")],
    operator: Annotated[
        list[str] | None, typer.Option("--operator", help="Expected operator (repeatable).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Print a set as JSON and check it (exit 3 if it does not verify)."""
    cfg = load_coordinator_config(config)
    signed = decode_signer_set(path.read_bytes())
    domain = Domain(cfg.chain_id, cfg.verifying_contract)
    fault = check_signer_set(domain, signed, operator or [signed.operator], cfg.network_id)
    typer.echo(json.dumps({"valid": fault is None, "problem": fault, **_summary(signed)}))
    if fault is not None:
        raise typer.Exit(3)


def _summary(signed: object) -> dict[str, object]:
    from msgspec import to_builtins

    data = to_builtins(signed)
    assert isinstance(data, dict)
    return data


class WelcomeSet:
    """The set this coordinator puts in each `Welcome` (its `data_dir/network_signers.json`,
    as served over HTTP): read again when the file changes (an operator replaces it while the
    coordinator runs), None while there is none or it does not decode (one log line per
    change). Not checked against an operator here: the node does that."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._set: SignedSignerSet | None = None

    def get(self) -> SignedSignerSet | None:
        """Blocking (a stat, a read when it changed): call it off the trio thread."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._seen:
                with self.path.open("rb") as f:
                    data = f.read(MAX_FILE_BYTES + 1)
                self._seen, self._set = stamp, None
                self._set = decode_signer_set(data)
        except FileNotFoundError:
            self._seen = self._set = None
        except (OSError, SignerSetError) as exc:
            log.error("signer_set_not_served", path=str(self.path), error=str(exc)[:200])
        return self._set


def signer_set_routes(path: Path | None) -> list[BaseRoute]:
    """`GET /v1/network/signers`: the set file as it is (404 without one)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def serve(request: Request) -> Response:
        try:
            if path is None:
                raise FileNotFoundError
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
            decode_signer_set(data)  # never serve what no node would accept to read
        except (OSError, SignerSetError):
            return JSONResponse(
                {"error": "no_signer_set", "reason": "this coordinator serves no signer set"},
                status_code=404,
            )
        return Response(data, media_type="application/json")

    return [Route("/v1/network/signers", serve, methods=["GET"])]
