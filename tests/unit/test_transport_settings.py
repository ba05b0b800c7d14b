"""TLS and proxy settings: checked at start, proxy credentials never shown."""

from __future__ import annotations

import pytest

from pgnet_curl import settings
from pgnet_curl.errors import ConfigError


@pytest.mark.parametrize("url, shown", [
    ("http://user:secret@proxy.example:3128", "http://***@proxy.example:3128"),
    ("http://user:p%40ss@127.0.0.1:8080/path", "http://***@127.0.0.1:8080/path"),
    ("http://only-user@127.0.0.1:8080", "http://***@127.0.0.1:8080"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://user:pa/ss@127.0.0.1:8080", "http://***@127.0.0.1:8080"),
    ("no-scheme:secret@host", "no-scheme:secret@host"),
])
def test_mask_userinfo_hides_credentials_only(url, shown):
    assert settings.mask_userinfo(url) == shown


def test_proxy_credentials_stay_out_of_repr_and_the_log_line():
    built = settings.build(proxy="http://user:secret@127.0.0.1:3128")
    assert built.proxy == "http://user:secret@127.0.0.1:3128"
    assert "secret" not in repr(built)
    line = settings.describe_transport(built, environ={})
    assert line == "TLS verification on, CA: libcurl default; proxy: http://***@127.0.0.1:3128"


def test_env_proxies_are_described_masked():
    line = settings.describe_transport(settings.build(), environ={
        "HTTPS_PROXY": "http://u:pw@127.0.0.1:1", "NO_PROXY": "localhost", "HTTP_PROXY": "http://ignored:1"})
    assert line.endswith("proxy from environment: HTTPS_PROXY=http://***@127.0.0.1:1 NO_PROXY=localhost")
    assert settings.describe_transport(settings.build(), environ={}).endswith("; no proxy")


def test_bad_proxy_url_is_refused_with_credentials_masked():
    with pytest.raises(ConfigError) as caught:
        settings.build(proxy="https://user:secret@127.0.0.1:3128")
    assert "secret" not in str(caught.value)
    assert "http://host:port" in str(caught.value)


def test_ca_path_must_be_a_directory(tmp_path):
    assert settings.build(ca_path=str(tmp_path)).ca_path == str(tmp_path)
    with pytest.raises(ConfigError, match="is not a readable directory"):
        settings.build(ca_path=str(tmp_path / "nope"))
