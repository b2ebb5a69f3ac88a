"""IKE message codec: every payload round-trips, the RFC 7296 §2.5 critical-bit rule, header
checks, SK encryption, and arbitrary input raising only IkeProtocolError (hypothesis)."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oe_agent.ike import payloads as pl
from oe_agent.ike.const import (ExchangeType, NotifyType, PayloadType, ProtocolId, TsType,
                                EncrId, IntegId)
from oe_agent.ike.crypto import IkeCipher
from oe_agent.ike.errors import IkeIntegrityError, IkeProtocolError
from oe_agent.ike.message import (Message, add_non_esp_marker, classify_udp4500,
                                  peek_header)
from oe_agent.model import TrafficSelector

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
blob = st.binary(max_size=48)
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

attributes = st.lists(st.one_of(
    st.builds(pl.TransformAttribute, st.integers(0, 0x7FFF).filter(lambda t: t != 14), u16),
    st.builds(pl.TransformAttribute, st.integers(0, 0x7FFF), st.binary(max_size=12))),
    max_size=3).map(tuple)
transforms = st.builds(pl.Transform, u8, u16, st.none() | u16, attributes)
proposals = st.builds(pl.Proposal, u8, u8, st.binary(max_size=8),
                      st.lists(transforms, max_size=5).map(tuple))


def _ts(version: int):
    bits = 32 if version == 4 else 128
    ctor = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    addr = st.integers(0, 2 ** bits - 1).map(ctor)
    return st.builds(TrafficSelector, addr, addr, u8, u16, u16)


selectors = st.lists(_ts(4) | _ts(6), max_size=4).map(tuple)
spi_lists = st.integers(0, 8).flatmap(
    lambda size: st.lists(st.binary(min_size=size, max_size=size), max_size=4).map(tuple))

PAYLOADS = {
    pl.SecurityAssociation: st.builds(pl.SecurityAssociation,
                                      st.lists(proposals, max_size=3).map(tuple)),
    pl.KeyExchange: st.builds(pl.KeyExchange, u16, blob),
    pl.Nonce: st.builds(pl.Nonce, blob),
    pl.IdInitiator: st.builds(pl.IdInitiator, u8, blob),
    pl.IdResponder: st.builds(pl.IdResponder, u8, blob),
    pl.Certificate: st.builds(pl.Certificate, u8, blob),
    pl.CertificateRequest: st.builds(pl.CertificateRequest, u8, blob),
    pl.Authentication: st.builds(pl.Authentication, u8, blob),
    pl.Notify: st.builds(pl.Notify, u16, blob, u8, st.binary(max_size=16)),
    pl.Delete: st.builds(pl.Delete, u8, spi_lists),
    pl.VendorId: st.builds(pl.VendorId, blob),
    pl.TsInitiator: st.builds(pl.TsInitiator, selectors),
    pl.TsResponder: st.builds(pl.TsResponder, selectors),
    pl.Configuration: st.builds(pl.Configuration, u8, st.lists(st.builds(
        pl.ConfigAttribute, st.integers(0, 0x7FFF), st.binary(max_size=16)), max_size=4).map(tuple)),
    pl.EncryptedPayload: st.builds(pl.EncryptedPayload, u8, blob),
}
unknown = st.builds(pl.UnknownPayload,
                    u8.filter(lambda t: t not in pl.PAYLOAD_CLASSES and t != 0), blob,
                    st.just(False))
inner_payload = st.one_of(*(s for c, s in PAYLOADS.items() if c is not pl.EncryptedPayload),
                          unknown)


def test_registry_covers_every_payload_class():
    assert set(pl.PAYLOAD_CLASSES.values()) == set(PAYLOADS)
    assert all(pl.PAYLOAD_CLASSES[c.TYPE] is c for c in PAYLOADS)
    # no payload class is a subclass of another: Message.get(cls) finds only that payload type
    assert not any(issubclass(a, b) for a in PAYLOADS for b in PAYLOADS if a is not b)


@pytest.mark.parametrize("cls", list(PAYLOADS), ids=lambda c: c.__name__)
def test_payload_round_trips(cls):
    @settings(FAST, max_examples=120 if cls is pl.SecurityAssociation else 250)
    @given(PAYLOADS[cls])
    def check(p):
        if cls is pl.EncryptedPayload:  # its first inner type lives in the generic header
            assert cls.parse(p.to_bytes(), p.first_payload) == p
        else:
            assert cls.parse(p.to_bytes()) == p

    check()


def _message(payload_list, encrypted=None):
    return st.builds(Message, st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8),
                     st.sampled_from(list(ExchangeType)) | u8, st.booleans(), st.booleans(),
                     st.integers(0, 2 ** 32 - 1), payload_list)


messages = _message(st.tuples(st.lists(inner_payload, max_size=6), st.none() | PAYLOADS[
    pl.EncryptedPayload]).map(lambda t: tuple(t[0]) + ((t[1],) if t[1] else ())))


@settings(max_examples=300, deadline=None)
@given(messages)
def test_message_round_trips(m):
    data = m.to_bytes()
    back = Message.parse(data)
    assert back == m and back.raw == data
    assert peek_header(data).length == len(data)


CIPHERS = [IkeCipher.from_ids(EncrId.AES_GCM_16, 256), IkeCipher.from_ids(EncrId.CHACHA20_POLY1305, None),
           IkeCipher.from_ids(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)]


@settings(max_examples=200, deadline=None)
@given(_message(st.lists(inner_payload, max_size=5).map(tuple)), st.sampled_from(CIPHERS),
       st.randoms(use_true_random=False))
def test_encrypted_message_round_trips(m, cipher, rnd):
    sk_e, sk_a = rnd.randbytes(cipher.encr_key_len), rnd.randbytes(cipher.integ_key_len)
    wire = m.encrypt(cipher, sk_e, sk_a, rnd.randbytes)
    parsed = Message.parse(wire)
    assert isinstance(parsed.payloads[-1], pl.EncryptedPayload) and len(parsed.payloads) == 1
    assert parsed.decrypted(cipher, sk_e, sk_a) == m
    if cipher.encr.block_len > 1:
        assert (len(parsed.encrypted.data) - cipher.iv_len - cipher.icv_len) % 16 == 0
    tampered = wire[:-1] + bytes([wire[-1] ^ 0x80])
    with pytest.raises(IkeIntegrityError):
        Message.parse(tampered).decrypted(cipher, sk_e, sk_a)


# --- §2.5 critical bit, header checks -------------------------------------------------------

def _raw(payloads: list[tuple[int, int, bytes]], exchange=ExchangeType.IKE_SA_INIT) -> bytes:
    body = b""
    for i, (ptype, crit, data) in enumerate(payloads):
        np = payloads[i + 1][0] if i + 1 < len(payloads) else 0
        body += struct.pack("!BBH", np, crit, 4 + len(data)) + data
    first = payloads[0][0] if payloads else 0
    return struct.pack("!8s8sBBBBII", b"i" * 8, bytes(8), first, 0x20, exchange, 0x08, 0,
                       28 + len(body)) + body


def test_unknown_critical_payload_is_rejected_with_its_type():
    data = _raw([(PayloadType.NONCE, 0, b"n" * 16), (200, 0x80, b"xyz")])
    with pytest.raises(IkeProtocolError) as e:
        Message.parse(data)
    assert e.value.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert e.value.data == bytes([200])


def test_unknown_noncritical_payload_is_kept_and_known_critical_accepted():
    data = _raw([(201, 0, b"abc"), (PayloadType.NONCE, 0x80, b"n" * 16)])
    m = Message.parse(data)
    assert m.payloads == (pl.UnknownPayload(201, b"abc"), pl.Nonce(b"n" * 16))


@pytest.mark.parametrize("mutate,notify", [
    (lambda d: d[:20], NotifyType.INVALID_SYNTAX),  # shorter than the header
    (lambda d: d[:17] + b"\x30" + d[18:], NotifyType.INVALID_MAJOR_VERSION),
    (lambda d: d + b"\0", NotifyType.INVALID_SYNTAX),  # length field disagrees
    (lambda d: d[:-1], NotifyType.INVALID_SYNTAX),
])
def test_header_errors(mutate, notify):
    data = _raw([(PayloadType.NONCE, 0, b"n" * 16)])
    with pytest.raises(IkeProtocolError) as e:
        Message.parse(mutate(data))
    assert e.value.notify_type == notify


def test_sk_must_be_last():
    data = _raw([(PayloadType.SK, 0, b"ciphertext"), (PayloadType.NONCE, 0, b"n" * 16)])
    with pytest.raises(IkeProtocolError):
        Message.parse(data)


def test_ts_types_and_notify_lookup():
    ts = pl.TsInitiator((TrafficSelector.from_network("192.0.2.0/24", 6, 443),
                         TrafficSelector.host("2001:db8::1")))
    body = ts.to_bytes()
    assert body[4] == TsType.IPV4_ADDR_RANGE and body[4 + 16] == TsType.IPV6_ADDR_RANGE
    bad = bytearray(body)
    bad[4] = 9  # TS_FC_ADDR_RANGE: not ours
    with pytest.raises(IkeProtocolError) as e:
        pl.TsInitiator.parse(bytes(bad))
    assert e.value.notify_type == NotifyType.TS_UNACCEPTABLE
    m = Message(b"i" * 8, b"r" * 8, ExchangeType.IKE_AUTH, True, False, 1,
                (ts, pl.Notify(NotifyType.USE_TRANSPORT_MODE)))
    assert m.notify(NotifyType.USE_TRANSPORT_MODE) == pl.Notify(NotifyType.USE_TRANSPORT_MODE)
    assert m.notify(NotifyType.COOKIE) is None
    assert m.get(pl.TsInitiator) is ts and m.all(pl.Notify) == (m.payloads[1],)


def test_identification_helpers_and_delete_spi_size():
    assert pl.IdInitiator.from_address("192.0.2.1").to_bytes() == bytes([1, 0, 0, 0, 192, 0, 2, 1])
    assert str(pl.IdResponder.from_fqdn("host.example.")) == "host.example"
    assert pl.IdInitiator.null().to_bytes() == bytes([13, 0, 0, 0])
    assert pl.Delete(ProtocolId.ESP).to_bytes() == bytes([3, 4, 0, 0])
    assert pl.Delete(ProtocolId.IKE).to_bytes() == bytes([1, 0, 0, 0])
    with pytest.raises(IkeProtocolError):
        pl.Delete.parse(bytes([3, 4, 0, 2]) + b"\0" * 7)


def test_udp4500_classification():
    assert classify_udp4500(add_non_esp_marker(b"ike")) == ("ike", b"ike")
    assert classify_udp4500(b"\xff") == ("keepalive", b"")
    assert classify_udp4500(b"\x01\x02\x03\x04seq!data") == ("esp", b"\x01\x02\x03\x04seq!data")
    assert classify_udp4500(b"\x01\x02") == ("invalid", b"\x01\x02")


# --- arbitrary input raises only IkeProtocolError ---------------------------------------------

def _parse_only_protocol_errors(data: bytes):
    try:
        Message.parse(data)
    except IkeProtocolError:
        pass


@settings(max_examples=2500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_errors(data):
    _parse_only_protocol_errors(data)


payload_chunks = st.lists(st.tuples(u8 | st.sampled_from(list(PayloadType)), st.sampled_from([0, 0x80]),
                                    st.binary(max_size=40)), max_size=5)


@settings(max_examples=1200, deadline=None)
@given(payload_chunks, st.none() | st.tuples(st.integers(0, 10 ** 6), u8))
def test_well_framed_random_payload_bodies_raise_only_protocol_errors(chunks, edit):
    raw = bytearray(_raw(chunks))
    if edit is not None:  # sometimes corrupt one byte (a length field, a type) as well
        raw[edit[0] % len(raw)] = edit[1]
    _parse_only_protocol_errors(bytes(raw))


small_messages = _message(st.lists(st.one_of(PAYLOADS[pl.Notify], PAYLOADS[pl.Nonce],
                                              PAYLOADS[pl.TsInitiator], PAYLOADS[pl.Delete],
                                              PAYLOADS[pl.KeyExchange]), max_size=3).map(tuple))


@settings(max_examples=600, deadline=None)
@given(small_messages, st.lists(st.tuples(st.integers(0, 10 ** 6), u8), min_size=1, max_size=4),
       st.none() | st.integers(0, 10 ** 6))
def test_mutated_valid_messages_raise_only_protocol_errors(m, edits, cut):
    raw = bytearray(m.to_bytes())
    for i, b in edits:
        raw[i % len(raw)] = b
    _parse_only_protocol_errors(bytes(raw[:cut % (len(raw) + 1)] if cut is not None else raw))


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(CIPHERS), st.binary(max_size=120), u8)
def test_decrypted_garbage_raises_only_protocol_errors(cipher, plain, first):
    """Authentic ciphertext of arbitrary plaintext: padding and inner chain are checked."""
    sk_e, sk_a = b"e" * cipher.encr_key_len, b"a" * cipher.integ_key_len
    if cipher.encr.block_len > 1:
        plain = plain + b"\0" * (-len(plain) % 16)
    iv = b"v" * cipher.iv_len
    sk_len = 4 + len(iv) + len(plain) + cipher.icv_len
    aad = struct.pack("!8s8sBBBBII", b"i" * 8, b"r" * 8, PayloadType.SK, 0x20, 35, 0x08, 1,
                      28 + sk_len) + struct.pack("!BBH", first, 0, sk_len)
    wire = aad + iv + cipher.seal(sk_e, sk_a, iv, plain, aad)
    try:
        Message.parse(wire).decrypted(cipher, sk_e, sk_a)
    except IkeProtocolError:
        pass
