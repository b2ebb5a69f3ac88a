"""IPSECKEY (RFC 4025) encoding and decoding of every algorithm, and malformed RDATA."""
import base64

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import given, strategies as st

from oe_agent.dns import ipseckey
from oe_agent.dns.ipseckey import MalformedKey


def _roundtrip(key, gateway=None):
    text = ipseckey.rdata_text(10, key.public_key(), gateway)
    rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.IPSECKEY, text)
    return text, ipseckey.parse_rdata(rd.to_digestable())


@pytest.mark.parametrize("make, alg, cls", [
    (ed25519.Ed25519PrivateKey.generate, 4, ed25519.Ed25519PublicKey),
    (ed448.Ed448PrivateKey.generate, 4, ed448.Ed448PublicKey),
    (lambda: ec.generate_private_key(ec.SECP256R1()), 3, ec.EllipticCurvePublicKey),
    (lambda: ec.generate_private_key(ec.SECP384R1()), 3, ec.EllipticCurvePublicKey),
    (lambda: rsa.generate_private_key(65537, 2048), 2, rsa.RSAPublicKey),
])
def test_each_algorithm_roundtrips_through_dnspython(make, alg, cls):
    key = make()
    text, k = _roundtrip(key)
    assert k.algorithm == alg and isinstance(k.public_key, cls)
    assert k.public_key.public_numbers() == key.public_key().public_numbers() \
        if hasattr(key.public_key(), "public_numbers") else \
        k.key_bytes() == ipseckey.public_key_bytes(key.public_key())[1]
    assert k.to_text() == text


def test_rfc3110_layout_and_long_exponent():
    key = rsa.generate_private_key(65537, 2048).public_key()
    blob = ipseckey.rsa_to_rfc3110(key)
    assert blob[0] == 3 and blob[1:4] == b"\x01\x00\x01" and len(blob) == 4 + 256
    # RFC 3110 §2: an exponent longer than 255 bytes uses a zero byte and 2-byte length
    e = (1 << 2100) + 1
    n = key.public_numbers().n
    e_bytes = e.to_bytes((e.bit_length() + 7) // 8, "big")
    long_blob = b"\x00" + len(e_bytes).to_bytes(2, "big") + e_bytes + n.to_bytes(256, "big")
    with pytest.raises(MalformedKey):  # cryptography refuses e >= n: malformed, not a crash
        ipseckey.rsa_from_rfc3110(long_blob)


def test_gateway_types_and_precedence_text():
    key = ed25519.Ed25519PrivateKey.generate()
    for gw, gtype, expect in [(None, 0, None), ("192.0.2.9", 1, "192.0.2.9"),
                              ("2001:db8::9", 2, "2001:db8::9"),
                              ("gw.oe.example", 3, "gw.oe.example.")]:
        _text, k = _roundtrip(key, gw)
        assert k.gateway_type == gtype
        assert (str(k.gateway) if k.gateway is not None else None) == expect


@pytest.mark.parametrize("raw, why", [
    (b"\x0a\x00", "shorter than 3"),
    (b"\x0a\x04\x04" + b"\x01" * 32, "gateway type 4"),
    (b"\x0a\x00\x09" + b"\x01" * 32, "unknown algorithm 9"),
    (b"\x0a\x00\x04" + b"\x01" * 31, "EdDSA key of 31 bytes"),
    (b"\x0a\x00\x03" + b"\x01" * 63, "ECDSA key of 63 bytes"),
    (b"\x0a\x00\x02\x05\x01\x00\x01", "exponent length"),
    (b"\x0a\x01\x04\xc0\x00", "truncated IPv4"),
    (b"\x0a\x00\x00", "algorithm 0"),
])
def test_malformed_rdata_says_what_is_wrong(raw, why):
    with pytest.raises(MalformedKey, match=why):
        ipseckey.parse_rdata(raw)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_malformed(raw):
    try:
        k = ipseckey.parse_rdata(raw)
    except MalformedKey:
        return
    assert 0 <= k.gateway_type <= 3 and k.algorithm in (2, 3, 4)


def test_bad_base64_text_is_malformed():
    with pytest.raises(MalformedKey, match="not IPSECKEY text"):
        ipseckey.parse_text("10 0 4 . !!!notbase64")
    good = base64.b64encode(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    assert ipseckey.parse_text(f"10 0 4 . {good.decode()}").algorithm == 4


def test_owner_names():
    assert ipseckey.owner_name("192.0.2.1") == dns.name.from_text("1.2.0.192.in-addr.arpa.")
    assert ipseckey.owner_name("2001:db8::1").to_text().startswith("1.0.0.0.")
    assert ipseckey.owner_name("2001:db8::1").to_text().endswith(".8.b.d.0.1.0.0.2.ip6.arpa.")
    assert ipseckey.owner_name("host.oe.example") == dns.name.from_text("host.oe.example.")
    with pytest.raises(ValueError):
        ipseckey.owner_name("localhost")
