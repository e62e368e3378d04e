"""The `*_sync` client helpers do not print the transport's info events into a plain script
(issue #15 item 4: every call printed `host_started addrs=[]`), and leave logging an
application configured alone."""

from __future__ import annotations

import logging

import pytest
import structlog

from sogni_app.api import quiet_unconfigured_logging


def test_an_unconfigured_script_sees_warnings_only(capsys: pytest.CaptureFixture[str]) -> None:
    structlog.reset_defaults()
    structlog.get_logger().info("before", addrs=[])
    assert "before" in capsys.readouterr().out  # structlog's default prints every level
    quiet_unconfigured_logging()
    log = structlog.get_logger()
    log.info("host_started", addrs=[])
    log.warning("something_wrong")
    out = capsys.readouterr().out
    assert "host_started" not in out and "something_wrong" in out


def test_configured_logging_is_left_alone(capsys: pytest.CaptureFixture[str]) -> None:
    structlog.reset_defaults()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    quiet_unconfigured_logging()
    structlog.get_logger().info("host_started", addrs=[])
    assert "host_started" in capsys.readouterr().out
