"""UserspaceDataplane decisions without root: two dataplanes wired in memory (no TUN, no
netlink); what the host would see on oe0 and on the wire is recorded."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_agent.esp import packet
from oe_agent.esp.dataplane import ACQUIRE_EXPIRES, UserspaceDataplane
from oe_agent.esp.static import params_from_json, params_to_json
from oe_agent.esp.udp import classify
from oe_agent.errors import UserError
from oe_agent.model import (Acquire, ChildSaParams, EspAlgorithm, Mode, PolicyExpire, SaExpire,
                            ShuntKind, TrafficSelector)

A, B, C = (ipaddress.ip_address(f"192.0.2.{n}") for n in (1, 2, 3))
A6, B6 = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")


class FakeTun:
    def __init__(self):
        self.written: list[bytes] = []

    def write(self, pkt):
        self.written.append(pkt)


class FakeSock:
    def __init__(self):
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data, addr):
        self.sent.append((data, addr))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_dp(clock, **kw) -> UserspaceDataplane:
    dp = UserspaceDataplane(clock=clock, rng=lambda n: bytes(range(7, 7 + n)), **kw)
    dp._tun = FakeTun()
    dp._clear = {socket.AF_INET: FakeSock(), socket.AF_INET6: FakeSock()}
    return dp


def params(local, remote, spi_in, spi_out, key_in, key_out, **kw):
    return ChildSaParams(local=local, remote=remote, spi_in=spi_in, spi_out=spi_out,
                         mode=kw.pop("mode", Mode.TRANSPORT),
                         alg=EspAlgorithm("aes-gcm-16", 128), encr_key_in=key_in,
                         encr_key_out=key_out, encap=(4500, 4500), **kw)


def sa_pair(a=A, b=B, **kw):
    k1, k2 = bytes(range(20)), bytes(range(20, 40))
    return (params(a, b, 0x1001, 0x2002, k1, k2, **kw), params(b, a, 0x2002, 0x1001, k2, k1, **kw))


def udp(src, dst, payload=b"hello", df=True):
    body = struct.pack("!HHHH", 1234, 5678, 8 + len(payload), 0) + payload
    body = packet.fix_l4_checksum(src, dst, packet.PROTO_UDP, body)  # v6 needs one
    if src.version == 4:
        return packet.build_ipv4(src, dst, packet.PROTO_UDP, body, df=df)
    return packet.build_ipv6(src, dst, packet.PROTO_UDP, body)


def events_now(dp) -> list:
    out = []
    while not dp._events.empty():
        out.append(dp._events.get_nowait())
    return out


@pytest.fixture
def wired():
    """Dataplanes for A and B; A's ESP datagrams go to B and back."""
    clock = Clock()
    a, b = make_dp(clock), make_dp(clock)
    wire: list[tuple[str, bytes, tuple]] = []
    a.attach_udp(lambda d, local, addr: (wire.append(("a->b", d, addr)),
                                         b.on_esp(d, (B, 4500), (A, 4500))))
    b.attach_udp(lambda d, local, addr: (wire.append(("b->a", d, addr)),
                                         a.on_esp(d, (A, 4500), (B, 4500))))
    return clock, a, b, wire


async def test_sa_carries_packets_both_ways(wired):
    clock, a, b, wire = wired
    pa, pb = sa_pair()
    await a.add_child_sa(pa)
    await b.add_child_sa(pb)
    assert a._routes == {ipaddress.ip_network(f"{B}/32"): "oe0"}
    pkt = udp(A, B, b"secret")
    a.outbound(pkt, clock())
    assert b._tun.written == [pkt]
    assert wire[0][0] == "a->b" and wire[0][2] == (str(B), 4500) and b"secret" not in wire[0][1]
    assert classify(wire[0][1]) == "esp"
    b.outbound(udp(B, A, b"answer"), clock())
    assert a._tun.written == [udp(B, A, b"answer")]
    counters = {(c.spi, c.packets) for c in await a.counters()}
    assert counters == {(0x1001, 1), (0x2002, 1)}
    # a replayed datagram is refused and counted
    b.esp_received(wire[0][1], (str(A), 4500))
    assert len(b._tun.written) == 1 and b.stats["in-replay"] == 1
    # an unknown SPI from a peer with an SA may be its next SA's: kept briefly, then counted
    b.esp_received(b"\x00\x00\x99\x99" + bytes(40), (str(A), 4500))
    assert b.stats["early-esp"] == 1 and b.stats["unknown-spi"] == 0
    clock.t += 2.5
    b.poll(clock())
    assert b.stats["unknown-spi"] == 1 and not b._early
    # from a stranger: counted at once, never kept
    b.esp_received(b"\x00\x00\x99\x99" + bytes(40), ("203.0.113.9", 4500))
    assert b.stats["unknown-spi"] == 2 and b.stats["early-esp"] == 1


