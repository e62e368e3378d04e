"""One error layer for every command line (`sogni`, `sogni-node`, `sogni-coordinator`, ...).

Why: an operator mistake (a missing keystore, a wrong password, nothing listening) is not a
crash, so it must read as one line that says what happened and what to do, and exit with a
code a script can act on. A bug, on the other hand, must keep its traceback.

- `BadUsage` (exit 2), `Refused` (exit 3), `Unavailable` (exit 4): raise them from commands.
- The project's expected exceptions (keystore, settings, addresses file, transport, chain
  reverts, strict decoding, ...) are mapped to those classes by *name*, so this module imports
  no other project package; a CLI adds its own with `register`.
- `CliGroup` (`typer.Typer(cls=CliGroup)`) prints `error: <what happened> (<what to do>)` on
  stderr and exits with the class's code; anything unmapped propagates (a traceback).
  `--debug` (`DebugOption` on the app's callback) or `SOGNI_DEBUG=1` shows the traceback of
  mapped errors too. typer/click usage errors keep their own message and exit 2.
- `main` runs an app from an entry point (and turns a load failure, e.g. a missing extra, into
  the same one line); `run` does the same for a plain function (argparse tools).

Exit 1 stays for a command that ran but whose result is negative (a check found a bad file,
some images failed, today's Daily Boost was already claimed). See docs/CLI.md.

Also here, because every CLI needs them the same way: OS errors about a path (missing, on a
read-only or full disk) and PostgreSQL connection failures become one line naming the path
or `host:port`; a password in a URL never reaches a message (`redact`); `parse_amount` is the
one parser of token amounts typed on a command line.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any, ClassVar

import typer
import typer.core

__all__ = [
    "INTERRUPTED",
    "BadUsage",
    "CliError",
    "CliGroup",
    "DebugOption",
    "Refused",
    "Unavailable",
    "classify",
    "debug_requested",
    "interrupted",
    "main",
    "no_funds",
    "parse_amount",
    "redact",
    "register",
    "require_extra",
    "run",
    "too_little_eth",
]

DEBUG_ENV = "SOGNI_DEBUG"
_DEBUG_META = "sogni.debug"
_TRUE = frozenset({"1", "true", "yes", "on"})


class CliError(Exception):
    """An expected failure: one line of what happened, optionally one of what to do."""

    code: ClassVar[int] = 1

    def __init__(self, what: str, todo: str | None = None) -> None:
        super().__init__(what)
        self.what = redact(_one_line(what))
        self.todo = redact(_one_line(todo)) if todo else None

    def line(self) -> str:
        return f"error: {self.what}" + (f" ({self.todo})" if self.todo else "")


class BadUsage(CliError):
    """The command line or the config is wrong (a bad value, a missing setting)."""

    code = 2


class Refused(CliError):
    """Someone said no: a coordinator, the chain, the keystore (wrong password), a bad file."""

    code = 3


class Unavailable(CliError):
    """Something needed is not there: nothing listening, chain down, a missing extra or file."""

    code = 4


_Kind = type[CliError]
_CHECK_PATH = f"check the path; {DEBUG_ENV}=1 shows where it was opened"
"""A missing path may be the user's or the program's own: the traceback is one switch away."""

_KNOWN: dict[str, tuple[_Kind, str | None]] = {
    # name of the exception class (module.QualName) -> (class, what to do)
    "sogni_protocol.settings.SettingsError": (
        BadUsage,
        "fix that key in the config file or the environment",
    ),
    "sogni_protocol.catalog.CatalogError": (BadUsage, "check the catalog file"),
    "sogni_protocol.errors.ProtocolError": (
        Refused,
        "the peer may run an incompatible version",
    ),
    "sogni_wallet.keystore.KeystoreNotFound": (Unavailable, None),  # the message says how
    "sogni_wallet.keystore.KeystoreExists": (Refused, None),
    "sogni_wallet.keystore.WrongPassword": (Refused, "check the keystore password"),
    "sogni_wallet.keystore.KeystoreError": (Refused, None),
    "sogni_wallet.addresses.AddressesFileError": (Unavailable, None),
    "sogni_net.errors.AddressError": (
        BadUsage,
        "a peer address looks like /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...",
    ),
    "sogni_net.errors.ListenError": (
        Unavailable,
        "another process may use that port: change `listen` / `http_listen`, or stop it",
    ),
    "sogni_net.keys.NodeKeyError": (
        Refused,
        "move the damaged file away: a new node key (and peer id) is made at the next start",
    ),
    "sogni_net.errors.TransportError": (
        Unavailable,
        "check the address and that the peer is running",
    ),
    "sogni_chain.errors.ChainRevert": (Refused, None),
    "sogni_node.render.coreml_backend.BackendUnavailable": (
        Unavailable,
        'use the diffusers backend here (backend = "diffusers"); Core ML renders on macOS',
    ),
    "msgspec.ValidationError": (BadUsage, "check the values given"),
    "builtins.ConnectionError": (Unavailable, "check that it is running and reachable"),
    # a path that is a file where a folder belongs, or the reverse, or not ours to write
    "builtins.FileExistsError": (Refused, "that path is taken by a file: give another one"),
    "builtins.NotADirectoryError": (Refused, "a file stands where a folder belongs"),
    "builtins.IsADirectoryError": (Refused, "give a file, not a folder"),
    "builtins.PermissionError": (Refused, "check the path's owner and permissions"),
    "builtins.FileNotFoundError": (Unavailable, _CHECK_PATH),
    "builtins.ModuleNotFoundError": (
        Unavailable,
        "install the missing package, or the sogni-supernet extra that provides it",
    ),
}


_EXACT: dict[str, tuple[_Kind, str | None, tuple[str, ...]]] = {
    # that class itself only (sqlite3's IntegrityError and ProgrammingError, bugs, subclass
    # DatabaseError), and only with one of the messages given (bad SQL is an
    # OperationalError too, and a bug)
    "sqlite3.DatabaseError": (
        Refused,
        "the database file is damaged or not SQLite: restore it from a backup "
        "(`sogni-coordinator restore`) or move it away",
        ("file is not a database", "malformed"),
    ),
    "sqlite3.OperationalError": (
        Unavailable,
        "another process may hold the database (a running daemon, a `sqlite3` session), or "
        "its folder is not writable",
        ("database is locked", "unable to open database", "readonly database", "disk i/o"),
    ),
}


def register(exc_type: type[BaseException] | str, kind: _Kind, todo: str | None = None) -> None:
    """Map an exception class (or its `module.QualName`) and its subclasses to `kind`."""
    name = exc_type if isinstance(exc_type, str) else _name(exc_type)
    _KNOWN[name] = (kind, todo)


def _name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())


_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@\"']*):[^\s@\"']*@")
"""A URL's `user:password@`; a password may hold any character but blanks and quotes (an
unencoded `/` too: hiding too much beats showing part of one)."""
_KEY_PASSWORD = re.compile(r"(?i)\b(password\s*=\s*)('[^']*'|\"[^\"]*\"|\S+)")


def redact(text: str) -> str:
    """`text` without the password of a URL (`postgresql://user:***@host`) or a libpq
    `password=...`: a database URL is echoed by its driver's errors, never by ours."""
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", text))


