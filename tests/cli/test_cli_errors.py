"""The one CLI error layer: one line and the class's exit code; tracebacks for bugs and --debug.

A toy app exercises the layer itself; the real CLIs are checked for the same behaviour.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest
import typer
from typer.testing import CliRunner

from sogni_net import ListenError
from sogni_net.keys import NodeKeyError
from sogni_protocol.cli_errors import (
    BadUsage,
    CliGroup,
    DebugOption,
    Refused,
    Unavailable,
    classify,
    register,
    require_extra,
    run,
)
from sogni_wallet.keystore import KeystoreNotFound, WrongPassword

runner = CliRunner()


class OddError(Exception):
    """A CLI-specific error registered with a class by its type object."""


register(OddError, Refused, "ask the odd one")

toy = typer.Typer(cls=CliGroup, add_completion=False)


@toy.callback()
def _toy(debug: DebugOption = False) -> None:
    """A toy CLI."""


@toy.command("raise")
def raise_cmd(kind: str) -> None:
    """Raise one kind of error."""
    errors: dict[str, Exception] = {
        "usage": BadUsage("no coordinator given", "pass --coordinator"),
        "refused": Refused("wrong receipt\nsecond line", "sign it again"),
        "unavailable": Unavailable("nothing listens on 127.0.0.1:9"),
        "keystore": KeystoreNotFound("no keystore at /x; create one with `sogni keys create`"),
        "password": WrongPassword("wrong password for keystore /x"),
        "odd": OddError("odd"),
        "connection": ConnectionRefusedError(111, "Connection refused"),
        "validation": msgspec.ValidationError("Expected `int`, got `str` - at `$.steps`"),
        "group": ExceptionGroup("nursery", [Unavailable("peer went away")]),
        "file": FileExistsError(17, "File exists", "/tmp/out"),
        "nodekey": NodeKeyError("/d/node.key is not a libp2p private key: bad"),
        "locked": sqlite3.OperationalError("database is locked"),
        "notadb": sqlite3.DatabaseError("file is not a database"),
        "badsql": sqlite3.OperationalError("no such column: x"),  # a bug: its traceback
        "listen": ListenError("cannot listen on /ip4/127.0.0.1/tcp/9: Address already in use"),
        "notdir": NotADirectoryError(20, "Not a directory", "/tmp/out/journal.db"),
        "bug": KeyError("bug"),
    }
    raise errors[kind]


@toy.command("interrupt")
def interrupt_cmd() -> None:
    """Ctrl-C inside a trio nursery, as in `sogni render` (trio wraps it in a group)."""
    import trio

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.sleep(0)
            raise KeyboardInterrupt

    trio.run(main)


@toy.command("ok")
def ok_cmd(n: int) -> None:
    """Succeed (or fail typer's own parsing)."""
    typer.echo(n)


@pytest.mark.parametrize(
    ("kind", "code", "line"),
    [
        ("usage", 2, "error: no coordinator given (pass --coordinator)"),
        ("refused", 3, "error: wrong receipt; second line (sign it again)"),
        ("unavailable", 4, "error: nothing listens on 127.0.0.1:9"),
        ("keystore", 4, "error: no keystore at /x; create one with `sogni keys create`"),
        ("password", 3, "error: wrong password for keystore /x (check the keystore password)"),
        ("odd", 3, "error: odd (ask the odd one)"),
        ("connection", 4, "error: [Errno 111] Connection refused (check that it is running"),
        ("validation", 2, "error: Expected `int`, got `str` - at `$.steps` (check the values"),
        ("group", 4, "error: peer went away"),
        ("file", 3, "error: /tmp/out: File exists (that path is taken by a file"),
        ("notdir", 3, "error: /tmp/out/journal.db: Not a directory (a file stands where"),
        ("nodekey", 3, "error: /d/node.key is not a libp2p private key: bad (move the damaged"),
        ("locked", 4, "error: database is locked (another process may hold the database"),
        ("notadb", 3, "error: file is not a database (the database file is damaged"),
        (
            "listen",
            4,
            "error: cannot listen on /ip4/127.0.0.1/tcp/9: Address already in use "
            "(another process may use that port",
        ),
    ],
)
def test_expected_errors_are_one_line_with_their_class_code(
    kind: str, code: int, line: str
) -> None:
    result = runner.invoke(toy, ["raise", kind], env={"SOGNI_DEBUG": None})
    assert result.exit_code == code
    assert result.stderr.startswith(line) and result.stderr.count("\n") == 1
    assert result.stdout == "" and "Traceback" not in result.output


def test_a_bug_keeps_its_traceback() -> None:
    result = runner.invoke(toy, ["raise", "bug"], env={"SOGNI_DEBUG": None})
    assert isinstance(result.exception, KeyError) and result.exit_code == 1
    assert "error:" not in result.output
    result = runner.invoke(toy, ["raise", "badsql"], env={"SOGNI_DEBUG": None})
    assert isinstance(result.exception, sqlite3.OperationalError) and result.exit_code == 1


def test_debug_option_or_env_shows_the_traceback() -> None:
    result = runner.invoke(toy, ["--debug", "raise", "refused"], env={"SOGNI_DEBUG": None})
    assert isinstance(result.exception, Refused) and "error:" not in result.output
    result = runner.invoke(toy, ["raise", "keystore"], env={"SOGNI_DEBUG": "1"})
    assert isinstance(result.exception, KeystoreNotFound)


def test_ctrl_c_is_one_line_and_exit_130_even_inside_a_trio_nursery() -> None:
    result = runner.invoke(toy, ["interrupt"], env={"SOGNI_DEBUG": None})
    assert result.exit_code == 130 and result.stderr == "interrupted\n"
    assert "Traceback" not in result.output
    with pytest.raises(BaseExceptionGroup):  # --debug keeps the traceback
        runner.invoke(toy, ["--debug", "interrupt"], env={"SOGNI_DEBUG": None})


def test_ctrl_c_while_the_app_loads_is_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sogni_protocol.cli_errors import main

    def loading() -> typer.Typer:  # the user presses Ctrl-C during the imports
        raise KeyboardInterrupt

    monkeypatch.delenv("SOGNI_DEBUG", raising=False)
    monkeypatch.setattr("sys.argv", ["sogni", "render", "x"])
    with pytest.raises(SystemExit) as exited:
        main(loading, prog_name="sogni")
    assert exited.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_typer_usage_errors_keep_exit_2() -> None:
    assert runner.invoke(toy, ["ok", "x"]).exit_code == 2
    assert runner.invoke(toy, ["nope"]).exit_code == 2
    assert runner.invoke(toy, ["ok", "3"]).stdout == "3\n"


def test_classify_and_run_for_plain_functions(capsys: pytest.CaptureFixture[str]) -> None:
    assert classify(KeyError("x")) is None
    assert classify(typer.Exit(3)) is None
    assert classify(ExceptionGroup("g", [Refused("a"), KeyError("b")])) is None  # a bug inside

    def deploy() -> int:
        raise ConnectionError("no JSON-RPC node answers at http://127.0.0.1:9")

    assert run(deploy, debug=False) == 4
    assert capsys.readouterr().err.startswith("error: no JSON-RPC node answers")
    assert run(lambda: 0, debug=False) == 0
    with pytest.raises(ConnectionError):
        run(deploy, debug=True)


def test_require_extra_names_the_install_command() -> None:
    require_extra("sogni-node", "node", ["json"])
    with pytest.raises(Unavailable) as info:
        require_extra("sogni-node", "node", ["json", "surely_not_installed_sogni_x"])
    assert info.value.code == 4
    assert info.value.line() == (
        "error: sogni-node needs the node extra (pip install 'sogni-supernet[node]')"
    )


# --- the real CLIs ---------------------------------------------------------------------------
def test_every_cli_runs_through_the_layer(tmp_path: Path) -> None:
    from sogni_app.cli import app as sogni_app
    from sogni_coordinator.cli import app as coordinator_app
    from sogni_node.cli import app as node_app

    missing = str(tmp_path / "none.json")
    cases: list[tuple[typer.Typer, list[str], dict[str, str | None]]] = [
        (sogni_app, ["keys", "show", "--keystore", missing], {}),
        (node_app, ["keys", "show"], {"SOGNI_NODE_DATA_DIR": str(tmp_path)}),
        (coordinator_app, ["keys", "show"], {"SOGNI_COORDINATOR_DATA_DIR": str(tmp_path)}),
    ]
    for app, args, env in cases:
        env = {**env, "SOGNI_DEBUG": None, "SOGNI_NODE_CONFIG": None}
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 4, result.output  # no keystore: create it first
        assert result.stderr.startswith("error: no keystore at ")
        assert result.stderr.count("\n") == 1
        result = runner.invoke(app, ["--debug", *args], env=env)
        assert isinstance(result.exception, KeystoreNotFound)


def test_quote_and_credit_usage_errors_are_one_line() -> None:
    from sogni_app.cli import app as sogni_app
    from sogni_coordinator.cli import app as coordinator_app

    result = runner.invoke(sogni_app, ["quote", "--network", "slow"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    result = runner.invoke(coordinator_app, ["credit", "0x12", "5"])
    assert result.exit_code == 2
    assert result.stderr == "error: '0x12' is not an Ethereum address (give a 0x... address)\n"


def test_a_negative_amount_is_refused_as_an_amount_not_an_unknown_option() -> None:
    """`credit 0x.. -5`, `stake -5`: click took `-5` for an option ("No such option: -5");
    the amount's own check names what is wrong."""
    from sogni_coordinator.cli import app as coordinator_app
    from sogni_node.cli import app as node_app

    payer = "0x1111111111111111111111111111111111111111"
    result = runner.invoke(coordinator_app, ["credit", payer, "-5"])
    assert result.exit_code == 2 and "No such option" not in result.output
    assert result.stderr == (  # one line, like `stake` (it was typer's boxed error)
        "error: amount must be positive, not '-5' (give Spark as a number such as 1000 or 0.5)\n"
    )
    for command in ("stake", "unstake"):
        result = runner.invoke(node_app, [command, "-5"])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: amount must be positive")
        assert "'-5'" in result.stderr
    result = runner.invoke(node_app, ["stake", "5", "--bogus"])  # a mistyped option: still named
    assert result.exit_code == 2 and "--bogus" in result.output


def test_a_coordinator_that_is_down_is_one_line(tmp_path: Path) -> None:
    """`sogni render` against a closed port: exit 4 and one `error:` line naming the address,
    no traceback and no second report from py-libp2p's TCP transport."""
    import os
    import subprocess
    import sys

    addr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    env = {**os.environ, "HOME": str(tmp_path)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sogni_app.cli import main; main()",
            "render",
            "a red circle",
            "--coordinator",
            addr,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 4, out.stderr
    assert len(errors) == 1 and f"cannot connect to {addr}" in errors[0]
    assert "Traceback" not in out.stderr and "Failed to open TCP stream" not in out.stderr


def test_render_refuses_an_out_that_is_a_file_before_sending(tmp_path: Path) -> None:
    """The check comes before the coordinator is even resolved: nothing is sent or paid for a
    request whose images could not be saved (it failed after the acceptance, in a traceback)."""
    from sogni_app.cli import app as sogni_app

    taken = tmp_path / "afile"
    taken.write_text("not a folder")
    result = runner.invoke(
        sogni_app,
        ["render", "a red circle", "--out", str(taken), "--coordinator", "/nowhere"],
        env={"SOGNI_DEBUG": None},
    )
    assert result.exit_code == 2, result.output
    assert (
        result.stderr
        == f"error: --out {taken} is a file, not a folder (give a folder for the images)\n"
    )


def test_render_names_what_is_wrong_with_a_malformed_coordinator_address(tmp_path: Path) -> None:
    """Before any dial or progress bar: a usage error saying what is wrong (it read as
    "unavailable, check that the peer is running", after the progress bar)."""
    from sogni_app.cli import app as sogni_app

    cases = {
        "127.0.0.1:47001": "Invalid character",  # read as a bare peer id
        "/ip4/127.0.0.1/tcp/1/p2p/xyz": "Invalid CID",
        "/ip4/999.0.0.1/tcp/1/p2p/12D3KooWRaBpx83oLDDzPxmddxTKX7qY3Xe6TrCWXwrQraqhJM1C": "IPv4",
        "/ip4/127.0.0.1/tcp/1": "without /p2p/<peer id>",
    }
    for addr, why in cases.items():
        result = runner.invoke(
            sogni_app,
            ["render", "a red circle", "--out", str(tmp_path), "--coordinator", addr],
            env={"SOGNI_DEBUG": None},
        )
        assert result.exit_code == 2, (addr, result.output)
        assert result.stderr.startswith(f"error: {addr!r} is not a peer address: "), addr
        assert why in result.stderr and result.stderr.count("\n") == 1
