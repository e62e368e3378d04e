"""Prompts at rest: job parameters sealed with a per-request key (AES-256-GCM).

Why: a coordinator needs a request's prompt only while its jobs can still be offered to a
node. Sealing each job's parameters with a key of its request, stored in its own row, lets
the store forget a prompt by deleting 32 bytes (crypto-shredding): the ciphertext left in
the jobs table, in old WAL frames or in backups is useless without the key once it is gone.
Until then the key sits in the same database (a restart must resume live jobs), which is why
the database and its backups are readable by their owner only (`db.private_database_file`).
The job id is the associated data, so a sealed blob cannot be moved to another job's row.

Blob layout: 12-byte nonce, ciphertext, 16-byte tag. Sealed with `cryptography`'s AESGCM
(OpenSSL): 14 us per job here, against 139 us for pycryptodome's, whose Python-level GCM
set-up was the largest part of the database writer's work per job (blobs are the same).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_BYTES", "PromptKeyError", "new_key", "seal", "unseal"]

KEY_BYTES = 32
_NONCE = 12
_TAG = 16


class PromptKeyError(Exception):
    """A sealed blob does not open with this key and job id (wrong key, moved or altered)."""


def new_key() -> bytes:
    """A fresh random key for one request."""
    return os.urandom(KEY_BYTES)


def seal(key: bytes, plaintext: bytes, job_id: bytes) -> bytes:
    """Encrypt and authenticate `plaintext` for the row of `job_id`."""
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, job_id)


def unseal(key: bytes, blob: bytes, job_id: bytes) -> bytes:
    """The plaintext `seal` was given, or `PromptKeyError`."""
    if len(blob) < _NONCE + _TAG:
        raise PromptKeyError("sealed parameters are truncated")
    try:
        return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], job_id)
    except (InvalidTag, ValueError):  # ValueError: a key of the wrong length
        raise PromptKeyError("sealed parameters do not open with this request's key") from None
