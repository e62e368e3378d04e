"""`normalise` in C-speed steps gives what the per-character reference gave, and bounds its
work: anyone may send a prompt, and NFKC turns one character into up to 18."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from sogni_coordinator.content_normalise import CONFUSABLES, SCREENED_CHARS, normalise
from sogni_coordinator.content_policy import default_policy
from sogni_protocol.ids import MAX_PROMPT_CHARS
from sogni_protocol.messages import RenderRequest


def _reference(text: str) -> str:
    """The former implementation: one Python step per character."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = text.translate(CONFUSABLES)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_normalise_equals_the_per_character_reference(text: str) -> None:
    assert normalise(text) == _reference(text)


def test_disguises_still_read_as_the_word() -> None:
    assert normalise("s\u200be\u00adx café naïve ＳＥＸ") == "sex cafe naive sex"


def test_an_expanding_prompt_is_screened_only_as_far_as_any_encoder_reads() -> None:
    ligatures = "\ufdfa" * MAX_PROMPT_CHARS  # 18 characters each under NFKC
    assert len(unicodedata.normalize("NFKC", ligatures)) > SCREENED_CHARS
    assert len(normalise(ligatures)) <= SCREENED_CHARS
    policy = default_policy()  # a refused word at the start is still refused
    req = RenderRequest(model_id="sogni-tiny-sd", positive_prompt="nude child " + ligatures[:4000])
    assert policy.judge_request(req) is not None
