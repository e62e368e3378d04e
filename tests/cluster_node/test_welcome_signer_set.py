"""The network signer set carried in the libp2p `Welcome` (real libp2p on 127.0.0.1, real
node, in-process coordinators): a node configured with only the operator's address learns
the set from the coordinators themselves, keeps the highest serial, and refuses a set the
operator did not sign or an older one, each in one log line. A node that does not say it
reads the field (one that predates it) gets a `Welcome` without it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from eth_account import Account
from structlog.testing import capture_logs

from sogni_coordinator.network_signers import SIGNER_SET_FILE
from sogni_net import open_host
from sogni_node.config import NodeConfig
from sogni_node.daemon import run_node
from sogni_protocol.eip712 import Domain
from sogni_protocol.ids import CONTROL_FRAME_LIMIT
from sogni_protocol.messages import Welcome, decode, encode
from sogni_protocol.signer_set import (
    NetworkSignerSet,
    decode_signer_set,
    encode_signer_set,
    sign_signer_set,
)
from sogni_wallet.keystore import Wallet
from tests.e2e.conftest import MODEL, Net, send_node_hello, start_net, until

pytestmark = pytest.mark.filterwarnings("ignore")


def _set(key: bytes, domain: Domain, signers: list[str], serial: int) -> bytes:
    unsigned = NetworkSignerSet(
        network_id="sogni-local", serial=serial, signers=signers, issued_at=int(time.time())
    )
    return encode_signer_set(sign_signer_set(key, domain, unsigned))


def _serve(net: Net, data: bytes) -> None:
    (net.config.data_dir / SIGNER_SET_FILE).write_bytes(data)


def test_a_welcome_without_a_set_is_the_same_bytes_as_before_the_field() -> None:
    op = Account.create()
    domain = Domain(31337, "0x" + "ab" * 20)
    plain = Welcome(
        coordinator=op.address,
        chain_id=domain.chain_id,
        verifying_contract=domain.verifying_contract,
        heartbeat_interval=5.0,
    )
    assert b"signerSet" not in encode(plain)  # an older node decodes it as before
    signed = decode_signer_set(_set(bytes(op.key), domain, [op.address], 3))
    carried = msgspec.structs.replace(plain, signer_set=signed)
    back = decode(encode(carried))
    assert isinstance(back, Welcome) and back.signer_set == signed
    assert decode(encode(plain)) == plain


async def test_a_node_takes_the_set_from_the_welcome_and_refuses_cheats(
    tmp_path: Path, backend: Any
) -> None:
    operator, stranger = Account.create(), Account.create()
    with capture_logs() as logs:
        async with (
            start_net(tmp_path / "a") as a,
            start_net(tmp_path / "b") as b,
            start_net(tmp_path / "c") as c,
            start_net(tmp_path / "d") as d,
            open_host(key_path=None, listen=()) as old_host,
            trio.open_nursery() as nursery,
        ):
            domain = a.domain
            addrs = [n.signer.address for n in (a, b, c)]
            _serve(a, _set(bytes(operator.key), domain, addrs[:2], serial=2))  # a, b
            # a node that does not name the feature (an older one) gets no set
            channel = await send_node_hello(old_host, a, Account.create())
            welcome = await channel.receive(limit=CONTROL_FRAME_LIMIT, timeout=10)
            assert isinstance(welcome, Welcome) and welcome.signer_set is msgspec.UNSET
            await channel.close()

            acct = Account.create()
            config = NodeConfig(
                data_dir=tmp_path / "node",
                coordinators=[n.addr for n in (a, b, c, d)],
                trusted_coordinators=[],  # no key, no file, no URL: only the Welcome
                network_operators=[operator.address],
                threads=1,
                heartbeat_interval=0.5,
                heartbeat_timeout=2.0,
                http_listen="off",
            )
            stop = trio.Event()

            async def run() -> None:
                await run_node(
                    config, Wallet(acct.address, bytes(acct.key)), backend, [MODEL], stop=stop
                )

            def joined(net: Net) -> bool:  # the node took its Welcome (not only the hello)
                return any(
                    e["event"] == "coordinator_connected" and e["coordinator"] == net.signer.address
                    for e in logs
                )

            nursery.start_soon(run)
            await until(lambda: joined(a), 30)
            held = decode_signer_set(config.network_signers_path.read_bytes())
            assert held.set.serial == 2
            # c serves an older set that still named it; d a set the operator never signed
            _serve(c, _set(bytes(operator.key), domain, addrs, serial=1))
            _serve(d, _set(bytes(stranger.key), domain, [d.signer.address], serial=9))

            def logged(event: str, origin: str, text: str = "") -> bool:
                return any(
                    e["event"] == event
                    and e.get("origin") == f"welcome from {origin}"
                    and text in str(e.get("reason", ""))
                    for e in logs
                )

            def refused(net: Net) -> bool:
                return any(
                    e["event"] == "coordinator_refused"
                    and e["addr"] == net.addr
                    and "nor in the network's signer set" in e["error"]
                    for e in logs
                )

            await until(lambda: logged("signer_set_outdated", c.signer.address), 30)
            await until(lambda: logged("signer_set_refused", d.signer.address, "not a"), 30)
            await until(lambda: refused(c) and refused(d), 30)
            await until(lambda: joined(b), 30)
            assert not joined(c) and not joined(d)
            assert decode_signer_set(config.network_signers_path.read_bytes()) == held
            accepted = [e for e in logs if e["event"] == "signer_set_accepted"]
            assert [e["serial"] for e in accepted] == [2]
            assert accepted[0]["origin"] == f"welcome from {a.signer.address}"
            stop.set()
