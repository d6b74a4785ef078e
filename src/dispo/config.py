"""Typed configuration from one TOML file, with environment overrides for the two paths.

Lookup order for the file: --config FILE, then $DISPO_CONFIG, then /etc/dispo/dispo.toml (optional).
$DISPO_WORKSPACE and $DISPO_STATE_DIR override the paths from any file, so tests can use a scratch btrfs;
$DISPO_STORAGE_POOL overrides [storage] pool.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
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
    if typ is Path:
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{where}: key '{key}' must be an absolute path, got {value!r}")
        return Path(value)
    if isinstance(typ, type) and issubclass(typ, StrEnum):
        try:
            return typ(value)
        except ValueError:
            choices = ", ".join(m.value for m in typ)
            raise ConfigError(f"{where}: key '{key}' is {value!r}, expected one of: {choices}") from None
    if typ is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
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
    overrides: dict[str, Any] = {}
    for key, var in (("workspace", "DISPO_WORKSPACE"), ("state_dir", "DISPO_STATE_DIR")):
        if env.get(var):
            overrides[key] = _convert(env[var], Path, key, f"${var}")
    if env.get("DISPO_STORAGE_POOL"):  # tests and one-off runs on a scratch workspace: "none" makes no pool
        pool = _convert(env["DISPO_STORAGE_POOL"], StoragePool, "storage.pool", "$DISPO_STORAGE_POOL")
        overrides["storage"] = dataclasses.replace(cfg.storage, pool=pool)
    return dataclasses.replace(cfg, source=source, **overrides)
