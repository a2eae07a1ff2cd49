"""The HTTP client behind every request made on a user's behalf (image downloads, webhooks): one per process,
pooled, that connects only to the address jobs.netguard checked for a request's host, and holds a request to a
total deadline however slowly the other side answers.

jobs.netguard decides which addresses may be reached; this module makes the connection go there and nowhere
else. Imported on first use (httpx is not needed to run a command that never reaches the network).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpcore
import httpx

# A request's checked addresses, (host, port) → address, and its total deadline (time.monotonic()), for the
# connections a GuardedClient opens while the request is sent: set by `pinned_request` and `deadline`.
_PINS: ContextVar[dict[tuple[str, int], str] | None] = ContextVar("netguard_pins", default=None)
_DEADLINE: ContextVar[float | None] = ContextVar("netguard_deadline", default=None)


@contextmanager
def pinned(host: str, port: int, address: str) -> Iterator[None]:
    """Connections a GuardedClient opens to host:port inside this block go to `address` (checked by the caller)."""
    token = _PINS.set({**(_PINS.get() or {}), (host, port): address})
    try:
        yield
    finally:
        _PINS.reset(token)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Everything a GuardedClient does inside this block (connect, TLS, every write and read, headers and body)
    ends within `seconds` in all: a server that answers a byte at a time cannot hold the caller longer. An
    enclosing, earlier deadline stays in force."""
    end = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(end if outer is None else min(outer, end))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _left(timeout: float | None, late: type[Exception]) -> float | None:
    """The time one socket operation may take: its own timeout, cut to what is left of the deadline."""
    end = _DEADLINE.get()
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise late("the request's total deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout))
        )

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Opens each connection to the address `check_url` vetted for its host in this request, never to what
    a DNS lookup of its own would say; a host nobody checked is not connected to at all."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        address = (_PINS.get() or {}).get((host.lower(), port))
        if address is None:
            raise httpcore.ConnectError(f"{host}:{port} was not checked by the address guard; not connecting")
        stream = self._inner.connect_tcp(
            address, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not reached on a user's behalf")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedClient(httpx.Client):
    """An HTTP client whose connections go only to checked addresses, within each request's deadline. One per
    process (`client()`), pooled: its keep-alive connections are keyed by scheme, host name and port, so a TLS
    connection is reused only for the name its certificate was verified for."""

    def __init__(self) -> None:
        transport = httpx.HTTPTransport()
        transport._pool._network_backend = _PinnedBackend()  # httpx has no public seam for the backend
        super().__init__(transport=transport, trust_env=False)  # (a proxy from the environment would undo the pin)


_client: tuple[int, GuardedClient] | None = None
_client_lock = threading.Lock()


def shared() -> GuardedClient:
    """This process's pooled client, built on first use (and again in a forked child: sockets are not shared)."""
    global _client
    with _client_lock:
        if _client is None or _client[0] != os.getpid():
            _client = (os.getpid(), GuardedClient())
        return _client[1]
