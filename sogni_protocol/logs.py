"""Structured logging for every part: structlog in front, stdlib logging behind it.

Why this shape: libp2p, diffusers and transformers log through stdlib `logging`; routing both
kinds through one stderr handler gives one format (JSON lines for log collectors when stderr
is not a terminal, a readable console otherwise) and one place to enforce privacy. Prompts,
images and secrets must never reach a log: `redact_sensitive` replaces the values of
sensitive keys (at any depth, inside dicts, dataclasses and msgspec Structs) with
"[redacted]", and tracebacks are rendered without local variables, which would otherwise
print a prompt held in a frame.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TextIO, cast

import msgspec
import structlog
from structlog.typing import EventDict, Processor

__all__ = [
    "DENY_KEYS",
    "REDACTED",
    "LogLevel",
    "adopt_library_loggers",
    "configure_logging",
    "get_logger",
    "quiet_progress_bars",
    "redact_sensitive",
    "tap_events",
    "where",
]

LogLevel = Literal["debug", "info", "warning", "error", "critical"]

REDACTED = "[redacted]"

DENY_KEYS: frozenset[str] = frozenset(
    {
        "prompt",
        "prompts",
        "positive_prompt",
        "negative_prompt",
        "style_prompt",
        "image",
        "images",
        "image_bytes",
        "params",
        "password",
        "passphrase",
        "private_key",
        "secret",
        "mnemonic",
    }
)
"""Keys whose values are never logged. Matching ignores case, `_` and `-` (so camelCase
`positivePrompt` matches), and any key containing "prompt" or "password" is denied too."""

_OUR_PACKAGES = (
    "sogni",
    "sogni_protocol",
    "sogni_net",
    "sogni_chain",
    "sogni_node",
    "sogni_coordinator",
    "sogni_wallet",
    "sogni_app",
    "sogni_devnet",
    "bench",
)
_LIBRARIES = ("transformers", "diffusers", "huggingface_hub", "torch", "libp2p", "multiaddr")
"""Libraries that install their own stderr handler or stop propagation at import (py-libp2p
sets `propagate = False` on its root logger; torch on `torch`, `torch._dynamo`, ...)."""

_PROMPT_QUOTING = ("truncated because", "following part of your input")
"""Library messages that quote a prompt: diffusers and transformers log the part of an
over-long prompt cut off at the text encoder's token limit."""
PROMPT_WITHHELD = "prompt truncated to the text encoder's token limit (text withheld)"

_third_party_level = logging.WARNING
"""The level `configure_logging` set for other libraries' loggers (`adopt_library_loggers`)."""

_RAISED_TOO = ("libp2p.network.swarm", "libp2p.host.basic_host", "libp2p.protocol_muxer")
"""py-libp2p loggers that log each failed dial or stream at ERROR, in several lines, and raise
the same failure to this code, which reports it once in its own words: shown at debug level
only (a dropped coordinator printed 2-7 such lines per attempt before the one `error:`)."""

_MAX_DEPTH = 6
_MAX_INLINE_BYTES = 64


def _norm(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "")


_DENY_NORMALIZED = frozenset(_norm(k) for k in DENY_KEYS)


def _denied(key: object) -> bool:
    k = _norm(str(key))
    return k in _DENY_NORMALIZED or "prompt" in k or "password" in k or "privatekey" in k


def _clean(key: object, value: Any, depth: int) -> Any:
    return REDACTED if _denied(key) else _scrub(value, depth)


