"""The prompt policy: which requests are refused before any work is queued or charged.

The policy file (`configs/content_policy.toml`, docs/CONTENT_POLICY.md) holds word lists;
this module loads and validates it, and judges a request's prompts by whole words of their
normalised text (`content_normalise`). Two categories:

- `minors`, always refused: an underage term (or an age below `adult_age`, "15 yo") together
  with a sexual or suggestive term in the positive or style prompt, as AI Horde pairs its
  underage and lewd contexts; also a sexual prompt whose negative prompt steers away from
  adults ("adult", "mature").
- `adult`, a sexual term in the positive or style prompt: rendered only when the request sets
  `disableSafety` and the operator sets `[content] allow_adult = true`.

The negative prompt is otherwise not matched against the sexual lists: "nsfw" there asks for
a safe image. A refusal names the category only; neither it nor the log carries the prompt.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from sogni_coordinator.billing import Refusal
from sogni_coordinator.content_normalise import Shape, normalise, runs, word_streams
from sogni_protocol.catalog import CONFIGS
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import RenderRequest

log = get_logger(__name__)

__all__ = [
    "DEFAULT_POLICY_FILE",
    "REFUSAL_CODE",
    "Category",
    "ContentConfig",
    "ContentPolicy",
    "PolicyError",
    "TermSet",
    "cached_policy",
    "default_policy",
    "load_policy",
    "screen_request",
]

DEFAULT_POLICY_FILE = CONFIGS / "content_policy.toml"
REFUSAL_CODE = "content_policy"
Category = Literal["minors", "adult"]
MESSAGES: dict[Category, str] = {
    "minors": "refused by the content policy (category: minors): sexual content involving "
    "minors is never rendered",
    "adult": "refused by the content policy (category: adult): adult content is rendered only "
    "for requests that set disableSafety, on coordinators whose operator allows it",
}
"""One line per category for the client: names the category, never the prompt."""

Term = Annotated[str, Meta(min_length=2, max_length=80)]
Terms = Annotated[list[Term], Meta(max_length=5000)]


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the bad key."""


