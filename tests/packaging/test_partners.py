"""Partner clouds: Nosana's job definition passes Nosana's own validator, the SaladCloud
container group is built with `salad-cloud-sdk`'s models, and the node reads its Salad
machine id from a fake metadata service on 127.0.0.1 (never the real 169.254.169.254).

Each check also gets a broken input, so a validator that stopped validating would fail here.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sogni_node import partner

ROOT = Path(__file__).resolve().parents[2]
NOSANA = ROOT / "deploy" / "nosana"
SALAD = ROOT / "deploy" / "salad"
SECRET_NAMES = ("PASSWORD", "KEYSTORE", "SECRET", "PRIVATE")
FILLED = {
    "SOGNI_NODE_IMAGE": "ghcr.io/example/sogni-node:0.1.0",
    "SOGNI_NODE_COORDINATORS": (  # a real peer id: the builder checks it as the node does
        "/dns4/c.example/tcp/4001/p2p/12D3KooWNDUxrJgsgq7ocTuLmYg3pqSQ2m9Sz1jBzj4TZs5p3HwB"
    ),
    "SOGNI_NODE_TRUSTED_COORDINATORS": "0x" + "11" * 20,
    "SOGNI_NODE_PAYOUT_ADDRESS": "0x" + "22" * 20,
    "SALAD_GPU_CLASS": "ed563892-aacd-40f5-80b7-90c9be6c759b",
}


# --- Nosana -------------------------------------------------------------------------------
needs_validator = pytest.mark.skipif(
    shutil.which("node") is None or not (NOSANA / "node_modules" / "@nosana").is_dir(),
    reason="Nosana's validator is not installed: `make nosana-validator` (make test does it)",
)


def _nosana_validate(tmp_path: Path, jobs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = []
    for name, job in jobs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(job))
        files.append(str(path))
    out = subprocess.run(
        ["node", str(NOSANA / "validate.mjs"), *files],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NOSANA,
    )
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == len(jobs), out.stderr
    assert out.returncode == (0 if all(r["success"] for r in results) else 1)
    return {Path(r["file"]).stem: r for r in results}


def _envsubst(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


@needs_validator
def test_nosana_job_definition_is_valid_for_nosanas_validator(tmp_path: Path) -> None:
    text = (NOSANA / "node-job.json").read_text()
    job = json.loads(text)
    filled = json.loads(_envsubst(text, FILLED))
    assert "${" not in json.dumps(filled)
    run = filled["ops"][0]["args"]
    assert run["gpu"] is True and run["required_vram"] >= 8
    (port,) = run["expose"]
    assert port["port"] == 9860 and run["env"]["SOGNI_NODE_HTTP_LISTEN"] == "0.0.0.0:9860"
    assert port["health_checks"][0]["path"] == "/healthz"
    # a job definition is public: no key, no password; a throwaway key pays a payout address
    assert not any(s in name for name in run["env"] for s in SECRET_NAMES)
    assert run["env"]["SOGNI_NODE_KEY"] == "ephemeral" and run["env"]["SOGNI_NODE_PAYOUT_ADDRESS"]

    broken: dict[str, Any] = {"template": job, "filled": filled}
    edits = {
        "gpu_word": lambda j: j["ops"][0]["args"].__setitem__("gpu", "yes"),
        "bad_method": lambda j: j["ops"][0]["args"]["expose"][0]["health_checks"][0].__setitem__(
            "method", "FETCH"
        ),
        "unknown_arg": lambda j: j["ops"][0]["args"].__setitem__("volume", "/data"),
        "env_number": lambda j: j["ops"][0]["args"]["env"].__setitem__("SOGNI_NODE_SLOTS", 2),
        "wrong_type": lambda j: j.__setitem__("type", "vm"),
    }
    for name, edit in edits.items():
        bad = copy.deepcopy(filled)
        edit(bad)
        broken[name] = bad
    results = _nosana_validate(tmp_path, broken)
    assert results["template"]["success"] and results["filled"]["success"]
    for name in edits:
        assert not results[name]["success"], name
        assert results[name]["errors"], name


# --- SaladCloud ---------------------------------------------------------------------------
def _salad_builder() -> Any:
    spec = importlib.util.spec_from_file_location("salad_build", SALAD / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_salad_container_group_builds_with_the_sdk_models() -> None:
    from salad_cloud_sdk.models import (
        ContainerGroupCreationRequest,
        ContainerGroupLivenessProbe,
        ContainerGroupReadinessProbe,
    )

    salad = _salad_builder()
    request = salad.build(FILLED)
    assert isinstance(request, ContainerGroupCreationRequest)
    assert isinstance(request.readiness_probe, ContainerGroupReadinessProbe)
    assert isinstance(request.liveness_probe, ContainerGroupLivenessProbe)
    assert (request.readiness_probe.http.path, request.readiness_probe.http.port) == (
        "/readyz",
        9860,
    )
    assert (request.liveness_probe.http.path, request.liveness_probe.http.port) == (
        "/healthz",
        9860,
    )
    body = request._map()
    assert "volumes" not in json.dumps(body)  # Salad has none: models in the image or a URL
    env = body["container"]["environment_variables"]
    assert env["SOGNI_NODE_HTTP_LISTEN"] == "0.0.0.0:9860"
    assert body["container"]["resources"]["gpu_classes"] == [FILLED["SALAD_GPU_CLASS"]]
    assert env["SOGNI_NODE_KEY"] == "ephemeral"
    template = (SALAD / "node-container-group.json").read_text()
    assert not any(s in template for s in SECRET_NAMES)


def test_salad_keystore_goes_in_as_a_secret_variable() -> None:
    salad = _salad_builder()
    keystore = json.dumps({"address": "ab" * 20, "crypto": {"ciphertext": "00"}, "version": 3})
    with pytest.raises(salad.BuildError, match="SOGNI_NODE_PASSWORD"):
        salad.build(FILLED, keystore=keystore)
    env = salad.build({**FILLED, "SOGNI_NODE_PASSWORD": "pw"}, keystore=keystore)._map()[
        "container"
    ]["environment_variables"]
    assert env["SOGNI_NODE_KEYSTORE_JSON"] == keystore and env["SOGNI_NODE_PASSWORD"] == "pw"
    assert "SOGNI_NODE_KEY" not in env


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t["readiness_probe"].__setitem__("failure_threshold", 99), "failure_threshold"),
        (lambda t: t.__setitem__("name", "Sogni Node"), "name"),
        (lambda t: t["container"]["resources"].__setitem__("memory", 10), "memory"),
        (lambda t: t["liveness_probe"]["http"].__setitem__("port", 70000), "port"),
        (lambda t: t["container"].__setitem__("volumes", [{"path": "/data"}]), "volumes"),
        (lambda t: t.__setitem__("restart_policy", "sometimes"), "restart_policy"),
    ],
)
def test_salad_builder_refuses_what_saladcloud_would(edit: Any, message: str) -> None:
    salad = _salad_builder()
    template = json.loads((SALAD / "node-container-group.json").read_text())
    edit(template)
    with pytest.raises(salad.BuildError, match=message):
        salad.build(FILLED, template=template)


def test_salad_builder_names_a_missing_value() -> None:
    salad = _salad_builder()
    values = {k: v for k, v in FILLED.items() if k != "SOGNI_NODE_PAYOUT_ADDRESS"}
    with pytest.raises(salad.BuildError, match="SOGNI_NODE_PAYOUT_ADDRESS"):
        salad.build(values)


# --- Salad instance metadata (machine id) -------------------------------------------------
def _jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


class FakeImds:
    """Salad's IMDS on 127.0.0.1: `/v1/token` answers only with the `Metadata: true` header."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.status = 200
        self.body: Any = {
            "jwt": _jwt({"salad_machine_id": "m-imds-1", "salad_container_group_id": "g-7"})
        }
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, self.headers.get("Metadata")))
                ok = self.path == "/v1/token" and self.headers.get("Metadata") == "true"
                status = fake.status if ok else 403
                data = json.dumps(fake.body if ok else {"message": "no"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    fake = FakeImds()
    thread = threading.Thread(
        target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_real_metadata_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any request to the real metadata address fails the test instead of leaving the host."""
    import requests

    real = requests.Session.request

    def guarded(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        assert "169.254.169.254" not in url, "tests must never contact the real IMDS"
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", guarded)


def test_off_salad_nothing_is_asked(imds: FakeImds) -> None:
    assert partner.salad_identity({partner.IMDS_URL_ENV: imds.url}) is None
    assert partner.salad_identity({}) is None  # default address: never dialled off Salad
    assert imds.requests == []


def test_on_salad_the_machine_id_comes_from_the_metadata_token(imds: FakeImds) -> None:
    env = {
        "SALAD_MACHINE_ID": "m-env-2",
        "SALAD_CONTAINER_GROUP_ID": "g-7",
        partner.IMDS_URL_ENV: imds.url,
    }
    found = partner.salad_identity(env)
    assert found == partner.SaladIdentity(
        machine_id="m-imds-1", container_group_id="g-7", source="imds"
    )
    assert imds.requests == [("/v1/token", "true")]


@pytest.mark.parametrize(
    "body",
    [
        {"jwt": _jwt({"salad_machine_id": "bad id with spaces; rm -rf"})},
        {"jwt": _jwt({"salad_machine_id": "x" * 500})},
        {"jwt": "not.a-jwt"},
        {"jwt": _jwt({"other": 1})},
    ],
)
def test_a_malformed_token_falls_back_to_salads_env(imds: FakeImds, body: Any) -> None:
    imds.body = body
    env = {"SALAD_MACHINE_ID": "m-env-2", partner.IMDS_URL_ENV: imds.url}
    found = partner.salad_identity(env)
    assert found == partner.SaladIdentity(machine_id="m-env-2", source="env")


def test_metadata_down_falls_back_and_never_raises(imds: FakeImds) -> None:
    imds.status = 404
    env = {"SALAD_CONTAINER_GROUP_ID": "g-7", partner.IMDS_URL_ENV: imds.url}
    assert partner.salad_identity(env) is None  # no usable id anywhere
    env["SALAD_MACHINE_ID"] = "m-env-2"
    assert partner.salad_identity(env) == partner.SaladIdentity(
        machine_id="m-env-2", container_group_id="g-7", source="env"
    )
    imds.server.shutdown()  # nothing listening any more
    imds.server.server_close()
    assert partner.salad_identity(env, timeout=1.0) is not None