_OS_ERRNO: dict[int, tuple[_Kind, str]] = {
    # an OSError the machine caused, whatever the path: the OS's reason is the message
    errno.EROFS: (Refused, "that file system is read-only: choose a writable place"),
    errno.ENOSPC: (Unavailable, "the disk is full: free some space"),
    errno.EDQUOT: (Unavailable, "the disk quota is used up: free some space"),
    errno.EIO: (Unavailable, "the disk failed to read or write: check it"),
    errno.ENAMETOOLONG: (BadUsage, "give a shorter path"),
    errno.ELOOP: (BadUsage, "a symbolic link in the path points back to itself"),
}


def _os_error(exc: OSError) -> CliError | None:
    """An OSError about a path (it names one) or about the machine (read-only, full disk):
    `<path>: <what the OS said>`. One naming neither (a socket's) stays unmapped."""
    known = _OS_ERRNO.get(exc.errno or 0)
    if known is None and not exc.filename:
        return None
    kind, todo = known or (Unavailable, _CHECK_PATH)
    reason = exc.strerror or str(exc) or type(exc).__name__
    what = f"{exc.filename}: {reason}" if exc.filename else reason
    return kind(what, todo)


_PG_AT = re.compile(r'connection to server at "([^"]*)"(?: \([^)]*\))?, port (\d+) failed: (.*)')
_PG_SOCKET = re.compile(r'connection to server on socket "([^"]*)" failed: (.*)')
_PG_TODO = (
    "check that PostgreSQL runs there and accepts this user, and the `database` setting "
    "(SOGNI_COORDINATOR_DATABASE)"
)


