"""What a jobRequest asks for is what renders: LoRAs are carried (or refused, never dropped),
sampler/scheduler pairs are the ones this network has (the tiers' defaults are the model's
own), and Sogni's size presets are served scaled to each model's native size."""

from __future__ import annotations

from typing import Any

import pytest

from sogni_coordinator.checks import SUPPORTED_SCHEDULERS
from sogni_coordinator.gateway.models import (
    PAIRS,
    SAMPLERS,
    SCHEDULERS,
    SIZE_PRESETS,
    ModelBook,
    sdk_names_of,
)
from sogni_coordinator.gateway.projects import ProjectRefused, parse_job_request
from sogni_node.models.detect import CLASS_DEFAULTS
from sogni_node.models.registry import SHAPES_DEFAULT_SCHEDULER
from sogni_protocol import ids
from sogni_protocol.catalog import default_catalog
from sogni_protocol.messages import LoraRef

from .sdk_wire import job_request

TINY = "sogni-tiny-sd"
SHAPES = "sogni-shapes-64"
SDXL = "sdxl-base-1.0"
TURBO = "coreml-sogniXLturbo_alpha1_ad"
SD15_768 = "coreml-cyberrealistic_v70_768"
FLUX = "flux1-schnell-fp8"
MODELS = [TINY, SHAPES, SDXL, TURBO, SD15_768, FLUX]
BOOK = ModelBook(default_catalog(), frozenset(MODELS))
REAL_PRESET_IDS = [
    "square",
    "square_hd",
    "portrait_7_9",
    "portrait_13_19",
    "portrait_4_7",
    "portrait_5_12",
    "landscape_9_7",
    "landscape_19_13",
    "landscape_7_4",
    "landscape_12_5",
]
"""Sogni's own preset ids (its SDK README's `getSizePresets('fast', 'flux1-schnell-fp8')`)."""


def parse(model: str = TINY, **frame: Any) -> Any:
    return parse_job_request(
        job_request(model, 1, **frame), book=BOOK, served=MODELS, network="fast"
    )


def refused(model: str = TINY, **frame: Any) -> ProjectRefused:
    with pytest.raises(ProjectRefused) as caught:
        parse(model, **frame)
    assert caught.value.code == 4000 and caught.value.error == "invalidRequest"
    assert "\n" not in caught.value.message
    return caught.value


# --- 1. LoRAs ------------------------------------------------------------------------------
def test_loras_and_their_strengths_reach_the_render_request() -> None:
    req = parse(loras=["detail-tweaker", "film_grain:v2"], loraStrengths=[0.8, -1.5])
    assert req.loras == [
        LoraRef(id="detail-tweaker", strength=0.8),
        LoraRef(id="film_grain:v2", strength=-1.5),
    ]
    assert parse(loras=["detail-tweaker"]).loras == [LoraRef(id="detail-tweaker", strength=1.0)]
    assert parse(loras=[], loraStrengths=[]).loras == [] and parse().loras == []


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"loras": ["a"] * 2}, "loras"),  # twice: every node would decline it
        ({"loras": [f"l{i}" for i in range(ids.MAX_LORAS + 1)]}, "loras"),
        ({"loras": "detail-tweaker"}, "loras"),
        ({"loras": ["../etc/passwd"]}, "loras"),
        ({"loras": [7]}, "loras"),
        ({"loras": ["a", "b"], "loraStrengths": [0.5]}, "loraStrengths"),
        ({"loras": ["a"], "loraStrengths": [4.5]}, "loraStrengths"),
        ({"loras": ["a"], "loraStrengths": [True]}, "loraStrengths"),
        ({"loras": ["a"], "loraStrengths": ["1"]}, "loraStrengths"),
        ({"loraStrengths": [0.5]}, "loraStrengths"),
    ],
)
def test_loras_this_network_cannot_apply_are_refused_naming_the_field(
    frame: dict[str, Any], field: str
) -> None:
    assert field in refused(**frame).message


# --- 2. samplers and schedulers ---------------------------------------------------------------
def test_every_advertised_pair_is_a_scheduler_nodes_render_with() -> None:
    assert set(PAIRS.values()) <= SUPPORTED_SCHEDULERS - {""}
    assert {pair for pair in PAIRS} <= {(a, b) for a in SAMPLERS for b in SCHEDULERS}
    for (sampler, scheduler), ours in PAIRS.items():
        assert parse(SDXL, scheduler=sampler, timeStepSpacing=scheduler).scheduler == ours
        assert parse(SDXL, comfySampler=sampler, comfyScheduler=scheduler).scheduler == ours
        assert parse(SDXL, scheduler=sampler).scheduler == ours  # a sampler alone: its pair


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [("euler", "karras"), ("dpm_pp_2m", "normal"), ("euler_a", "karras"), ("ddim", "karras")],
)
def test_pairs_this_network_does_not_render_are_refused(sampler: str, scheduler: str) -> None:
    message = refused(SDXL, scheduler=sampler, timeStepSpacing=scheduler).message
    assert sampler in message and scheduler in message and "dpm_pp_2m+karras" in message


