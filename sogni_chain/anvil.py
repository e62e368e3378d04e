"""Start and stop a local anvil (from the pinned npm ``@foundry-rs/anvil``) for tests and dev.

anvil listens on 127.0.0.1 with a port it picks itself (``--port 0``; we read the port from
its log, so there is no window in which another process can take it), runs Cancun rules like
the embedded chain and the compiler target, and keeps its chain in a ``--state`` file that is
loaded at start and written at stop.

    python -m sogni_chain anvil --state .cache/anvil-state.json [--port 8545]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["Anvil", "AnvilError", "find_anvil"]

_REPO = Path(__file__).resolve().parent.parent
_NODE_MODULES = _REPO / "contracts" / "node_modules"
_LISTENING = re.compile(r"Listening on ([0-9.]+):(\d+)")


class AnvilError(RuntimeError):
    """anvil is missing or did not start; `todo`, when set, says what to do about it (the
    CLI error layer prints it)."""

    def __init__(self, message: str, todo: str | None = None) -> None:
        super().__init__(message)
        self.todo = todo


_IN_USE = re.compile(r"address already in use|os error 98|os error 48", re.IGNORECASE)


def _exited(code: int, host: str, port: int, log: str) -> AnvilError:
    """Why anvil stopped before it listened: a port in use in words, else its last lines."""
    if _IN_USE.search(log):
        return AnvilError(
            f"port {port} on {host} is already in use (another anvil, or another program)",
            "pick another --port, or stop the other anvil",
        )
    said = log.strip()[-2000:]
    return AnvilError(f"anvil exited with code {code}" + (f": {said}" if said else ""))


def _platform_package() -> str | None:
    system = {"Linux": "linux", "Darwin": "darwin"}.get(platform.system())
    arch = {"x86_64": "amd64", "AMD64": "amd64", "arm64": "arm64", "aarch64": "arm64"}.get(
        platform.machine()
    )
    return f"anvil-{system}-{arch}" if system and arch else None


def find_anvil() -> str | None:
    """Path of the anvil binary, or None.

    Order: ``$SOGNI_ANVIL``; the platform binary the npm package installs under
    ``contracts/node_modules/@foundry-rs/``; its ``.bin`` shim (a node wrapper); ``anvil`` on
    PATH.
    """
    env = os.environ.get("SOGNI_ANVIL")
    if env:
        return env if os.access(env, os.X_OK) else None
    pkg = _platform_package()
    candidates = []
    if pkg:
        candidates.append(_NODE_MODULES / "@foundry-rs" / pkg / "bin" / "anvil")
    candidates.append(_NODE_MODULES / ".bin" / "anvil")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("anvil")


class Anvil:
    """A running anvil process; use as a context manager.

    ``state``: file to load at start (if present) and dump at stop; None for a throwaway chain.
    ``port=0`` lets anvil choose a free port; ``url`` is set once it listens.
    """

    def __init__(
        self,
        *,
        state: str | Path | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        hardfork: str = "cancun",
        chain_id: int | None = None,
        accounts: int = 10,
        binary: str | None = None,
        log_path: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.binary = binary or find_anvil()
        if self.binary is None:
            raise AnvilError(
                "anvil is not installed: run `npm ci --prefix contracts` "
                "(installs @foundry-rs/anvil) or set SOGNI_ANVIL"
            )
        self.state = Path(state) if state is not None else None
        self.host = host
        self.port = port
        self.hardfork = hardfork
        self.chain_id = chain_id
        self.accounts = accounts
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self._log_path = Path(log_path) if log_path is not None else None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.url: str = ""

    def command(self) -> list[str]:
        assert self.binary is not None
        cmd = [
            self.binary,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--hardfork",
            self.hardfork,
            "--accounts",
            str(self.accounts),
        ]
        if self.chain_id is not None:
            cmd += ["--chain-id", str(self.chain_id)]
        if self.state is not None:
            cmd += ["--state", str(self.state)]
        return cmd + list(self.extra_args)

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="sogni-anvil-")
            self._log_path = Path(self._tmpdir.name) / "anvil.log"
        return self._log_path

    def start(self) -> Anvil:
        if self._proc is not None:
            raise AnvilError("anvil already started")
        if self.state is not None:
            self.state.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        try:
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text("utf-8", errors="replace")
            match = _LISTENING.search(text)
            if match:
                self.port = int(match.group(2))
                self.url = f"http://{match.group(1)}:{self.port}"
                return self
            if self._proc.poll() is not None:
                raise _exited(self._proc.returncode, self.host, self.port, text)
            time.sleep(0.05)
        self.stop()
        raise AnvilError(f"anvil did not start within {self.startup_timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (anvil then writes its ``--state`` file), SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
            self._log_path = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run anvil in the foreground until Ctrl-C, printing its URL."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m sogni_chain anvil",
        description="Start the pinned anvil for Sogni development.",
    )
    parser.add_argument("--state", default=".cache/anvil-state.json", help="state file")
    parser.add_argument("--port", type=int, default=8545, help="port (0: anvil picks one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwind through stop(), so anvil writes its state

    signal.signal(signal.SIGTERM, on_term)
    with Anvil(state=args.state, port=args.port, host=args.host) as node:
        print(f"anvil listening on {node.url} (state: {args.state}); Ctrl-C to stop", flush=True)
        try:
            while node.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
