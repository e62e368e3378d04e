"""`sogni-node`: manage the node's wallet, inspect its hardware, and start the daemon.

Commands print results on stdout (JSON with `--json`, for scripts and partner images) and
errors as one line on stderr with the exit code of their class (`sogni_protocol.cli_errors`,
docs/CLI.md), never a traceback unless `--debug`: a config or password mistake is an operator
problem, not a crash. The private key is never printed. The entry point is
`sogni_node.__main__:main`, which checks the `node` extra before importing this module.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import msgspec
import typer

from sogni_node.cli_common import ConfigOption, JsonOption
from sogni_node.cli_common import load_config as _config
from sogni_node.hardware import HardwareInfo, probe
from sogni_protocol.cli_errors import BadUsage, CliGroup, DebugOption, Unavailable
from sogni_protocol.logs import configure_logging, quiet_progress_bars
from sogni_protocol.settings import settings_to_builtins
from sogni_wallet.keystore import (
    DEFAULT_KDF_N,
    KeystoreExists,
    create_keystore,
    keystore_address,
    password_from_env_or_prompt,
)

__all__ = ["app"]

app = typer.Typer(
    name="sogni-node",
    help="Sogni Supernet worker node: renders images for coordinators, paid per signed receipt.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=CliGroup,
)
keys_app = typer.Typer(help="The node's wallet (keystore v3): rewards go to its address.")
app.add_typer(keys_app, name="keys")


def _probe(device: str) -> HardwareInfo:
    try:
        return probe(device)
    except ValueError as exc:  # an unknown device name
        raise BadUsage(str(exc), "use auto, cuda, mps or cpu") from exc


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@app.callback()
def _main(debug: DebugOption = False) -> None:
    # Library loggers (and the keystore's) must not write plain text to stdout before
    # `start` configures logging for real; warnings still reach stderr.
    configure_logging("warning", capture_warnings=False)


@keys_app.command("create")
def keys_create(
    config: ConfigOption = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an existing keystore (the old one is kept as .bak)."),
    ] = False,
    kdf_n: Annotated[
        int,
        typer.Option(
            "--kdf-n", envvar="SOGNI_KDF_N", hidden=True, help="scrypt N (tests use a small one)."
        ),
    ] = DEFAULT_KDF_N,
) -> None:
    """Create the node's wallet key, encrypted with a password ($SOGNI_NODE_PASSWORD or prompt)."""
    cfg = _config(config)
    if cfg.keystore.exists() and not force:
        raise KeystoreExists(
            f"keystore {cfg.keystore} already exists (address "
            f"{keystore_address(cfg.keystore)}); use --force to replace it"
        )
    password = password_from_env_or_prompt(cfg.password_env, confirm=True)
    try:
        address = create_keystore(
            cfg.keystore, password, kdf_n=kdf_n, force=force, create_hint="sogni-node keys create"
        )
    except ValueError as exc:  # --kdf-n is not a power of two
        raise BadUsage(str(exc)) from exc
    typer.echo(f"address:  {address}")
    typer.echo(f"keystore: {cfg.keystore}")
    typer.echo(
        "Back up the keystore file and its password: without both the key is lost.", err=True
    )


@keys_app.command("show")
def keys_show(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show the wallet address and keystore path (needs no password; never the key)."""
    cfg = _config(config)
    address = keystore_address(cfg.keystore)
    info = {
        "address": address,
        "keystore": str(cfg.keystore),
        "payout_address": cfg.payout_address or address,
    }
    if as_json:
        _print_json(info)
        return
    for key, value in info.items():
        typer.echo(f"{key + ':':<16}{value}")


@app.command("probe")
def probe_command(
    as_json: JsonOption = False,
    device: Annotated[
        str, typer.Option("--device", help="auto, cuda, mps or cpu (check that one).")
    ] = "auto",
) -> None:
    """Detect the render device, its memory and a suggested pixel limit."""
    from sogni_protocol.image_encoding import encoder_build, encodes_like_network

    info = _probe(device)
    data = msgspec.to_builtins(info)
    alike = encodes_like_network()
    data["image_encoder"] = encoder_build()
    data["encodes_like_network"] = ", ".join(
        f"{k} {'yes' if v else 'NO'}" for k, v in alike.items()
    )
    if as_json:
        _print_json(data)
        return
    gib = 1024**3
    for key, value in data.items():
        if key.endswith("memory_bytes") and isinstance(value, int):
            value = f"{value / gib:.1f} GiB ({value} bytes)"
        typer.echo(f"{key + ':':<22}{value}")


@app.command("config")
def config_command(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Print every setting, set or not, with where its value comes from (env, file, default).

    `--json`: the effective values alone (unset ones as null), for scripts."""
    from sogni_node.config import config_sources

    cfg = _config(config)
    data = {f.name: None for f in msgspec.structs.fields(cfg)} | settings_to_builtins(cfg)
    if as_json:
        data["journal_path"] = str(cfg.journal_path)
        data["node_key_path"] = str(cfg.node_key_path)
        _print_json(data)
        return
    sources = config_sources(config)
    width = max(len(key) for key in data)
    for key, value in data.items():
        shown = "(not set)" if value is None or value == [] else json.dumps(value)
        typer.echo(f"{key:<{width}}  {shown}  [{sources.get(key, 'default')}]")
    typer.echo(f"{'journal_path':<{width}}  {json.dumps(str(cfg.journal_path))}  [data_dir]")
    typer.echo(f"{'node_key_path':<{width}}  {json.dumps(str(cfg.node_key_path))}  [data_dir]")


@app.command("bench")
def bench(
    config: ConfigOption = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed renders per model.")] = 3,
    as_json: JsonOption = False,
) -> None:
    """Measure render speed per installed model against the catalog baseline; save it."""
    from sogni_node.benchmark import run_bench, save_report
    from sogni_node.daemon import build_backend
    from sogni_node.models.defaults import default_registry

    cfg = _config(config)
    hw = _probe(cfg.device)
    registry = default_registry(cfg.models_dir, test_model=cfg.test_model)
    try:
        backend = build_backend(cfg, registry, hw)
    except ValueError as exc:  # e.g. a quant mode this device cannot run, a missing extra
        raise Unavailable(str(exc), "change dtype/quantize/backend in the config") from exc
    report = run_bench(backend, registry, hw.device, runs=runs)
    save_report(report, cfg.bench_path)
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "savedTo": str(cfg.bench_path)}, indent=2))
        return
    for m in report.models:
        typer.echo(
            f"{m.model_id:<28} {m.width}x{m.height} {m.steps:>3} steps  "
            f"{m.measured_seconds:>8.3f} s (baseline {m.baseline_seconds:.3f} s)  "
            f"speed {m.speed:.2f}x"
        )
    typer.echo(
        f"device {report.device}, speed {report.speed:.2f}x: qualifies for the "
        f"{report.tier} tier (fast also needs a worker licence and stake on chain)"
    )
    typer.echo(f"saved to {cfg.bench_path}: the node advertises this speed from its next start")


