"""Typed configuration from one TOML file, with environment overrides for the two paths.

Lookup order for the file: --config FILE, then $DISPO_CONFIG, then /etc/dispo/dispo.toml (optional).
$DISPO_WORKSPACE and $DISPO_STATE_DIR override the paths from any file, so tests can use a scratch btrfs;
$DISPO_STORAGE_POOL overrides [storage] pool.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dispo.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/dispo/dispo.toml")


class StorageBackend(StrEnum):
    AUTO = "auto"
    BTRFS = "btrfs"
    REFLINK = "reflink"
    COPY = "copy"


class StoragePool(StrEnum):
    # A workspace that can neither snapshot nor reflink (ext4) gets a sparse, loop-mounted btrfs file of its own
    # (storage/pool.py), so session disks are snapshots there too. "none": keep copying (slow for big images).
    LOOP_BTRFS = "loop-btrfs"
    NONE = "none"


@dataclass(frozen=True)
class StorageConfig:
    # auto probes the workspace: btrfs subvolume snapshots, else reflinks, else (with pool) a btrfs pool, else copies.
    backend: StorageBackend = StorageBackend.AUTO
    pool: StoragePool = StoragePool.LOOP_BTRFS


class JailMode(StrEnum):
    AUTO = "auto"  # jail when a jailer of the same version as the firecracker binary is found
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class FirecrackerConfig:
    # Empty strings mean: $DISPO_FIRECRACKER / $DISPO_JAILER / $DISPO_JAILER_FIRECRACKER, then PATH.
    binary: str = ""
    jailer: str = ""
    jailer_firecracker: str = ""  # the firecracker the jailer runs; must be the jailer's version
    jail: JailMode = JailMode.AUTO
    # 0: each session's jailed firecracker gets a uid/gid of its own (vmm/sandbox.py); else this fixed one.
    jail_uid: int = 0
    jail_gid: int = 0
    release_url: str = ("https://github.com/firecracker-microvm/firecracker/releases/download/"
                        "v{version}/firecracker-v{version}-{arch}.tgz")
    artifacts_url: str = "https://s3.amazonaws.com/spec.ccfc.min"


class NetLink(StrEnum):
    TAP = "tap"  # the real thing: a tap device a VMM attaches to
    # Test/bench only: a veth pair named like the tap whose far end sits in a "dispo-vmstandin-<id>" netns,
    # standing in for a VM (a tap with no reader cannot pass traffic). Same addresses, rules and journal.
    VETH_STANDIN = "veth-standin"


@dataclass(frozen=True)
class NetConfig:
    pool: str = "172.20.0.0/16"  # cut into one subnet per session
    prefix: int = 30  # size of a session's subnet: /30 (gateway + guest) up to /24
    upstream: str = ""  # interface to masquerade out of; empty: the interface of the default route
    dns: str = "auto"  # "auto" (non-loopback resolvers of /etc/resolv.conf), "none", or "1.1.1.1,9.9.9.9"
    link: NetLink = NetLink.TAP


@dataclass(frozen=True)
class ServiceConfig:
    """dispod, the long-running service (daemon/, web/)."""

    max_sessions: int = 4  # live sessions at once; POST /v1/sessions answers 429 past it
    listen: str = ""  # "HOST:PORT" for TCP (bearer token); "" = the root-only unix socket alone
    max_connections: int = 64  # open connections per listener (TCP: half for those without a token yet)
    header_timeout_s: int = 10  # a client must send a request's headers (and a JSON body) within this
    # An upload's or clipboard text's body must arrive within body_timeout_s, plus a second for each
    # body_min_kib_s KiB it brought: a client that trickles is cut off (408), a fast one never is.
    body_timeout_s: int = 30
    body_min_kib_s: int = 64
    # The warm pool (runtime/pool.py): "NAME=COUNT,..." guests of each template kept restored and paused, and
    # the memory they may hold together (0: a quarter of the host's memory).
    pool: str = ""
    pool_memory_mib: int = 0
    # Pages that may embed a session's live view (its viewer page) in a frame: CSP frame-ancestors sources,
    # space-separated, e.g. "https://app.example.org 'self'". "" (the default): no page may (frame-ancestors
    # 'none'), and every other answer of dispod stays unframeable whatever this says.
    frame_ancestors: str = ""


@dataclass(frozen=True)
class RecordingsConfig:
    """Recorded sessions' videos (storage/recordings.py), kept in the workspace until removed or this old."""

    max_age_h: int = 168  # hours; 0: kept until 'dispo recording rm'