async def test_early_esp_is_delivered_once_its_sa_is_in(wired):
    """The responder may send on a new SA before the initiator has checked its AUTH and
    installed the pair: that ESP waits (bounded) and is decrypted when the SA comes."""
    clock, a, b, wire = wired
    pa, pb = sa_pair()
    await a.add_child_sa(pa)
    await b.add_child_sa(pb)
    # a sends on its new SA before b has installed it
    k1, k2 = bytes(range(40, 60)), bytes(range(60, 80))
    na = params(A, B, 0x1003, 0x2004, k1, k2)
    nb = params(B, A, 0x2004, 0x1003, k2, k1)
    await a.add_child_sa(na)
    await a.del_child_sa(pa)  # a now sends on 0x2004 only
    a.outbound(udp(A, B, b"early"), clock())
    assert b._tun.written == [] and b.stats["early-esp"] == 1
    await b.add_child_sa(nb)
    assert b._tun.written == [udp(A, B, b"early")]
    assert b.stats["early-esp-delivered"] == 1 and not b._early


async def test_trap_acquire_hold_release_on_sa(wired):
    clock, a, b, wire = wired
    await a.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    assert a._routes == {ipaddress.ip_network("192.0.2.0/24"): "oe0"}
    first, second = udp(A, B, b"one"), udp(A, B, b"two")
    a.outbound(first, clock())
    a.outbound(second, clock())
    evs = events_now(a)
    assert evs == [Acquire(A, B, packet.PROTO_UDP, 1234, 5678, packet=first)]  # one acquire
    assert wire == []
    await a.set_shunt(A, B, ShuntKind.HOLD, 0)
    a.outbound(udp(A, B, b"three"), clock())
    pa, pb = sa_pair()
    await b.add_child_sa(pb)
    await a.add_child_sa(pa)  # releases the held packets through the new SA, in order
    assert b._tun.written == [first, second, udp(A, B, b"three")]
    assert events_now(a) == []


async def test_hold_is_bounded(wired):
    clock, a, _, _ = wired
    a.hold_max = 4
    await a.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    for i in range(10):
        a.outbound(udp(A, B, bytes([i])), clock())
    assert len(a._held[B].packets) == 4 and a.stats["hold-overflow"] == 6
    assert a._held[B].packets[0] == udp(A, B, bytes([6]))  # the newest are kept


async def test_failure_shunts_pass_releases_clear_drop_discards(wired):
    clock, a, _, _ = wired
    await a.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    a.outbound(udp(A, B), clock())
    a.outbound(udp(A, C), clock())
    assert [e.dst for e in events_now(a)] == [B, C]
    await a.set_shunt(A, B, ShuntKind.PASS, 60)
    assert a._clear[socket.AF_INET].sent == [(udp(A, B), (str(B), 0))]
    assert a._routes[ipaddress.ip_network(f"{B}/32")] == "throw"  # a route exception
    await a.set_shunt(A, C, ShuntKind.DROP, 60)
    assert a.stats["shunt-drop"] == 1 and C not in a._held
    a.outbound(udp(A, C), clock())
    assert a.stats["shunt-drop"] == 2
    # expiry restores the trap exactly and is reported
    clock.t += 61
    a.poll(clock())
    evs = events_now(a)
    assert PolicyExpire(ipaddress.ip_network(f"{A}/32"), ipaddress.ip_network(f"{B}/32"), 0,
                        True) in evs and len(evs) == 2
    while a._dirty:
        await a._sync_route(a._dirty.pop())
    assert ipaddress.ip_network(f"{B}/32") not in a._routes
    a.outbound(udp(A, B), clock())
    assert isinstance(events_now(a)[0], Acquire)


