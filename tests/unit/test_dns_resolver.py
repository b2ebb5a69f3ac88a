"""KeyResolver against the embedded signing server on loopback: every classification case,
truncation to TCP, coalescing, positive and negative caching, timeouts, malformed records."""
import asyncio
import logging
import socket

import pytest

from oe_agent.dns.resolver import KeyResolver
from tests.interop import dnsfix


@pytest.fixture(scope="session")
def keys():
    return dnsfix.TestKeys()


@pytest.fixture
async def server(keys):
    srv = dnsfix.make_server(keys)
    host, port = await srv.start()
    srv.address = f"{host}@{port}"
    yield srv
    await srv.close()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _resolver(server, **kw):
    kw.setdefault("timeout", 5)
    return KeyResolver([server.address], dnsfix.anchors_text(server), "validate", **kw)


async def test_every_case_is_classified(server, keys):
    r = _resolver(server)
    for name, (status, want) in dnsfix.cases(keys).items():
        a = await r.lookup(name)
        assert (a.status, [k.key_bytes() for k in a.keys]) == (status, want), (name, a.reason)
        assert a.reason


async def test_gateways_ordered_by_precedence(server):
    a = await _resolver(server).lookup("gw.oe.example")
    assert [(k.precedence, k.gateway_type, k.gateway_text) for k in a.gateways()] == [
        (10, 1, "192.0.2.9"), (20, 2, "2001:db8::9"), (30, 3, "gw.oe.example.")]


async def test_classless_cname_is_followed(server):
    a = await _resolver(server).lookup("192.0.2.5")
    assert a.name == "5.2.0.192.in-addr.arpa."
    assert a.chain == ("5.0-63.2.0.192.in-addr.arpa.",)


async def test_big_answer_truncates_then_tcp(server):
    before = server.tcp_queries
    a = await _resolver(server).lookup("2001:db8::b")
    assert a.status == "secure-key" and len(a.keys) == 2
    assert server.tcp_queries == before + 1


async def test_reasons_name_the_failure(server):
    r = _resolver(server)
    assert "expired" in (await r.lookup("host.expired.oe.example")).reason
    assert "changed" in (await r.lookup("host.tampered.oe.example")).reason
    assert "NXDOMAIN" in (await r.lookup("nothere.oe.example")).reason
    assert "insecure delegation" in (await r.lookup("host.unsigned.oe.example")).reason


async def test_wrong_trust_anchor_is_bogus(server, keys):
    wrong = dnsfix.make_server(keys)  # same zones, other keys: its DS does not match
    r = KeyResolver([server.address], dnsfix.anchors_text(wrong), "validate")
    for name in ("ed25519.oe.example", "nothere.oe.example", "192.0.2.1"):
        a = await r.lookup(name)
        assert a.status == "bogus" and "no DNSKEY matches the trust anchor" in a.reason


async def test_no_trust_anchor_is_insecure(server):
    r = KeyResolver([server.address], None, "validate")
    a = await r.lookup("ed25519.oe.example")
    assert a.status == "insecure" and len(a.keys) == 1 and "no trust anchor" in a.reason


async def test_silent_server_times_out_within_bound():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        r = KeyResolver([f"127.0.0.1@{silent.getsockname()[1]}"], None, "validate",
                        timeout=0.5, attempt_timeout=0.2)
        a = await asyncio.wait_for(r.lookup("ed25519.oe.example"), 5)  # bounded by the test
        assert a.status == "timeout" and a.keys == ()
        assert (await r.lookup("ed25519.oe.example")).from_cache is False  # never cached
    finally:
        silent.close()


async def test_second_resolver_used_when_first_silent(server):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        r = KeyResolver([f"127.0.0.1@{silent.getsockname()[1]}", server.address],
                        dnsfix.anchors_text(server), timeout=5, attempt_timeout=0.2)
        assert (await r.lookup("ed25519.oe.example")).status == "secure-key"
    finally:
        silent.close()


async def test_100_concurrent_lookups_send_one_query(server):
    r = _resolver(server)
    answers = await asyncio.gather(*(r.lookup("p256.oe.example") for _ in range(100)))
    assert {a.status for a in answers} == {"secure-key"}
    assert server.queries[("p256.oe.example.", "IPSECKEY")] == 1


