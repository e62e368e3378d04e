"""Write docs/img/status.png: the coordinator's `GET /status` page after a few real renders.

Why a script: the README shows the page as it really looks, and a screenshot taken by hand
drifts from the code. This starts an in-process coordinator and two nodes on 127.0.0.1 (real
libp2p, the tiny diffusers model on the CPU, real SQLite; the same parts as
tests/e2e/test_status_page.py), renders a few images, and has Debian's headless `chromium`
screenshot the page. Run: `.venv/bin/python scripts/status_screenshot.py [OUT.png]`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio
from eth_account import Account

from sogni_app.api import render
from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.service import RunningCoordinator, Signer, run_coordinator
from sogni_node.config import NodeConfig
from sogni_node.daemon import run_node
from sogni_node.models.defaults import default_registry
from sogni_node.render.diffusers_backend import DiffusersBackend
from sogni_protocol.logs import configure_logging
from sogni_protocol.messages import RenderRequest
from sogni_wallet.keystore import Wallet

MODEL = "sogni-tiny-sd"
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse at dusk"  # never shown on the page: it keeps no prompt


def _screenshot(url: str, out: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is not installed: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={out}",
            "--window-size=1100,900",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


async def _main(tmp: Path, out: Path) -> None:
    backend = DiffusersBackend(default_registry(tmp / "models", test_model=True), threads=1)
    acct = Account.create()
    signer = Signer(acct.address, bytes(acct.key))
    config = CoordinatorConfig(
        data_dir=tmp / "coordinator",
        listen="/ip4/127.0.0.1/tcp/0",
        http_listen="127.0.0.1:0",
        models=[MODEL],
    )
    async with trio.open_nursery() as nursery:
        running: RunningCoordinator = await nursery.start(run_coordinator, config, signer)
        stops = []
        for name in ("node-a", "node-b"):
            node_acct = Account.create()
            wallet = Wallet(node_acct.address, bytes(node_acct.key))
            node_config = NodeConfig(
                data_dir=tmp / name,
                coordinators=[running.addrs[0]],
                trusted_coordinators=[signer.address],
                threads=1,
                http_listen="off",
            )
            stop = trio.Event()
            stops.append(stop)
            nursery.start_soon(
                lambda c=node_config, w=wallet, s=stop: run_node(c, w, backend, [MODEL], stop=s)
            )
        request = RenderRequest(
            model_id=MODEL,
            positive_prompt=PROMPT,
            steps=3,
            guidance=4.0,
            width=64,
            height=64,
            seed=7,
            number_of_images=6,
        )
        with trio.fail_after(300):
            result = await render(running.addrs[0], request)
        print(f"rendered {len(result.images)} images", file=sys.stderr)
        assert running.http_url is not None
        await trio.to_thread.run_sync(_screenshot, running.http_url + "/status", out)
        for stop in stops:
            stop.set()
        nursery.cancel_scope.cancel()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "status.png"
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="sogni-status-") as tmp:
        trio.run(_main, Path(tmp), out)
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
