"""IKEv2 payloads (RFC 7296 §3.2-§3.16) as immutable values, one class per payload type.

Each class has `TYPE`, `parse(body) -> instance` and `to_bytes() -> body`, where the body is
the payload without its 4-byte generic header (next payload/critical/length belong to the
message, see message.py). `PAYLOAD_CLASSES` is the one registry from type to class.
Parsing raises only IkeProtocolError (INVALID_SYNTAX) on malformed input.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar, Union

from oe_agent.ike.const import (CfgType, IdType, NotifyType, PayloadType, ProtocolId,
                                TransformAttributeType, TsType)
from oe_agent.ike.errors import IkeProtocolError
from oe_agent.model import TrafficSelector


def _syntax(detail: str) -> IkeProtocolError:
    return IkeProtocolError(NotifyType.INVALID_SYNTAX, detail)


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise _syntax(f"{what}: {len(body)} bytes, need {n}")


def _u8(v: int, what: str) -> int:
    if not 0 <= v <= 0xFF:
        raise _syntax(f"{what} {v} does not fit one octet")
    return v


# --- SA payload: proposals, transforms, attributes (§3.3) ---------------------------------

@dataclass(frozen=True)
class TransformAttribute:
    """A transform attribute (§3.3.5). TV format (short, AF=1) carries a 16-bit int value;
    TLV format carries bytes."""

    type: int
    value: int | bytes

    def to_bytes(self) -> bytes:
        if isinstance(self.value, int):
            return struct.pack("!HH", 0x8000 | self.type, self.value)
        return struct.pack("!HH", self.type, len(self.value)) + self.value


@dataclass(frozen=True)
class Transform:
    """One transform (§3.3.2); `key_length` is the KEY_LENGTH attribute in bits, if any."""

    type: int
    id: int
    key_length: int | None = None
    attributes: tuple[TransformAttribute, ...] = ()  # other attributes, kept as received

    def to_bytes(self, last: bool) -> bytes:
        attrs = b""
        if self.key_length is not None:
            attrs += TransformAttribute(TransformAttributeType.KEY_LENGTH,
                                        self.key_length).to_bytes()
        attrs += b"".join(a.to_bytes() for a in self.attributes)
        return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), self.type, 0,
                           self.id) + attrs

    @classmethod
    def parse(cls, data: bytes) -> Transform:
        _need(data, 8, "transform")
        _, _, _, ttype, _, tid = struct.unpack_from("!BBHBBH", data)
        key_length, attrs, off = None, [], 8
        while off < len(data):
            _need(data[off:], 4, "transform attribute")
            atype, aval = struct.unpack_from("!HH", data, off)
            if atype & 0x8000:
                atype &= 0x7FFF
                if atype == TransformAttributeType.KEY_LENGTH and key_length is None:
                    key_length = aval
                else:
                    attrs.append(TransformAttribute(atype, aval))
                off += 4
            else:
                _need(data[off + 4:], aval, "transform attribute value")
                attrs.append(TransformAttribute(atype, bytes(data[off + 4:off + 4 + aval])))
                off += 4 + aval
        return cls(ttype, tid, key_length, tuple(attrs))


@dataclass(frozen=True)
class Proposal:
    """A proposal (§3.3.1): number, protocol (IKE/AH/ESP), SPI and transforms."""

    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]

    def to_bytes(self, last: bool) -> bytes:
        ts = b"".join(t.to_bytes(i == len(self.transforms) - 1)
                      for i, t in enumerate(self.transforms))
        length = 8 + len(self.spi) + len(ts)
        return struct.pack("!BBHBBBB", 0 if last else 2, 0, length, self.number, self.protocol,
                           _u8(len(self.spi), "SPI size"),
                           _u8(len(self.transforms), "transform count")) + self.spi + ts

    @classmethod
    def parse(cls, data: bytes) -> Proposal:
        _need(data, 8, "proposal")
        _, _, _, num, proto, spi_size, count = struct.unpack_from("!BBHBBBB", data)
        _need(data, 8 + spi_size, "proposal SPI")
        spi = bytes(data[8:8 + spi_size])
        off, transforms = 8 + spi_size, []
        for i in range(count):
            _need(data[off:], 8, "transform header")
            more, _, tlen = struct.unpack_from("!BBH", data, off)
            if tlen < 8 or off + tlen > len(data):
                raise _syntax(f"transform length {tlen}")
            if more != (3 if i < count - 1 else 0):
                raise _syntax("transform 'last' marker disagrees with the count")
            transforms.append(Transform.parse(data[off:off + tlen]))
            off += tlen
        if off != len(data):
            raise _syntax("trailing bytes after the transforms of a proposal")
        return cls(num, proto, spi, tuple(transforms))

    def transforms_of(self, ttype: int) -> tuple[Transform, ...]:
        return tuple(t for t in self.transforms if t.type == ttype)


@dataclass(frozen=True)
class SecurityAssociation:
    TYPE: ClassVar[int] = PayloadType.SA
    proposals: tuple[Proposal, ...]

    def to_bytes(self) -> bytes:
        return b"".join(p.to_bytes(i == len(self.proposals) - 1)
                        for i, p in enumerate(self.proposals))

    @classmethod
    def parse(cls, body: bytes) -> SecurityAssociation:
        off, proposals = 0, []
        while off < len(body):
            _need(body[off:], 8, "proposal header")
            more, _, plen = struct.unpack_from("!BBH", body, off)
            if plen < 8 or off + plen > len(body):
                raise _syntax(f"proposal length {plen}")
            last = off + plen == len(body)
            if more != (0 if last else 2):
                raise _syntax("proposal 'last' marker disagrees with the payload length")
            proposals.append(Proposal.parse(body[off:off + plen]))
            off += plen
        return cls(tuple(proposals))


# --- simple payloads ------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyExchange:
    """KE (§3.4): DH group number and public value."""

    TYPE: ClassVar[int] = PayloadType.KE
    group: int
    data: bytes

    def to_bytes(self) -> bytes:
        return struct.pack("!HH", self.group, 0) + self.data

    @classmethod
    def parse(cls, body: bytes) -> KeyExchange:
        _need(body, 4, "KE payload")
        return cls(struct.unpack_from("!H", body)[0], bytes(body[4:]))


@dataclass(frozen=True)
class Nonce:
    """Ni/Nr (§3.9); the 16..256 octet rule is the state machine's to enforce."""

    TYPE: ClassVar[int] = PayloadType.NONCE
    data: bytes

    def to_bytes(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, body: bytes) -> Nonce:
        return cls(bytes(body))


