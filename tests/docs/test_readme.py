"""README.md runs as written: every fenced code block is tagged, and the runnable ones run.

Why: a newcomer copies the README's commands literally; this keeps them from drifting from
the code (issue #15).

Tag scheme: an HTML comment on the line right above each fenced block (blank lines between
are allowed), one of

- `<!-- readme: run -->`: runs as written and must exit 0 (`sh` blocks with bash under
  `set -eo pipefail`, `python` blocks with the venv's python);
- `<!-- readme: background until TEXT -->`: started in the background, ready once TEXT
  appears in its output (stdout or stderr; e.g. a log event such as `coordinator_ready`),
  stopped (SIGTERM to its process group) when its section's blocks are done;
- `<!-- readme: skip: REASON -->`: not run, and the reason says why (and where it is
  covered instead).

An untagged block, or an unknown tag, fails `test_every_block_is_tagged`.

Blocks run in README order, grouped by `## ` section: variables a block `export`s are seen
by the blocks after it in the same section (as in one terminal), and background processes
live until the section ends. Every section shares one temporary HOME and one temporary
working directory holding a `.venv` link to this checkout's venv, so `. .venv/bin/activate`
works as written.

Documented substitutions (the only differences from typing the README into a shell):

- HOME is a fresh temporary folder, and no `SOGNI_*` variable of the outer environment leaks in
  (but `SOGNI_ANVIL`, where anvil is installed);
- the port `8545` in a block is replaced by a free port chosen at run time (anvil's);
- the daemons listen on free ports through their documented env overrides:
  `SOGNI_COORDINATOR_LISTEN=/ip4/127.0.0.1/tcp/<free>`, `SOGNI_COORDINATOR_HTTP_LISTEN` and
  `SOGNI_NODE_HTTP_LISTEN` = `127.0.0.1:0`.

After the "Running the parts yourself" section the test also checks, on the chain, that the
node's wallet holds the SOGNI it claimed: the flow ends with claimed rewards, not just exit 0.
Python blocks must not print the transport's `host_started` log line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV = Path(sys.executable).parent.parent  # the venv running the tests (`.venv`)
TAG = re.compile(r"^<!--\s*readme:\s*(?P<tag>.*?)\s*-->\s*$")
FENCE = re.compile(r"^\s*```(?P<lang>[\w+-]*)\s*$")  # indented (in a list) too
RUNNABLE = {"sh", "bash", "python"}
BLOCK_TIMEOUT = 180.0
READY_TIMEOUT = 120.0
FLOW_SECTION = "Running the parts yourself"


@dataclass
class Block:
    section: str
    line: int
    lang: str
    code: str
    tag: str | None

    @property
    def kind(self) -> str:
        """'run', 'background', 'skip', or 'bad'."""
        if self.tag == "run":
            return "run"
        if self.tag and re.fullmatch(r"background until \S.*", self.tag):
            return "background"
        if self.tag and re.fullmatch(r"skip: \S.*", self.tag):
            return "skip"
        return "bad"

    @property
    def until(self) -> str:
        return self.tag.removeprefix("background until ").strip() if self.tag else ""


def parse_readme(text: str) -> list[Block]:
    """Every fenced block with its section and the tag comment above it (None if absent)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = FENCE.match(line)
        if fence is None:
            i += 1
            continue
        tag = None
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (m := TAG.match(lines[j].strip())):
            tag = m["tag"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(section, i + 1, fence["lang"], code, tag))
        i = end + 1
    return blocks


def test_every_block_is_tagged() -> None:
    blocks = parse_readme(README.read_text())
    assert blocks, "no code blocks found in README.md"
    bad = [f"README.md:{b.line} ({b.tag or 'untagged'})" for b in blocks if b.kind == "bad"]
    assert not bad, f"tag these blocks (scheme: {__name__} docstring): {bad}"
    odd = [f"README.md:{b.line}" for b in blocks if b.kind != "skip" and b.lang not in RUNNABLE]
    assert not odd, f"runnable blocks must be sh or python: {odd}"


