"""Build the SaladCloud container group of a Sogni node (docs/PARTNERS.md).

    python deploy/salad/build.py [--keystore FILE] [--out FILE]

Fills the `${NAME}` values of `node-container-group.json` from the environment, then builds
the request with the models of `salad-cloud-sdk` (their bounds and patterns are Salad's API
rules) and checks that nothing in the file was dropped by them (a misspelt key would be).
Prints the request body (for the SaladCloud API, portal or SDK's `create_container_group`).

Keys: by default each replica makes a throwaway key at start (`SOGNI_NODE_KEY=ephemeral`) and
rewards go to `SOGNI_NODE_PAYOUT_ADDRESS`. With `--keystore FILE` the body carries that
keystore and `$SOGNI_NODE_PASSWORD` as environment variables instead, so treat the printed
body as a secret; nothing secret is ever in the committed template.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("node-container-group.json")
LIST_VARS = {"SALAD_GPU_CLASS"}
"""Variables whose value is a comma-separated list (one template string becomes several)."""


class BuildError(ValueError):
    """A container group that cannot be built: the message names what is missing or wrong,
    `todo` (when set) what to do about it."""

    def __init__(self, message: str, todo: str | None = None, *, code: int = 2) -> None:
        super().__init__(message)
        self.todo = todo
        self.code = code
        """2: a value you set is wrong; 4: something needed is not there (docs/CLI.md)."""


def _fill(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, env) for k, v in value.items()}
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            name = item[2:-1] if isinstance(item, str) and item.startswith("${") else None
            if name in LIST_VARS:
                out += [x.strip() for x in env.get(name, "").split(",") if x.strip()]
            else:
                out.append(_fill(item, env))
        return out
    if isinstance(value, str):
        try:
            return string.Template(value).substitute(env)
        except KeyError as exc:
            raise BuildError(f"set {exc.args[0]} (used by {TEMPLATE.name})") from None
    return value


def _dropped(sent: Any, kept: Any, path: str = "") -> list[str]:
    """Keys of `sent` that the SDK's models did not keep."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        out = [f"{path}{k}" for k in sent if k not in kept]
        for k in sent.keys() & kept.keys():
            out += _dropped(sent[k], kept[k], f"{path}{k}.")
        return out
    if isinstance(sent, list) and isinstance(kept, list):
        return [d for a, b in zip(sent, kept, strict=False) for d in _dropped(a, b, path)]
    return []


ENTRYPOINT_ONLY = frozenset(
    {
        "SOGNI_NODE_KEY",
        "SOGNI_NODE_KEYSTORE_JSON",
        "SOGNI_NODE_KEYSTORE_FILE",
        "SOGNI_NODE_PASSWORD",
        "SOGNI_NODE_PASSWORD_FILE",
    }
)
"""Variables the image's entrypoint consumes (docker/entrypoint.sh), not node settings."""


def _check_node_settings(variables: Mapping[str, Any]) -> None:
    """Load the node's config from the container's variables, with the node's own checks
    (`sogni_node.config`): a bad coordinator address or payout address is refused now, not
    by every replica at start, after the deployment."""
    try:
        from sogni_node.config import load_node_config
        from sogni_protocol.settings import SettingsError
    except ImportError as exc:
        raise BuildError(
            f"checking the node settings needs the sogni-supernet package ({exc.name})",
            "run it with the project's Python: .venv/bin/python deploy/salad/build.py",
        ) from None
    env = {
        k: str(v)
        for k, v in variables.items()
        if k.startswith("SOGNI_NODE_") and k not in ENTRYPOINT_ONLY
    }
    try:
        load_node_config(None, env)
    except SettingsError as exc:
        raise BuildError(str(exc), "fix that variable in your environment") from None
    except ValueError as exc:  # a config the node refuses in other words
        raise BuildError(str(exc), "fix the SOGNI_NODE_* variables") from None


def _keystore_text(path: Path) -> str:
    """The keystore's JSON, checked to be a keystore (not its password: that stays yours)."""
    from sogni_wallet.keystore import KeystoreError, KeystoreNotFound, keystore_address

    try:
        keystore_address(path, create_hint="sogni-node keys create")
    except KeystoreNotFound as exc:
        raise BuildError(str(exc), code=4) from None
    except KeystoreError as exc:
        raise BuildError(str(exc), "give --keystore the node's keystore v3 file") from None
    return path.read_text()


def build(
    env: Mapping[str, str],
    *,
    template: dict[str, Any] | None = None,
    keystore: str | None = None,
) -> Any:
    """The `ContainerGroupCreationRequest` for `env`; `keystore` (its JSON text) replaces the
    throwaway key, with the password from `env["SOGNI_NODE_PASSWORD"]`."""
    from salad_cloud_sdk.models import ContainerGroupCreationRequest

    data = _fill(template if template is not None else json.loads(TEMPLATE.read_text()), env)
    if keystore is not None:
        password = env.get("SOGNI_NODE_PASSWORD")
        if not password:
            raise BuildError("--keystore needs SOGNI_NODE_PASSWORD (its password)")
        variables = data["container"]["environment_variables"]
        variables.pop("SOGNI_NODE_KEY", None)
        variables["SOGNI_NODE_KEYSTORE_JSON"] = keystore
        variables["SOGNI_NODE_PASSWORD"] = password
    _check_node_settings(data["container"]["environment_variables"])
    if not data["container"]["resources"].get("gpu_classes"):
        raise BuildError("set SALAD_GPU_CLASS (a GPU class id from the SaladCloud API)")
    try:
        request = ContainerGroupCreationRequest._unmap(data)
    except (TypeError, ValueError) as exc:
        raise BuildError(f"not a valid container group: {exc}") from None
    dropped = _dropped(data, request._map())
    if dropped:
        raise BuildError(f"unknown to SaladCloud's API: {', '.join(dropped)}")
    return request


def main(argv: list[str] | None = None) -> int:
    """Print (or write) the body; one `error:` line when it cannot be built, exit 2 for a
    value set wrong, 4 for a file that is not there (as the project's CLIs, docs/CLI.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keystore", type=Path, help="node keystore to pass as a secret")
    parser.add_argument("--out", type=Path, help="write the body here (mode 0600)")
    args = parser.parse_args(argv)
    try:
        keystore = _keystore_text(args.keystore) if args.keystore else None
        body = json.dumps(build(os.environ, keystore=keystore)._map(), indent=2)
    except (BuildError, OSError) as exc:
        print(_error_line(exc), file=sys.stderr)
        return exc.code if isinstance(exc, BuildError) else 4
    if args.out is None:
        print(body)
    else:
        args.out.touch(mode=0o600)
        args.out.write_text(body + "\n")
    return 0


def _error_line(exc: Exception) -> str:
    """`error: <what> (<what to do>)` on one line; an OS error names its path, not errno."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        what: str = f"{exc.filename}: {exc.strerror}"
    else:
        what = " ".join(str(exc).split())
    todo = getattr(exc, "todo", None)
    return f"error: {what}" + (f" ({todo})" if todo else "")


if __name__ == "__main__":
    sys.exit(main())