@dataclass(frozen=True)
class _Identification:
    """IDi/IDr (§3.5). `to_bytes()` is exactly the IDx' that AUTH signs (§2.15)."""

    id_type: int
    data: bytes

    def to_bytes(self) -> bytes:
        return struct.pack("!B3x", self.id_type) + self.data

    @classmethod
    def parse(cls, body: bytes):
        _need(body, 4, "ID payload")
        return cls(body[0], bytes(body[4:]))

    @classmethod
    def from_address(cls, addr):
        a = ipaddress.ip_address(addr)
        return cls(IdType.IPV4_ADDR if a.version == 4 else IdType.IPV6_ADDR, a.packed)

    @classmethod
    def from_fqdn(cls, name: str):
        return cls(IdType.FQDN, name.rstrip(".").encode("ascii"))

    @classmethod
    def null(cls):
        return cls(IdType.NULL, b"")

    def __str__(self) -> str:
        try:
            if self.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
                return str(ipaddress.ip_address(self.data))
            if self.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
                return self.data.decode("ascii")
        except (ValueError, UnicodeDecodeError):
            pass
        if self.id_type == IdType.NULL:
            return "(null)"
        return f"{self.id_type}:{self.data.hex()}"


@dataclass(frozen=True)
class IdInitiator(_Identification):
    TYPE: ClassVar[int] = PayloadType.IDi


@dataclass(frozen=True)
class IdResponder(_Identification):
    TYPE: ClassVar[int] = PayloadType.IDr


@dataclass(frozen=True)
class _CertificateData:
    """Encoding octet and data, shared by CERT and CERTREQ (siblings, so that
    `Message.get(Certificate)` never returns a CERTREQ)."""

    encoding: int
    data: bytes

    def to_bytes(self) -> bytes:
        return bytes([self.encoding]) + self.data

    @classmethod
    def parse(cls, body: bytes):
        _need(body, 1, "CERT/CERTREQ payload")
        return cls(body[0], bytes(body[1:]))


@dataclass(frozen=True)
class Certificate(_CertificateData):
    """CERT (§3.6); with RAW_PUBLIC_KEY (RFC 7670) `data` is a SubjectPublicKeyInfo."""

    TYPE: ClassVar[int] = PayloadType.CERT