def _scrub(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if depth > _MAX_DEPTH:
        return "[...]"
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) <= _MAX_INLINE_BYTES:  # ids and hashes: readable hex
            return "0x" + raw.hex()
        return f"[{len(raw)} bytes]"  # image bytes and other blobs: size only
    if isinstance(value, msgspec.Struct):
        fields = msgspec.structs.asdict(value)
        return {"_type": type(value).__name__} | {
            k: _clean(k, v, depth + 1) for k, v in fields.items()
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        shown = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.repr}
        return {"_type": type(value).__name__} | {
            k: _clean(k, v, depth + 1) for k, v in shown.items()
        }
    if isinstance(value, Mapping):
        return {str(k): _clean(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub(v, depth + 1) for v in value]
    return value


def redact_sensitive(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace values of denied keys (at any depth) with "[redacted]"."""
    for key in list(event_dict):
        if key in ("exc_info", "stack_info", "_record", "_from_structlog"):
            continue
        event_dict[key] = _clean(key, event_dict[key], 0)
    return event_dict


_TAP: ContextVar[Callable[[str], None] | None] = ContextVar("sogni_event_tap", default=None)


def tap_events(tap: Callable[[str], None]) -> None:
    """Call `tap(event name)` for every structured event logged from this task and the tasks
    and threads it starts from now on (trio copies the context), whatever the log level.

    How a daemon counts events its modules already log (metrics) without a hook in them;
    the context keeps two daemons in one process apart. Only the name is passed, never a
    field. Active once `configure_logging` ran (the daemons' CLIs run it first)."""
    _TAP.set(tap)


def _tap_event(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    tap = _TAP.get()
    event = event_dict.get("event")
    if tap is not None and isinstance(event, str):
        try:
            tap(event)
        except Exception:  # a metric must never break logging
            pass
    return event_dict


def _withhold_prompts(record: logging.LogRecord) -> bool:
    """Handler filter: a library record that may quote a prompt is replaced by a neutral
    line (structlog's redaction sees only keys, never a library's message text)."""
    if record.name.split(".")[0] in _LIBRARIES:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: its raw message is all there is
            text = str(record.msg)
        if any(words in text.lower() for words in _PROMPT_QUOTING):
            record.msg, record.args = PROMPT_WITHHELD, ()
            if "message" in record.__dict__:  # formatted by a handler before ours
                record.message = PROMPT_WITHHELD
    return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (test runners swap it)."""

    _sogni = True

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(_withhold_prompts)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _level(name: str) -> int:
    try:
        return _LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {name!r} (use debug, info, warning, error or critical)"
        ) from None


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        redact_sensitive,
    ]


def adopt_library_loggers(names: tuple[str, ...] = _LIBRARIES) -> None:
    """Route already-imported libraries' loggers through ours, at WARNING (or the
    `third_party_level` given to `configure_logging`) at the least.

    transformers, diffusers and torch add their own stderr handlers and set `propagate =
    False` when first imported (torch on several of its loggers), bypassing the JSON format
    and the redaction. `configure_logging` calls this; call it again right after importing
    such a library (`sogni-node start` does, once the render backend is loaded).
    """
    loggers = logging.Logger.manager.loggerDict
    for name in names:
        lib = logging.getLogger(name)
        lib.setLevel(max(lib.level, _third_party_level))  # never more talkative than that
        subs = [
            item
            for key, item in list(loggers.items())
            if key.startswith(name + ".") and isinstance(item, logging.Logger)
        ]
        for logger in (lib, *subs):
            printing = [
                h
                for h in logger.handlers
                if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)
                and not getattr(h, "_sogni", False)
            ]
            for handler in printing:
                logger.removeHandler(handler)
            if printing or logger is lib:
                logger.propagate = True


_PROGRESS_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's downloads
    "TQDM_DISABLE": "1",  # every other tqdm bar (tqdm reads TQDM_* as its defaults)
}


def quiet_progress_bars() -> None:
    """No progress bar in a daemon's log: tqdm bars (diffusers' "Loading pipeline
    components", transformers' checkpoint shards, huggingface_hub's downloads) are turned
    off, by the environment for libraries not imported yet (an operator's own setting
    wins) and by each library's switch for those already imported. Imports nothing."""
    for key, value in _PROGRESS_ENV.items():
        os.environ.setdefault(key, value)
    switches = (
        ("diffusers.utils.logging", "disable_progress_bar"),
        ("transformers.utils.logging", "disable_progress_bar"),
        ("huggingface_hub.utils", "disable_progress_bars"),
    )
    for module_name, function in switches:
        module = sys.modules.get(module_name)
        switch = getattr(module, function, None) if module is not None else None
        if callable(switch):
            try:
                switch()
            except Exception:  # a library's own switch must never stop the daemon
                pass


def configure_logging(
    level: str = "info",
    json: bool | None = None,
    *,
    third_party_level: str = "warning",
    capture_warnings: bool = True,
) -> None:
    """Set up logging once per process (calling it again reconfigures).

    `level` applies to this project's loggers; stdlib loggers of other libraries go through
    the same handler at `third_party_level`. `json=None` picks JSON lines unless stderr is a
    terminal. Everything goes to stderr; stdout stays free for command output.
    """
    global _third_party_level
    ours, theirs = _level(level), _level(third_party_level)
    _third_party_level = theirs
    if json is None:
        json = not sys.stderr.isatty()

    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        final: list[Processor] = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            renderer,
        ]
    else:
        tty = sys.stderr.isatty()
        renderer = structlog.dev.ConsoleRenderer(
            colors=tty,
            exception_formatter=structlog.dev.RichTracebackFormatter(
                color_system="truecolor" if tty else None, show_locals=False
            ),
        )
        final = [renderer]

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *_shared_processors()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_sogni", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(theirs)
    for name in _OUR_PACKAGES:
        logging.getLogger(name).setLevel(ours)
    for name in _RAISED_TOO:
        logging.getLogger(name).setLevel(
            logging.NOTSET if ours <= logging.DEBUG else logging.CRITICAL
        )
    adopt_library_loggers()
    logging.captureWarnings(capture_warnings)

    structlog.configure(
        processors=[
            _tap_event,  # before the level filter: counts do not depend on the log level
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger used before configure_logging() must pick up the config later.
        cache_logger_on_first_use=False,
    )


def where(exc: BaseException, depth: int = 3) -> str:
    """Where `exc` was raised: its innermost `depth` frames as `file.py:line in function`,
    innermost last. Never its message, which may quote a prompt: an operator can still find
    the failing line (a render failing with a bare `TypeError` could not be told apart)."""
    frames = traceback.extract_tb(exc.__traceback__)[-depth:]
    return " > ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger named `name` (use the module's `__name__`)."""
    return cast(structlog.stdlib.BoundLogger, structlog.stdlib.get_logger(name))
