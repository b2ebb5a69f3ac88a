"""Sans-I/O ESP (oe_agent.esp.sa): real vectors, anti-replay, tampering, ESN, lifetimes, modes."""
from __future__ import annotations

import ipaddress
import re
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_agent.esp import packet
from oe_agent.esp.sa import ChildSa, EspError, EspSa, Lifetime, ReplayWindow, make_transform
from oe_agent.model import ChildSaParams, EspAlgorithm, Mode, SaExpire, TrafficSelector
from tests.conftest import SHARED, needs

A4, B4 = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
A6, B6 = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")

ALGS = {
    "aes-gcm-16-128": (EspAlgorithm("aes-gcm-16", 128), 20, 0),
    "aes-gcm-16-256": (EspAlgorithm("aes-gcm-16", 256), 36, 0),
    "aes-cbc-128": (EspAlgorithm("aes-cbc", 128, "hmac-sha2-256-128"), 16, 32),
    "aes-cbc-256": (EspAlgorithm("aes-cbc", 256, "hmac-sha2-256-128"), 32, 32),
    "chacha20-poly1305": (EspAlgorithm("chacha20-poly1305", 256), 36, 0),
}


def _rng_counter():
    n = iter(range(1 << 30))
    return lambda k: next(n).to_bytes(k, "big")


def pair(alg="aes-gcm-16-128", mode=Mode.TRANSPORT, v=4, esn=False, window=64, **life):
    """Matching ChildSa objects for the two ends (a's out = b's in)."""
    a_alg, klen, ilen = ALGS[alg]
    k1, k2 = bytes(range(1, klen + 1)), bytes(range(100, 100 + klen))
    i1, i2 = bytes([7]) * ilen, bytes([9]) * ilen
    a, b = (A4, B4) if v == 4 else (A6, B6)
    pa = ChildSaParams(local=a, remote=b, spi_in=0x1001, spi_out=0x2002, mode=mode, alg=a_alg,
                       encr_key_in=k1, encr_key_out=k2, integ_key_in=i1, integ_key_out=i2,
                       esn=esn, replay_window=window, **life)
    pb = ChildSaParams(local=b, remote=a, spi_in=0x2002, spi_out=0x1001, mode=mode, alg=a_alg,
                       encr_key_in=k2, encr_key_out=k1, integ_key_in=i2, integ_key_out=i1,
                       esn=esn, replay_window=window, **life)
    return ChildSa(pa, 0.0, _rng_counter()), ChildSa(pb, 0.0, _rng_counter())


def udp_packet(src, dst, payload=b"canary-plaintext", sport=4000, dport=5000):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return packet.build_ip(src, dst, packet.PROTO_UDP, udp)


# --- the real capture (strongSwan 5.9.8 kernel-libipsec, ESP-in-UDP, AES-GCM-16-128, tunnel) ---

def _pcap_records(data: bytes):
    """Ethernet frames of a classic little-endian pcap file (magic a1b2c3d4)."""
    assert data[:4] == bytes.fromhex("d4c3b2a1"), "not a little-endian classic pcap"
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        yield data[off + 16:off + 16 + incl]
        off += 16 + incl


@pytest.fixture(scope="module")
def capture():
    vec = SHARED / "vectors"
    needs((vec / "ike-ed25519-espinudp.pcap").is_file(), f"{vec} (shared ESP vectors)")
    keys = (vec / "ike-ed25519-espinudp.keys.txt").read_text()
    sas = {spi: (src, dst, bytes.fromhex(k)) for src, dst, spi, k in re.findall(
        r'"IPv4","([\d.]+)","([\d.]+)","0x(\w+)","AES-GCM[^"]*","0x(\w+)"', keys)}
    esp = []
    for frame in _pcap_records((vec / "ike-ed25519-espinudp.pcap").read_bytes()):
        ip = frame[14:]
        info = packet.parse(ip)
        if info.proto != packet.PROTO_UDP or info.dport != 4500:
            continue
        payload = ip[info.header_len + 8:]
        if payload[:4] != b"\0\0\0\0":  # RFC 3948 §2.2: non-ESP marker = IKE
            esp.append((info.src, info.dst, payload))
    return sas, esp


