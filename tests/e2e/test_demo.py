"""`make demo` as a user runs it: separate processes, embedded chain, receipts verified by a
standard EIP-712 library straight from `receipts.jsonl`, and every node's claim landing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from eth_account import Account
from eth_account.messages import encode_typed_data


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
