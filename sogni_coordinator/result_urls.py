"""Signed, expiring result URLs: how an SDK downloads an image without auth headers.

The official SDKs fetch a result with a plain GET and no `api-key` header, so the URL itself
must carry the authorization: `/results/{image_id}?exp=<unix seconds>&sig=<MAC>`, the MAC
an HMAC-SHA256 over the image id and the expiry with a key of the network. Whoever holds a
URL may fetch that one image until it expires (1 hour by default), nothing else; the server
looks the image up by its id, never by a path taken from the URL.

The key is 32 random bytes in `result-url.key` in the data dir (mode 0600, made on first
use). Coordinators of one network behind one public address share it: copy the file to each
(docs/GATEWAY_KEYS.md), so a URL signed by one verifies on all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from pathlib import Path
from urllib.parse import quote

from sogni_protocol.logs import get_logger

log = get_logger(__name__)

KEY_FILE = "result-url.key"
KEY_BYTES = 32
DEFAULT_TTL = 3600.0
MAX_TTL = 30 * 86400.0
"""A URL outlives no retention policy worth having; longer asks are a bug of the caller."""
_DOMAIN = b"sogni-result-url-v1\x00"
"""Separates these MACs from any other use of the key."""
_IMAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_EXP = re.compile(r"[1-9][0-9]{0,11}")  # canonical: one spelling per expiry
_SIG = re.compile(r"[A-Za-z0-9_-]{43}")


class ResultUrlKeyError(RuntimeError):
    """The key file is unreadable or not a key; the message says which file and what to do."""


def _mac(key: bytes, image_id: str, exp: int) -> bytes:
    return hmac.new(key, _DOMAIN + f"{image_id}\x00{exp}".encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class ResultUrls:
    """Signs and checks result URLs with one key (`load` reads or makes the persisted one)."""

    def __init__(self, key: bytes, public_url: str | None = None) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"a result URL key has at least {KEY_BYTES} bytes")
        self._key = bytes(key)
        self.public_url = public_url.rstrip("/") if public_url else None

    def __repr__(self) -> str:  # never the key
        return f"ResultUrls(public_url={self.public_url!r})"

    @classmethod
    def load(cls, data_dir: Path, public_url: str | None = None) -> ResultUrls:
        """The key in `data_dir/result-url.key`, created (0600) when there is none."""
        return cls(load_key(Path(data_dir) / KEY_FILE), public_url)

    def sign(
        self, image_id: str, *, base_url: str, ttl: float = DEFAULT_TTL, now: float | None = None
    ) -> str:
        """The absolute URL of `image_id`, valid for `ttl` seconds; `public_url` (the address
        clients reach behind a proxy) wins over `base_url` (the one this request came in on)."""
        if not _IMAGE_ID.fullmatch(image_id):
            raise ValueError("an image id is 1-128 characters of A-Z, a-z, 0-9, '-', '_'")
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl is from 0 to {MAX_TTL:.0f} seconds")
        exp = int((time.time() if now is None else now) + ttl)
        sig = _b64(_mac(self._key, image_id, exp))
        base = (self.public_url or base_url).rstrip("/")
        return f"{base}/results/{quote(image_id, safe='')}?exp={exp}&sig={sig}"

    def verify(self, image_id: str, exp: str, sig: str, now: float | None = None) -> bool:
        """Whether the URL's MAC is right and it has not expired; never raises."""
        try:
            if not (
                isinstance(image_id, str)
                and isinstance(exp, str)
                and isinstance(sig, str)
                and _IMAGE_ID.fullmatch(image_id)
                and _EXP.fullmatch(exp)
                and _SIG.fullmatch(sig)
            ):
                return False
            # the canonical encoding is compared, so no second spelling of a MAC passes
            good = hmac.compare_digest(sig, _b64(_mac(self._key, image_id, int(exp))))
            return good and int(exp) >= (time.time() if now is None else now)
        except Exception:  # a URL from anyone: any oddity is just "no"
            return False


def load_key(path: Path) -> bytes:
    """Read the key file (64 hex digits), or create it atomically with mode 0600. Two
    coordinators starting at once on one data dir end up with the same key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        text = secrets.token_hex(KEY_BYTES) + "\n"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails if another process made one meanwhile: keep that
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("result_url_key_mode_tightened", path=str(path), was=oct(mode))
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ResultUrlKeyError(
            f"{path} is not a result URL key (64 hex digits); restore it from another "
            "coordinator of the network, or delete it to make a new one (old URLs stop working)"
        ) from exc
    if len(key) < KEY_BYTES:
        raise ResultUrlKeyError(
            f"{path} holds {len(key)} bytes, a result URL key needs {KEY_BYTES}; restore it "
            "from another coordinator of the network, or delete it to make a new one"
        )
    return key
