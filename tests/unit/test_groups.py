import ipaddress
import shutil
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from oe_agent.agent.groups import KernelPolicy, PolicyGroups, Selector, diff, parse_line
from oe_agent.errors import UserError
from tests.conftest import needs

LIBRESWAN_POLICIES = Path(__file__).resolve().parents[2] / "tools/.cache/libreswan/etc/ipsec.d/policies"

# The shape of libreswan's shipped files: long comment headers, indented example lines.
PRIVATE_OR_CLEAR = """# This file defines the set of CIDRs (network/mask-length) to which
# communication should be encrypted when possible, but will fallback
# to in the clear otherwise.
#
# prefer to encrypt all smtp traffic to some host
#  10.0.1.0/24  tcp  0  25
#
# Ideally, enable this for every host on the internet
0.0.0.0/0
"""


def ip(a):
    return ipaddress.ip_address(a)


def net(n):
    return ipaddress.ip_network(n)


def write(d: Path, **files):
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", "-")).write_text(text)
    return d


def test_libreswans_own_files_load_unchanged(tmp_path):
    needs(LIBRESWAN_POLICIES.is_dir(), "libreswan unpacked (tools/install-deps.sh)")
    d = tmp_path / "pol"
    shutil.copytree(LIBRESWAN_POLICIES, d)
    g = PolicyGroups.load(d)
    assert g.entries() == []  # all examples are comments
    assert g.kernel_state() == frozenset()
    # uncommenting libreswan's own example lines keeps them loadable
    (d / "private-or-clear").write_text((d / "private-or-clear").read_text().replace("# 0.0.0.0/0", "0.0.0.0/0"))
    (d / "clear").write_text((d / "clear").read_text() + " 10.0.1.0/24  tcp  0  22\n")
    g = PolicyGroups.load(d)
    assert g.lookup("192.0.2.7").group == "private-or-clear"
    assert g.lookup("10.0.1.5", 6, 40000, 22).group == "clear"
    assert g.lookup("10.0.1.5", 6, 40000, 80).group == "private-or-clear"


def test_parse_line_forms():
    assert parse_line("# comment", "f:1") is None
    assert parse_line("   ", "f:1") is None
    assert parse_line("10.0.1.0/24", "f:1") == Selector(net("10.0.1.0/24"))
    assert parse_line(" 10.0.1.0/24  tcp  0  22 # ssh", "f:1") == Selector(net("10.0.1.0/24"), 6, 0, 22)
    assert parse_line("0.0.0.0/0 tcp 22 0", "f:1") == Selector(net("0.0.0.0/0"), 6, 22, 0)
    assert parse_line("2a03:6000:1004:1::/64", "f:1") == Selector(net("2a03:6000:1004:1::/64"))
    assert parse_line("192.0.2.9", "f:1") == Selector(net("192.0.2.9/32"))
    assert parse_line("192.0.2.0/24 udp 53", "f:1") == Selector(net("192.0.2.0/24"), 17, 53, 0)
    assert parse_line("192.0.2.0/24 17", "f:1") == Selector(net("192.0.2.0/24"), 17)


@pytest.mark.parametrize("line, what", [
    ("192.0.2.300/24", "is not a CIDR"),
    ("192.0.2.0/24 bogusproto", "unknown protocol"),
    ("192.0.2.0/24 tcp 0 70000", "is not a port"),
    ("192.0.2.0/24 tcp x", "is not a port"),
    ("192.0.2.0/24 icmp 0 22", "ports need"),
    ("192.0.2.0/24 tcp 0 22 extra", "expected CIDR"),
    ("192.0.2.0/24 300", "out of range"),
])
def test_bad_lines_name_file_and_line(line, what):
    with pytest.raises(UserError, match=rf"^pol/private:7: .*{what}"):
        parse_line(line, "pol/private:7")


def test_same_cidr_in_two_files_names_both(tmp_path):
    d = write(tmp_path / "p", private="# x\n192.0.2.0/24\n", clear="\n\n192.0.2.0/24\n")
    with pytest.raises(UserError) as e:
        PolicyGroups.load(d)
    msg = str(e.value)
    assert f"{d}/private:2" in msg and f"{d}/clear:3" in msg and "192.0.2.0/24" in msg


def test_same_cidr_different_ports_is_not_a_duplicate(tmp_path):
    d = write(tmp_path / "p", private="192.0.2.0/24\n", clear="192.0.2.0/24 tcp 0 22\n")
    g = PolicyGroups.load(d)
    assert g.lookup("192.0.2.5", 6, 1000, 22).group == "clear"
    assert g.lookup("192.0.2.5", 17, 1000, 22).group == "private"