class _Minors(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    underage: Terms
    sexual: Terms
    """Sexual or suggestive terms refused next to an underage term (the adult list counts
    too)."""
    negative_adult: Terms = []
    """Terms that, in the negative prompt of a sexual prompt, steer the image young."""


class _Adult(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    sexual: Terms


class _PolicyFile(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    version: Literal[1]
    adult_age: Annotated[int, Meta(ge=1, le=30)] = 18
    minors: _Minors
    adult: _Adult
    image: dict[str, object] = {}
    """The image check's table, validated by `safety.image_policy` (docs/SAFETY.md)."""


Reading = tuple[list[list[Shape]], list[str]]
"""A text as the matcher reads it: each word's shapes (`_shapes`), and its spelled-out words."""


def _read(text: str) -> list[Reading]:
    return [(_shapes(r.words), r.spelled) for r in word_streams(text)]


def _shapes(words: Iterable[str]) -> list[list[Shape]]:
    """Each word's shapes: itself, and its singular when it ends like an English plural."""
    out = []
    for w in words:
        forms = [w]
        if len(w) > 3 and w.endswith("ies"):
            forms.append(w[:-3] + "y")
        if len(w) > 3 and w.endswith("es"):
            forms.append(w[:-2])
        if len(w) > 2 and w.endswith("s"):
            forms.append(w[:-1])
        out.append([runs(f) for f in forms])
    return out


def _fits(shapes: list[Shape], term: Shape) -> bool:
    """One text word (its forms) is the term word: same letters, each run at least as long."""
    letters, need = term
    for got_letters, got in shapes:
        if got_letters == letters and all(g >= n for g, n in zip(got, need, strict=True)):
            return True
    return False


@dataclass
class TermSet:
    """Whole-word terms (single words and phrases) indexed by their first word's letters."""

    _index: dict[str, list[tuple[Shape, ...]]] = field(default_factory=dict)
    _inside: tuple[str, ...] = ()
    """Each single-word term's letters with repeats collapsed ("teen" -> "ten"), looked for
    inside spelled-out words only (collapsed too): loose, since spelling out is deliberate,
    and linear in the prompt's length (a pattern with repeats would backtrack)."""

    @classmethod
    def of(cls, terms: Iterable[str]) -> TermSet:
        made = cls()
        singles: set[str] = set()
        for term in terms:
            for words in {tuple(reading.words) for reading in word_streams(term)}:
                made._add(words)
                singles.add("".join(words))  # "school girl" also matches "schoolgirl"
                if len(words) > 1:
                    made._add(("".join(words),))
        made._inside = tuple(sorted({runs(w)[0] for w in singles}))
        return made

    def _add(self, words: tuple[str, ...]) -> None:
        shape = tuple(runs(w) for w in words)
        self._index.setdefault(shape[0][0], []).append(shape)

    def __len__(self) -> int:
        return sum(len(v) for v in self._index.values())

    def found_in(self, reading: Reading) -> bool:
        """Whether any term occurs as whole words in `reading`, or inside one of its
        spelled-out words."""
        text, spelled = reading
        for joined in spelled:
            collapsed = runs(joined)[0]
            if any(term in collapsed for term in self._inside):
                return True
        for i, word in enumerate(text):
            for letters in {s[0] for s in word}:
                for term in self._index.get(letters, ()):
                    if i + len(term) <= len(text) and all(
                        _fits(text[i + j], part) for j, part in enumerate(term)
                    ):
                        return True
        return False


_AGE_UNIT = r"(?:y ?/? ?o|y\. ?o\.?|yrs?(?:[ -]?old)?|years?[ -]?old)"
AGES = re.compile(rf"(?<![\d.])(\d{{1,3}}) ?-? ?{_AGE_UNIT}(?![a-z])|\baged? ?(\d{{1,3}})\b")
"""Ages written as numbers: "15 yo", "15y/o", "15 year old", "15-years-old", "aged 15"
(matched on the normalised text with whitespace runs made one space)."""
_SPACES = re.compile(r"\s+")


@dataclass
class ContentPolicy:
    """A loaded policy; `judge` says which category refuses a request, or None."""

    underage: TermSet
    suggestive: TermSet
    sexual: TermSet
    negative_adult: TermSet
    adult_age: int = 18
    allow_adult: bool = False
    """The operator's `[content] allow_adult`: adult content for requests that opt in."""

    def _young_age(self, text: str) -> bool:
        for m in AGES.finditer(_SPACES.sub(" ", normalise(text))):
            age = int(m.group(1) or m.group(2))
            if age < self.adult_age:
                return True
        return False

    def judge(
        self,
        positive: str,
        negative: str = "",
        style: str = "",
        *,
        disable_safety: bool = False,
    ) -> Category | None:
        """The category that refuses these prompts, or None when they may be rendered."""
        wanted = f"{positive}\n{style}"
        readings = _read(wanted)
        sexual = any(self.sexual.found_in(r) for r in readings)
        lewd = sexual or any(self.suggestive.found_in(r) for r in readings)
        if lewd:
            young = self._young_age(wanted) or any(self.underage.found_in(r) for r in readings)
            steered = bool(negative) and any(
                self.negative_adult.found_in(r) for r in _read(negative)
            )
            if young or steered:
                return "minors"
        if sexual and not (disable_safety and self.allow_adult):
            return "adult"
        return None

    def prompt_facts(self, positive: str, style: str = "") -> tuple[bool, bool]:
        """(young, lewd) of the wanted prompts: what the image check weighs (docs/SAFETY.md)."""
        readings = _read(f"{positive}\n{style}")
        lewd = any(self.sexual.found_in(r) or self.suggestive.found_in(r) for r in readings)
        young = self._young_age(f"{positive}\n{style}") or any(
            self.underage.found_in(r) for r in readings
        )
        return young, lewd

    def judge_request(
        self, req: RenderRequest, *, disable_safety: bool | None = None
    ) -> Category | None:
        """`judge` on a request's three prompts. `disable_safety` None: the request's own."""
        if disable_safety is None:
            disable_safety = req.disable_safety
        return self.judge(
            req.positive_prompt,
            req.negative_prompt,
            req.style_prompt,
            disable_safety=disable_safety,
        )


def _where(exc: msgspec.ValidationError) -> tuple[str, str]:
    """("minors.underage[3]", "Expected `str` ...") from msgspec's "... - at `$.x.y`"."""
    text, _, at = str(exc).rpartition(" - at `")
    if not text:
        return "", str(exc)
    return at.rstrip("`").removeprefix("$.").removeprefix("$"), text


def load_policy(path: Path, *, allow_adult: bool = False) -> ContentPolicy:
    """Read and validate a policy file; raises `PolicyError` naming the file and the key."""
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"{where}: cannot read the content policy: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{where}: not valid TOML: {exc}") from None
    try:
        spec = msgspec.convert(raw, _PolicyFile)
    except msgspec.ValidationError as exc:
        key, text = _where(exc)
        raise PolicyError(f"{where}: {key or 'policy'}: {text}") from None
    lists = {
        "minors.underage": spec.minors.underage,
        "minors.sexual": spec.minors.sexual,
        "minors.negative_adult": spec.minors.negative_adult,
        "adult.sexual": spec.adult.sexual,
    }
    for key, terms in lists.items():
        for i, term in enumerate(terms):
            if not any(any(w.isalpha() for w in r.words) for r in word_streams(term)):
                raise PolicyError(
                    f"{where}: {key}[{i}]: a term needs a word of letters (it would match nothing)"
                )
    return ContentPolicy(
        underage=TermSet.of(spec.minors.underage),
        suggestive=TermSet.of(spec.minors.sexual),
        sexual=TermSet.of(spec.adult.sexual),
        negative_adult=TermSet.of(spec.minors.negative_adult),
        adult_age=spec.adult_age,
        allow_adult=allow_adult,
    )


@lru_cache(maxsize=16)
def _load_once(path: str, mtime_ns: int, allow_adult: bool) -> ContentPolicy:
    del mtime_ns  # part of the key only: an edited file is read again
    return load_policy(Path(path), allow_adult=allow_adult)


def cached_policy(path: Path, *, allow_adult: bool = False) -> ContentPolicy:
    """`load_policy`, read once per version of the file."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = -1  # load_policy says what is wrong
    return _load_once(str(path), mtime, allow_adult)


def default_policy() -> ContentPolicy:
    """The shipped policy with adult content off: what a dispatcher without one applies."""
    return cached_policy(DEFAULT_POLICY_FILE)


class ContentConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """`[content]`; env `SOGNI_COORDINATOR_CONTENT__<KEY>`. The policy file is read and
    validated when the config loads, so a bad list stops the coordinator at start."""

    policy_file: Path | None = None
    """The policy (docs/CONTENT_POLICY.md); None: the shipped `configs/content_policy.toml`."""
    allow_adult: bool = False
    """Render adult content for requests that set `disableSafety` (never minors)."""
    image_check: bool = True
    """Classify every image before delivery (docs/SAFETY.md; NudeNet, `coordinator` extra)."""
    adult_action: Literal["blur", "withhold"] = "blur"
    """What an adult image for a request that did not opt in becomes; the job is paid."""

    def __post_init__(self) -> None:
        self.policy()
        if self.image_check:  # a bad [image] table stops the coordinator at start too
            from sogni_coordinator.safety.detector import require_detector
            from sogni_coordinator.safety.image_table import read_image_table

            read_image_table(self.path)
            require_detector()

    @property
    def path(self) -> Path:
        return (self.policy_file or DEFAULT_POLICY_FILE).expanduser()

    def policy(self) -> ContentPolicy:
        """The loaded policy (cached per file and `allow_adult`)."""
        return cached_policy(self.path, allow_adult=self.allow_adult)


def screen_request(
    req: RenderRequest, policy: ContentPolicy | None, *, disable_safety: bool | None = None
) -> None:
    """Raise `Refusal("content_policy", ...)` when the policy refuses `req`; called before
    anything is reserved, so a refused request costs nothing. Logs the category only."""
    category = (policy or default_policy()).judge_request(req, disable_safety=disable_safety)
    if category is not None:
        log.info("content_refused", category=category)
        raise Refusal(REFUSAL_CODE, MESSAGES[category])