@dataclass(frozen=True)
class CertificateRequest(_CertificateData):
    """CERTREQ (§3.7): encoding and concatenated CA key hashes (or empty)."""

    TYPE: ClassVar[int] = PayloadType.CERTREQ


@dataclass(frozen=True)
class Authentication:
    """AUTH (§3.8): method and authentication data."""

    TYPE: ClassVar[int] = PayloadType.AUTH
    method: int
    data: bytes

    def to_bytes(self) -> bytes:
        return struct.pack("!B3x", self.method) + self.data

    @classmethod
    def parse(cls, body: bytes) -> Authentication:
        _need(body, 4, "AUTH payload")
        return cls(body[0], bytes(body[4:]))


@dataclass(frozen=True)
class Notify:
    """N (§3.10): protocol, SPI (empty for IKE SA notifies), type and data."""

    TYPE: ClassVar[int] = PayloadType.NOTIFY
    notify_type: int
    data: bytes = b""
    protocol: int = ProtocolId.NONE
    spi: bytes = b""

    def to_bytes(self) -> bytes:
        return struct.pack("!BBH", self.protocol, _u8(len(self.spi), "SPI size"),
                           self.notify_type) + self.spi + self.data

    @classmethod
    def parse(cls, body: bytes) -> Notify:
        _need(body, 4, "Notify payload")
        proto, spi_size, ntype = struct.unpack_from("!BBH", body)
        _need(body, 4 + spi_size, "Notify SPI")
        return cls(ntype, bytes(body[4 + spi_size:]), proto, bytes(body[4:4 + spi_size]))


@dataclass(frozen=True)
class Delete:
    """D (§3.11). IKE SA: no SPIs; ESP/AH: 4-byte SPIs (the SPI size is taken from them)."""

    TYPE: ClassVar[int] = PayloadType.DELETE
    protocol: int
    spis: tuple[bytes, ...] = ()

    def to_bytes(self) -> bytes:
        if self.spis:
            size = len(self.spis[0])
            if any(len(s) != size for s in self.spis):
                raise _syntax("Delete SPIs of different sizes")
        else:
            size = 4 if self.protocol in (ProtocolId.AH, ProtocolId.ESP) else 0
        return (struct.pack("!BBH", self.protocol, _u8(size, "SPI size"), len(self.spis))
                + b"".join(self.spis))

    @classmethod
    def parse(cls, body: bytes) -> Delete:
        _need(body, 4, "Delete payload")
        proto, size, count = struct.unpack_from("!BBH", body)
        if len(body) != 4 + size * count:
            raise _syntax(f"Delete payload: {count} SPIs of {size} bytes in {len(body) - 4}")
        return cls(proto, tuple(bytes(body[4 + i * size:4 + (i + 1) * size])
                                for i in range(count)))


@dataclass(frozen=True)
class VendorId:
    TYPE: ClassVar[int] = PayloadType.VENDOR
    data: bytes

    def to_bytes(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, body: bytes) -> VendorId:
        return cls(bytes(body))


@dataclass(frozen=True)
class _TrafficSelectors:
    """TSi/TSr (§3.13) holding model.TrafficSelector values (type 7/8 by address family)."""

    selectors: tuple[TrafficSelector, ...]

    def to_bytes(self) -> bytes:
        out = [struct.pack("!B3x", _u8(len(self.selectors), "TS count"))]
        for ts in self.selectors:
            if ts.start.version != ts.end.version:
                raise _syntax("traffic selector mixes IPv4 and IPv6")
            tstype = TsType.IPV4_ADDR_RANGE if ts.start.version == 4 else TsType.IPV6_ADDR_RANGE
            addrs = ts.start.packed + ts.end.packed
            out.append(struct.pack("!BBHHH", tstype, ts.proto, 8 + len(addrs), ts.port_start,
                                   ts.port_end) + addrs)
        return b"".join(out)

    @classmethod
    def parse(cls, body: bytes):
        _need(body, 4, "TS payload")
        count, off, out = body[0], 4, []
        for _ in range(count):
            _need(body[off:], 8, "traffic selector")
            tstype, proto, length, ps, pe = struct.unpack_from("!BBHHH", body, off)
            if tstype == TsType.IPV4_ADDR_RANGE:
                alen, ctor = 4, ipaddress.IPv4Address
            elif tstype == TsType.IPV6_ADDR_RANGE:
                alen, ctor = 16, ipaddress.IPv6Address
            else:
                raise IkeProtocolError(NotifyType.TS_UNACCEPTABLE, f"TS type {tstype}")
            if length != 8 + 2 * alen or off + length > len(body):
                raise _syntax(f"traffic selector length {length}")
            a = off + 8
            out.append(TrafficSelector(ctor(bytes(body[a:a + alen])),
                                       ctor(bytes(body[a + alen:a + 2 * alen])), proto, ps, pe))
            off += length
        if off != len(body):
            raise _syntax("trailing bytes after the traffic selectors")
        return cls(tuple(out))


