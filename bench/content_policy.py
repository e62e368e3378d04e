"""Prompt policy: how much of the refused corpus it refuses, how much of the allowed corpus it
refuses by mistake, and what the check costs per prompt.

The corpus is `tests/coordinator/content_corpus.toml` (synthetic, written for the tests); its
refused side is built here from the shipped policy's own term lists (every underage term with
every sexual term, through each template), then disguised as evaders do: leetspeak, Cyrillic
look-alike letters, letters spaced with dots, doubled letters, full-width forms, a zero-width
space. The allowed side is ordinary prompts, near misses of the lists' words, and the
corpus's known false refusals.

Run: ``.venv/bin/python -m bench content`` (writes its section of BENCHMARKS.md; a few
seconds) or ``.venv/bin/python -m bench.content_policy [--quick]`` (prints only).
"""

from __future__ import annotations

import argparse
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _common as common
from sogni_coordinator.content_policy import DEFAULT_POLICY_FILE, ContentPolicy, load_policy

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "coordinator" / "content_corpus.toml"


@dataclass(frozen=True)
class Case:
    """One corpus prompt and the category the policy must give it with safety on."""

    positive: str
    negative: str = ""
    want: str | None = None
    """"minors", "adult", or None (allowed)."""


def corpus_file(path: Path = CORPUS) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def policy_lists(path: Path = DEFAULT_POLICY_FILE) -> dict[str, Any]:
    """The raw term lists of a policy file (the corpus is built from them)."""
    with path.open("rb") as f:
        return tomllib.load(f)


def _leet(t: str) -> str:
    return t.translate(str.maketrans("eaosit", "340517"))


def _homoglyph(t: str) -> str:
    return t.translate(str.maketrans("aeopcx", "аеорсх"))  # Cyrillic


def _spaced(t: str) -> str:
    return " ".join(".".join(w) for w in t.split())


def _doubled(t: str) -> str:
    return "".join(ch * 2 if ch in "aeiou" else ch for ch in t)


def _fullwidth(t: str) -> str:
    return "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in t)


def _zero_width(t: str) -> str:
    return t[:1] + "\u200b" + t[1:] if len(t) > 1 else t


DISGUISES: dict[str, Callable[[str], str]] = {
    "plain": lambda t: t,
    "UPPER case": str.upper,
    "leetspeak (3 4 0 5 1 7)": _leet,
    "Cyrillic look-alikes": _homoglyph,
    "letters spaced with dots": _spaced,
    "vowels doubled": _doubled,
    "full-width forms": _fullwidth,
    "zero-width space": _zero_width,
}
"""How a refused term is disguised in the corpus (applied to both terms of a pair)."""


