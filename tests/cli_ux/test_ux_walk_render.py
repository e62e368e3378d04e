"""A new user's first renders: `make demo` when nothing rendered, what `sogni render` says
it was charged (a refunded request is not paid for), what Ctrl-C leaves running, and the
guidance asked for when none is given (the model's own)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

import sogni_app.api
import sogni_app.cli as app_cli
import sogni_devnet.settlement_demo
import sogni_wallet.keystore
from sogni_app.api import RenderResult, ResumeTicket
from sogni_devnet import localnet
from sogni_devnet.settlement_demo import SettleAndClaim
from sogni_node.models.registry import SHAPES_DEFAULT_GUIDANCE
from sogni_node.models.tiny import TINY_DEFAULT_GUIDANCE, TINY_MODEL_ID
from sogni_protocol.ids import EMBEDDED_MODEL_ID

runner = CliRunner()
PEER = "12D3KooWNDUxrJgsgq7ocTuLmYg3pqSQ2m9Sz1jBzj4TZs5p3HwB"
COORDINATOR = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
RID = bytes.fromhex("ab" * 32)
RESERVED = 19_352  # micro-Spark: what the coordinator reserved for the request


def _fake_image(steps_done: int) -> Any:
    return SimpleNamespace(receipt=SimpleNamespace(steps_done=steps_done, worker="0xW"))


def test_demo_with_nothing_rendered_says_so_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No image, no receipt, no epoch: the coordinator published no epochs folder."""

    @contextlib.contextmanager
    def no_net(work: Path, **_: Any) -> Iterator[Any]:
        yield SimpleNamespace(coordinator_addr=COORDINATOR)

    deployment = SimpleNamespace(
        addresses=SimpleNamespace(chain_id=31337, distributor="0x" + "11" * 20),
        token=SimpleNamespace(balance_of=lambda a: 0),
    )
    payer = SimpleNamespace(address="0xPAYER", key=b"\x01" * 32)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo's work folder
    monkeypatch.setattr(localnet, "start_localnet", no_net)
    monkeypatch.setattr(localnet, "_credited_payer", lambda db, images: payer)
    monkeypatch.setattr(
        sogni_devnet.settlement_demo, "embedded_deployment", lambda path: deployment
    )
    monkeypatch.setattr(
        sogni_devnet.settlement_demo,
        "settle_and_claim",
        lambda db, d, keys: SettleAndClaim(epoch=None, claimed={"0xN": 0}),
    )
    monkeypatch.setattr(
        sogni_wallet.keystore, "load_wallet", lambda p, pw: SimpleNamespace(private_key=b"k")
    )
    monkeypatch.setattr(sogni_app.api, "save", lambda result, out: [])
    monkeypatch.setattr(
        sogni_app.api,
        "render_sync",
        lambda *a, **k: RenderResult(RID, cost_micro=RESERVED, failed=[(0, "no node")]),
    )
    code = localnet.main(["--images", "1", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 1
    assert "no epoch closed: no receipts to settle" in printed
    assert "0.019352 Spark" not in printed.replace("0.019352 Spark reserved", "")
    assert "paid by 0xPAYER: nothing (0.019352 Spark reserved, all refunded)" in printed
    assert not (tmp_path / "out" / "epochs").exists()


def test_charged_is_what_the_coordinator_settles() -> None:
    """Per delivered image its share of the reservation (pro rata of steps when cancelled)."""
    result = RenderResult(RID, cost_micro=4 * 1000)
    assert app_cli.charged_micro(result, 4, 8) == 0
    result.images = [_fake_image(8), _fake_image(8), _fake_image(4)]  # type: ignore[list-item]
    assert app_cli.charged_micro(result, 4, 8) == 1000 + 1000 + 500
    assert app_cli.cost_summary(4000, 4000, "spark") == "0.004000 spark"
    assert app_cli.cost_summary(4000, 2500, "spark") == (
        "0.002500 spark (0.004000 reserved, 0.001500 refunded)"
    )


def _render(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: Any, *args: str) -> Any:
    monkeypatch.setattr(app_cli, "render_sync", fake)
    return runner.invoke(
        app_cli.app,
        ["render", "a red circle", "--coordinator", COORDINATOR, "--out", str(tmp_path), *args],
        env={"HOME": str(tmp_path), "SOGNI_DEBUG": None, "SOGNI_COORDINATOR_ADDR": None},
    )


def test_render_refunded_in_full_does_not_claim_a_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refunded(coordinators: Any, request: Any, **kw: Any) -> RenderResult:
        kw["on_accepted"](ResumeTicket(COORDINATOR, RID, b"\x02" * 32))
        return RenderResult(RID, cost_micro=RESERVED, failed=[(0, "no node")])

    result = _render(monkeypatch, tmp_path, refunded)
    assert result.exit_code == 1, result.output
    assert "0 images and receipts in" in result.stdout
    assert "for nothing (0.019352 spark reserved, all refunded)" in result.stdout
    assert "for 0.019352 spark\n" not in result.stdout


def test_render_interrupted_says_the_request_keeps_running_and_how_to_collect_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(coordinators: Any, request: Any, **kw: Any) -> RenderResult:
        kw["on_accepted"](ResumeTicket(COORDINATOR, RID, b"\x02" * 32))
        raise KeyboardInterrupt

    result = _render(monkeypatch, tmp_path, interrupted)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert f"request {RID.hex()} keeps running" in result.stderr
    assert f"sogni collect {RID.hex()} --out {tmp_path}" in result.stderr
    assert result.stderr.rstrip().endswith("interrupted")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], SHAPES_DEFAULT_GUIDANCE),
        (["--model", TINY_MODEL_ID], TINY_DEFAULT_GUIDANCE),
        (["--model", "someone-elses-sd15"], 7.5),
        (["--guidance", "3.5"], 3.5),
    ],
)
def test_render_asks_for_the_models_own_guidance_when_none_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: float
) -> None:
    sent: list[Any] = []

    def record(coordinators: Any, request: Any, **kw: Any) -> RenderResult:
        sent.append(request)
        return RenderResult(RID)

    result = _render(monkeypatch, tmp_path, record, *args)
    assert result.exit_code == 0, result.output
    assert sent[0].guidance == expected
    assert app_cli.MODEL_GUIDANCE[EMBEDDED_MODEL_ID] == SHAPES_DEFAULT_GUIDANCE
    assert app_cli.MODEL_GUIDANCE[TINY_MODEL_ID] == TINY_DEFAULT_GUIDANCE
    assert localnet.DEMO_GUIDANCE == SHAPES_DEFAULT_GUIDANCE