def test_tier_defaults_are_what_a_request_naming_neither_renders_with() -> None:
    tiers = BOOK.tiers(set())
    own = {
        TINY: ("euler", "normal"),  # its saved Euler scheduler (sogni_node/models/tiny.py)
        SHAPES: sdk_names_of(SHAPES_DEFAULT_SCHEDULER),
        SDXL: sdk_names_of(CLASS_DEFAULTS["sdxl"].scheduler or ""),
        SD15_768: sdk_names_of(CLASS_DEFAULTS["sd15"].scheduler or ""),
        TURBO: sdk_names_of(CLASS_DEFAULTS["sdxl-turbo"].scheduler or ""),
    }
    assert own[SDXL] == ("dpm_pp_2m", "karras") and own[TURBO] == ("euler_a", "normal")
    for model, (sampler, scheduler) in own.items():
        assert sampler is not None and scheduler is not None
        tier = tiers[model]
        assert (tier["sampler"]["default"], tier["scheduler"]["default"]) == (sampler, scheduler)
        assert tier["sampler"]["allowed"] == list(SAMPLERS)
        assert parse(model).scheduler == ""  # the node's own default, which is that pair
        # the default pair named explicitly renders the same scheduler
        assert (
            parse(model, scheduler=sampler, timeStepSpacing=scheduler).scheduler
            == (PAIRS[(sampler, scheduler)])
        )
    # a scheduler alone goes with the model's own sampler, if that pair exists
    assert parse(SDXL, timeStepSpacing="Karras").scheduler == "dpmpp_2m_karras"
    assert parse(TINY, timeStepSpacing="normal").scheduler == "euler"
    assert "own sampler" in refused(SDXL, timeStepSpacing="normal").message


def test_flux_renders_with_its_own_scheduler_and_offers_no_choice() -> None:
    tier = BOOK.tiers(set())[FLUX]
    assert "sampler" not in tier and "scheduler" not in tier  # the SDKs then send none
    assert parse(FLUX).scheduler == ""
    assert "own scheduler" in refused(FLUX, scheduler="euler").message
    assert "own scheduler" in refused(FLUX, comfyScheduler="karras").message


def test_unknown_names_are_refused_naming_the_field() -> None:
    assert "unknown sampler 'heun'" in refused(scheduler="heun").message
    assert "unknown scheduler 'beta'" in refused(scheduler="euler", timeStepSpacing="beta").message
    assert (
        "runs with scheduler 'karras' only"
        in refused(SDXL, scheduler="DPM++ 2M Karras", timeStepSpacing="normal").message
    )


# --- 4. size presets ----------------------------------------------------------------------------
def test_size_presets_are_sognis_ids_scaled_to_the_model() -> None:
    for model in MODELS:
        presets = BOOK.size_presets(model)
        assert [p["id"] for p in presets] == REAL_PRESET_IDS
        for p in presets:
            assert set(p) == {"label", "id", "width", "height", "ratio", "aspect"}
            assert p["width"] % 8 == 0 and p["height"] % 8 == 0
            assert 64 <= p["width"] <= 2048 and 64 <= p["height"] <= 2048
            kind = p["id"].split("_")[0]
            shape = {"square": p["width"] == p["height"], "portrait": p["width"] < p["height"]}
            assert shape.get(kind, p["width"] > p["height"]), (model, p)
    sdxl = {p["id"]: (p["width"], p["height"]) for p in BOOK.size_presets(SDXL)}
    assert sdxl == {p.id: (p.width, p.height) for p in SIZE_PRESETS}  # Sogni's own sizes
    assert sdxl["portrait_7_9"] == (896, 1152) and sdxl["landscape_12_5"] == (1536, 640)
    cyber = {p["id"]: (p["width"], p["height"]) for p in BOOK.size_presets(SD15_768)}
    assert cyber["square_hd"] == (768, 768) and cyber["portrait_7_9"] == (672, 864)
    tiny = {p["id"]: (p["width"], p["height"]) for p in BOOK.size_presets(TINY)}
    assert tiny["square_hd"] == (64, 64) and tiny["square"] == (64, 64)


def test_a_preset_in_a_job_request_renders_at_the_models_size() -> None:
    assert (
        parse(TINY, sizePreset="square_hd").width,
        parse(TINY, sizePreset="square_hd").height,
    ) == (64, 64)
    req = parse(SDXL, sizePreset="portrait_7_9")
    assert (req.width, req.height) == (896, 1152)
    for model in (TINY, SD15_768, FLUX):
        listed = {p["id"]: (p["width"], p["height"]) for p in BOOK.size_presets(model)}
        for preset in REAL_PRESET_IDS:
            req = parse(model, sizePreset=preset)
            assert (req.width, req.height) == listed[preset]
    message = refused(sizePreset="portrait_9_16").message
    assert "sizePreset 'portrait_9_16'" in message and "portrait_7_9" in message
    assert "sizePreset" in refused(sizePreset=["square"]).message