async def test_cache_until_ttl_then_query_again(server):
    clock = Clock()
    r = _resolver(server, clock=clock)
    q = ("ed448.oe.example.", "IPSECKEY")
    first = await r.lookup("ed448.oe.example")
    assert first.ttl == 60 and not first.from_cache
    clock.t += 59
    again = await r.lookup("ed448.oe.example")
    assert again.from_cache and again.status == "secure-key" and again.ttl == 1
    assert server.queries[q] == 1
    clock.t += 2
    assert not (await r.lookup("ed448.oe.example")).from_cache
    assert server.queries[q] == 2


async def test_negative_cache_by_soa_minimum(server):
    clock = Clock()
    r = _resolver(server, clock=clock)
    q = ("gone.oe.example.", "IPSECKEY")
    first = await r.lookup("gone.oe.example")
    assert first.status == "secure-denial" and first.ttl == 30  # SOA minimum 30 < TTL 60
    clock.t += 29
    assert (await r.lookup("gone.oe.example")).from_cache
    assert server.queries[q] == 1
    clock.t += 2
    await r.lookup("gone.oe.example")
    assert server.queries[q] == 2


async def test_ttl_is_capped(server):
    r = _resolver(server, max_ttl=5)
    assert (await r.lookup("rsa.oe.example")).ttl == 5


async def test_malformed_records_skipped_and_logged(server, caplog):
    caplog.set_level(logging.WARNING, logger="oe_agent.dns")
    a = await _resolver(server).lookup("malformed.oe.example")
    assert a.status == "secure-key" and len(a.keys) == 1
    lines = [r.getMessage() for r in caplog.records if "malformed.oe.example." in r.getMessage()]
    assert len(lines) == 5
    for why in ("unknown algorithm 9", "gateway type 4", "EdDSA key of 31 bytes",
                "exponent length past the end", "not a point on the curve"):
        assert any(why in line for line in lines), why


async def test_resolver_mode_only_trusts_loopback():
    with pytest.raises(ValueError, match="loopback"):
        KeyResolver(["192.0.2.53"], None, "resolver")
    KeyResolver(["127.0.0.1", "::1@5353"], None, "resolver")


async def test_off_mode_reports_insecure_keys(server):
    a = await KeyResolver([server.address], None, "off").lookup("ed25519.oe.example")
    assert a.status == "insecure" and len(a.keys) == 1


async def test_bad_argument_is_value_error(server):
    with pytest.raises(ValueError):
        await _resolver(server).lookup("not a name")


async def test_json_and_words(server):
    a = await _resolver(server).lookup("192.0.2.5")
    j = a.to_json()
    assert j["status"] == "secure-key" and j["keys"][0]["algorithm"] == 3
    assert j["chain"] == ["5.0-63.2.0.192.in-addr.arpa."]
    assert "DNSSEC-validated" in a.describe()


async def test_cache_is_bounded(server):
    r = _resolver(server, max_entries=3)
    for name in ("ed25519.oe.example", "ed448.oe.example", "p256.oe.example",
                 "p384.oe.example"):
        await r.lookup(name)
    assert len(r._cache) == 3
    assert not (await r.lookup("ed25519.oe.example")).from_cache  # the oldest went first
    assert (await r.lookup("p384.oe.example")).from_cache


async def test_ttl_never_outlives_the_signatures(server):
    # the server's signatures expire in 14 days; a clock 14 days less 10 s on: ttl <= 10 s
    import time
    r = _resolver(server, now=lambda: time.time() + 14 * 86400 - 10)
    a = await r.lookup("rsa.oe.example")
    assert a.status == "secure-key" and a.ttl <= 10


class _Liar:
    """Wraps the server's answers like an on-path attacker who strips signatures."""

    def __init__(self, server, fake_apex: str):
        self.server, self.fake_apex = server, fake_apex
        self.real_answer = server.answer
        server.answer = self.answer

    def answer(self, query):
        import dns.rdatatype
        import dns.rrset
        resp = self.real_answer(query)
        q = query.question[0]
        if q.rdtype == dns.rdatatype.IPSECKEY:  # strip every RRSIG
            resp.answer = [r for r in resp.answer if r.rdtype != dns.rdatatype.RRSIG]
        if q.rdtype == dns.rdatatype.SOA and q.name.to_text().startswith("ed25519."):
            soa = dns.rrset.from_text(self.fake_apex, 60, "IN", "SOA",
                                      "ns. h. 1 3600 600 86400 30")
            resp.answer, resp.authority = [], [soa]
            resp.set_rcode(0)
        return resp


