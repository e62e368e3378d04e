"""Input errors in the words the user typed: `-n/--number`, not the wire field `$.numberOfImages`.

Why: `sogni render` and `sogni quote` build a `RenderRequest` and let its schema validate the
values, so a bad value comes back as msgspec's "Expected `int` >= 1 - at `$.numberOfImages`".
A user never typed `numberOfImages`; this maps each request field to the option that sets it.
"""

from __future__ import annotations

import re

__all__ = ["REQUEST_OPTIONS", "in_option_terms"]

REQUEST_OPTIONS: dict[str, str] = {
    "modelId": "--model",
    "positivePrompt": "PROMPT",
    "negativePrompt": "--negative",
    "steps": "--steps",
    "guidance": "--guidance",
    "width": "--width",
    "height": "--height",
    "seed": "--seed",
    "numberOfImages": "-n/--number",
    "loras": "--lora",
    "outputFormat": "--format",
    "network": "--network",
    "tokenType": "--token-type",
}
"""`RenderRequest` wire field -> the `sogni render` / `sogni quote` option that sets it."""

_AT = re.compile(r"^(?P<what>.*?) - at `\$\.(?P<field>[A-Za-z]+)(?P<rest>[^`]*)`$", re.DOTALL)


_LORA = re.compile(r"^LoRA '(?P<ref>[^']*)': (?P<rest>.*)$", re.DOTALL)
"""`sogni_app.api.parse_lora`'s errors: "LoRA 'ID:STRENGTH': Expected ... - at `$.strength`"."""


def in_option_terms(message: str, options: dict[str, str] = REQUEST_OPTIONS) -> str:
    """msgspec's "Expected ... - at `$.field...`" as "OPTION: expected ..."; any other
    message (or a field no option sets) is returned unchanged."""
    lora = _LORA.match(message.strip())
    if lora is not None:
        flag = f"--lora {lora['ref']}"
        return in_option_terms(lora["rest"], {"id": f"{flag}: id", "strength": f"{flag}: strength"})
    match = _AT.match(message.strip())
    if match is None or match["field"] not in options:
        return message
    what = match["what"]
    what = what[:1].lower() + what[1:]
    where = options[match["field"]]
    rest = match["rest"]
    if rest:  # e.g. the second --lora's strength: `$.loras[1].strength`
        where += f" ({rest.lstrip('.')})"
    return f"{where}: {what}"
