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
"""

from __future__ import annotations

import importlib.util
import os
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
    "register",
    "require_extra",
    "run",
]

DEBUG_ENV = "SOGNI_DEBUG"
_DEBUG_META = "sogni.debug"
_TRUE = frozenset({"1", "true", "yes", "on"})


class CliError(Exception):
    """An expected failure: one line of what happened, optionally one of what to do."""

    code: ClassVar[int] = 1

    def __init__(self, what: str, todo: str | None = None) -> None:
        super().__init__(what)
        self.what = _one_line(what)
        self.todo = _one_line(todo) if todo else None

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


def classify(exc: BaseException) -> CliError | None:
    """The CLI error `exc` stands for, or None when it is not an expected one (a bug)."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, BaseExceptionGroup):  # trio nurseries wrap what a task raised
        leaves = [classify(e) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaves) else None
    if isinstance(exc, typer.Exit | typer.Abort):
        return None
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
            return kind(what, todo)
    return None


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
