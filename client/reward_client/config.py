"""Small value objects that configure a client: where the servers are, how long to wait, how to
retry, and TLS. Defaults are named constants so that they can be read and overridden."""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REQUEST_TIMEOUT_S = 120.0
DEFAULT_RETRY_ATTEMPTS = 3
DEFAULT_BACKOFF_S = 0.5
DEFAULT_MAX_BACKOFF_S = 10.0
DEFAULT_CONCURRENCY = 16


@dataclass(frozen=True)
class Timeout:
    """Seconds to establish a TCP connection to a server, and to wait for one whole request."""

    connect: float = DEFAULT_CONNECT_TIMEOUT_S
    request: float = DEFAULT_REQUEST_TIMEOUT_S


@dataclass(frozen=True)
class Retry:
    """Tries per request on a server that cannot be reached or is not ready (scoring is idempotent,
    so repeating it is safe). Each retry goes to the next server URL; once every URL has failed in a
    round, the client waits `backoff` × 2^(round − 1) seconds (at most `max_backoff`, full jitter)."""

    attempts: int = DEFAULT_RETRY_ATTEMPTS
    backoff: float = DEFAULT_BACKOFF_S
    max_backoff: float = DEFAULT_MAX_BACKOFF_S

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts: {self.attempts} is below 1")

    def delay(self, attempt: int, servers: int) -> float:
        """Seconds to wait before try number `attempt` (0-based) with `servers` URLs."""
        if attempt == 0 or attempt % servers:
            return 0.0  # another server is still untried in this round
        rounds = attempt // servers
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (rounds - 1)))


@dataclass(frozen=True)
class TLS:
    """TLS settings for https:// and grpcs:// URLs: a CA bundle to trust (default: the system's),
    and a client certificate + key for mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def grpc_credentials(self) -> dict[str, str | None]:
        """Keyword arguments for tritonclient's gRPC client (it reads the files itself)."""
        return {"root_certificates": self.ca_file, "private_key": self.key_file, "certificate_chain": self.cert_file}


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # "grpc" or "http"
    address: str  # host:port
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """`http(s)://host:port` → HTTP; `grpc(s)://host:port` or bare `host:port` → gRPC."""
        parts = urlsplit(url if "://" in url else f"grpc://{url}")
        schemes = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True)}
        if parts.scheme not in schemes:
            raise ValueError(f"url {url!r}: scheme must be http, https, grpc or grpcs")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"url {url!r}: expected host:port")
        if parts.path not in ("", "/"):
            raise ValueError(f"url {url!r}: a path is not supported")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        name, tls = schemes[parts.scheme]
        return cls(name, f"{host}:{parts.port}", tls)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    def __str__(self) -> str:
        return f"{self.protocol}{'s' if self.tls else ''}://{self.address}"
