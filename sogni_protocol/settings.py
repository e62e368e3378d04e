"""Typed settings from a TOML text plus environment overrides, validated by msgspec.

Why one loader for every part: node and coordinator configs follow the same rules (a TOML
file, `PREFIX_<FIELD>` env vars that win over it, strict validation), and partner images
configure nodes by env alone, so env strings must become typed values the same way
everywhere. Errors name the offending key *and* where it came from (the file, or the env var),
because a config error the operator cannot locate is worse than none. `load_settings` is
pure (callers pass the text and the env mapping); `read_config_text` is the one small file read,
kept here so node and coordinator configs share it.
"""

from __future__ import annotations

import difflib
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta
from msgspec import inspect as mi

__all__ = [
    "DEFAULT_CHAIN_ID",
    "UNDEPLOYED_CONTRACT",
    "ChainId",
    "CoordinatorMultiaddr",
    "EnvName",
    "Multiaddr",
    "Seconds",
    "SettingsError",
    "check_listen_addr",
    "check_peer_addr",
    "check_peer_id",
    "env_names",
    "load_settings",
    "read_config_text",
    "settings_to_builtins",
    "unused_env",
]

S = TypeVar("S", bound=msgspec.Struct)

_PATTERN_MEANINGS: dict[str, str] = {
    "^0x[0-9a-fA-F]{40}$": "an Ethereum address (0x and 40 hex digits)",
    r"^[A-Za-z0-9._:-]+$": "letters, digits and . _ : - only",
    r"^[a-z0-9][a-z0-9._-]*$": "lower-case letters, digits and . _ - (first a letter or digit)",
}
"""What a field's regex asks for, in words: a config error says this, never the regex."""


def readable_pattern(field_type: object, meaning: str) -> None:
    """Register what `field_type`'s (an `Annotated` str with a `Meta(pattern=...)`) pattern
    means, for config errors (`load_settings`)."""
    for meta in getattr(field_type, "__metadata__", ()):
        if isinstance(meta, Meta) and meta.pattern is not None:
            _PATTERN_MEANINGS[meta.pattern] = meaning


def _in_words(text: str) -> str:
    """msgspec's "Expected `str` matching regex '...'" in words, when the regex is known."""
    m = re.fullmatch(r"Expected `str` matching regex '(.*)'", text)
    shown = m.group(1).replace("\\\\", "\\") if m else ""  # msgspec doubles backslashes
    meaning = _PATTERN_MEANINGS.get(shown)
    return f"expected {meaning}" if meaning else text


# Shared field types for the node and coordinator configs.
Multiaddr = Annotated[str, Meta(pattern=r"^(/[A-Za-z0-9_.:%-]+)+/?$", max_length=512)]
CoordinatorMultiaddr = Annotated[
    str, Meta(pattern=r"^(/[A-Za-z0-9_.:%-]+)+/p2p/[A-Za-z0-9]+$", max_length=512)
]
"""A dialable coordinator address that pins its peer id (`/p2p/...`), so Noise authenticates it."""
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
"""The name of an environment variable (e.g. the one holding a keystore password)."""
ChainId = Annotated[int, Meta(ge=1, le=2**63 - 1)]
ChainUrl = Annotated[str, Meta(pattern=r"^https?://\S+$", max_length=512)]
readable_pattern(Multiaddr, "a libp2p multiaddr such as /ip4/0.0.0.0/tcp/4001")
readable_pattern(
    CoordinatorMultiaddr,
    "a coordinator's multiaddr ending in its peer id, such as "
    "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW... (`sogni-coordinator start` prints it)",
)
readable_pattern(
    EnvName, "an environment variable's name (letters, digits and _, not first a digit)"
)
readable_pattern(ChainUrl, "an http:// or https:// URL such as http://127.0.0.1:8545")
Seconds = Annotated[float, Meta(gt=0, le=86_400)]


# --- addresses a daemon listens on or dials: checked in full when the config loads ----------
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_PEER_ID_LOOKS = "a peer id looks like 12D3KooW... (`sogni-coordinator start` prints it)"