def test_longest_prefix_wins_regardless_of_file(tmp_path):
    d = write(tmp_path / "p", private_or_clear="0.0.0.0/0\n::/0\n", private="192.0.2.0/24\n",
              clear="192.0.2.128/25\n", block="192.0.2.200/32\n", clear_or_private="2001:db8::/32\n")
    g = PolicyGroups.load(d)
    assert g.lookup("203.0.113.1").group == "private-or-clear"
    assert g.lookup("192.0.2.5").group == "private"
    assert g.lookup("192.0.2.130").group == "clear"
    assert g.lookup("192.0.2.200").group == "block"
    assert g.lookup("2001:db8::1").group == "clear-or-private"
    assert g.lookup("2001:db9::1").group == "private-or-clear"
    assert g.lookup("192.0.2.5").source == f"{d}/private:1"


def test_prefix_beats_port_specificity(tmp_path):
    d = write(tmp_path / "p", clear="192.0.2.0/24 tcp 0 22\n", private="192.0.2.7/32\n")
    g = PolicyGroups.load(d)
    assert g.lookup("192.0.2.7", 6, 5, 22).group == "private"


def test_no_group_is_none(tmp_path):
    g = PolicyGroups.load(write(tmp_path / "p", private="192.0.2.0/24\n"))
    assert g.lookup("198.51.100.1") is None


def test_missing_directory_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        PolicyGroups.load(tmp_path / "nope")


def test_kernel_state_per_group(tmp_path):
    d = write(tmp_path / "p", clear="192.0.2.1/32\n", clear_or_private="192.0.2.2/32\n",
              private_or_clear="192.0.2.3/32\n", private="192.0.2.4/32\n", block="192.0.2.5/32\n")
    ks = PolicyGroups.load(d).kernel_state()
    assert ks == {KernelPolicy(Selector(net("192.0.2.1/32")), "pass"),
                  KernelPolicy(Selector(net("192.0.2.3/32")), "trap"),
                  KernelPolicy(Selector(net("192.0.2.4/32")), "trap"),
                  KernelPolicy(Selector(net("192.0.2.5/32")), "block")}


def test_own_addresses_and_resolvers_never_trapped(tmp_path):
    d = write(tmp_path / "p", private="192.0.2.0/24\n2001:db8::/64\n", clear="198.51.100.0/24\n")
    g = PolicyGroups.load(d, exempt=[ip("192.0.2.1"), ip("2001:db8::1"), ip("198.51.100.9")],
                          resolvers=[ip("192.0.2.53")])
    assert g.lookup("192.0.2.1").group == "clear" and g.lookup("192.0.2.1").source == "own address"
    assert g.lookup("192.0.2.53").source == "DNS resolver"
    assert g.lookup("192.0.2.2").group == "private"
    ks = g.kernel_state()
    for a in ("192.0.2.1/32", "2001:db8::1/128", "192.0.2.53/32"):
        assert KernelPolicy(Selector(net(a)), "pass") in ks
    # an exempt address outside any trap group needs no policy at all
    assert not any(p.selector.net == net("198.51.100.9/32") for p in ks)


def test_diff_changes_only_what_changed(tmp_path):
    a = PolicyGroups.load(write(tmp_path / "a", private="192.0.2.0/24\n", clear="192.0.2.9/32\n",
                                block="203.0.113.0/24\n")).kernel_state()
    b = PolicyGroups.load(write(tmp_path / "b", private="192.0.2.0/24\n", private_or_clear="192.0.2.9/32\n",
                                clear="198.51.100.0/24\n")).kernel_state()
    d = diff(a, b)
    assert d.remove == (Selector(net("203.0.113.0/24")),)
    assert set(d.install) == {KernelPolicy(Selector(net("192.0.2.9/32")), "trap"),
                              KernelPolicy(Selector(net("198.51.100.0/24")), "pass")}
    assert not diff(a, a)


nets = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                 st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address), st.integers(0, 32))
actions = st.sampled_from(["trap", "pass", "block"])
states = st.lists(st.tuples(nets, actions), max_size=12).map(
    lambda xs: frozenset(KernelPolicy(Selector(n), a) for n, a in dict(xs).items()))


@given(states, states)
def test_diff_applied_to_old_gives_new(old, new):
    d = diff(old, new)
    state = {p.selector: p.action for p in old}
    for s in d.remove:
        del state[s]
    for p in d.install:
        state[p.selector] = p.action
    assert frozenset(KernelPolicy(s, a) for s, a in state.items()) == new
