"""Which partner-cloud machine this node runs on (SaladCloud), for its advert.

Why: a Salad container group is many replicas of one image, each with a throwaway key, and
Salad moves them between machines at will. The machine id lets a coordinator (and the
operator) tell replicas on one physical host apart from replicas on many, and follow a
machine across restarts. The id comes from Salad's instance metadata service (IMDS) through
`salad-cloud-imds-sdk` (the `partner` extra): its `/v1/token` JWT carries the
`salad_machine_id` and `salad_container_group_id` claims. The token is decoded, not verified:
the node only reports its own host, and a coordinator that ever bases a decision on the id
verifies the JWT against Salad's JWKS itself. Only when Salad's environment variables are
present is the metadata address contacted; `SOGNI_SALAD_IMDS_URL` points it elsewhere (tests
use a fake on 127.0.0.1). If IMDS does not answer, `SALAD_MACHINE_ID` from the environment
is used, marked as such.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from typing import Literal

import msgspec

from sogni_protocol.logs import get_logger

__all__ = [
    "IMDS_URL_ENV",
    "SALAD_ENV",
    "SaladIdentity",
    "on_salad",
    "salad_identity",
]

log = get_logger(__name__)

SALAD_ENV = ("SALAD_MACHINE_ID", "SALAD_CONTAINER_GROUP_ID")
"""Variables SaladCloud sets in every container it runs; their presence means "on Salad"."""
IMDS_URL_ENV = "SOGNI_SALAD_IMDS_URL"
"""Base URL of the metadata service (default: the SDK's, Salad's link-local address)."""
MAX_JWT = 4096
"""Salad documents at most 1,000 characters; anything far larger is not its token."""
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class SaladIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Where a Salad replica runs. `source` says whether IMDS or only the env said so."""

    machine_id: str
    container_group_id: str | None = None
    source: Literal["imds", "env"] = "imds"


def on_salad(env: Mapping[str, str] = os.environ) -> bool:
    """Whether SaladCloud's variables are set, i.e. whether asking its IMDS makes sense."""
    return any(env.get(name, "").strip() for name in SALAD_ENV)


def _valid_id(value: object) -> str | None:
    return value if isinstance(value, str) and _ID.fullmatch(value) else None


def _claims(jwt: str) -> dict[str, object]:
    """The JWT's payload claims (unverified: see the module docstring); {} if malformed."""
    if len(jwt) > MAX_JWT or jwt.count(".") != 2:
        return {}
    payload = jwt.split(".")[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _from_imds(base_url: str | None, timeout: float) -> SaladIdentity | None:
    from salad_cloud_imds_sdk import SaladCloudImdsSdk
    from salad_cloud_imds_sdk.models import Metadata

    sdk = SaladCloudImdsSdk(base_url=base_url, timeout=max(1, int(timeout * 1000)))
    token = sdk.metadata.get_token(Metadata.TRUE)
    claims = _claims(str(token.jwt))
    machine = _valid_id(claims.get("salad_machine_id"))
    if machine is None:
        return None
    group = _valid_id(claims.get("salad_container_group_id"))
    return SaladIdentity(machine_id=machine, container_group_id=group, source="imds")


def salad_identity(
    env: Mapping[str, str] = os.environ, *, timeout: float = 5.0
) -> SaladIdentity | None:
    """This replica's Salad machine id, or None when not on Salad (or nothing usable).

    Blocking (one HTTP request, the SDK retries 5xx): call it before the event loop starts,
    or in a worker thread. Never raises: a missing id must not keep a node from serving.
    """
    if not on_salad(env):
        return None
    base_url = env.get(IMDS_URL_ENV, "").strip() or None
    try:
        found = _from_imds(base_url, timeout)
    except Exception as exc:  # the SDK raises its own errors, requests' and ValueError
        log.warning("salad_imds_unavailable", error=type(exc).__name__)
        found = None
    if found is not None:
        return found
    machine = _valid_id(env.get("SALAD_MACHINE_ID", "").strip())
    if machine is None:
        return None
    group = _valid_id(env.get("SALAD_CONTAINER_GROUP_ID", "").strip())
    return SaladIdentity(machine_id=machine, container_group_id=group, source="env")