async def test_acquire_repeats_after_larval_expiry(wired):
    clock, a, _, _ = wired
    await a.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    a.outbound(udp(A, B), clock())
    clock.t += ACQUIRE_EXPIRES - 1
    a.outbound(udp(A, B), clock())
    assert len(events_now(a)) == 1
    clock.t += 2
    a.poll(clock())
    assert B not in a._held  # nobody answered the acquire: the held packets are gone
    a.outbound(udp(A, B), clock())
    assert len(events_now(a)) == 1


async def test_block_drops_and_pass_sends_clear(wired):
    clock, a, _, _ = wired
    await a.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    await a.set_block(ipaddress.ip_network(f"{C}/32"))
    await a.set_pass(ipaddress.ip_network("192.0.2.0/24"), packet.PROTO_UDP, 53)
    assert (ipaddress.ip_network("192.0.2.0/24"), 17, 53) in a._port_rules
    a.outbound(udp(A, C), clock())
    assert a.stats["blocked"] == 1 and events_now(a) == []
    dns = packet.build_ipv4(A, B, 17, struct.pack("!HHHH", 999, 53, 8, 0))
    a.outbound(dns, clock())
    assert a._clear[socket.AF_INET].sent == [(dns, (str(B), 0))]
    await a.remove_group_policy(ipaddress.ip_network(f"{C}/32"))
    assert ipaddress.ip_network(f"{C}/32") not in a._routes
    await a.set_pass(ipaddress.ip_network(f"{C}/32"))
    assert a._routes[ipaddress.ip_network(f"{C}/32")] == "throw"


async def test_too_big_with_df_gets_icmp_back(wired):
    clock, a, b, wire = wired
    pa, pb = sa_pair()
    await a.add_child_sa(pa)
    big = udp(A, B, bytes(1490))
    a.outbound(big, clock())
    assert wire == [] and a.stats["too-big"] == 1
    icmp = a._tun.written[0]
    info = packet.parse(icmp)
    assert (info.src, info.dst, info.proto) == (B, A, packet.PROTO_ICMP)
    assert icmp[20:22] == b"\x03\x04" and packet.checksum(icmp[20:]) == 0
    mtu = struct.unpack_from("!H", icmp, 26)[0]
    assert 1400 < mtu < 1500 and icmp[28:48] == big[:20]
    a.outbound(udp(A, B, bytes(mtu - 28)), clock())  # what the ICMP allows does fit
    assert len(wire) == 1 and len(wire[0][1]) + 28 <= 1500
    a.outbound(udp(A, B, bytes(1490), df=False), clock())  # no DF: sent, the kernel fragments
    assert len(wire) == 2


async def test_too_big_ipv6_packet_too_big(wired):
    clock, a, _, wire = wired
    pa, _ = sa_pair(A6, B6, mode=Mode.TUNNEL)
    await a.add_child_sa(pa)
    a.outbound(udp(A6, B6, bytes(1450)), clock())
    icmp = a._tun.written[0]
    info = packet.parse(icmp)
    assert (info.src, info.dst, info.proto, info.sport) == (B6, A6, packet.PROTO_ICMPV6, 2)
    assert len(icmp) <= 1280


async def old_and_new(a, b):
    """The old pair installed on both sides, and the params of a newer pair (not installed)."""
    p_old = sa_pair()
    await a.add_child_sa(p_old[0])
    await b.add_child_sa(p_old[1])
    k1, k2 = bytes(range(50, 70)), bytes(range(70, 90))
    return p_old, params(A, B, 0x3003, 0x4004, k1, k2), params(B, A, 0x4004, 0x3003, k2, k1)


