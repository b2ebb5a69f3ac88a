"""Sans-I/O ESP (RFC 4303): one Child SA pair protects and unprotects IP packets.

No sockets, no clock, no global RNG in here: callers pass `now` (seconds) and, for AES-CBC, an
IV source `rng(n) -> bytes` (RFC 3602 §2.4 needs unpredictable IVs). AEAD transforms use the
64-bit sequence number as the explicit IV, which RFC 4106 §3.1 and RFC 7634 §2 allow (it only
has to be unique per key) and which needs no randomness.

Inbound order follows RFC 4303 §3.4: SPI -> sequence number (ESN high bits inferred per
Appendix A2.2) -> replay pre-check -> ICV -> window update -> decrypt -> padding and next header.
Every rejection raises `EspError` with a reason, and is counted on the SA.
"""
from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from oe_agent.esp import packet
from oe_agent.model import ChildSaParams, EspAlgorithm, IPAddress, Mode, SaExpire, TrafficSelector

Rng = Callable[[int], bytes]

#: Why a packet was refused; each has a counter on the SA (see `SaStats`).
REASONS = ("malformed", "integrity", "replay", "padding", "next-header", "policy", "expired",
           "sequence-exhausted", "dummy")

_PADS = [bytes(range(1, n + 1)) for n in range(256)]  # RFC 4303 §2.4 default padding 1, 2, 3...
ALGORITHMS = frozenset({"aes-gcm-16", "aes-cbc", "chacha20-poly1305"})