def check_peer_id(text: str) -> None:
    """Raise ValueError (in words) unless `text` is a libp2p peer id.

    Why here and not at dial time: py-libp2p takes any base58 word for a peer id, and a node
    would then retry a coordinator that can never be authenticated. A peer id is the base58
    of a multihash: the identity hash of a small public key (Ed25519 `12D3KooW...`,
    secp256k1 `16Uiu2...`), or the sha2-256 of a larger one (`Qm...`)."""
    if not text or len(text) > 128 or any(c not in _BASE58 for c in text):
        raise ValueError(f"{text[:80]!r} is not a peer id: {_PEER_ID_LOOKS}")
    number = 0
    for c in text:
        number = number * 58 + _BASE58.index(c)
    zeros = len(text) - len(text.lstrip("1"))
    raw = b"\0" * zeros + number.to_bytes((number.bit_length() + 7) // 8, "big")
    if len(raw) == 34 and raw[:2] == b"\x12\x20":  # sha2-256, 32 bytes
        return
    key = raw[2:]
    if (  # identity multihash of a protobuf PublicKey {Type (varint), Data (bytes)}
        len(raw) >= 6
        and raw[0] == 0
        and raw[1] == len(key) <= 42
        and key[0] == 0x08
        and key[1] <= 3
        and key[2] == 0x12
        and key[3] == len(key) - 4
    ):
        return
    raise ValueError(f"{text[:80]!r} is not a peer id: {_PEER_ID_LOOKS}")


def _multiaddr(text: str) -> Any:
    """`multiaddr.Multiaddr(text)`, or ValueError saying what is wrong in it."""
    import multiaddr  # small, pure Python: no libp2p

    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:  # StringParseError, ValueError, BinaryParseError, ...
        why = str(exc).split(" (string: ")[0]
        why = re.sub(r"^Invalid MultiAddr '.*?': ", "", why)
        if "integer not in range" in why:
            why = "a port is 0-65535"
        raise ValueError(f"{text[:200]!r} is not a multiaddr: {why[:200]}") from None


def check_listen_addr(text: str) -> None:
    """Raise ValueError unless `text` is what a daemon can listen on: /ip4|ip6/<ip>/tcp/<port>
    (the host serves TCP only, and would crash on anything else at start)."""
    addr = _multiaddr(text)
    names = [proto.name for proto in addr.protocols()]
    if len(names) != 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
        raise ValueError(
            f"{text[:200]!r} cannot be listened on: a listen address is /ip4/<ip>/tcp/<port> "
            "or /ip6/<ip>/tcp/<port> (TCP only; port 0 picks a free port)"
        )


def check_peer_addr(text: str) -> None:
    """Raise ValueError unless `text` is a dialable peer address: an IP or DNS name, a TCP
    port, then /p2p/<a valid peer id>."""
    addr = _multiaddr(text)
    names = [proto.name for proto in addr.protocols()]
    if not names or names[-1] != "p2p":
        raise ValueError(f"{text[:200]!r} ends without /p2p/<peer id>")
    check_peer_id(str(addr.value_for_protocol("p2p")))
    if not any(n in ("ip4", "ip6", "dns", "dns4", "dns6") for n in names) or "tcp" not in names:
        raise ValueError(
            f"{text[:200]!r} has no IP (or DNS name) and TCP port to dial, such as "
            "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."
        )


DEFAULT_CHAIN_ID = 131277322940537
DEV_CHAIN_IDS = frozenset({31337, 1337, DEFAULT_CHAIN_ID})
"""Local development chains: anvil and hardhat (31337), ganache (1337), the embedded EVM.
Only on these may public dev keys sign."""
"""eth-tester / py-evm's chain id: the embedded local settlement chain is the default domain."""
READ_ONLY_SENDER = "0x" + "00" * 20
"""The default sender of contract wrappers a command only reads through (a chain connected
without keys: it signs with nobody's, least of all anvil's public dev keys)."""
UNDEPLOYED_CONTRACT = "0x" + "00" * 20
"""Verifying contract until the reward distributor is deployed (local runs only)."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_PATH_RE = re.compile(r"`\$((?:\.[A-Za-z0-9_]+|\[\d+\])*)`$")


class SettingsError(ValueError):
    """A config that cannot be used; the message names the key and its source.

    `todo` says what to do when "fix that key" (the CLI layer's default) would be wrong: a
    config file that is missing or not TOML has no key to fix."""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        source: str | None = None,
        todo: str | None = None,
    ):
        super().__init__(message)
        self.key = key
        self.source = source
        self.todo = todo


def _env_prefix(prefix: str) -> str:
    return prefix.rstrip("_").upper() + "_"


def _struct_info(cls: type[msgspec.Struct]) -> mi.StructType:
    info = mi.type_info(cls)
    if not isinstance(info, mi.StructType):  # pragma: no cover - guarded by the TypeVar
        raise TypeError(f"{cls!r} is not a msgspec Struct")
    return info


def _nested_struct(t: mi.Type) -> mi.StructType | None:
    """The Struct a field holds as a TOML table (`T` or `T | None`), if any."""
    if isinstance(t, mi.StructType):
        return t
    if isinstance(t, mi.UnionType):
        structs = [x for x in t.types if isinstance(x, mi.StructType)]
        if len(structs) == 1:
            return structs[0]
    return None


def env_names(cls: type[msgspec.Struct], prefix: str) -> dict[str, tuple[str, ...]]:
    """Every env var `cls` reads, mapped to the key path it sets (for docs and checks)."""
    out: dict[str, tuple[str, ...]] = {}

    def walk(info: mi.StructType, env_prefix: str, path: tuple[str, ...]) -> None:
        for f in info.fields:
            name = env_prefix + f.encode_name.upper()
            nested = _nested_struct(f.type)
            if nested is not None:
                walk(nested, name + "__", (*path, f.encode_name))
            else:
                out[name] = (*path, f.encode_name)

    walk(_struct_info(cls), _env_prefix(prefix), ())
    return out


def unused_env(
    cls: type[msgspec.Struct], env: Mapping[str, str], prefix: str, ignore: Iterable[str] = ()
) -> list[str]:
    """Env vars carrying the prefix that no field reads: likely typos, worth a warning.

    Not an error in `load_settings`, because the prefix is shared with other variables
    (the node's password variable is `SOGNI_NODE_PASSWORD` by default).
    """
    known = set(env_names(cls, prefix)) | set(ignore)
    p = _env_prefix(prefix)
    return sorted(k for k in env if k.startswith(p) and k not in known)


def _check_unknown(data: dict[str, Any], info: mi.StructType, path: str, out: list[str]) -> None:
    by_name = {f.encode_name: f for f in info.fields}
    for key, value in data.items():
        field = by_name.get(key)
        dotted = f"{path}{key}"
        if field is None:
            hint = difflib.get_close_matches(key, list(by_name), n=1)
            out.append(f"{dotted} (did you mean {path}{hint[0]}?)" if hint else dotted)
            continue
        nested = _nested_struct(field.type)
        if nested is not None and isinstance(value, dict):
            _check_unknown(value, nested, dotted + ".", out)


def _env_value(raw: str, t: mi.Type) -> Any:
    """Turn an env string into what msgspec (strict=False) converts to the field type."""
    if isinstance(t, mi.UnionType):
        if raw.strip() == "" and any(isinstance(x, mi.NoneType) for x in t.types):
            return None
        for x in t.types:
            if isinstance(x, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
                return _env_value(raw, x)
        if all(isinstance(x, (mi.BoolType, mi.NoneType)) for x in t.types):
            return _env_value(raw, mi.BoolType())
        return raw
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if isinstance(t, mi.BoolType):
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        return raw
    if isinstance(t, (mi.IntType, mi.FloatType)):
        return raw.strip()
    return raw


def _apply_env(
    data: dict[str, Any],
    info: mi.StructType,
    env: Mapping[str, str],
    env_prefix: str,
    path: tuple[str, ...],
    origin: dict[tuple[str, ...], str],
) -> None:
    for f in info.fields:
        name = env_prefix + f.encode_name.upper()
        nested = _nested_struct(f.type)
        if nested is not None:
            sub = data.get(f.encode_name)
            if not isinstance(sub, dict):
                sub = {}
            _apply_env(sub, nested, env, name + "__", (*path, f.encode_name), origin)
            if sub:
                data[f.encode_name] = sub
            continue
        if name in env:
            data[f.encode_name] = _env_value(env[name], f.type)
            origin[(*path, f.encode_name)] = name


def _dec_hook(tp: type, obj: Any) -> Any:
    """Paths from strings. Anything else is a ValueError, which msgspec reports as a
    validation error at the key (`data_dir = 5` names `data_dir`, not a traceback)."""
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(obj, str):
            return tp(obj).expanduser() if issubclass(tp, Path) else tp(obj)
        raise ValueError(f"Expected a path (a string), got `{type(obj).__name__}`")
    raise ValueError(f"Expected `{getattr(tp, '__name__', tp)}`, got `{type(obj).__name__}`")


def _choices(info: mi.StructType, keys: tuple[str, ...]) -> list[str]:
    """The values a `Literal`/`Enum` field at `keys` accepts (empty if it is not one)."""
    t: mi.Type = info
    for key in keys:
        struct = _nested_struct(t)
        field = next((f for f in struct.fields if f.encode_name == key), None) if struct else None
        if field is None:
            return []
        t = field.type
    for candidate in t.types if isinstance(t, mi.UnionType) else (t,):
        if isinstance(candidate, mi.LiteralType):
            return [str(v) for v in candidate.values]
        if isinstance(candidate, mi.EnumType):
            return [str(m.value) for m in candidate.cls]
    return []


def _with_choices(text: str, info: mi.StructType, keys: tuple[str, ...]) -> str:
    """msgspec's "Invalid enum value 'tpu'" with the values the key accepts."""
    if not text.startswith("Invalid enum value"):
        return text
    choices = _choices(info, keys)
    return f"{text}; expected one of: {', '.join(choices)}" if choices else text


_KEY_PREFIX = re.compile(r"^([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?(?:\[\d+\])?: ")


def _named_key(text: str, info: mi.StructType) -> tuple[str, ...]:
    """The key a cross-field check (`__post_init__`) names first ("listen: ..."), if any."""
    m = _KEY_PREFIX.match(text)
    if m is None:
        return ()
    keys = tuple(k for k in m.groups() if k)
    by_name = {f.encode_name: f for f in info.fields}
    field = by_name.get(keys[0])
    if field is None:
        return ()
    nested = _nested_struct(field.type)
    if len(keys) == 2 and (nested is None or keys[1] not in {f.encode_name for f in nested.fields}):
        return keys[:1]
    return keys


def _split_error(message: str) -> tuple[tuple[str, ...], str]:
    """msgspec's "Expected `int` >= 1 - at `$.a.b[2]`" -> (("a", "b"), "Expected `int` >= 1")."""
    text, sep, where = message.rpartition(" - at ")
    if not sep:
        return (), message
    m = _PATH_RE.search(where)
    if m is None:
        return (), message
    keys = tuple(re.findall(r"\.([A-Za-z0-9_]+)", m.group(1)))
    return keys, text


def load_settings(
    cls: type[S],
    toml_text: str | None,
    env: Mapping[str, str],
    prefix: str,
    *,
    source: str | None = None,
) -> S:
    """Build `cls` from TOML text (may be None: defaults only), overridden by `PREFIX_*` env.

    `source` names the file in error messages. Env vars: `PREFIX_<FIELD>` for top-level keys,
    `PREFIX_<TABLE>__<FIELD>` inside a table; lists are comma-separated; an empty value sets an
    optional field to None. Unknown keys in the TOML are an error; unknown env vars are not
    (see `unused_env`).
    """
    where = source or "<config>"
    info = _struct_info(cls)
    data: dict[str, Any] = {}
    if toml_text is not None:
        try:
            data = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(
                f"{where}: not valid TOML: {exc}",
                source=where,
                todo="fix the TOML syntax at that line",
            ) from None
    unknown: list[str] = []
    _check_unknown(data, info, "", unknown)
    if unknown:
        raise SettingsError(
            f"{where}: unknown setting{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            key=unknown[0].split(" ")[0],
            source=where,
        )
    origin: dict[tuple[str, ...], str] = {}
    _apply_env(data, info, env, _env_prefix(prefix), (), origin)
    try:
        loaded = msgspec.convert(data, cls, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        keys, text = _split_error(str(exc))
        text = _with_choices(_in_words(text), info, keys)
        env_name = _origin_of(keys, origin)
        if env_name is not None:
            raise SettingsError(f"{env_name}: {text}", key=env_name, source="environment") from None
        if keys:
            key = ".".join(keys)
            raise SettingsError(f"{key}: {text} (in {where})", key=key, source=where) from None
        # A check across fields (__post_init__): say where the values came from, those of
        # the key it names first when it names one ("listen: ...").
        named = _named_key(text, info)
        if named:
            env_name = _origin_of(named, origin)
            key = ".".join(named)
            if env_name is not None:
                raise SettingsError(
                    f"{text} (env {env_name})", key=key, source="environment"
                ) from None
            if named[0] in data:  # set in the file (env values were found above)
                raise SettingsError(f"{text} (in {where})", key=key, source=where) from None
            if not origin and toml_text is None:  # a default, or a struct built in code
                raise SettingsError(text, key=key) from None
        parts = [f"in {where}"] if toml_text is not None else []
        if origin:
            parts.append("env " + ", ".join(sorted(origin.values())))
        suffix = f" ({'; '.join(parts)})" if parts else ""
        raise SettingsError(
            f"{text}{suffix}", source=where if toml_text is not None else None
        ) from None
    _warn_unused_env(loaded, env, prefix)
    return loaded


_warned: set[str] = set()


def _warn_unused_env(settings: msgspec.Struct, env: Mapping[str, str], prefix: str) -> None:
    """One line on stderr per `PREFIX_*` variable no setting reads (a typo, most likely),
    with the closest known name; never an error. Variables the settings name as theirs (a
    password variable, `*_env` fields) and `PREFIX_CONFIG` are known."""
    named = {
        v
        for k, v in msgspec.structs.asdict(settings).items()
        if k.endswith("_env") and isinstance(v, str)
    }
    ignore = named | {_env_prefix(prefix) + "CONFIG"}
    known = sorted(set(env_names(type(settings), prefix)) | ignore)
    for name in unused_env(type(settings), env, prefix, ignore):
        if name in _warned:
            continue
        _warned.add(name)
        hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        did = f"; did you mean {hint[0]}?" if hint else ""
        sys.stderr.write(f"warning: {name} is not a setting and is ignored{did}\n")


def _origin_of(keys: tuple[str, ...], origin: dict[tuple[str, ...], str]) -> str | None:
    for n in range(len(keys), 0, -1):
        if keys[:n] in origin:
            return origin[keys[:n]]
    return None


def read_config_text(
    path: Path | None, env: Mapping[str, str], config_env: str
) -> tuple[str | None, str | None]:
    """The TOML text and its name: `path`, else the file named by `$config_env`, else none."""
    if path is None:
        named = env.get(config_env, "").strip()
        if not named:
            return None, None
        path = Path(named)
    path = path.expanduser()
    todo = f"check the path given with --config or in {config_env}"
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} not found", source=str(path), todo=todo) from None
    except UnicodeDecodeError:
        raise SettingsError(
            f"config file {path} is not text (UTF-8)", source=str(path), todo=todo
        ) from None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise SettingsError(
            f"cannot read config file {path}: {why}", source=str(path), todo=todo
        ) from None


def settings_to_builtins(value: msgspec.Struct) -> dict[str, Any]:
    """Builtins for printing an effective config (Paths as strings, None dropped)."""
    raw = msgspec.to_builtins(value, enc_hook=_enc_hook)
    return _drop_none(raw) if isinstance(raw, dict) else {}


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, PurePath):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def check_heartbeats(interval: float, timeout: float) -> None:
    """A timeout at or below the interval would drop every healthy peer between two beats."""
    if timeout <= interval:
        raise ValueError(
            f"heartbeat_timeout ({timeout:g} s) must be greater than "
            f"heartbeat_interval ({interval:g} s)"
        )


def fill_path(settings: msgspec.Struct, name: str, default: Path) -> Path:
    """Set a path field left empty to `default`, `~` expanded, on a frozen settings struct.

    Derived defaults are filled in `__post_init__` (not in the loader) so that a struct built
    in code behaves exactly like a loaded one.
    """
    value = getattr(settings, name)
    path = Path(value if value is not None else default).expanduser()
    msgspec.structs.force_setattr(settings, name, path)
    return path
