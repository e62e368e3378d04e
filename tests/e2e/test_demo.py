"""`make demo` as a user runs it: separate processes, embedded chain, receipts verified by a
standard EIP-712 library straight from `receipts.jsonl`, and every node's claim landing."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from eth_account import Account
from eth_account.messages import encode_typed_data
from typer.testing import CliRunner

from sogni_coordinator.cli import app as coordinator_app
from sogni_protocol.epoch_files import encode

from ..settlement import forge


def test_demo_renders_settles_and_its_receipts_verify(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sogni_devnet.localnet", "--images", "4", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "epoch 1 settled on chain" in proc.stdout
    assert proc.stdout.count(" claimed ") == 2
    lines = [json.loads(line) for line in (out / "receipts.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert set(line) == {"domain", "types", "primaryType", "message", "signature", "image"}
        typed = {k: line[k] for k in ("domain", "types", "primaryType", "message")}
        signer = Account.recover_message(
            encode_typed_data(full_message=typed), signature=line["signature"]
        )
        assert signer == line["message"]["worker"]
        image = (out / line["image"]).read_bytes()
        assert line["message"]["resultHash"] == "0x" + hashlib.sha256(image).hexdigest()
        assert line["domain"]["verifyingContract"] != "0x" + "00" * 20  # the real distributor
        assert line["message"]["trajectoryRoot"] != "0x" + "00" * 32  # every step committed
    assert len({line["message"]["trajectoryRoot"] for line in lines}) == len(lines)
    _audit_the_published_epochs(out / "epochs", tmp_path)
    # every receipt was checked (rate = 1) by the other wallet's node, and passed
    checks = [json.loads(c) for c in (out / "verifications.jsonl").read_text().splitlines()]
    assert len(checks) == 4, checks
    assert all(c["verdict"] == "pass" for c in checks), checks
    assert all(c["verifier"] and c["verifier"].lower() != c["worker"].lower() for c in checks)
    assert "4 of 4 receipt checks passed" in proc.stdout


def _audit(folder: Path) -> tuple[int, str]:
    result = CliRunner().invoke(
        coordinator_app, ["epoch", "audit", "--published", str(folder), "--json"]
    )
    return result.exit_code, result.output


def _audit_the_published_epochs(published: Path, tmp_path: Path) -> None:
    """`epoch audit` passes the demo's own folder and fails each forged copy of it."""
    code, output = _audit(published)
    assert code == 0, output
    assert json.loads(output)["ok"] is True

    def forged(name: str) -> Path:
        copy = tmp_path / f"forged-{name}"
        shutil.copytree(published, copy)
        return copy

    batch = forge.batch_of(published, 1)
    first = batch.receipts[0]
    richer = forge.replace(first, worker_amount=str(int(first.worker_amount) + 10**18))
    unpaid = forge.replace(first, settlement=forge.replace(first.settlement, authorization=None))
    cheaper = forge.revalue(batch, first, take_bps=batch.rules.take_rates_bps[-1])

    edited = forged("edited")  # the receipts file edited in place
    path = edited / forge.epoch_file(edited, 1).receipts_file
    path.write_bytes(encode(forge.replace(batch, receipts=[richer, *batch.receipts[1:]])))
    consistent = {
        name: entry for name, entry in (("richer", richer), ("unpaid", unpaid), ("take", cheaper))
    }
    copies = {"edited": edited}
    for name, entry in consistent.items():  # re-hashed, renamed, leaves/total/root rebuilt
        copy = copies[name] = forged(name)
        forge.publish_batch(copy, 1, forge.replace(batch, receipts=[entry, *batch.receipts[1:]]))
    total = copies["total"] = forged("total")
    ef = forge.epoch_file(total, 1)
    forge.write_epoch(total, forge.replace(ef, total=str(int(ef.total) + 1)))

    expected = {
        "edited": "edited after publication",
        "richer": "amounts are",
        "unpaid": "no payer authorization",
        "take": "take rate is",
        "total": "the leaves sum to",
    }
    for name, copy in copies.items():
        code, output = _audit(copy)
        assert code == 3, (name, output)
        report, _ = json.JSONDecoder().raw_decode(output)  # then the one-line error
        assert expected[name] in report["firstProblem"], (name, output)
        assert "Traceback" not in output
