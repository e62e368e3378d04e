"""The coordinator's SQLite databases share one way of opening, migrating and writing.

One connection per database file in this process: store, ledger and reputation share
`config.database`, and three connections to one file turned every overlap into a busy
timeout (`sqlite3.OperationalError: database is locked`) raised in the middle of a session.
The shared connection has one re-entrant lock, so trio worker threads (the write queue,
settlement) can use it too; WAL so other processes' readers (the CLI) never block the
writer; `BEGIN IMMEDIATE` transactions so a write never fails half-way on a lock upgrade.
Another process holding the write lock delays a transaction (`busy_timeout`, then retries
until `WRITE_DEADLINE`) and only then fails, with `DatabaseBusy` naming the file.

Writes leave the event loop through the file's write queue: `call` (awaited) and `submit`
(fire and forget) queue a write; while `run_writer` runs (the group commit runs it), a
worker thread applies everything queued in one transaction, so one fsync serves a whole
group of receipts, ledger settlements and reputation updates. Each write has its own
savepoint: one that raises is rolled back alone and its caller hears the error. The queue
is one order for the whole file. A component's synchronous transaction, and its reads
under `_lock`, first apply the queue when it holds writes of that component: a refund
queued before a reservation is seen by it, and a read sees every write submitted before
it, while the store's own writes do not pull the ledger's onto the event loop. Without a
running writer (tests, the CLI), `submit` writes at once and `call` in a worker thread.

`call_staged` queues a write with something to store first, outside the database (a
result image: `results.base.ResultStore.write_group`). Staged writes wait in a queue of
their own that only the writer takes: its second worker thread stores the staged items at
once (a folder: one `syncfs`), outside the connection's lock and while the previous group
commits, then queues the writes whose items were stored for the next group; a write whose
item failed is never applied and its caller gets the error. So what a row points at is
durable before the row commits, and a job waits on one queued write (one wake-up), not
an image write and then a receipt write. A writer whose rows are in this very database
(the PostgreSQL result store on the coordinators' own database, `GroupWriter.joins`)
is not staged: its row is written in the write's own savepoint, so image and receipt
commit together in the group's one transaction.

Schemas are versioned per component (store, ledger and reputation share one file, so one
`PRAGMA user_version` cannot serve them all): `schema_versions` records each component's
version, and on open the migrations after it are applied in order, in one transaction with
the version, so a crash mid-migration leaves the previous version intact. Migration 1 of
each component is the schema of the release before versioning (`CREATE ... IF NOT EXISTS`),
so a database from that release opens and migrates forward. A database newer than the code
is refused: running old code on it could misread or corrupt rows it does not understand.

Two engines behind this one class: a file path is SQLite (the default, one coordinator); a
`postgresql://` URL is PostgreSQL (many coordinators on one database, `storage/`). There,
`_db` is a `storage.postgres.PgConnection` that runs the same SQL (translated by
`storage.dialect`), a write transaction takes the database's advisory write lock (the
`BEGIN IMMEDIATE` of every coordinator on it), migrations run under that lock, and a
component may replace a migration that SQLite-only DDL cannot express
(`postgres_migrations`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast

import trio

from sogni_coordinator.storage import is_postgres, location
from sogni_protocol.logs import get_logger
from sogni_protocol.migrations import split_statements

if TYPE_CHECKING:
    from sogni_coordinator.storage.postgres import PgConnection

log = get_logger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_MS = 1_000
"""SQLite's own wait for another process's write lock, per attempt."""
WRITE_DEADLINE = 30.0
"""How long a transaction keeps retrying a locked database before `DatabaseBusy`."""

_VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component   TEXT PRIMARY KEY,
    version     INTEGER NOT NULL,
    migrated_at REAL NOT NULL
)
"""


class SchemaTooNew(RuntimeError):
    """The database was written by a newer release than this code."""


class DatabaseBusy(RuntimeError):
    """Another process held the database's write lock past `WRITE_DEADLINE`."""


