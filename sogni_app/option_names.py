"""Input errors in the words the user typed: `-n/--number`, not the wire field `$.numberOfImages`.

Why: `sogni render` and `sogni quote` build a `RenderRequest` and let its schema validate the
values, so a bad value comes back as msgspec's "Expected `int` >= 1 - at `$.numberOfImages`".
A user never typed `numberOfImages`; this maps each request field to the option that sets it.
"""

from __future__ import annotations

import functools
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


@functools.cache
def _literal_choices() -> dict[str, tuple[str, ...]]:
    """Wire field -> its allowed values, for the request's fields of one of a few values
    (read once, when an error first needs it: not at every CLI's start)."""
    from typing import Literal, get_args, get_origin, get_type_hints

    import msgspec

    from sogni_protocol.messages import RenderRequest

    hints = get_type_hints(RenderRequest, include_extras=True)
    out: dict[str, tuple[str, ...]] = {}
    for field in msgspec.structs.fields(RenderRequest):
        hint = hints[field.name]
        while get_origin(hint) is not None and get_origin(hint) is not Literal:
            hint = get_args(hint)[0]  # Annotated[Literal[...], Meta(...)]
        if get_origin(hint) is Literal:
            out[field.encode_name] = tuple(str(v) for v in get_args(hint))
    return out


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
    choices = _literal_choices().get(match["field"]) if options is REQUEST_OPTIONS else None
    if choices and what.startswith("invalid enum value"):
        what += f" (one of: {', '.join(choices)})"
    where = options[match["field"]]
    rest = match["rest"]
    if rest:  # e.g. the second --lora's strength: `$.loras[1].strength`
        where += f" ({rest.lstrip('.')})"
    return f"{where}: {what}"