@pytest.mark.parametrize("fake_apex", ["example.", "ed25519.oe.example."])
async def test_stripped_signatures_are_bogus_not_insecure(server, fake_apex):
    """A zone apex claimed above the anchor, or a fake cut with no NS, must not make the
    stripped answer look insecure (a downgrade)."""
    _Liar(server, fake_apex)
    a = await _resolver(server).lookup("ed25519.oe.example")
    assert a.status == "bogus", a.reason


async def test_wildcard_answer_needs_its_nsec_proof(server):
    r = _resolver(server)
    assert (await r.lookup("x.wild.oe.example")).status == "secure-key"
    real = server.answer

    def no_proof(query):  # an attacker replays the wildcard answer for a name that exists
        resp = real(query)
        resp.authority = []
        return resp
    server.answer = no_proof
    a = await _resolver(server).lookup("y.wild.oe.example")
    assert a.status == "bogus" and "wildcard" in a.reason


async def test_mangled_answers_never_raise(server):
    """Answers with random bytes changed: every lookup ends in a status, none raises; a
    change the signatures cover is never accepted as secure with a different key."""
    import random
    from oe_agent.dns.resolver import STATUSES
    rng = random.Random(4025)
    real = server.handle_wire
    good = {}

    def mangle(wire, udp):
        out = real(wire, udp)
        if out is None or b"\x00\x2d\x00\x01" not in wire:  # only IPSECKEY IN questions
            return out
        b = bytearray(out)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(12, len(b))] = rng.randrange(256)
        return bytes(b)

    names = ["gw.oe.example", "malformed.oe.example", "192.0.2.5", "nothere.oe.example"]
    for n in names:
        good[n] = {k.key_bytes() for k in (await _resolver(server).lookup(n)).keys}
    server.handle_wire = mangle
    seen = set()
    for i in range(60):
        n = names[i % len(names)]
        a = await _resolver(server, timeout=0.2, attempt_timeout=0.1).lookup(n)
        assert a.status in STATUSES
        seen.add(a.status)
        if a.status == "secure-key":
            assert {k.key_bytes() for k in a.keys} <= good[n]
    assert "bogus" in seen or "timeout" in seen


async def test_dnskey_trust_anchors_and_anchor_file_errors(server, tmp_path):
    from oe_agent.dns.validate import parse_trust_anchors
    lines = [f"{origin} IN DNSKEY {dnskey}" for origin, (_k, dnskey) in server.keys.items()
             if server.parent_of(origin) is None]
    f = tmp_path / "anchors"
    f.write_text("; DNSKEY anchors\n" + "\n".join(lines) + "\n")
    r = KeyResolver([server.address], str(f), "validate")
    assert (await r.lookup("192.0.2.5")).status == "secure-key"
    for bad, words in (("oe.example. IN A 192.0.2.1", "want a DS or DNSKEY"),
                       ("oe.example. DS 1 2", "line 1"),
                       (str(tmp_path / "missing"), "no such file")):
        with pytest.raises(ValueError, match=words):
            parse_trust_anchors(bad)


async def test_lost_datagram_is_retried_within_the_bound(server):
    real, dropped = server.handle_wire, []

    def drop_first(wire, udp):
        if udp and not dropped and b"\x00\x2d\x00\x01" in wire:
            dropped.append(wire)
            return None
        return real(wire, udp)
    server.handle_wire = drop_first
    a = await _resolver(server, timeout=3, attempt_timeout=0.3).lookup("ed448.oe.example")
    assert dropped and a.status == "secure-key"
    assert server.queries[("ed448.oe.example.", "IPSECKEY")] == 1  # the one after the drop


async def test_anchor_with_unsupported_algorithm_is_insecure(server):
    anchor = "oe.example. IN DS 12345 253 2 " + "ab" * 32  # 253: private algorithm
    a = await KeyResolver([server.address], anchor, "validate").lookup("ed25519.oe.example")
    assert a.status == "insecure" and "253" in a.reason and len(a.keys) == 1
