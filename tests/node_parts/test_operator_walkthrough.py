"""What a node operator meets when things go wrong: a journal that cannot be written or is
damaged, failures outside the render, library chatter in the log, file modes, models added
while running, a second Ctrl-C, an empty data folder variable, a local disk error during
`rewards`, and the live status view's cost.

The node here is the real pull loop (`tests.node_parts.test_node_resilience`'s scripted
coordinator); disk-full is SQLite's own (`PRAGMA max_page_count`), not a mock.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from sogni_node import daemon, epoch_fetch, status_view
from sogni_node import journal as journal_module
from sogni_node.cli import app
from sogni_node.config import config_sources, load_node_config
from sogni_node.http_api import NodeView, not_ready
from sogni_node.journal import Journal, JournalError
from sogni_node.metrics import LiveState, NodeMetrics, metered
from sogni_node.render.backend import RenderCancelled, RenderJob, RenderOutput
from sogni_node.trajectory_files import TrajectoryFiles
from sogni_protocol import logs
from sogni_protocol.cli_errors import classify
from sogni_protocol.logs import configure_logging
from sogni_protocol.messages import HandBack, OfferDeclined, Ready, Result
from sogni_protocol.relay_messages import EpochIndex
from tests.node_parts.test_node_journal import SIG, offer
from tests.node_parts.test_node_resilience import MARK, MODEL, PNG, Link, coordinator, node

BIG = 64 * 1024
"""An image larger than a SQLite page: its row needs new pages, which a full disk refuses."""


class BigImageBackend:
    name = "big"
    supports_loras = False

    def __init__(self) -> None:
        self.calls = 0
        self.fail_stage: str | None = None

    def render(
        self, job: RenderJob, on_step: Callable[[int], None], should_cancel: Callable[[], bool]
    ) -> RenderOutput:
        self.calls += 1
        for step in range(1, job.steps + 1):
            if should_cancel():
                raise RenderCancelled(step - 1)
            on_step(step)
        return RenderOutput(PNG + os.urandom(BIG), job.steps, self.name, "cpu", "float32", 1)

    def close(self) -> None:
        pass


def sample(worker: Any, name: str, **labels: str) -> float | None:
    value = worker.metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


async def next_ready(link: Link, want: Callable[[int], bool], timeout: float = 10.0) -> Ready:
    with trio.fail_after(timeout):
        while True:
            msg = await link.next(Ready)
            if want(msg.slots):
                return msg


def fill_disk(journal: Journal) -> None:
    """SQLite's "database or disk is full" from now on for a write that needs a new page."""
    pages = journal._db.execute("PRAGMA page_count").fetchone()[0]
    journal._db.execute(f"PRAGMA max_page_count = {pages}")


def free_disk(journal: Journal) -> None:
    journal._db.execute("PRAGMA max_page_count = 1073741823")


# --- 1, 2: a journal that cannot be written; failures outside the render --------------------------
async def test_a_journal_that_cannot_be_written_takes_no_job_until_a_probe_write_works(
    tmp_path: Path,
) -> None:
    backend = BigImageBackend()
    async with coordinator() as coord, node(tmp_path, coord, backend) as n:  # type: ignore[arg-type]
        link = await coord.link()
        journal, worker = n.journal, n.worker
        view = NodeView(
            "peer", "0xw", worker, lambda: 1, 1, models=[MODEL],
            journal_fault=lambda: journal.write_fault,
        )  # fmt: skip
        gauge = LiveState(worker, lambda: 1, 1, journal)
        assert not_ready(view) is None
        fill_disk(journal)
        first = coord.offer(1)
        await link.channel.send(first)
        back = await link.next(HandBack, Result)
        assert isinstance(back, HandBack) and back.job_id == first.offer.job_id
        assert journal.write_fault == "disk full (OperationalError)"
        await next_ready(link, lambda slots: slots == 0)  # no credit: no job it cannot record
        second = coord.offer(2)
        await link.channel.send(second)
        declined = await link.next(OfferDeclined, HandBack, Result)
        assert isinstance(declined, OfferDeclined) and "journal" in declined.reason
        assert backend.calls == 1  # the second offer never reached a render slot
        reason = not_ready(view)
        assert reason is not None and reason.startswith("journal not writable: disk full")
        [writable] = [m for m in gauge.collect() if m.name == "sogni_node_journal_writable"]
        assert writable.samples[0].value == 0
        failed = "sogni_node_jobs_failed_total"
        assert sample(worker, failed, model=MODEL, stage="journal") == 1
        assert sample(worker, failed, model=MODEL, stage="render") == 0
        assert not journal.probe_write()  # still full: the probe writes what an image takes

        free_disk(journal)
        back_again = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon._probe_journal, journal, back_again.set, 0.05)
            with trio.fail_after(10):
                await back_again.wait()
            nursery.cancel_scope.cancel()
        assert journal.writable and not_ready(view) is None
        [writable] = [m for m in gauge.collect() if m.name == "sogni_node_journal_writable"]
        assert writable.samples[0].value == 1
        await next_ready(link, lambda slots: slots > 0)
        third = coord.offer(3)
        await link.channel.send(third)
        result = await link.next(Result, HandBack, OfferDeclined)
        assert isinstance(result, Result) and result.job_id == third.offer.job_id
        assert not any(p.name.startswith(".write-probe") for p in n.results.glob(".*"))
        link.done.set()


