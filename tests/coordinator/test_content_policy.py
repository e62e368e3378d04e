"""The prompt policy (`content_policy`, `content_normalise`): the synthetic corpus, the
normaliser's disguises, whole-word matching, the allow_adult x disableSafety matrix, the
policy file's validation, and a refusal through the real Dispatcher that charges nothing and
echoes no prompt (in the refusal or the logs).

The corpus (`content_corpus.toml`) holds no abuse material: its refused side is built from
the shipped policy's own term lists (`bench.content_policy`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import msgspec
import pytest
from eth_account import Account

from bench.content_policy import (
    DISGUISES,
    MISSED,
    Case,
    age_cases,
    allowed_cases,
    corpus_file,
    false_refusal_cases,
    policy_lists,
    refused_cases,
)
from sogni_app.api import authorize
from sogni_coordinator.billing import Refusal
from sogni_coordinator.config import CoordinatorConfig
from sogni_coordinator.content_normalise import word_streams
from sogni_coordinator.content_policy import (
    DEFAULT_POLICY_FILE,
    ContentConfig,
    ContentPolicy,
    PolicyError,
    default_policy,
    load_policy,
)
from sogni_protocol.logs import configure_logging
from sogni_protocol.settings import SettingsError, load_settings

from .conftest import Harness, request

LISTS = policy_lists()
CORPUS = corpus_file()
POLICY = load_policy(DEFAULT_POLICY_FILE)
ADULT_OK = load_policy(DEFAULT_POLICY_FILE, allow_adult=True)
PAIR = (LISTS["minors"]["underage"][0], LISTS["adult"]["sexual"][0])
"""One underage term and one adult term from the shipped lists (never written out here)."""
ADULT = LISTS["adult"]["sexual"][1]


def _judge(policy: ContentPolicy, case: Case, *, disable_safety: bool = False) -> str | None:
    return policy.judge(case.positive, case.negative, disable_safety=disable_safety)


def _write_policy(path: Path, **lists: list[str]) -> Path:
    """A small policy file: the given lists, the rest as placeholders."""
    body = {
        "underage": ["placeholder-young"],
        "sexual": ["placeholder-lewd"],
        "negative_adult": ["placeholder-grown"],
        "adult": ["placeholder-adult"],
    } | lists
    path.write_text(
        "version = 1\n[minors]\n"
        f"underage = {json.dumps(body['underage'])}\n"
        f"sexual = {json.dumps(body['sexual'])}\n"
        f"negative_adult = {json.dumps(body['negative_adult'])}\n"
        f"[adult]\nsexual = {json.dumps(body['adult'])}\n"
    )
    return path


# --- the corpus -----------------------------------------------------------------------------
def test_every_refused_corpus_prompt_is_refused_with_its_category() -> None:
    cases = list(refused_cases(LISTS, CORPUS, DISGUISES["plain"]))
    assert len(cases) > 5000  # every underage x sexual pair, every template
    wrong = [c for c in cases if _judge(POLICY, c) != c.want]
    assert wrong == []
    # minors stays refused whatever the request and the operator say
    minors = [c for c in cases if c.want == "minors"][::50]
    assert all(_judge(ADULT_OK, c, disable_safety=True) == "minors" for c in minors)


@pytest.mark.parametrize("name", [n for n in DISGUISES if n != "plain"])
def test_disguised_refused_prompts_are_still_refused(name: str) -> None:
    cases = list(refused_cases(LISTS, CORPUS, DISGUISES[name]))[::11]  # a spread sample
    wrong = [c for c in cases if _judge(POLICY, c) != c.want]
    assert wrong == []


def test_what_the_normaliser_does_not_undo_is_measured_as_a_limit() -> None:
    # misspellings and comma-spelled letters pass: said in docs/CONTENT_POLICY.md
    for disguise in MISSED.values():
        cases = list(refused_cases(LISTS, CORPUS, disguise))[::37]
        assert sum(_judge(POLICY, c) == c.want for c in cases) < len(cases) / 2


def test_the_allowed_corpus_is_allowed_and_the_known_false_refusals_are_pinned() -> None:
    allowed = allowed_cases(CORPUS)
    assert len(allowed) > 40
    assert [c.positive for c in allowed if _judge(POLICY, c) is not None] == []
    known = false_refusal_cases(CORPUS)
    assert [_judge(POLICY, c) for c in known] == ["adult"] * len(known)


def test_numeric_ages_below_adult_age_with_a_suggestive_term_are_minors() -> None:
    seen = {True: 0, False: 0}
    for case, age in age_cases(LISTS, CORPUS):
        assert _judge(POLICY, case) == case.want, age
        seen[age < 18] += 1
    assert seen[True] and seen[False]


# --- normalisation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("S3X 4ND 7HE C1TY", ["sex", "and", "the", "city"]),  # leetspeak, 1 as i
        ("p@$$word", ["password"]),
        ("sеx", ["sex"]),  # a Cyrillic е
        ("ѕοс", ["soc"]),  # Cyrillic ѕ, Greek ο, Cyrillic с
        ("ｆｕｌｌ ｗｉｄｔｈ", ["full", "width"]),  # NFKC
        ("s\u200bex", ["sex"]),  # zero-width space
        ("naïve café", ["naive", "cafe"]),  # accents
        ("s.e.x", ["sex"]),
        ("s e x", ["sex"]),
        ("s - e - x", ["sex"]),
        ("s, e, x", ["s", "e", "x"]),  # commas separate tags: not joined
        ("a cat", ["a", "cat"]),  # one single letter is a word
    ],
)
def test_normalisation(text: str, words: list[str]) -> None:
    assert word_streams(text)[0].words == words


def test_a_one_is_read_as_i_and_as_l() -> None:
    readings = [r.words for r in word_streams("1o1")]
    assert readings == [["ioi"], ["lol"]]


def test_repeated_letters_lengthen_a_term_but_never_make_one(tmp_path: Path) -> None:
    policy = load_policy(_write_policy(tmp_path / "p.toml", underage=["teen"], sexual=["lewd"]))
    assert policy.judge("teeeeen leeewd") == "minors"
    assert policy.judge("ten lewd") is None  # "ten" is not "teen"
    assert policy.judge("t e e n l e w d") == "minors"  # spelled out, run together


# --- whole words ----------------------------------------------------------------------------
def test_terms_match_whole_words_only(tmp_path: Path) -> None:
    policy = load_policy(_write_policy(tmp_path / "p.toml", adult=["ass", "school bus"]))
    for text in ("a class photo", "passenger", "assassin", "bass guitar", "schoolbusy"):
        assert policy.judge(text) is None, text
    for text in ("ass", "ASSES", "a-s-s", "school-bus", "schoolbus", "school  bus"):
        assert policy.judge(text) == "adult", text
    assert POLICY.judge("the sussex coast, essex, a sextant, unisex") is None


def test_the_negative_prompt_counts_only_as_steering(tmp_path: Path) -> None:
    young, lewd = PAIR
    # sexual or underage words in the negative prompt ask for a safe image
    assert POLICY.judge("a garden party", f"{lewd}, {young}") is None
    # a sexual prompt steering away from adults is refused as minors
    steer = LISTS["minors"]["negative_adult"][0]
    assert ADULT_OK.judge(f"a woman, {lewd}", steer, disable_safety=True) == "minors"
    assert ADULT_OK.judge(f"a woman, {lewd}", "lowres", disable_safety=True) is None
    # the style prompt counts like the positive one
    assert POLICY.judge(young, "", lewd) == "minors"


# --- adult: allow_adult x disableSafety -----------------------------------------------------
@pytest.mark.parametrize(
    ("allow_adult", "disable_safety", "want"),
    [(False, False, "adult"), (False, True, "adult"), (True, False, "adult"), (True, True, None)],
)
def test_adult_needs_both_the_operator_and_the_request(
    allow_adult: bool, disable_safety: bool, want: str | None
) -> None:
    policy = load_policy(DEFAULT_POLICY_FILE, allow_adult=allow_adult)
    assert policy.judge(f"a woman, {ADULT}", disable_safety=disable_safety) == want
    young, lewd = PAIR
    assert policy.judge(f"{young}, {lewd}", disable_safety=disable_safety) == "minors"
    assert policy.judge("a red circle", disable_safety=disable_safety) is None


def test_a_request_is_safety_on_unless_it_sets_disable_safety() -> None:
    req = request(positive_prompt=f"a woman, {ADULT}")
    assert req.disable_safety is False  # the default: safety on
    assert ADULT_OK.judge_request(req) == "adult"
    assert ADULT_OK.judge_request(msgspec.structs.replace(req, disable_safety=True)) is None
    assert ADULT_OK.judge_request(req, disable_safety=True) is None


# --- the policy file ------------------------------------------------------------------------
def test_the_shipped_policy_loads_and_is_the_default() -> None:
    assert default_policy().judge(f"{PAIR[0]} {PAIR[1]}") == "minors"
    assert ContentConfig().policy() is default_policy()


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("version = 1\n[minors]\nunderage = ['a1']\nsexual = 3\n[adult]\nsexual = []\n", "sexual"),
        ("version = 2\n[minors]\nunderage = []\nsexual = []\n[adult]\nsexual = []\n", "version"),
        (
            "version = 1\n[minors]\nunderage = []\nsexual = []\nlewd = []\n[adult]\nsexual = []\n",
            "lewd",
        ),
        (
            "version = 1\n[minors]\nunderage = ['ok', '!!']\nsexual = []\n[adult]\nsexual = []\n",
            "minors.underage[1]",
        ),
        ("version = 1\n[minors]\nunderage = []\nsexual = []\n", "adult"),
        ("version = [\n", "not valid TOML"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert "\n" not in message.strip() or key == "not valid TOML"
    assert str(path) in message and key in message


def test_the_coordinator_config_validates_the_policy_at_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 1\n[minors]\nunderage = 5\n")
    text = f"[content]\npolicy_file = {json.dumps(str(bad))}\n"
    with pytest.raises(SettingsError) as info:
        load_settings(CoordinatorConfig, text, {}, "SOGNI_COORDINATOR")
    assert "content" in str(info.value) and "minors.underage" in str(info.value)
    good = _write_policy(tmp_path / "good.toml")
    text = f"[content]\npolicy_file = {json.dumps(str(good))}\nallow_adult = true\n"
    cfg = load_settings(CoordinatorConfig, text, {}, "SOGNI_COORDINATOR")
    assert cfg.content.allow_adult and cfg.content.policy().allow_adult
    assert CoordinatorConfig().content.allow_adult is False


# --- through the real Dispatcher ------------------------------------------------------------
async def test_a_refused_request_costs_nothing_and_echoes_no_prompt(
    paid: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("debug", json=True, capture_warnings=False)
    payer = Account.create()
    assert paid.ledger is not None
    paid.ledger.credit_purchase(payer.address, 1)
    before = paid.ledger.balance(payer.address)
    sentinel = "zebra-sentinel-4417"
    young, lewd = PAIR
    for prompt, category in (
        (f"{sentinel} {young}, {lewd}", "minors"),
        (f"{sentinel} {ADULT}", "adult"),
    ):
        req = authorize(
            request(2, positive_prompt=prompt), bytes(payer.key), paid.dispatcher.domain
        )
        with pytest.raises(Refusal) as info:
            await paid.submit(req)
        assert info.value.code == "content_policy"
        reason = info.value.reason
        assert f"category: {category}" in reason and "\n" not in reason
        assert sentinel not in reason and young not in reason.replace("minors", "")
        assert lewd not in reason and ADULT not in reason
    assert paid.ledger.balance(payer.address) == before  # nothing charged ...
    assert paid.ledger.reserved_for(payer.address) == dict.fromkeys(before, 0)  # ... or held
    assert paid.dispatcher.requests == {} and paid.dispatcher.queue == type(paid.dispatcher.queue)()
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    refused = [e for e in events if e.get("event") == "content_refused"]
    assert [e["category"] for e in refused] == ["minors", "adult"]
    assert sentinel not in err and f"{young}, {lewd}" not in err

    # the control: the same payer's clean request is accepted and charged
    clean = authorize(
        request(1, negative_prompt=f"{lewd}, {young}"), bytes(payer.key), paid.dispatcher.domain
    )
    sub = await paid.submit(clean)
    assert sub.accepted.cost_micro > 0
    assert paid.ledger.reserved_for(payer.address) != dict.fromkeys(before, 0)


async def test_a_dispatcher_given_a_policy_applies_it(coord: Harness, tmp_path: Path) -> None:
    custom = load_policy(_write_policy(tmp_path / "p.toml", adult=["placeholder-adult"]))
    coord.dispatcher.content_policy = custom  # type: ignore[attr-defined]
    with pytest.raises(Refusal, match="category: adult"):
        await coord.submit(request(positive_prompt="placeholder adult, a red circle"))
    # the shipped lists no longer apply to this dispatcher: its own policy does
    await coord.submit(request(positive_prompt=f"a woman, {ADULT}"))
    assert len(coord.dispatcher.requests) == 1


def test_pairs_are_checked_in_any_order_and_place() -> None:
    young_terms = LISTS["minors"]["underage"][:5]
    lewd_terms = LISTS["minors"]["sexual"][:5]
    for young, lewd in itertools.product(young_terms, lewd_terms):
        assert POLICY.judge(f"{lewd}. a garden. {young}") == "minors"
        assert POLICY.judge(young) is None and POLICY.judge(lewd) is None