@dataclass(frozen=True)
class ClusterConfig:
    """Many hosts behind one address (dispo/cluster/, docs/scale-out.md): `dispod --ray ADDRESS` (a node) and
    `dispod --gateway --ray ADDRESS` (the gateway) read this."""

    node: str = ""  # this node's name in global session ids (NODE~ID); "": the host name
    # The per-cluster secret the gateway's requests to nodes carry (never a user's token): a root-only file
    # (mode 0600) with one token, the same on every node and the gateway. The gateway makes it when missing.
    secret_file: Path = Path("/etc/dispo/cluster.secret")


@dataclass(frozen=True)
class ClientConfig:
    """Where `dispo` finds dispod when it is not this host's own (a cluster's gateway); --dispod overrides."""

    dispod: str = ""  # "http://HOST:PORT" of a dispod or gateway on TCP; "": this host's unix socket
    token_file: Path | None = None  # its access token (that dispod's dispod.token); needed with dispod


def pool_targets(setting: str, where: str = "[service] pool") -> dict[str, int]:
    """"chromium=1,minimal=2" -> {"chromium": 1, "minimal": 2}."""
    targets: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in setting.split(","))):
        name, sep, count = part.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit() or int(count) > 64:
            raise ConfigError(f"{where}: {part!r} is not NAME=COUNT (COUNT 0 to 64)",
                              hint='e.g. pool = "chromium=1"')
        targets[name.strip()] = int(count)
    return targets