async def test_rekey_new_sa_carries_traffic_old_still_received(wired):
    clock, a, b, wire = wired
    p_old, new_a, new_b = await old_and_new(a, b)
    await b.add_child_sa(new_b)
    await a.add_child_sa(new_a)
    a.outbound(udp(A, B), clock())
    assert wire[-1][1][:4] == struct.pack("!I", 0x4004)
    await a.del_child_sa(p_old[0])
    assert a._routes == {ipaddress.ip_network(f"{B}/32"): "oe0"}  # still wanted by the new SA
    await a.del_child_sa(new_a)
    assert a._routes == {}


async def test_a_rekey_we_answered_sends_on_the_old_pair_until_add_outbound(wired):
    clock, a, b, wire = wired
    p_old, new_a, new_b = await old_and_new(a, b)
    await a.add_child_sa(new_a, outbound=False)  # the peer (B) does not have it yet
    a.outbound(udp(A, B), clock())
    assert wire[-1][1][:4] == struct.pack("!I", p_old[0].spi_out)
    await b.add_child_sa(new_b)
    b.outbound(udp(B, A, b"on the new pair"), clock())  # the new pair receives at once
    assert wire[-1][1][:4] == struct.pack("!I", 0x3003)
    assert a._tun.written[-1] == udp(B, A, b"on the new pair")
    await a.add_outbound(new_a)
    a.outbound(udp(A, B), clock())
    assert wire[-1][1][:4] == struct.pack("!I", 0x4004)
    await a.del_child_sa(new_a)  # before or after add_outbound: nothing of it stays
    await a.add_outbound(new_a)
    a.outbound(udp(A, B), clock())
    assert wire[-1][1][:4] == struct.pack("!I", p_old[0].spi_out)


async def test_a_going_pair_stops_sending_and_still_receives(wired):
    clock, a, b, wire = wired
    p_old, new_a, new_b = await old_and_new(a, b)
    await a.add_child_sa(new_a)
    await b.add_child_sa(new_b)
    await a.del_outbound(new_a)  # the newer pair is going
    a.outbound(udp(A, B), clock())
    assert wire[-1][1][:4] == struct.pack("!I", p_old[0].spi_out)
    b.outbound(udp(B, A, b"late on the going pair"), clock())
    assert a._tun.written[-1] == udp(B, A, b"late on the going pair")
    await a.del_child_sa(new_a)
    await a.del_child_sa(p_old[0])
    assert a._routes == {} and a._wide_sa_nets == 0


async def test_lifetime_events_reach_the_queue(wired):
    clock, a, b, _ = wired
    pa, pb = sa_pair(lifetime_soft_packets=1, lifetime_soft_s=5, lifetime_hard_s=10)
    await a.add_child_sa(pa)
    await b.add_child_sa(pb)
    a.outbound(udp(A, B), clock())
    assert events_now(a) == [SaExpire(0x2002, B, False)]
    assert events_now(b) == [SaExpire(0x2002, B, False)]
    assert a.poll(clock()) == 1005.0
    clock.t += 10
    a.poll(clock())
    assert {(e.spi, e.hard) for e in events_now(a)} == {(0x1001, True), (0x2002, True)}
    assert a.child_sa(0x1001) is None  # hard expiry removes the pair, as the kernel does
    assert a._dirty == {ipaddress.ip_network(f"{B}/32")}


async def test_hard_packet_limit_removes_sa_then_trap_acquires(wired):
    clock, a, b, wire = wired
    await a.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    pa, pb = sa_pair(lifetime_hard_packets=2)
    await a.add_child_sa(pa)
    await b.add_child_sa(pb)
    a.outbound(udp(A, B), clock())
    a.outbound(udp(A, B), clock())
    assert len(wire) == 2
    assert [e.hard for e in events_now(a)] == [True]
    a.outbound(udp(A, B), clock())
    assert len(wire) == 2 and isinstance(events_now(a)[0], Acquire)


