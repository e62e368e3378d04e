"""The image policy without a detector: the decision matrix (category x opt-in x clean
prompt), the `[image]` table's validation, the prompt facts it weighs, and the redactions
(format and size kept). Scores here are plain dicts: this is the layer the detector feeds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sogni_coordinator.content_policy import (
    DEFAULT_POLICY_FILE,
    ContentConfig,
    default_policy,
)
from sogni_coordinator.safety.image_policy import decide, load_image_rules
from sogni_coordinator.safety.image_table import ImageTableError
from sogni_coordinator.safety.redact import blur, placeholder

RULES = load_image_rules(DEFAULT_POLICY_FILE)
NUDE = {"FEMALE_BREAST_EXPOSED": 0.9}
FACE = {"FACE_FEMALE": 0.95, "FEMALE_BREAST_COVERED": 0.9}
WEAK = {"FEMALE_BREAST_EXPOSED": 0.35}
"""Over the minors threshold (0.3), under the adult one (0.5)."""


@pytest.mark.parametrize(
    ("scores", "young", "clean", "adult_ok", "want"),
    [
        (FACE, False, True, False, (None, "deliver")),
        (FACE, True, True, False, (None, "deliver")),
        (NUDE, False, True, False, ("adult", "blur")),
        (NUDE, False, True, True, ("adult", "deliver")),
        (NUDE, True, True, False, ("minors", "refuse")),  # clean prompt: the node's doing
        (NUDE, True, True, True, ("minors", "refuse")),  # opting in changes nothing
        (NUDE, True, False, True, ("minors", "withhold")),  # the prompt steered it
        (WEAK, True, False, False, ("minors", "withhold")),
        (WEAK, False, True, False, (None, "deliver")),
    ],
)
def test_the_decision_matrix(
    scores: dict[str, float], young: bool, clean: bool, adult_ok: bool, want: tuple[str, str]
) -> None:
    d = decide(RULES, scores, young=young, clean=clean, adult_ok=adult_ok, adult_action="blur")
    assert (d.category, d.action) == want


def test_withhold_is_the_operators_other_choice_for_adult() -> None:
    d = decide(RULES, NUDE, young=False, clean=True, adult_ok=False, adult_action="withhold")
    assert (d.category, d.action) == ("adult", "withhold")


def test_prompt_facts_and_clean() -> None:
    policy = default_policy()
    assert policy.prompt_facts("a child flying a kite") == (True, False)
    assert policy.prompt_facts("a 12 yo at the park") == (True, False)
    assert policy.prompt_facts("a woman in lingerie") == (False, True)
    assert policy.prompt_facts("a red circle") == (False, False)
    assert RULES.steers_undressed("clothes, blurry")
    assert RULES.steers_undressed("CL0THING")  # the normaliser applies here too
    assert not RULES.steers_undressed("blurry, lowres")
    assert not RULES.steers_undressed("")


def _policy(tmp_path: Path, image: str) -> Path:
    text = DEFAULT_POLICY_FILE.read_text().split("\n[image]\n")[0]
    path = tmp_path / "policy.toml"
    path.write_text(text + image)
    return path


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ("\n[image]\nadult = { NAKED = 0.5 }\nminors = {}\n", "image.adult: unknown class 'NAKED'"),
        ("\n[image]\nadult = { ANUS_EXPOSED = 1.5 }\nminors = {}\n", "image.adult.ANUS_EXPOSED"),
        ("\n[image]\nadult = {}\n", "image: Object missing required field `minors`"),
        ("\n[image]\nadult = {}\nminors = {}\nextra = 1\n", "image: Object contains unknown"),
    ],
)
def test_a_bad_image_table_names_the_key(tmp_path: Path, table: str, error: str) -> None:
    path = _policy(tmp_path, table)
    with pytest.raises(ImageTableError, match=error) as info:
        load_image_rules(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageTableError, match=error):  # and stops the config from loading
        ContentConfig(policy_file=path)
    ContentConfig(policy_file=path, image_check=False)  # unless the check is off


def test_a_policy_file_without_the_table_gets_the_shipped_thresholds(tmp_path: Path) -> None:
    assert load_image_rules(_policy(tmp_path, "")).adult == RULES.adult


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_redactions_keep_format_and_size(fmt: str) -> None:
    src = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((96, 64)).save(src, format=fmt.upper())
    for out in (blur(src.getvalue(), fmt), placeholder(fmt, 96, 64)):
        with Image.open(io.BytesIO(out)) as im:
            assert (im.format, im.size) == (fmt.upper(), (96, 64))
    with Image.open(io.BytesIO(placeholder(fmt, 96, 64))) as im:
        grey = np.asarray(im.convert("L"), dtype=int)
        assert int(grey.max() - grey.min()) <= 2  # flat: nothing of the original
