"""Recognise the image formats a job may ask for, by their magic bytes.

Why: a node's result must be in the format the job asked for, and files saved for a client
get the matching extension; both are decided from the bytes, never from a claim.
"""

from __future__ import annotations

_MAGIC = {
    "png": lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"),
    "jpeg": lambda b: b.startswith(b"\xff\xd8\xff"),
    "webp": lambda b: len(b) >= 12 and b[:4] == b"RIFF" and b[8:12] == b"WEBP",
}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def format_of(image: bytes) -> str | None:
    """`png`, `jpeg`, `webp`, or None for anything else."""
    for name, matches in _MAGIC.items():
        if matches(image):
            return name
    return None


def extension_of(image: bytes) -> str:
    """File extension for saved images (`bin` when the bytes are no known format)."""
    kind = format_of(image)
    return EXTENSIONS[kind] if kind else "bin"
