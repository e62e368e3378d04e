"""Logging: JSON lines / console output on stderr, and prompts and images never logged.

The sentinel is assembled at run time so that tracebacks, which show source lines, cannot
contain it by quoting this file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest

from sogni_protocol.logs import REDACTED, configure_logging, get_logger, redact_sensitive
from sogni_protocol.messages import JobParams, RenderRequest

MARK = "SENT" + "INEL"


def params() -> JobParams:
    return JobParams(
        model_id="m", positive_prompt=MARK, negative_prompt=MARK, style_prompt=MARK,
        steps=4, guidance=5.0, width=64, height=64, seed=1,
    )  # fmt: skip


@dataclass
class Job:
    job_id: str
    prompt: str


def log_everything() -> None:
    log = get_logger("sogni_node.test")
    log.info(
        "render",
        prompt=MARK,
        positivePrompt=MARK,
        negative_prompt=MARK,
        image=MARK.encode() * 100,
        blob=MARK.encode() * 100,
        params=params(),
        request=RenderRequest(model_id="m", positive_prompt=MARK),
        nested={"a": [{"style_prompt": MARK}]},
        job=Job(job_id="j1", prompt=MARK),
    )
    log.info("struct", job=params())  # a Struct under an innocent key
    logging.getLogger("libp2p.test").warning("library", extra={"prompt": MARK})

    def render(prompt: str) -> None:
        raise ValueError("render failed")

    try:
        render(MARK)  # the prompt sits in a frame's locals
    except ValueError:
        log.exception("crashed")


def test_json_lines_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True, capture_warnings=False)
    log_everything()
    out, err = capsys.readouterr()
    assert out == ""  # logs go to stderr only
    assert MARK not in err
    lines = [json.loads(line) for line in err.splitlines()]
    first = lines[0]
    assert first["event"] == "render" and first["level"] == "info"
    assert first["logger"] == "sogni_node.test" and first["timestamp"].endswith("Z")
    assert first["prompt"] == REDACTED and first["positivePrompt"] == REDACTED
    assert first["image"] == REDACTED and first["params"] == REDACTED
    assert first["blob"] == f"[{len(MARK) * 100} bytes]"
    assert first["request"]["positive_prompt"] == REDACTED
    assert first["request"]["model_id"] == "m"
    assert first["nested"] == {"a": [{"style_prompt": REDACTED}]}
    assert first["job"] == {"_type": "Job", "job_id": "j1", "prompt": REDACTED}
    assert lines[1]["job"]["positive_prompt"] == REDACTED
    assert lines[2]["logger"] == "libp2p.test" and lines[2]["prompt"] == REDACTED
    assert lines[3]["exception"][0]["exc_type"] == "ValueError"


def test_console_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=False, capture_warnings=False)
    log_everything()
    err = capsys.readouterr().err
    assert "render" in err and "crashed" in err and "ValueError" in err
    assert MARK not in err
    assert REDACTED in err


def test_levels(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", json=True, capture_warnings=False)
    get_logger("sogni_node.test").info("quiet")
    get_logger("sogni_node.test").warning("loud")
    logging.getLogger("diffusers.x").info("library info is dropped")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["loud"]
    configure_logging("debug", json=True, capture_warnings=False)
    get_logger("sogni_coordinator.x").debug("dbg")
    logging.getLogger("libp2p.x").info("still dropped: third parties stay at warning")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["dbg"]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud")


def test_libp2p_failures_it_also_raises_show_at_debug_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """py-libp2p logs a failed dial or stream at ERROR and raises it to our code, which
    reports it once: its own lines would come before the one `error:` a CLI prints."""
    configure_logging("warning", json=True, capture_warnings=False)
    logging.getLogger("libp2p.network.swarm").error("failed to upgrade security for peer X")
    logging.getLogger("libp2p.host.basic_host").error("Failed to open stream to peer X:\n  ...")
    logging.getLogger("libp2p.protocol_muxer.multiselect_client").error("handshake failed")
    logging.getLogger("libp2p.pubsub").warning("other libp2p warnings still show")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["other libp2p warnings still show"]
    configure_logging("debug", json=True, capture_warnings=False)
    logging.getLogger("libp2p.network.swarm").error("failed to upgrade security for peer X")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == [
        "failed to upgrade security for peer X"
    ]


def test_reconfiguring_does_not_duplicate_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json=True, capture_warnings=False)
    configure_logging(json=True, capture_warnings=False)
    get_logger("sogni_node.x").info("once")
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_library_logger_with_own_handler_is_adopted(capsys: pytest.CaptureFixture[str]) -> None:
    lib = logging.getLogger("transformers")
    own = logging.StreamHandler()
    lib.addHandler(own)
    lib.propagate = False  # what transformers does at import
    level = lib.level  # `sogni_node` quiets transformers to ERROR (TRANSFORMERS_VERBOSITY)
    lib.setLevel(logging.WARNING)  # this test is about adopting its handler, not its level
    try:
        configure_logging(json=True, capture_warnings=False)
        lib.warning("adopted", extra={"prompt": MARK})
        err = capsys.readouterr().err
        assert json.loads(err.splitlines()[-1])["event"] == "adopted"
        assert MARK not in err
    finally:
        lib.removeHandler(own)
        lib.propagate = True
        lib.setLevel(level)


def test_processor_directly() -> None:
    offer_fields = {"params": params(), "Prompt_Text": MARK, "password": "pw", "ok": 1}
    out = redact_sensitive(None, "info", {"event": "x", "offer": offer_fields})
    assert out["offer"] == {
        "params": REDACTED,
        "Prompt_Text": REDACTED,
        "password": REDACTED,
        "ok": 1,
    }