def _vector_sa(sas, local, remote) -> ChildSa:
    (spi_in, (_, _, k_in)), = [(s, v) for s, v in sas.items() if v[1] == str(local)]
    (spi_out, (_, _, k_out)), = [(s, v) for s, v in sas.items() if v[1] == str(remote)]
    return ChildSa(ChildSaParams(
        local=local, remote=remote, spi_in=int(spi_in, 16), spi_out=int(spi_out, 16),
        mode=Mode.TUNNEL, alg=EspAlgorithm("aes-gcm-16", 128), encr_key_in=k_in,
        encr_key_out=k_out, encap=(4500, 4500)))


def test_capture_esp_packets_decrypt(capture):
    sas, esp = capture
    assert len(esp) == 4
    ends = {A4: _vector_sa(sas, A4, B4), B4: _vector_sa(sas, B4, A4)}
    kinds = []
    for src, dst, datagram in esp:
        inner = ends[dst].unprotect(datagram, now=1.0)
        info = packet.parse(inner)
        assert (info.src, info.dst, info.proto) == (src, dst, packet.PROTO_ICMP)
        kinds.append(info.sport)  # ICMP type
        assert packet.checksum(inner[:20]) == 0  # inner IPv4 header intact
    assert kinds == [8, 0, 8, 0]  # echo request, reply, request, reply
    assert ends[B4].inbound.stats.packets == 2 and ends[A4].inbound.stats.packets == 2
    # the same packet again is a replay
    with pytest.raises(EspError) as e:
        ends[esp[0][1]].unprotect(esp[0][2], now=2.0)
    assert e.value.reason == "replay" and ends[B4].inbound.stats.replayed == 1


def test_capture_reseal_is_byte_identical(capture):
    """Sealing the decrypted inner packet with charon's IV and sequence number gives back the
    captured ESP packet exactly: same AAD, nonce, padding and trailer as strongSwan."""
    sas, esp = capture
    src, dst, datagram = esp[0]
    rx, tx = _vector_sa(sas, dst, src), _vector_sa(sas, src, dst)
    inner = rx.unprotect(datagram, now=0.0)
    tx.outbound.seq = struct.unpack_from("!I", datagram, 4)[0] - 1
    assert tx.outbound.seal(packet.PROTO_IPIP, inner, 0.0, iv=datagram[8:16]) == datagram


def test_capture_tampered_packets_dropped_and_counted(capture):
    sas, esp = capture
    src, dst, datagram = esp[0]
    rx = _vector_sa(sas, dst, src)
    for pos in (5, 9, 20, len(datagram) - 1):  # seq, IV, ciphertext, ICV
        bad = bytearray(datagram)
        bad[pos] ^= 0x40
        with pytest.raises(EspError) as e:
            rx.unprotect(bytes(bad), now=0.0)
        assert e.value.reason in ("integrity", "replay")
    assert rx.inbound.stats.integrity_failed == 4
    assert rx.inbound.stats.packets == 0
    rx.unprotect(datagram, now=0.0)  # the genuine packet still passes: tampering moved nothing
    assert rx.inbound.stats.packets == 1


# --- independent constructions of the three transforms --------------------------------------

def test_gcm_layout_matches_rfc4106():
    """RFC 4106 §3-5: nonce = salt || IV, AAD = SPI || seq, ICV 16, pad to 4 bytes."""
    key, salt = bytes(range(16)), b"\xca\xfe\xba\xbe"
    sa = EspSa(0x12345678, B4, make_transform(EspAlgorithm("aes-gcm-16", 128), key + salt))
    out = sa.seal(17, b"abcdef", 0.0)
    spi_seq = struct.pack("!II", 0x12345678, 1)
    iv = (1).to_bytes(8, "big")
    plain = b"abcdef" + b"\x00\x11"  # 6 + 2 is already a multiple of 4: no padding
    assert out == spi_seq + iv + AESGCM(key).encrypt(salt + iv, plain, spi_seq)