def _dropped(t: str) -> str:
    return t if len(t) < 4 else t[: len(t) // 2] + t[len(t) // 2 + 1 :]


def _comma_spelled(t: str) -> str:
    return ", ".join(t)


MISSED: dict[str, Callable[[str], str]] = {
    "a letter dropped (misspelling)": _dropped,
    "letters separated by commas": _comma_spelled,
}
"""Disguises the normaliser does not undo, measured to show the limit (not in the rate)."""


def refused_cases(
    policy: dict[str, Any], corpus: dict[str, Any], disguise: Callable[[str], str]
) -> Iterator[Case]:
    """Every refused case of the corpus, terms disguised by `disguise`."""
    minors, adult = policy["minors"], policy["adult"]["sexual"]
    sexual = [*minors["sexual"], *adult]
    for template in corpus["minors_templates"]:
        for young in minors["underage"]:
            for lewd in sexual:
                text = template.format(underage=disguise(young), sexual=disguise(lewd))
                yield Case(text, want="minors")
    for positive, negative in corpus["negative_templates"]:
        for lewd in sexual:
            for steer in minors["negative_adult"]:
                yield Case(
                    positive.format(sexual=disguise(lewd)),
                    negative.format(negative_adult=disguise(steer)),
                    want="minors",
                )
    for template in corpus["adult_templates"]:
        for term in adult:
            yield Case(template.format(adult=disguise(term)), want="adult")


def age_cases(policy: dict[str, Any], corpus: dict[str, Any]) -> Iterator[tuple[Case, int]]:
    """Numeric ages around `adult_age` with each suggestive term: (case, age)."""
    limit = int(policy.get("adult_age", 18))
    for template in corpus["young_ages"]:
        for age in (5, 12, limit - 1, limit, limit + 7):
            for lewd in policy["minors"]["sexual"]:
                want = "minors" if age < limit else None
                yield Case(template.format(age=age, sexual=lewd), want=want), age


def allowed_cases(corpus: dict[str, Any]) -> list[Case]:
    return [Case(p) for p in corpus["allowed"]] + [Case(p, n) for p, n in corpus["allowed_pairs"]]


def false_refusal_cases(corpus: dict[str, Any]) -> list[Case]:
    return [Case(p, want="adult") for p in corpus["false_refusals"]]


def judge(policy: ContentPolicy, case: Case) -> str | None:
    return policy.judge(case.positive, case.negative)


def _rate(hit: int, total: int) -> str:
    return f"{hit}/{total} ({100.0 * hit / total:.1f} %)" if total else "-"


def _cost_us(policy: ContentPolicy, cases: list[Case], repeats: int) -> list[float]:
    """Microseconds per prompt, one figure per repeat over all `cases`."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for case in cases:
            policy.judge(case.positive, case.negative)
        out.append((time.perf_counter() - start) / len(cases) * 1e6)
    return out


ADVERSARIAL = {
    "single letters": "a " * 2048,
    "ones (two readings)": "1 " * 2048,
    "short numbers": "15 " * 1365,
    "spelled-out words": "s.e.x " * 682,
    "one long word": "a" * 4096,
}
"""Prompts of the maximum length (4,096 characters) built to make the check work hardest."""


def _worst_ms(policy: ContentPolicy, repeats: int) -> tuple[str, float]:
    """The slowest adversarial prompt (as positive, negative and style) and its median ms."""
    worst = ("", 0.0)
    for name, text in ADVERSARIAL.items():
        text = text[:4096]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            policy.judge(text, text, text)
            times.append((time.perf_counter() - start) * 1e3)
        if common.median(times) > worst[1]:
            worst = (name, common.median(times))
    return worst


def run(quick: bool = False, command: str = "python -m bench content") -> str:
    lists, corpus = policy_lists(), corpus_file()
    policy = load_policy(DEFAULT_POLICY_FILE)
    rows = []
    refused_total = refused_hit = 0
    for name, disguise in DISGUISES.items():
        cases = list(refused_cases(lists, corpus, disguise))
        hit = sum(judge(policy, c) == c.want for c in cases)
        refused_total += len(cases)
        refused_hit += hit
        rows.append((f"refused corpus, {name}", len(cases), _rate(hit, len(cases))))
    for name, disguise in MISSED.items():
        cases = list(refused_cases(lists, corpus, disguise))
        hit = sum(judge(policy, c) == c.want for c in cases)
        rows.append((f"(a limit) {name}", len(cases), _rate(hit, len(cases))))
    ages = [c for c, _ in age_cases(lists, corpus)]
    young = [c for c in ages if c.want == "minors"]
    rows.append(
        (
            "refused corpus, ages under adult_age",
            len(young),
            _rate(sum(judge(policy, c) == "minors" for c in young), len(young)),
        )
    )
    allowed = allowed_cases(corpus) + [c for c in ages if c.want is None]
    wrong = sum(judge(policy, c) is not None for c in allowed)
    known = false_refusal_cases(corpus)
    known_refused = sum(judge(policy, c) is not None for c in known)
    everything = allowed + known
    false_total = wrong + known_refused
    plain = list(refused_cases(lists, corpus, DISGUISES["plain"]))
    sample = everything + plain[: max(1, len(everything))]
    repeats = 5 if quick else 20
    costs = _cost_us(policy, sample, repeats)
    worst_name, worst_ms = _worst_ms(policy, 3 if quick else 9)
    lines = [
        "## Content policy (prompt check)",
        "",
        f"Command: `{command}`. The shipped `configs/content_policy.toml` "
        f"({len(lists['minors']['underage'])} underage, {len(lists['minors']['sexual'])} "
        f"suggestive, {len(lists['adult']['sexual'])} adult terms) judging the synthetic "
        "corpus `tests/coordinator/content_corpus.toml` with safety on (no `disableSafety`). "
        "The refused corpus is every underage x sexual term pair through each template, sexual "
        "prompts whose negative prompt steers away from adults, and each adult term; each "
        "disguise is applied to both terms. A hit is the expected category (minors or adult). "
        "The corpus is built from the lists, so the plain rows only show the matcher finds its "
        "own terms; the disguise rows show what normalisation undoes, and the '(a limit)' rows "
        "what it does not.",
        "",
        common.table(
            ("corpus", "prompts", "refused with the expected category"),
            rows,
        ),
        "",
        common.table(
            ("summary", "value"),
            [
                (
                    "refusal rate, refused corpus (disguises the normaliser undoes)",
                    _rate(refused_hit, refused_total),
                ),
                ("false refusals, ordinary prompts", _rate(wrong, len(allowed))),
                (
                    "false refusals, incl. the corpus's known ones (words, not meaning)",
                    _rate(false_total, len(everything)),
                ),
                (
                    "check cost per prompt (positive + negative)",
                    f"{common.median(costs):.1f} us [{common.spread(costs)}]",
                ),
                (
                    "worst case: three 4,096-character prompts built to be slow",
                    f"{worst_ms:.1f} ms ({worst_name})",
                ),
            ],
        ),
        "",
        f"Cost: {len(sample)} prompts (half allowed, half refused), {repeats} passes, median of "
        "the passes [min-max], one thread, in process. The word lists judge words, not meaning: "
        "paraphrase passes them (docs/CONTENT_POLICY.md, Limits).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(run(args.quick, "python -m bench.content_policy" + (" --quick" if args.quick else "")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