DATABASE_ERRORS = (DatabaseBusy, sqlite3.Error)
"""What a write may raise when the database, not the caller, failed (busy, disk full, a
PostgreSQL connection lost: `storage.postgres` raises them as `sqlite3` errors)."""


async def until_written(write: Callable[[], Awaitable[T]], what: str) -> T:
    """`await write()` until the database takes it, waiting longer each time (at most a
    minute): for a decision that must not be lost nor end the daemon (a check's verdict)."""
    delay = 0.5
    while True:
        try:
            return await write()
        except DATABASE_ERRORS as exc:
            log.error("db_write_retried", write=what, error=str(exc)[:200], retry_in=delay)
        await trio.sleep(delay)
        delay = min(delay * 2, 60.0)


def table_exists(db: sqlite3.Connection, name: str) -> bool:
    """Does table `name` exist (either engine)?"""
    if not isinstance(db, sqlite3.Connection):
        return cast("PgConnection", db).table_exists(name)
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
    return row.fetchone() is not None


def schema_version(db: sqlite3.Connection, component: str) -> int:
    """The component's recorded version (0: never opened by versioned code)."""
    if not table_exists(db, "schema_versions"):
        return 0
    row = db.execute(
        "SELECT version FROM schema_versions WHERE component=?", (component,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


Done = Callable[[Any, BaseException | None], None]
"""Told the outcome of a queued write once its transaction committed (or failed)."""


class GroupWriter(Protocol):
    """Stores what staged writes point at (a result image), before they are queued, or,
    when its rows live in the very database written to (`joins`), inside the write's own
    savepoint (`write_rows`): one commit for both."""

    def write_group(self, items: list[Any]) -> list[BaseException | None]:
        """Store every item at once (blocking); per item, None or its error."""
        ...

    def joins(self, database: str) -> bool:
        """Are its rows in `database` (a `Database.location`)?"""
        ...

    def write_rows(self, conn: Any, items: list[Any]) -> None:
        """Write the items on `conn` in its open transaction (blocking); raises on failure."""
        ...

    def kept(self, items: list[Any]) -> None:
        """The items' rows committed (after `write_rows`)."""
        ...


Stage = tuple[GroupWriter, Any]
"""What `call_staged` stores first: the writer and one item for its `write_group`."""


@dataclass
class WriteStats:
    """What the writer of one file has done since it opened: enough to tell whether jobs
    wait on the disk (`bench.dispatch`), at a few additions per group."""

    groups: int = 0
    """Transactions the writer committed (`flush`)."""
    writes: int = 0
    """Queued writes in them (receipts, settlements, reputation updates, ...)."""
    commit_s: float = 0.0
    """Seconds in those transactions, `BEGIN` to `COMMIT` (the fsync included)."""
    stages: int = 0
    """Groups of staged items stored at once (`stage`: images, one `syncfs` each)."""
    staged: int = 0
    stage_s: float = 0.0
    failed: int = 0
    """Write transactions that failed as a whole (none of their writes committed: disk
    full, I/O error, read-only, locked past the deadline)."""
    stage_failed: int = 0
    """Staged items (images) that could not be stored (`stage`)."""


@dataclass(frozen=True)
class WriteFailure:
    """The writer's storage is failing now: published by the writer (`_Shared`), read by
    readiness (`metrics.database_ready`). Cleared by the next success of the same kind."""

    what: Literal["database", "results"]
    """What failed: a write transaction ("database"), or storing a staged image ("results")."""
    since: float
    """`time.monotonic()` of the first failure since the last success."""
    last: float
    """`time.monotonic()` of the latest failure."""
    error: str
    """One line, never a path nor a value: e.g. "disk full (OperationalError)"."""


_STORAGE_FAULTS = (
    ("full", "disk full"),
    ("no space", "disk full"),
    ("quota", "disk quota exceeded"),
    ("readonly", "read-only"),
    ("read-only", "read-only"),
    ("i/o", "I/O error"),
    ("unable to open", "cannot open the database file"),
    ("locked", "locked by another process"),
    ("connection", "connection lost"),
)
_STORAGE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only",
    errno.EIO: "I/O error",
}


def storage_fault(exc: BaseException) -> str | None:
    """A one-line name for `exc` when it means the storage failed (disk full, I/O error,
    read-only, locked, connection lost), not the write (a constraint, a bug); else None.
    Never quotes the error's own text (a PostgreSQL error may name a host or a value)."""
    if isinstance(exc, DatabaseBusy):
        return "locked by another process"
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return f"{_STORAGE_ERRNOS[exc.errno]} ({type(exc).__name__})"
    if isinstance(exc, sqlite3.OperationalError):
        low = f"{getattr(exc, 'sqlite_errorname', '')} {exc}".lower()
        for word, name in _STORAGE_FAULTS:
            if word in low:
                return f"{name} ({type(exc).__name__})"
    return None


@dataclass(eq=False)
class _Write:
    component: str
    fn: Callable[[], Any]
    done: Done
    stage: Stage | None = None
    waited: bool = True
    """Someone awaits it (`call`): it starts a group at once. A `submit` whose group would
    start while images are being staged rides with their receipts instead (one commit)."""
    wake: tuple[trio.lowlevel.TrioToken, Callable[[], None]] | None = None
    """Run on that token's loop once `done` has run (`_wake_loops`: one `run_sync_soon`
    per group and loop, not per write)."""


def _wake_loops(writes: list[_Write]) -> None:
    """Wake the tasks waiting on `writes` (their `done` has run), one call into each loop
    for them all: a `run_sync_soon` per write cost the writer's thread a socket send each
    (~50 us here, the GIL taken back after it from the busy loop), a sixth of a group's
    commit time in the dispatch baseline, and the loop one wake-up each."""
    by_loop: dict[trio.lowlevel.TrioToken, list[Callable[[], None]]] = {}
    for write in writes:
        if write.wake is not None:
            by_loop.setdefault(write.wake[0], []).append(write.wake[1])
    for token, wakes in by_loop.items():
        try:
            token.run_sync_soon(_call_each, wakes)
        except trio.RunFinishedError:
            pass


def _call_each(fns: list[Callable[[], None]]) -> None:
    for fn in fns:
        fn()


class _Shared:
    """One connection to one file, and the write queue in front of it."""

    def __init__(self, path: str, key: str | None) -> None:
        self.path = path
        self.key = key
        self.postgres = is_postgres(path)
        self.conn: sqlite3.Connection
        if self.postgres:
            from sogni_coordinator.storage.postgres import PgConnection

            pg = PgConnection(path, lock_timeout_s=WRITE_DEADLINE)
            self.conn = cast(sqlite3.Connection, pg)  # the subset components use
        else:
            self.conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
            )
        self.rlock = threading.RLock()
        self.refs = 0
        self.depth = 0
        """Transaction nesting of the thread holding `rlock` (0: no transaction open)."""
        self.synchronous: Literal["FULL", "NORMAL"] | None = None
        self.closed = False
        self._queue_lock = threading.Lock()
        self._queue: list[_Write] = []
        self._staged: list[_Write] = []
        """`call_staged` writes whose items are not stored yet: only the writer takes them."""
        self.wake: Callable[[_Write], None] | None = None
        """Set while a writer runs: tells it there is something to write (any thread)."""
        self.stats = WriteStats()
        self.failing: dict[str, WriteFailure] = {}
        """What is failing now ("database", "results"); written by whichever thread wrote."""

    # --- health: what readiness reads ----------------------------------------------------
    # replaced whole, never changed in place: the loop reads it while a writer thread writes
    def failed(self, what: Literal["database", "results"], error: str) -> None:
        now = time.monotonic()
        old = self.failing.get(what)
        since = now if old is None else old.since
        self.failing = {**self.failing, what: WriteFailure(what, since, now, error)}

    def succeeded(self, what: Literal["database", "results"]) -> None:
        if what in self.failing:  # a dict lookup per commit: nothing on the hot path
            self.failing = {k: v for k, v in self.failing.items() if k != what}

    # --- the queue ---------------------------------------------------------------------
    def enqueue(self, write: _Write) -> None:
        with self._queue_lock:
            (self._queue if write.stage is None else self._staged).append(write)
        wake = self.wake
        if wake is not None:
            wake(write)

    def pending(self, component: str | None = None) -> bool:
        """Anything queued (of `component`)?"""
        with self._queue_lock:
            return any(component in (None, w.component) for w in self._queue)

    def has_staged(self) -> bool:
        """Any `call_staged` write whose item is not stored yet?"""
        with self._queue_lock:
            return bool(self._staged)

    def stage(self) -> None:
        """Store the staged writes' items, a group per writer at once, and queue the writes
        whose items were stored; the others are told their error. Only the writer's staging
        thread (or `close`) calls this, without `rlock`: a `syncfs` blocks no reader."""
        with self._queue_lock:
            taken, self._staged = self._staged, []
        if not taken:
            return
        started = time.perf_counter()
        groups: dict[int, tuple[GroupWriter, list[_Write]]] = {}
        for write in taken:
            assert write.stage is not None
            writer = write.stage[0]
            groups.setdefault(id(writer), (writer, []))[1].append(write)
        failed: dict[int, BaseException] = {}
        for writer, writes in groups.values():
            try:
                errors = writer.write_group([w.stage[1] for w in writes if w.stage is not None])
            except Exception as exc:  # the whole group: none of its writes may commit
                errors = [exc] * len(writes)
            for write, error in zip(writes, errors, strict=True):
                if error is not None:
                    failed[id(write)] = error
        with self._queue_lock:
            self._queue.extend(w for w in taken if id(w) not in failed)
        stats = self.stats
        stats.stages += 1
        stats.staged += len(taken)
        stats.stage_s += time.perf_counter() - started
        stats.stage_failed += len(failed)
        faults = [f for f in map(storage_fault, failed.values()) if f is not None]
        if faults:
            self.failed("results", faults[0])
        elif len(failed) < len(taken):  # something was stored: the volume takes writes
            self.succeeded("results")
        refused = [write for write in taken if id(write) in failed]
        self.complete(refused, [(None, failed[id(write)]) for write in refused])

    def _take(self) -> list[_Write]:
        with self._queue_lock:
            taken, self._queue = self._queue, []
        return taken

    def _put_back(self, taken: list[_Write]) -> None:
        with self._queue_lock:
            self._queue[:0] = taken

    # --- transactions (the caller holds `rlock`) -----------------------------------------
    def begin(self) -> None:
        """`BEGIN IMMEDIATE`, waiting for another process's write lock up to the deadline."""
        if self.postgres:
            try:
                cast("PgConnection", self.conn).begin_write()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                raise DatabaseBusy(
                    f"database {_redacted(self.path)}: another coordinator held the write "
                    f"lock for {WRITE_DEADLINE:.0f} s"
                ) from exc
            return
        deadline = time.monotonic() + WRITE_DEADLINE
        pause = 0.01
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise DatabaseBusy(
                        f"database {self.path} stayed locked by another process for "
                        f"{WRITE_DEADLINE:.0f} s; find and stop it (a long `sqlite3` session?)"
                    ) from exc
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def apply(self, taken: list[_Write]) -> list[tuple[Any, BaseException | None]]:
        """Run queued writes inside the open transaction, each in its own savepoint."""
        out: list[tuple[Any, BaseException | None]] = []
        for write in taken:
            self.conn.execute("SAVEPOINT queued")
            try:
                result = write.fn()
            except Exception as exc:
                if not self.conn.in_transaction:  # SQLite rolled the whole transaction back
                    raise  # (disk full, I/O error): no write of the group stands, the savepoint
                    # is gone, and each must hear this error, not "no such savepoint"
                self.conn.execute("ROLLBACK TO queued")
                self.conn.execute("RELEASE queued")
                out.append((None, exc))
                fault = storage_fault(exc)  # a statement that spilled to a full disk
                if fault is not None:
                    self.failed("database", fault)
            else:
                self.conn.execute("RELEASE queued")
                out.append((result, None))
        return out

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    @staticmethod
    def complete(taken: list[_Write], outcomes: list[tuple[Any, BaseException | None]]) -> None:
        try:
            for write, (result, error) in zip(taken, outcomes, strict=True):
                write.done(result, error)
        finally:  # a `done` that raised still wakes them: a waiter fails, none hangs
            _wake_loops(taken)

    def flush(self) -> None:
        """Apply everything queued in one transaction (the writer's thread, or a reader
        that must see it); a failed transaction is reported to every write in it."""
        with self.rlock:
            if self.closed or not self._queue:
                return
            if self.depth:  # inside a transaction of this thread: it will take them
                return
            taken = self._take()
            started = time.perf_counter()
            changes = self.changes()
            try:
                self.begin()
                self.depth = 1
                try:
                    outcomes = self.apply(taken)
                    self.conn.execute("COMMIT")
                    stats = self.stats
                    stats.groups += 1
                    stats.writes += len(taken)
                    stats.commit_s += time.perf_counter() - started
                except BaseException:
                    self.rollback()
                    raise
                finally:
                    self.depth = 0
            except Exception as exc:  # busy past the deadline, disk full: none was written
                outcomes = [(None, exc)] * len(taken)
                self.stats.failed += 1
                self.failed("database", storage_fault(exc) or type(exc).__name__)
            else:
                self.committed(changes, outcomes)
        self.complete(taken, outcomes)

    def stage_and_flush(self) -> None:
        """Everything at once, blocking (a writer's end, `close`): staged items stored,
        then everything queued committed."""
        self.stage()
        self.flush()

    @contextmanager
    def transaction(self, component: str) -> Iterator[sqlite3.Connection]:
        """A transaction, or a savepoint inside the one this thread has open. When writes of
        `component` are queued, the queue goes first, in the same transaction."""
        with self.rlock:
            if self.depth:
                name = f"nested{self.depth}"
                self.conn.execute(f"SAVEPOINT {name}")
                self.depth += 1
                try:
                    yield self.conn
                except BaseException:
                    if self.conn.in_transaction:  # else SQLite rolled it all back (disk full):
                        self.conn.execute(f"ROLLBACK TO {name}")  # the error goes up as it is
                        self.conn.execute(f"RELEASE {name}")
                    raise
                else:
                    self.conn.execute(f"RELEASE {name}")
                finally:
                    self.depth -= 1
                return
            changes = self.changes()
            try:
                self.begin()
            except Exception as exc:
                self._tx_failed(exc)
                raise
            self.depth = 1
            taken = self._take() if self.pending(component) else []
            try:
                outcomes = self.apply(taken)
                yield self.conn
                try:
                    self.conn.execute("COMMIT")
                except Exception as exc:
                    self._tx_failed(exc)
                    raise
                self.committed(changes, outcomes)
            except BaseException as exc:
                fault = storage_fault(exc)  # a statement of the body met a full disk
                if fault is not None:
                    self.failed("database", fault)
                self.rollback()
                self._put_back(taken)
                raise
            finally:
                self.depth = 0
        self.complete(taken, outcomes)

    def changes(self) -> int:
        """Rows written on the connection so far (either engine's `total_changes`)."""
        return int(getattr(self.conn, "total_changes", 0))

    def committed(self, before: int, outcomes: list[tuple[Any, BaseException | None]]) -> None:
        """A transaction committed: the database takes writes again, if it wrote a row
        (an empty commit succeeds on a full disk too: it proves nothing) and none of its
        writes met a storage fault (a statement that spilled to a full disk)."""
        if (
            "database" in self.failing
            and self.changes() > before
            and not any(e is not None and storage_fault(e) is not None for _, e in outcomes)
        ):
            self.succeeded("database")

    def _tx_failed(self, exc: Exception) -> None:
        """A transaction's `BEGIN` or `COMMIT` failed: the storage, not the caller's code."""
        self.stats.failed += 1
        self.failed("database", storage_fault(exc) or type(exc).__name__)


