"""Rotating the coordinator's offer-signing key: the rotation chain file and `keys rotate`.

Why: nodes trust a coordinator by its offer-signing address (`trusted_coordinators`). A new
key would strand every node until its operator edited that list; instead the old key signs
a `KeyRotation` naming the new one, the link is appended to `key_rotations.jsonl` in
`data_dir`, and the coordinator, started with the new key, sends the chain in its `Welcome`
(`Welcome.rotations`). A node that trusts any key on the chain trusts the new one
(`sogni_node.trust`). docs/OPERATIONS.md, "Rotating the offer key".

`rotate` in steps that a crash at any point leaves repairable: (1) the old keystore is copied
to `<keystore>.<old address>.bak` (kept: the old key may still be needed to read its
history); (2) the new keystore is written to `<keystore>.new`; (3) the signed link is
appended (the whole file rewritten atomically); (4) `<keystore>.new` is renamed over the
keystore. Run again after a crash between (3) and (4), `rotate` finishes the rename instead
of rotating twice.

In-flight work: the restarted coordinator re-queues every job without a receipt (as after
any restart) and re-offers it under the new key; a node holding the result of an offer made
under the old key answers with that result, re-signed for the new offer (`sogni_node.pull`),
so nothing is rendered twice. Settlement checks each offer against the key its receipt names,
so epochs with receipts under both keys settle.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from eth_account import Account

from sogni_protocol import eip712
from sogni_protocol.atomic import FileExists, atomic_write_bytes, fsync_dir
from sogni_protocol.eip712 import Domain
from sogni_protocol.errors import DECODE_ERRORS
from sogni_protocol.logs import get_logger
from sogni_protocol.messages import KeyRotation, SignedKeyRotation
from sogni_protocol.rotation_chain import MAX_LINKS, chain_fault
from sogni_wallet.keystore import (
    DEFAULT_KDF_N,
    create_keystore,
    keystore_address,
    load_wallet,
)

__all__ = ["CHAIN_FILE", "Rotated", "RotationError", "chain_path", "load_chain", "rotate"]

log = get_logger(__name__)

CHAIN_FILE = "key_rotations.jsonl"
"""In `data_dir`: one signed link per line (JSON), oldest first."""
MAX_FILE_BYTES = 1 << 20
"""Far above any real history (a link is ~300 bytes); a bigger file is refused, not read."""


class RotationError(Exception):
    """The rotation chain file is unreadable or invalid, or a rotation cannot proceed."""


@dataclass(frozen=True)
class Rotated:
    old: str
    new: str
    backup: Path
    """Where the old keystore was kept."""
    resumed: bool = False
    """An interrupted rotation was finished instead of a new one made."""


def chain_path(data_dir: Path) -> Path:
    return Path(data_dir) / CHAIN_FILE


def load_chain(path: Path) -> list[SignedKeyRotation]:
    """Every link in the file, oldest first ([] if there is none); `RotationError` names the
    line of a link that is not one."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise RotationError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not a chain file")
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RotationError(f"cannot read {path}: {exc.strerror or exc}") from None
    chain = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            chain.append(msgspec.json.decode(line, type=SignedKeyRotation))
        except msgspec.ValidationError as exc:
            raise RotationError(f"{path} line {n} is not a signed key rotation: {exc}") from None
        except DECODE_ERRORS:
            raise RotationError(f"{path} line {n} is not JSON") from None
    return chain


def chain_for(domain: Domain, path: Path, signer: str, now: float) -> list[SignedKeyRotation]:
    """The links a `Welcome` carries for `signer`: the file's chain up to the link that made
    `signer` the key (the newest `MAX_LINKS`), checked; [] if `signer` was never rotated to.
    A chain that does not verify is a `RotationError` (the coordinator does not start)."""
    chain = load_chain(path)
    ends = [i for i, link in enumerate(chain) if eip712.same_address(link.rotation.new_key, signer)]
    if not ends:
        if chain:
            log.warning("offer_key_not_on_rotation_chain", signer=signer, chain=str(path))
        return []
    links = chain[: ends[-1] + 1][-MAX_LINKS:]  # a node trusting an older key: config edit
    fault = chain_fault(domain, links, signer, now)
    if fault is not None:
        raise RotationError(f"{path}: {fault}")
    return links


def rotate(
    keystore: Path, password: str, data_dir: Path, domain: Domain, *, kdf_n: int = DEFAULT_KDF_N
) -> Rotated:
    """Make a new offer key and hand over to it from the one in `keystore` (steps in the
    module docstring). `password` unlocks the old keystore and encrypts the new one (scrypt
    cost `kdf_n`)."""
    keystore = Path(keystore).expanduser()
    path = chain_path(data_dir)
    pending = keystore.with_name(keystore.name + ".new")
    chain = load_chain(path)
    current = keystore_address(keystore, create_hint="sogni-coordinator keys create")
    if chain and not eip712.same_address(chain[-1].rotation.new_key, current):
        return _resume(chain[-1], keystore, pending, path, current)
    old = load_wallet(keystore, password, create_hint="sogni-coordinator keys create")
    backup = keystore.with_name(f"{keystore.name}.{old.address}.bak")
    try:
        atomic_write_bytes(backup, keystore.read_bytes(), mode=0o600, replace=False)
    except FileExists:
        pass  # kept by an earlier, interrupted rotation: the same key
    if pending.exists():  # an interrupted rotation before its link was written: void
        pending.unlink()
    new_key = bytes(Account.create().key)
    new = create_keystore(
        pending,
        password,
        kdf_n=kdf_n,
        private_key=new_key,
        create_hint="sogni-coordinator keys create",
    )
    now = int(time.time())
    link = eip712.sign_key_rotation(
        old.private_key, domain, KeyRotation(old_key=old.address, new_key=new, not_before=now)
    )
    fault = chain_fault(domain, [*chain, link][-MAX_LINKS:], new, now)
    if fault is not None:
        raise RotationError(f"the new rotation would not verify: {fault}")
    lines = b"".join(msgspec.json.encode(x) + b"\n" for x in [*chain, link])
    atomic_write_bytes(path, lines, mode=0o644)
    os.replace(pending, keystore)
    fsync_dir(keystore.parent)
    log.info("offer_key_rotated", old=old.address, new=new, backup=str(backup))
    return Rotated(old.address, new, backup)


def _resume(
    last: SignedKeyRotation, keystore: Path, pending: Path, path: Path, current: str
) -> Rotated:
    """The chain ends at a key the keystore does not hold: finish an interrupted rotation
    if `<keystore>.new` holds that key, else refuse (the keystore was replaced by hand)."""
    target = last.rotation.new_key
    if (
        pending.exists()
        and eip712.same_address(keystore_address(pending), target)
        and eip712.same_address(last.rotation.old_key, current)
    ):
        os.replace(pending, keystore)
        fsync_dir(keystore.parent)
        log.info("offer_key_rotation_resumed", old=current, new=target)
        backup = keystore.with_name(f"{keystore.name}.{current}.bak")
        return Rotated(current, target, backup, resumed=True)
    raise RotationError(
        f"{path} ends at key {target}, but {keystore} holds {current}: put the keystore of "
        f"{target} back (its backups are {keystore.name}.<address>.bak), then rotate again"
    )