async def test_static_json_round_trip_and_errors():
    pa, _ = sa_pair(A6, B6, mode=Mode.TUNNEL)
    assert params_from_json(params_to_json(pa)) == pa
    with pytest.raises(UserError, match="unknown field"):
        params_from_json({**params_to_json(pa), "colour": "red"})
    with pytest.raises(UserError, match="bad or missing"):
        params_from_json({k: v for k, v in params_to_json(pa).items() if k != "remote"})
    with pytest.raises(UserError, match="underlay MTU"):
        UserspaceDataplane(underlay_mtu=1300)
    dp = make_dp(Clock())
    with pytest.raises(UserError, match="key material"):
        await dp.add_child_sa(ChildSaParams(**{**pa.__dict__, "encr_key_in": b"short"}))
    with pytest.raises(UserError, match="raw ESP"):
        await dp.add_child_sa(ChildSaParams(**{**pa.__dict__, "encap": None}))


async def test_link_chatter_is_not_sent_anywhere(wired):
    clock, a, _, _ = wired
    a.outbound(udp(ipaddress.ip_address("fe80::1"), ipaddress.ip_address("ff02::2")), clock())
    assert a.stats["not-routed"] == 1 and not a._clear[socket.AF_INET6].sent
    a.outbound(b"\x45garbage", clock())
    assert a.stats["malformed"] == 1


def test_port_4500_split():
    assert classify(b"\xff") == "keepalive"
    assert classify(b"\0\0\0\0" + bytes(28)) == "ike"
    assert classify(b"\x01\x02\x03\x04" + bytes(8)) == "esp"
    assert classify(b"\x01\x02") == "invalid"


_fuzz = {}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), known_spi=st.booleans())
def test_arbitrary_datagrams_into_the_dataplane_never_raise(data, known_spi):
    if not _fuzz:
        dp = make_dp(Clock())
        asyncio.run(dp.add_child_sa(sa_pair()[0]))
        _fuzz["dp"] = dp
    dp = _fuzz["dp"]
    dp.esp_received((struct.pack("!I", 0x1001) if known_spi else b"") + data, (str(B), 4500))
    dp.outbound(data, 0.0)
    assert dp._tun.written == []


