"""A URL's destination host exactly as net._url_host (sql/0008_destination_limits.sql) computes it."""

from __future__ import annotations

# PostgreSQL's lower() in the C locale (the embedded server's, the tests') changes ASCII letters only.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def url_host(url: str) -> str:
    """The host of url: lower case, without userinfo, port, IPv6 brackets or trailing dots.

    Step by step as the SQL does it (split_part, reverse), so that the worker's in-memory circuit
    counts and the database's circuits name a host the same way, however odd the URL.
    """
    parts = url.split("://", 2)
    rest = parts[1] if len(parts) > 1 else ""
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    host_port = authority.rsplit("@", 1)[-1]
    if host_port.startswith("["):
        host = host_port[1:].split("]", 1)[0]
    else:
        host = host_port.split(":", 1)[0]
    return host.translate(_ASCII_LOWER).rstrip(".")
