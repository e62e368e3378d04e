"""Prompt text -> the words the content policy compares, undoing the usual disguises.

Why: a word list is only as good as the text it is matched against. "S3X", "ｓｅｘ", "sеx" (a
Cyrillic е), "s.e.x" and "seeexxx" all read as the same word to a person and to a text
encoder, so they must reach the matcher as the same word. Steps, in order:

1. Unicode NFKC (full-width and other compatibility forms) and case folding;
2. invisible format characters dropped (zero-width space and joiners, soft hyphen);
3. common Cyrillic and Greek look-alikes of Latin letters mapped to them (`CONFUSABLES`);
4. accents stripped (NFKD, combining marks dropped);
5. split into words on anything but ASCII letters, digits, `@` and `$`;
6. leetspeak undone in words that are not plain numbers (`LEET`; `1` is tried as i and l);
7. runs of single letters joined ("s e x", "s.e.x", "s-e-x" -> "sex").

Repeated letters ("seeexxx") are left in the words: `runs` gives the run-length shape the
matcher compares, so a repeat may lengthen a term's letter but never creates a term
("ten" is not "teen").
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from dataclasses import dataclass

__all__ = ["CONFUSABLES", "LEET", "Shape", "Words", "normalise", "runs", "word_streams"]

CONFUSABLES = str.maketrans(
    {
        # Cyrillic (lower case: case folding ran first)
        "а": "a",
        "в": "b",
        "е": "e",
        "ё": "e",
        "з": "3",
        "і": "i",
        "ї": "i",
        "ј": "j",
        "к": "k",
        "м": "m",
        "н": "h",
        "о": "o",
        "р": "p",
        "с": "c",
        "ѕ": "s",
        "т": "t",
        "у": "y",
        "х": "x",
        "ԁ": "d",
        "ԛ": "q",
        "ԝ": "w",
        "ь": "b",
        # Greek
        "α": "a",
        "β": "b",
        "γ": "y",
        "ε": "e",
        "η": "n",
        "ι": "i",
        "κ": "k",
        "μ": "u",
        "ν": "v",
        "ο": "o",
        "ρ": "p",
        "σ": "o",
        "ς": "s",
        "τ": "t",
        "υ": "u",
        "χ": "x",
        "ω": "w",
    }
)
"""Look-alikes of Latin letters in other scripts (a small table, not Unicode's full list)."""

LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a"})
"""Leetspeak digits and signs -> letters (`$` is handled with it; `1` -> l is a second try)."""
_LEET_L = str.maketrans({"1": "l"})
_WORD = re.compile(r"[a-z0-9@$]+")
_JOIN_GAP = re.compile(r"[\s.\-_*~+·'`]{1,3}")
"""What may sit between two single letters that are joined ("s e", "s.e", "s - e"; not
"s, e": prompts list tags with commas)."""


@dataclass(frozen=True)
class Words:
    """One reading of a text: its words, and those spelled out letter by letter."""

    words: list[str]
    spelled: list[str]
    """Words joined from single letters ("s.e.x"): deliberate, so the matcher also looks
    for terms inside them ("c h i l d s e x")."""


Shape = tuple[str, tuple[int, ...]]
"""A word's letters with repeats collapsed, and the length of each run: "seex" ->
("sex", (1, 2, 1))."""


def normalise(text: str) -> str:
    """Steps 1-4: the text in lower-case ASCII-ish form, separators kept, at most
    `SCREENED_CHARS` long. Every step runs in C (no Python loop per character): anyone may
    send a prompt, and NFKC makes one character up to 18 (U+FDFA), so 4,096 of them cost
    the event loop 160 ms per request when characters were dropped one at a time."""
    invisible, marks = _droppable()
    text = unicodedata.normalize("NFKC", text)[:SCREENED_CHARS].casefold()
    text = text.translate(invisible).translate(CONFUSABLES)
    return unicodedata.normalize("NFKD", text).translate(marks)


SCREENED_CHARS = 16_384
"""Characters of a prompt's NFKC form that are screened: four times the longest prompt
(`ids.MAX_PROMPT_CHARS`), far past what any text encoder reads (77 CLIP tokens; T5's 512);
only a prompt of expanding ligatures reaches it."""


@functools.cache
def _droppable() -> tuple[dict[int, None], dict[int, None]]:
    """Translation tables deleting the format characters (category Cf: zero-width space and
    joiners, soft hyphen, ...) and the combining marks, built once (0.15 s) from this
    Python's Unicode tables."""
    every = range(sys.maxunicode + 1)
    cf = dict.fromkeys(c for c in every if unicodedata.category(chr(c)) == "Cf")
    marks = dict.fromkeys(c for c in every if unicodedata.combining(chr(c)))
    return cf, marks


def _leet(word: str, one: dict[int, str]) -> str:
    """Numbers too ("7175"): a number that reads as a term is rare, and "1024" -> "ioza"
    matches nothing."""
    return word.translate(one).replace("$", "s").translate(LEET)


def _join_singles(text: str, spans: list[tuple[str, int, int]]) -> Words:
    """Words, with each run of 2+ single letters with only a short gap between them joined."""
    out: list[str] = []
    spelled: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) > 1:
            out.append("".join(run))
            spelled.append(out[-1])
        else:
            out.extend(run)
        run.clear()

    last_end = None
    for word, start, end in spans:
        single = len(word) == 1 and word.isalpha()
        close = last_end is not None and _JOIN_GAP.fullmatch(text, last_end, start) is not None
        if not (single and run and close):
            flush()
        if single:
            run.append(word)
        else:
            out.append(word)
        last_end = end
    flush()
    return Words(out, spelled)


def word_streams(text: str) -> list[Words]:
    """The normalised words of `text`: one reading, or two when a `1` was read both as i
    and as l (each is matched; a term found in either counts)."""
    plain = normalise(text)
    found = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(plain)]
    tries = [str.maketrans({"1": "i"})]
    if "1" in plain:
        tries.append(_LEET_L)
    return [_join_singles(plain, [(_leet(w, one), s, e) for w, s, e in found]) for one in tries]


def runs(word: str) -> Shape:
    """`word`'s letters with repeats collapsed, and each run's length."""
    letters: list[str] = []
    counts: list[int] = []
    for ch in word:
        if letters and letters[-1] == ch:
            counts[-1] += 1
        else:
            letters.append(ch)
            counts.append(1)
    return "".join(letters), tuple(counts)
