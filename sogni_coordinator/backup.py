"""Backups of a coordinator: a consistent online snapshot of its database and published
epochs, and its keys kept apart, encrypted (docs/OPERATIONS.md, "Backups").

Why a snapshot and not a copy: the database runs in WAL mode while the coordinator serves, so
copying `coordinator.db` may catch a half-applied transaction or miss what still sits in the
WAL. SQLite's online backup API copies a consistent state page by page while writers go on.
Published epoch files are written before the database marks their epoch (atomic renames), so
copying the folder after the snapshot gives every epoch the snapshot knows of.

Keys: the offer key and the settlement key are already encrypted keystores and are copied as
they are; the libp2p identity (`node.key`, raw Ed25519) and the gateway's result-URL key
(`result-url.key`, the network's HMAC key: docs/GATEWAY.md) are encrypted with a password
(scrypt + AES-GCM) before they leave the data folder. Keys go into `keys/` only when asked, so
a backup folder without them can go to ordinary storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from Crypto.Cipher import AES
from Crypto.Protocol.KDF import scrypt

from sogni_coordinator.data_dir_lock import DataDirBusy, hold
from sogni_coordinator.db import private_database_file
from sogni_coordinator.storage import is_postgres
from sogni_protocol.atomic import atomic_write_bytes

__all__ = ["BACKUP_FORMAT", "ENCRYPTED_KEYS", "BackupError", "BackupManifest", "backup", "restore"]

BACKUP_FORMAT = "sogni-coordinator-backup-v1"
_DB_NAME = "coordinator.db"
_FOLDERS = ("epochs", "unsigned")
"""Data-folder sub-folders carried in a backup (published epochs, unsigned transactions)."""
_FILES = ("addresses.json", "verifications.jsonl", "coordinator.json")
_NODE_KEY_ENC = "node.key.enc"
_URL_KEY_ENC = "result-url.key.enc"
_ENCRYPTED = {_NODE_KEY_ENC: "node key", _URL_KEY_ENC: "result-URL key"}
"""The raw secrets a backup holds encrypted, by file name in `keys/`."""
ENCRYPTED_KEYS = tuple(_ENCRYPTED)
"""Their file names: a restore asks for the password when the backup holds one."""
_URL_KEY = "result-url.key"
"""`sogni_coordinator.result_urls.KEY_FILE` (not imported: the gateway's module is not
needed to copy a file)."""
_SCRYPT_N = 2**15


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class BackupManifest:
    format: str
    created_at: float
    files: dict[str, str]
    """Relative path -> sha256 (hex) of every file in the backup but the manifest."""
    keys: bool

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": self.format,
                "createdAt": self.created_at,
                "keys": self.keys,
                "files": self.files,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def read(cls, folder: Path) -> BackupManifest:
        path = folder / "manifest.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            manifest = cls(
                format=str(raw["format"]),
                created_at=float(raw["createdAt"]),
                files={str(k): str(v) for k, v in dict(raw["files"]).items()},
                keys=bool(raw["keys"]),
            )
        except FileNotFoundError:
            raise BackupError(f"{folder} holds no backup (no manifest.json)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackupError(f"{path} is not a backup manifest ({exc})") from None
        if manifest.format != BACKUP_FORMAT:
            raise BackupError(f"{path}: format {manifest.format!r}, expected {BACKUP_FORMAT!r}")
        return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _snapshot_db(source: Path, target: Path) -> None:
    """SQLite's online backup: a consistent copy while the coordinator keeps writing."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30.0)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            dst.close()
    finally:
        src.close()


def _encrypt(data: bytes, password: str) -> bytes:
    salt, nonce = os.urandom(16), os.urandom(12)
    key = scrypt(password.encode(), salt, 32, N=_SCRYPT_N, r=8, p=1)  # type: ignore[arg-type]
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)  # type: ignore[arg-type]
    sealed, tag = cipher.encrypt_and_digest(data)
    return json.dumps(
        {
            "kdf": "scrypt",
            "n": _SCRYPT_N,
            "salt": salt.hex(),
            "nonce": nonce.hex(),
            "data": sealed.hex(),
            "tag": tag.hex(),
        }
    ).encode()


