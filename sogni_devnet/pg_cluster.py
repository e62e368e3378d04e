"""A throwaway PostgreSQL server in a temp folder, on 127.0.0.1 and a free port.

Why: the shared job queue (and later every coordinator table of issue #18) must be tested
against a real PostgreSQL, started the same way on a developer machine and in CI, without a
system service or a password. The binaries are Debian's `postgresql` package (installed by
`scripts/ensure-system-deps.sh`); `initdb` refuses to run as root, so as root every server
command runs as the `postgres` user (`runuser -u postgres --`) and the folder is theirs.
Authentication is `trust` on 127.0.0.1 and on the unix socket inside the folder: only this
machine can reach it, and the folder dies with the server. `fast=True` (tests) turns off
fsync and synchronous commit: a crash loses the cluster anyway.

    python -m sogni_devnet.pg_cluster start [--dir D]   # prints the URL and the folder
    python -m sogni_devnet.pg_cluster stop --dir D
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PgCluster",
    "PgClusterError",
    "find_bindir",
    "missing_reason",
    "reap_orphans",
    "release_shared_cluster",
    "shared_cluster",
    "start_cluster",
]

BINDIR_ENV = "SOGNI_PG_BINDIR"
"""Folder holding initdb, pg_ctl and postgres, when not Debian's /usr/lib/postgresql/N/bin."""
READY_DEADLINE = 30.0
SUPERUSER = "postgres"
REQUIRE_ENV = "SOGNI_REQUIRE_POSTGRES"
"""Set to 1 (CI) to make tests fail, not skip, when PostgreSQL is missing."""
_STATE_FILE = "cluster.json"
_NEEDED = ("initdb", "pg_ctl", "postgres")


class PgClusterError(RuntimeError):
    """The server could not be found, started or stopped; the message says what to do."""


def find_bindir() -> Path | None:
    """Where the PostgreSQL server binaries are, or None when they are not installed."""
    if env := os.environ.get(BINDIR_ENV):  # set: that folder or nothing
        return Path(env) if all((Path(env) / n).is_file() for n in _NEEDED) else None
    candidates: list[Path] = []
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    if found := shutil.which("initdb"):
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in _NEEDED):
            return folder
    return None


