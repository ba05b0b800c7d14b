"""The worker names a URL's host as net._url_host does (tests/integration/test_circuits.py compares
the two on the same URLs against PostgreSQL)."""

import pytest

from pgnet_curl.url_host import url_host


@pytest.mark.parametrize("url, host", [
    ("http://example.com/", "example.com"),
    ("HTTP://User:Pa@ss@Example.COM.:8080/a@b?c@d#e@f", "example.com"),
    ("https://[::1]:443/x", "::1"),
    ("http://[FE80::1%25eth0]/", "fe80::1%25eth0"),
    ("http://host.example.:80", "host.example"),
    ("http://A..", "a"),
    ("http://u@[2001:DB8::1]./", "2001:db8::1"),
    ("http://h/p://q", "h"),
    ("http://host?query", "host"),
    ("http://host#frag", "host"),
    ("http://user:pw@host", "host"),
    ("no scheme", ""),
])
def test_hosts(url, host):
    assert url_host(url) == host


def test_only_ascii_letters_are_lowered_as_in_the_c_locale():
    assert url_host("http://ÉCOLE.Example/") == "École.example"