def test_gcm_esn_aad_has_high_bits():
    """RFC 4106 §5: with ESN the AAD is SPI || seq high || seq low (12 bytes)."""
    key = bytes(range(20))
    sa = EspSa(0x1000, B4, make_transform(EspAlgorithm("aes-gcm-16", 128), key), esn=True)
    sa.seq = (5 << 32) + 6
    out = sa.seal(6, b"xy", 0.0)
    iv = ((5 << 32) + 7).to_bytes(8, "big")
    aad = struct.pack("!III", 0x1000, 5, 7)
    assert out[4:8] == struct.pack("!I", 7) and out[8:16] == iv
    assert AESGCM(key[:16]).decrypt(key[16:] + iv, out[16:], aad) == b"xy\x00\x06"


def test_chacha_layout_matches_rfc7634():
    """RFC 7634 §2-3: key 32 + salt 4, nonce = salt || IV, AAD as RFC 4106."""
    key = bytes(range(36))
    sa = EspSa(0xABCDEF, B4, make_transform(EspAlgorithm("chacha20-poly1305", 256), key))
    out = sa.seal(4, b"12345", 0.0)
    iv = (1).to_bytes(8, "big")
    plain = ChaCha20Poly1305(key[:32]).decrypt(key[32:] + iv, out[16:], out[:8])
    assert plain == b"12345\x01\x01\x04"


def test_chacha_esn_aad_against_rfc7539_aead_example():
    """RFC 7539 §2.8.2's AEAD example has exactly ESP's shape under RFC 7634 with ESN: key
    80..9f, nonce = salt 07000000 || IV 4041424344454647, 12-byte AAD 50515253 c0c1c2c3
    c4c5c6c7 = SPI || seq high || seq low (RFC 4106 §5). Our transform must produce the
    RFC's first ciphertext block and tag, and open it again."""
    t = make_transform(EspAlgorithm("chacha20-poly1305", 256),
                       bytes(range(0x80, 0xA0)) + bytes.fromhex("07000000"))
    plain = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
             b"for the future, sunscreen would be it.")
    spi_seq = bytes.fromhex("50515253c4c5c6c7")
    seq_hi = bytes.fromhex("c0c1c2c3")
    iv = bytes.fromhex("4041424344454647")
    body = t.seal(spi_seq, seq_hi, iv, plain)
    assert body[:8] == iv and len(body) == 8 + 114 + 16
    assert body[8:24] == bytes.fromhex("d31a8d34648e60db7b86afbc53ef7ec2")
    assert body[-16:] == bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")
    assert t.open(spi_seq + body, seq_hi) == plain
    with pytest.raises(EspError):  # without the high bits in the AAD the tag fails
        t.open(spi_seq + body, None)


def test_cbc_hmac_layout_matches_rfc4303_and_rfc4868():
    """AES-CBC (RFC 3602) pads to 16; ICV = HMAC-SHA-256(SPI..ciphertext [|| seq hi])[:16]."""
    key, ikey, iv = bytes(range(16)), bytes(range(32)), bytes(range(50, 66))
    for esn in (False, True):
        sa = EspSa(0x4242, B4, make_transform(EspAlgorithm("aes-cbc", 128, "hmac-sha2-256-128"),
                                              key, ikey), esn=esn)
        out = sa.seal(17, b"hello", 0.0, iv=iv)
        dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        plain = dec.update(out[24:-16]) + dec.finalize()
        assert plain == b"hello" + bytes(range(1, 10)) + b"\x09\x11"
        h = chmac.HMAC(ikey, hashes.SHA256())
        h.update(out[:-16] + (b"\0\0\0\0" if esn else b""))
        assert out[-16:] == h.finalize()[:16]


# --- round trips: every algorithm x mode x family -------------------------------------------