def missing_reason() -> str | None:
    """Why no server can be started here (None: the binaries are installed)."""
    if find_bindir() is not None:
        return None
    where = os.environ.get(BINDIR_ENV)
    return (
        f"PostgreSQL binaries (initdb, pg_ctl, postgres) not found in {BINDIR_ENV}={where}"
        if where
        else "PostgreSQL binaries not found: install the Debian package postgresql "
        "(scripts/ensure-system-deps.sh installs it when run as root)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_owner() -> list[str]:
    """Prefix that runs a server command as `postgres` when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PgClusterError("running as root without `runuser`: cannot start PostgreSQL")
    return [runuser, "-u", SUPERUSER, "--"]


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PgClusterError(f"{what} failed (exit {done.returncode}): {' | '.join(tail)}")


@dataclass
class PgCluster:
    """One running server: its folder (data, socket, log) and its port on 127.0.0.1."""

    root: Path
    port: int
    bindir: Path
    owner_pid: int | None = None
    """The process whose exit makes this server an orphan (None: it outlives its starter)."""

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for `dbname` on this server (trust authentication, no password)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def ready(self) -> bool:
        """Does the server accept connections now?"""
        done = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
        )
        return done.returncode == 0

    def create_database(self, name: str, template: str = "template1") -> str:
        """A fresh database (copied from `template`: milliseconds); returns its URL."""
        self._sql(f'CREATE DATABASE "{_ident(name)}" TEMPLATE "{_ident(template)}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._sql(f'DROP DATABASE IF EXISTS "{_ident(name)}" WITH (FORCE)')

    def _sql(self, statement: str) -> None:
        _run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.url(),
                "-c",
                statement,
            ],
            "psql",
        )

    def stop(self, *, remove: bool = True) -> None:
        """Stop the server at once (no checkpoint: it is thrown away) and delete its folder."""
        if (self.data / "postmaster.pid").exists():
            _run(
                [
                    *_as_owner(),
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                "pg_ctl stop",
            )
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def save(self) -> None:
        (self.root / _STATE_FILE).write_text(
            json.dumps({"port": self.port, "bindir": str(self.bindir), "owner_pid": self.owner_pid})
        )

    @classmethod
    def load(cls, root: Path) -> PgCluster:
        try:
            state = json.loads((root / _STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise PgClusterError(f"{root} holds no cluster started by this module") from exc
        owner = state.get("owner_pid")
        return cls(
            root=root,
            port=int(state["port"]),
            bindir=Path(state["bindir"]),
            owner_pid=None if owner is None else int(owner),
        )


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise PgClusterError(f"database name {name!r}: use letters, digits and _ only")
    return name


def start_cluster(
    root: Path | None = None, *, fast: bool = True, owner_pid: int | None = None
) -> PgCluster:
    """initdb + start a server in `root` (a new temp folder when None) and wait until it
    accepts connections; raises `PgClusterError` naming the cause (and the log's tail)."""
    bindir = find_bindir()
    if bindir is None:
        raise PgClusterError(missing_reason() or "PostgreSQL binaries not found")
    if root is not None:  # the caller's folder stays after a failure, to read its log
        root.mkdir(parents=True, exist_ok=True)
        return _start(root, bindir, fast, owner_pid)
    root = Path(tempfile.mkdtemp(prefix="sogni-pg-"))
    try:
        return _start(root, bindir, fast, owner_pid)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _start(root: Path, bindir: Path, fast: bool, owner_pid: int | None) -> PgCluster:
    prefix = _as_owner()
    if prefix:  # the server's files must belong to the user it runs as
        user = pwd.getpwnam(SUPERUSER)
        os.chown(root, user.pw_uid, user.pw_gid)
        if subprocess.run([*prefix, "test", "-w", str(root)], check=False).returncode != 0:
            raise PgClusterError(
                f"the {SUPERUSER} user cannot reach {root} (a parent folder is private); "
                "use a folder under /tmp, or omit --dir"
            )
    cluster = PgCluster(root=root, port=0, bindir=bindir, owner_pid=owner_pid)
    _run(
        [
            *prefix,
            str(bindir / "initdb"),
            "-D",
            str(cluster.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        "initdb",
    )
    cluster.socket_dir.mkdir(exist_ok=True)
    if prefix:
        shutil.chown(cluster.socket_dir, SUPERUSER, SUPERUSER)
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": f"'{cluster.socket_dir}'",
        "max_connections": "100",
        "shared_buffers": "32MB",
        "dynamic_shared_memory_type": "mmap",  # containers often have a tiny /dev/shm
        "logging_collector": "off",
    }
    if fast:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    with (cluster.data / "postgresql.conf").open("a") as conf:
        conf.write("\n# sogni_devnet.pg_cluster\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    last: PgClusterError | None = None
    for _ in range(5):  # another process may take the free port before the server binds it
        cluster.port = _free_port()
        try:
            _run(
                [
                    *prefix,
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(cluster.data),
                    "-l",
                    str(cluster.log_file),
                    "-o",
                    f"-p {cluster.port}",
                    "-w",
                    "-t",
                    str(int(READY_DEADLINE)),
                    "start",
                ],
                "pg_ctl start",
            )
        except PgClusterError as exc:
            last = exc
            log = cluster.log_file.read_text() if cluster.log_file.exists() else ""
            if "could not bind" in log or "already in use" in log:
                continue
            raise PgClusterError(f"{exc}; server log: {_tail(cluster.log_file)}") from exc
        break
    else:
        raise PgClusterError(f"no free port after 5 tries: {last}")
    deadline = time.monotonic() + READY_DEADLINE
    while not cluster.ready():
        if time.monotonic() > deadline:
            cluster.stop(remove=False)
            raise PgClusterError(
                f"PostgreSQL in {root} did not accept connections within {READY_DEADLINE:.0f} s; "
                f"server log: {_tail(cluster.log_file)}"
            )
        time.sleep(0.05)
    cluster.save()
    return cluster


def _tail(path: Path) -> str:
    try:
        return " | ".join(path.read_text().strip().splitlines()[-3:])
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans(parent: Path | None = None) -> list[Path]:
    """Stop and delete the servers in `parent` (the temp folder) whose owning process is
    gone: a test run killed by a timeout leaves its server running otherwise."""
    reaped = []
    for state in Path(parent or tempfile.gettempdir()).glob(f"sogni-pg-*/{_STATE_FILE}"):
        try:
            cluster = PgCluster.load(state.parent)
        except (PgClusterError, KeyError, ValueError):
            continue
        if cluster.owner_pid is not None and not _alive(cluster.owner_pid):
            try:
                cluster.stop()
            except PgClusterError:
                continue
            reaped.append(cluster.root)
    return reaped


_shared: PgCluster | None = None
_shared_lock = threading.Lock()


def shared_cluster() -> PgCluster:
    """One server for this whole process (a test session), started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            reap_orphans()
            _shared = start_cluster(owner_pid=os.getpid())
            atexit.register(release_shared_cluster)
        return _shared


def release_shared_cluster() -> None:
    """Stop the process's shared server, if one was started (idempotent)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            cluster, _shared = _shared, None
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sogni_devnet.pg_cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a server; prints its URL and folder")
    start.add_argument("--dir", type=Path, default=None, help="folder (default: a new temp one)")
    start.add_argument("--durable", action="store_true", help="keep fsync on")
    stop = sub.add_parser("stop", help="stop a server started by `start` and delete its folder")
    stop.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            if args.dir is not None and (args.dir / "data").exists():
                raise PgClusterError(f"{args.dir} already holds a cluster; stop it first")
            cluster = start_cluster(args.dir, fast=not args.durable)
            print(f"url={cluster.url()}")
            print(f"dir={cluster.root}")
        else:
            PgCluster.load(args.dir).stop()
            print(f"stopped {args.dir}")
    except PgClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
