"""Listen addresses ("host:port") of procpoll's endpoints: one parser for config, server, client."""

from __future__ import annotations

import ipaddress

_MAX_PORT = 65_535


def split_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:9100"; empty host = every interface) into its parts.

    Raises ValueError saying what is wrong, so config validation can quote it as is.
    """
    host, colon, port_text = listen.rpartition(":")
    if not colon:
        raise ValueError(f"expected host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address inside [], got {listen!r}") from None
    elif ":" in host:
        raise ValueError(f"an IPv6 host goes inside brackets, as [::1]:9100; got {listen!r}")
    if any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"expected a host name or address before the port, got {listen!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= _MAX_PORT:
        raise ValueError(f"expected a port number in 0..{_MAX_PORT} after the colon, "
                         f"got {listen!r}")
    return host, int(port_text)


def client_host(host: str) -> str:
    """The host a local client dials to reach a server bound to `host` (wildcard → loopback)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 -- recognising the wildcard, not binding to it
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
