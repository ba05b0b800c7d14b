"""--destination-limit PATTERN=CONCURRENT/RATE[/BURST] as serve takes it."""

import pytest

from pgnet_curl import settings
from pgnet_curl.errors import ConfigError
from pgnet_curl.settings import DestinationLimit, parse_destination_limit


@pytest.mark.parametrize("text, expected", [
    ("api.example.com=10/50", DestinationLimit("api.example.com", 10, 50.0)),
    ("*.example.com=/2.5", DestinationLimit("*.example.com", None, 2.5)),
    ("127.0.0.1=2/", DestinationLimit("127.0.0.1", 2, None)),
    ("*=/100/1", DestinationLimit("*", None, 100.0, 1.0)),
])
def test_a_limit_flag_parses(text, expected):
    assert parse_destination_limit(text) == expected


@pytest.mark.parametrize("text", ["api.example.com", "=1/2", "x=/", "x=a/b", "x=0/", "x=/0", "x=/5/0.5", "x=1/2/3/4"])
def test_a_bad_limit_flag_says_the_format(text):
    with pytest.raises(ConfigError, match="destination-limit"):
        parse_destination_limit(text)


def test_build_parses_repeated_flags():
    built = settings.build(dsn="x", destination_limits=("a.test=1/", "*=/10"))
    assert built.destination_limits == (DestinationLimit("a.test", 1), DestinationLimit("*", None, 10.0))