def _decrypt(blob: bytes, password: str, what: str = "node key") -> bytes:
    try:
        doc = json.loads(blob)
        salt, nonce = bytes.fromhex(doc["salt"]), bytes.fromhex(doc["nonce"])
        key = scrypt(password.encode(), salt, 32, N=int(doc["n"]), r=8, p=1)  # type: ignore[arg-type]
        cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)  # type: ignore[arg-type]
        return bytes(
            cipher.decrypt_and_verify(bytes.fromhex(doc["data"]), bytes.fromhex(doc["tag"]))
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(
            f"cannot decrypt the backed-up {what} ({type(exc).__name__}): wrong password?"
        ) from None


def _walk(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _refuse_server(database: Path | None) -> None:
    """A PostgreSQL database is the server's to back up: a file copy here would miss it."""
    if database is not None and is_postgres(database):
        raise BackupError(
            "the database is on a PostgreSQL server: back it up with pg_dump and restore it "
            "with pg_restore (`backup` copies SQLite files only; docs/OPERATIONS.md, Backups)"
        )


def backup(
    data_dir: Path,
    target: Path,
    *,
    database: Path | None = None,
    key_files: Iterable[Path] = (),
    node_key: Path | None = None,
    url_key: Path | None = None,
    password: str | None = None,
) -> BackupManifest:
    """Write a backup of the coordinator in `data_dir` into the empty folder `target`.

    `key_files` (encrypted keystores) are copied into `keys/`; `node_key` (the raw libp2p
    identity) and `url_key` (the gateway's result-URL HMAC key) are encrypted with
    `password` first. Without them the backup holds no key."""
    _refuse_server(database)
    database = database or data_dir / _DB_NAME
    if not database.exists():
        raise BackupError(f"no coordinator database at {database}: nothing to back up")
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty: back up into a new folder")
    if node_key is not None and not password:
        raise BackupError("the node key is encrypted with a password: set one to back it up")
    if url_key is not None and url_key.is_file() and not password:
        raise BackupError("the result-URL key is encrypted with a password: set one to back it up")
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_database_file(target / _DB_NAME)  # live requests' prompt keys: owner only
    _snapshot_db(database, target / _DB_NAME)
    for name in _FOLDERS:
        if (data_dir / name).is_dir():
            shutil.copytree(data_dir / name, target / name)
    for name in _FILES:
        if (data_dir / name).is_file():
            shutil.copy2(data_dir / name, target / name)
    keys = False
    for path in key_files:
        if path.is_file():
            (target / "keys").mkdir(exist_ok=True)
            shutil.copy2(path, target / "keys" / path.name)
            keys = True
    for secret, name in ((node_key, _NODE_KEY_ENC), (url_key, _URL_KEY_ENC)):
        if secret is not None and secret.is_file():
            assert password is not None
            (target / "keys").mkdir(exist_ok=True)
            atomic_write_bytes(target / "keys" / name, _encrypt(secret.read_bytes(), password))
            keys = True
    files = {
        str(p.relative_to(target)): _sha256(p) for p in _walk(target) if p.name != "manifest.json"
    }
    manifest = BackupManifest(BACKUP_FORMAT, time.time(), files, keys)
    atomic_write_bytes(target / "manifest.json", manifest.to_json().encode())
    return manifest


def restore(
    source: Path,
    data_dir: Path,
    *,
    database: Path | None = None,
    password: str | None = None,
    force: bool = False,
    url_key: Path | None = None,
) -> BackupManifest:
    """Restore the backup in `source` into `data_dir` (whose coordinator must be stopped).

    Every file is checked against the manifest first; nothing is written if one differs.
    Refuses to overwrite an existing database unless `force`. Keys in the backup are restored
    too (the node key and the result-URL key decrypted with `password`; the latter to
    `url_key`, default `data_dir/result-url.key`)."""
    _refuse_server(database)
    manifest = BackupManifest.read(source)
    for rel, digest in manifest.files.items():
        path = source / rel
        if not path.is_file():
            raise BackupError(f"the backup lacks {rel}: it is incomplete")
        if _sha256(path) != digest:
            raise BackupError(f"{rel} in the backup does not match its manifest: it was changed")
    database = database or data_dir / _DB_NAME
    if database.exists() and not force:
        raise BackupError(
            f"{database} exists: stop that coordinator and pass --force to replace its data"
        )
    try:
        with hold(data_dir, "restoring into its folder"):  # and none starts meanwhile
            return _restore_files(
                source, data_dir, database, manifest, password, url_key or data_dir / _URL_KEY
            )
    except DataDirBusy as exc:
        raise BackupError(str(exc)) from None


def _restore_files(
    source: Path,
    data_dir: Path,
    database: Path,
    manifest: BackupManifest,
    password: str | None,
    url_key: Path,
) -> BackupManifest:
    secrets: dict[str, bytes] = {}  # decrypted before anything is written
    for name, what in _ENCRYPTED.items():
        if (source / "keys" / name).is_file():
            if not password:
                raise BackupError(f"the backup holds an encrypted {what}: give its password")
            secrets[name] = _decrypt((source / "keys" / name).read_bytes(), password, what)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for suffix in ("-wal", "-shm"):  # a stale WAL must not be replayed over the restored file
        Path(str(database) + suffix).unlink(missing_ok=True)
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / _DB_NAME, database)
    os.chmod(database, 0o600)  # live requests' prompt keys: owner only
    for name in _FOLDERS:
        if (source / name).is_dir():
            shutil.rmtree(data_dir / name, ignore_errors=True)
            shutil.copytree(source / name, data_dir / name)
    for name in _FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, data_dir / name)
    if (source / "keys").is_dir():
        for path in sorted((source / "keys").iterdir()):
            if path.name not in _ENCRYPTED:
                shutil.copy2(path, data_dir / path.name)
                os.chmod(data_dir / path.name, 0o600)
    for name, target in ((_NODE_KEY_ENC, data_dir / "node.key"), (_URL_KEY_ENC, url_key)):
        if name in secrets:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, secrets[name])
            os.chmod(target, 0o600)
    return manifest
