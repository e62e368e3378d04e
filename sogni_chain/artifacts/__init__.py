"""Compiled contract artifacts shipped with the package (``<Name>.json`` here, written by
``contracts/build.mjs``; a package so setuptools ships the JSON as package data).

They are committed so that running the network needs no Solidity compiler; CI rebuilds them
with ``node contracts/build.mjs --check`` and fails when they drift from the sources.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["CONTRACT_NAMES", "Artifact", "load_artifact"]

CONTRACT_NAMES = (
    "SogniToken",
    "Staking",
    "WorkerLicense",
    "RewardDistributor",
    "NetworkParameters",
    "SogniGovernor",
    "SogniTimelock",
    "Disputes",
    "ModelStake",
)


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str
    compiler: dict[str, Any]


@cache
def load_artifact(name: str) -> Artifact:
    """Read ``sogni_chain/artifacts/<name>.json``."""
    if name not in CONTRACT_NAMES:
        raise KeyError(f"unknown contract {name!r}; expected one of {CONTRACT_NAMES}")
    text = resources.files(__name__).joinpath(f"{name}.json").read_text("utf-8")
    raw = json.loads(text)
    return Artifact(
        name=name,
        abi=raw["abi"],
        bytecode=raw["bytecode"],
        deployed_bytecode=raw["deployedBytecode"],
        compiler=raw["compiler"],
    )