def _is_psycopg(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "psycopg"


def _database_error(exc: BaseException) -> CliError | None:
    """A PostgreSQL connection failure (psycopg's plain `OperationalError`, raised as is or
    under the sqlite3 error the storage layer turns it into): "cannot reach the database at
    host:port", its URL's password never shown. Errors of a statement (bad SQL, a
    constraint) are not connection failures: they stay unmapped."""
    cause = exc if _is_psycopg(exc) else exc.__cause__
    if cause is None or not _is_psycopg(cause) or type(cause).__name__ != "OperationalError":
        return None
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if m := _PG_AT.search(first):
        return Unavailable(f"cannot reach the database at {m[1]}:{m[2]}: {m[3]}", _PG_TODO)
    if m := _PG_SOCKET.search(first):
        return Unavailable(f"cannot reach the database at {m[1]}: {m[2]}", _PG_TODO)
    why = re.sub(r'\s*in URI: ".*', "", first).removeprefix("connection failed: ")
    return Unavailable(f"cannot reach the database: {why or type(cause).__name__}", _PG_TODO)


def classify(exc: BaseException) -> CliError | None:
    """The CLI error `exc` stands for, or None when it is not an expected one (a bug)."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, BaseExceptionGroup):  # trio nurseries wrap what a task raised
        leaves = [classify(e) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaves) else None
    if isinstance(exc, typer.Exit | typer.Abort):
        return None
    special = _database_error(exc) or _no_funds_error(exc)
    if special is not None:
        return special
    exact = _EXACT.get(_name(type(exc)))
    if exact is not None and any(m in str(exc).lower() for m in exact[2]):
        return exact[0](str(exc), exact[1])
    for cls in type(exc).__mro__:
        known = _KNOWN.get(_name(cls))
        if known is not None:
            kind, todo = known
            what = str(exc) or type(exc).__name__
            if isinstance(exc, OSError) and exc.strerror and exc.filename:
                what = f"{exc.filename}: {exc.strerror}"  # not "[Errno 17] File exists: '…'"
            own = getattr(exc, "todo", None)  # a SettingsError with no key to fix says so
            return kind(what, own if isinstance(own, str) else todo)
    if isinstance(exc, OSError):
        return _os_error(exc)
    return None


_NO_FUNDS = (
    "insufficient funds",  # a JSON-RPC node (anvil, geth): "insufficient funds for gas * ..."
    "cannot afford txn gas",  # the embedded EVM (eth-tester), for the gas
    "does not have enough balance",  # the embedded EVM, for the value and the gas
)


def no_funds(exc: BaseException) -> bool:
    """Did sending a transaction fail because its sender has too little ETH? (Each chain
    words it its own way, in an exception class of its own.)"""
    text = str(exc).lower()
    return any(words in text for words in _NO_FUNDS)


def too_little_eth(
    address: str, balance_wei: int, *, sending: str = "", todo: str | None = None
) -> Refused:
    """The one line for a transaction `address` cannot pay for (a node's `stake`, a
    coordinator's `chain fund`): whose wallet, the ETH it has, how to fund it."""
    whole, frac = divmod(balance_wei, 10**18)
    eth = f"{whole}.{frac:018d}".rstrip("0").rstrip(".") if frac else str(whole)
    return Refused(
        f"wallet {address} has {eth} ETH, too little to pay for {sending or 'this transaction'}"
        " and its gas",
        todo or f"send it some ETH (on a local chain: `sogni-coordinator chain fund {address}`)",
    )


def _no_funds_error(exc: BaseException) -> CliError | None:
    """A transaction its sender could not pay for, sent by a command that did not say whose
    wallet it was (those that know name it): one line, not web3's error dictionary."""
    if type(exc).__module__.split(".")[0] not in ("web3", "eth_utils", "eth_tester"):
        return None
    if not no_funds(exc):
        return None
    return Refused(
        "the sending wallet has too little ETH to pay for this transaction and its gas",
        "send it some ETH (on a local chain: `sogni-coordinator chain fund ADDRESS`)",
    )


UINT256_MAX = 2**256 - 1
"""The most a contract's amount (uint256) holds, in base units."""


def parse_amount(
    text: str, *, unit: str = "SOGNI", decimals: int = 18, allow_zero: bool = False
) -> int:
    """`"12.5"` of `unit` in base units (`10**-decimals` of it), else `BadUsage` (exit 2).

    The one parser of amounts typed on a command line, because each reaches a contract as a
    uint256: "inf", "nan", "-5", "1e999" or more than 2^256 - 1 base units are refused here,
    in words, not as an OverflowError or a web3 validation traceback later.
    """
    from decimal import Decimal, InvalidOperation

    shown = text.strip()
    quoted = repr(shown[:40] + ("..." if len(shown) > 40 else ""))
    example = f"give {unit} as a number such as 1000 or 0.5"
    try:
        value = Decimal(shown) if len(shown) <= 200 else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise BadUsage(f"not an amount of {unit}: {quoted}", example)
    if value < 0 or (value == 0 and not allow_zero):
        least = "0 or more" if allow_zero else "positive"
        raise BadUsage(f"amount must be {least}, not {quoted}", example)
    if value != 0 and value.adjusted() > 80:  # far above 2^256 base units: skip the maths
        raise BadUsage(
            f"not an amount of {unit}: {quoted} is more than a contract holds", "give less"
        )
    _sign, digit_tuple, exponent = value.as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")  # integer maths: no rounding
    exponent = int(exponent) + len(digit_tuple) - len(digits)
    if digits and exponent < -decimals:
        raise BadUsage(f"amount {quoted} has more than {decimals} decimals", example)
    base = int(digits) * 10 ** (exponent + decimals) if digits else 0
    if base > UINT256_MAX:
        raise BadUsage(
            f"not an amount of {unit}: {quoted} is more than a contract holds", "give less"
        )
    return base


NEGATIVE_AS_ARGUMENT = {"ignore_unknown_options": True}
"""`context_settings` of a command taking an amount: `-5` reaches the amount's own check
("must be positive") instead of click's "No such option: -5"."""

INTERRUPTED = 130
"""Exit code of a command stopped with Ctrl-C (128 + SIGINT), as shells report it."""


def interrupted(exc: BaseException) -> bool:
    """Is `exc` Ctrl-C: a KeyboardInterrupt, or a trio group of it and the cancellations
    it caused in the other tasks?"""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        leaves = exc.exceptions
        return any(interrupted(e) for e in leaves) and all(
            interrupted(e) or type(e).__name__ == "Cancelled" for e in leaves
        )
    return False


def _report_interrupt(exc: BaseException, *, debug: bool) -> int:
    """Print "interrupted" for Ctrl-C and return its exit code; else (or with --debug)
    re-raise."""
    if debug or not interrupted(exc):
        raise exc
    typer.echo("interrupted", err=True)
    return INTERRUPTED


def _debug_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in _TRUE


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """`--debug` on the command line (before `--`) or `SOGNI_DEBUG=1`."""
    if _debug_env():
        return True
    args = list(sys.argv[1:] if argv is None else argv)
    return "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args


def _set_debug(ctx: typer.Context, value: bool) -> bool:
    if value:
        ctx.meta[_DEBUG_META] = True
    return value


DebugOption = Annotated[
    bool,
    typer.Option(
        "--debug",
        envvar=DEBUG_ENV,
        is_eager=True,
        callback=_set_debug,
        help="Show the traceback of an error instead of one line (or SOGNI_DEBUG=1).",
    ),
]
"""Put `debug: DebugOption = False` on the app's callback: the global `--debug`."""


def _report(exc: BaseException, *, debug: bool) -> int:
    """Print the one line for an expected error and return its exit code; else re-raise."""
    error = classify(exc)
    if error is None or debug:
        raise exc
    typer.echo(error.line(), err=True)
    return error.code


class CliGroup(typer.core.TyperGroup):
    """A typer group whose commands fail with one line and the class's exit code."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click Context
        try:
            return super().invoke(ctx)
        except BaseException as exc:  # Ctrl-C too, bare or inside a trio nursery's group
            debug = bool(ctx.meta.get(_DEBUG_META)) or _debug_env()
            if isinstance(exc, Exception):
                raise typer.Exit(_report(exc, debug=debug)) from None
            raise typer.Exit(_report_interrupt(exc, debug=debug)) from None


def require_extra(command: str, extra: str, modules: Iterable[str]) -> None:
    """Raise `Unavailable` naming the install command when a module of `extra` is missing.

    Checked with `find_spec`, before the heavy code is imported, so that a bare install
    (`pip install sogni-supernet`) gets one line instead of an ImportError traceback.
    """
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise Unavailable(
                f"{command} needs the {extra} extra", f"pip install 'sogni-supernet[{extra}]'"
            )


def run(function: Callable[[], int | None], *, debug: bool | None = None) -> int:
    """Call `function` (a plain `main`) and return its exit code, or an error's code."""
    try:
        return function() or 0
    except Exception as exc:
        return _report(exc, debug=debug_requested() if debug is None else debug)


def main(app: typer.Typer | Callable[[], typer.Typer], *, prog_name: str) -> None:
    """Entry point: load the app (a failure, e.g. a missing extra, is one line), then run it.
    Ctrl-C while the app's modules load (seconds: torch, libp2p) is one line too."""
    try:
        if not isinstance(app, typer.Typer):
            try:
                app = app()
            except Exception as exc:
                sys.exit(_report(exc, debug=debug_requested()))
        app(prog_name=prog_name)
    except KeyboardInterrupt as exc:
        sys.exit(_report_interrupt(exc, debug=debug_requested()))
