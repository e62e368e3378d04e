"""The gateway's pure parts: frame decoding, request translation, names, limits, images."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sogni_coordinator.gateway.frames import FrameError, decode_frame, encode_frame
from sogni_coordinator.gateway.limits import FailureWindow, KeyBuckets
from sogni_coordinator.gateway.models import ModelBook, scheduler_of, sdk_names_of, sid_of
from sogni_coordinator.gateway.projects import ProjectRefused, parse_job_request
from sogni_coordinator.gateway.results import ImageStore
from sogni_protocol.catalog import default_catalog

from .sdk_wire import decode, job_request

MODEL = "sogni-tiny-sd"
BOOK = ModelBook(default_catalog(), frozenset({MODEL}))


def _frame(name: str, payload: bytes) -> str:
    return json.dumps({"type": name, "data": base64.b64encode(payload).decode()})


def test_frames_round_trip_and_hostile_ones_get_a_close_code() -> None:
    text = encode_frame("jobResult", {"jobID": "A", "n": "é"})
    assert decode(text) == ("jobResult", {"jobID": "A", "n": "é"})
    assert decode_frame(_frame("jobRequest", b'{"jobID":"A"}'), 4096) == (
        "jobRequest",
        {"jobID": "A"},
    )
    hostile: list[tuple[str | bytes, int]] = [
        (b"binary", 1003),
        ("x" * 200_001, 1009),
        ("{", 1008),
        ("[]", 1008),
        (json.dumps({"type": "jobRequest", "data": "@@@"}), 1008),
        (json.dumps({"type": "jobRequest", "data": "YQ"}), 1008),  # unpadded
        (_frame("jobRequest", b"[1]"), 1008),
        (_frame("jobRequest", b"\xff"), 1008),
        (_frame("jobRequest", b"[" * 100_000 + b"]" * 100_000), 1008),  # too deep
        (_frame("authenticated", b"{}"), 1008),
        (json.dumps({"type": "jobRequest", "data": "e30=", "extra": 1}), 1008),
        (json.dumps({"type": 5, "data": "e30="}), 1008),
    ]
    for raw, code in hostile:
        with pytest.raises(FrameError) as caught:
            decode_frame(raw, 200_000 if code != 1008 else 1_000_000)
        assert caught.value.code == code, raw[:40]


def test_a_prompt_with_a_lone_surrogate_is_refused_naming_the_field() -> None:
    """JSON carries "\\ud800"; signing the request then raised, the socket died 1011 with
    the key's day's spend held (and the SDK's re-send held more)."""
    bad = job_request(MODEL, 1, positivePrompt="a red circle \ud800")
    with pytest.raises(ProjectRefused, match="positivePrompt is not valid Unicode") as info:
        parse_job_request(bad, book=BOOK, served=[MODEL], network="fast")
    assert "red circle" not in str(info.value)
    fine = job_request(MODEL, 1, positivePrompt="un cercle rouge \u00e9 \U0001f600")
    assert parse_job_request(fine, book=BOOK, served=[MODEL], network="fast").positive_prompt


def test_job_request_defaults_and_refusals() -> None:
    req = parse_job_request(job_request(MODEL, 2), book=BOOK, served=[MODEL], network="fast")
    assert (req.steps, req.width, req.height, req.number_of_images) == (4, 64, 64, 2)
    assert req.guidance == 4.0 and req.scheduler == "" and req.output_format == "png"
    custom = job_request(
        MODEL, 1, steps=6, seed=9, sizePreset="custom", width=128, height=64, scheduler="Euler a"
    )
    custom["outputFormat"] = "jpg"
    req = parse_job_request(custom, book=BOOK, served=[MODEL], network="relaxed")
    assert (req.steps, req.seed, req.width, req.scheduler) == (6, 9, 128, "euler_a")
    assert req.output_format == "jpeg" and req.network == "relaxed"
    assert req.disable_safety is False  # the SDKs' default: safety on
    adult = {**job_request(MODEL, 1), "disableSafety": True}
    assert parse_job_request(adult, book=BOOK, served=[MODEL], network="fast").disable_safety
    with pytest.raises(ProjectRefused, match="disableSafety"):
        parse_job_request(
            {**job_request(MODEL, 1), "disableSafety": "yes"},
            book=BOOK,
            served=[MODEL],
            network="fast",
        )
    bad = [
        ({"modelID": "other"}, "unknown model"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"steps": True}, "steps"),
        ({"guidanceScale": 99}, "guidanceScale"),
        ({"seed": -1}, "seed"),
        ({"sizePreset": "custom", "width": 4096, "height": 64}, "width"),
        ({"sizePreset": "huge"}, "sizePreset"),
        ({"scheduler": "heun"}, "sampler"),
        ({"positivePrompt": 5}, "positivePrompt"),
        # an input image or ControlNet was read as text-to-image: the input ignored
        ({"hasStartingImage": True, "strengthIsEnabled": True, "strength": 0.5}, "hasStarting"),
        ({"hasContextImage1": True}, "hasContextImage1"),
        ({"currentControlNetsJob": {"name": "canny"}}, "currentControlNetsJob"),
    ]
    for frame, words in bad:
        with pytest.raises(ProjectRefused) as caught:
            parse_job_request(
                job_request(MODEL, 1, **frame), book=BOOK, served=[MODEL], network="fast"
            )
        assert words in caught.value.message
    with pytest.raises(ProjectRefused):
        parse_job_request(job_request(MODEL, 17), book=BOOK, served=[MODEL], network="fast")
    for wrong in ([1], {"a": 1}, 5, "gif"):  # a type error would end the app's whole socket
        with pytest.raises(ProjectRefused, match="outputFormat"):
            parse_job_request(
                {**job_request(MODEL, 1), "outputFormat": wrong},
                book=BOOK,
                served=[MODEL],
                network="fast",
            )