@app.command("start")
def start(
    config: ConfigOption = None,
    announce: Annotated[
        bool, typer.Option(help="Print one JSON line per event on stdout (for launchers).")
    ] = False,
) -> None:
    """Run the node until SIGINT/SIGTERM (running jobs get `shutdown_grace` to finish)."""
    cfg = _config(config)
    if not cfg.coordinators:  # it would wait for work that never comes
        raise BadUsage(
            "no coordinators configured: this node would never get work",
            "set `coordinators` in the config file or "
            "SOGNI_NODE_COORDINATORS=/ip4/HOST/tcp/PORT/p2p/PEER_ID, and the coordinator's "
            "signing address in `trusted_coordinators`; `sogni-node config` shows both",
        )
    if not cfg.trusted_coordinators and not cfg.network_operators:  # it would decline all
        raise BadUsage(
            "coordinators are configured but none is trusted: this node would decline every offer",
            "set `trusted_coordinators` (SOGNI_NODE_TRUSTED_COORDINATORS) to the coordinators' "
            "signing addresses (`sogni-coordinator keys show`), or `network_operators` "
            "(SOGNI_NODE_NETWORK_OPERATORS) to the network operator's",
        )
    configure_logging(cfg.log_level, cfg.log_json)
    quiet_progress_bars()  # before the libraries that draw them are imported
    from sogni_node import daemon  # lazy: pulls in torch, diffusers and libp2p

    try:
        daemon.run(cfg, announce=announce)
    except KeyboardInterrupt:
        sys.exit(130)


@app.command("status")
def status_command(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Print one reading and exit.")] = False,
    every: Annotated[
        float, typer.Option("--every", min=0.5, help="Seconds between live readings.")
    ] = 2.0,
    as_json: JsonOption = False,
) -> None:
    """A live view of this node: daemon, coordinators, jobs today, speed, rewards.

    `--json` and `--once` (or no terminal) print one reading and exit 4 when no daemon
    answered, as every CLI does for "nothing listening": a script sees the node is down."""
    import time

    from sogni_node.status_view import NodeStatus, StatusCache, collect, render

    def down(reading: NodeStatus) -> None:
        if reading.daemon is None:  # after the reading: stdout still carries it
            raise Unavailable(reading.daemon_error or "no node daemon answers")

    cfg = _config(config)
    try:
        wallet: str | None = keystore_address(cfg.keystore)
    except Exception:  # no keystore yet: the view says so
        wallet = None
    if as_json:
        reading = collect(cfg, wallet)
        typer.echo(json.dumps(reading.as_json(), indent=2))
        down(reading)
        return
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if once or not console.is_terminal:
        reading = collect(cfg, wallet)
        console.print(render(reading))
        down(reading)
        return
    cache = StatusCache()  # the rewards audit is redone only when the journal or epochs change
    try:
        first = render(collect(cfg, wallet, cache=cache))
        with Live(first, console=console, auto_refresh=False) as live:
            while True:
                time.sleep(every)
                live.update(render(collect(cfg, wallet, cache=cache)), refresh=True)
    except KeyboardInterrupt:
        return


app.add_typer(__import__("sogni_node.rewards_cli", fromlist=["app"]).app)
app.add_typer(__import__("sogni_node.models_cli", fromlist=["x"]).models_app, name="models")
app.add_typer(__import__("sogni_node.models_cli", fromlist=["x"]).loras_app, name="loras")
app.add_typer(__import__("sogni_node.dispute_cli", fromlist=["app"]).app, name="dispute")

if __name__ == "__main__":
    from sogni_protocol.cli_errors import main

    main(app, prog_name="sogni-node")
