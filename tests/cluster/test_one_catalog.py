"""One catalog and one set of pricing factors per network (issue #18, item 5).

Coordinators of one network on one real PostgreSQL: two with the package's catalog and
factors start side by side and publish the same digests in `cluster_members`; one that
would quote with another pricing factor or another catalog is refused when it joins, with
one line naming what differs and what to do, and leaves no member row behind. The last test
runs the real `sogni-coordinator start` with another `$SOGNI_CATALOG` and reads its stderr.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import trio
from eth_account import Account

from sogni_coordinator.cluster import Cluster, NetworkTermsDiffer, network_terms
from sogni_protocol.catalog import DEFAULT_CATALOG, default_catalog, load_catalog
from sogni_protocol.cli_errors import classify
from sogni_protocol.pricing import default_factors
from sogni_wallet.keystore import create_keystore

from .conftest import start_cluster

PASSWORD = "one-catalog-test"


def _members(pg_url: str) -> dict[str, dict[str, str]]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT coordinator, terms FROM cluster_members").fetchall()
    return {str(r[0]): json.loads(r[1]) for r in rows}


async def test_equal_terms_start_and_another_pricing_factor_or_catalog_is_refused(
    tmp_path: Path, pg_url: str
) -> None:
    async with start_cluster(tmp_path, pg_url, ["a", "b"]) as m:
        a, b = (m[n].signer.address.lower() for n in ("a", "b"))
        members = await trio.to_thread.run_sync(_members, pg_url)
        assert set(members) == {a, b}
        assert members[a] == members[b] == network_terms(default_catalog(), default_factors())

        stranger = Account.create().address
        factors = default_factors()
        other = replace(factors, overhead_steps=factors.overhead_steps + 1.0)
        with pytest.raises(NetworkTermsDiffer) as refused:
            await Cluster.open(pg_url, me=stranger, signers=[], lease_ttl=30.0, factors=other)
        what = str(refused.value)
        assert "pricing factors" in what and "catalog" not in what
        assert a in what or b in what
        line = classify(refused.value)
        assert line is not None and line.code == 3
        text = line.line()
        assert "\n" not in text and text.startswith("error: this coordinator's pricing factors")
        assert "run the same release" in text

        catalog = replace(default_catalog(), sogni_usd_price=default_catalog().sogni_usd_price * 2)
        with pytest.raises(NetworkTermsDiffer, match=r"catalog prices differ from live"):
            await Cluster.open(pg_url, me=stranger, signers=[], lease_ttl=30.0, catalog=catalog)

        same = await Cluster.open(
            pg_url, me=stranger, signers=[], lease_ttl=30.0, catalog=load_catalog(DEFAULT_CATALOG)
        )
        await same.aclose()  # the package's own terms join
        members = await trio.to_thread.run_sync(_members, pg_url)
        assert set(members) == {a, b, stranger.lower()}  # the refused tries left no row


async def test_the_command_line_refuses_another_catalog_in_one_line(
    tmp_path: Path, pg_url: str
) -> None:
    text = DEFAULT_CATALOG.read_text()
    assert "\nrelaxed_price_factor = 0.5 " in text
    other = tmp_path / "other-catalog.toml"
    other.write_text(
        text.replace("\nrelaxed_price_factor = 0.5 ", "\nrelaxed_price_factor = 0.25 ", 1)
    )
    assert load_catalog(other).relaxed_price_factor == 0.25
    keystore = tmp_path / "signer.json"
    create_keystore(keystore, PASSWORD, kdf_n=4)
    env = {
        **os.environ,
        "SOGNI_CATALOG": str(other),
        "SOGNI_COORDINATOR_DATA_DIR": str(tmp_path / "late"),
        "SOGNI_COORDINATOR_DATABASE": pg_url,
        "SOGNI_COORDINATOR_LISTEN": "/ip4/127.0.0.1/tcp/0",
        "SOGNI_COORDINATOR_HTTP_LISTEN": "off",
        "SOGNI_COORDINATOR_KEYSTORE": str(keystore),
        "SOGNI_COORDINATOR_PASSWORD": PASSWORD,
    }
    env.pop("SOGNI_DEBUG", None)
    async with start_cluster(tmp_path, pg_url, ["a"]) as m:
        with trio.fail_after(120):
            done = await trio.run_process(
                [sys.executable, "-m", "sogni_coordinator", "start"],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        err = done.stderr.decode()
        assert done.returncode == 3, err[-2000:]
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: this coordinator's catalog prices differ from live")
        assert m["a"].signer.address.lower() in last and "run the same release" in last


async def test_only_live_coordinators_count_and_one_without_a_digest_refuses(pg_url: str) -> None:
    """A coordinator that stopped beating (beyond the live window) no longer holds the
    network to its terms: after a stop-all, a new catalog starts. A live one of a release
    before this check (no digest) is refused like a differing one."""
    me = Account.create().address
    first = await Cluster.open(pg_url, me=me, signers=[], lease_ttl=1.0)
    await first.aclose()
    window = Cluster.live_window(1.0)

    def put(coordinator: str, terms: str | None, age: float) -> None:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO cluster_members (coordinator, seen_at, terms)"
                " VALUES (%s, extract(epoch FROM clock_timestamp())::float8 - %s, %s)",
                (coordinator, age, terms),
            )

    old = json.dumps(
        {**network_terms(default_catalog(), default_factors()), "pricing factors": "0"}
    )
    await trio.to_thread.run_sync(put, "0xgone", old, window + 5)
    again = await Cluster.open(pg_url, me=me, signers=[], lease_ttl=1.0)
    await again.aclose()  # the stopped one's other factors do not block

    await trio.to_thread.run_sync(put, "0xolder", None, 0.0)
    with pytest.raises(NetworkTermsDiffer, match=r"0xolder .*publishes no catalog digest"):
        await Cluster.open(pg_url, me=me, signers=[], lease_ttl=1.0)