def test_sampler_names_map_both_ways() -> None:
    assert scheduler_of("dpm_pp_2m", "karras") == "dpmpp_2m_karras"
    assert scheduler_of("euler_ancestral", "normal") == "euler_a"  # a Comfy name
    assert scheduler_of(None, None) == ""
    for ours in ("euler", "euler_a", "ddim", "dpmpp_2m_karras", "lcm"):
        sampler, scheduler = sdk_names_of(ours)
        assert scheduler_of(sampler, scheduler) == ours
    listing = BOOK.listing({MODEL})
    assert listing == [
        {
            "id": MODEL,
            "name": listing[0]["name"],
            "SID": sid_of(MODEL),
            "tier": MODEL,
            "media": "image",
        }
    ]
    assert BOOK.tiers(set())[MODEL]["sampler"]["allowed"][0] == "euler"


def test_a_configured_model_list_is_all_the_sdks_are_offered() -> None:
    """With `models` configured, a node advertising another model does not put it in the
    listing (the dispatcher would refuse a project for it: jobError unknown_model); without
    a list, what nodes advertise is what is offered."""
    assert BOOK.served({MODEL, "other-model"}) == [MODEL]
    assert [m["id"] for m in BOOK.listing({MODEL, "other-model"})] == [MODEL]
    open_book = ModelBook(default_catalog(), frozenset())
    assert open_book.served({MODEL, "other-model"}) == ["other-model", MODEL]


def test_limits() -> None:
    now = [0.0]
    buckets = KeyBuckets(60, 2, clock=lambda: now[0])
    assert [buckets.take("k") for _ in range(3)] == [True, True, False]
    assert buckets.take("other")
    now[0] = 1.0
    assert buckets.take("k") and not buckets.take("k")
    window = FailureWindow(2, 60, clock=lambda: now[0])
    window.failed("1.2.3.4")
    assert not window.blocked("1.2.3.4")
    window.failed("1.2.3.4")
    assert window.blocked("1.2.3.4") and not window.blocked("5.6.7.8")
    now[0] = 62.0
    assert not window.blocked("1.2.3.4")
    # an IPv6 host owns a /64: rotating through it does not get past the limit
    window.failed("2001:db8:1:2::1")
    window.failed("2001:db8:1:2:ffff::7")
    assert window.blocked("2001:db8:1:2:abcd::42") and not window.blocked("2001:db8:1:3::1")
    window.failed("::ffff:9.9.9.9")  # an IPv4 client seen through an IPv6 socket
    window.failed("9.9.9.9")
    assert window.blocked("9.9.9.9")


async def test_images_kept_by_id_and_swept(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    store = ImageStore(tmp_path / "img", retention=60)
    store.load()
    img = "0F0F0F0F-0000-4000-8000-000000000000"
    stored = await store.save(img, png)
    assert store.get(img) == stored and stored.media_type == "image/png"
    assert store.get("../" + img) is None and store.get(img.lower()) is None
    with pytest.raises(ValueError):
        await store.save("0F0F0F0F-0000-4000-8000-000000000001", b"not an image")
    again = ImageStore(tmp_path / "img", retention=60)
    assert again.load() == 1
    assert await again.sweep(now=stored.created + 61) == 1
    assert again.get(img) is None and not stored.path.exists()


def test_project_book_pushes_untold_projects_of_one_app_and_forgets_abandoned_ones() -> None:
    from sogni_coordinator.gateway.projects import Project, ProjectBook

    book = ProjectBook(keep=60)
    running = Project("key_a", "RUN", 2, app_id="app", started_at=1000.0)
    ended_unseen = Project("key_a", "AWAY", 1, app_id="app", done=True, started_at=1000.0)
    told = Project("key_a", "TOLD", 1, app_id="app", done=True, told=True, ended_at=1010.0)
    cancelled = Project("key_a", "CAN", 1, app_id="app", cancelled=True, started_at=1000.0)
    other_app = Project("key_a", "OTHER", 1, app_id="other", started_at=1000.0)
    other_key = Project("key_b", "RUN", 1, app_id="app", started_at=1000.0)
    for p in (running, ended_unseen, told, cancelled, other_app, other_key):
        book.add(p)
    assert [p.job_id for p in book.untold("key_a", "app")] == ["RUN", "AWAY"]
    assert [p.job_id for p in book.in_flight("key_a")] == ["RUN", "OTHER"]
    book.sweep(now=1065.0)  # started 65 s ago and never seen to end: gone; TOLD ended 55 s ago
    assert book.get("key_a", "TOLD") is told and book.get("key_a", "RUN") is None
    book.sweep(now=1071.0)
    assert book.get("key_a", "TOLD") is None
