"""IPSECKEY records (RFC 4025): decode into `cryptography` keys, encode a host key, owner names.

Decoding works on the raw RDATA so that one malformed record (bad key, unknown algorithm,
gateway type 4+) is skipped with a log line naming it instead of failing the whole answer.
"""
from __future__ import annotations

import base64
import ipaddress
import logging
import struct
from dataclasses import dataclass

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.reversename
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

log = logging.getLogger("oe_agent.dns")

# RFC 4025 §2.4 algorithm numbers; 3 = ECDSA (RFC 4025 registry, raw X||Y as in RFC 6605),
# 4 = EdDSA (RFC 9373).
ALG_DSA, ALG_RSA, ALG_ECDSA, ALG_EDDSA = 1, 2, 3, 4
# RFC 4025 §2.3 gateway types
GW_NONE, GW_IPV4, GW_IPV6, GW_NAME = 0, 1, 2, 3

PublicKey = (rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
             | ed448.Ed448PublicKey)


class MalformedKey(ValueError):
    """An IPSECKEY record that cannot be used; the message says which part is wrong."""


@dataclass(frozen=True)
class IpsecKey:
    """One usable IPSECKEY record: whom to talk to (gateway) and the key to authenticate."""

    precedence: int
    gateway_type: int
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | dns.name.Name | None
    algorithm: int
    public_key: PublicKey

    @property
    def gateway_text(self) -> str:
        return "." if self.gateway is None else str(self.gateway)

    def key_bytes(self) -> bytes:
        return public_key_bytes(self.public_key)[1]

    def to_text(self) -> str:
        """RDATA in zone-file syntax (RFC 4025 §3.1)."""
        b64 = base64.b64encode(self.key_bytes()).decode()
        return f"{self.precedence} {self.gateway_type} {self.algorithm} {self.gateway_text} {b64}"


# --- public key <-> IPSECKEY key field ------------------------------------------------------