class EspError(Exception):
    """A packet this SA will not take or cannot send; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- transforms -----------------------------------------------------------------------------

class _Aead:
    """AES-GCM-16 (RFC 4106) and ChaCha20-Poly1305 (RFC 7634): key material = key || 4-byte
    salt, nonce = salt || 8-byte explicit IV, AAD = SPI || [seq high] || seq low (RFC 4106 §5)."""

    iv_len = 8
    icv_len = 16
    block = 4  # RFC 4303 §2.4: only 4-byte alignment for stream-like transforms

    def __init__(self, cls, key: bytes):
        self._aead = cls(key[:-4])
        self._salt = key[-4:]

    def seal(self, spi_seq: bytes, seq_hi: bytes | None, iv: bytes, plaintext: bytes) -> bytes:
        aad = spi_seq if seq_hi is None else spi_seq[:4] + seq_hi + spi_seq[4:]
        return iv + self._aead.encrypt(self._salt + iv, plaintext, aad)

    def open(self, esp: bytes, seq_hi: bytes | None) -> bytes:
        aad = esp[:8] if seq_hi is None else esp[:4] + seq_hi + esp[4:8]
        try:
            return self._aead.decrypt(self._salt + esp[8:16], esp[16:], aad)
        except InvalidTag:
            raise EspError("integrity", "AEAD tag mismatch") from None


class _CbcHmac:
    """AES-CBC (RFC 3602) + HMAC-SHA2-256-128 (RFC 4868); ESN high bits are appended to the
    ICV input only (RFC 4303 §2.2.1, §3.3.2.1)."""

    iv_len = 16
    icv_len = 16
    block = 16

    def __init__(self, key: bytes, integ_key: bytes, rng: Rng | None):
        self._key = key
        self._cipher = algorithms.AES(key)
        self._integ_key = integ_key
        self._rng = rng

    def _icv(self, data: bytes, seq_hi: bytes | None) -> bytes:
        h = chmac.HMAC(self._integ_key, hashes.SHA256())
        h.update(data)
        if seq_hi is not None:
            h.update(seq_hi)
        return h.finalize()[:16]

    def seal(self, spi_seq: bytes, seq_hi: bytes | None, iv: bytes, plaintext: bytes) -> bytes:
        enc = Cipher(self._cipher, modes.CBC(iv)).encryptor()
        body = iv + enc.update(plaintext) + enc.finalize()
        return body + self._icv(spi_seq + body, seq_hi)

    def open(self, esp: bytes, seq_hi: bytes | None) -> bytes:
        if (len(esp) - 8 - 16 - 16) % 16:
            raise EspError("malformed", "CBC ciphertext is not whole blocks")
        if not hmac.compare_digest(self._icv(esp[:-16], seq_hi), esp[-16:]):
            raise EspError("integrity", "HMAC-SHA2-256-128 mismatch")
        dec = Cipher(self._cipher, modes.CBC(esp[8:24])).decryptor()
        return dec.update(esp[24:-16]) + dec.finalize()


def _key_len_ok(alg: EspAlgorithm, key: bytes, integ_key: bytes) -> None:
    bits = alg.encr_key_bits
    if alg.encr == "aes-gcm-16":
        ok = bits in (128, 192, 256) and len(key) == bits // 8 + 4
    elif alg.encr == "chacha20-poly1305":
        ok = bits == 256 and len(key) == 36
    elif alg.encr == "aes-cbc":
        ok = bits in (128, 192, 256) and len(key) == bits // 8
        if alg.integ != "hmac-sha2-256-128":
            raise ValueError(f"aes-cbc needs integrity hmac-sha2-256-128, not {alg.integ!r}")
        if len(integ_key) != 32:
            raise ValueError(f"hmac-sha2-256-128 needs a 32-byte key, got {len(integ_key)}")
    else:
        raise ValueError(f"unknown ESP algorithm {alg.encr!r} (have {sorted(ALGORITHMS)})")
    if not ok:
        raise ValueError(f"{alg.encr}-{bits}: key material of {len(key)} bytes does not fit")
    if alg.encr != "aes-cbc" and alg.integ is not None:
        raise ValueError(f"{alg.encr} is AEAD: no separate integrity, got {alg.integ!r}")


def make_transform(alg: EspAlgorithm, key: bytes, integ_key: bytes = b"", rng: Rng | None = None):
    """The transform for `alg`; ValueError for a name or key length that does not fit."""
    _key_len_ok(alg, key, integ_key)
    if alg.encr == "aes-gcm-16":
        return _Aead(AESGCM, key)
    if alg.encr == "chacha20-poly1305":
        return _Aead(ChaCha20Poly1305, key)
    return _CbcHmac(key, integ_key, rng)


# --- anti-replay ----------------------------------------------------------------------------

class ReplayWindow:
    """RFC 4303 Appendix A: a sliding window of `size` bits over 64-bit sequence numbers.
    `size` 0 turns the check off (§3.4.3: the receiver may choose not to). Bit i of `bitmap`
    is sequence number `top - i`."""

    def __init__(self, size: int = 64, esn: bool = False):
        if size < 0 or size > 1 << 16:
            raise ValueError(f"replay window {size} out of range 0..65536")
        self.size = size
        self.esn = esn
        self.top = 0
        self.bitmap = 0

    def infer(self, seq_lo: int) -> int:
        """The full sequence number for the 32 bits on the wire (Appendix A2.2)."""
        if not self.esn:
            return seq_lo
        w = max(self.size, 1)
        th, tl = self.top >> 32, self.top & 0xFFFFFFFF
        if tl >= w - 1:  # case A: the window lies within one 2^32 subspace
            hi = th if seq_lo >= tl - w + 1 else th + 1
        else:  # case B: the window spans two subspaces
            hi = th - 1 if seq_lo >= (tl - w + 1) & 0xFFFFFFFF else th
        if hi < 0:
            raise EspError("replay", "sequence number before the first subspace")
        return (hi << 32) | seq_lo

    def check(self, seq: int) -> None:
        """Raise EspError('replay') for a duplicate or a number left of the window."""
        if seq == 0:
            raise EspError("replay", "sequence number 0 is never sent (RFC 4303 §3.3.3)")
        if self.size == 0 or seq > self.top:
            return
        diff = self.top - seq
        if diff >= self.size:
            raise EspError("replay", f"seq {seq} is left of the window (top {self.top})")
        if self.bitmap >> diff & 1:
            raise EspError("replay", f"seq {seq} already received")

    def update(self, seq: int) -> None:
        """Record an authenticated `seq` (only after the ICV checked, RFC 4303 §3.4.3)."""
        if seq > self.top:
            shift = seq - self.top
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << max(self.size, 1)) - 1)
            self.top = seq
        elif self.size:
            self.bitmap |= 1 << (self.top - seq)


# --- one direction --------------------------------------------------------------------------

@dataclass
class SaStats:
    """Per-SA counters, as `ip -s xfrm state` shows them, plus why packets were refused."""

    bytes: int = 0  # payload bytes protected or accepted (the inner packets)
    packets: int = 0
    last_use: float = 0.0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    @property
    def integrity_failed(self) -> int:
        return self.refused["integrity"]

    @property
    def replayed(self) -> int:
        return self.refused["replay"]


@dataclass(frozen=True)
class Lifetime:
    """Soft/hard limits; 0 = none. Seconds count from installation (XFRM add_expires)."""

    soft_s: float = 0
    hard_s: float = 0
    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0


class EspSa:
    """One direction of a Child SA: the SPI, the transform, sequence numbers, counters and
    lifetimes. Expiry events (model.SaExpire, as the kernel backend sends them) queue in
    `events`; `poll(now)` adds the time-based ones."""

    def __init__(self, spi: int, dst: IPAddress, transform, *, esn: bool = False,
                 replay_window: int = 64, lifetime: Lifetime = Lifetime(), now: float = 0.0,
                 reqid: int = 0):
        if not 256 <= spi <= 0xFFFFFFFF:
            raise ValueError(f"SPI {spi:#x}: 1-255 are reserved (RFC 4303 §2.1)")
        self.spi = spi
        self.dst = dst
        self.reqid = reqid
        self.esn = esn
        self.transform = transform
        self.replay = ReplayWindow(replay_window, esn)
        self.lifetime = lifetime
        self.created = now
        self.stats = SaStats()
        self.seq = 0  # last sequence number sent
        self.soft_fired = False
        self.hard_fired = False
        self.events: list[SaExpire] = []
        self._spi_bytes = struct.pack("!I", spi)

    # lifetimes (RFC 4301 §4.4.2.1: soft -> rekey, hard -> the SA is gone)
    def _expire(self, hard: bool) -> None:
        if hard and not self.hard_fired:
            self.hard_fired = self.soft_fired = True
            self.events.append(SaExpire(self.spi, self.dst, True, self.reqid))
        elif not hard and not self.soft_fired:
            self.soft_fired = True
            self.events.append(SaExpire(self.spi, self.dst, False, self.reqid))

    def _count(self, nbytes: int, now: float) -> None:
        st, lt = self.stats, self.lifetime
        st.bytes += nbytes
        st.packets += 1
        st.last_use = now
        if (lt.hard_bytes and st.bytes >= lt.hard_bytes) or (
                lt.hard_packets and st.packets >= lt.hard_packets):
            self._expire(True)
        elif (lt.soft_bytes and st.bytes >= lt.soft_bytes) or (
                lt.soft_packets and st.packets >= lt.soft_packets):
            self._expire(False)

    def poll(self, now: float) -> list[SaExpire]:
        """Fire time lifetimes due at `now`; return and clear all queued events."""
        self.check_time(now)
        out, self.events = self.events, []
        return out

    def check_time(self, now: float) -> None:
        """Queue the time lifetime events due at `now` (in `events`)."""
        age = now - self.created
        if self.lifetime.hard_s and age >= self.lifetime.hard_s:
            self._expire(True)
        elif self.lifetime.soft_s and age >= self.lifetime.soft_s:
            self._expire(False)

    def next_deadline(self) -> float | None:
        """When `poll` next has something to do (None: no time lifetime left)."""
        if self.hard_fired:
            return None
        if self.lifetime.soft_s and not self.soft_fired:
            return self.created + self.lifetime.soft_s
        if self.lifetime.hard_s:
            return self.created + self.lifetime.hard_s
        return None

    def refuse(self, reason: str, detail: str = "") -> EspError:
        self.stats.refused[reason] += 1
        return EspError(reason, detail)

    # outbound (RFC 4303 §3.3)
    def seal(self, next_header: int, payload: bytes, now: float, iv: bytes | None = None) -> bytes:
        """The ESP packet (SPI .. ICV) carrying `payload`. An explicit `iv` is for vectors only:
        it must never repeat under one key."""
        if self.hard_fired:
            raise self.refuse("expired", f"SA {self.spi:#010x} passed its hard lifetime")
        limit = 0xFFFFFFFFFFFFFFFF if self.esn else 0xFFFFFFFF
        if self.seq >= limit:  # §3.3.3: never cycle; the SA must be rekeyed
            self._expire(True)
            raise self.refuse("sequence-exhausted", f"SA {self.spi:#010x}")
        self.seq += 1
        seq = self.seq
        t = self.transform
        if iv is None:
            if t.iv_len == 8:  # AEAD: the sequence number is a unique IV (RFC 4106 §3.1)
                iv = seq.to_bytes(8, "big")
            elif t._rng is None:
                raise ValueError("AES-CBC needs an IV source (rng)")
            else:
                iv = t._rng(t.iv_len)
        elif len(iv) != t.iv_len:
            raise ValueError(f"IV of {len(iv)} bytes, this transform takes {t.iv_len}")
        padlen = -(len(payload) + 2) % t.block
        trailer = _PADS[padlen] + bytes((padlen, next_header))
        spi_seq = self._spi_bytes + struct.pack("!I", seq & 0xFFFFFFFF)
        seq_hi = struct.pack("!I", seq >> 32) if self.esn else None
        out = spi_seq + t.seal(spi_seq, seq_hi, iv, payload + trailer)
        self._count(len(payload), now)
        return out

    # inbound (RFC 4303 §3.4)
    def open(self, esp: bytes, now: float) -> tuple[int, bytes]:
        """(next header, payload) of an ESP packet for this SA; EspError if refused."""
        t = self.transform
        if len(esp) < 8 + t.iv_len + t.block + t.icv_len:
            raise self.refuse("malformed", f"ESP packet of {len(esp)} bytes is too short")
        if self.hard_fired:
            raise self.refuse("expired", f"SA {self.spi:#010x} passed its hard lifetime")
        try:
            seq = self.replay.infer(struct.unpack_from("!I", esp, 4)[0])
            self.replay.check(seq)
        except EspError as e:
            raise self.refuse(e.reason, str(e)) from None
        seq_hi = struct.pack("!I", seq >> 32) if self.esn else None
        try:
            plain = t.open(esp, seq_hi)
        except EspError as e:
            raise self.refuse(e.reason, str(e)) from None
        self.replay.update(seq)
        padlen, nh = plain[-2], plain[-1]
        if padlen + 2 > len(plain):
            raise self.refuse("padding", f"pad length {padlen} longer than the payload")
        if plain[-2 - padlen:-2] != _PADS[padlen]:
            raise self.refuse("padding", "pad bytes are not 1, 2, 3, ... (RFC 4303 §2.4)")
        if nh == packet.PROTO_NONE:
            raise self.refuse("dummy", "next header 59: a TFC dummy packet")
        payload = plain[:-2 - padlen]
        self._count(len(payload), now)
        return nh, payload


# --- the Child SA pair, with its mode ---------------------------------------------------------

Selector = tuple[int, int, int, int, int, int]  # address length, low, high, proto, ports


def _selectors(tss: tuple[TrafficSelector, ...]) -> tuple[Selector, ...]:
    """Traffic selectors as integers, so the per-packet check compares ints, not objects."""
    return tuple((4 if ts.version == 4 else 16, int(ts.start), int(ts.end), ts.proto,
                  ts.port_start, ts.port_end) for ts in tss)


def _covers(sels: tuple[Selector, ...], addr: bytes, proto: int, port: int) -> bool:
    a = int.from_bytes(addr, "big")
    n = len(addr)
    for alen, lo, hi, sproto, ps, pe in sels:
        if alen == n and lo <= a <= hi and (sproto == 0 or sproto == proto) and ps <= port <= pe:
            return True
    return False


def lifetime_of(params: ChildSaParams) -> Lifetime:
    return Lifetime(params.lifetime_soft_s, params.lifetime_hard_s, params.lifetime_soft_bytes,
                    params.lifetime_hard_bytes, params.lifetime_soft_packets,
                    params.lifetime_hard_packets)


class ChildSa:
    """An inbound and an outbound `EspSa` made from one `ChildSaParams`, and the mode: tunnel
    mode carries the whole inner packet (next header 4 or 41, RFC 4303 §3.1.2); transport mode
    carries what follows the IP header and rebuilds that header on the way in (§3.1.1)."""

    def __init__(self, params: ChildSaParams, now: float = 0.0, rng: Rng | None = None):
        if params.alg.encr not in ALGORITHMS:
            raise ValueError(f"unknown ESP algorithm {params.alg.encr!r}")
        if params.local.version != params.remote.version:
            raise ValueError(f"outer addresses differ in family: {params.local} {params.remote}")
        self.params = params
        life = lifetime_of(params)
        self.inbound = EspSa(params.spi_in, params.local,
                             make_transform(params.alg, params.encr_key_in, params.integ_key_in),
                             esn=params.esn, replay_window=params.replay_window, lifetime=life,
                             now=now, reqid=params.reqid)
        self.outbound = EspSa(params.spi_out, params.remote,
                              make_transform(params.alg, params.encr_key_out,
                                             params.integ_key_out, rng),
                              esn=params.esn, replay_window=0, lifetime=life, now=now,
                              reqid=params.reqid)
        self.tunnel = params.mode is Mode.TUNNEL
        self.ts_local = params.ts_local or (TrafficSelector.host(params.local),)
        self.ts_remote = params.ts_remote or (TrafficSelector.host(params.remote),)
        # where a socket sends this SA's packets: (host, UDP port or 0 for raw ESP)
        self.peer = (str(params.remote), params.encap[1] if params.encap else 0)
        self.local_ep = (str(params.local), params.encap[0] if params.encap else 0)
        self._sel_local = _selectors(self.ts_local)
        self._sel_remote = _selectors(self.ts_remote)

    def covers(self, info: packet.IpInfo) -> bool:
        """Does the outbound selector (ts_local -> ts_remote) take this packet?"""
        return (_covers(self._sel_remote, info.dst_b, info.proto, info.dport)
                and _covers(self._sel_local, info.src_b, info.proto, info.sport))

    def overhead(self) -> int:
        """Bytes ESP adds to an inner packet at most (header, IV, padding, ICV)."""
        t = self.outbound.transform
        return 8 + t.iv_len + t.block + 1 + t.icv_len - (0 if self.tunnel else 20)

    def protect(self, pkt: bytes, now: float, info: packet.IpInfo | None = None) -> bytes:
        """An IP packet leaving this host -> the ESP packet (SPI .. ICV) to send to `remote`."""
        info = info or packet.parse(pkt)
        if self.tunnel:
            nh = packet.PROTO_IPIP if info.version == 4 else packet.PROTO_IPV6
            return self.outbound.seal(nh, pkt, now)
        if info.fragment:
            raise self.outbound.refuse("policy", "transport mode protects whole datagrams only")
        nh, upper = packet.strip_ip(pkt, info)
        return self.outbound.seal(nh, upper, now)

    def unprotect(self, esp: bytes, now: float) -> bytes:
        """An ESP packet for `spi_in` -> the IP packet to deliver on this host, after checking
        that it is one the SA may carry (RFC 4301 §5.2)."""
        sa = self.inbound
        nh, payload = sa.open(esp, now)
        if self.tunnel:
            if nh not in (packet.PROTO_IPIP, packet.PROTO_IPV6):
                raise sa.refuse("next-header", f"tunnel mode carries IP, not protocol {nh}")
            try:
                info = packet.parse(payload)
            except packet.PacketError as e:
                raise sa.refuse("malformed", f"inner packet: {e}") from None
            if (info.version == 4) != (nh == packet.PROTO_IPIP):
                raise sa.refuse("next-header", "next header does not match the inner version")
            if not (_covers(self._sel_remote, info.src_b, info.proto, info.sport)
                    and _covers(self._sel_local, info.dst_b, info.proto, info.dport)):
                raise sa.refuse("policy", f"inner {info.src} -> {info.dst} outside the SA")
            return payload[:((payload[2] << 8) | payload[3]) if info.version == 4
                           else 40 + ((payload[4] << 8) | payload[5])]
        if nh in (packet.PROTO_IPIP, packet.PROTO_IPV6, packet.PROTO_ESP):
            raise sa.refuse("next-header", f"transport mode SA got next header {nh}")
        if self.params.encap is not None:  # ESP-in-UDP transport mode = a NAT was seen
            payload = packet.fix_l4_checksum(self.params.remote, self.params.local, nh, payload)
        try:
            return packet.build_ip(self.params.remote, self.params.local, nh, payload)
        except packet.PacketError as e:
            raise sa.refuse("malformed", str(e)) from None

    def poll(self, now: float) -> list[SaExpire]:
        return self.inbound.poll(now) + self.outbound.poll(now)

    def poll_into(self, now: float) -> None:
        """Queue due time lifetime events on each direction's `events` (not returned)."""
        self.inbound.check_time(now)
        self.outbound.check_time(now)

    def next_deadline(self) -> float | None:
        ds = [d for d in (self.inbound.next_deadline(), self.outbound.next_deadline()) if d]
        return min(ds) if ds else None