@dataclass(frozen=True)
class Config:
    workspace: Path = Path("/var/lib/dispo")
    state_dir: Path = Path("/run/dispo")
    profiles_dir: Path = Path("/etc/dispo/profiles")  # NAME.toml here overrides the built-in profile NAME
    storage: StorageConfig = field(default_factory=StorageConfig)
    firecracker: FirecrackerConfig = field(default_factory=FirecrackerConfig)
    net: NetConfig = field(default_factory=NetConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    recordings: RecordingsConfig = field(default_factory=RecordingsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    source: str = "built-in defaults"

    @property
    def images_dir(self) -> Path:
        return self.workspace / "images"

    @property
    def disks_dir(self) -> Path:
        return self.workspace / "sessions"


def _convert(value: Any, typ: Any, key: str, where: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{key}] must be a table, not {type(value).__name__}")
        return _build(typ, value, f"{key}.", where)
    if typ is Path or typ == Path | None:
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{where}: key '{key}' must be an absolute path, got {show(value)}")
        return Path(value)
    if isinstance(typ, type) and issubclass(typ, StrEnum):
        try:
            return typ(value)
        except ValueError:
            choices = ", ".join(m.value for m in typ)
            raise ConfigError(f"{where}: key '{key}' is {show(value)}, expected one of: {choices}") from None
    if typ is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: key '{key}' must be an integer, got {show(value)}")
    if typ is str and not isinstance(value, str):
        raise ConfigError(f"{where}: key '{key}' must be a string, got {show(value)}")
    return value


def _build(cls: Any, data: Mapping[str, Any], prefix: str, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(prefix + k for k in fields)
            raise ConfigError(f"{where}: unknown key '{prefix}{key}' (known keys: {known})")
        kwargs[key] = _convert(value, _resolve_type(cls, fields[key]), prefix + key, where)
    return cls(**kwargs)


def _resolve_type(cls: Any, f: dataclasses.Field[Any]) -> Any:
    import typing

    return typing.get_type_hints(cls)[f.name]


# -- values: every key's allowed values, checked once at load, for every command ------------------------------
# A check returns None for a good value, else what is allowed (the error names the key and the value).
Check = Callable[[Any, "Config"], "str | None"]
MAX_ID = 2**32 - 2  # the largest uid/gid (2**32 - 1 is "no id")
IFNAMSIZ = 15


def _in_range(low: int, high: int, what: str = "") -> Check:
    def check(value: Any, _cfg: Config) -> str | None:
        return None if low <= value <= high else f"a whole number from {low} to {high}{what}"
    return check


def _program(value: Any, _cfg: Config) -> str | None:
    return None if value == "" or value.startswith("/") else '"" (find it) or an absolute path to the binary'


def _jail_id(value: Any, _cfg: Config) -> str | None:
    return None if 0 <= value <= MAX_ID else f"0 (a uid/gid of its own per session) or an id from 1 to {MAX_ID}"


def _url(value: Any, _cfg: Config, fields: tuple[str, ...] = ()) -> str | None:
    allowed = "an http:// or https:// URL" + (f" that may use {{{'}, {'.join(fields)}}}" if fields else "")
    if not value.startswith(("https://", "http://")) or any(c.isspace() for c in value):
        return allowed
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError:
        return allowed
    return allowed if used - set(fields) else None


def _release_url(value: Any, cfg: Config) -> str | None:
    return _url(value, cfg, ("version", "arch"))


def _pool(value: Any, cfg: Config) -> str | None:
    try:
        network = ipaddress.IPv4Network(value, strict=True)
    except ValueError:
        return "an IPv4 network in CIDR form with no host bits set, e.g. 172.20.0.0/16"
    prefix = cfg.net.prefix
    if _prefix(prefix, cfg) is None and network.prefixlen > prefix:
        return f"a network of /{prefix} or larger (this one is too small for one /{prefix} session subnet)"
    return None


def _prefix(value: Any, _cfg: Config) -> str | None:
    return None if 24 <= value <= 30 else "a per-session subnet size from 24 to 30"


def _upstream(value: Any, _cfg: Config) -> str | None:
    if value == "":
        return None
    if value == "lo":
        return ('the interface that leads out of this host, e.g. "eth0" (loopback carries nothing out), '
                'or "" for the interface of the default route')
    if len(value) > IFNAMSIZ or any(c in value for c in '/:"\\') or any(c.isspace() or not c.isprintable()
                                                                      for c in value):
        return f'an interface name (at most {IFNAMSIZ} characters, no "/", ":" or spaces), or ""'
    return None


def _dns(value: Any, _cfg: Config) -> str | None:
    allowed = '"auto", "none", or IPv4 addresses a guest can reach, comma-separated, e.g. "1.1.1.1,9.9.9.9"'
    if value in ("auto", "none"):
        return None
    for item in value.split(","):
        try:
            addr = ipaddress.IPv4Address(item.strip())
        except ValueError:
            return allowed
        if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
            return allowed
    return None


def _listen(value: Any, _cfg: Config) -> str | None:
    """Like dispod's --listen (web/server.py parse_listen): one IP address and a port; never a wildcard,
    since dispod checks the Host header against the one address it listens on (DNS rebinding)."""
    if value == "":
        return None
    allowed = '"" (the unix socket alone) or one address and port, e.g. "127.0.0.1:8686" (not a wildcard)'
    host, sep, port = value.strip().rpartition(":")
    host = "127.0.0.1" if host == "localhost" else host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        ok = bool(sep) and port.isdigit() and 0 <= int(port) <= 65535
    except ValueError:
        return allowed
    return None if ok and not ip.is_unspecified else allowed


NODE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def _node(value: Any, _cfg: Config) -> str | None:
    return None if value == "" or NODE_NAME.fullmatch(value) else \
        '"" (the host name) or up to 32 of a-z, 0-9 and "-", starting with a letter or digit'


def _client_url(value: Any, _cfg: Config) -> str | None:
    if value == "" or re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+/?", value):
        return None
    return '"" (this host\'s dispod) or a base URL, e.g. "http://10.0.0.1:8686"'


def _pool_targets(value: Any, _cfg: Config) -> str | None:
    try:
        pool_targets(value)
    except ConfigError:
        return '"" or NAME=COUNT pairs with COUNT 0 to 64, comma-separated, e.g. "chromium=1,minimal=2"'
    return None


_FRAME_SOURCE = re.compile(r"^https?://(\*\.)?[A-Za-z0-9.-]+(:([0-9]{1,5}|\*))?$")


def _frame_ancestors(value: Any, _cfg: Config) -> str | None:
    """CSP host sources with a scheme (an origin: "https://app.example.org", "https://*.example.org:8443") or
    'self'; nothing that lets any page embed the view ("*", "https:") or ends the directive (";", ",")."""
    if value == "":
        return None
    sources = value.split()
    if sources and all(s == "'self'" or _FRAME_SOURCE.match(s) for s in sources):
        return None
    return ('"" (no page may embed a live view) or origins and \'self\', space-separated, e.g. '
            '"https://app.example.org \'self\'" (not "*" or a bare scheme: that lets any site frame it)')


CHECKS: dict[str, Check] = {
    "firecracker.binary": _program,
    "firecracker.jailer": _program,
    "firecracker.jailer_firecracker": _program,
    "firecracker.jail_uid": _jail_id,
    "firecracker.jail_gid": _jail_id,
    "firecracker.release_url": _release_url,
    "firecracker.artifacts_url": _url,
    "net.pool": _pool,
    "net.prefix": _prefix,
    "net.upstream": _upstream,
    "net.dns": _dns,
    "service.max_sessions": _in_range(1, 100_000),
    "service.max_connections": _in_range(1, 100_000),
    "service.header_timeout_s": _in_range(1, 100_000, " (seconds)"),
    "service.body_timeout_s": _in_range(1, 100_000, " (seconds)"),
    "service.body_min_kib_s": _in_range(1, 1 << 30, " (KiB a second)"),
    "service.listen": _listen,
    "service.pool": _pool_targets,
    "service.pool_memory_mib": _in_range(0, 1 << 30, " (0: a quarter of the host's memory)"),
    "service.frame_ancestors": _frame_ancestors,
    "cluster.node": _node,
    "client.dispod": _client_url,
    "recordings.max_age_h": _in_range(0, 100 * 365 * 24, " (hours; 0: kept until 'dispo recording rm')"),
}


def show(value: Any) -> str:
    """A value as a person wrote it (TOML and JSON alike: "text", 5, true), never a Python repr (True, None)."""
    return json.dumps(value, default=str, ensure_ascii=False)


def check_values(cfg: Config, where: str) -> None:
    """Every key's value against what it allows; the first bad one is a one-line ConfigError."""
    for key, check in CHECKS.items():
        table, _, name = key.partition(".")
        value = getattr(getattr(cfg, table), name)
        allowed = check(value, cfg)
        if allowed is not None:
            raise ConfigError(f"{where}: {key} = {show(value)} is not allowed; allowed: {allowed}",
                              hint=f"fix [{table}] {name} in {where}")


def load(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the config file (if any) and apply environment overrides."""
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("DISPO_CONFIG"))
    file = path or Path(env.get("DISPO_CONFIG") or DEFAULT_CONFIG_FILE)
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if file.exists() or explicit:
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist",
                              hint="create it or drop --config/DISPO_CONFIG") from None
        except PermissionError:
            raise ConfigError(f"config file {file} is not readable", hint="check its permissions") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid TOML: {e}") from None
        source = str(file)
    cfg: Config = _build(Config, data, "", str(file))
    check_values(cfg, str(file))
    overrides: dict[str, Any] = {}
    for key, var in (("workspace", "DISPO_WORKSPACE"), ("state_dir", "DISPO_STATE_DIR")):
        if env.get(var):
            overrides[key] = _convert(env[var], Path, key, f"${var}")
    if env.get("DISPO_STORAGE_POOL"):  # tests and one-off runs on a scratch workspace: "none" makes no pool
        pool = _convert(env["DISPO_STORAGE_POOL"], StoragePool, "storage.pool", "$DISPO_STORAGE_POOL")
        overrides["storage"] = dataclasses.replace(cfg.storage, pool=pool)
    return dataclasses.replace(cfg, source=source, **overrides)
