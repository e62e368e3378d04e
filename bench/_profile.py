"""Where a process's event-loop thread spends its wall time: py-spy samples or cProfile stats.

py-spy (if installed: `pip install py-spy`) samples a running process from outside at a
fixed rate with `--idle`, without changing its code; it still takes about a quarter of a core
on a 2-core machine, so it samples one extra round, not a timed one. Without py-spy, cProfile
stats (written by `bench._coordinator` on a signal) are summarised instead; they come from an
extra round that the profiler slows down.

Both are reduced to the same shape: the share of the trio thread's wall time by category of
the innermost Python frame (self time; time inside a C call such as an SQLite commit or a
socket send counts for the Python function that made it), and the inclusive share of a few
named coordinator operations.
"""

from __future__ import annotations

import contextlib
import pstats
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

Match = Callable[[str], bool]
"""Predicate on one frame, written `function (path:line)` (py-spy's form)."""


def _any(*parts: str) -> Match:
    return lambda frame: any(p in frame for p in parts)


IDLE: Match = _any("_io_epoll.py")
"""The thread waits in epoll: nothing to do."""

CATEGORIES: list[tuple[str, Match]] = [
    (
        "SQLite statements and commits (incl. fsync)",
        _any("._tx (", "db.py", "store.py", "ledger.py", "reputation.py", "sqlite"),
    ),
    ("socket send/recv syscalls", _any("trio/_socket.py", "_socket.socket")),
    ("Noise encryption", _any("noise/", "cryptography", "ciphers.py")),
    ("yamux muxer (py-libp2p)", _any("yamux")),
    ("other py-libp2p (msgio, swarm, pubsub, identify)", _any("libp2p/")),
    ("ECDSA, keccak, checksums", _any("coincurve", "eth_hash", "Crypto/", "eth_utils", "eip712")),
    ("msgpack codec", _any("msgspec", "messages.py", "framing.py")),
    ("logging", _any("structlog", "logging/", "_log.py", "logs.py")),
    ("trio scheduler, locks, events", _any("trio/", "outcome", "contextlib")),
    ("sogni_net channels", _any("sogni_net/")),
    ("coordinator logic (dispatch, sessions)", _any("sogni_coordinator/", "sogni_protocol/")),
]

OPERATIONS: list[tuple[str, str, str]] = [
    (
        "verify + commit results (`Dispatcher.accept_result`)",
        "Dispatcher.accept_result",
        "dispatch",
    ),
    ("  of which committing on this thread (`Store.store_receipt`)", "store_receipt", "store"),
    ("  of which reputation updates (`Reputation.*`)", "Reputation.", "reputation"),
    ("  of which signer recovery (`recover_receipt_signer`)", "recover_receipt_signer", "eip712"),
    ("match + sign offers (`Dispatcher.match`)", "Dispatcher.match", "dispatch"),
    ("frames written (`Yamux._write_frame`: Noise + socket)", "Yamux._write_frame", "yamux"),
    ("frames read (`Yamux.handle_incoming`)", "Yamux.handle_incoming", "yamux"),
    (
        "direct channels written (`DirectStream.write`: Noise + socket)",
        "DirectStream.write",
        "direct",
    ),
    ("direct channels read (`DirectStream.read`)", "DirectStream.read", "direct"),
    ("streaming to clients (`client_session._stream`)", "_stream", "client_session"),
]
"""(label, qualified name as py-spy prints it, file-name hint for cProfile's bare names)."""


def _is_op(frame: str, qualname: str) -> bool:
    return frame.startswith(qualname) or f".{qualname}" in frame.split(" (", 1)[0]


@dataclass
class Profile:
    method: str
    seconds: float
    """Wall seconds of the event-loop thread covered."""
    idle: float
    """Share of that time spent waiting in epoll."""
    categories: list[tuple[str, float]]
    """Share of wall time by category of the innermost frame (idle excluded), largest first."""
    operations: list[tuple[str, float]]
    """Inclusive share of wall time of named operations."""

    @property
    def busy(self) -> float:
        return 1.0 - self.idle


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def sampling(pid: int, out: Path, rate: int = 200) -> Iterator[subprocess.Popen[bytes]]:
    """py-spy records `pid` for the duration of the block (raw collapsed stacks to `out`)."""
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed")
    argv = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--idle", "--nonblocking"]
    proc = subprocess.Popen(
        [*argv, "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-300:]}")


def from_py_spy(path: Path, rate: int = 200) -> Profile:
    """Summarise py-spy raw output, keeping only the thread that runs trio."""
    leaf: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "trio/_core/_run.py" not in stack:
            continue  # another thread (py-libp2p's cache cleaner, trio's thread cache)
        n = int(count)
        frames = stack.split(";")
        total += n
        if IDLE(frames[-1]):
            idle += n
            continue
        leaf[_category(frames[-1])] += n
        for label, qualname, _hint in OPERATIONS:
            if any(_is_op(f, qualname) for f in frames):
                ops[label] += n
    if total == 0:
        raise RuntimeError(f"no samples of the trio thread in {path}")
    return Profile(
        method=f"py-spy {rate} Hz, `--idle`, during one more round (not counted)",
        seconds=total / rate,
        idle=idle / total,
        categories=sorted(((k, v / total) for k, v in leaf.items()), key=lambda kv: -kv[1]),
        operations=[(label, ops[label] / total) for label, _, _ in OPERATIONS],
    )


def from_cprofile(path: Path) -> Profile:
    """Summarise cProfile stats (wall-clock timer) of the trio thread."""
    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    leaf: dict[str, float] = {}
    total = idle = 0.0
    cumulative: dict[str, float] = {}
    for (filename, line, name), (_cc, _nc, tottime, cumtime, _callers) in raw.items():
        frame = f"{name} ({filename}:{line})"
        total += tottime
        if "epoll" in name and "poll" in name:
            idle += tottime
            continue
        category = _category(frame)
        leaf[category] = leaf.get(category, 0.0) + tottime
        for label, qualname, hint in OPERATIONS:
            bare = qualname.rstrip(".").rsplit(".", 1)[-1]
            if hint in filename and (name == bare or qualname.endswith(".")):
                cumulative[label] = max(cumulative.get(label, 0.0), cumtime)
    return Profile(
        method="cProfile on the trio thread during one extra round (slowed by the profiler)",
        seconds=total,
        idle=idle / total,
        categories=sorted(((k, v / total) for k, v in leaf.items()), key=lambda kv: -kv[1]),
        operations=[(label, cumulative.get(label, 0.0) / total) for label, _, _ in OPERATIONS],
    )


def _category(frame: str) -> str:
    return next((label for label, match in CATEGORIES if match(frame)), "other (stdlib, misc)")
