"""`oe-agent decrypt PCAP --keylog FILE`: decode IKE and decrypt ESP in a capture.

IKE on UDP 500 and 4500 (after the non-ESP marker) is printed message by message, its SK
payload opened with the key log's ikev2_decryption_table row for its SPIs. ESP (IP protocol
50) and ESP-in-UDP (RFC 3948) packets are opened with the esp_sa row for their SPI; the inner
packet's addresses, protocol, ports and first bytes are shown.
"""
from __future__ import annotations

import argparse
import ipaddress
import struct
import sys
from dataclasses import dataclass
from typing import TextIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from oe_agent.errors import UserError
from oe_agent.ike import payloads as pl
from oe_agent.ike.const import (IKE_PORT, NAT_T_PORT, AuthMethod, CertEncoding, CfgType,
                                DhId, EncrId, EsnId, ExchangeType, HashAlgorithm, IdType,
                                IntegId, NotifyType, PayloadType, PrfId, ProtocolId,
                                TransformType, name_of)
from oe_agent.ike.errors import IkeError, IkeIntegrityError
from oe_agent.ike.keylog import EspKeyLine, KeyLogError, KeyTable, read_keylog
from oe_agent.ike.message import Message, classify_udp4500
from oe_agent.ike.pcap import CaptureError, IpPacket, ip_of, parse_ip, read_frames

PREVIEW_BYTES = 64
_PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 50: "ESP", 58: "ICMPv6", 4: "IPIP", 41: "IPv6"}
_TRANSFORM_ENUMS = {TransformType.ENCR: EncrId, TransformType.PRF: PrfId,
                    TransformType.INTEG: IntegId, TransformType.DH: DhId,
                    TransformType.ESN: EsnId}


# --- IKE payload text -------------------------------------------------------------------------

def _transform(t: pl.Transform) -> str:
    enum = _TRANSFORM_ENUMS.get(t.type)
    name = name_of(enum, t.id) if enum else str(t.id)
    kl = f"-{t.key_length}" if t.key_length is not None else ""
    return f"{name_of(TransformType, t.type)}={name}{kl}"


def _notify_data(n: pl.Notify) -> str:
    if n.notify_type == NotifyType.SIGNATURE_HASH_ALGORITHMS and len(n.data) % 2 == 0:
        return " " + ",".join(name_of(HashAlgorithm, int.from_bytes(n.data[i:i + 2], "big"))
                              for i in range(0, len(n.data), 2))
    if n.notify_type == NotifyType.INVALID_KE_PAYLOAD and len(n.data) == 2:
        return " group " + name_of(DhId, int.from_bytes(n.data, "big"))
    if n.notify_type in (NotifyType.ADDITIONAL_IP4_ADDRESS, NotifyType.ADDITIONAL_IP6_ADDRESS) \
            and len(n.data) in (4, 16):
        return " " + str(ipaddress.ip_address(n.data))
    return f" {n.data.hex()}" if n.data else ""


_SIGNATURE_OIDS = {
    "1.3.101.112": "ed25519", "1.3.101.113": "ed448", "1.2.840.113549.1.1.10": "rsassa-pss",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256", "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
}