@pytest.mark.parametrize("alg", sorted(ALGS))
@pytest.mark.parametrize("mode", [Mode.TRANSPORT, Mode.TUNNEL])
@pytest.mark.parametrize("v", [4, 6])
@pytest.mark.parametrize("esn", [False, True])
def test_round_trip(alg, mode, v, esn):
    a, b = pair(alg, mode, v, esn)
    src, dst = (A4, B4) if v == 4 else (A6, B6)
    for n in range(3):
        pkt = udp_packet(src, dst, b"canary-plaintext" * n)
        esp = a.protect(pkt, now=1.0)
        assert b"canary" not in esp
        assert struct.unpack_from("!I", esp)[0] == 0x2002
        back = b.unprotect(esp, now=1.0)
        assert back == pkt  # transport mode rebuilds the same header (TTL 64, DF, id 0)
        reply = udp_packet(dst, src, b"reply", 5000, 4000)
        assert a.unprotect(b.protect(reply, now=1.0), now=1.0) == reply
    assert a.outbound.stats.packets == 3 and b.inbound.stats.packets == 3
    assert b.inbound.stats.bytes == a.outbound.stats.bytes > 0


def test_transport_mode_rewrites_header_protocol_length_checksum():
    a, b = pair("aes-gcm-16-128", Mode.TRANSPORT)
    body = b"\x08\x00\x00\x00\x00\x01\x00\x01ping"
    pkt = packet.build_ipv4(A4, B4, packet.PROTO_ICMP, body, ttl=3, ident=77, df=False)
    out = b.unprotect(a.protect(pkt, 0.0), 0.0)
    info = packet.parse(out)
    assert (info.src, info.dst, info.proto) == (A4, B4, packet.PROTO_ICMP)
    assert out[20:] == body and len(out) == (out[2] << 8 | out[3]) == 20 + len(body)
    assert packet.checksum(out[:20]) == 0


def test_tunnel_mode_checks_inner_selector():
    a, b = pair("aes-gcm-16-128", Mode.TUNNEL)
    stray = udp_packet(ipaddress.ip_address("198.51.100.9"), B4)
    with pytest.raises(EspError) as e:
        b.unprotect(a.outbound.seal(packet.PROTO_IPIP, stray, 0.0), 0.0)
    assert e.value.reason == "policy"
    with pytest.raises(EspError) as e:  # next header says IPv6 but carries IPv4
        b.unprotect(a.outbound.seal(packet.PROTO_IPV6, udp_packet(A4, B4), 0.0), 0.0)
    assert e.value.reason == "next-header"


def test_dummy_packet_and_bad_padding_refused():
    a, b = pair("aes-gcm-16-128")
    with pytest.raises(EspError) as e:
        b.unprotect(a.outbound.seal(packet.PROTO_NONE, b"tfc", 0.0), 0.0)
    assert e.value.reason == "dummy"
    # hand-made packet with pad bytes 0,0 instead of 1,2
    key = a.params.encr_key_out
    spi_seq = struct.pack("!II", 0x2002, 2)
    iv = (2).to_bytes(8, "big")
    ct = AESGCM(key[:16]).encrypt(key[16:] + iv, b"ab\0\0\x02\x11", spi_seq)
    with pytest.raises(EspError) as e:
        b.unprotect(spi_seq + iv + ct, 0.0)
    assert e.value.reason == "padding"
    assert b.inbound.stats.refused["padding"] == 1


# --- anti-replay (RFC 4303 Appendix A) ------------------------------------------------------

def test_replay_window_rejects_replays_and_too_old():
    a, b = pair("aes-gcm-16-128", window=64)
    pkts = [a.protect(udp_packet(A4, B4), 0.0) for _ in range(200)]
    b.unprotect(pkts[99], 0.0)  # seq 100
    b.unprotect(pkts[50], 0.0)  # seq 51: inside the 64-wide window, out of order is fine
    for p in (pkts[99], pkts[50]):
        with pytest.raises(EspError) as e:
            b.unprotect(p, 0.0)
        assert e.value.reason == "replay"
    with pytest.raises(EspError) as e:
        b.unprotect(pkts[30], 0.0)  # seq 31 < 100 - 64 + 1: left of the window
    assert e.value.reason == "replay"
    b.unprotect(pkts[36], 0.0)  # seq 37: the oldest still inside
    assert b.inbound.stats.replayed == 3 and b.inbound.stats.packets == 3


