"""Issue 4 acceptance against real servers: knot (auto-signing authoritative) and unbound
(validating resolver) in namespaces; every case classified the same in both DNSSEC modes."""
import asyncio
import sys

import dns.reversename
import pytest

from oe_agent.dns import ipseckey
from oe_agent.dns.resolver import KeyResolver
from tests.conftest import have, needs
from tests.interop import dnsfix


@pytest.fixture(scope="module")
def keys():
    return dnsfix.TestKeys()


@pytest.fixture
def dns_lab(hosts, keys):
    """h1: knot; h2: unbound on 127.0.0.1 (good anchors) and 127.0.0.2 (wrong anchors), the
    client; h3: a DNS server that never answers (silent.example)."""
    needs(have("knotd") and have("keymgr"), "knot (apt: knot)")
    needs(have("unbound"), "unbound (apt: unbound)")
    auth, client, silent = hosts.add(), hosts.add(), hosts.add()
    server = dnsfix.make_server(keys)
    wild6 = dns.reversename.from_address(WILD6).parent().to_text()
    extra = {dnsfix.REV6: f"*.{wild6} 60 IPSECKEY {_rd(keys.ed448)}\n"}
    knot = dnsfix.Knot(auth, server, extra=extra).start()
    silent.popen(sys.executable, "-c", dnsfix.SILENT_SERVER, log="silent.log")
    dnsfix.wait_port(silent, 53, "udp")
    stubs = {z: auth.v4 for z in dnsfix.AUTO_SIGNED}
    stubs["silent.example."] = silent.v4
    good = dnsfix.Unbound(client, knot.anchors_text(), stubs).start()
    wrong_anchors = dnsfix.anchors_text(dnsfix.make_server(keys))  # other keys, same zones
    wrong = dnsfix.Unbound(client, wrong_anchors, stubs, listen="127.0.0.2",
                           name="unbound-wrong").start()
    yield dict(auth=auth, client=client, knot=knot, anchors=knot.anchors_text(),
               wrong_anchors=wrong_anchors)
    wrong.stop()
    good.stop()
    knot.stop()


WILD6 = "2001:db8::1:0:0:7"  # under a wildcard in the NSEC3-signed IPv6 reverse zone


def _pub(key) -> bytes:
    return ipseckey.public_key_bytes(key.public_key())[1]


def _rd(key) -> str:
    return ipseckey.rdata_text(10, key.public_key())


def _lookup_all(netns, resolvers, anchors, mode, names, timeout=4.0):
    async def run():
        r = KeyResolver(resolvers, anchors, mode, timeout=timeout, attempt_timeout=1.5)
        return await asyncio.gather(*(r.lookup(n) for n in names))
    return dnsfix.run_in_netns(netns, run)


def test_every_case_same_in_both_modes(dns_lab, keys):
    cases = {n: c for n, c in dnsfix.cases(keys).items()}
    # a wildcard in the NSEC3 zone (the NSEC ones are in the shared cases)
    cases[WILD6] = ("secure-key", [_pub(keys.ed448)])
    names = list(cases) + ["host.silent.example"]
    netns = dns_lab["client"].name
    results = {
        "validate via unbound": _lookup_all(netns, ["127.0.0.1"], dns_lab["anchors"],
                                            "validate", names),
        "validate direct to knot": _lookup_all(netns, [dns_lab["auth"].v4],
                                               dns_lab["anchors"], "validate", names[:-1]),
        "unbound's AD bit": _lookup_all(netns, ["127.0.0.1"], None, "resolver", names),
    }
    for how, answers in results.items():
        for a in answers:
            if a.name == "host.silent.example.":
                assert a.status == "timeout", (how, a.reason)
                continue
            status, want = cases[a.query]
            assert a.status == status, (how, a.query, a.reason)
            assert [k.key_bytes() for k in a.keys] == want, (how, a.query)
    by_query = {a.query: a for a in results["validate via unbound"]}
    assert "NSEC3" in by_query["2001:db8::6"].reason  # knot signs REV6 with NSEC3
    assert "NSEC3" in by_query["0." * 23 + dnsfix.REV6].reason
    assert "by NSEC;" in by_query["nothere.oe.example."].reason + ";"
    by_ad = {a.query: a for a in results["unbound's AD bit"]}
    # unbound says why with an extended DNS error (RFC 8914), kept as the reason
    assert by_ad["host.tampered.oe.example."].reason.startswith("resolver: DNSSEC Bogus")
    v6 = next(a for a in results["unbound's AD bit"] if a.query == "2001:db8::b")
    assert len(v6.keys) == 2  # two RSA-4096 keys: over 1232 bytes, fetched over TCP


def test_wrong_trust_anchor_is_bogus_in_both_modes(dns_lab):
    names = ["ed25519.oe.example", "nothere.oe.example", "192.0.2.1", "2001:db8::5"]
    netns = dns_lab["client"].name
    for answers in (
            _lookup_all(netns, ["127.0.0.1"], dns_lab["wrong_anchors"], "validate", names),
            _lookup_all(netns, ["127.0.0.2"], None, "resolver", names)):
        assert [a.status for a in answers] == ["bogus"] * 4, [a.reason for a in answers]


def test_example_zones_load_into_knot(hosts):
    """zones/ as a DNS admin would use it: knot signs it, unbound validates through it."""
    needs(have("knotd") and have("keymgr") and have("unbound"), "knot and unbound")
    from pathlib import Path
    from oe_agent.dns.server import AuthServer
    auth, client = hosts.add(), hosts.add()
    zones = AuthServer.from_directory(Path(__file__).resolve().parents[2] / "zones")
    knot = dnsfix.Knot(auth, zones).start()
    ub = dnsfix.Unbound(client, knot.anchors_text(),
                        {z: auth.v4 for z in dnsfix.AUTO_SIGNED}).start()
    try:
        names = ["a.oe.example", "d.oe.example", "192.0.2.2", "192.0.2.100", "2001:db8::1"]
        want = ["secure-key", "secure-denial", "secure-key", "secure-key", "secure-key"]
        for mode, anchors in (("validate", knot.anchors_text()), ("resolver", None)):
            got = _lookup_all(client.name, ["127.0.0.1"], anchors, mode, names)
            assert [a.status for a in got] == want, [(a.query, a.reason) for a in got]
    finally:
        ub.stop()
        knot.stop()
