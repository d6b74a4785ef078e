"""What a session's guest may reach: the egress policy, parsed and validated before anything is created.

Default: the public internet through NAT, nothing else. Always refused whatever the policy says: other
sessions (the whole address pool) and the host itself (handled by the input chain, see firewall.py).
Order of evaluation: deny, then the resolvers (port 53 only), then allow, then the private ranges
(refused), then the internet (if `internet`), then refuse.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispo.errors import InvalidInput

# Ranges a guest must not reach unless a policy allows them: RFC 1918, CGNAT, loopback, link-local,
# "this network", IETF protocol assignments, benchmarking, multicast and reserved (incl. broadcast).
PRIVATE_RANGES: tuple[ipaddress.IPv4Network, ...] = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)

_POLICY_HINT = 'e.g. internet = true, allow = ["192.168.1.0/24"], deny = ["203.0.113.0/24"]'
_CIDR_HINT = "write IPv4 networks in CIDR form with no host bits set, e.g. 192.168.1.0/24 or 203.0.113.7/32"


def parse_network(text: object, *, where: str) -> ipaddress.IPv4Network:
    if not isinstance(text, str):
        raise InvalidInput(f"{where}: {text!r} is not a network", hint=_CIDR_HINT)
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        raise InvalidInput(f"{where}: invalid network {text!r}: {e}", hint=_CIDR_HINT) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise InvalidInput(f"{where}: {text!r} is IPv6; guests only have IPv4", hint=_CIDR_HINT)
    return net


@dataclass(frozen=True)
class NetworkPolicy:
    internet: bool = True  # the public internet through NAT
    allow: tuple[ipaddress.IPv4Network, ...] = ()  # also reachable, even if private (e.g. a LAN printer)
    deny: tuple[ipaddress.IPv4Network, ...] = ()  # never reachable; wins over allow and internet

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "policy") -> NetworkPolicy:
        known = ("internet", "allow", "deny")
        for key in data:
            if key not in known:
                raise InvalidInput(f"{where}: unknown key {key!r}", hint=f"known keys: {', '.join(known)}")
        internet = data.get("internet", True)
        if not isinstance(internet, bool):
            raise InvalidInput(f"{where}: 'internet' must be true or false, got {internet!r}",
                               hint="write internet = true or internet = false")
        lists: dict[str, tuple[ipaddress.IPv4Network, ...]] = {}
        for key in ("allow", "deny"):
            items = data.get(key, [])
            if not isinstance(items, list):
                raise InvalidInput(f"{where}: '{key}' must be a list of networks", hint=_CIDR_HINT)
            lists[key] = tuple(parse_network(x, where=f"{where}: {key}") for x in items)
        return cls(internet=internet, allow=lists["allow"], deny=lists["deny"])

    @classmethod
    def load(cls, path: Path) -> NetworkPolicy:
        """A policy file: TOML with `internet = true`, `allow = [...]`, `deny = [...]`."""
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidInput(f"policy file {path} does not exist",
                               hint="give the path of a TOML policy file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInput(f"policy file {path} is not readable: {e}", hint="check its permissions") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidInput(f"{path}: not valid TOML: {e}", hint=_POLICY_HINT) from None
        return cls.from_mapping(data, where=str(path))

