"""Delivery through the dispatcher's public API, on real SQLite and real files: images wait on
disk until acknowledged, a resume needs the token and gets exactly the unacknowledged rest
(also after a restart), nothing is charged twice; prompts are sealed and their keys shredded."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
import trio
from eth_account import Account

from sogni_app.api import authorize
from sogni_coordinator.dispatch import Refusal, StorageFault, Submission
from sogni_coordinator.job_state import JobState
from sogni_coordinator.prompt_crypto import PromptKeyError, new_key, seal, unseal
from sogni_coordinator.results import SqliteResults
from sogni_protocol.messages import JobImage, JobProgress, Offer, RequestDone, RequestResumed
from sogni_protocol.pricing import quote

from .conftest import Harness, events, request


async def _render_all(h: Harness, n: int) -> tuple[Submission, list[Offer]]:
    """Submit `n` images, have one node render them all; returns (submission, offers)."""
    sub = await h.submit(request(n))
    node = h.node(0, slots=n)
    h.dispatcher.match()
    offers = node.offers()
    for offer in offers:
        await h.deliver(node, offer)
    return sub, offers


async def test_images_wait_on_disk_until_acknowledged_then_are_deleted(coord: Harness) -> None:
    sub, _ = await _render_all(coord, 2)
    rid = sub.accepted.request_id
    folder = coord.dispatcher.results.folder(rid)
    files = sorted(folder.iterdir())
    assert len(files) == 2 and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    sent = await events(sub)
    assert [type(m) for m in sent] == [JobImage, JobImage]
    assert sub.events.finished  # RequestDone was handed out last
    assert await events(sub) == []  # each once per attachment
    first = sent[0]
    assert isinstance(first, JobImage)
    acked = await coord.dispatcher.ack_images(rid, [first.job_id, os.urandom(32)])
    assert acked == [first.job_id]  # an unknown job id is ignored
    assert [i for _, i, _ in coord.store.pending_deliveries()] == [1]
    assert len(list(folder.iterdir())) == 1
    # another request's client cannot acknowledge (or learn about) these
    assert await coord.dispatcher.ack_images(os.urandom(32), [sent[1].job_id]) == []  # type: ignore[union-attr]


async def test_a_resume_needs_the_token_and_gets_exactly_the_unacknowledged_rest(
    coord: Harness,
) -> None:
    sub, _ = await _render_all(coord, 3)
    rid, token = sub.accepted.request_id, sub.accepted.resume_token
    first, *rest = await events(sub)
    assert isinstance(first, JobImage)
    await coord.dispatcher.ack_images(rid, [first.job_id])
    for wrong in (os.urandom(32), b"", token[:-1] + bytes([token[-1] ^ 1])):
        with pytest.raises(Refusal) as info:
            coord.dispatcher.resume(rid, wrong)
        assert info.value.code == "unauthorized"
    with pytest.raises(Refusal, match="unknown request, or not its resume token"):
        coord.dispatcher.resume(os.urandom(32), token)  # same answer as a wrong token
    resumed = coord.dispatcher.resume(rid, token)
    assert isinstance(resumed.reply, RequestResumed) and resumed.reply.acked == [first.job_id]
    again = await events(resumed)
    assert [m.job_id for m in again] == [m.job_id for m in rest]  # type: ignore[attr-defined]
    assert sub.events.superseded and await sub.events.next() is None


async def test_only_hashes_of_tokens_and_no_plaintext_prompt_are_stored(coord: Harness) -> None:
    sentinel = "giraffe-sentinel-91"
    sub = await coord.submit(request(2, positive_prompt=sentinel, negative_prompt=sentinel))
    rid, token = sub.accepted.request_id, sub.accepted.resume_token
    db = sqlite3.connect(coord.path)
    try:
        (stored,) = db.execute(
            "SELECT token_hash FROM requests WHERE request_id=?", (rid,)
        ).fetchone()
        assert stored == hashlib.sha256(token).digest()
        blobs = [bytes(r[0]) for r in db.execute("SELECT params FROM jobs")]
        assert blobs and not any(sentinel.encode() in b or token in b for b in blobs)
    finally:
        db.close()
    live = coord.store.live_jobs()  # what a restart restores: the prompt, decrypted
    assert {s.params.positive_prompt for s in live} == {sentinel}


async def test_keys_are_shredded_after_the_retention_window_only_once_ended(
    coord: Harness,
) -> None:
    ended, _ = await _render_all(coord, 1)
    live = await coord.submit(request(1))
    now = 2e9
    assert coord.store.shred_keys(3600, now=0) == 0  # not ended long enough ago
    assert coord.store.shred_keys(3600, now=now) == 1  # the ended one only
    assert not coord.store.has_key(ended.accepted.request_id)  # type: ignore[attr-defined]
    assert coord.store.has_key(live.accepted.request_id)  # a live request keeps its prompt
    assert coord.store.live_jobs()[0].params.positive_prompt == "a red circle"
    coord.restart()  # the shredded request has nothing to restore: no key needed
    assert coord.dispatcher.restore() == 1


async def test_after_a_restart_a_resume_gets_the_images_from_disk_and_charges_nothing(
    paid_any: Harness,
) -> None:
    paid = paid_any  # on each engine
    payer = Account.create()
    assert paid.ledger is not None
    paid.ledger.credit_purchase(payer.address, 1)
    req = request(3)
    sub = await paid.submit(authorize(req, bytes(payer.key), paid.dispatcher.domain))
    rid, token = sub.accepted.request_id, sub.accepted.resume_token
    node = paid.node(0, slots=3)
    paid.dispatcher.match()
    first, second, third = node.offers()
    await paid.deliver(node, first)
    await paid.deliver(node, second)
    (image, _) = await events(sub)
    await paid.dispatcher.ack_images(rid, [image.job_id])  # type: ignore[attr-defined]
    paid.restart()
    assert paid.dispatcher.restore() == 1
    assert paid.ledger is not None
    charged = paid.ledger.balance(payer.address)
    resumed = paid.dispatcher.resume(rid, token)
    got = await events(resumed)
    assert [m.index for m in got if isinstance(m, JobImage)] == [1]  # type: ignore[attr-defined]
    node = paid.node(1)
    paid.dispatcher.match()
    (again,) = node.offers()
    assert again.offer.job_id == third.offer.job_id
    await paid.deliver(node, again)
    got = await events(resumed)
    assert [m.index for m in got if isinstance(m, JobImage)] == [2]  # type: ignore[attr-defined]
    assert resumed.events.finished
    per_image = quote(req).per_image.spark_micro
    assert paid.ledger.balance(payer.address) == charged  # the third was reserved already
    assert charged["spark_paid"] == 1_000_000 - 3 * per_image
    # a replayed resume, even after everything, re-charges nothing
    paid.dispatcher.resume(rid, token)
    assert paid.ledger.balance(payer.address) == charged


async def test_with_images_in_the_database_file_acks_delete_rows_and_a_restart_resumes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """`result_store = "database"` on SQLite: images wait as rows of the coordinator's file,
    an acknowledgement deletes its row (with the next group commit), a restart prunes rows
    nobody waits for and a resume sends the rest from the file, not from memory."""
    h = Harness(tmp_path / "coordinator.db", nursery, results="database")
    try:
        sub, _ = await _render_all(h, 3)
        rid, token = sub.accepted.request_id, sub.accepted.resume_token
        rows = h.dispatcher.results
        assert isinstance(rows, SqliteResults)
        assert len(rows.stored_keys()) == 3 and not (tmp_path / "results").exists()
        first, *rest = await events(sub)
        assert isinstance(first, JobImage)
        await h.dispatcher.ack_images(rid, [first.job_id])
        with trio.fail_after(10):  # the delete rides the writer's next group
            while len(rows.stored_keys()) != 2:
                await trio.sleep(0.01)
        orphan = rows.key(os.urandom(32), 0, os.urandom(32))  # a receipt that never committed
        await rows.put(orphan, first)
        h.restart()
        assert h.dispatcher.restore() == 0  # everything rendered: nothing to requeue
        restarted = h.dispatcher.results
        assert isinstance(restarted, SqliteResults) and orphan not in restarted.stored_keys()
        resumed = h.dispatcher.resume(rid, token)
        again = await events(resumed)
        assert again == rest  # read back from the rows, byte for byte
    finally:
        h.close()


async def test_progress_is_coalesced_per_job_so_a_slow_client_costs_no_memory(
    coord: Harness,
) -> None:
    sub = await coord.submit(request(2))
    node = coord.node(0, slots=2)
    coord.dispatcher.match()
    a, b = node.offers()
    for step in range(1, 10):
        coord.dispatcher.progress(node.link, a.offer.job_id, step)
        coord.dispatcher.progress(node.link, b.offer.job_id, step)
    assert len(sub.mailbox.progress) == 2
    sent = await events(sub)
    assert [(m.index, m.step) for m in sent if isinstance(m, JobProgress)] == [(0, 9), (1, 9)]  # type: ignore[attr-defined]


async def test_a_lost_result_file_is_reported_not_hung_on(coord: Harness) -> None:
    sub, _ = await _render_all(coord, 1)
    for path in coord.dispatcher.results.folder(sub.accepted.request_id).iterdir():
        path.unlink()
    (failed,) = await events(sub)
    assert "lost" in failed.reason  # type: ignore[attr-defined]
    assert sub.events.finished


def test_sealed_params_open_only_with_their_key_and_job() -> None:
    key, job = new_key(), b"j" * 32
    blob = seal(key, b"a prompt", job)
    assert b"a prompt" not in blob and unseal(key, blob, job) == b"a prompt"
    for bad_key, bad_job, bad_blob in (
        (new_key(), job, blob),
        (key, b"k" * 32, blob),
        (key, job, blob[:-1] + bytes([blob[-1] ^ 1])),
        (key, job, b"short"),
    ):
        with pytest.raises(PromptKeyError):
            unseal(bad_key, bad_blob, bad_job)


_ = RequestDone


async def test_a_result_the_coordinator_cannot_store_is_refused_without_a_strike(
    coord: Harness, tmp_path: Path
) -> None:
    sub = await coord.submit(request(1))
    node = coord.node(0)
    coord.dispatcher.match()
    (offer,) = node.offers()
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    coord.dispatcher.results.root = blocker  # every image write fails, as on a full disk
    with pytest.raises(StorageFault):
        await coord.deliver(node, offer)
    assert coord.store.receipts() == []  # not receipted: not deliverable, not paid
    assert coord.reputation.get(node.wallet).strikes == []
    assert coord.dispatcher.jobs[sub.accepted.job_ids[0]].state is JobState.QUEUED
