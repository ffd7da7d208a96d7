"""Where a server is: protocol, host and port, parsed once from the user's URL."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}  # Triton's defaults
_SCHEMES = {"http": "http", "grpc": "grpc"}


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not a TCP port (1-65535)")

    @classmethod
    def parse(cls, url: str, protocol: str | None = None) -> "Endpoint":
        """`host:port`, `http://host:port` or `grpc://host:port`.

        The protocol comes from `protocol`, else from the URL's scheme, else gRPC;
        a scheme that contradicts `protocol` is an error rather than a guess.
        """
        if protocol is not None and protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if not url or not isinstance(url, str):
            raise ValueError(f"url must be host:port or http://host:port, got {url!r}")
        scheme = url.split("://", 1)[0].lower() if "://" in url else None
        if scheme is not None and scheme not in _SCHEMES:
            raise ValueError(f"url {url!r} has scheme {scheme!r}; use http://host:port, grpc://host:port or host:port "
                             "(https is not supported)")
        if protocol is not None and scheme is not None and _SCHEMES[scheme] != protocol:
            raise ValueError(f"url {url!r} is a {scheme} URL but the protocol is {protocol}; "
                             f"drop the scheme or pass protocol {scheme}")
        protocol = protocol or (_SCHEMES[scheme] if scheme else "grpc")
        parts = urlsplit(url if scheme else f"//{url}")
        if parts.path not in ("", "/") or parts.query or not parts.hostname:
            raise ValueError(f"url {url!r} must be host:port, with no path (the model is chosen by name)")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"url {url!r} has an invalid port") from None
        return cls(protocol, parts.hostname, port if port is not None else DEFAULT_PORTS[protocol])

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.address}"