def test_replay_window_size_is_configurable():
    w = ReplayWindow(1024)
    w.update(2000)
    w.check(977)  # 2000 - 1024 + 1 = 977 is the left edge
    with pytest.raises(EspError):
        w.check(976)
    w.update(977)
    with pytest.raises(EspError):
        w.check(977)


def test_window_moves_only_after_authentication():
    """A forged packet with a huge sequence number must not slide the window (§3.4.3)."""
    a, b = pair("aes-gcm-16-128")
    good = a.protect(udp_packet(A4, B4), 0.0)
    forged = bytearray(a.protect(udp_packet(A4, B4), 0.0))
    forged[4:8] = struct.pack("!I", 10_000)
    with pytest.raises(EspError):
        b.unprotect(bytes(forged), 0.0)
    b.unprotect(good, 0.0)
    assert b.inbound.replay.top == 1


def test_esn_infers_high_bits_across_the_boundary():
    a, b = pair("aes-gcm-16-128", esn=True)
    a.outbound.seq = (1 << 32) - 3
    pkts = [a.protect(udp_packet(A4, B4), 0.0) for _ in range(6)]  # seq 2^32-2 .. 2^32+3
    b.inbound.replay.top = (1 << 32) - 10
    for p in pkts[:2] + pkts[3:]:
        b.unprotect(p, 0.0)
    assert b.inbound.replay.top == (1 << 32) + 3
    b.unprotect(pkts[2], 0.0)  # late packet from the old subspace: case B inference
    with pytest.raises(EspError):
        b.unprotect(pkts[4], 0.0)


def test_sequence_number_never_cycles_without_esn():
    a, _ = pair("aes-gcm-16-128")
    a.outbound.seq = 0xFFFFFFFF
    with pytest.raises(EspError) as e:
        a.protect(udp_packet(A4, B4), 0.0)
    assert e.value.reason == "sequence-exhausted"
    assert a.poll(0.0) == [SaExpire(0x2002, B4, True)]


# --- lifetimes (the same SaExpire events as the kernel backend) -----------------------------

def test_lifetimes_by_packets_bytes_and_time():
    a, b = pair("aes-gcm-16-128", lifetime_soft_packets=2, lifetime_hard_packets=4,
                lifetime_soft_s=10, lifetime_hard_s=20)
    for _ in range(2):
        a.protect(udp_packet(A4, B4), 0.0)
    assert a.poll(1.0) == [SaExpire(0x2002, B4, False)]
    a.protect(udp_packet(A4, B4), 0.0)
    a.protect(udp_packet(A4, B4), 0.0)
    assert a.poll(1.0) == [SaExpire(0x2002, B4, True)]
    with pytest.raises(EspError) as e:
        a.protect(udp_packet(A4, B4), 0.0)
    assert e.value.reason == "expired"
    assert b.next_deadline() == 10
    assert b.poll(9.9) == []
    assert b.poll(10) == [SaExpire(0x2002, B4, False), SaExpire(0x1001, A4, False)]
    assert b.next_deadline() == 20
    assert b.poll(25) == [SaExpire(0x2002, B4, True), SaExpire(0x1001, A4, True)]
    assert b.poll(30) == [] and b.next_deadline() is None


def test_lifetime_by_bytes():
    sa = EspSa(0x5000, B4, make_transform(EspAlgorithm("aes-gcm-16", 128), bytes(20)),
               lifetime=Lifetime(soft_bytes=100, hard_bytes=250))
    sa.seal(17, bytes(60), 0.0)
    assert sa.poll(0.0) == []
    sa.seal(17, bytes(60), 0.0)
    assert [e.hard for e in sa.poll(0.0)] == [False]
    sa.seal(17, bytes(200), 0.0)
    assert [e.hard for e in sa.poll(0.0)] == [True]


