"""The network signer set (`sogni_protocol.signer_set`) and the node's hold on it
(`sogni_node.trust.NetworkSigners`): every way to cheat is refused, and a standard EIP-712
library verifies the document as signed."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from typer.testing import CliRunner

from sogni_node.trust import NetworkSigners
from sogni_protocol.eip712 import Domain
from sogni_protocol.signer_set import (
    MAX_FILE_BYTES,
    NetworkSignerSet,
    SignerSetError,
    check_signer_set,
    decode_signer_set,
    encode_signer_set,
    sign_signer_set,
    signer_set_document,
)
from sogni_wallet.keystore import create_keystore

DOMAIN = Domain(31337, "0x" + "ab" * 20)
NETWORK = "sogni-test"


def _key() -> tuple[str, bytes]:
    acct = Account.create()
    return str(acct.address), bytes(acct.key)


def _signed(key: bytes, signers: list[str], serial: int = 1, network: str = NETWORK) -> bytes:
    unsigned = NetworkSignerSet(
        network_id=network, serial=serial, signers=signers, issued_at=int(time.time())
    )
    return encode_signer_set(sign_signer_set(key, DOMAIN, unsigned))


def test_a_set_verifies_with_a_standard_library_and_round_trips() -> None:
    operator, key = _key()
    a, b = _key()[0], _key()[0]
    signed = decode_signer_set(_signed(key, [a, b]))
    doc = signer_set_document(DOMAIN, signed.set)
    recovered = Account.recover_message(
        encode_typed_data(full_message=doc), signature=signed.signature
    )
    assert recovered == operator == signed.operator
    assert check_signer_set(DOMAIN, signed, [operator], NETWORK) is None


def test_cheats_are_refused() -> None:
    operator, key = _key()
    stranger, stranger_key = _key()
    a = _key()[0]
    # signed by someone who is not a configured operator (naming himself)
    forged = decode_signer_set(_signed(stranger_key, [a]))
    assert "not a configured network operator" in str(
        check_signer_set(DOMAIN, forged, [operator], NETWORK)
    )
    # claims the operator signed it, but the signature is the stranger's
    claimed = json.loads(_signed(stranger_key, [a]))
    claimed["operator"] = operator
    fault = check_signer_set(
        DOMAIN, decode_signer_set(json.dumps(claimed).encode()), [operator], NETWORK
    )
    assert fault is not None and "not signed by its operator" in fault
    # a signer added after signing
    edited = json.loads(_signed(key, [a]))
    edited["set"]["signers"].append(stranger)
    fault = check_signer_set(
        DOMAIN, decode_signer_set(json.dumps(edited).encode()), [operator], NETWORK
    )
    assert fault is not None and "not signed by its operator" in fault
    # another network's set, another chain's
    other = decode_signer_set(_signed(key, [a], network="other-net"))
    assert "is for network 'other-net'" in str(check_signer_set(DOMAIN, other, [operator], NETWORK))
    good = decode_signer_set(_signed(key, [a]))
    assert check_signer_set(Domain(1, DOMAIN.verifying_contract), good, [operator], NETWORK)
    # malformed, unknown fields, too large
    with pytest.raises(SignerSetError):
        decode_signer_set(b'{"set": {}}')
    with pytest.raises(SignerSetError):
        decode_signer_set(b" " * (MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError):
        _signed(key, [a, a.lower()])  # one signer twice


def test_the_node_keeps_the_highest_serial_and_refuses_a_replayed_older_one(
    tmp_path: Path,
) -> None:
    operator, key = _key()
    a, b, stranger = _key()[0], _key()[0], _key()[0]
    source = tmp_path / "set.json"
    held = tmp_path / "node" / "network_signers.json"
    held.parent.mkdir()
    signers = NetworkSigners(held, DOMAIN, [operator], NETWORK, source)
    assert signers.current() == frozenset()  # no file yet: no signer trusted
    v1 = _signed(key, [a, b], serial=1)
    source.write_bytes(v1)
    assert signers.current() == {a.lower(), b.lower()}
    assert held.stat().st_mode & 0o777 == 0o600
    source.write_bytes(_signed(key, [a], serial=2))  # the operator removed b
    assert signers.current() == {a.lower()}
    source.write_bytes(v1)  # the old set replayed: b stays out
    assert signers.current() == {a.lower()}
    # a restarted node without the source file still holds serial 2
    assert NetworkSigners(held, DOMAIN, [operator], NETWORK).current() == {a.lower()}
    # a stranger's set with a higher serial, or another network's, changes nothing
    _, stranger_key = _key()
    source.write_bytes(_signed(stranger_key, [stranger], serial=9))
    assert signers.current() == {a.lower()}
    source.write_bytes(_signed(key, [stranger], serial=9, network="other-net"))
    assert signers.current() == {a.lower()}
    # the same serial with other contents does not replace what is held
    source.write_bytes(_signed(key, [stranger], serial=2))
    assert signers.current() == {a.lower()}
    # no operator configured: the held set counts for nothing
    assert NetworkSigners(held, DOMAIN, [], NETWORK, source).current() == frozenset()
    # the operator changed: the held set no longer verifies against the new one
    assert NetworkSigners(held, DOMAIN, [_key()[0]], NETWORK).current() == frozenset()


def test_the_coordinator_cli_signs_and_shows_a_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sogni_coordinator.cli import app

    monkeypatch.setenv("SOGNI_OPERATOR_PASSWORD", "pw-for-the-test")
    monkeypatch.setenv("SOGNI_COORDINATOR_NETWORK_ID", NETWORK)
    monkeypatch.setenv("SOGNI_COORDINATOR_DATA_DIR", str(tmp_path / "c"))
    operator = create_keystore(tmp_path / "op.json", "pw-for-the-test", kdf_n=2**10)
    a, b = _key()[0], _key()[0]
    out = tmp_path / "set.json"
    runner = CliRunner()
    args = ["network", "signers", "sign", a, b, "--operator-keystore", str(tmp_path / "op.json")]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "signed set 1 of network sogni-test: 2 signers" in result.output
    monkeypatch.setenv("SOGNI_OPERATOR_PASSWORD", "pw-for-the-test")  # read once, then cleared
    result = runner.invoke(app, [*args, "--out", str(out)])  # the next serial by default
    assert "signed set 2" in result.output, result.output
    shown = runner.invoke(app, ["network", "signers", "show", str(out), "--operator", operator])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["set"]["serial"] == 2
    wrong = runner.invoke(app, ["network", "signers", "show", str(out), "--operator", a])
    assert wrong.exit_code == 3
    assert "not a configured network operator" in wrong.output
    monkeypatch.setenv("SOGNI_OPERATOR_PASSWORD", "pw-for-the-test")
    bad = runner.invoke(
        app, ["network", "signers", "sign", "0xnope", *args[4:], "--out", str(tmp_path / "x.json")]
    )
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_a_coordinator_serves_the_set_file_and_nothing_else(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from sogni_coordinator.network_signers import signer_set_routes

    _, key = _key()
    path = tmp_path / "network_signers.json"
    client = TestClient(Starlette(routes=signer_set_routes(path)))
    assert client.get("/v1/network/signers").status_code == 404  # no file yet
    path.write_bytes(_signed(key, [_key()[0]]))
    got = client.get("/v1/network/signers")
    assert got.status_code == 200 and got.content == path.read_bytes()
    path.write_bytes(b'{"not": "a set"}')  # never serves what no node would read
    assert client.get("/v1/network/signers").status_code == 404
    assert (
        TestClient(Starlette(routes=signer_set_routes(None))).get("/v1/network/signers").status_code
        == 404
    )


async def test_a_node_fetches_a_newer_set_from_a_coordinators_listener(tmp_path: Path) -> None:
    import trio
    from starlette.applications import Starlette

    from sogni_coordinator.network_signers import signer_set_routes
    from sogni_net import serve_http

    operator, key = _key()
    a, b = _key()[0], _key()[0]
    served = tmp_path / "served.json"
    served.write_bytes(_signed(key, [a, b], serial=3))
    held = tmp_path / "node" / "network_signers.json"
    held.parent.mkdir()
    signers = NetworkSigners(held, DOMAIN, [operator], NETWORK)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            serve_http, Starlette(routes=signer_set_routes(served)), "127.0.0.1:0"
        )
        got = await trio.to_thread.run_sync(signers.fetch, url)
        assert got is not None and got.set.serial == 3
        assert signers.current() == {a.lower(), b.lower()}
        served.write_bytes(_signed(key, [a], serial=2))  # a stale coordinator's copy
        await trio.to_thread.run_sync(signers.fetch, url)
        assert signers.current() == {a.lower(), b.lower()}
        nursery.cancel_scope.cancel()
    # a listener that is gone: one log line, the held set stays
    got = await trio.to_thread.run_sync(signers.fetch, url)
    assert got is not None and got.set.serial == 3


def _raw_handler(answer: bytes, *, trickle: float = 0.0) -> Any:
    """A TCP listener on 127.0.0.1 that answers every connection with `answer` (sent a byte at
    a time every `trickle` seconds, if set), whatever was asked: a broken HTTP server."""
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(20):
            await stream.receive_some(65536)
            if trickle:
                for byte in answer:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(trickle)
            else:
                await stream.send_all(answer)
            await stream.aclose()

    return handle


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",  # no status line: http.client.BadStatusLine
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a broken chunk
        b'HTTP/1.1 200 OK\r\nContent-Length: 18\r\n\r\n{"operator":"\xff\xfe"}',  # not UTF-8
    ],
    ids=["status-line", "chunk", "utf8"],
)
async def test_a_broken_listener_is_one_log_line_and_the_held_set_stays(
    tmp_path: Path, answer: bytes
) -> None:
    import trio
    from structlog.testing import capture_logs

    operator, key = _key()
    a = _key()[0]
    held = tmp_path / "network_signers.json"
    held.write_bytes(_signed(key, [a], serial=2))
    signers = NetworkSigners(held, DOMAIN, [operator], NETWORK)
    handle = _raw_handler(answer)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with capture_logs() as logs:
            got = await trio.to_thread.run_sync(signers.fetch, f"http://127.0.0.1:{port}")
        nursery.cancel_scope.cancel()
    assert got is not None and got.set.serial == 2  # the held set, untouched
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] in (
        ["signer_set_not_fetched"],
        ["signer_set_refused"],
    )


async def test_a_listener_that_trickles_its_answer_is_given_up_on_time(tmp_path: Path) -> None:
    import trio

    operator, _ = _key()
    signers = NetworkSigners(tmp_path / "held.json", DOMAIN, [operator], NETWORK)
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n" + b" " * 4000
    handle = _raw_handler(body, trickle=0.05)  # every read within urllib's own timeout
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        started = time.monotonic()
        got = await trio.to_thread.run_sync(signers.fetch, f"http://127.0.0.1:{port}", 1.0)
        took = time.monotonic() - started
        nursery.cancel_scope.cancel()
    assert got is None and took < 5  # the whole answer would take 200 s


async def test_the_daemons_refresh_outlives_a_fetch_that_raises(tmp_path: Path) -> None:
    import trio
    from structlog.testing import capture_logs

    from sogni_node import daemon

    operator, _ = _key()
    signers = NetworkSigners(tmp_path / "held.json", DOMAIN, [operator], NETWORK)
    calls: list[str] = []

    def broken_fetch(url: str, timeout: float = 10.0) -> None:
        calls.append(url)
        raise RuntimeError("a bug in the fetch path")

    signers.fetch = broken_fetch  # type: ignore[method-assign,assignment]
    with capture_logs() as logs:
        with trio.move_on_after(2.5):
            await daemon._refresh_signer_set(signers, ["http://127.0.0.1:9"], 1.0)
    assert len(calls) >= 2  # it kept going after the first failure
    failed = [e for e in logs if e["event"] == "signer_set_refresh_failed"]
    assert failed and failed[0]["error"] == "RuntimeError"