class _ReadLock:
    """What a component holds to read: the connection's lock, after applying the queue if
    it holds writes of this component, so a read sees every write submitted before it."""

    def __init__(self, shared: _Shared, component: str) -> None:
        self._shared = shared
        self._component = component

    def __enter__(self) -> None:
        self._shared.rlock.acquire()
        try:
            if self._shared.pending(self._component):
                self._shared.flush()
        except BaseException:
            self._shared.rlock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._shared.rlock.release()


def _redacted(where: str) -> str:
    """A location fit for messages: a URL loses its password."""
    if "://" in where and "@" in where:
        scheme, rest = where.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return where


_registry: dict[str, _Shared] = {}
_registry_lock = threading.Lock()


def _open_shared(path: Path | str) -> _Shared:
    if is_postgres(path):  # one connection per database URL in this process
        url = location(path)
        with _registry_lock:
            shared = _registry.get(url)
            if shared is None:
                shared = _registry[url] = _Shared(url, url)
            shared.refs += 1
            return shared
    if str(path) == ":memory:":  # each in-memory database is its own
        memory = _Shared(":memory:", None)
        memory.refs = 1
        return memory
    key = str(Path(path).resolve())
    with _registry_lock:
        shared = _registry.get(key)
        if shared is None:
            shared = _registry[key] = _Shared(str(path), key)
            try:
                shared.conn.execute("PRAGMA journal_mode=WAL")
            except BaseException:
                shared.conn.close()
                del _registry[key]
                raise
        shared.refs += 1
        return shared