def rsa_to_rfc3110(key: rsa.RSAPublicKey) -> bytes:
    """RFC 3110 §2: exponent length (1 byte, or 0 + 2 bytes), exponent, modulus."""
    n = key.public_numbers()
    e = n.e.to_bytes((n.e.bit_length() + 7) // 8, "big")
    m = n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")
    head = bytes([len(e)]) if len(e) < 256 else b"\x00" + struct.pack("!H", len(e))
    return head + e + m


def rsa_from_rfc3110(blob: bytes) -> rsa.RSAPublicKey:
    if len(blob) < 3:
        raise MalformedKey("RSA key too short")
    if blob[0]:
        elen, off = blob[0], 1
    else:
        elen, off = struct.unpack("!H", blob[1:3])[0], 3
    e = int.from_bytes(blob[off:off + elen], "big")
    mod = blob[off + elen:]
    if elen == 0 or len(blob) < off + elen or not mod:
        raise MalformedKey("RSA key: exponent length past the end")
    bits = int.from_bytes(mod, "big").bit_length()
    if not 1024 <= bits <= 16384:
        raise MalformedKey(f"RSA modulus of {bits} bits")
    try:
        return rsa.RSAPublicNumbers(e, int.from_bytes(mod, "big")).public_key()
    except ValueError as exc:
        raise MalformedKey(f"RSA key: {exc}") from None


_CURVES = {64: ec.SECP256R1(), 96: ec.SECP384R1()}


def public_key_bytes(key) -> tuple[int, bytes]:
    """(IPSECKEY algorithm, key field) for a public key."""
    if isinstance(key, rsa.RSAPublicKey):
        return ALG_RSA, rsa_to_rfc3110(key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise ValueError(f"ECDSA curve {key.curve.name} has no IPSECKEY encoding")
        point = key.public_bytes(serialization.Encoding.X962,
                                 serialization.PublicFormat.UncompressedPoint)
        return ALG_ECDSA, point[1:]  # raw X||Y (RFC 6605 §4), no 0x04 prefix
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ALG_EDDSA, key.public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    raise ValueError(f"no IPSECKEY algorithm for {type(key).__name__}")


def decode_public_key(algorithm: int, blob: bytes):
    """Key field -> cryptography public key; MalformedKey if it cannot be one."""
    if algorithm == ALG_RSA:
        return rsa_from_rfc3110(blob)
    if algorithm == ALG_ECDSA:
        curve = _CURVES.get(len(blob))
        if curve is None:
            raise MalformedKey(f"ECDSA key of {len(blob)} bytes (want 64 or 96)")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + blob)
        except ValueError:
            raise MalformedKey("ECDSA key is not a point on the curve") from None
    if algorithm == ALG_EDDSA:  # RFC 9373 §3: the raw public key; length tells the curve
        if len(blob) == 32:
            return ed25519.Ed25519PublicKey.from_public_bytes(blob)
        if len(blob) == 57:
            return ed448.Ed448PublicKey.from_public_bytes(blob)
        raise MalformedKey(f"EdDSA key of {len(blob)} bytes (want 32 or 57)")
    raise MalformedKey(f"unknown algorithm {algorithm}")


# --- RDATA ----------------------------------------------------------------------------------

def parse_rdata(data: bytes) -> IpsecKey:
    """Decode IPSECKEY wire RDATA (RFC 4025 §2.1); MalformedKey on anything unusable."""
    if len(data) < 3:
        raise MalformedKey("RDATA shorter than 3 bytes")
    precedence, gw_type, algorithm = data[0], data[1], data[2]
    rest = data[3:]
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | dns.name.Name | None
    if gw_type == GW_NONE:
        gateway = None
    elif gw_type == GW_IPV4:
        if len(rest) < 4:
            raise MalformedKey("truncated IPv4 gateway")
        gateway, rest = ipaddress.IPv4Address(rest[:4]), rest[4:]
    elif gw_type == GW_IPV6:
        if len(rest) < 16:
            raise MalformedKey("truncated IPv6 gateway")
        gateway, rest = ipaddress.IPv6Address(rest[:16]), rest[16:]
    elif gw_type == GW_NAME:  # RFC 4025 §2.5: wire-encoded name, never compressed
        try:
            gateway, used = dns.name.from_wire(rest, 0)
        except Exception as exc:
            raise MalformedKey(f"bad gateway name: {exc}") from None
        rest = rest[used:]
    else:
        raise MalformedKey(f"gateway type {gw_type} is not 0-3")
    if algorithm == 0 and not rest:  # RFC 4025 §2.4: no key, gateway only: not usable for us
        raise MalformedKey("algorithm 0 (no key)")
    return IpsecKey(precedence, gw_type, gateway, algorithm, decode_public_key(algorithm, rest))


def rdata_bytes(rdata: dns.rdata.Rdata) -> bytes:
    return rdata.to_digestable()


def decode_rrset(rrset, origin_text: str | None = None) -> list[IpsecKey]:
    """All usable keys of an IPSECKEY rrset, ordered by precedence; bad ones logged, skipped."""
    keys: list[IpsecKey] = []
    owner = origin_text or str(rrset.name)
    for rd in rrset:
        raw = rdata_bytes(rd)
        try:
            keys.append(parse_rdata(raw))
        except MalformedKey as exc:
            log.warning("skipping IPSECKEY record at %s (%s): %s", owner,
                        base64.b16encode(raw[:24]).decode().lower(), exc)
    keys.sort(key=lambda k: k.precedence)
    return keys


def parse_text(text: str) -> IpsecKey:
    """Zone-file RDATA text ("10 0 4 . BASE64") -> IpsecKey (for static peers in the config)."""
    try:
        rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.IPSECKEY, text)
    except Exception as exc:
        raise MalformedKey(f"not IPSECKEY text: {exc}") from None
    return parse_rdata(rd.to_digestable())


# --- owner names ----------------------------------------------------------------------------

def owner_name(addr_or_fqdn: str) -> dns.name.Name:
    """Reverse name (in-addr.arpa / ip6.arpa, RFC 4025 §1.2) for an address, else the FQDN."""
    try:
        addr = ipaddress.ip_address(addr_or_fqdn)
    except ValueError:
        try:
            name = dns.name.from_text(addr_or_fqdn)
        except Exception as exc:
            raise ValueError(f"{addr_or_fqdn!r} is neither an address nor a DNS name: {exc}")
        if len(name.labels) < 3:  # a host name, not a TLD
            raise ValueError(f"{addr_or_fqdn!r} is not a DNS name")
        return name
    return dns.reversename.from_address(str(addr))


def rdata_text(precedence: int, public_key, gateway: str | None = None) -> str:
    """IPSECKEY RDATA text for a host key, gateway type picked from the gateway's form."""
    if not 0 <= precedence <= 255:
        raise ValueError("precedence must be 0-255")
    alg, blob = public_key_bytes(public_key)
    if gateway is None or gateway == ".":
        gw_type, gw = GW_NONE, "."
    else:
        try:
            gw_type = GW_IPV4 if ipaddress.ip_address(gateway).version == 4 else GW_IPV6
            gw = gateway
        except ValueError:
            gw_type, gw = GW_NAME, dns.name.from_text(gateway).to_text()
    return f"{precedence} {gw_type} {alg} {gw} {base64.b64encode(blob).decode()}"
