"""libcurl's own URL parser, through ctypes on the libcurl pycurl links: the reference for URL texts."""

from __future__ import annotations

import ctypes

import pycurl

_CURLUPART_URL = 0
_lib = ctypes.CDLL(pycurl._pycurl.__file__)
_lib.curl_url.restype = ctypes.c_void_p
_lib.curl_url_cleanup.argtypes = [ctypes.c_void_p]
_lib.curl_url_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_lib.curl_url_strerror.restype = ctypes.c_char_p
_lib.curl_url_strerror.argtypes = [ctypes.c_int]


def url_error(url: str) -> str | None:
    """Return curl_url_strerror of curl_url_set(CURLUPART_URL, url, 0), as pg_net calls it; None if accepted."""
    handle = _lib.curl_url()
    try:
        code = _lib.curl_url_set(handle, _CURLUPART_URL, url.encode("utf-8"), 0)
    finally:
        _lib.curl_url_cleanup(handle)
    return _lib.curl_url_strerror(code).decode("utf-8") if code else None
