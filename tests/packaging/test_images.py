"""The container images' rules, checked on the Dockerfiles themselves (no Docker engine here).

Each image: a base pinned to an exact version (no `latest`, no bare major tag), a non-root
`USER`, a `HEALTHCHECK` that asks `/healthz`, an exec-form `ENTRYPOINT` whose script `exec`s
the daemon (SIGTERM reaches Python), nothing secret in `ENV`/`ARG`/`COPY`, and a build context
(.dockerignore) that lets in what the Dockerfile copies and keeps keys out. The node image
pins torch and leaves the `coreml` extra out. `problems()` is tried on broken Dockerfiles too,
so a rule that stopped checking would fail here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
IMAGES = {"node": DOCKER / "node.Dockerfile", "coordinator": DOCKER / "coordinator.Dockerfile"}
SECRET_WORDS = re.compile(r"PASSWORD|PASSPHRASE|SECRET|TOKEN|PRIVATE|KEYSTORE|MNEMONIC|_KEY\b")
PINNED_TAG = re.compile(
    r"^[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$|@sha256:[0-9a-f]{64}$"
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


def _args(ins: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out.setdefault(name.strip(), value.strip())
    return out


def _env_names(rest: str) -> list[tuple[str, str]]:
    pairs = []
    for token in shlex.split(rest):
        name, _, value = token.partition("=")
        pairs.append((name, value))
    return pairs


def problems(text: str) -> list[str]:
    """Every rule the Dockerfile `text` breaks (empty: fine)."""
    ins = instructions(text)
    found: list[str] = []
    args = _args(ins)
    stages: set[str] = set()
    for word, rest in ins:
        if word != "FROM":
            continue
        parts = rest.split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], "?"), parts[0])
        if image not in stages and not PINNED_TAG.search(image):
            found.append(f"base image not pinned to an exact version: {image}")
        if ":latest" in image:
            found.append(f"latest tag: {image}")
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
    for word, rest in ins:
        if word == "ENV":
            for name, value in _env_names(rest):
                if SECRET_WORDS.search(name.upper()) or SECRET_WORDS.search(value.upper()):
                    found.append(f"secret-looking ENV: {name}")
        if word == "ARG":
            name = rest.partition("=")[0].strip()
            if SECRET_WORDS.search(name.upper()):
                found.append(f"secret-looking ARG: {name}")
        if word in {"COPY", "ADD"} and re.search(
            r"wallet\.json|signer\.json|keystore|\.key\b|\.env\b", rest
        ):
            found.append(f"copies a key into the image: {rest}")
    final = _final_stage(ins)
    users = [rest for word, rest in final if word == "USER"]
    if not users:
        found.append("no USER: the daemon would run as root")
    elif users[-1].split(":")[0] in {"root", "0"}:
        found.append("USER is root")
    checks = [rest for word, rest in final if word == "HEALTHCHECK"]
    if not checks or "NONE" in checks[-1].upper():
        found.append("no HEALTHCHECK")
    elif "CMD" not in checks[-1] or "health" not in checks[-1]:
        found.append("HEALTHCHECK does not run the health check")
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    if not entry:
        found.append("no ENTRYPOINT")
    else:
        try:
            argv = json.loads(entry[-1])
        except json.JSONDecodeError:
            argv = None
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            found.append("ENTRYPOINT not in exec form: SIGTERM would go to a shell")
    return found


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_dockerfile_follows_the_image_rules(role: str) -> None:
    assert problems(IMAGES[role].read_text("utf-8")) == []


@pytest.mark.parametrize("role", sorted(IMAGES))
def test_entrypoint_and_healthcheck_reach_the_daemon(role: str) -> None:
    final = _final_stage(instructions(IMAGES[role].read_text("utf-8")))
    entry = json.loads(next(rest for word, rest in final if word == "ENTRYPOINT"))
    assert entry == ["sogni-entrypoint", role]
    copies = [rest for word, rest in final if word == "COPY"]
    assert any("docker/entrypoint.sh /usr/local/bin/sogni-entrypoint" in c for c in copies)
    health = next(rest for word, rest in final if word == "HEALTHCHECK")
    assert json.loads(health.split("CMD", 1)[1]) == ["sogni-entrypoint", "health", role]
    script = (DOCKER / "entrypoint.sh").read_text("utf-8")
    assert 'exec "$cli" start "$@"' in script  # the daemon replaces the shell
    assert "/healthz" in script
    env = dict(pair for word, rest in final if word == "ENV" for pair in _env_names(rest))
    prefix = "SOGNI_NODE" if role == "node" else "SOGNI_COORDINATOR"
    assert env[f"{prefix}_DATA_DIR"] == "/data"
    assert env[f"{prefix}_HTTP_LISTEN"].startswith("0.0.0.0:")  # reachable by the prober
    assert ("VOLUME", '["/data"]') in final


def test_node_image_pins_torch_and_leaves_coreml_out() -> None:
    ins = instructions(IMAGES["node"].read_text("utf-8"))
    args = _args(ins)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    makefile = (ROOT / "Makefile").read_text("utf-8")
    assert f"torch=={args['TORCH_VERSION']}" in makefile  # the one the tests ran with
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs
    extras = re.findall(r"\.\[([a-z,]+)\]", runs)
    assert extras and all("node" in e.split(",") and "coreml" not in e for e in extras)


def _glob(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` any folders, `*` and `?` within one name."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore: the last matching pattern wins, `!` re-includes; a pattern
    matching a parent folder covers what is inside."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob(pattern.removeprefix("!").rstrip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_build_context_lets_in_the_sources_and_keeps_keys_out() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for dockerfile in IMAGES.values():
        for word, rest in instructions(dockerfile.read_text("utf-8")):
            if word == "COPY" and "--from" not in rest:
                for src in [t for t in rest.split() if not t.startswith("--")][:-1]:
                    assert (ROOT / src).exists(), src
                    assert not _ignored(src, patterns), f"{src} is outside the build context"
    for secret in (
        "sogni_node/wallet.json",
        ".venv/bin/python",
        "deploy/nosana/node_modules/x.js",
        "out/coordinator/signer.json",
        "sogni_coordinator/data/signer.json",
        "sogni_node/node.key",
        ".env",
        "sogni_node/__pycache__/x.pyc",
        "coordinator.db",
    ):
        assert _ignored(secret, patterns), secret
    assert not _ignored("sogni_node/models/weights/x.safetensors", patterns)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("python:3.12.12-slim-bookworm", "python:latest"), "latest tag"),
        (lambda t: t.replace("python:3.12.12-slim-bookworm", "python:3.12-slim"), "not pinned"),
        (lambda t: t.replace("USER 10001:10001", "USER root"), "USER is root"),
        (lambda t: t.replace("USER 10001:10001", ""), "no USER"),
        (lambda t: re.sub(r"HEALTHCHECK[^\n]*\\\n[^\n]*\n", "", t), "no HEALTHCHECK"),
        (
            lambda t: t.replace('ENTRYPOINT ["sogni-entrypoint", "node"]', "ENTRYPOINT sh -c x"),
            "exec form",
        ),
        (lambda t: t + "\nENV SOGNI_NODE_PASSWORD=hunter2\n", "secret-looking ENV"),
        (lambda t: t + "\nARG KEYSTORE_JSON\n", "secret-looking ARG"),
        (lambda t: t + "\nCOPY wallet.json /data/\n", "copies a key"),
    ],
)
def test_the_checks_catch_a_broken_dockerfile(edit, expected: str) -> None:  # type: ignore[no-untyped-def]
    broken = edit(IMAGES["node"].read_text("utf-8"))
    assert any(expected in p for p in problems(broken)), problems(broken)