def fragments(pkt: bytes, size: int) -> list[bytes]:
    """The host's own fragmentation of `pkt` into pieces of `size` payload bytes (a multiple
    of 8), IPv4 (RFC 791) or IPv6 with a fragment header (RFC 8200 §4.5)."""
    info = packet.parse(pkt)
    body = pkt[info.header_len:]
    out = []
    for off in range(0, len(body), size):
        more = off + size < len(body)
        piece = body[off:off + size]
        if info.version == 4:
            hdr = bytearray(pkt[:20])
            hdr[2:4] = struct.pack("!H", 20 + len(piece))
            hdr[4:6] = b"\x12\x34"
            hdr[6:8] = struct.pack("!H", (off // 8) | (0x2000 if more else 0))
            hdr[10:12] = b"\0\0"
            hdr[10:12] = struct.pack("!H", packet.checksum(bytes(hdr)))
            out.append(bytes(hdr) + piece)
        else:
            fh = struct.pack("!BBHI", info.proto, 0, off | (1 if more else 0), 0xABCD)
            out.append(packet.build_ipv6(info.src, info.dst, 44, fh + piece))
    return out


@pytest.mark.parametrize("v", [4, 6])
async def test_transport_mode_reassembles_the_hosts_fragments(wired, v):
    clock, a, b, wire = wired
    src, dst = (A, B) if v == 4 else (A6, B6)
    pa, pb = sa_pair(src, dst)
    await a.add_child_sa(pa)
    await b.add_child_sa(pb)
    whole = udp(src, dst, bytes(range(256)) * 12, df=False)
    frags = fragments(whole, 1232)
    assert len(frags) == 3
    for f in reversed(frags):  # out of order, as may happen
        a.outbound(f, clock())
    assert len(wire) == 1  # one ESP packet carries the whole datagram
    got = b._tun.written[0]
    assert packet.parse(got)[1:4] == packet.parse(whole)[1:4]
    assert got[packet.parse(got).header_len:] == whole[packet.parse(whole).header_len:]


def test_reassembler_is_bounded():
    r = packet.Reassembler(max_datagrams=2, timeout=5)
    for n in range(3):
        f = fragments(udp(A, ipaddress.ip_address(f"192.0.2.{10 + n}"), bytes(100)), 48)[0]
        assert r.add(f, packet.parse(f), 0.0) is None
    assert r.dropped == 1
    f = fragments(udp(A, C, bytes(100)), 48)[0]
    r.add(f, packet.parse(f), 10.0)  # the two stale ones time out
    assert r.dropped == 3 and len(r._parts) == 1


async def test_hold_shunt_expiry_drops_what_it_held(wired):
    clock, a, _, _ = wired
    await a.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    a.outbound(udp(A, B), clock())
    await a.set_shunt(A, B, ShuntKind.HOLD, 10)
    a.outbound(udp(A, B), clock())
    assert len(a._held[B].packets) == 2
    clock.t += 11
    a.poll(clock())
    assert B not in a._held and a.stats["shunt-drop"] == 2


def test_raw_ipv4_socket_strips_the_ip_header():
    from oe_agent.esp.udp import RawEsp
    got = []
    raw = RawEsp(lambda d, addr: got.append(d), mark=1)
    esp = struct.pack("!II", 0x1234, 1) + bytes(40)
    raw._strip_v4(packet.build_ipv4(B, A, packet.PROTO_ESP, esp), (str(B), 0))
    raw._strip_v4(b"\x60" + bytes(50), (str(B), 0))  # not IPv4: ignored
    assert got == [esp]


async def test_attach_udp_takes_both_sender_shapes():
    clock = Clock()
    pa, _ = sa_pair()
    sent = []
    for sender in (lambda data, addr: sent.append(("2", addr)),
                   lambda data, local, remote: sent.append(("3", local, remote))):
        dp = make_dp(clock)
        dp.attach_udp(sender)
        await dp.add_child_sa(pa)
        dp.outbound(udp(A, B), clock())
    assert sent == [("2", (str(B), 4500)), ("3", (str(A), 4500), (str(B), 4500))]


async def test_longest_prefix_then_most_specific_port():
    dp = make_dp(Clock())
    await dp.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    await dp.set_pass(ipaddress.ip_network("192.0.2.0/25"))
    await dp.set_block(ipaddress.ip_network("192.0.2.0/25"), packet.PROTO_UDP)
    await dp.set_trap(ipaddress.ip_network("192.0.2.0/25"), packet.PROTO_UDP, 5678)
    await dp.set_block(ipaddress.ip_network("192.0.2.2/32"), packet.PROTO_TCP, 22)

    def kind(dst, proto=packet.PROTO_UDP, dport=5678):
        info = packet.parse(udp(A, ipaddress.ip_address(dst)))._replace(proto=proto, dport=dport)
        return dp.policy_for(info)

    assert kind("192.0.2.200") == "trap"
    assert kind("192.0.2.100") == "trap"  # /25 udp 5678
    assert kind("192.0.2.100", dport=53) == "block"  # /25 udp
    assert kind("192.0.2.100", packet.PROTO_ICMP, 0) == "pass"  # /25
    assert kind("192.0.2.2", packet.PROTO_TCP, 22) == "block"  # /32 tcp 22
    assert kind("192.0.2.2", packet.PROTO_TCP, 80) == "pass"  # /32 has no tcp 80: /25 wins
    assert kind("198.51.100.1") is None
    # the /25 carries trap/block for some ports: it must route into oe0, pass decided here
    assert dp._routes[ipaddress.ip_network("192.0.2.0/25")] == "oe0"
    await dp.set_shunt(A, B, ShuntKind.PASS, 0)
    assert dp._routes[ipaddress.ip_network(f"{B}/32")] == "throw"
    await dp.clear_shunt(A, B)
    assert dp._routes[ipaddress.ip_network(f"{B}/32")] == "oe0"  # its tcp/22 block remains


async def test_alloc_spi_never_repeats_and_skips_reserved_range():
    seq = iter([b"\0\0\0\x05", b"\0\0\x10\x00", b"\0\0\x10\x00", b"\0\0\x20\x00"])
    dp = UserspaceDataplane(rng=lambda n: next(seq))
    assert await dp.alloc_spi(A, B) == 0x1000  # 5 is reserved by RFC 4303 §2.1
    assert await dp.alloc_spi(A, B) == 0x2000  # 0x1000 is taken until its SA comes


def test_tun_name_checked_before_anything_is_opened():
    from oe_agent.esp.tun import TunDevice
    for bad in ("", "x" * 16, "a/b", " oe0"):
        with pytest.raises(UserError, match="bad TUN interface name"):
            TunDevice(bad)


def test_effective_block_is_longest_prefix():
    from oe_agent.esp.inbound import effective_block
    n = ipaddress.ip_network
    got = effective_block([(n("203.0.113.0/24"), "block"), (n("203.0.113.0/26"), "pass"),
                           (n("203.0.113.8/29"), "block"), (n("203.0.113.128/25"), "trap"),
                           (n("2001:db8:b::/48"), "block"), (n("198.51.100.0/24"), "pass")])
    assert got == [n("203.0.113.8/29"), n("203.0.113.64/26"), n("2001:db8:b::/48")]
    assert effective_block([(n("192.0.2.0/24"), "trap")]) == []


class RecordingNft:
    """NftInbound's interface, recording each transaction (the real one runs `nft`)."""

    def __init__(self, fail_update: bool = False):
        self.calls: list[tuple] = []
        self.fail_update = fail_update
        self.error = ""

    async def update(self, kind, add, remove):
        self.calls.append(("update", kind, set(add), set(remove)))
        if self.fail_update:
            self.error = "element does not exist"
        return not self.fail_update

    async def apply(self, nets, kind="block"):
        self.calls.append(("apply", kind, set(nets)))
        return True


def peer_sa(n: int, **kw):
    k = bytes(range(20))
    return params(A, ipaddress.ip_address(f"198.51.100.{n}"), 0x1000 + n, 0x2000 + n, k, k, **kw)


async def test_coalesce_syncs_the_inbound_sa_set_once_by_difference():
    dp = make_dp(Clock())
    dp._inbound, dp.inbound_block = RecordingNft(), True
    host = lambda n: ipaddress.ip_network(f"198.51.100.{n}/32")  # noqa: E731
    async with dp.coalesce():
        for n in (1, 2, 3):
            await dp.add_child_sa(peer_sa(n))
        assert dp._inbound.calls == [] and dp._routes == {}  # nothing reached the kernel yet
    assert dp._inbound.calls == [("update", "sa", {host(1), host(2), host(3)}, set())]
    assert set(dp._routes) == {host(1), host(2), host(3)}
    await dp.del_child_sa(peer_sa(2))  # outside coalesce(): at once, only the difference
    assert dp._inbound.calls[-1] == ("update", "sa", set(), {host(2)})
    await dp.add_child_sa(peer_sa(4, lifetime_hard_s=60))  # a second SA for a known peer
    k = bytes(range(20, 40))
    await dp.add_child_sa(params(A, ipaddress.ip_address("198.51.100.4"), 0x3004, 0x4004, k, k))
    assert dp._inbound.calls[-1] == ("update", "sa", {host(4)}, set())  # no second update


async def test_a_failed_incremental_update_re_applies_the_whole_set():
    dp = make_dp(Clock())
    dp._inbound, dp.inbound_block = RecordingNft(fail_update=True), True
    await dp.add_child_sa(peer_sa(1))
    await dp.add_child_sa(peer_sa(2))
    nets = {ipaddress.ip_network(f"198.51.100.{n}/32") for n in (1, 2)}
    assert dp._inbound.calls[-1] == ("apply", "sa", nets)
    assert dp._in_applied == nets


async def test_inbound_sa_elements_stay_disjoint():
    """A host inside a tunnel SA's network is not a separate element (interval sets refuse
    overlaps); it becomes one again when the wide SA goes."""
    dp = make_dp(Clock())
    dp._inbound, dp.inbound_block = RecordingNft(), True
    await dp.add_child_sa(peer_sa(1))
    k = bytes(range(20))
    wide = params(A, ipaddress.ip_address("198.51.100.200"), 0x5000, 0x6000, k, k,
                  mode=Mode.TUNNEL, ts_remote=(TrafficSelector.from_network(
                      ipaddress.ip_network("198.51.100.0/24")),))
    await dp.add_child_sa(wide)
    net24, host1 = ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("198.51.100.1/32")
    assert dp._inbound.calls[-1] == ("update", "sa", {net24}, {host1})
    await dp.del_child_sa(wide)
    assert dp._inbound.calls[-1] == ("update", "sa", {host1}, {net24})


async def test_an_sa_host_route_is_left_to_a_covering_trap_route():
    """Inside a trap route of ours, an SA's packets reach oe0 anyway: no /32 per SA (a storm
    would cost a netlink request each). Without that route the /32 appears again."""
    dp = make_dp(Clock())
    net = ipaddress.ip_network("198.51.100.0/24")
    host = ipaddress.ip_network("198.51.100.1/32")
    await dp.set_trap(net)
    await dp.add_child_sa(peer_sa(1))
    assert dp._routes == {net: "oe0"}
    await dp.remove_group_policy(net)
    assert dp._routes == {host: "oe0"}
    await dp.set_pass(net)  # a pass route would send it around oe0: the /32 stays
    assert dp._routes == {net: "throw", host: "oe0"}
    await dp.set_trap(net)
    assert dp._routes == {net: "oe0"}
    await dp.del_child_sa(peer_sa(1))
    assert dp._routes == {net: "oe0"}


async def test_deadlines_follow_the_live_shunt_only():
    """A replaced shunt's old expiry does nothing; the heap of deadlines stays bounded."""
    clock = Clock()
    dp = make_dp(clock)
    await dp.set_trap(ipaddress.ip_network("192.0.2.0/24"))
    await dp.set_shunt(A, B, ShuntKind.PASS, 10)
    await dp.set_shunt(A, B, ShuntKind.HOLD, 60)
    clock.t += 11
    assert dp.poll(clock()) == 1060.0 and events_now(dp) == [] and B in dp._shunts
    clock.t += 50
    assert dp.poll(clock()) is None
    assert events_now(dp) == [PolicyExpire(ipaddress.ip_network(f"{A}/32"),
                                           ipaddress.ip_network(f"{B}/32"), 0, True)]
    for i in range(1000):
        await dp.set_shunt(A, B, ShuntKind.HOLD, 60 + i)
    assert len(dp._deadlines) <= 64 + 4 * 2


async def test_policy_lookup_by_prefix_ipv6():
    dp = make_dp(Clock())
    await dp.set_trap(ipaddress.ip_network("2001:db8:b::/64"))
    await dp.set_block(ipaddress.ip_network("2001:db8:b::40/122"))
    assert dp.policy_for(packet.parse(udp(A6, ipaddress.ip_address("2001:db8:b::1")))) == "trap"
    assert dp.policy_for(packet.parse(udp(A6, ipaddress.ip_address("2001:db8:b::7f")))) == "block"
    assert dp.policy_for(packet.parse(udp(A6, ipaddress.ip_address("2001:db8:c::1")))) is None
    await dp.remove_group_policy(ipaddress.ip_network("2001:db8:b::40/122"))
    assert dp.policy_for(packet.parse(udp(A6, ipaddress.ip_address("2001:db8:b::7f")))) == "trap"


async def test_counters_for_some_sas_only(wired):
    clock, a, b, wire = wired
    pa, pb = sa_pair()
    await a.add_child_sa(pa)
    await a.add_child_sa(peer_sa(9))
    a.outbound(udp(A, B, b"x"), clock())
    rows = await a.counters_for([pa.spi_in, 0x4242])
    assert {(c.spi, c.packets) for c in rows} == {(pa.spi_in, 0), (pa.spi_out, 1)}
    assert len(await a.counters()) == 4