def test_a_failure_outside_the_render_is_counted_by_stage() -> None:
    worker = metered([MODEL])(BigImageBackend(), 1)
    failed = "sogni_node_jobs_failed_total"
    for stage in ("render", "journal", "sign", "trajectory", "upload", "other"):
        assert sample(worker, failed, model=MODEL, stage=stage) == 0  # every series from 0
    worker.job_failed(MODEL, "sign")
    worker.job_failed("a prompt-like free text", "no such stage")  # bounded labels
    assert sample(worker, failed, model=MODEL, stage="sign") == 1
    assert sample(worker, failed, model="other", stage="other") == 1


# --- 3: library loggers and progress bars ---------------------------------------------------------
def test_library_loggers_are_adopted_at_warning_and_never_print_a_prompt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch_dynamo = logging.getLogger("torch._dynamo")
    transformers = logging.getLogger("transformers")
    saved = [(lg, list(lg.handlers), lg.propagate, lg.level) for lg in (torch_dynamo, transformers)]
    own = logging.StreamHandler()
    torch_dynamo.addHandler(own)  # what torch does at import
    torch_dynamo.propagate = False
    transformers.setLevel(logging.INFO)  # an INFO-level library
    try:
        configure_logging(json=True, capture_warnings=False)
        assert own not in torch_dynamo.handlers and torch_dynamo.propagate
        torch_dynamo.warning("recompiling")
        transformers.info("loading weights, shard 1 of 3")  # below WARNING: dropped
        logging.getLogger("diffusers.pipelines.pipe").warning(
            "The following part of your input was truncated because CLIP can only handle "
            "sequences up to 77 tokens: %s",
            MARK,
        )
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert [line["event"] for line in lines] == ["recompiling", logs.PROMPT_WITHHELD]
        assert MARK not in json.dumps(lines)
    finally:
        for lg, handlers, propagate, level in saved:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate, lg.level = propagate, level