def _close_shared(shared: _Shared) -> None:
    with _registry_lock, shared.rlock:
        if shared.closed:
            return
        shared.refs -= 1
        if shared.refs > 0:
            return
        shared.closed = True
        if shared.key is not None and _registry.get(shared.key) is shared:
            del _registry[shared.key]
        shared.conn.close()


def _nothing() -> None:
    pass


def _ignored(_result: Any, _error: BaseException | None) -> None:
    pass


def _contained(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn` for `run_sync_soon`, where an exception would crash the event loop."""

    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("after_queued_failed")

    return run


def _log_failure(component: str, label: str) -> Done:
    def done(_result: Any, error: BaseException | None) -> None:
        if error is not None:
            log.error("db_write_failed", component=component, write=label, error=str(error))

    return done


def private_database_file(path: Path) -> None:
    """Create the database file readable by its owner only, and take group and others' read
    off an existing one and its WAL and shared-memory files (SQLite gives those the main
    file's mode): it holds the request keys that open live prompts (`prompt_crypto`), and the
    umask left it 0644, readable by every local user."""
    try:  # O_EXCL: never an fd on an existing file, whose close would drop every SQLite
        # lock this process holds on it (POSIX locks are per process and file)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return  # unreadable or a read-only folder: SQLite says what is wrong
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):
            mode = part.stat().st_mode & 0o777
            if mode & 0o077:
                part.chmod(mode & 0o700)


class Database:
    def __init__(
        self,
        path: Path | str,
        *,
        component: str,
        migrations: Sequence[str],
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        postgres_migrations: Mapping[int, str] | None = None,
    ) -> None:
        """`postgres_migrations`: version (1-based) -> the script PostgreSQL runs instead
        (for SQLite-only DDL such as a table rebuild)."""
        self.location = location(path)
        """The file path or the PostgreSQL URL, as given (`path` mangles a URL)."""
        self.postgres = is_postgres(path)
        self.path = Path(path)
        self.component = component
        if str(path) != ":memory:" and not self.postgres:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            private_database_file(self.path)
        self._shared = _open_shared(path)
        self._db = self._shared.conn
        self._lock = _ReadLock(self._shared, component)
        try:
            if self.postgres:
                with self._shared.rlock:
                    scripts = list(migrations)
                    for version, script in (postgres_migrations or {}).items():
                        scripts[version - 1] = script
                    self.schema_version = self._migrate(component, scripts)
                return
            with self._shared.rlock:
                # one connection, one setting: the strongest any component asked for
                if self._shared.synchronous != "FULL":
                    self._shared.synchronous = synchronous
                    self._db.execute(f"PRAGMA synchronous={synchronous}")
                self.schema_version = self._migrate(component, migrations)
                self._db.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            _close_shared(self._shared)
            raise

    def _migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Bring `component` to `len(migrations)`; returns that version.

        Foreign keys are off meanwhile (SQLite cannot change that inside a transaction), so
        a migration may rebuild a referenced table; `foreign_key_check` runs before commit.
        """
        target = len(migrations)
        self._db.execute("PRAGMA foreign_keys=OFF")
        with self._tx() as db:
            current = schema_version(db, component)
            if current > target:
                raise SchemaTooNew(
                    f"database {_redacted(self.location)}: the {component} schema is version "
                    f"{current}, newer than this code's version {target}; upgrade sogni-coordinator"
                )
            for script in migrations[current:]:
                for sql in split_statements(script):
                    db.execute(sql)
            if current < target:
                db.execute(_VERSIONS_TABLE)
                db.execute(
                    "INSERT INTO schema_versions VALUES (?, ?, ?) ON CONFLICT (component)"
                    " DO UPDATE SET version = excluded.version, migrated_at = excluded.migrated_at",
                    (component, target, time.time()),
                )
            if self.postgres:  # PostgreSQL checks foreign keys on every statement
                return target
            broken = db.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"{component} migration broke foreign keys: {broken[:3]}")
        return target

    def _has_table(self, name: str) -> bool:
        return table_exists(self._db, name)

    def close(self) -> None:
        """Apply what is queued, then let go of the shared connection (the last one closes)."""
        self._shared.stage_and_flush()
        _close_shared(self._shared)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (a savepoint when nested in one, e.g. inside a queued write)."""
        with self._shared.transaction(self.component) as db:
            yield db

    # --- the write queue -----------------------------------------------------------------
    @property
    def writer_running(self) -> bool:
        return self._shared.wake is not None

    def write_stats(self) -> WriteStats:
        """A copy of the file's writer counters (shared by every component on the file)."""
        return dataclasses.replace(self._shared.stats)

    def write_failures(self) -> list[WriteFailure]:
        """What is failing now on this file's writes (empty: the last of each kind worked)."""
        return list(self._shared.failing.values())

    def submit(self, label: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Write later, in the writer's next group (at once when no writer runs); a failure
        is logged with `label`. For writes nobody waits for: settlement, reputation."""
        call = functools.partial(fn, *args, **kwargs)
        done = _log_failure(self.component, label)
        if not self.writer_running:
            try:
                call()
            except Exception as exc:
                done(None, exc)
            return
        self._shared.enqueue(_Write(self.component, call, done, waited=False))

    def after_queued(self, fn: Callable[[], None]) -> None:
        """Run `fn` on this event loop once every write queued before it has been applied
        (at once when no writer runs): what it tells a client about them holds after a
        crash. A failed write is logged by its own `done`; `fn` still runs."""
        if not self.writer_running:
            fn()
            return
        wake = (trio.lowlevel.current_trio_token(), _contained(fn))
        self._shared.enqueue(_Write(self.component, _nothing, _ignored, wake=wake))

    async def durable(self) -> None:
        """Wait until every write queued so far has been applied (a write of nothing)."""
        await self.call(_nothing)

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Write in the writer's next group and return what `fn` returned (or raise what it
        raised). Cancelling the wait does not cancel the write."""
        call = functools.partial(fn, *args, **kwargs)
        if not self.writer_running:
            return await trio.to_thread.run_sync(call)
        return await self._queued(call, None)

    async def _queued(self, call: Callable[[], T], stage: Stage | None) -> T:
        """Queue `call` for the writer and wait for its outcome."""
        finished = trio.Event()
        box: list[tuple[Any, BaseException | None]] = []

        def done(result: Any, error: BaseException | None) -> None:  # the applying thread
            box.append((result, error))

        wake = (trio.lowlevel.current_trio_token(), finished.set)
        self._shared.enqueue(_Write(self.component, call, done, stage, wake=wake))
        await finished.wait()
        result, error = box[0]
        if error is not None:
            raise error
        return result  # type: ignore[no-any-return]

    async def call_staged(
        self, stage: Stage | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> T:
        """`call`, with `stage` stored first (see the module docstring): `fn` runs only once
        its item is durable, and this raises the item's error instead when it could not be
        stored. Without a running writer both run in one worker thread call."""
        if stage is None:
            return await self.call(fn, *args, **kwargs)
        call = functools.partial(fn, *args, **kwargs)
        if stage[0].joins(self.location):
            return await self._joined(stage, call)
        if not self.writer_running:
            writer, item = stage

            def both() -> T:
                [error] = writer.write_group([item])
                if error is not None:
                    raise error
                return call()

            return await trio.to_thread.run_sync(both)
        return await self._queued(call, stage)

    async def _joined(self, stage: Stage, call: Callable[[], T]) -> T:
        """`call_staged` for a writer whose rows are in this database: `call` runs first and
        its row is written after it, in the same savepoint, so both commit together (one
        commit, not the row's own first) or neither does. A `call` that answers False (a
        refused receipt: the job had one or ended) writes no row, so a refused duplicate
        never touches the committed image of the same key, and there is nothing to discard.
        A row that fails raises `StoreError` (an `OSError`, as a failed staged item does)
        and rolls `call`'s writes back with it."""
        from sogni_coordinator.results.base import StoreError  # results import db's users

        writer, item = stage
        wrote = [False]

        def both() -> T:
            result = call()
            if result is False:
                return result
            try:
                writer.write_rows(self._db, [item])
            except (sqlite3.Error, OSError) as exc:  # PgConnection raises sqlite3's errors
                raise StoreError(f"image row not stored: {str(exc)[:200]}") from exc
            wrote[0] = True
            return result

        if self.writer_running:
            result = await self._queued(both, None)
        else:

            def alone() -> T:
                with self._tx():
                    return both()

            result = await trio.to_thread.run_sync(alone)
        if wrote[0]:
            writer.kept([item])
        return result

    async def run_writer(self) -> None:
        """Apply queued writes in groups, one transaction each, in a worker thread, until
        cancelled; one writer per file. Staged writes' items (`call_staged`) are stored by a
        second worker thread, while the previous group commits, and join the next group
        once stored. What is still queued or staged then is written before it returns."""
        shared = self._shared
        if shared.wake is not None:
            raise RuntimeError(f"database {self.path} already has a writer")
        token = trio.lowlevel.current_trio_token()
        loop_thread = threading.get_ident()
        wanted = {"commit": trio.Event(), "stage": trio.Event()}
        staging = [False]  # the staging thread is storing images now

        def want(write: _Write) -> None:
            if write.stage is not None:
                wanted["stage"].set()  # its receipt is queued (and committed) once stored
            elif write.waited or not staging[0]:
                wanted["commit"].set()
            # else: a `submit` rides with the receipts the staging thread queues next

        def wake(write: _Write) -> None:
            if threading.get_ident() == loop_thread:  # a write from the loop: no wake-up
                want(write)  # socket write and callback per write
                return
            try:
                token.run_sync_soon(want, write)
            except trio.RunFinishedError:
                pass

        # their own threads: in trio's default pool (40) they queued behind whatever peers
        # can start at will (balance queries, key lookups), and receipts' commits waited
        own = trio.CapacityLimiter(2)

        async def stager() -> None:
            while True:
                await wanted["stage"].wait()
                wanted["stage"] = trio.Event()
                if shared.has_staged():
                    staging[0] = True
                    try:
                        await trio.to_thread.run_sync(shared.stage, limiter=own)
                    finally:
                        staging[0] = False
                    wanted["commit"].set()

        shared.wake = wake
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stager)
                while True:
                    await wanted["commit"].wait()
                    wanted["commit"] = trio.Event()
                    if shared.pending():
                        await trio.to_thread.run_sync(shared.flush, limiter=own)
        finally:
            shared.wake = None
            shared.stage_and_flush()