def _signature_scheme(data: bytes) -> str:
    """The algorithm of an RFC 7427 §3 AUTH payload: 1-octet length, then a DER
    AlgorithmIdentifier whose first element is the OID; named if known, dotted if not."""
    if len(data) < 5 or data[1] != 0x30 or data[3] != 0x06 or 1 + data[0] > len(data):
        return "(no AlgorithmIdentifier)"
    oid = data[5:5 + data[4]]
    if not oid or len(oid) != data[4]:
        return "(no AlgorithmIdentifier)"
    arcs, n = [oid[0] // 40, oid[0] % 40], 0
    for b in oid[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(n)
            n = 0
    dotted = ".".join(map(str, arcs))
    return _SIGNATURE_OIDS.get(dotted, dotted)


def describe(p) -> str:
    """One line for a decoded payload, in the RFC's words."""
    if isinstance(p, pl.SecurityAssociation):
        props = "; ".join(
            f"#{x.number} {name_of(ProtocolId, x.protocol)}"
            + (f" spi {x.spi.hex()}" if x.spi else "") + " "
            + " ".join(_transform(t) for t in x.transforms) for x in p.proposals)
        return f"SA {props}"
    if isinstance(p, pl.KeyExchange):
        return f"KE group {name_of(DhId, p.group)}, {len(p.data)} bytes"
    if isinstance(p, pl.Nonce):
        return f"Nonce {len(p.data)} bytes {p.data[:8].hex()}..."
    if isinstance(p, (pl.IdInitiator, pl.IdResponder)):
        kind = "IDi" if isinstance(p, pl.IdInitiator) else "IDr"
        return f"{kind} {name_of(IdType, p.id_type)} {p}"
    if isinstance(p, pl.Authentication):
        scheme = f" {_signature_scheme(p.data)}" if p.method == AuthMethod.DIGITAL_SIGNATURE else ""
        return f"AUTH {name_of(AuthMethod, p.method)}{scheme}, {len(p.data)} bytes"
    if isinstance(p, pl.Notify):
        spi = f" {name_of(ProtocolId, p.protocol)} spi {p.spi.hex()}" if p.spi else ""
        return f"N({name_of(NotifyType, p.notify_type)}){spi}{_notify_data(p)}"
    if isinstance(p, pl.Delete):
        spis = " ".join(s.hex() for s in p.spis)
        return f"D {name_of(ProtocolId, p.protocol)} {spis}".rstrip()
    if isinstance(p, (pl.TsInitiator, pl.TsResponder)):
        kind = "TSi" if isinstance(p, pl.TsInitiator) else "TSr"
        return f"{kind} " + ", ".join(
            f"{t.start}-{t.end} proto {t.proto} ports {t.port_start}-{t.port_end}"
            for t in p.selectors)
    if isinstance(p, pl.VendorId):
        return f"V {p.data.hex()}"
    if isinstance(p, pl.CertificateRequest):
        return f"CERTREQ {name_of(CertEncoding, p.encoding)}, {len(p.data)} bytes"
    if isinstance(p, pl.Certificate):
        return f"CERT {name_of(CertEncoding, p.encoding)}, {len(p.data)} bytes"
    if isinstance(p, pl.Configuration):
        return f"CP {name_of(CfgType, p.cfg_type)} " + " ".join(
            f"{a.type}={a.value.hex()}" for a in p.attributes)
    if isinstance(p, pl.EncryptedPayload):
        return f"SK {len(p.data)} bytes (first inner {name_of(PayloadType, p.first_payload)})"
    return f"payload {name_of(PayloadType, p.type)}{' (critical)' if p.critical else ''}, " \
           f"{len(p.body)} bytes"


# --- ESP --------------------------------------------------------------------------------------

class EspKeyMismatch(Exception):
    """The esp_sa key does not open this packet."""


def open_esp(key: EspKeyLine, packet: bytes) -> tuple[int, bytes]:
    """ESP (RFC 4303) -> (next header, inner payload). AES-GCM (RFC 4106) and ChaCha20-Poly1305
    (RFC 7634): nonce = salt || IV, AAD = SPI || sequence; AES-CBC + HMAC (RFC 3602, 4868):
    ICV over SPI..ciphertext. A key log does not say whether the SA uses extended sequence
    numbers, so when the check fails we try again as ESN with high-order bits 0 (RFC 4303
    §2.2.1: AAD SPI || seq_hi || seq, or seq_hi appended for the ICV)."""
    e = key.encr
    iv_len, icv_len = e.iv_len, (e.icv_len if key.integ is None else key.integ.icv_len)
    if len(packet) < 8 + iv_len + icv_len + 2:
        raise EspKeyMismatch("packet too short for this SA's algorithms")
    iv, body = packet[8:8 + iv_len], packet[8 + iv_len:]
    if e.aead:
        k, salt = key.encr_key[:-4], key.encr_key[-4:]
        aead = AESGCM(k) if e.id == EncrId.AES_GCM_16 else ChaCha20Poly1305(k)
        for aad in (packet[:8], packet[:4] + bytes(4) + packet[4:8]):
            try:
                plain = aead.decrypt(salt + iv, body, aad)
                break
            except InvalidTag:
                continue
        else:
            raise EspKeyMismatch("integrity check failed")
    else:
        ct, icv = body[:-icv_len], body[-icv_len:]
        signed = packet[:8 + iv_len] + ct
        if not (key.integ.verify(key.integ_key, signed, icv)
                or key.integ.verify(key.integ_key, signed + bytes(4), icv)):
            raise EspKeyMismatch("integrity check failed")
        if len(ct) % 16:
            raise EspKeyMismatch("ciphertext not a multiple of the block size")
        d = Cipher(algorithms.AES(key.encr_key), modes.CBC(iv)).decryptor()
        plain = d.update(ct) + d.finalize()
    pad, nh = plain[-2], plain[-1]
    if pad + 2 > len(plain):
        raise EspKeyMismatch("bad ESP padding")
    return nh, plain[:len(plain) - 2 - pad]


def _printable(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in data[:PREVIEW_BYTES])


def _l4(proto: int, data: bytes) -> tuple[str, bytes]:
    """Port/type summary and the upper-layer payload of a TCP/UDP/ICMP segment."""
    if proto in (6, 17) and len(data) >= (20 if proto == 6 else 8):
        sport, dport = struct.unpack_from("!HH", data)
        hl = ((data[12] >> 4) * 4) if proto == 6 else 8
        return f" ports {sport} -> {dport}", data[hl:]
    if proto in (1, 58) and len(data) >= 8:
        return f" type {data[0]} code {data[1]}", data[8:]
    return "", data


def describe_inner(nh: int, payload: bytes, outer: IpPacket) -> list[str]:
    """Lines describing the packet inside ESP: tunnel mode carries IP, transport mode the
    upper layer of the outer addresses."""
    if nh in (4, 41):
        ip = parse_ip(payload)
        if ip is None:
            return [f"inner IP packet malformed ({len(payload)} bytes)"]
        src, dst, proto, data, mode = ip.src, ip.dst, ip.proto, ip.payload, "tunnel"
    else:
        src, dst, proto, data, mode = outer.src, outer.dst, nh, payload, "transport"
    ports, body = _l4(proto, data)
    pname = _PROTO_NAMES.get(proto, str(proto))
    return [f"inner ({mode}) {src} -> {dst} {pname}{ports}, {len(body)} bytes payload",
            f"  payload: {_printable(body)!s}"]


# --- the capture walk -------------------------------------------------------------------------

@dataclass
class Summary:
    ike: int = 0
    ike_opened: int = 0
    esp: int = 0
    esp_opened: int = 0
    failures: int = 0


def _ike(out: TextIO, keys: KeyTable, data: bytes, s: Summary) -> None:
    s.ike += 1
    try:
        msg = Message.parse(data)
    except IkeError as e:
        print(f"  IKE message not parsable: {e}", file=out)
        s.failures += 1
        return
    sender = "initiator" if msg.initiator else "responder"
    print(f"  IKE {name_of(ExchangeType, msg.exchange)} "
          f"{'response' if msg.response else 'request'} #{msg.message_id} from {sender}, "
          f"SPIs {msg.spi_i.hex()}/{msg.spi_r.hex()}", file=out)
    shown = msg
    if msg.encrypted is not None:
        key = keys.ike.get((msg.spi_i, msg.spi_r))
        if key is None:
            print("    (no key for these SPIs: SK payload left encrypted)", file=out)
        else:
            sk_e, sk_a = (key.sk_ei, key.sk_ai) if msg.initiator else (key.sk_er, key.sk_ar)
            try:
                shown = msg.decrypted(key.cipher(), sk_e, sk_a)
                s.ike_opened += 1
            except IkeIntegrityError:
                print("    key does not fit: SK integrity check failed", file=out)
                s.failures += 1
            except IkeError as e:
                print(f"    SK payload decrypted but malformed: {e}", file=out)
                s.failures += 1
    for p in shown.payloads:
        print(f"    {describe(p)}", file=out)


def _esp(out: TextIO, keys: KeyTable, packet: bytes, outer: IpPacket, s: Summary) -> None:
    s.esp += 1
    if len(packet) < 8:
        print("  ESP packet shorter than its header", file=out)
        return
    spi, seq = struct.unpack_from("!II", packet)
    print(f"  ESP spi 0x{spi:08x} seq {seq}, {len(packet)} bytes", file=out)
    key = keys.esp_for(spi, outer.src, outer.dst)
    if key is None:
        print("    (no esp_sa key for this SPI)", file=out)
        return
    try:
        nh, inner = open_esp(key, packet)
    except EspKeyMismatch as e:
        print(f"    key does not fit: {e}", file=out)
        s.failures += 1
        return
    s.esp_opened += 1
    for line in describe_inner(nh, inner, outer):
        print(f"    {line}", file=out)


def decrypt_capture(f, keys: KeyTable, out: TextIO) -> Summary:
    s = Summary()
    for frame in read_frames(f):
        ip = ip_of(frame)
        if ip is None:
            continue
        head = f"#{frame.number} {ip.src} -> {ip.dst}"
        if ip.proto == 50:
            print(f"{head} ESP", file=out)
            _esp(out, keys, ip.payload, ip, s)
        elif ip.proto == 17 and len(ip.payload) >= 8:
            sport, dport = struct.unpack_from("!HH", ip.payload)
            data = ip.payload[8:]
            if NAT_T_PORT in (sport, dport):
                kind, rest = classify_udp4500(data)
                print(f"{head} UDP {sport} -> {dport}", file=out)
                if kind == "ike":
                    _ike(out, keys, rest, s)
                elif kind == "esp":
                    _esp(out, keys, rest, ip, s)
                elif kind == "keepalive":
                    print("  NAT keepalive", file=out)
                else:
                    print(f"  {len(data)} bytes, neither IKE nor ESP", file=out)
            elif IKE_PORT in (sport, dport):
                print(f"{head} UDP {sport} -> {dport}", file=out)
                _ike(out, keys, data, s)
    return s


def run(args: argparse.Namespace) -> int:
    try:
        keys = read_keylog(args.keylog)
    except FileNotFoundError:
        raise UserError(f"key log {args.keylog}: no such file") from None
    except KeyLogError as e:
        raise UserError(str(e)) from None
    except UnicodeDecodeError:
        raise UserError(f"key log {args.keylog}: not a text file") from None
    except OSError as e:
        raise UserError(f"key log {args.keylog}: {e.strerror or e}") from None
    try:
        with open(args.pcap, "rb") as f:
            s = decrypt_capture(f, keys, sys.stdout)
    except FileNotFoundError:
        raise UserError(f"capture {args.pcap}: no such file") from None
    except CaptureError as e:
        raise UserError(f"capture {args.pcap}: {e}") from None
    except OSError as e:
        raise UserError(f"capture {args.pcap}: {e.strerror or e}") from None
    print(f"{s.ike} IKE messages ({s.ike_opened} decrypted), "
          f"{s.esp} ESP packets ({s.esp_opened} decrypted)")
    if s.failures:
        raise UserError(f"{s.failures} packet(s) did not decrypt or parse with the given keys")
    return 0


def register(sub) -> None:
    p = sub.add_parser("decrypt", help="decode IKE and decrypt ESP in a capture",
                       description="Decode the IKE messages and decrypt the ESP packets of a "
                                   "pcap/pcapng capture with the keys of a key log.")
    p.add_argument("pcap", metavar="PCAP", help="pcap or pcapng capture")
    p.add_argument("--keylog", required=True, metavar="FILE",
                   help="key log (ikev2_decryption_table/esp_sa lines), or strongSwan's "
                        "save-keys directory")
    p.set_defaults(func=run)