@dataclass(frozen=True)
class TsInitiator(_TrafficSelectors):
    TYPE: ClassVar[int] = PayloadType.TSi


@dataclass(frozen=True)
class TsResponder(_TrafficSelectors):
    TYPE: ClassVar[int] = PayloadType.TSr


@dataclass(frozen=True)
class ConfigAttribute:
    """A CP attribute (§3.15.1): 15-bit type and value bytes."""

    type: int
    value: bytes = b""


@dataclass(frozen=True)
class Configuration:
    """CP (§3.15): CFG type and attributes."""

    TYPE: ClassVar[int] = PayloadType.CP
    cfg_type: int = CfgType.CFG_REQUEST
    attributes: tuple[ConfigAttribute, ...] = ()

    def to_bytes(self) -> bytes:
        return struct.pack("!B3x", self.cfg_type) + b"".join(
            struct.pack("!HH", a.type & 0x7FFF, len(a.value)) + a.value for a in self.attributes)

    @classmethod
    def parse(cls, body: bytes) -> Configuration:
        _need(body, 4, "CP payload")
        off, attrs = 4, []
        while off < len(body):
            _need(body[off:], 4, "CP attribute")
            atype, alen = struct.unpack_from("!HH", body, off)
            _need(body[off + 4:], alen, "CP attribute value")
            attrs.append(ConfigAttribute(atype & 0x7FFF, bytes(body[off + 4:off + 4 + alen])))
            off += 4 + alen
        return cls(body[0], tuple(attrs))


@dataclass(frozen=True)
class EncryptedPayload:
    """SK (§3.14) as on the wire: `first_payload` is the type of the first inner payload (the
    SK header's next-payload field), `data` = IV || ciphertext || ICV. Message.decrypted()
    opens it."""

    TYPE: ClassVar[int] = PayloadType.SK
    first_payload: int
    data: bytes

    def to_bytes(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, body: bytes, first_payload: int = 0) -> EncryptedPayload:
        return cls(first_payload, bytes(body))


@dataclass(frozen=True)
class UnknownPayload:
    """A payload type we do not implement, kept as raw bytes (§2.5: skipped if not critical)."""

    type: int
    body: bytes
    critical: bool = False

    @property
    def TYPE(self) -> int:  # noqa: N802 - same spelling as the classes' TYPE
        return self.type

    def to_bytes(self) -> bytes:
        return self.body


Payload = Union[SecurityAssociation, KeyExchange, Nonce, IdInitiator, IdResponder, Certificate,
                CertificateRequest, Authentication, Notify, Delete, VendorId, TsInitiator,
                TsResponder, Configuration, EncryptedPayload, UnknownPayload]

# The one registry: payload type -> class. SK is handled by the message (it ends the chain).
PAYLOAD_CLASSES: dict[int, type] = {
    cls.TYPE: cls for cls in (SecurityAssociation, KeyExchange, Nonce, IdInitiator, IdResponder,
                              Certificate, CertificateRequest, Authentication, Notify, Delete,
                              VendorId, TsInitiator, TsResponder, Configuration, EncryptedPayload)
}


def parse_payload(ptype: int, critical: bool, body: bytes) -> Payload:
    """Decode one payload body; unknown types are kept, or rejected when critical (§2.5)."""
    cls = PAYLOAD_CLASSES.get(ptype)
    if cls is None:
        if critical:
            raise IkeProtocolError(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
                                   f"critical payload type {ptype}", bytes([ptype & 0xFF]))
        return UnknownPayload(ptype, bytes(body), critical)
    return cls.parse(bytes(body))


__all__ = [
    "TransformAttribute", "Transform", "Proposal", "SecurityAssociation", "KeyExchange", "Nonce",
    "IdInitiator", "IdResponder", "Certificate", "CertificateRequest", "Authentication", "Notify",
    "Delete", "VendorId", "TsInitiator", "TsResponder", "ConfigAttribute", "Configuration",
    "EncryptedPayload", "UnknownPayload", "Payload", "PAYLOAD_CLASSES", "parse_payload",
]
