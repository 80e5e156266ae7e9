"""SSRF guard for user-supplied SMTP hosts: resolve once, refuse non-public addresses, pin IP."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# One text for every refused address, so that answers do not map the internal network.
REFUSED_TEXT = "SMTP host is not allowed"

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_EXTRA_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "fec0::/10",  # deprecated site-local, reported global by ipaddress
        "100.64.0.0/10",  # carrier-grade NAT
        "0.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata
        "fe80::/10",
        "ff00::/8",
        "2001:db8::/32",
    )
)


class HostRefused(Exception):
    """The host resolves to an address that this service will not connect to."""

    def __init__(self) -> None:
        super().__init__(REFUSED_TEXT)


class HostUnresolved(Exception):
    """The host name does not resolve."""


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address carried inside an IPv6 one (mapped, compatible, 6to4, Teredo, NAT64)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible ::a.b.c.d (deprecated)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True only for a globally routable unicast address, looking through IPv6 wrappers."""
    if any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version):
        return False
    inner = embedded_ipv4(ip)
    if inner is not None:  # the wrapper's own flags say nothing of where packets end up
        return is_public(inner)
    return bool(
        ip.is_global
        and not ip.is_multicast
        and not ip.is_reserved
        and not ip.is_unspecified
        and not ip.is_loopback
        and not ip.is_link_local
        and not ip.is_private
    )


@dataclass(frozen=True)
class HostGuard:
    """Decides which address to dial for a host; allowlisted names and CIDRs skip the check.

    dev_catcher: the development mail catcher's (loopback IP, port) while `make run` runs it
    (DEV_MAIL_CATCHER), else None; exactly that address and port is allowed, nothing else on
    loopback.
    """

    allowlist: tuple[str, ...] = ()
    dev_catcher: tuple[str, int] | None = None

    def _allowed(self, host: str, ip: IPAddress) -> bool:
        for entry in self.allowlist:
            if "/" in entry:
                net = ipaddress.ip_network(entry, strict=False)
                if ip.version == net.version and ip in net:
                    return True
            elif entry == host.lower().rstrip("."):
                return True
        return False

    def _is_dev_catcher(self, ip: IPAddress, port: int) -> bool:
        if self.dev_catcher is None:
            return False
        host, catcher_port = self.dev_catcher
        return port == catcher_port and ip == ipaddress.ip_address(host)

    def resolve(self, host: str, port: int, *, trusted: bool = False) -> str:
        """Resolve once and return the IP to connect to; raise HostRefused or HostUnresolved.

        Every address the name resolves to must be allowed: a name with one public and one
        private address is refused, so that a later resolution cannot pick the private one.
        """
        return self.addresses(host, port, trusted=trusted)[0]

    def addresses(self, host: str, port: int, *, trusted: bool = False) -> list[str]:
        """Resolve once and return every IP to try, in the resolver's order, without repeats
        (a name whose first answer is unreachable, often an IPv6 one, still connects through
        the next); each one checked as resolve() checks them. Raises HostRefused or
        HostUnresolved."""
        if host.startswith("[") and host.endswith("]"):  # a URL-style IPv6 literal
            host = host[1:-1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, ValueError):
            raise HostUnresolved(f"DNS lookup failed for {host}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses:
            raise HostUnresolved(f"DNS lookup failed for {host}")
        if not trusted:
            for ip in addresses:
                if not (
                    is_public(ip) or self._allowed(host, ip) or self._is_dev_catcher(ip, port)
                ):
                    raise HostRefused()
        return list(dict.fromkeys(str(ip) for ip in addresses))

    def check(self, host: str, port: int) -> None:
        """Refuse a host whose resolved addresses are not allowed; a name that does not resolve
        now passes (it is resolved and checked again before every connection)."""
        try:
            self.resolve(host, port)
        except HostUnresolved:
            pass
