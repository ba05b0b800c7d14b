"""Decide whether the worker may connect to an IP address: CIDR deny and allow lists.

Rule: among the entries whose range holds the address, the one with the longest prefix
decides; at equal prefix length an allow entry beats a deny entry. An address no entry holds
is allowed. IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are checked as their IPv4 form, and
entries written in that form are stored as IPv4 ranges, so no rule can be dodged by spelling.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, NamedTuple

from .errors import ConfigError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Link-local ranges hold the cloud metadata services (169.254.169.254, fd00:ec2::254 on AWS).
DEFAULT_DENY = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")
# Ranges that reach this host or a private network, denied with --deny-private.
PRIVATE_DENY = (
    "0.0.0.0/8",        # "this network": Linux connects 0.0.0.0 to the local host
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",    # carrier-grade NAT, used for internal networks (RFC 6598)
    "127.0.0.0/8",      # loopback
    "198.18.0.0/15",    # benchmarking, found on internal networks (RFC 2544)
    "::/128",           # unspecified: Linux connects it to the local host
    "::1/128",          # loopback
    "fc00::/7",         # unique local (RFC 4193)
    "fec0::/10",        # deprecated site-local, still routed on some internal networks
)
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
# Decisions remembered per address text; a worker talks to few addresses, so this rarely fills.
_CACHE_ENTRIES = 4096
_SEPARATORS = re.compile(r"[\s,]+")


class Rule(NamedTuple):
    network: IpNetwork
    allow: bool
    # Where the entry came from, for the reason text: "default", "--deny-private", "--deny-cidr".
    origin: str


def parse_cidrs(flag: str, values: Iterable[str]) -> tuple[str, ...]:
    """Parse CIDRs (each value may hold several, comma- or space-separated); return them normalised."""
    return tuple(str(_parse_network(flag, text)) for value in values
                 for text in _SEPARATORS.split(value.strip()) if text)


def _parse_network(flag: str, text: str) -> IpNetwork:
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{flag} must be a CIDR range like 10.0.0.0/8 or fd00::/8, got {text!r}") from None
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        # ::ffff:a.b.c.d/N is the IPv4 range a.b.c.d/(N-96).
        return ipaddress.ip_network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network


class DestinationPolicy:
    """The deny and allow lists, ready to answer one question per new connection."""

    def __init__(self, deny_cidrs: Iterable[str] = (), allow_cidrs: Iterable[str] = (),
                 deny_private: bool = False):
        rules = [Rule(_parse_network("default", text), False, "default") for text in DEFAULT_DENY]
        if deny_private:
            rules += [Rule(_parse_network("--deny-private", text), False, "--deny-private")
                      for text in PRIVATE_DENY]
        rules += [Rule(_parse_network("--deny-cidr", text), False, "--deny-cidr") for text in deny_cidrs]
        rules += [Rule(_parse_network("--allow-cidr", text), True, "--allow-cidr") for text in allow_cidrs]
        # Longest prefix first, allow before deny at equal length: the first match decides.
        ordered = sorted(rules, key=lambda rule: (-rule.network.prefixlen, not rule.allow))
        self.rules = tuple(ordered)
        # Per IP version: (mask, network as int, rule) for a match with two integer operations.
        self._by_version: dict[int, tuple[tuple[int, int, Rule], ...]] = {
            version: tuple((int(rule.network.netmask), int(rule.network.network_address), rule)
                           for rule in ordered if rule.network.version == version)
            for version in (4, 6)
        }
        self._denials: dict[str, str | None] = {}

    def decide(self, address: str) -> Rule | None:
        """Return the entry that decides for an IP address, or None when no entry holds it."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        for mask, network, rule in self._by_version[ip.version]:
            if value & mask == network:
                return rule
        return None

    def denial(self, address: str) -> str | None:
        """Return why connecting to address is denied, or None when it is allowed."""
        try:
            return self._denials[address]
        except KeyError:
            pass
        rule = self.decide(address)
        reason = None if rule is None or rule.allow else f"{address} is in {rule.network} ({_ORIGIN_TEXT[rule.origin]})"
        if len(self._denials) >= _CACHE_ENTRIES:
            self._denials.clear()
        self._denials[address] = reason
        return reason


_ORIGIN_TEXT = {
    "default": "denied by default; allow with --allow-cidr",
    "--deny-private": "denied by --deny-private; allow with --allow-cidr",
    "--deny-cidr": "denied by --deny-cidr",
}


def denial_message(reasons: Iterable[str]) -> str:
    """The error_msg of a request whose every address was denied."""
    return "Destination denied by policy: " + "; ".join(reasons)
