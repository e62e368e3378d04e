"""Fuzz live daemons: malformed streams on every protocol a coordinator and a node serve.

`python -m bench fuzz` starts a coordinator and a node as separate processes (localnet),
asks each over identify which protocols it serves, sends thousands of malformed streams on
every one (random bytes, bad varint and 4-byte length headers, truncated and oversized
frames, our messages mutated or at the wrong step, structured-but-hostile pubsub RPCs and
identify pushes), then checks that both processes are alive, answer ping, and that a real
render through the client API succeeds. It writes the counts to BENCHMARKS.md ("fuzz").

The same pieces drive the short live run in `make test` (tests/fuzz/test_live_daemons.py).
"""

from __future__ import annotations

import argparse
import functools
import random
import re
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import trio

from sogni_net import ChannelClosed, DialError, Host, ReadTimeout, TransportError, open_host
from sogni_protocol import messages
from sogni_protocol.framing import encode_frame
from sogni_protocol.ids import (
    CAPABILITIES_TOPIC,
    CONTROL_FRAME_LIMIT,
    EMBEDDED_MODEL_ID,
    RESULT_FRAME_LIMIT,
)

# --- one valid instance of every wire message, from the schema ------------------------------
QUICK_STREAMS, FULL_STREAMS = 100, 2000
"""Malformed streams per protocol: `--quick` keeps `python -m bench --quick` under 10 minutes
here (300 took the fuzz section 263 s of its 725 s on 2 Dec 2026; 150 took 160 s of 612 s
on a slower VM, the quick run then 10:12 in all)."""

_STRING_CANDIDATES = ("a", "0x" + "11" * 20, "sogni-tiny-sd", "2026-01-01", "abc", "x" * 8)


def _sample_value(info: mi.Type) -> Any:
    """The smallest value `info`'s constraints allow (so new messages need no edit here)."""
    if isinstance(info, mi.IntType):
        low = info.ge if info.ge is not None else (info.gt + 1 if info.gt is not None else 0)
        high = info.le if info.le is not None else (info.lt - 1 if info.lt is not None else low)
        return max(low, min(1, high))
    if isinstance(info, mi.FloatType):
        floor = info.ge if info.ge is not None else info.gt if info.gt is not None else 0.0
        return float(floor) + (0.5 if info.gt is not None else 0.0)
    if isinstance(info, mi.BoolType):
        return True
    if isinstance(info, mi.StrType):
        return _sample_string(info)
    if isinstance(info, mi.BytesType):
        return b"\x01" * ((info.min_length or 1) if info.max_length != 0 else 0)
    if isinstance(info, mi.ListType):
        return [_sample_value(info.item_type) for _ in range(info.min_length or 1)]
    if isinstance(info, mi.DictType):
        return {_sample_value(info.key_type): _sample_value(info.value_type)}
    if isinstance(info, mi.LiteralType):
        return info.values[0]
    if isinstance(info, mi.UnionType):
        return _sample_value(next(t for t in info.types if not isinstance(t, mi.NoneType)))
    if isinstance(info, mi.StructType):
        fields = {f.encode_name: _sample_value(f.type) for f in info.fields if f.required}
        if info.tag is not None:
            fields[info.tag_field or "type"] = info.tag
        return _consistent(info.cls, fields)
    if isinstance(info, mi.NoneType):
        return None
    raise TypeError(f"no sample for {info!r}: extend bench/fuzz.py")