def test_bad_parameters_are_clear_errors():
    alg = EspAlgorithm("aes-gcm-16", 128)
    with pytest.raises(ValueError, match="key material"):
        make_transform(alg, bytes(16))
    with pytest.raises(ValueError, match="unknown ESP algorithm"):
        make_transform(EspAlgorithm("des", 64), bytes(8))
    with pytest.raises(ValueError, match="integrity"):
        make_transform(EspAlgorithm("aes-cbc", 128), bytes(16))
    with pytest.raises(ValueError, match="reserved"):
        EspSa(5, B4, make_transform(alg, bytes(20)))
    with pytest.raises(ValueError, match="IV source"):
        EspSa(0x999, B4, make_transform(EspAlgorithm("aes-cbc", 128, "hmac-sha2-256-128"),
                                        bytes(16), bytes(32))).seal(17, b"x", 0.0)


def test_tunnel_selectors_pick_packets():
    a, _ = pair("aes-gcm-16-128", Mode.TUNNEL)
    p = ChildSaParams(**{**a.params.__dict__,
                         "ts_remote": (TrafficSelector.from_network("203.0.113.0/24", 17),)})
    sa = ChildSa(p)
    assert sa.covers(packet.parse(udp_packet(A4, ipaddress.ip_address("203.0.113.7"))))
    assert not sa.covers(packet.parse(udp_packet(A4, B4)))


# --- arbitrary input never escapes as anything but EspError ---------------------------------

_fuzz_sas = {alg: pair(alg, mode)[1] for alg in ALGS for mode in (Mode.TUNNEL,)}


@settings(max_examples=300, deadline=None)
@given(alg=st.sampled_from(sorted(ALGS)), data=st.binary(max_size=300),
       seq=st.integers(0, 0xFFFFFFFF))
def test_arbitrary_bytes_only_raise_esp_error(alg, data, seq):
    sa = _fuzz_sas[alg]
    for blob in (data, struct.pack("!II", 0x2002, seq) + data):
        try:
            sa.unprotect(blob, 0.0)
        except EspError:
            pass


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_authentic_garbage_inside_only_raises_esp_error(data):
    """Even a correctly sealed packet with garbage inside is refused cleanly (both modes)."""
    for mode in (Mode.TUNNEL, Mode.TRANSPORT):
        a, b = pair("aes-gcm-16-128", mode)
        for nh in (4, 41, 6, 50):
            try:
                b.unprotect(a.outbound.seal(nh, data, 0.0), 0.0)
            except EspError:
                pass


def _slow_checksum(data: bytes) -> int:
    """RFC 1071 word by word, to check the fast one against."""
    if len(data) & 1:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.sampled_from([b"", b"\0\0", b"\xff\xff", b"\xff\xff\xff\xff"]))
def test_fast_checksum_equals_rfc1071(data):
    assert packet.checksum(data) == _slow_checksum(data)


@pytest.mark.parametrize("v", [4, 6])
def test_transport_nat_t_recomputes_tcp_udp_checksums(v):
    """RFC 3948 §3.1.2: the sender's L4 checksum used its own (pre-NAT) address; after
    decapsulation it must be valid for the addresses the receiver puts in the header."""
    a, b = pair("aes-gcm-16-128", Mode.TRANSPORT, v)
    for sa in (a, b):  # ESP-in-UDP, as after NAT detection
        sa.params = ChildSaParams(**{**sa.params.__dict__, "encap": (4500, 4500)})
    src, dst = (A4, B4) if v == 4 else (A6, B6)
    natted = ipaddress.ip_address("198.51.100.7" if v == 4 else "2001:db8:ff::7")
    for proto, seg in ((packet.PROTO_UDP, struct.pack("!HHHH", 1, 2, 12, 0x1234) + b"data"),
                       (packet.PROTO_TCP, struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 0x50, 0x18,
                                                      512, 0, 0) + b"data")):
        # the sender's checksum covers its private address
        seg = packet.fix_l4_checksum(natted, dst, proto, seg)
        out = b.unprotect(a.outbound.seal(proto, seg, 0.0), 0.0)
        info = packet.parse(out)
        body = out[info.header_len:]
        if v == 4:
            pseudo = src.packed + dst.packed + struct.pack("!xBH", proto, len(body))
        else:
            pseudo = src.packed + dst.packed + struct.pack("!IxxxB", len(body), proto)
        assert packet.checksum(pseudo + body) == 0, proto
