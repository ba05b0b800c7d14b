"""Texts safe to log or store: URLs, DSNs and errors with the secrets they may hold removed.

Header values, bodies, URL queries and userinfo, and passwords never belong in a message;
these helpers are what the rest of pgnet-curl uses instead of quoting such values.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MASK = "***"
# scheme://user:password@  and  ?query / #fragment of any URL in a text.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@\"'<>]*@")
_URL_QUERY = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s?#\"'<>]*)[?#][^\s\"'<>]*")
# password=... in a key=value connection string, quoted or not.
_DSN_PASSWORD = re.compile(r"(?i)\b(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)")
_QUOTED = re.compile(r'"[^"]*"')


def safe_url(url: str) -> str:
    """Return scheme://host:port/path: no userinfo, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"


def safe_dsn(dsn: str) -> str:
    """Return the DSN as key=value pairs with any password masked."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparseable DSN>"
    if "password" in params:
        params["password"] = MASK
    return make_conninfo(**params)


def scrub(text: str) -> str:
    """Mask URL userinfo, URL queries and DSN passwords wherever they appear in a text."""
    if "://" in text:
        text = _URL_USERINFO.sub(r"\1" + MASK + "@", text)
        text = _URL_QUERY.sub(r"\1?" + MASK, text)
    if "assword" in text:
        text = _DSN_PASSWORD.sub(r"\1" + MASK, text)
    return text


def db_error_text(exc: psycopg.Error) -> str:
    """Return a psycopg error's primary message and SQLSTATE, without DETAIL or row contents.

    Errors libpq raises itself (no SQLSTATE: a lost connection, a refused connect) keep their
    text, but a DSN parse error has its quoted fragments masked: they may be a password.
    """
    primary = exc.diag.message_primary if exc.sqlstate else None
    if primary:
        return f"{primary} (SQLSTATE {exc.sqlstate})"
    text = str(exc).strip()
    if isinstance(exc, psycopg.ProgrammingError):
        # libpq's conninfo errors quote the piece they could not parse.
        text = _QUOTED.sub(f'"{MASK}"', text)
    return scrub(text)


def setopt_error_text(exc: Exception) -> str:
    """Say why libcurl would not take a request's URL, method or headers, quoting none of them."""
    if isinstance(exc, UnicodeEncodeError):
        return "a character that is not ASCII in the URL, method or a header"
    if isinstance(exc, ValueError) and "null" in str(exc):
        return "a NUL byte in the URL, method or a header"
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if code is not None:
        return f"libcurl refused an option of the request (error {code})"
    return f"the URL, method or a header could not be used ({type(exc).__name__})"
