"""`GET /status` loaded in a real headless browser (Debian's `chromium`, installed by
`make test` where it can) and checked against the coordinator's own state: nodes by tier and
model, queue depth, the last hour's receipts, and no prompt anywhere on the page."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import trio

from sogni_app.api import render

from .conftest import MODEL, start_net, tiny_request

pytestmark = pytest.mark.filterwarnings("ignore")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Page(HTMLParser):
    """The facts the page shows, by element id (cards, tables, the chart's bars)."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.bars: list[int] = []
        self._card: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._bold = False
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and a.get("class") == "card":
            self._card = a.get("id")
        elif tag == "b" and self._card:
            self._bold = True
        elif tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self._cell = []
        elif tag == "rect":
            self.bars.append(int(a.get("data-count") or 0))

    def handle_endtag(self, tag: str) -> None:
        if tag == "b":
            self._bold = False
        elif tag == "div":
            self._card = None
        elif tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table" and self._table is not None:
            self.tables[self._table] = [r for r in self.tables[self._table] if r]  # header
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._bold and self._card:
            self.cards[self._card] = data.strip()
        if self._cell is not None:
            self._cell.append(data)


def _browse(url: str) -> str:
    """The DOM as headless Chromium renders it."""
    assert CHROMIUM is not None
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
async def test_status_page_shows_the_network_in_a_browser(tmp_path: Path, backend: Any) -> None:
    async with start_net(tmp_path) as net:
        await net.add_node(backend, "a")
        await net.add_node(backend, "b")
        with trio.fail_after(90):
            result = await render(net.addr, tiny_request(3))
        assert len(result.images) == 3
        assert net.coordinator.http_url is not None
        dom = await trio.to_thread.run_sync(_browse, net.coordinator.http_url + "/status")
        d = net.coordinator.dispatcher
        counts = d.job_counts()
        receipts = len(d.store.receipts())

    page = _Page()
    page.feed(dom)
    assert page.cards["nodes"] == "2"
    assert page.cards["queued"] == str(counts["queued"]) == "0"
    assert dict((r[0], int(r[1])) for r in page.tables["models"]) == {MODEL: 2}
    assert dict((r[0], int(r[1])) for r in page.tables["tiers"]) == {"fast": 2, "relaxed": 2}
    assert len(page.bars) == 12 and sum(page.bars) == receipts == 3
    assert page.bars[-1] == 3  # all in the last five minutes
    assert net.signer.address in dom
    assert tiny_request(3).positive_prompt not in dom  # never a prompt