def test_progress_bars_are_off_in_the_daemon() -> None:
    """`sogni-node start` turns them off before the libraries load (the environment, read
    at import) and with each library's switch once they have."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "from sogni_protocol.logs import quiet_progress_bars\n"
        "quiet_progress_bars()\n"
        "import tqdm, diffusers.utils.logging as d, transformers.utils.logging as t\n"
        "import huggingface_hub.utils as h\n"
        "quiet_progress_bars()\n"
        "assert tqdm.tqdm(range(3)).disable\n"
        "assert not d.is_progress_bar_enabled() and not t.is_progress_bar_enabled()\n"
        "assert h.are_progress_bars_disabled()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE",)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "it/s]" not in out.stderr


# --- 4: file modes --------------------------------------------------------------------------------
@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_node_writes_files_only_its_owner_reads(tmp_path: Path) -> None:
    with umask(0o022):
        with Journal(tmp_path / "journal.db") as j:
            j.record_signed_offer(offer(1), b"\x0a" * 32, SIG)
            for name in ("journal.db", "journal.db-wal", "journal.db-shm"):
                assert mode(tmp_path / name) == 0o600, name
        old = tmp_path / "old.db"  # left 0644 by an earlier node
        old.touch(mode=0o644)
        os.chmod(old, 0o644)
        Journal(old).close()
        assert mode(old) == 0o600
        files = TrajectoryFiles(tmp_path / "trajectories", 60)
        assert mode(files.keep_pixels(b"\x01" * 32, PNG)) == 0o600
        with daemon.private_files():
            (tmp_path / "any").write_bytes(b"x")
        assert mode(tmp_path / "any") == 0o600
        (tmp_path / "after").write_bytes(b"x")
        assert mode(tmp_path / "after") == 0o644  # the umask is the daemon's only


def test_start_runs_under_umask_077(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def fake_run(config: Any, *, announce: bool) -> daemon.ShutdownReport:
        current = os.umask(0)
        os.umask(current)
        seen.append(current)
        return daemon.ShutdownReport()

    monkeypatch.setattr(daemon, "_run", fake_run)
    cfg = load_node_config(None, {"SOGNI_NODE_DATA_DIR": str(tmp_path)})
    with umask(0o022):
        daemon.run(cfg)
    assert seen == [0o077]


# --- 5: a model installed while the node runs -----------------------------------------------------
def test_a_model_installed_live_is_labelled_at_once() -> None:
    worker = metered([MODEL])(BigImageBackend(), 1)
    metrics: NodeMetrics = worker.metrics
    assert metrics.model("new-model") == "other"
    worker.models_changed([MODEL, "new-model"])
    assert metrics.model("new-model") == "new-model"
    finished = "sogni_node_jobs_finished_total"
    assert sample(worker, finished, model="new-model") == 0  # its series exist from now
    assert sample(worker, "sogni_node_jobs_failed_total", model="new-model", stage="render") == 0
    models: list[str] = []  # the daemon's live list: `/readyz` follows it too
    view = NodeView("peer", "0xw", worker, lambda: 1, 1, models=models)
    assert not_ready(view) == "no model to serve"
    models.append("new-model")
    assert not_ready(view) is None


# --- 6, 8: a damaged journal; the node's own advice -----------------------------------------------
def damage(path: Path) -> None:
    with Journal(path) as j:
        for n in range(200):
            j.record_signed_offer(offer(n + 1), b"\x0a" * 32, SIG)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # a torn write in the middle: the header stays good
        f.seek(size // 2)
        f.write(os.urandom(8192))


def test_a_damaged_journal_is_one_line_at_start_naming_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    damage(path)
    with pytest.raises(JournalError) as info:
        Journal(path)
    assert "damaged" in str(info.value) and str(path) in str(info.value)
    assert info.value.todo == journal_module.DAMAGED_TODO
    error = classify(info.value)
    assert error is not None and "sogni-coordinator" not in str(error.todo)
    assert "move it aside" in str(error.todo)


def test_node_journal_errors_name_the_node_not_the_coordinator(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_bytes(b"not a database at all" * 400)
    runner = CliRunner()
    env = {"SOGNI_NODE_DATA_DIR": str(tmp_path), "SOGNI_NODE_CONFIG": None}
    out = runner.invoke(app, ["status", "--json"], env=env)
    assert out.exit_code == 3, out.output
    text = out.output + (out.stderr if out.stderr_bytes is not None else "")
    assert "sogni-coordinator" not in text and "Traceback" not in text
    assert "journal" in text and "move it aside" in text


# --- 7: a second Ctrl-C ---------------------------------------------------------------------------
async def test_a_second_signal_while_draining_stops_at_once() -> None:
    stop = trio.Event()
    exits: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.watch_signals, stop, exits.append)
        await trio.sleep(0.1)  # the receiver is installed
        os.kill(os.getpid(), signal.SIGINT)
        with trio.fail_after(5):
            await stop.wait()  # the first one drains
        await trio.sleep(0.1)
        assert exits == []
        os.kill(os.getpid(), signal.SIGINT)
        with trio.fail_after(5):
            while not exits:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert exits == [130]


# --- 9: an empty SOGNI_NODE_DATA_DIR --------------------------------------------------------------
def test_an_empty_data_dir_variable_means_the_default_not_the_current_folder() -> None:
    default = load_node_config(None, {}).data_dir
    cfg = load_node_config(None, {"SOGNI_NODE_DATA_DIR": "", "SOGNI_NODE_MODELS_DIR": " "})
    assert cfg.data_dir == default and cfg.data_dir != Path(".")
    assert cfg.models_dir == default / "models"
    sources = config_sources(None, {"SOGNI_NODE_DATA_DIR": ""})
    assert sources["data_dir"] == "default"


# --- 10: `rewards` and a local write failure ------------------------------------------------------
async def test_a_local_write_failure_while_fetching_epochs_is_said_to_be_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class AnsweringSource:  # a coordinator that answers: no epochs published yet
        def __init__(self, *_args: object) -> None:
            pass

        async def index(self, after: int) -> EpochIndex:
            return EpochIndex(epochs=[])

        async def close(self) -> None:
            pass

    monkeypatch.setattr(epoch_fetch, "_HttpSource", AnsweringSource)
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder's epochs go")  # ENOTDIR: a local fault
    with pytest.raises(epoch_fetch.EpochCacheError) as info:
        await epoch_fetch.fetch_epochs(["http://127.0.0.1:9"], blocker / "epochs")
    assert "local write failed" in str(info.value) and "not at fault" in str(info.value)
    error = classify(info.value)
    assert error is not None and "coordinator is running" not in str(error.todo)
    assert "this machine" in str(error.todo)


# --- 11: the live status view ---------------------------------------------------------------------
def test_the_live_status_view_audits_again_only_when_the_journal_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting_rewards(*_args: object) -> tuple[int, int, None]:
        calls.append(1)
        return 5, 0, None

    monkeypatch.setattr(status_view, "_rewards", counting_rewards)
    env = {"SOGNI_NODE_DATA_DIR": str(tmp_path), "SOGNI_NODE_HTTP_LISTEN": "off"}
    cfg = load_node_config(None, env)
    with Journal(cfg.journal_path) as j:
        j.record_signed_offer(offer(1), b"\x0a" * 32, SIG)
    cache = status_view.StatusCache()
    wallet = "0x" + "11" * 20
    for _ in range(3):
        reading = status_view.collect(cfg, wallet, cache=cache)
        assert reading.earned_wei == 5
    assert len(calls) <= 2  # once, and once more if closing the journal checkpointed it
    settled = len(calls)
    status_view.collect(cfg, wallet, cache=cache)
    assert len(calls) == settled  # nothing changed: no audit
    with Journal(cfg.journal_path) as j:
        j.record_signed_offer(offer(2), b"\x0a" * 32, SIG)
    status_view.collect(cfg, wallet, cache=cache)
    assert len(calls) == settled + 1
