"""Turn what libcurl reports about a finished transfer into a pg_net response row."""

from __future__ import annotations

import codecs
import ctypes
import re

import pycurl

from .redact import scrub

# Texts pg_net's users match on; newer libcurl words some of them differently.
_CLASSIC_STRERROR = {
    pycurl.E_COULDNT_RESOLVE_PROXY: "Couldn't resolve proxy name",
    pycurl.E_COULDNT_RESOLVE_HOST: "Couldn't resolve host name",
    pycurl.E_COULDNT_CONNECT: "Couldn't connect to server",
}
_CHARSET = re.compile(r";\s*charset\s*=\s*\"?([^\s;\"]+)", re.IGNORECASE)


def _load_strerror():
    """Return libcurl's curl_easy_strerror from the libcurl pycurl is linked with, or None."""
    try:
        function = ctypes.CDLL(pycurl._pycurl.__file__).curl_easy_strerror
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_char_p
    function.argtypes = [ctypes.c_int]
    return function


_strerror = _load_strerror()


def curl_error_text(code: int) -> str:
    """Return libcurl's text for an error code alone, as pg_net stores it in error_msg.

    The classic texts (connect, resolve) stay exact: pg_net users compare them with `=`.
    """
    if code in _CLASSIC_STRERROR:
        return _CLASSIC_STRERROR[code]
    return _strerror(code).decode("utf-8", "replace") if _strerror is not None else f"libcurl error {code}"


def curl_error_detail(text: str, detail: str) -> str | None:
    """Return curl's error-buffer detail for error_detail, or None when it adds nothing to text.

    libcurl's detail may name a URL; its userinfo and query are the caller's secrets.
    """
    detail = scrub(detail.strip())
    if not detail or detail.lower() == text.lower():
        return None
    return detail


def timeout_message(timeout_ms: int, namelookup_us: int, connect_us: int, appconnect_us: int,
                    pretransfer_us: int, total_us: int) -> str:
    """Say where the time of a timed-out request went, in pg_net's exact words.

    Takes curl's *_TIME_T figures: whole microseconds since the transfer started, 0 for a step
    that did not run (name lookup and connect on a reused connection, TLS over plain http) or
    that the timeout cut short.
    """
    total_ms = total_us / 1000
    namelookup_ms, connect_ms = namelookup_us / 1000, connect_us / 1000
    dns_ms = handshake_ms = http_ms = 0.0
    if pretransfer_us > 0:
        # Checked first: on a reused connection name lookup and connect report 0.
        dns_ms = namelookup_ms
        handshake_ms = max(connect_ms - namelookup_ms, 0.0)
        if appconnect_us > 0:
            handshake_ms += appconnect_us / 1000 - connect_ms
        http_ms = total_ms - pretransfer_us / 1000
    elif namelookup_us == 0 and connect_us == 0:
        dns_ms = total_ms
    else:
        dns_ms = namelookup_ms
        handshake_ms = total_ms - namelookup_ms
    return (
        f"Timeout of {timeout_ms} ms reached. Total time: {total_ms:f} ms "
        f"(DNS time: {dns_ms:f} ms, TCP/SSL handshake time: {handshake_ms:f} ms, "
        f"HTTP Request/Response time: {http_ms:f} ms)"
    )


def parse_final_headers(raw: bytes) -> dict[str, str]:
    """Return the last response's headers (after redirects and 1xx).

    Repeated names (compared without case; the first spelling is kept) are joined with ', '
    as RFC 9110 allows. NUL bytes, which jsonb cannot hold, are dropped.
    """
    # Each response's block ends with an empty line; the last one starting with HTTP/ is ours.
    start = raw.rfind(b"\r\n\r\nHTTP/", 0, len(raw) - 4)
    text = raw[start + 4 if start >= 0 else 0:].decode("latin-1")
    if "\x00" in text:
        text = text.replace("\x00", "")
    headers: dict[str, str] = {}
    spelling: dict[str, str] = {}
    for line in text.split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name[0] in " \t":
            continue
        value = value.strip()
        key = spelling.setdefault(name.lower(), name)
        if key in headers:
            headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    return headers


def charset_of(content_type: str | None) -> str | None:
    """Return the charset a Content-Type declares, if Python knows it."""
    if not content_type:
        return None
    match = _CHARSET.search(content_type)
    if not match:
        return None
    try:
        return codecs.lookup(match.group(1)).name
    except LookupError:
        return None


def decode_body(body: bytes, content_type: str | None) -> tuple[str | None, bytes | None]:
    """Return (content, content_bytes): the body as text when it is text, else its exact bytes.

    Text means: decodes in the declared charset (UTF-8 when none is declared) and holds no
    NUL byte, which PostgreSQL text cannot store. An empty body is (NULL, NULL).
    """
    if not body:
        return None, None
    try:
        text = body.decode(charset_of(content_type) or "utf-8")
    except UnicodeDecodeError:
        return None, body
    if "\x00" in text:
        return None, body
    return text, None
