"""OS errors about a path and PostgreSQL connection failures through the one error layer:
one line naming the path (or `host:port`) and the reason, never a traceback, never the
password of a database URL."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sogni_coordinator.cli import app as coordinator_app
from sogni_protocol.cli_errors import classify, redact
from tests.cli_ux.one_line import one_line

runner = CliRunner()


def _env(tmp_path: Path, **extra: str | None) -> dict[str, str | None]:
    return {
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path),
        "SOGNI_COORDINATOR_CONFIG": None,
        "SOGNI_COORDINATOR_DATABASE": None,
        "SOGNI_DEBUG": None,
        **extra,
    }


def test_a_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent.json"
    result = runner.invoke(
        coordinator_app, ["network", "signers", "show", str(missing)], env=_env(tmp_path)
    )
    hint = "check the path; SOGNI_DEBUG=1 shows where it was opened"
    assert one_line(result, 4) == f"error: {missing}: No such file or directory ({hint})\n"


def test_a_database_where_no_folder_can_be_made_isone_line(tmp_path: Path) -> None:
    env = _env(tmp_path, SOGNI_COORDINATOR_DATABASE="/proc/nope/db.sqlite")
    line = one_line(runner.invoke(coordinator_app, ["workers"], env=env), 4)
    assert line.startswith("error: /proc/nope") and "No such file or directory" in line


@pytest.mark.parametrize(
    ("number", "code", "words"),
    [
        (errno.EROFS, 3, "read-only"),
        (errno.ENOSPC, 4, "disk is full"),
        (errno.EACCES, 3, "permissions"),  # PermissionError, mapped by class
        (errno.EIO, 4, "check it"),
    ],
)
def test_os_errors_of_the_machine_are_mapped_by_errno(number: int, code: int, words: str) -> None:
    named = classify(OSError(number, "what the OS said", "/data/coordinator.db"))
    assert named is not None and named.code == code
    assert named.what == "/data/coordinator.db: what the OS said" and words in (named.todo or "")
    if number != errno.EACCES:
        bare = classify(OSError(number, "what the OS said"))  # write() on a full disk: no path
        assert bare is not None and bare.code == code


def test_an_os_error_naming_no_path_nor_the_machine_stays_a_bug() -> None:
    assert classify(OSError(errno.EBADF, "Bad file descriptor")) is None
    assert classify(OSError("something")) is None


def test_an_unreachable_postgres_is_one_line_naming_host_and_port(tmp_path: Path) -> None:
    env = _env(tmp_path, SOGNI_COORDINATOR_DATABASE="postgresql://user:SECRETPW@127.0.0.1:9/db")
    result = runner.invoke(coordinator_app, ["workers"], env=env)
    line = one_line(result, 4)
    assert line.startswith("error: cannot reach the database at 127.0.0.1:9: "), line
    assert "SECRETPW" not in result.output


def test_psycopg_connection_errors_are_mapped_raw_or_under_sqlite3() -> None:
    psycopg = pytest.importorskip("psycopg")
    raw = psycopg.OperationalError(
        'connection failed: connection to server at "db.example" (10.0.0.5), port 5432 '
        'failed: FATAL:  password authentication failed for user "sogni"'
    )
    error = classify(raw)
    assert error is not None and error.code == 4
    assert error.what.startswith("cannot reach the database at db.example:5432: FATAL")
    wrapped = sqlite3.OperationalError(str(raw))  # what the storage layer raises
    wrapped.__cause__ = raw
    under = classify(wrapped)
    assert under is not None and (under.code, under.what) == (error.code, error.what)
    leaky = psycopg.OperationalError(
        'end of string reached when looking for matching "]" in IPv6 host address in URI: '
        '"postgres://user:SECRETPW@[bad"'
    )
    error = classify(leaky)
    assert error is not None and "SECRETPW" not in error.line()
    bad_sql = psycopg.errors.SyntaxError("syntax error at or near SELEC")  # a bug
    assert classify(bad_sql) is None


def test_messages_never_carry_a_urls_password() -> None:
    assert redact("postgresql://user:pw@h:5/db") == "postgresql://user:***@h:5/db"
    assert redact("host=h password=secret dbname=x") == "host=h password=*** dbname=x"
    assert redact("no secret here: /ip4/1.2.3.4/tcp/5") == "no secret here: /ip4/1.2.3.4/tcp/5"
    error = classify(ConnectionError("cannot connect to postgres://a:b@c"))
    assert error is not None and ":b@" not in error.line()
