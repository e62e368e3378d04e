"""The network's scheduler names are the node's and the gateway's: one list, three users."""

from __future__ import annotations

from sogni_protocol.schedulers import NETWORK_SCHEDULERS, scheduler_fault


def test_the_node_renders_exactly_the_networks_schedulers() -> None:
    from sogni_node.render.diffusers_backend import SCHEDULERS

    assert set(SCHEDULERS) == set(NETWORK_SCHEDULERS)


def test_the_gateway_offers_only_the_networks_schedulers() -> None:
    from sogni_coordinator.gateway.models import PAIRS

    assert set(PAIRS.values()) <= set(NETWORK_SCHEDULERS)


def test_scheduler_fault_names_the_known_ones() -> None:
    assert scheduler_fault("") is None and scheduler_fault("lcm") is None
    why = scheduler_fault("heun")
    assert why is not None and "'heun'" in why and "dpmpp_2m_karras" in why
