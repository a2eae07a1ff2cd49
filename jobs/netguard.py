"""Which network addresses dreambatch may reach on a user's behalf (image URLs, webhooks).

Every hostname is resolved first and *every* address it resolves to is checked: private, loopback,
link-local (cloud metadata at 169.254.169.254), CGNAT, multicast, reserved and unspecified ranges,
and IPv4 hidden inside IPv6 (mapped, 6to4, Teredo) are refused unless the operator allow-list
`DREAMBATCH_ALLOW_PRIVATE_HOSTS` (hostnames or CIDRs) names them. The connection then goes to the
checked address itself (Host header and TLS SNI keep the name), so a second DNS answer cannot swap
in another address; redirects are followed by hand and each hop is checked the same way.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from jobs.errors import InputError, TransientError

Resolver = Callable[[str, int], list[str]]  # (host, port) → IP address strings
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

EXTRA_BLOCKED = [
    ipaddress.ip_network(n)
    for n in (
        "100.64.0.0/10",  # carrier-grade NAT
        "192.0.0.0/24",
        "198.18.0.0/15",  # IETF protocol assignments, benchmarking
        "fd00:ec2::/32",  # AWS IPv6 metadata
    )
]


class BlockedAddress(InputError):
    """A URL points at an address dreambatch refuses to reach."""


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransientError(f"cannot resolve {host!r}: {exc}; check the host name and this machine's DNS") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Policy:
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    resolver: Resolver = system_resolver

    @classmethod
    def from_setting(cls, value: str | Iterable[str] | None, resolver: Resolver = system_resolver) -> Policy:
        entries = [e.strip() for e in (value.split(",") if isinstance(value, str) else value or []) if e.strip()]
        hosts, nets = set(), []
        for entry in entries:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(nets), resolver)

    def allows(self, ip: IP) -> bool:
        return any(ip in net for net in self.allow_networks if net.version == ip.version)


def embedded_ipv4(ip: IP) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
    return None


def is_public(ip: IP) -> bool:
    inner = embedded_ipv4(ip)
    if inner is not None and not is_public(inner):
        return False
    if any(ip in net for net in EXTRA_BLOCKED if net.version == ip.version):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_link_local)


def check_url(url: str, policy: Policy, *, schemes: tuple[str, ...] = ("https", "http")) -> tuple[str, int, str]:
    """Resolve a URL's host and check every address. Returns (host, port, address to connect to)."""
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise BlockedAddress(f"{url!r}: scheme must be one of {', '.join(schemes)}")
    if not parts.hostname:
        raise BlockedAddress(f"{url!r}: no host")
    if parts.username or parts.password:
        raise BlockedAddress(f"{url!r}: credentials in URLs are not accepted")
    host = parts.hostname.lower().rstrip(".")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise BlockedAddress(f"{url!r}: bad port") from None
    addresses = _addresses(host, port, policy)
    if not addresses:
        raise TransientError(f"{host!r} resolved to no address")
    named = host in policy.allow_hosts
    for ip in addresses:
        if not (named or policy.allows(ip) or is_public(ip)):
            raise BlockedAddress(
                f"{url!r}: {host} resolves to {ip}, a private/loopback/link-local/reserved address; "
                "allow it with DREAMBATCH_ALLOW_PRIVATE_HOSTS if it is yours"
            )
    return host, port, str(addresses[0])


def _addresses(host: str, port: int, policy: Policy) -> list[IP]:
    try:
        return [ipaddress.ip_address(host)]  # a literal, in any spelling inet_aton would not reach
    except ValueError:
        pass
    if host.replace(".", "").isdigit() or host.startswith("0x"):
        # decimal/hex/octal shorthands (2130706433, 0x7f.1): what the C resolver would make of them
        try:
            return [ipaddress.ip_address(socket.inet_aton(host))]
        except OSError:
            raise BlockedAddress(f"{host!r} is not a valid address") from None
    return [ipaddress.ip_address(a.split("%", 1)[0]) for a in policy.resolver(host, port)]


@contextmanager
def pinned_request(client, method: str, url: str, policy: Policy, **kwargs) -> Iterator[Any]:
    """Send one request to the checked address of `url`'s host (no redirects), as an open stream. A
    GuardedClient (jobs.netclient) connects to that address itself; another client is sent to the address in
    the URL, with the Host header and TLS server name keeping the original name."""
    from jobs import netclient

    host, port, address = check_url(url, policy)
    if isinstance(client, netclient.GuardedClient):
        with (
            netclient.pinned(host, port, address),
            client.stream(method, url, follow_redirects=False, **kwargs) as resp,
        ):
            yield resp
        return
    parts = urlsplit(url)
    netloc = f"[{address}]" if ":" in address else address
    target = parts._replace(netloc=f"{netloc}:{port}").geturl()
    headers = {**kwargs.pop("headers", {}), "host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    with client.stream(
        method, target, headers=headers, extensions=extensions, follow_redirects=False, **kwargs
    ) as resp:
        yield resp


@contextmanager
def _checked_response(client, method: str, url: str, policy: Policy, max_redirects: int, timeout: float):
    """(final URL, response) at the end of `url`'s redirects, every hop's address checked: a 200, else
    InputError (4xx, too many redirects) or TransientError (5xx, 429)."""
    for _ in range(max_redirects + 1):
        with pinned_request(client, method, url, policy, timeout=timeout) as resp:
            if resp.is_redirect:
                url = urljoin(url, resp.headers.get("location", ""))
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                raise TransientError(f"{url}: HTTP {resp.status_code}")
            if resp.status_code != 200:
                raise InputError(f"{url}: HTTP {resp.status_code}")
            yield url, resp
            return
    raise InputError(f"{url}: more than {max_redirects} redirects")


def head(url: str, policy: Policy, *, timeout: float, max_redirects: int = 5, client=None) -> dict[str, str]:
    """HEAD a URL with every hop checked, as `fetch` does, within `timeout` seconds in all; returns the final
    response's headers (lower-case names). InputError for a refused address or a 4xx, TransientError for a
    network error or a 5xx. `client`: this process's pooled GuardedClient unless given."""
    import httpx

    from jobs import netclient

    client = client or netclient.shared()
    try:
        with netclient.deadline(timeout), _checked_response(client, "HEAD", url, policy, max_redirects, timeout) as hop:
            return {k.lower(): v for k, v in hop[1].headers.items()}
    except httpx.HTTPError as exc:
        raise TransientError(f"{url}: {type(exc).__name__}: {exc}") from None


def fetch(url: str, policy: Policy, *, max_bytes: int, timeout: float, max_redirects: int = 5, client=None) -> bytes:
    """GET a URL with every hop checked, at most `max_bytes`, within `timeout` seconds in all: connecting, the
    headers (however slowly they come) and the body. `client`: this process's pooled GuardedClient unless given."""
    import time

    import httpx

    from jobs import netclient

    deadline = time.monotonic() + timeout
    client = client or netclient.shared()
    try:
        with (
            netclient.deadline(timeout),
            _checked_response(client, "GET", url, policy, max_redirects, timeout) as (
                url,
                resp,
            ),
        ):
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise InputError(f"{url}: {int(declared)} bytes is over the {max_bytes}-byte limit")
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise InputError(f"{url}: more than {max_bytes} bytes; refused")
                if time.monotonic() > deadline:
                    raise InputError(f"{url}: download took longer than {timeout}s")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise TransientError(f"{url}: timed out after {timeout}s (in all)") from None
    except httpx.HTTPError as exc:
        raise TransientError(f"{url}: {type(exc).__name__}: {exc}") from None
