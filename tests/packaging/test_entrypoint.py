"""The images' entrypoint (`docker/entrypoint.sh`), run as it is, outside a container.

No Docker engine runs here, so the script itself is what CI checks: a coordinator and a node
configured by `SOGNI_*` env alone, their keystores handed over as secrets (a mounted file of
the wrong mode, a variable) and their passwords likewise; the node connects, `/healthz`
answers, the image's HEALTHCHECK command agrees, and SIGTERM to the very process the
container would run (the script `exec`s) ends each daemon cleanly with exit code 0.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sogni_devnet.cluster import free_port
from sogni_devnet.localnet import Proc
from sogni_wallet.keystore import create_keystore, load_wallet

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent
PASSWORD = "container secret pw"
GRACE = 5.0


UNREACHABLE_PEER = "12D3KooWNDUxrJgsgq7ocTuLmYg3pqSQ2m9Sz1jBzj4TZs5p3HwB"
"""A well-formed peer id for a coordinator address nothing answers at."""


def _env(**extra: str) -> dict[str, str]:
    """A clean env (no caller SOGNI_*), the venv's commands first on PATH, like the image."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOGNI_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["SOGNI_KDF_N"] = "4"
    env.update(extra)
    return env


def _spawn(name: str, args: list[str], env: dict[str, str], workdir: Path) -> Proc:
    log_path = workdir / f"{name}.log"
    with log_path.open("w") as log:
        popen = subprocess.Popen(
            ["sh", str(ENTRYPOINT), *args],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
            cwd=workdir,
        )
    return Proc(name, popen, log_path)


