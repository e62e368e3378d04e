"""Signed result URLs: a URL verifies until it expires and not a character can change; the
key is persisted 0600 and reused, so a URL signed before a restart (or by another
coordinator holding the copied key) still verifies."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from sogni_coordinator.result_urls import (
    KEY_FILE,
    ResultUrlKeyError,
    ResultUrls,
    load_key,
)

IMAGE = "6F1D2C0A-8E7B-4C3D-9A1B-0E2F3A4B5C6D"
NOW = 1_800_000_000.0


def _parts(url: str) -> tuple[str, str, str, str]:
    split = urlsplit(url)
    query = parse_qs(split.query, strict_parsing=True)
    image_id = split.path.rsplit("/", 1)[1]
    return split.scheme + "://" + split.netloc, image_id, query["exp"][0], query["sig"][0]


def _urls(key: bytes = b"k" * 32, public_url: str | None = None) -> ResultUrls:
    return ResultUrls(key, public_url)


def test_signed_url_is_absolute_and_verifies_until_it_expires() -> None:
    urls = _urls()
    url = urls.sign(IMAGE, base_url="http://127.0.0.1:8080/", ttl=60, now=NOW)
    assert url.startswith(f"http://127.0.0.1:8080/results/{IMAGE}?exp=")
    base, image_id, exp, sig = _parts(url)
    assert (base, image_id, int(exp)) == ("http://127.0.0.1:8080", IMAGE, int(NOW) + 60)
    assert urls.verify(image_id, exp, sig, now=NOW)
    assert urls.verify(image_id, exp, sig, now=NOW + 60)
    assert not urls.verify(image_id, exp, sig, now=NOW + 61)
    # the default lifetime is one hour
    _, _, exp_default, _ = _parts(urls.sign(IMAGE, base_url="http://h", now=NOW))
    assert int(exp_default) == int(NOW) + 3600


def test_public_url_wins_over_the_request_base() -> None:
    urls = _urls(public_url="https://render.example.com/")
    url = urls.sign(IMAGE, base_url="http://10.0.0.5:8080", now=NOW)
    assert url.startswith(f"https://render.example.com/results/{IMAGE}?")
    assert "10.0.0.5" not in url


def test_tampering_with_id_expiry_or_signature_fails() -> None:
    urls = _urls()
    _, image_id, exp, sig = _parts(urls.sign(IMAGE, base_url="http://h", now=NOW))
    other_image = "6F1D2C0A-8E7B-4C3D-9A1B-0E2F3A4B5C6E"
    assert not urls.verify(other_image, exp, sig, now=NOW)
    assert not urls.verify(IMAGE.lower(), exp, sig, now=NOW)
    assert not urls.verify(image_id, str(int(exp) + 3600), sig, now=NOW)  # a longer life
    assert not urls.verify(image_id, "0" + exp, sig, now=NOW)  # same number, other text
    for i in range(len(sig)):  # every character of the MAC matters, the last one too
        for c in "AQgw_-":
            if c != sig[i]:
                forged = sig[:i] + c + sig[i + 1 :]
                assert not urls.verify(image_id, exp, forged, now=NOW), forged
    # a URL of another network (another key) is worthless here
    _, _, exp2, sig2 = _parts(_urls(b"j" * 32).sign(IMAGE, base_url="http://h", now=NOW))
    assert not urls.verify(IMAGE, exp2, sig2, now=NOW)


@pytest.mark.parametrize(
    ("image_id", "exp", "sig"),
    [
        ("", "1", "A" * 43),
        ("../../etc/passwd", "1900000000", "A" * 43),
        (IMAGE, "", "A" * 43),
        (IMAGE, "-1", "A" * 43),
        (IMAGE, "1e10", "A" * 43),
        (IMAGE, "9" * 400, "A" * 43),
        (IMAGE, "1900000000", ""),
        (IMAGE, "1900000000", "A" * 44),
        (IMAGE, "1900000000", "A" * 42 + "="),
        (IMAGE, "1900000000", "é" * 43),
        (IMAGE, "1900000000", "\x00" * 43),
        (None, "1", "A" * 43),
        (IMAGE, 1900000000, "A" * 43),
        (IMAGE, "1900000000", b"A" * 43),
    ],
)
def test_malformed_input_is_false_never_an_exception(
    image_id: object, exp: object, sig: object
) -> None:
    assert _urls().verify(image_id, exp, sig, now=NOW) is False  # type: ignore[arg-type]


def test_sign_refuses_ids_that_are_not_ids_and_silly_lifetimes() -> None:
    urls = _urls()
    for bad in ("", "a/b", "a?b", "x" * 129, "a b"):
        with pytest.raises(ValueError):
            urls.sign(bad, base_url="http://h")
    for ttl in (0, -1, 10**9):
        with pytest.raises(ValueError):
            urls.sign(IMAGE, base_url="http://h", ttl=ttl)
    with pytest.raises(ValueError):
        ResultUrls(b"short")
    assert "k" * 8 not in repr(urls)


def test_key_is_persisted_0600_and_reused_across_instances(tmp_path: Path) -> None:
    first = ResultUrls.load(tmp_path / "data")
    key_path = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key_path.read_text().strip())) == 32
    url = first.sign(IMAGE, base_url="http://h", now=NOW)
    _, image_id, exp, sig = _parts(url)
    second = ResultUrls.load(tmp_path / "data", public_url="https://x")  # a restart
    assert second.verify(image_id, exp, sig, now=NOW)
    # another coordinator of the network with the copied key accepts it too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / KEY_FILE).write_bytes(key_path.read_bytes())
    os.chmod(tmp_path / "other" / KEY_FILE, 0o644)  # as a careless copy leaves it
    copied = ResultUrls.load(tmp_path / "other")
    assert copied.verify(image_id, exp, sig, now=NOW)
    assert stat.S_IMODE((tmp_path / "other" / KEY_FILE).stat().st_mode) == 0o600
    # a fresh data dir gets a fresh key: the old URL means nothing there
    assert not ResultUrls.load(tmp_path / "fresh").verify(image_id, exp, sig, now=NOW)
    assert [p.name for p in (tmp_path / "data").iterdir()] == [KEY_FILE]  # no temp files left


def test_a_damaged_key_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_text("not hex\n")
    os.chmod(path, 0o600)
    with pytest.raises(ResultUrlKeyError, match="not a result URL key"):
        load_key(path)
    path.write_text("ab" * 8)
    with pytest.raises(ResultUrlKeyError, match="needs 32"):
        load_key(path)
