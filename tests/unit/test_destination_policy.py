"""The destination policy's decisions: defaults, deny-private, most specific entry wins, mapped IPv6."""

from __future__ import annotations

import pytest

from pgnet_curl.destination_policy import DestinationPolicy, denial_message, parse_cidrs
from pgnet_curl.errors import ConfigError


def test_default_policy_denies_link_local_and_metadata_addresses_only():
    policy = DestinationPolicy()
    assert policy.denial("169.254.169.254") == (
        "169.254.169.254 is in 169.254.0.0/16 (denied by default; allow with --allow-cidr)")
    assert policy.denial("fe80::1") == "fe80::1 is in fe80::/10 (denied by default; allow with --allow-cidr)"
    assert policy.denial("fd00:ec2::254") == (
        "fd00:ec2::254 is in fd00:ec2::254/128 (denied by default; allow with --allow-cidr)")
    for allowed in ("127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "93.184.215.14", "2606:4700::1111",
                    "fd00:ec2::253", "169.255.0.1"):
        assert policy.denial(allowed) is None, allowed


def test_ipv4_mapped_ipv6_addresses_are_judged_as_ipv4():
    policy = DestinationPolicy(deny_cidrs=["127.0.0.0/8"])
    assert policy.denial("::ffff:169.254.169.254") == (
        "::ffff:169.254.169.254 is in 169.254.0.0/16 (denied by default; allow with --allow-cidr)")
    assert policy.denial("::ffff:127.0.0.1") == "::ffff:127.0.0.1 is in 127.0.0.0/8 (denied by --deny-cidr)"
    assert policy.denial("::ffff:8.8.8.8") is None


def test_entries_written_as_mapped_ipv6_deny_the_ipv4_range():
    assert parse_cidrs("--deny-cidr", ["::ffff:10.0.0.0/104"]) == ("10.0.0.0/8",)
    policy = DestinationPolicy(deny_cidrs=["::ffff:10.0.0.0/104"])
    assert policy.denial("10.1.2.3") == "10.1.2.3 is in 10.0.0.0/8 (denied by --deny-cidr)"


def test_deny_private_denies_loopback_private_and_unique_local_ranges():
    policy = DestinationPolicy(deny_private=True)
    expected = {
        "127.0.0.1": "127.0.0.0/8", "127.0.0.2": "127.0.0.0/8", "::1": "::1/128", "::": "::/128",
        "0.0.0.0": "0.0.0.0/8", "10.9.8.7": "10.0.0.0/8", "172.31.255.255": "172.16.0.0/12",
        "192.168.0.1": "192.168.0.0/16", "100.64.0.1": "100.64.0.0/10", "198.19.0.1": "198.18.0.0/15",
        "fc00::1": "fc00::/7", "fdff::1": "fc00::/7", "fec0::1": "fec0::/10", "::ffff:10.0.0.1": "10.0.0.0/8",
    }
    for address, network in expected.items():
        assert policy.denial(address) == (
            f"{address} is in {network} (denied by --deny-private; allow with --allow-cidr)"), address
    # The default entries stay and keep their own, more specific reason where they are narrower.
    assert policy.denial("fd00:ec2::254").endswith("fd00:ec2::254/128 (denied by default; allow with --allow-cidr)")
    for allowed in ("172.32.0.1", "100.128.0.1", "8.8.8.8", "2001:4860:4860::8888", "11.0.0.1"):
        assert policy.denial(allowed) is None, allowed


def test_the_most_specific_entry_decides():
    policy = DestinationPolicy(deny_cidrs=["10.0.0.0/8", "10.1.2.3/32"], allow_cidrs=["10.1.0.0/16", "0.0.0.0/0"])
    assert policy.denial("10.1.9.9") is None, "the allow /16 inside the deny /8 wins"
    assert policy.denial("10.2.0.1") == "10.2.0.1 is in 10.0.0.0/8 (denied by --deny-cidr)"
    assert policy.denial("10.1.2.3") == "10.1.2.3 is in 10.1.2.3/32 (denied by --deny-cidr)"
    assert policy.denial("169.254.169.254").startswith("169.254.169.254 is in 169.254.0.0/16"), \
        "a wider allow does not undo a narrower default deny"


def test_an_allow_entry_equal_to_a_deny_entry_wins():
    assert DestinationPolicy(allow_cidrs=["169.254.0.0/16"]).denial("169.254.169.254") is None
    policy = DestinationPolicy(deny_private=True, allow_cidrs=["127.0.0.2/32", "::1/128"])
    assert policy.denial("127.0.0.2") is None
    assert policy.denial("::1") is None
    assert policy.denial("127.0.0.1") is not None


def test_deny_everything_but_an_allow_list():
    policy = DestinationPolicy(deny_cidrs=["0.0.0.0/0", "::/0"], allow_cidrs=["203.0.113.0/24", "2001:db8::/32"])
    assert policy.denial("203.0.113.7") is None
    assert policy.denial("2001:db8::7") is None
    assert policy.denial("198.51.100.1") == "198.51.100.1 is in 0.0.0.0/0 (denied by --deny-cidr)"
    assert policy.denial("2001:db9::1") == "2001:db9::1 is in ::/0 (denied by --deny-cidr)"
    assert policy.denial("::ffff:198.51.100.1") == "::ffff:198.51.100.1 is in 0.0.0.0/0 (denied by --deny-cidr)"


def test_cidr_lists_split_on_commas_and_spaces_and_normalise():
    assert parse_cidrs("--deny-cidr", ["10.0.0.0/8, 192.168.1.7/16", "fd00::/8  1.2.3.4"]) == (
        "10.0.0.0/8", "192.168.0.0/16", "fd00::/8", "1.2.3.4/32")
    assert parse_cidrs("--deny-cidr", [" ", ""]) == ()


@pytest.mark.parametrize("text", ["10.0.0.0/33", "not-an-ip", "10.0.0/8", "fe80::/129", "example.com"])
def test_an_invalid_cidr_is_a_config_error_naming_the_flag(text):
    with pytest.raises(ConfigError, match=rf"--allow-cidr must be a CIDR range .*got {text!r}"):
        parse_cidrs("--allow-cidr", [f"10.0.0.0/8,{text}"])


def test_denial_message_lists_every_refused_address():
    assert denial_message(["::1 is in ::1/128 (denied by --deny-cidr)", "127.0.0.1 is in 127.0.0.0/8 (denied by --deny-cidr)"]) == (
        "Destination denied by policy: ::1 is in ::1/128 (denied by --deny-cidr); "
        "127.0.0.1 is in 127.0.0.0/8 (denied by --deny-cidr)")


def test_remembered_decisions_stay_right_past_the_cache_size():
    policy = DestinationPolicy(deny_cidrs=["10.0.0.0/8"])
    for round_ in range(2):
        for n in range(5000):
            address = f"10.0.{n // 256}.{n % 256}" if n % 2 else f"11.0.{n // 256}.{n % 256}"
            assert (policy.denial(address) is None) == (n % 2 == 0), (round_, address)