def test_the_parser_refuses_untagged_and_unknown_tags() -> None:
    text = "## A\n\n```sh\ntrue\n```\n<!-- readme: sometimes -->\n```sh\ntrue\n```\n"
    assert [b.kind for b in parse_readme(text)] == ["bad", "bad"]
    text = "## A\n<!-- readme: skip: needs a GPU -->\n\n```python\nx = 1\n```\n"
    [block] = parse_readme(text)
    assert (block.kind, block.section, block.code) == ("skip", "A", "x = 1\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Shell:
    """One section's terminal: exported variables carry over, background jobs are tracked."""

    work: Path
    env: dict[str, str]
    subs: dict[str, str]
    state: Path
    logs: Path
    jobs: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def _script(self, block: Block, n: int) -> Path:
        code = block.code
        for old, new in self.subs.items():
            code = code.replace(old, new)
        if block.lang == "python":
            source = self.logs / f"block{n}.py"
            source.write_text(code)
            body = f'exec "{VENV / "bin" / "python"}" "{source}"\n'
        else:
            body = code
        script = self.logs / f"block{n}.sh"
        save = f"export -p > '{self.state}'\n" if block.kind == "run" else ""
        script.write_text(f"source '{self.state}'\nset -eo pipefail\n{body}\n{save}")
        return script

    def run(self, block: Block, n: int) -> None:
        script = self._script(block, n)
        try:
            done = subprocess.run(
                ["bash", str(script)],
                cwd=self.work,
                env=self.env,
                capture_output=True,
                timeout=BLOCK_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"README.md:{block.line} ran over {BLOCK_TIMEOUT:g} s") from exc
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, (
            f"README.md:{block.line} exited {done.returncode}:\n{output[-6000:]}"
        )
        if block.lang == "python":  # a script's output is its own, not the transport's log
            assert "host_started" not in output, f"README.md:{block.line} printed:\n{output}"

    def start(self, block: Block, n: int) -> None:
        script = self._script(block, n)
        log = self.logs / f"block{n}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", str(script)],
                cwd=self.work,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.jobs.append((proc, log))
        deadline = time.monotonic() + READY_TIMEOUT
        while block.until not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-6000:]
                why = f"exited {proc.returncode}" if proc.returncode is not None else "timed out"
                raise AssertionError(
                    f"README.md:{block.line} {why} before {block.until!r}:\n{text}"
                )
            time.sleep(0.2)

    def stop_all(self) -> None:
        """SIGTERM each background job's process group, newest first (node before chain), and
        wait until every process of the group is gone (the daemon, not just its shell)."""
        for proc, _log in reversed(self.jobs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            if not _group_gone(proc, timeout=40):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                assert _group_gone(proc, timeout=10), f"process group {proc.pid} survived"
        self.jobs.clear()


def _group_gone(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """True once no process of `proc`'s group is left (its own zombie reaped as we poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def readme_env(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, str], dict[str, str]]]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (work / ".venv").symlink_to(VENV)
    keep = {"SOGNI_ANVIL"}  # where anvil is, if not under contracts/node_modules
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOGNI_") or k in keep}
    env.pop("VIRTUAL_ENV", None)
    env.update(
        HOME=str(home),
        SOGNI_COORDINATOR_LISTEN=f"/ip4/127.0.0.1/tcp/{_free_port()}",
        SOGNI_COORDINATOR_HTTP_LISTEN="127.0.0.1:0",
        SOGNI_NODE_HTTP_LISTEN="127.0.0.1:0",
    )
    subs = {"8545": str(_free_port())}
    yield home, work, env, subs


def _node_holds_claimed_sogni(home: Path, chain_url: str) -> None:
    """The flow's promise: the node's wallet holds SOGNI on chain, and nothing is left to claim."""
    from sogni_chain import Addresses, Deployment, connect

    wallet = json.loads((home / ".sogni/node/wallet.json").read_text())["address"]
    addresses = Addresses.load(home / ".sogni/coordinator/addresses.json")
    deployment = Deployment(connect(chain_url), addresses)
    account = "0x" + wallet.removeprefix("0x")
    assert deployment.token.balance_of(account) > 0, "the node claimed no SOGNI"


def test_readme_runs_as_written(
    readme_env: tuple[Path, Path, dict[str, str], dict[str, str]],
    tmp_path: Path,
) -> None:
    from sogni_chain.anvil import find_anvil

    if find_anvil() is None:
        pytest.skip("anvil is not installed (`make test` installs it under contracts/)")
    home, work, env, subs = readme_env
    blocks = [b for b in parse_readme(README.read_text()) if b.kind in ("run", "background")]
    sections = list(dict.fromkeys(b.section for b in blocks))
    assert FLOW_SECTION in sections, "the local-chain flow is no longer tagged to run"
    for s, section in enumerate(sections):
        logs = tmp_path / f"section{s}"
        logs.mkdir()
        state = logs / "env.sh"
        state.write_text("")
        shell = Shell(work, env, subs, state, logs)
        try:
            for n, block in enumerate(b for b in blocks if b.section == section):
                began = time.monotonic()
                if block.kind == "run":
                    shell.run(block, n)
                else:
                    shell.start(block, n)
                print(f"README.md:{block.line} {block.kind}: {time.monotonic() - began:.1f} s")
            if section == FLOW_SECTION:
                _node_holds_claimed_sogni(home, f"http://127.0.0.1:{subs['8545']}")
        finally:
            began = time.monotonic()
            shell.stop_all()
            print(f"{section}: stopped in {time.monotonic() - began:.1f} s")