def _get(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, json.loads(resp.read())


def _wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _stop_clean(proc: Proc) -> float:
    """SIGTERM, as `docker stop` sends it; the exit code must be 0 within the grace."""
    start = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    code = proc.popen.wait(timeout=GRACE + 10)
    took = time.monotonic() - start
    assert code == 0, f"{proc.name} exited {code}; see {proc.log_path}"
    assert took < GRACE + 5
    return took


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_entrypoint_runs_the_node_from_env_and_it_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    wallet = create_keystore(tmp_path / "in" / "wallet.json", PASSWORD, kdf_n=4)
    mounted = tmp_path / "in" / "wallet.json"
    mounted.chmod(0o644)  # a mounted secret is often world-readable: the daemon would refuse it
    password_file = tmp_path / "in" / "password"
    password_file.write_text(PASSWORD + "\n")
    http = free_port()
    env = _env(
        SOGNI_NODE_DATA_DIR=str(tmp_path / "n"),
        SOGNI_NODE_HTTP_LISTEN=f"127.0.0.1:{http}",
        SOGNI_NODE_DEVICE="cpu",
        SOGNI_NODE_THREADS="1",
        SOGNI_NODE_SHUTDOWN_GRACE=str(GRACE),
        SOGNI_NODE_LOG_JSON="true",
        SOGNI_NODE_KEYSTORE_FILE=str(mounted),
        SOGNI_NODE_PASSWORD_FILE=str(password_file),
        # a node without coordinators refuses to start; nothing listens on port 9
        SOGNI_NODE_COORDINATORS=f"/ip4/127.0.0.1/tcp/9/p2p/{UNREACHABLE_PEER}",
        SOGNI_NODE_TRUSTED_COORDINATORS="0x" + "11" * 20,
    )
    node = _spawn("node", ["node", "--announce"], env, tmp_path)
    try:
        ready = node.wait_event("ready", 60)
        assert ready["http"] == f"http://127.0.0.1:{http}"
        # exec: the pid the platform signals is the daemon itself, not a shell around it
        assert "sogni-node start --announce" in _cmdline(node.popen.pid)
        copied = tmp_path / "n" / ".secrets" / "wallet.json"
        assert stat.S_IMODE(copied.stat().st_mode) == 0o600
        assert stat.S_IMODE(copied.parent.stat().st_mode) == 0o700
        assert copied.read_bytes() == mounted.read_bytes()

        status, facts = _get(f"http://127.0.0.1:{http}/healthz")
        assert status == 200 and facts["role"] == "node"  # up (its coordinator unreachable)
        # the daemon unlocked the keystore it was handed, with the password from the file
        ready_log = _wait_for(
            lambda: next(
                (
                    json.loads(line)
                    for line in node.log_path.read_text().splitlines()
                    if '"node_ready"' in line
                ),
                None,
            ),
            10,
            "no node_ready event in the node's log",
        )
        assert ready_log["wallet"] == wallet
        # the image's HEALTHCHECK command, with the container's 0.0.0.0 listen address
        probe_env = _env(SOGNI_NODE_HTTP_LISTEN=f"0.0.0.0:{http}")
        check = subprocess.run(["sh", str(ENTRYPOINT), "health", "node"], env=probe_env, timeout=20)
        assert check.returncode == 0

        _stop_clean(node)
        down = subprocess.run(
            ["sh", str(ENTRYPOINT), "health", "node"],
            env=probe_env,
            capture_output=True,
            timeout=20,
        )
        assert down.returncode != 0  # the platform's probe sees it gone
        events = [e.get("event") for e in node.events]
        assert "ready" in events
        log = node.log_path.read_text()
        assert '"event": "node_stopped"' in log
        assert PASSWORD not in log and "ciphertext" not in log
    finally:
        node.stop()


def _stub(tmp_path: Path, name: str, body: str) -> dict[str, str]:
    """PATH with a fake `name` first: its `start` runs `body` (sh); other commands are real."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / name
    stub.write_text(
        f'#!/bin/sh\nif [ "$1" = start ]; then shift; {body}; exit 0; fi\n'
        f'exec "{VENV_BIN}/{name}" "$@"\n'
    )
    stub.chmod(0o755)
    return {"PATH": f"{stub_dir}{os.pathsep}{_env()['PATH']}"}


def test_coordinator_role_gets_its_keystore_from_a_variable_and_is_execd(
    tmp_path: Path,
) -> None:
    """The coordinator role, with `sogni-coordinator start` stubbed (the node test above runs
    a real daemon): the keystore JSON in a variable becomes a 0600 file; the variable holding
    it is gone and the stub runs in the entrypoint's own process (exec)."""
    keystore = create_keystore(tmp_path / "in" / "signer.json", PASSWORD, kdf_n=4)
    path = _stub(
        tmp_path,
        "sogni-coordinator",
        'printf "%s\\n" "$$" "$SOGNI_COORDINATOR_KEYSTORE" "$SOGNI_COORDINATOR_PASSWORD" '
        '"${SOGNI_COORDINATOR_KEYSTORE_JSON-gone}" "$*"',
    )
    env = _env(
        SOGNI_COORDINATOR_DATA_DIR=str(tmp_path / "c"),
        SOGNI_COORDINATOR_KEYSTORE_JSON=(tmp_path / "in" / "signer.json").read_text(),
        SOGNI_COORDINATOR_PASSWORD=PASSWORD,
        **path,
    )
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "coordinator", "--announce"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    pid, keystore_path, password, leftover, args = out.splitlines()
    assert proc.returncode == 0 and int(pid) == proc.pid
    assert keystore_path == str(tmp_path / "c" / ".secrets" / "signer.json")
    assert stat.S_IMODE(Path(keystore_path).stat().st_mode) == 0o600
    assert json.loads(Path(keystore_path).read_text())["address"].lower() == keystore[2:].lower()
    assert password == PASSWORD and leftover == "gone" and args == "--announce"


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_entrypoint_refuses_unusable_secrets_before_starting(tmp_path: Path) -> None:
    base = {"SOGNI_NODE_DATA_DIR": str(tmp_path / "n")}
    missing = _run(_env(**base, SOGNI_NODE_PASSWORD_FILE=str(tmp_path / "nope")), "node")
    assert missing.returncode == 1 and "SOGNI_NODE_PASSWORD_FILE" in missing.stderr
    both = _run(_env(**base, SOGNI_NODE_KEYSTORE_FILE="/x", SOGNI_NODE_KEYSTORE_JSON="{}"), "node")
    assert both.returncode == 1 and "not both" in both.stderr
    # a throwaway key without a payout address would strand its rewards
    lost = _run(_env(**base, SOGNI_NODE_KEY="ephemeral"), "node")
    assert lost.returncode == 1 and "SOGNI_NODE_PAYOUT_ADDRESS" in lost.stderr
    assert _run(_env(**base), "bogus").returncode == 2
    assert not (tmp_path / "n" / ".secrets").exists()


def test_ephemeral_key_is_created_private(tmp_path: Path) -> None:
    """`SOGNI_NODE_KEY=ephemeral`: the real `keys create` makes a fresh key, 0600 in the data
    dir, under a random password that only the daemon's environment holds (`start` stubbed)."""
    path = _stub(
        tmp_path, "sogni-node", 'printf "%s\\n" "$SOGNI_NODE_KEYSTORE" "$SOGNI_NODE_PASSWORD"'
    )
    payout = "0x" + "ab" * 20
    env = _env(
        SOGNI_NODE_DATA_DIR=str(tmp_path / "n"),
        SOGNI_NODE_KEY="ephemeral",
        SOGNI_NODE_PAYOUT_ADDRESS=payout,
        **path,
    )
    result = _run(env, "node")
    assert result.returncode == 0, result.stderr
    keystore_path, password = result.stdout.splitlines()
    keystore = Path(keystore_path)
    assert keystore == tmp_path / "n" / ".secrets" / "wallet.json"
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600
    assert len(password) >= 32
    assert load_wallet(keystore, password).address  # the pair works
    assert password not in result.stderr


def test_models_are_fetched_once_from_urls_and_checked_against_their_digest(
    tmp_path: Path,
) -> None:
    """`SOGNI_NODE_MODEL_URLS` (Salad has no volumes): download from a local HTTP server,
    verify the sha256, hand the file to `models add` (stubbed: it records what it got), and
    skip the download on the next start. A wrong digest stops the container before `start`."""
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "www"
    served.mkdir()
    weights = b"not really weights " * 1000
    (served / "model.safetensors").write_bytes(weights)
    digest = hashlib.sha256(weights).hexdigest()
    hits: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(served), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        added = tmp_path / "added"
        stub_dir = tmp_path / "bin"
        stub_dir.mkdir()
        (stub_dir / "sogni-node").write_text(
            '#!/bin/sh\ncase "$1" in\n'
            f'  models) cp "$3" "{added}"; echo "$2" >"{added}.cmd" ;;\n'
            "  start) echo started ;;\nesac\n"
        )
        (stub_dir / "sogni-node").chmod(0o755)
        url = f"http://127.0.0.1:{server.server_address[1]}/model.safetensors"
        env = _env(SOGNI_NODE_DATA_DIR=str(tmp_path / "n"))
        env["PATH"] = f"{stub_dir}{os.pathsep}{env['PATH']}"

        bad = _run({**env, "SOGNI_NODE_MODEL_URLS": f"{url}#sha256={'0' * 64}"}, "node")
        assert bad.returncode == 1 and "not fetched" in bad.stderr and "started" not in bad.stdout
        assert not added.exists()
        assert list((tmp_path / "n" / "models" / ".fetched").iterdir()) == []  # no .part left
        unpinned = _run({**env, "SOGNI_NODE_MODEL_URLS": url}, "node")
        assert unpinned.returncode == 1 and "sha256" in unpinned.stderr

        env["SOGNI_NODE_MODEL_URLS"] = f"{url}#sha256={digest}"
        first = _run(env, "node")
        assert first.returncode == 0 and first.stdout.strip() == "started", first.stderr
        assert added.read_bytes() == weights and added.with_suffix(".cmd").read_text() == "add\n"
        assert len(hits) == 2
        second = _run(env, "node")
        assert second.returncode == 0 and len(hits) == 2  # already added: not downloaded again
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
