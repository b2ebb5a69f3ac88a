"""IKEv2 messages: header (RFC 7296 §3.1), payload chain (§3.2), SK payload protection
(§3.14, RFC 5282 for AEAD) and the UDP 4500 non-ESP marker (RFC 3948 §2.2, §2.23).

`Message.parse(data)` decodes a datagram (SK left sealed, `raw` kept for its AAD);
`msg.decrypted(cipher, sk_e, sk_a)` opens the SK payload; `msg.to_bytes()` encodes in clear
(IKE_SA_INIT) and `msg.encrypt(cipher, sk_e, sk_a, rng)` puts all payloads inside one SK.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, TypeVar

from oe_agent.ike.const import (IKE_VERSION, NON_ESP_MARKER, ExchangeType, HeaderFlag,
                                NotifyType, PayloadType, name_of)
from oe_agent.ike.crypto import IkeCipher, Rng
from oe_agent.ike.errors import IkeProtocolError
from oe_agent.ike.payloads import EncryptedPayload, Notify, Payload, parse_payload

HEADER_LEN = 28
_HEADER = struct.Struct("!8s8sBBBBII")
_GENERIC = struct.Struct("!BBH")
_I_FLAG, _R_FLAG = int(HeaderFlag.INITIATOR), int(HeaderFlag.RESPONSE)  # plain ints: an
# IntFlag `&` goes through enum machinery, and this runs several times per message
P = TypeVar("P")


def _syntax(detail: str) -> IkeProtocolError:
    return IkeProtocolError(NotifyType.INVALID_SYNTAX, detail)


@dataclass(frozen=True)
class Header:
    """The fixed IKE header (§3.1), readable before the rest is parsed (to find the SA)."""

    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def initiator(self) -> bool:
        return bool(self.flags & _I_FLAG)

    @property
    def response(self) -> bool:
        return bool(self.flags & _R_FLAG)


def peek_header(data: bytes) -> Header:
    """Decode and check the header only: length, major version 2 (§2.5), length field."""
    if len(data) < HEADER_LEN:
        raise _syntax(f"{len(data)} bytes is shorter than the IKE header")
    spi_i, spi_r, np, ver, exch, flags, mid, length = _HEADER.unpack_from(data)
    if ver >> 4 != 2:
        raise IkeProtocolError(NotifyType.INVALID_MAJOR_VERSION, f"version {ver >> 4}.{ver & 15}")
    if length != len(data):
        raise _syntax(f"header length {length}, datagram {len(data)}")
    return Header(spi_i, spi_r, np, exch, flags, mid, length)


def _chain(payloads: Iterable[Payload]) -> tuple[int, bytes]:
    """Encode payloads with generic headers; returns (first type, bytes). An SK payload must be
    last and its next-payload field is its first inner type (§3.14)."""
    items = list(payloads)
    out = []
    for i, p in enumerate(items):
        body = p.to_bytes()
        if isinstance(p, EncryptedPayload):
            if i != len(items) - 1:
                raise _syntax("the SK payload must be the last one")
            np = p.first_payload
        else:
            np = items[i + 1].TYPE if i + 1 < len(items) else PayloadType.NONE
        crit = 0x80 if getattr(p, "critical", False) else 0
        if len(body) + 4 > 0xFFFF:
            raise _syntax("payload longer than 65535 bytes")
        out.append(_GENERIC.pack(np, crit, len(body) + 4) + body)
    return (items[0].TYPE if items else PayloadType.NONE), b"".join(out)


def _unchain(first: int, data: bytes, off: int, allow_sk: bool) -> tuple[Payload, ...]:
    """Decode the payload chain starting at `off` with type `first` through the end of data."""
    out: list[Payload] = []
    ptype = first
    while ptype != PayloadType.NONE:
        if len(data) - off < 4:
            raise _syntax(f"payload {name_of(PayloadType, ptype)} header truncated")
        np, crit, plen = _GENERIC.unpack_from(data, off)
        if plen < 4 or off + plen > len(data):
            raise _syntax(f"payload {name_of(PayloadType, ptype)} length {plen}")
        body = data[off + 4:off + plen]
        if ptype == PayloadType.SK:
            if not allow_sk:
                raise _syntax("SK payload inside an SK payload")
            if off + plen != len(data):
                raise _syntax("the SK payload must be the last one")
            out.append(EncryptedPayload(np, bytes(body)))
            return tuple(out)
        out.append(parse_payload(ptype, bool(crit & 0x80), body))
        ptype, off = np, off + plen
    if off != len(data):
        raise _syntax(f"{len(data) - off} bytes after the last payload")
    return tuple(out)


@dataclass(frozen=True)
class Message:
    """One IKE message. `initiator` is the I flag (sent by the original initiator), `response`
    the R flag. After parse, `raw` holds the datagram (excluded from equality)."""

    spi_i: bytes
    spi_r: bytes
    exchange: int
    initiator: bool
    response: bool
    message_id: int
    payloads: tuple[Payload, ...] = ()
    raw: bytes = field(default=b"", compare=False, repr=False)

    # --- decoding --------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes, header: Header | None = None) -> Message:
        """`header`: peek_header(data) if the caller already has it (saves decoding it twice)."""
        data = bytes(data)
        h = header or peek_header(data)
        payloads = _unchain(h.next_payload, data, HEADER_LEN, allow_sk=True)
        return cls(h.spi_i, h.spi_r, h.exchange, bool(h.flags & _I_FLAG),
                   bool(h.flags & _R_FLAG), h.message_id, payloads, data)

    @property
    def encrypted(self) -> EncryptedPayload | None:
        last = self.payloads[-1] if self.payloads else None
        return last if isinstance(last, EncryptedPayload) else None

    def decrypted(self, cipher: IkeCipher, sk_e: bytes, sk_a: bytes) -> Message:
        """This message with its SK payload replaced by the payloads inside it (§3.14).
        Raises IkeIntegrityError on a bad ICV (drop silently, §2.21.2)."""
        sk = self.encrypted
        if sk is None or not self.raw:
            raise _syntax("no SK payload to decrypt")
        sk_off = len(self.raw) - 4 - len(sk.data)
        aad = self.raw[:sk_off + 4]
        iv, rest = sk.data[:cipher.iv_len], sk.data[cipher.iv_len:]
        plain = cipher.open(sk_e, sk_a, iv, rest, aad)
        if not plain or plain[-1] + 1 > len(plain):
            raise _syntax("SK padding length exceeds the plaintext")
        inner = _unchain(sk.first_payload, plain[:len(plain) - 1 - plain[-1]], 0, allow_sk=False)
        return Message(self.spi_i, self.spi_r, self.exchange, self.initiator, self.response,
                       self.message_id, self.payloads[:-1] + inner, self.raw)

    # --- encoding --------------------------------------------------------------------------
    def _header(self, next_payload: int, length: int) -> bytes:
        flags = (_I_FLAG if self.initiator else 0) | (_R_FLAG if self.response else 0)
        if len(self.spi_i) != 8 or len(self.spi_r) != 8:
            raise _syntax("IKE SPIs are 8 bytes")
        return _HEADER.pack(self.spi_i, self.spi_r, next_payload, IKE_VERSION, self.exchange,
                            flags, self.message_id, length)

    def to_bytes(self) -> bytes:
        """The message in clear (an EncryptedPayload is written as it is)."""
        first, body = _chain(self.payloads)
        return self._header(first, HEADER_LEN + len(body)) + body

    def encrypt(self, cipher: IkeCipher, sk_e: bytes, sk_a: bytes, rng: Rng) -> bytes:
        """The message with all payloads inside one SK payload (§3.14); the IV comes from rng."""
        first, inner = _chain(self.payloads)
        pad = cipher.pad_len(len(inner))
        plain = inner + bytes(pad) + bytes([pad])
        iv = rng(cipher.iv_len)
        sk_len = 4 + len(iv) + len(plain) + cipher.icv_len
        aad = self._header(PayloadType.SK, HEADER_LEN + sk_len) + struct.pack(
            "!BBH", first, 0, sk_len)
        return aad + iv + cipher.seal(sk_e, sk_a, iv, plain, aad)

    # --- lookups ---------------------------------------------------------------------------
    def get(self, cls: type[P]) -> P | None:
        """The first payload of this class, or None."""
        return next((p for p in self.payloads if isinstance(p, cls)), None)

    def all(self, cls: type[P]) -> tuple[P, ...]:
        return tuple(p for p in self.payloads if isinstance(p, cls))

    def notify(self, notify_type: int) -> Notify | None:
        return next((p for p in self.payloads
                     if isinstance(p, Notify) and p.notify_type == notify_type), None)

    def __str__(self) -> str:
        kind = "response" if self.response else "request"
        role = "i" if self.initiator else "r"
        return (f"{name_of(ExchangeType, self.exchange)} {kind} #{self.message_id} from {role} "
                f"{self.spi_i.hex()}/{self.spi_r.hex()}")


# --- UDP encapsulation (RFC 3948) -----------------------------------------------------------

def classify_udp4500(datagram: bytes) -> tuple[str, bytes]:
    """Split a datagram received on port 4500: ("ike", message after the non-ESP marker),
    ("keepalive", b"") for the one-octet 0xFF NAT keepalive (RFC 3948 §2.3), or ("esp", the
    ESP packet). Anything else (too short) is ("invalid", datagram)."""
    if datagram == b"\xff":
        return "keepalive", b""
    if datagram[:4] == NON_ESP_MARKER and len(datagram) >= 4:
        return "ike", datagram[4:]
    if len(datagram) >= 8:
        return "esp", datagram
    return "invalid", datagram


def add_non_esp_marker(message: bytes) -> bytes:
    """An IKE message as sent on port 4500 (§2.23)."""
    return NON_ESP_MARKER + message


NAT_KEEPALIVE = b"\xff"