def _consistent(cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    """Cross-field rules the schema cannot state (a message's `__post_init__`), met by the
    smallest sample: tensor bytes match their shape, a revealed step is leaf 0 of a one-leaf
    tree named `latents`, a step re-check asks for that leaf."""
    if cls is messages.TensorEntry:
        size = 4
        for d in fields["shape"]:
            size *= d
        fields["data"] = b"\x01" * size
        fields["name"] = "latents"
    elif cls is messages.StepOpeningWire:
        fields["step"], fields["nLeaves"] = 0, 1
    elif cls is messages.VerifyStep:
        fields["k"], fields["modelId"] = 0, fields["params"]["modelId"]
    return fields


def _sample_string(info: mi.StrType) -> str:
    low, high = info.min_length or 0, info.max_length
    for base in _STRING_CANDIDATES:
        text = base * max(1, -(-low // len(base)))
        if high is not None:
            text = text[:high]
        if len(text) >= low and (info.pattern is None or re.search(info.pattern, text)):
            return text
    raise TypeError(f"no sample string for pattern {info.pattern!r}: extend the candidates")


@functools.cache
def sample_messages() -> tuple[messages.Message, ...]:
    """One valid instance of each member of `sogni_protocol.messages.Message`."""
    union = mi.type_info(messages.Message)
    assert isinstance(union, mi.UnionType)
    out = []
    for info in union.types:
        assert isinstance(info, mi.StructType)
        out.append(messages.decode(msgspec.msgpack.encode(_sample_value(info))))
    return tuple(out)


def message_tags() -> tuple[str, ...]:
    union = mi.type_info(messages.Message)
    assert isinstance(union, mi.UnionType)
    return tuple(str(t.tag) for t in union.types if isinstance(t, mi.StructType))


# --- malformed payloads --------------------------------------------------------------------
def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb(number: int, value: bytes | int | str) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes and str."""
    if isinstance(value, int):
        return _uvarint(number << 3) + _uvarint(value)
    data = value.encode() if isinstance(value, str) else value
    return _uvarint(number << 3 | 2) + _uvarint(len(data)) + data


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(out) + 1)
        action = rng.choice(("flip", "cut", "insert", "duplicate"))
        if action == "flip" and at < len(out):
            out[at] ^= rng.randint(1, 255)
        elif action == "cut":
            del out[at : at + rng.randint(1, 16)]
        elif action == "insert":
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            out[at:at] = out[at : at + rng.randint(1, 32)]
    return bytes(out)


def _topic(rng: random.Random) -> str:
    return rng.choice((CAPABILITIES_TOPIC, "", "x" * rng.randint(1, 300), "\u0000\u00ff"))


def pubsub_rpc(rng: random.Random) -> bytes:
    """A well-formed pubsub RPC (the /meshsub protobuf) whose every field is hostile."""
    rpc = b""
    for _ in range(rng.randint(0, 3)):
        rpc += _pb(1, _pb(1, rng.randint(0, 1)) + _pb(2, _topic(rng)))
    for _ in range(rng.randint(0, 3)):
        msg = _pb(1, rng.randbytes(rng.choice((0, 1, 38, 64))))
        msg += _pb(2, rng.randbytes(rng.randint(0, 200))) + _pb(3, rng.randbytes(8))
        msg += _pb(4, _topic(rng)) + _pb(5, rng.randbytes(64)) + _pb(6, rng.randbytes(36))
        rpc += _pb(2, msg)
    if rng.random() < 0.6:
        control = b""
        for number in rng.sample(range(1, 9), rng.randint(1, 4)):
            if number == 4:  # PRUNE, with peer exchange records
                px = _pb(1, rng.randbytes(38)) + _pb(2, rng.randbytes(rng.randint(0, 120)))
                body = _pb(1, _topic(rng)) + _pb(2, px) + _pb(3, rng.getrandbits(64))
            elif number in (2, 5):  # IWANT, IDONTWANT: message ids
                body = b"".join(_pb(1, rng.randbytes(rng.randint(0, 40))) for _ in range(3))
            else:  # IHAVE, GRAFT, extensions, observe: topic + ids
                body = _pb(1, _topic(rng)) + _pb(2, rng.randbytes(rng.randint(0, 40)))
            control += _pb(number, body)
        rpc += _pb(3, control)
    if rng.random() < 0.3:
        rpc += _pb(4, rng.randbytes(rng.randint(0, 200)))  # senderRecord
    return rpc


def identify_message(rng: random.Random) -> bytes:
    """A well-formed identify protobuf with hostile contents (for /ipfs/id/push)."""
    fields = [
        _pb(1, rng.randbytes(rng.randint(0, 80))),  # publicKey
        _pb(2, rng.randbytes(rng.randint(0, 40))),  # listenAddrs
        _pb(3, "/" + "p" * rng.randint(0, 300)),  # protocols
        _pb(4, rng.randbytes(rng.randint(0, 40))),  # observedAddr
        _pb(5, "ipfs/0.1.0"),
        _pb(6, "hostile/" + rng.randbytes(8).hex()),
        _pb(8, rng.randbytes(rng.randint(0, 120))),  # signedPeerRecord
    ]
    rng.shuffle(fields)
    return b"".join(fields[: rng.randint(1, len(fields))])


def _bad_utf8_frame(rng: random.Random) -> bytes:
    raw = messages.encode(messages.Goodbye(reason="ab"))
    return encode_frame(
        raw.replace(b"\xa2ab", b"\xa2" + bytes([0xFF, rng.randint(0x80, 0xFF)])),
        CONTROL_FRAME_LIMIT,
    )


def _be32(n: int) -> bytes:
    return struct.pack(">I", n)


Kind = Callable[[random.Random], bytes]
KINDS: dict[str, Kind] = {
    "random": lambda r: r.randbytes(r.randint(1, 256)),
    "varint_random": lambda r: (lambda b: _uvarint(len(b)) + b)(r.randbytes(r.randint(1, 200))),
    "varint_huge": lambda r: b"\xff" * 9 + b"\x7f",
    "varint_truncated": lambda r: _uvarint(4096) + r.randbytes(r.randint(1, 64)),
    "frame_random": lambda r: (lambda b: _be32(len(b)) + b)(r.randbytes(r.randint(1, 200))),
    "frame_oversized": lambda r: _be32(r.randint(RESULT_FRAME_LIMIT + 1, 2**32 - 1)),
    "frame_truncated": lambda r: _be32(r.randint(1000, 60000)) + r.randbytes(r.randint(1, 64)),
    "frame_wrong_type": lambda r: encode_frame(
        messages.encode(r.choice(sample_messages())), RESULT_FRAME_LIMIT
    ),
    "frame_mutated": lambda r: encode_frame(
        mutate(r, messages.encode(r.choice(sample_messages()))), RESULT_FRAME_LIMIT
    ),
    "frame_bad_utf8": _bad_utf8_frame,
    "pubsub_rpc": lambda r: (lambda b: _uvarint(len(b)) + b)(pubsub_rpc(r)),
    "pubsub_mutated": lambda r: (lambda b: _uvarint(len(b)) + b)(mutate(r, pubsub_rpc(r))),
    "identify_push": lambda r: (lambda b: _uvarint(len(b)) + b)(identify_message(r)),
    "empty": lambda r: b"",
}


# --- the barrage ---------------------------------------------------------------------------
@dataclass
class Tally:
    """How the daemon ended the streams we sent on one protocol."""

    streams: int = 0
    frames: int = 0
    bytes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def refused(self) -> int:
        """Streams the daemon reset, closed or refused to negotiate (not left hanging)."""
        return sum(n for k, n in self.outcomes.items() if k in ("reset", "closed", "refused"))


async def one_stream(
    host: Host, addr: str, protocol: str, payload: bytes, wait: float, *, direct: bool = False
) -> str:
    """Open `protocol` (on a direct channel with `direct`, where the daemon serves it so),
    send `payload` raw, half-close, wait for how the daemon ends it."""
    for attempt in range(5):
        try:
            channel = await host.open_channel(addr, protocol, timeout=10, direct=direct)
            break
        except DialError:
            # Often our connection being dropped by the daemon (for the previous payload):
            # retry on a fresh one so this payload really reaches it.
            await trio.sleep(0.05 * (attempt + 1))
    else:
        # Negotiation refused every time, unless the daemon can no longer be dialed at all.
        try:
            await host.connect(addr, timeout=10)
        except TransportError:
            return "dial_failed"
        return "refused"
    try:
        if payload:
            await channel.send_unframed(payload, timeout=5)
        await channel.close_write(timeout=5)
        ended = await channel.drain(timeout=wait)
        return "reset" if "reset" in ended else "closed"
    except ReadTimeout:
        return "no_answer"
    except ChannelClosed as exc:
        return "reset" if "reset" in str(exc) else "closed"
    except TransportError:
        return "reset"
    finally:
        await channel.reset()


async def barrage(
    host: Host,
    addr: str,
    protocol: str,
    streams: int,
    *,
    seed: int = 1,
    concurrency: int = 8,
    wait: float = 2.0,
    kinds: dict[str, Kind] = KINDS,
    direct: bool = False,
) -> Tally:
    """Send `streams` malformed streams on `protocol`, `concurrency` at a time; the first
    `len(kinds)` go through every kind once (on direct channels with `direct`)."""
    rng = random.Random(f"{seed}:{protocol}")
    tally = Tally()
    todo = iter(range(streams))
    names = sorted(kinds)

    async def worker() -> None:
        for i in todo:
            # Every kind once first (a short run still covers them all), then at random.
            kind = names[i] if i < len(names) else rng.choice(names)
            payload = kinds[kind](rng)
            outcome = await one_stream(host, addr, protocol, payload, wait, direct=direct)
            tally.streams += 1
            tally.frames += 1 if payload else 0
            tally.bytes += len(payload)
            tally.outcomes[outcome] += 1
            tally.kinds[kind] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return tally


async def served_protocols(host: Host, addr: str, timeout: float = 10.0) -> list[str]:
    """What the daemon at `addr` announces over identify (its registered protocols)."""
    peer = await host.connect(addr, timeout=timeout)
    with trio.fail_after(timeout):
        while not (protocols := host.known_protocols(peer)):
            await trio.sleep(0.05)  # identify runs right after the dial; no event to wait on
    return protocols


# --- the bench section ---------------------------------------------------------------------
@dataclass
class DaemonReport:
    name: str
    protocols: dict[str, Tally]
    alive: bool = False
    ping_ms: float | None = None


@dataclass
class FuzzReport:
    daemons: list[DaemonReport]
    render_ok: bool
    render_s: float
    duration_s: float
    streams_per_protocol: int
    interop: dict[str, Any] | None = None


async def fuzz_daemons(
    targets: dict[str, str], streams: int, *, seed: int = 1, concurrency: int = 8
) -> list[DaemonReport]:
    reports = []
    async with open_host(key_path=None, listen=()) as host:
        for name, addr in targets.items():
            protocols = await served_protocols(host, addr)
            report = DaemonReport(name, {})
            for protocol in protocols:
                report.protocols[protocol] = await barrage(
                    host, addr, protocol, streams, seed=seed, concurrency=concurrency
                )
            reports.append(report)
    # A fresh identity for the liveness check: the hostile one may be disconnected.
    async with open_host(key_path=None, listen=()) as probe:
        for report in reports:
            report.ping_ms = 1000 * await probe.ping(targets[report.name], timeout=10)
    return reports


def run(quick: bool, streams: int | None = None) -> str:
    from sogni_app.api import render_request, render_sync
    from sogni_devnet.localnet import start_localnet

    per_protocol = streams or _default_streams(quick)
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="sogni-fuzz-") as tmp,
        start_localnet(Path(tmp), nodes=1, log_level="warning") as net,
    ):
        node_addr = str(net.nodes[0].wait_event("ready", 30)["addrs"][0])
        targets = {"coordinator": net.coordinator_addr, "node": node_addr}
        daemons = trio.run(functools.partial(fuzz_daemons, targets, per_protocol))
        interop = _interop(targets, per_protocol)
        for report, proc in zip(daemons, (net.coordinator, net.nodes[0]), strict=True):
            report.alive = proc.popen.poll() is None
        render_started = time.perf_counter()
        request = render_request("a red circle", model_id=EMBEDDED_MODEL_ID, steps=4)
        result = render_sync(net.coordinator_addr, request)
        render_s = time.perf_counter() - render_started
    summary = FuzzReport(
        daemons,
        render_ok=len(result.images) == 1 and not result.failed,
        render_s=render_s,
        duration_s=time.perf_counter() - started,
        streams_per_protocol=per_protocol,
        interop=interop,
    )
    return render_markdown(summary, quick)


def _interop(targets: dict[str, str], streams: int) -> dict[str, Any] | None:
    """The js-libp2p hostile client against both daemons, when interop/ is installed."""
    import json
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    node = shutil.which("node")
    if node is None or not (repo / "interop" / "node_modules").is_dir():
        return None
    out: dict[str, Any] = {}
    for name, addr in targets.items():
        proc = subprocess.run(
            [node, "interop/hostile.mjs", "--addr", addr, "--all", f"--frames={streams}"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        out[name] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-500:]}
    return out


def _default_streams(quick: bool) -> int:
    return QUICK_STREAMS if quick else FULL_STREAMS


def _streams_flag(streams: int, quick: bool) -> str:
    return "" if streams == _default_streams(quick) else f" --fuzz-streams {streams}"


def render_markdown(report: FuzzReport, quick: bool) -> str:
    lines = [
        "## Fuzz: malformed streams against live daemons",
        "",
        f"`python -m bench fuzz{' --quick' if quick else ''}"
        f"{_streams_flag(report.streams_per_protocol, quick)}`: a coordinator and a node as "
        f"separate processes (localnet); {report.streams_per_protocol} malformed streams on "
        "every protocol each one announces over identify, from a py-libp2p peer (kinds: "
        + ", ".join(sorted(KINDS))
        + "), then the same from js-libp2p (`interop/hostile.mjs`). *refused* = the daemon "
        "reset or closed the stream or refused the protocol; *no answer* = still open after "
        "2 s (a valid-looking frame the protocol waits past).",
        "",
        "| daemon | protocol | client | streams | bytes | reset | closed | refused | no answer |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for daemon in report.daemons:
        for protocol, t in daemon.protocols.items():
            o = t.outcomes
            lines.append(
                f"| {daemon.name} | `{protocol}` | py-libp2p | {t.streams} | {t.bytes} | "
                f"{o['reset']} | {o['closed']} | {o['refused']} | {o['no_answer']} |"
            )
        js = (report.interop or {}).get(daemon.name, {})
        for protocol, c in js.get("protocols", {}).items():
            lines.append(
                f"| {daemon.name} | `{protocol}` | js-libp2p | {c['streams']} | {c['bytes']} | "
                f"{c['reset']} | {c['closed']} | {c['refused']} | {c['no_answer']} |"
            )
    lines += ["", "| daemon | process alive | ping after (ms) | js ping after (ms) |"]
    lines += ["| --- | --- | ---: | ---: |"]
    for daemon in report.daemons:
        js = (report.interop or {}).get(daemon.name, {})
        js_ping = js.get("pingAfterMs", "n/a") if js.get("answering") else "no answer"
        ping = f"{daemon.ping_ms:.1f}" if daemon.ping_ms is not None else "no answer"
        lines.append(f"| {daemon.name} | {'yes' if daemon.alive else 'NO'} | {ping} | {js_ping} |")
    lines += [
        "",
        f"After the barrage a real render through the client API "
        f"{'succeeded' if report.render_ok else 'FAILED'} ({report.render_s:.1f} s). "
        f"Whole run: {report.duration_s:.0f} s"
        + ("" if report.interop else " (js-libp2p client skipped: interop/node_modules missing)")
        + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int, default=None, help="streams per protocol")
    args = parser.parse_args(argv)
    print(run(args.quick, args.streams))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
