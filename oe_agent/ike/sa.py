"""IkeSa: one IKEv2 SA with its Child SAs, sans-I/O (the shape of aioquic's QuicConnection).

Driven by `receive_datagram(data, addr, now)`, `handle_timer(now)` and the API calls
(`connect`, `rekey_child`, `rekey`, `delete_child`, `delete`, `supply_peer_keys`); it answers
through `datagrams_to_send(now)`, `next_event()` and `get_timer()`. Time is always passed in,
randomness comes from the injected `rng(n) -> bytes`. Dispatch goes through states.TABLE.

An IKE rekey (RFC 7296 §2.18) keeps this object: the new SPIs and keys become the current
`_Keyset`, the old one stays only until its Delete exchange is done, and the Child SAs move
over. `IkeEndpoint` (below) owns many IkeSa objects: it routes datagrams by SPI, answers
IKE_SA_INIT under load with a COOKIE (§2.6) and settles mutual initiation.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from collections import deque
from dataclasses import dataclass, field, replace
from functools import lru_cache, wraps
from heapq import heapify, heappop, heappush
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oe_agent.ike import auth as ikeauth
from oe_agent.ike.child import ChildSa, ChildState, build_params, narrow, within
from oe_agent.ike.const import (NAT_T_PORT, NON_ESP_MARKER, ExchangeType, IKE_PORT,
                                NotifyType, ProtocolId, TransformType)
from oe_agent.ike.crypto import (IkeCipher, IkeKeys, KeyExchangeMethod, Prf, Rng,
                                 derive_ike_keys, key_exchange, prf_for, skeyseed,
                                 skeyseed_rekey)
from oe_agent.ike.errors import IkeError, IkeIntegrityError, IkeProtocolError
from oe_agent.ike.events import (ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed, IkeEvent,
                                 IkeSaDeleted, IkeSaEstablished, IkeSaRekeyed,
                                 NegotiationFailed, PeerAlive, PeerKeyNeeded)
from oe_agent.ike.message import Message, peek_header
from oe_agent.ike.payloads import (Authentication, Delete, IdInitiator, IdResponder,
                                   KeyExchange, Nonce, Notify, Proposal, SecurityAssociation,
                                   Transform, TsInitiator, TsResponder)
from oe_agent.ike.proposal import (DEFAULT_ESP, DEFAULT_IKE, Suite, check_choice, dh_groups,
                                   proposals, select, with_spi, without_dh)
from oe_agent.ike.states import EXCHANGE_INPUTS, TABLE, IkeState, Input
from oe_agent.model import IPAddress, Mode, TrafficSelector

# SIGNATURE_HASH_ALGORITHMS data (RFC 7427 §4), the same in every IKE_SA_INIT
_OUR_HASHES = b"".join(struct.pack("!H", a) for a in ikeauth.OUR_HASH_ALGORITHMS)
UNAUTHENTICATED = "unauthenticated"  # supply_peer_keys marker: AUTH_NULL is acceptable
NONCE_LEN = 32
_NOTIFY_REASON = {NotifyType.NO_PROPOSAL_CHOSEN: "no-proposal",
                  NotifyType.INVALID_KE_PAYLOAD: "no-proposal",
                  NotifyType.TS_UNACCEPTABLE: "ts-unacceptable",
                  NotifyType.INVALID_SELECTORS: "ts-unacceptable",
                  NotifyType.SINGLE_PAIR_REQUIRED: "ts-unacceptable",
                  NotifyType.AUTHENTICATION_FAILED: "auth-failed"}


def _reason(notify_type: int) -> str:
    return _NOTIFY_REASON.get(notify_type, "internal")


@dataclass(frozen=True)
class IkeConfig:
    """Everything one IKE SA needs to know; immutable, shared by many SAs.

    `local_id`: our IDi/IDr value (payloads.IdInitiator.from_address / from_fqdn / null()).
    `credential`: auth.SignatureCredential / PskCredential / NullCredential.
    Peer policy: `peer_id` (None = any), `peer_keys` (None = ask with PeerKeyNeeded),
    `peer_psk`, `allow_null` (accept AUTH_NULL without asking).
    Proposals in strongSwan syntax (proposal.parse_proposal); a DH token in `esp_proposals`
    asks for PFS when rekeying Child SAs. `ts_local`/`ts_remote` empty = the host pair.
    Retransmission: `retransmit_timeout` * 2^n, `retransmit_tries` sends in all (§2.1).
    """

    local_id: Any
    credential: ikeauth.Credential
    peer_id: Any = None
    peer_keys: tuple | None = None
    peer_psk: bytes | None = None
    allow_null: bool = False
    ike_proposals: tuple[str, ...] = DEFAULT_IKE
    esp_proposals: tuple[str, ...] = DEFAULT_ESP
    mode: Mode = Mode.TRANSPORT
    ts_local: tuple[TrafficSelector, ...] = ()
    ts_remote: tuple[TrafficSelector, ...] = ()
    ike_lifetime_s: int = 14400
    child_lifetime_s: int = 3600
    retransmit_timeout: float = 1.0
    retransmit_tries: int = 5
    liveness_interval: float = 30.0  # 0 = no liveness checks
    keepalive_interval: float = 20.0  # NAT keepalives when we are behind a NAT
    half_open_timeout: float = 30.0  # responder: IKE_AUTH must follow within this
    key_wait_timeout: float = 30.0  # PeerKeyNeeded must be answered within this
    ike_port: int = IKE_PORT
    natt_port: int = NAT_T_PORT
    float_always: bool = True  # move IKE to natt_port after IKE_SA_INIT even without NAT
    initial_contact: bool = True

    def __post_init__(self):
        """Refuse a config that cannot work, at once (ValueError / ProposalSyntaxError)."""
        self.ike_offer()
        self.esp_offer()
        if not isinstance(self.credential, (ikeauth.SignatureCredential,
                                            ikeauth.PskCredential, ikeauth.NullCredential)):
            raise ValueError(f"credential must be an auth.*Credential, not "
                             f"{type(self.credential).__name__}")
        if isinstance(self.credential, ikeauth.SignatureCredential) and not isinstance(
                self.credential.key, (ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey,
                                      ec.EllipticCurvePrivateKey)):
            raise ValueError(f"unsupported host key type {type(self.credential.key).__name__} "
                             "(Ed25519, RSA or ECDSA)")
        if not hasattr(self.local_id, "id_type") or not hasattr(self.local_id, "data"):
            raise ValueError("local_id must be an IdInitiator/IdResponder value")
        if self.retransmit_tries < 1 or self.retransmit_timeout <= 0:
            raise ValueError("retransmit_tries >= 1 and retransmit_timeout > 0 are needed")
        if not isinstance(self.mode, Mode):
            raise ValueError(f"mode must be a model.Mode, not {self.mode!r}")

    def ike_offer(self) -> tuple[Proposal, ...]:
        return _offer(tuple(self.ike_proposals), ProtocolId.IKE)

    def esp_offer(self) -> tuple[Proposal, ...]:
        return _offer(tuple(self.esp_proposals), ProtocolId.ESP)


@lru_cache(maxsize=64)
def _offer(texts: tuple[str, ...], protocol: int) -> tuple[Proposal, ...]:
    return proposals(texts, protocol)


@dataclass(frozen=True)
class Datagram:
    """One UDP datagram to send. `data` is the IKE message (or a NAT keepalive); `wire()` adds
    the non-ESP marker when it goes out on the NAT-T port (RFC 7296 §2.23)."""

    data: bytes
    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int
    marker: bool = False
    keepalive: bool = False

    def wire(self) -> bytes:
        return NON_ESP_MARKER + self.data if self.marker else self.data


@dataclass
class _Request:
    exchange: int
    message_id: int
    data: bytes
    kind: str
    ctx: dict
    tries: int = 1
    next_at: float = 0.0
    retransmit: bool = True


@dataclass
class _Keyset:
    """SPIs, keys and message-ID windows (size 1, §2.3) of one IKE SA generation."""

    spi_i: bytes
    spi_r: bytes
    initiator: bool  # we are this IKE SA's original initiator (I flag, §3.1)
    ni: bytes = b""
    nr: bytes = b""
    suite: Suite | None = None
    prf: Prf | None = None
    cipher: IkeCipher | None = None
    keys: IkeKeys | None = None
    my_mid: int = 0
    peer_mid: int = 0
    pending: _Request | None = None
    queue: deque = field(default_factory=deque)
    last_request: bytes = b""  # raw bytes of the peer's last request (duplicate detection)
    last_response: bytes = b""
    init_out: bytes = b""  # our IKE_SA_INIT message (signed octets, §2.15)
    init_in: bytes = b""  # the peer's

    @property
    def our_spi(self) -> bytes:
        return self.spi_i if self.initiator else self.spi_r


def nat_hash(spi_i: bytes, spi_r: bytes, addr: IPAddress, port: int) -> bytes:
    """SHA-1(SPIi | SPIr | IP | Port) (RFC 7296 §2.23); hashlib's one-shot SHA-1 (no hash
    object per call: four of these per handshake on each side)."""
    return hashlib.sha1(spi_i + spi_r + addr.packed + port.to_bytes(2, "big")).digest()


_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def as_address(addr) -> IPAddress:
    """An ipaddress object as it is, text parsed once per distinct value: `ip_address()` on an
    address object goes back through its text, and every datagram names two addresses."""
    if type(addr) in _ADDRESS_TYPES:
        return addr
    return _parse_address(addr)


@lru_cache(maxsize=4096)
def _parse_address(addr) -> IPAddress:
    return ipaddress.ip_address(addr)


@lru_cache(maxsize=4096)
def _host_selectors(addr: IPAddress) -> tuple[TrafficSelector, ...]:
    """(TrafficSelector.host(addr),): immutable, so shared by every SA with that address."""
    return (TrafficSelector.host(addr),)


def _hash_list(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2)]


def _need(msg: Message, cls, what: str):
    p = msg.get(cls)
    if p is None:
        raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"{msg}: no {what} payload")
    return p


def _observed(ts: tuple[TrafficSelector, ...], addr: IPAddress) -> tuple[TrafficSelector, ...]:
    """Single-host selectors of `addr`'s family rewritten to `addr` (transport mode across a
    NAT, RFC 7296 §2.23.1); ranges are left alone."""
    return tuple(replace(t, start=addr, end=addr) if t.start == t.end and
                 t.version == addr.version else t for t in ts)


def _check_nonce(n: Nonce) -> bytes:
    if not 16 <= len(n.data) <= 256:
        raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"nonce of {len(n.data)} bytes (§2.10)")
    return n.data


def _error_notify(msg: Message) -> Notify | None:
    return next((p for p in msg.payloads if isinstance(p, Notify) and p.notify_type < 16384),
                None)


def _watched(method):
    """Tell the owning IkeEndpoint that this SA may have new output, events or a new timer
    (the endpoint then drains and re-times only the SAs touched since, not all of them)."""
    @wraps(method)
    def call(self, *args, **kw):
        if self._watch is not None:
            self._watch(self)
        return method(self, *args, **kw)
    return call


class IkeSa:
    """One IKE SA (and its Child SAs) with one peer. `initiator`: we start it with connect()."""

    def __init__(self, config: IkeConfig, local: IPAddress | str, remote: IPAddress | str, *,
                 initiator: bool, rng: Rng, remote_port: int | None = None,
                 local_port: int | None = None):
        self.config = config
        self.local = as_address(local)
        self.remote = as_address(remote)
        self.initiated = initiator
        self.state = IkeState.IDLE
        self._rng = rng
        self._local_port = local_port or config.ike_port
        self._remote_port = remote_port or config.ike_port
        self._events: deque[IkeEvent] = deque()
        self._out: list[Datagram] = []
        self._ks = _Keyset(self._new_ike_spi() if initiator else b"", bytes(8), initiator)
        self._retired: list[_Keyset] = []  # old / redundant generations awaiting Delete
        self.children: dict[int, ChildSa] = {}  # by our inbound SPI
        self._dh: KeyExchangeMethod | None = None
        self._cookie = b""
        self._init_retries = 0
        self._peer_hashes: list[int] | None = None
        self._peer_keys: tuple | None = config.peer_keys
        self._null_ok = config.allow_null
        self._null_supplied = False  # the last supply_peer_keys carried UNAUTHENTICATED
        # what we authenticate as: the config's, or ID_NULL + AUTH_NULL toward a keyless
        # peer (initiator: the keys supplied say so; responder: the initiator used AUTH_NULL)
        self._credential = config.credential
        self._local_id = config.local_id
        self._held: tuple[_Keyset, Message] | None = None
        self.peer_id = None
        self.peer_auth = ""
        self.nat_local = self.nat_remote = False
        self._heard_any = False
        self._last_heard = 0.0
        self._deadline: float | None = None  # half-open / key wait deadline
        self._keepalive_at: float | None = None
        self._rekey_at: float | None = None
        self._deferred: list[tuple[float, Callable[[float], None]]] = []
        self._collisions: dict[int, tuple[ChildSa, bytes, bytes]] = {}  # old spi_in -> peer's
        self._delete_requested = False
        self._superseded: set[int] = set()  # old SPIs whose rekey race the peer settled
        self._ike_candidate: _Keyset | None = None  # peer's IKE rekey during ours (§2.8.2)
        self.last_error: str = ""
        self._first_ni = b""
        self._last_ctx: dict = {}  # the request a response answers (set before dispatch)
        self._auth_ctx: dict = {}  # our IKE_AUTH's Child SA offer
        self._watch: Callable[[IkeSa], None] | None = None  # set by the owning IkeEndpoint
        # "another IKE SA with our peer is up or being set up" (set by the IkeEndpoint)
        self._peer_busy: Callable[[IkeSa], bool] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def spi_i(self) -> bytes:
        return self._ks.spi_i

    @property
    def spi_r(self) -> bytes:
        return self._ks.spi_r

    @property
    def ni(self) -> bytes:
        return self._ks.ni

    @property
    def first_ni(self) -> bytes:
        """Ni of the IKE_SA_INIT that created this SA (the mutual-initiation tie-break)."""
        return self._first_ni

    @property
    def local_spis(self) -> set[bytes]:
        """Our SPIs of every generation still alive (the endpoint routes by these)."""
        return {k.our_spi for k in [self._ks, *self._retired, *self._candidates()] if k.our_spi}

    def ike_keys(self) -> tuple[bytes, bytes, IkeCipher, IkeKeys] | None:
        """(SPIi, SPIr, cipher, SK_*) of the current generation, for keylog.KeyLog.log_ike_sa
        on IkeSaEstablished / IkeSaRekeyed; None before the keys exist."""
        ks = self._ks
        return (ks.spi_i, ks.spi_r, ks.cipher, ks.keys) if ks.keys is not None else None

    def __repr__(self) -> str:
        return (f"<IkeSa {self._ks.spi_i.hex()}/{self._ks.spi_r.hex()} {self.local}->"
                f"{self.remote} {self.state.value}>")

    @_watched
    def connect(self, now: float) -> None:
        """Start IKE_SA_INIT (initiator). Peer keys may arrive later (supply_peer_keys)."""
        self._dispatch(Input.CONNECT, self._ks, None, now)

    @_watched
    def supply_peer_keys(self, keys, now: float) -> None:
        """The peer's public keys (from DNS); UNAUTHENTICATED in `keys` allows AUTH_NULL.

        An initiator holds IKE_AUTH until this call (state AUTH_WAIT): with keys it
        authenticates with its own credential; with only UNAUTHENTICATED, with ID_NULL +
        AUTH_NULL (RFC 7619 §3); with nothing, with its credential, and refuses the answer."""
        keys = tuple(keys)
        self._null_supplied = UNAUTHENTICATED in keys
        self._null_ok = self._null_ok or self._null_supplied
        self._peer_keys = tuple(k for k in keys if k != UNAUTHENTICATED)
        if self.state in (IkeState.KEYS_WAIT, IkeState.AUTH_WAIT):
            self._dispatch(Input.KEYS, self._ks, None, now)

    @_watched
    def rekey_child(self, spi_in: int, now: float) -> None:
        """CREATE_CHILD_SA with REKEY_SA for the Child SA we receive on with `spi_in` (§1.3.3)."""
        child = self.children.get(spi_in)
        if self.state != IkeState.ESTABLISHED or child is None or \
                child.state != ChildState.INSTALLED:
            return
        child.state = ChildState.REKEYING
        self._send_create_child(now, rekey=child)

    @_watched
    def create_child(self, now: float, ts_local=None, ts_remote=None) -> None:
        """An additional Child SA on this IKE SA (§1.3.1)."""
        if self.state == IkeState.ESTABLISHED:
            self._send_create_child(now, ts=(tuple(ts_local or self._ts_local()),
                                             tuple(ts_remote or self._ts_remote())))

    @_watched
    def rekey(self, now: float) -> None:
        """Rekey the IKE SA itself (§1.3.2); Child SAs move to the new one."""
        if self.state != IkeState.ESTABLISHED or self._rekeying_ike():
            return
        spi = self._new_ike_spi()
        ni = self._rng(NONCE_LEN)
        dh = key_exchange(self._ks.suite.dh, self._rng)
        sa = SecurityAssociation(with_spi(self.config.ike_offer(), spi))
        self._request(self._ks, ExchangeType.CREATE_CHILD_SA,
                      [sa, Nonce(ni), KeyExchange(dh.group, dh.public)], "ike-rekey",
                      {"spi": spi, "ni": ni, "dh": dh}, now)

    @_watched
    def delete_child(self, spi_in: int, now: float) -> None:
        child = self.children.get(spi_in)
        if child is None or self.state != IkeState.ESTABLISHED:
            return
        child.state = ChildState.DELETING
        self._request(self._ks, ExchangeType.INFORMATIONAL,
                      [Delete(ProtocolId.ESP, (spi_in.to_bytes(4, "big"),))], "delete-child",
                      {"spis": [spi_in]}, now)

    @_watched
    def delete(self, now: float) -> None:
        """Delete the IKE SA and with it every Child SA (§1.4.1)."""
        if self.state in (IkeState.ESTABLISHED,):
            self._dispatch(Input.DELETE, self._ks, None, now)
        elif self.state in (IkeState.AUTH_SENT, IkeState.KEYS_WAIT) and self._ks.initiator:
            # the responder may already hold the SA: delete it once IKE_AUTH has completed
            self._delete_requested = True
        elif self.state != IkeState.CLOSED:
            self._close(now, None)

    @_watched
    def check_liveness(self, now: float) -> None:
        """An empty INFORMATIONAL request (§1.4); no answer after the retransmissions = dead."""
        if self.state == IkeState.ESTABLISHED:
            self._request(self._ks, ExchangeType.INFORMATIONAL, [], "liveness", {}, now)

    @_watched
    def receive_datagram(self, data: bytes, addr: tuple, now: float,
                         local_port: int | None = None, header=None) -> None:
        """One IKE message (non-ESP marker already stripped) from addr = (ip, port).
        Malformed or unauthenticated input is dropped (last_error says why), never raised.
        `header`: message.peek_header(data), when the caller (IkeEndpoint) already has it."""
        try:
            self._receive(bytes(data), addr, now, local_port, header)
        except IkeError as e:
            self.last_error = str(e)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> IkeEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        # called after every datagram: only the current keyset unless a rekey left more
        times = [self._deadline]
        ks = self._ks
        if ks.pending is not None:
            times.append(ks.pending.next_at)
        if self._retired or self._ike_candidate is not None:
            times += [k.pending.next_at for k in self._all_keysets() if k.pending]
        if self._deferred:
            times += [t for t, _ in self._deferred]
        if self.state == IkeState.ESTABLISHED:
            times += (self._keepalive_at, self._rekey_at)
            if self.config.liveness_interval and ks.pending is None:
                times.append(self._last_heard + self.config.liveness_interval)
        return min((t for t in times if t is not None), default=None)

    @_watched
    def handle_timer(self, now: float) -> None:
        if self.state == IkeState.CLOSED:
            return
        for ks in self._all_keysets():
            p = ks.pending
            if p is not None and now >= p.next_at:
                self._retransmit(ks, p, now)
                if self.state == IkeState.CLOSED:
                    return
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._fail("timeout", f"no progress in state {self.state.value}", now)
            return
        due = [d for d in self._deferred if d[0] <= now]
        self._deferred = [d for d in self._deferred if d[0] > now]
        for _, fn in due:
            fn(now)
        if self.state != IkeState.ESTABLISHED:
            return
        if self._keepalive_at is not None and now >= self._keepalive_at:
            self._out.append(Datagram(b"\xff", self.local, self._local_port, self.remote,
                                      self._remote_port, keepalive=True))
            self._keepalive_at = now + self.config.keepalive_interval
        if self._rekey_at is not None and now >= self._rekey_at:
            self._rekey_at = None
            self.rekey(now)
        if (self.config.liveness_interval and self._ks.pending is None
                and now >= self._last_heard + self.config.liveness_interval):
            self.check_liveness(now)

    # ------------------------------------------------------------------ plumbing
    def _all_keysets(self) -> list[_Keyset]:
        return [self._ks, *self._retired, *self._candidates()]

    def _candidates(self) -> list[_Keyset]:
        return [self._ike_candidate] if self._ike_candidate else []

    def _rekeying_ike(self) -> bool:
        return any(r.kind == "ike-rekey" for r in self._requests(self._ks))

    @staticmethod
    def _requests(ks: _Keyset) -> list[_Request]:
        return ([ks.pending] if ks.pending else []) + [q for q in ks.queue]

    def _new_ike_spi(self) -> bytes:
        while True:
            spi = self._rng(8)
            if any(spi):
                return spi

    def _new_child_spi(self) -> int:
        while True:
            spi = int.from_bytes(self._rng(4), "big")
            if spi >= 256 and spi not in self.children:  # 1-255 reserved (RFC 4303 §2.1)
                return spi

    def _ts_local(self) -> tuple[TrafficSelector, ...]:
        return self.config.ts_local or _host_selectors(self.local)

    def _ts_remote(self) -> tuple[TrafficSelector, ...]:
        return self.config.ts_remote or _host_selectors(self.remote)

    def _encap(self) -> tuple[int, int] | None:
        if self.nat_local or self.nat_remote:
            return self._local_port, self._remote_port
        return None

    def _send(self, data: bytes) -> None:
        marker = self._local_port == self.config.natt_port != self.config.ike_port
        self._out.append(Datagram(data, self.local, self._local_port, self.remote,
                                  self._remote_port, marker))

    def _encode(self, ks: _Keyset, msg: Message) -> bytes:
        if msg.exchange == ExchangeType.IKE_SA_INIT:
            return msg.to_bytes()
        sk_e, sk_a = ks.keys.outbound(ks.initiator)
        return msg.encrypt(ks.cipher, sk_e, sk_a, self._rng)

    def _request(self, ks: _Keyset, exchange: int, payloads: list, kind: str, ctx: dict,
                 now: float, retransmit: bool = True) -> None:
        req = _Request(exchange, -1, b"", kind, dict(ctx, payloads=payloads),
                       retransmit=retransmit)
        if ks.pending is not None:
            ks.queue.append(req)  # window size 1 (§2.3)
            return
        self._start_request(ks, req, now)

    def _start_request(self, ks: _Keyset, req: _Request, now: float) -> None:
        req.message_id = ks.my_mid
        ks.my_mid += 1
        msg = Message(ks.spi_i, ks.spi_r, req.exchange, ks.initiator, False, req.message_id,
                      tuple(req.ctx["payloads"]))
        req.data = self._encode(ks, msg)
        if req.exchange == ExchangeType.IKE_SA_INIT:
            ks.init_out = req.data
        req.next_at = now + self.config.retransmit_timeout
        self._send(req.data)
        if req.retransmit:
            ks.pending = req
        else:
            self._next_request(ks, now)

    def _next_request(self, ks: _Keyset, now: float) -> None:
        if ks.pending is None and ks.queue and self.state != IkeState.CLOSED:
            self._start_request(ks, ks.queue.popleft(), now)

    def _respond(self, ks: _Keyset, req: Message, payloads: list) -> None:
        msg = Message(ks.spi_i, ks.spi_r, req.exchange, ks.initiator, True, req.message_id,
                      tuple(payloads))
        data = self._encode(ks, msg)
        ks.last_request, ks.last_response = req.raw, data
        ks.peer_mid = req.message_id + 1
        if req.exchange == ExchangeType.IKE_SA_INIT:
            ks.init_out = data
        self._send(data)

    def _retransmit(self, ks: _Keyset, req: _Request, now: float) -> None:
        """Exponential backoff (§2.1); after the last try the peer is given up on."""
        if req.tries >= self.config.retransmit_tries:
            if ks is not self._ks:
                self._drop_keyset(ks, now)
                return
            ks.pending = None
            if self.state == IkeState.ESTABLISHED or self.state == IkeState.DELETING:
                self._close(now, "dead-peer" if self.state == IkeState.ESTABLISHED else "local")
            else:
                self._fail("timeout" if self._heard_any else "peer-unreachable",
                           f"no answer to {req.kind} after {req.tries} tries", now)
            return
        self._send(req.data)
        req.next_at = now + self.config.retransmit_timeout * (2 ** req.tries)
        req.tries += 1

    def _emit(self, ev: IkeEvent) -> None:
        self._events.append(ev)

    def _fail(self, reason: str, detail: str, now: float, notify: int = 0) -> None:
        self._emit(NegotiationFailed(reason, detail, notify))
        self._close(now, None)

    def _close(self, now: float, reason: str | None) -> None:
        """Terminal: report every announced Child SA and the IKE SA gone (if it was up)."""
        if self.state == IkeState.CLOSED:
            return
        was_up = self.state in (IkeState.ESTABLISHED, IkeState.DELETING)
        for child in list(self.children.values()):
            if child.announced:
                self._emit(ChildSaDeleted(child.params, "ike-deleted"))
        self.children.clear()
        if was_up and reason is not None:
            self._emit(IkeSaDeleted(self._ks.spi_i, self._ks.spi_r, reason))
        self.state = IkeState.CLOSED
        for ks in self._all_keysets():
            ks.pending = None
            ks.queue.clear()
        self._deferred.clear()
        self._deadline = self._keepalive_at = self._rekey_at = None

    def _drop_keyset(self, ks: _Keyset, now: float) -> None:
        """Forget a deleted generation; Child SA requests still open on it are asked again
        on the current one (their answers can no longer come)."""
        if ks in self._retired:
            self._retired.remove(ks)
        if ks is self._ike_candidate:
            self._ike_candidate = None
        open_reqs = ([ks.pending] if ks.pending else []) + list(ks.queue)
        ks.pending = None
        ks.queue.clear()
        if ks is self._ks or self.state != IkeState.ESTABLISHED:
            return
        for r in open_reqs:
            if r.kind in ("child", "delete-child"):
                ctx = {k: v for k, v in r.ctx.items() if k != "payloads"}
                self._request(self._ks, r.exchange, r.ctx["payloads"], r.kind, ctx, now)

    # ------------------------------------------------------------------ receive path
    def _keyset_for(self, h) -> _Keyset | None:
        """The generation a message belongs to, by SPIs and the I flag (§3.1)."""
        for ks in self._all_keysets():
            if ks.initiator == h.initiator:
                continue  # the sender must hold the other role (not a reflection of ours)
            if ks.initiator:
                if h.spi_i == ks.spi_i and (h.spi_r == ks.spi_r or not any(ks.spi_r)
                                            or not any(h.spi_r)):
                    return ks
            elif h.spi_i == ks.spi_i or not ks.spi_i:
                if h.spi_r == ks.spi_r or (h.exchange == ExchangeType.IKE_SA_INIT
                                           and not any(h.spi_r)):
                    return ks
        return None

    def _receive(self, data: bytes, addr: tuple, now: float, local_port: int | None,
                 h=None) -> None:
        if self.state == IkeState.CLOSED:
            return
        h = h or peek_header(data)
        ks = self._keyset_for(h)
        if ks is None:
            raise IkeProtocolError(NotifyType.INVALID_IKE_SPI, "SPIs of no SA of ours")
        inp = EXCHANGE_INPUTS.get((h.exchange, h.response))
        if inp is None:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"exchange type {h.exchange}")
        if h.response:
            p = ks.pending
            if p is None or p.message_id != h.message_id or p.exchange != h.exchange:
                raise IkeProtocolError(NotifyType.INVALID_MESSAGE_ID, "unexpected response")
        else:
            if h.message_id + 1 == ks.peer_mid and data == ks.last_request:
                self._send(ks.last_response)  # the peer lost our response (§2.1)
                return
            if h.message_id != ks.peer_mid:
                raise IkeProtocolError(NotifyType.INVALID_MESSAGE_ID,
                                       f"request #{h.message_id}, expected #{ks.peer_mid}")
        msg = Message.parse(data, h)
        if h.exchange != ExchangeType.IKE_SA_INIT:
            if ks.keys is None or msg.encrypted is None:
                raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "unprotected message")
            sk_e, sk_a = ks.keys.inbound(ks.initiator)
            msg = msg.decrypted(ks.cipher, sk_e, sk_a)
            # authenticated: follow the peer's address/port (NAT mapping, §2.23)
            self._remote_port = int(addr[1])
            if local_port:
                self._local_port = local_port
        elif ks.keys is None and not h.response:
            self._remote_port = int(addr[1])
            if local_port:
                self._local_port = local_port
        self._heard_any = True
        self._last_heard = now
        if h.response:
            self._last_ctx = dict(ks.pending.ctx, kind=ks.pending.kind)
            ks.pending = None
        if ks is not self._ks and ks not in self._retired and ks is not self._ike_candidate:
            return
        if ks is not self._ks and not h.response:
            self._on_retired_request(ks, msg, now)
        else:
            self._dispatch(inp, ks, msg, now)
        self._next_request(ks, now)

    def _dispatch(self, inp: Input, ks: _Keyset, msg: Message | None, now: float) -> None:
        entry = TABLE.get((self.state, inp))
        if entry is None:
            if msg is not None and not msg.response and ks.keys is not None and \
                    self.state in (IkeState.ESTABLISHED, IkeState.DELETING):
                self._respond(ks, msg, [Notify(NotifyType.INVALID_SYNTAX)])
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX,
                                   f"{inp.value} in state {self.state.value}")
        name, nxt = entry
        handler = getattr(self, "_" + name)
        try:
            result = handler(ks, msg, now)
        except IkeIntegrityError:
            raise
        except IkeProtocolError as e:
            if msg is not None and not msg.response:
                self._respond(ks, msg, [Notify(e.notify_type, e.data)])
            if self.state not in (IkeState.ESTABLISHED, IkeState.DELETING):
                self._fail(_reason(e.notify_type), str(e), now, e.notify_type)
            elif msg is not None and msg.response:
                self._emit(NegotiationFailed(_reason(e.notify_type), str(e), e.notify_type,
                                             child=True))
            raise
        if self.state != IkeState.CLOSED:
            self.state = result if result is not None else nxt

    # ------------------------------------------------------------------ IKE_SA_INIT
    def _init_payloads(self, ks: _Keyset) -> list:
        spi_r = bytes(8)
        payloads: list = [Notify(NotifyType.COOKIE, self._cookie)] if self._cookie else []
        payloads += [SecurityAssociation(self.config.ike_offer()),
                     KeyExchange(self._dh.group, self._dh.public), Nonce(ks.ni),
                     Notify(NotifyType.NAT_DETECTION_SOURCE_IP,
                            nat_hash(ks.spi_i, spi_r, self.local, self._local_port)),
                     Notify(NotifyType.NAT_DETECTION_DESTINATION_IP,
                            nat_hash(ks.spi_i, spi_r, self.remote, self._remote_port)),
                     Notify(NotifyType.SIGNATURE_HASH_ALGORITHMS, _OUR_HASHES)]
        return payloads

    def _send_init(self, ks: _Keyset, msg, now: float):
        ks.ni = ks.ni or self._rng(NONCE_LEN)
        self._first_ni = ks.ni
        if self._dh is None:
            self._dh = key_exchange(dh_groups(self.config.ike_offer())[0], self._rng)
        ks.my_mid = 0
        self._request(ks, ExchangeType.IKE_SA_INIT, self._init_payloads(ks), "init", {}, now)

    def _check_nat(self, ks: _Keyset, msg: Message) -> bool:
        """Compare the peer's NAT_DETECTION hashes with ours (§2.23); False if it sent none."""
        src = [n.data for n in msg.payloads if isinstance(n, Notify)
               and n.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP]
        dst = msg.notify(NotifyType.NAT_DETECTION_DESTINATION_IP)
        if not src or dst is None:
            return False
        spi_r = msg.spi_r if msg.response else bytes(8)
        self.nat_remote = nat_hash(msg.spi_i, spi_r, self.remote, self._remote_port) not in src
        self.nat_local = dst.data != nat_hash(msg.spi_i, spi_r, self.local, self._local_port)
        return True

    def _derive(self, ks: _Keyset, suite: Suite, g_ir: bytes,
                old: _Keyset | None = None) -> None:
        ks.suite = suite
        ks.prf = prf_for(suite.prf)
        ks.cipher = IkeCipher.from_ids(suite.encr, suite.encr_bits, suite.integ or 0)
        seed = (skeyseed_rekey(old.prf, old.keys.sk_d, g_ir, ks.ni, ks.nr) if old
                else skeyseed(ks.prf, ks.ni, ks.nr, g_ir))
        ks.keys = derive_ike_keys(ks.prf, ks.cipher, seed, ks.ni, ks.nr, ks.spi_i, ks.spi_r)

    def _on_init_request(self, ks: _Keyset, msg: Message, now: float):
        sa = _need(msg, SecurityAssociation, "SA")
        ke = _need(msg, KeyExchange, "KE")
        ks.spi_i, ks.ni = msg.spi_i, _check_nonce(_need(msg, Nonce, "Ni"))
        self._first_ni = ks.ni
        chosen = select(sa, self.config.ike_offer(), ProtocolId.IKE, ke.group)
        suite = Suite.from_proposal(chosen)
        if suite.dh is None or suite.prf is None:
            raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "IKE proposal without DH/PRF")
        if suite.dh != ke.group:
            # stateless answer (§1.2): the initiator retries with the group we name
            self._respond(ks, msg, [Notify(NotifyType.INVALID_KE_PAYLOAD,
                                           struct.pack("!H", suite.dh))])
            self.state = IkeState.CLOSED
            return IkeState.CLOSED
        ks.spi_r = self._new_ike_spi()
        ks.nr = self._rng(NONCE_LEN)
        dh = key_exchange(suite.dh, self._rng)
        g_ir = dh.shared(ke.data)
        has_nat_d = self._check_nat(ks, msg)
        sh = msg.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
        self._peer_hashes = _hash_list(sh.data) if sh else None
        self._derive(ks, suite, g_ir)
        ks.init_in = msg.raw
        payloads = [SecurityAssociation((replace(chosen, spi=b""),)),
                    KeyExchange(dh.group, dh.public), Nonce(ks.nr)]
        if has_nat_d:
            payloads += [Notify(NotifyType.NAT_DETECTION_SOURCE_IP,
                                nat_hash(ks.spi_i, ks.spi_r, self.local, self._local_port)),
                         Notify(NotifyType.NAT_DETECTION_DESTINATION_IP,
                                nat_hash(ks.spi_i, ks.spi_r, self.remote, self._remote_port))]
        payloads.append(Notify(NotifyType.SIGNATURE_HASH_ALGORITHMS, _OUR_HASHES))
        self._respond(ks, msg, payloads)
        self._deadline = now + self.config.half_open_timeout
        return None

    def _on_init_response(self, ks: _Keyset, msg: Message, now: float):
        cookie = msg.notify(NotifyType.COOKIE)
        if cookie is not None and self._init_retries < 3:
            self._init_retries += 1
            self._cookie = cookie.data  # §2.6: same request, COOKIE first
            self._send_init(ks, None, now)
            return IkeState.INIT_SENT
        bad_ke = msg.notify(NotifyType.INVALID_KE_PAYLOAD)
        if bad_ke is not None and len(bad_ke.data) == 2 and self._init_retries < 3:
            group = int.from_bytes(bad_ke.data, "big")
            if group in dh_groups(self.config.ike_offer()) and group != self._dh.group:
                self._init_retries += 1
                self._dh = key_exchange(group, self._rng)
                self._send_init(ks, None, now)
                return IkeState.INIT_SENT
        err = _error_notify(msg)
        if err is not None:
            self._fail(_reason(err.notify_type), f"responder refused IKE_SA_INIT ({err.notify_type})",
                       now, err.notify_type)
            return IkeState.CLOSED
        sa = _need(msg, SecurityAssociation, "SA")
        ke = _need(msg, KeyExchange, "KE")
        ks.nr = _check_nonce(_need(msg, Nonce, "Nr"))
        chosen = check_choice(sa, self.config.ike_offer(), ProtocolId.IKE)
        suite = Suite.from_proposal(chosen)
        if suite.dh != ke.group or ke.group != self._dh.group:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "KE group differs from the SA's")
        if not any(msg.spi_r):
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "responder SPI is zero")
        ks.spi_r = msg.spi_r
        g_ir = self._dh.shared(ke.data)
        has_nat_d = self._check_nat(ks, msg)
        sh = msg.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
        self._peer_hashes = _hash_list(sh.data) if sh else None
        self._derive(ks, suite, g_ir)
        ks.init_in = msg.raw
        if has_nat_d and (self.config.float_always or self.nat_local or self.nat_remote):
            self._local_port = self._remote_port = self.config.natt_port  # §2.23
        if self._wants_keys_first():
            # the DNS lookup runs in parallel with IKE_SA_INIT; IKE_AUTH waits for its answer
            self._emit(PeerKeyNeeded(self.config.peer_id, self.remote))
            self._deadline = now + self.config.key_wait_timeout
            return IkeState.AUTH_WAIT
        self._send_auth(ks, now)
        return None

    def _wants_keys_first(self) -> bool:
        """Ask for the peer's keys before IKE_AUTH unless they cannot change what we send: keys
        or a PSK configured, or we are anonymous anyway and accept AUTH_NULL back."""
        if self._peer_keys is not None or self.config.peer_psk is not None:
            return False
        return not (isinstance(self._credential, ikeauth.NullCredential) and self._null_ok)

    def _send_held_auth(self, ks: _Keyset, msg, now: float):
        self._deadline = None
        if not self._peer_keys and self._null_supplied:
            self._go_anonymous()
        # With no usable key at all IKE_AUTH still goes out, and the peer's AUTH is then
        # refused with AUTHENTICATION_FAILED (§2.21.2): a peer left half-open instead holds
        # its own traffic to us until its half-open timeout (its agent joined our
        # negotiation), which is worse than the Child SA it makes and deletes at once.
        self._send_auth(ks, now)
        return None

    def _go_anonymous(self) -> None:
        """Authenticate as ID_NULL with AUTH_NULL (RFC 7619 §3) instead of our credential."""
        if not isinstance(self._credential, ikeauth.NullCredential):
            self._credential, self._local_id = ikeauth.NullCredential(), IdInitiator.null()

    # ------------------------------------------------------------------ IKE_AUTH
    def _our_auth(self, ks: _Keyset, id_body: bytes) -> Authentication:
        sk_p = ks.keys.sk_pi if ks.initiator else ks.keys.sk_pr
        peer_nonce = ks.nr if ks.initiator else ks.ni
        octets = ikeauth.signed_octets(ks.init_out, peer_nonce, ks.prf, sk_p, id_body)
        method, data = ikeauth.sign(self._credential, octets, ks.prf, sk_p,
                                    self._peer_hashes)
        return Authentication(method, data)

    def _send_auth(self, ks: _Keyset, now: float) -> None:
        lid = self._local_id
        idi = IdInitiator(lid.id_type, lid.data)
        payloads: list = [idi]
        if self.config.peer_id is not None:
            pid = self.config.peer_id
            payloads.append(IdResponder(pid.id_type, pid.data))
        payloads.append(self._our_auth(ks, idi.to_bytes()))
        if self.config.initial_contact and not (self._peer_busy and self._peer_busy(self)):
            # only when no other IKE SA with the peer exists or is being set up: the peer
            # would drop that one as stale (RFC 7296 §2.4)
            payloads.append(Notify(NotifyType.INITIAL_CONTACT))
        spi = self._new_child_spi()
        offer = with_spi(without_dh(self.config.esp_offer()), spi.to_bytes(4, "big"))
        ts_i, ts_r = self._ts_local(), self._ts_remote()
        if self.config.mode == Mode.TRANSPORT:
            payloads.append(Notify(NotifyType.USE_TRANSPORT_MODE))
        payloads += [SecurityAssociation(offer), TsInitiator(ts_i), TsResponder(ts_r)]
        self._auth_ctx = {"spi": spi, "offer": offer, "ts": (ts_i, ts_r)}
        self._request(ks, ExchangeType.IKE_AUTH, payloads, "auth", self._auth_ctx, now)

    def _needs_keys(self, method: int) -> bool:
        if method == ikeauth.AuthMethod.SHARED_KEY_MIC:
            return False
        if method == ikeauth.AuthMethod.NULL:
            return not self._null_ok and self._peer_keys is None
        return self._peer_keys is None

    def _check_peer(self, ks: _Keyset, msg: Message, id_cls) -> bool:
        """Hold the message for PeerKeyNeeded if we cannot judge AUTH yet; True = go on."""
        pid = _need(msg, id_cls, "ID")
        auth = _need(msg, Authentication, "AUTH")
        self.peer_id = pid
        if self._needs_keys(auth.method):
            self._held = (ks, msg)
            self._emit(PeerKeyNeeded(pid, self.remote))
            return False
        return True

    def _verify_peer(self, ks: _Keyset, msg: Message, id_cls) -> bool:
        pid = msg.get(id_cls)
        auth = msg.get(Authentication)
        want = self.config.peer_id
        try:
            if want is not None and (pid.id_type, pid.data) != (want.id_type, want.data):
                raise ikeauth.AuthError(f"peer identity {pid} is not the expected {want}")
            sk_p = ks.keys.sk_pr if ks.initiator else ks.keys.sk_pi
            peer_init = ks.init_in
            our_nonce = ks.ni if ks.initiator else ks.nr
            octets = ikeauth.signed_octets(peer_init, our_nonce, ks.prf, sk_p, pid.to_bytes())
            self.peer_auth = ikeauth.verify(auth.method, auth.data, octets, ks.prf, sk_p,
                                            keys=self._peer_keys or (), psk=self.config.peer_psk,
                                            allow_null=self._null_ok)
            return True
        except ikeauth.AuthError as e:
            self.last_error = f"authentication of {pid} failed: {e}"
            return False

    def _on_auth_request(self, ks: _Keyset, msg: Message, now: float):
        if not self._check_peer(ks, msg, IdInitiator):
            self._deadline = now + self.config.key_wait_timeout
            return IkeState.KEYS_WAIT
        return self._finish_auth_request(ks, msg, now)

    def _finish_auth_request(self, ks: _Keyset, msg: Message, now: float):
        self._deadline = None
        if not self._verify_peer(ks, msg, IdInitiator):
            self._respond(ks, msg, [Notify(NotifyType.AUTHENTICATION_FAILED)])
            self._fail("auth-failed", self.last_error, now, NotifyType.AUTHENTICATION_FAILED)
            return IkeState.CLOSED
        if self.peer_auth == "null" and not self._peer_keys and isinstance(
                self._credential, ikeauth.SignatureCredential):
            # an AUTH_NULL initiator has no key of ours (a libreswan authby=null peer refuses
            # a signature): answer in kind (RFC 7619 §3)
            self._go_anonymous()
        lid = self._local_id
        idr = IdResponder(lid.id_type, lid.data)
        payloads: list = [idr, self._our_auth(ks, idr.to_bytes())]
        try:
            child, child_payloads = self._accept_child(ks, msg, ks.ni, ks.nr, b"",
                                                       without_dh(self.config.esp_offer()))
        except IkeProtocolError as e:
            child, child_payloads = None, [Notify(e.notify_type, e.data)]
            child_err = e
        self._respond(ks, msg, payloads + child_payloads)
        self._established(ks, now)
        if child is not None:
            self._add_child(child, initiator=False)
        else:
            self._emit(NegotiationFailed(_reason(child_err.notify_type), str(child_err),
                                         child_err.notify_type, child=True))
        return IkeState.ESTABLISHED

    def _on_auth_response(self, ks: _Keyset, msg: Message, now: float):
        if msg.get(Authentication) is None:
            err = _error_notify(msg)
            n = err.notify_type if err else NotifyType.AUTHENTICATION_FAILED
            self._fail(_reason(n) if err else "auth-failed", f"IKE_AUTH refused ({n})", now, n)
            return IkeState.CLOSED
        if not self._check_peer(ks, msg, IdResponder):
            self._deadline = now + self.config.key_wait_timeout
            return IkeState.KEYS_WAIT
        return self._finish_auth_response(ks, msg, now)

    def _finish_auth_response(self, ks: _Keyset, msg: Message, now: float):
        self._deadline = None
        if not self._verify_peer(ks, msg, IdResponder):
            # tell the peer (§2.21.2), without waiting for an answer
            self._request(ks, ExchangeType.INFORMATIONAL,
                          [Notify(NotifyType.AUTHENTICATION_FAILED)], "auth-failed", {}, now,
                          retransmit=False)
            self._fail("auth-failed", self.last_error, now, NotifyType.AUTHENTICATION_FAILED)
            return IkeState.CLOSED
        self._established(ks, now)
        ctx = self._auth_ctx
        try:
            child = self._complete_child(ks, msg, ctx, ks.ni, ks.nr, b"")
        except IkeProtocolError as e:
            self._emit(NegotiationFailed(_reason(e.notify_type), str(e), e.notify_type,
                                         child=True))
            return IkeState.ESTABLISHED
        self._add_child(child, initiator=True)
        return IkeState.ESTABLISHED

    def _on_keys(self, ks: _Keyset, msg, now: float):
        held_ks, held = self._held
        self._held = None
        if held.response:
            return self._finish_auth_response(held_ks, held, now)
        return self._finish_auth_request(held_ks, held, now)

    def _ignore(self, ks, msg, now):
        return None

    def _established(self, ks: _Keyset, now: float) -> None:
        self.state = IkeState.ESTABLISHED
        self._last_heard = now
        if self.nat_local:
            self._keepalive_at = now + self.config.keepalive_interval
        if self.config.ike_lifetime_s:
            share = 0.9 if ks.initiator else 1.0  # the initiator rekeys first: fewer collisions
            self._rekey_at = now + self.config.ike_lifetime_s * share
        s = ks.suite
        self._emit(IkeSaEstablished(
            ks.spi_i, ks.spi_r, ks.initiator, self.local, self.remote, self._local_id,
            self.peer_id, self.peer_auth, self.nat_local, self.nat_remote,
            (self._local_port, self._remote_port) if self._local_port == self.config.natt_port
            else None,
            f"{ks.cipher.encr.name}-{ks.cipher.key_bits}/{ks.prf.name}/{s.dh}"))
        if self._delete_requested:
            self._deferred.append((now, self.delete))

    # ------------------------------------------------------------------ Child SAs
    def _accept_child(self, ks: _Keyset, msg: Message, ni: bytes, nr: bytes, g_ir: bytes,
                      ours: tuple[Proposal, ...], group: int | None = None):
        """Responder side of a Child SA (IKE_AUTH or CREATE_CHILD_SA): choose, narrow, key."""
        sa = _need(msg, SecurityAssociation, "SA")
        tsi = _need(msg, TsInitiator, "TSi").selectors
        tsr = _need(msg, TsResponder, "TSr").selectors
        chosen = select(sa, ours, ProtocolId.ESP, group)
        if len(chosen.spi) != 4:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "ESP SPI is not 4 bytes")
        suite = Suite.from_proposal(chosen)
        suite.esp_algorithm()
        transport = msg.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        mode = Mode.TRANSPORT if transport else Mode.TUNNEL
        if transport:  # §2.23.1: behind a NAT the host selectors name the private addresses
            if self.nat_remote:
                tsi = _observed(tsi, self.remote)
            if self.nat_local:
                tsr = _observed(tsr, self.local)
        tsi_ok = narrow(tsi, self._ts_remote())
        tsr_ok = narrow(tsr, self._ts_local())
        spi_in = self._new_child_spi()
        params = build_params(
            exchange_initiator=False, local=self.local, remote=self.remote, spi_in=spi_in,
            spi_out=int.from_bytes(chosen.spi, "big"), suite=suite, mode=mode, prf=ks.prf,
            sk_d=ks.keys.sk_d, ni=ni, nr=nr, g_ir=g_ir, ts_i=tsi_ok, ts_r=tsr_ok,
            encap=self._encap(), lifetime_s=self.config.child_lifetime_s)
        payloads: list = [Notify(NotifyType.USE_TRANSPORT_MODE)] if transport else []
        payloads += [SecurityAssociation((replace(chosen, spi=spi_in.to_bytes(4, "big")),)),
                     TsInitiator(tsi_ok), TsResponder(tsr_ok)]
        return ChildSa(params, ni, nr), payloads

    def _complete_child(self, ks: _Keyset, msg: Message, ctx: dict, ni: bytes, nr: bytes,
                        g_ir: bytes) -> ChildSa:
        """Initiator side: check the responder's choice and selectors, key the Child SA."""
        err = _error_notify(msg)
        if err is not None:
            raise IkeProtocolError(err.notify_type, "responder refused the Child SA",
                                   err.data)
        sa = _need(msg, SecurityAssociation, "SA")
        chosen = check_choice(sa, ctx["offer"], ProtocolId.ESP)
        if len(chosen.spi) != 4:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "ESP SPI is not 4 bytes")
        suite = Suite.from_proposal(chosen)
        tsi = _need(msg, TsInitiator, "TSi").selectors
        tsr = _need(msg, TsResponder, "TSr").selectors
        ts_i, ts_r = ctx["ts"]
        transport = msg.notify(NotifyType.USE_TRANSPORT_MODE) is not None
        if transport and (self.nat_local or self.nat_remote):
            # §2.23.1: the responder saw our selectors through the NAT; ours are the truth
            tsi, tsr = (_observed(tsi, self.local) if self.nat_local else tsi,
                        _observed(tsr, self.remote) if self.nat_remote else tsr)
        if not within(tsi, ts_i) or not within(tsr, ts_r):
            raise IkeProtocolError(NotifyType.TS_UNACCEPTABLE, "responder widened the selectors")
        params = build_params(
            exchange_initiator=True, local=self.local, remote=self.remote, spi_in=ctx["spi"],
            spi_out=int.from_bytes(chosen.spi, "big"), suite=suite,
            mode=Mode.TRANSPORT if transport else Mode.TUNNEL, prf=ks.prf, sk_d=ks.keys.sk_d,
            ni=ni, nr=nr, g_ir=g_ir, ts_i=tsi, ts_r=tsr, encap=self._encap(),
            lifetime_s=self.config.child_lifetime_s)
        return ChildSa(params, ni, nr)

    def _add_child(self, child: ChildSa, initiator: bool) -> None:
        self.children[child.spi_in] = child
        self._emit(ChildSaEstablished(child.params, initiator))

    def _send_create_child(self, now: float, rekey: ChildSa | None = None, ts=None) -> None:
        spi = self._new_child_spi()
        ni = self._rng(NONCE_LEN)
        offer = with_spi(self.config.esp_offer(), spi.to_bytes(4, "big"))
        groups = dh_groups(offer)
        dh = key_exchange(groups[0], self._rng) if groups else None
        if rekey is not None:
            ts = (rekey.params.ts_local, rekey.params.ts_remote)
            mode = rekey.params.mode
        else:
            mode = self.config.mode
        payloads: list = []
        if rekey is not None:
            payloads.append(Notify(NotifyType.REKEY_SA, b"", ProtocolId.ESP,
                                   rekey.spi_in.to_bytes(4, "big")))
        if mode == Mode.TRANSPORT:
            payloads.append(Notify(NotifyType.USE_TRANSPORT_MODE))
        payloads += [SecurityAssociation(offer), Nonce(ni)]
        if dh is not None:
            payloads.append(KeyExchange(dh.group, dh.public))
        payloads += [TsInitiator(ts[0]), TsResponder(ts[1])]
        self._request(self._ks, ExchangeType.CREATE_CHILD_SA, payloads, "child",
                      {"spi": spi, "offer": offer, "ts": ts, "ni": ni, "dh": dh,
                       "old": rekey.spi_in if rekey else None}, now)

    def _on_child_request(self, ks: _Keyset, msg: Message, now: float):
        sa = _need(msg, SecurityAssociation, "SA")
        if sa.proposals and sa.proposals[0].protocol == ProtocolId.IKE:
            return self._on_ike_rekey_request(ks, msg, now)
        ni = _check_nonce(_need(msg, Nonce, "Ni"))
        old = None
        rekey = msg.notify(NotifyType.REKEY_SA)
        if rekey is not None:
            spi_out = int.from_bytes(rekey.spi, "big")
            old = next((c for c in self.children.values() if c.spi_out == spi_out), None)
            if old is None or old.state in (ChildState.REKEYED, ChildState.DELETING):
                raise IkeProtocolError(NotifyType.CHILD_SA_NOT_FOUND, f"no Child SA {spi_out:#x}")
        ke = msg.get(KeyExchange)
        ours = self.config.esp_offer()
        if ke is not None:  # the peer wants PFS: allow our IKE groups for it
            ours = tuple(replace(p, transforms=tuple(
                t for t in p.transforms if t.type != TransformType.DH) + tuple(
                Transform(TransformType.DH, g) for g in dh_groups(self.config.ike_offer())))
                for p in ours)
        else:
            ours = without_dh(ours)
        nr = self._rng(NONCE_LEN)
        g_ir, ke_payload = b"", []
        if ke is not None:
            chosen = select(_need(msg, SecurityAssociation, "SA"), ours, ProtocolId.ESP,
                            ke.group)
            group = Suite.from_proposal(chosen).dh
            if group != ke.group:
                raise IkeProtocolError(NotifyType.INVALID_KE_PAYLOAD, "KE group",
                                       struct.pack("!H", group or 0))
            dh = key_exchange(group, self._rng)
            g_ir = dh.shared(ke.data)
            ke_payload = [KeyExchange(dh.group, dh.public)]
        child, payloads = self._accept_child(ks, msg, ni, nr, g_ir, ours,
                                             ke.group if ke else None)
        sa_p = [p for p in payloads if isinstance(p, SecurityAssociation)]
        rest = [p for p in payloads if not isinstance(p, SecurityAssociation)]
        self._respond(ks, msg, sa_p + [Nonce(nr)] + ke_payload + rest)
        if old is None:
            self._add_child(child, initiator=False)
        elif old.state == ChildState.REKEYING:
            self._collisions[old.spi_in] = (child, ni, nr)  # settled when our answer comes
            self.children[child.spi_in] = child
            child.announced = False  # not announced until the collision is settled
        else:
            old.state = ChildState.REKEYED
            self.children[child.spi_in] = child
            self._emit(ChildSaRekeyed(old.params, child.params, initiator=False))
        return None

    def _on_child_response(self, ks: _Keyset, msg: Message, now: float):
        req_ctx = self._last_ctx
        if req_ctx["kind"] == "ike-rekey":
            return self._on_ike_rekey_response(ks, msg, req_ctx, now)
        old = self.children.get(req_ctx["old"]) if req_ctx["old"] is not None else None
        err = _error_notify(msg)
        if err is not None and req_ctx["old"] is not None:
            if old is None:
                return None  # the peer deleted it meanwhile (and settled any collision)
            peer = self._collisions.pop(old.spi_in, None)
            if peer is not None:  # our rekey failed in a collision: the peer's stands
                self._settle_rekey(old, None, peer, now)
            elif err.notify_type == NotifyType.TEMPORARY_FAILURE:
                old.state = ChildState.INSTALLED
                self._deferred.append((now + self.config.retransmit_timeout,
                                       lambda t, s=old.spi_in: self.rekey_child(s, t)))
            elif err.notify_type != NotifyType.CHILD_SA_NOT_FOUND:
                old.state = ChildState.INSTALLED
                self._emit(NegotiationFailed(_reason(err.notify_type), "child rekey refused",
                                             err.notify_type, child=True))
            return None
        ni = req_ctx["ni"]
        nr = _check_nonce(_need(msg, Nonce, "Nr")) if err is None else b""
        g_ir = b""
        dh = req_ctx["dh"]
        if dh is not None and err is None:
            ke = _need(msg, KeyExchange, "KE")
            if ke.group != dh.group:
                raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "KE group differs")
            g_ir = dh.shared(ke.data)
        if old is not None and old.state == ChildState.DELETING:
            old = None
        try:
            child = self._complete_child(ks, msg, req_ctx, ni, nr, g_ir)
        except IkeProtocolError as e:
            if old is not None:
                old.state = ChildState.INSTALLED
            self._emit(NegotiationFailed(_reason(e.notify_type), str(e), e.notify_type,
                                         child=True))
            return None
        if old is None and req_ctx["old"] in self._superseded:
            # the peer won a collision and deleted the old pair before this answer came:
            # ours is the redundant one, never installed; we made it, we delete it (§2.8.1)
            self._superseded.discard(req_ctx["old"])
            child.announced = False
            child.state = ChildState.DELETING
            self.children[child.spi_in] = child
            self._request(self._ks, ExchangeType.INFORMATIONAL,
                          [Delete(ProtocolId.ESP, (child.spi_in.to_bytes(4, "big"),))],
                          "delete-child", {"spis": [child.spi_in]}, now)
            return None
        if old is None:
            self._add_child(child, initiator=True)
            return None
        peer = self._collisions.pop(old.spi_in, None)
        self.children[child.spi_in] = child
        self._settle_rekey(old, child, peer, now)
        return None

    def _settle_rekey(self, old: ChildSa, ours: ChildSa | None,
                      peer: tuple[ChildSa, bytes, bytes] | None, now: float) -> None:
        """Finish a child rekey; with a collision the SA made with the lowest of the four
        nonces is redundant and deleted by its creator (§2.8.1)."""
        if peer is None:  # ours alone
            winner, loser_ours, delete_old = ours, None, True
        elif ours is None:  # our exchange failed: the peer's stands, the peer deletes old
            winner, loser_ours, delete_old = peer[0], None, False
        else:
            pchild, pni, pnr = peer
            lowest = min(ours.ni, ours.nr, pni, pnr)
            if lowest in (ours.ni, ours.nr):
                winner, loser_ours, delete_old = pchild, ours, False
            else:
                winner, loser_ours, delete_old = ours, None, True
                # the peer's child is redundant: it deletes it; we keep it hidden meanwhile
        old.state = ChildState.REKEYED
        winner.state = ChildState.INSTALLED
        winner.announced = True
        if peer is not None and winner is not peer[0]:
            peer[0].state = ChildState.REKEYED  # the peer deletes it
        self._emit(ChildSaRekeyed(old.params, winner.params, initiator=winner is ours))
        spis = []
        if delete_old:
            spis.append(old.spi_in)
        if loser_ours is not None:
            loser_ours.state = ChildState.DELETING
            loser_ours.announced = False
            spis.append(loser_ours.spi_in)
        for spi in spis:
            self._request(self._ks, ExchangeType.INFORMATIONAL,
                          [Delete(ProtocolId.ESP, (spi.to_bytes(4, "big"),))], "delete-child",
                          {"spis": [spi]}, now)

    # ------------------------------------------------------------------ IKE rekey
    def _on_ike_rekey_request(self, ks: _Keyset, msg: Message, now: float):
        if ks.pending is not None and ks.pending.kind == "child" or any(
                c.state == ChildState.REKEYING for c in self.children.values()):
            raise IkeProtocolError(NotifyType.TEMPORARY_FAILURE, "Child SA rekey in progress")
        sa = _need(msg, SecurityAssociation, "SA")
        ke = _need(msg, KeyExchange, "KE")
        ni = _check_nonce(_need(msg, Nonce, "Ni"))
        chosen = select(sa, self.config.ike_offer(), ProtocolId.IKE, ke.group)
        suite = Suite.from_proposal(chosen)
        if suite.dh != ke.group:
            raise IkeProtocolError(NotifyType.INVALID_KE_PAYLOAD, "KE group",
                                   struct.pack("!H", suite.dh or 0))
        if len(chosen.spi) != 8:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "IKE SPI is not 8 bytes")
        new = _Keyset(chosen.spi, self._new_ike_spi(), initiator=False, ni=ni,
                      nr=self._rng(NONCE_LEN))
        dh = key_exchange(suite.dh, self._rng)
        self._derive(new, suite, dh.shared(ke.data), old=ks)
        self._respond(ks, msg, [SecurityAssociation((replace(chosen, spi=new.spi_r),)),
                                Nonce(new.nr), KeyExchange(dh.group, dh.public)])
        if self._rekeying_ike():
            self._ike_candidate = new  # settled when our own answer arrives (§2.8.2)
            return None
        self._switch_keyset(new, now)
        return None

    def _on_ike_rekey_response(self, ks: _Keyset, msg: Message, ctx: dict, now: float):
        err = _error_notify(msg)
        if ks is not self._ks:
            # we already moved to the peer's new SA (it won and deleted this generation):
            # a new SA from our request is redundant; we made it, we delete it (§2.8.2)
            self._drop_keyset(ks, now)
            if err is None:
                new = self._ike_from_answer(ks, msg, ctx)
                self._retired.append(new)
                self._request(new, ExchangeType.INFORMATIONAL, [Delete(ProtocolId.IKE)],
                              "delete-retired", {}, now)
            return None
        candidate, self._ike_candidate = self._ike_candidate, None
        if err is not None:
            if candidate is not None:  # the peer's rekey stands
                self._switch_keyset(candidate, now)
            elif err.notify_type == NotifyType.TEMPORARY_FAILURE:
                self._deferred.append((now + self.config.retransmit_timeout, self.rekey))
            else:
                self._emit(NegotiationFailed(_reason(err.notify_type), "IKE rekey refused",
                                             err.notify_type, child=True))
            return None
        new = self._ike_from_answer(ks, msg, ctx)
        if candidate is not None and min(new.ni, new.nr, candidate.ni, candidate.nr) in (
                new.ni, new.nr):
            # ours is redundant: delete it on itself; the peer deletes the old one
            self._retired.append(new)
            self._request(new, ExchangeType.INFORMATIONAL, [Delete(ProtocolId.IKE)],
                          "delete-retired", {}, now)
            self._switch_keyset(candidate, now, delete_old=False)
            return None
        if candidate is not None:
            self._retired.append(candidate)  # the peer deletes its redundant one
        self._switch_keyset(new, now, delete_old=True)
        return None

    def _ike_from_answer(self, ks: _Keyset, msg: Message, ctx: dict) -> _Keyset:
        """The new IKE SA generation from a CREATE_CHILD_SA answer to our IKE rekey (§2.18)."""
        sa = _need(msg, SecurityAssociation, "SA")
        ke = _need(msg, KeyExchange, "KE")
        nr = _check_nonce(_need(msg, Nonce, "Nr"))
        chosen = check_choice(sa, with_spi(self.config.ike_offer(), ctx["spi"]), ProtocolId.IKE)
        if len(chosen.spi) != 8 or ke.group != ctx["dh"].group:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "bad IKE rekey answer")
        new = _Keyset(ctx["spi"], chosen.spi, initiator=True, ni=ctx["ni"], nr=nr)
        self._derive(new, Suite.from_proposal(chosen), ctx["dh"].shared(ke.data), old=ks)
        return new

    def _switch_keyset(self, new: _Keyset, now: float, delete_old: bool = False) -> None:
        old = self._ks
        new.queue.extend(old.queue)
        old.queue.clear()
        self._ks = new
        self._retired.append(old)
        self._emit(IkeSaRekeyed(old.spi_i, old.spi_r, new.spi_i, new.spi_r))
        if self.config.ike_lifetime_s:
            self._rekey_at = now + self.config.ike_lifetime_s * (0.9 if new.initiator else 1.0)
        if delete_old:
            self._request(old, ExchangeType.INFORMATIONAL, [Delete(ProtocolId.IKE)],
                          "delete-retired", {}, now)
        self._next_request(new, now)

    def _on_retired_request(self, ks: _Keyset, msg: Message, now: float) -> None:
        """A request on a rekeyed-away generation: Delete ends it; others are refused."""
        if msg.exchange == ExchangeType.INFORMATIONAL:
            if any(d.protocol == ProtocolId.IKE for d in msg.all(Delete)):
                self._respond(ks, msg, [])
                self._drop_keyset(ks, now)
                return
            self._on_info_request(ks, msg, now)  # Child SA deletes still apply
            return
        self._respond(ks, msg, [Notify(NotifyType.TEMPORARY_FAILURE)])

    # ------------------------------------------------------------------ INFORMATIONAL
    def _send_delete(self, ks: _Keyset, msg, now: float):
        self._request(ks, ExchangeType.INFORMATIONAL, [Delete(ProtocolId.IKE)], "delete-ike",
                      {}, now)
        return None

    def _on_info_request(self, ks: _Keyset, msg: Message, now: float):
        deletes = msg.all(Delete)
        if any(d.protocol == ProtocolId.IKE for d in deletes):
            self._respond(ks, msg, [])
            if self._ike_candidate is not None:
                # the peer won an IKE rekey collision and deletes the old SA before our own
                # rekey's (failed) answer came: its new SA is the one (§2.8.2)
                candidate, self._ike_candidate = self._ike_candidate, None
                self._switch_keyset(candidate, now)
                if ks.pending is None:
                    self._drop_keyset(ks, now)
                # else: the answer to our own rekey still comes on it (see below)
                return None
            self._close(now, "peer")
            return IkeState.CLOSED
        answer: list[bytes] = []
        for d in deletes:
            if d.protocol != ProtocolId.ESP:
                continue
            for spi in d.spis:
                spi_out = int.from_bytes(spi, "big")
                child = next((c for c in self.children.values() if c.spi_out == spi_out), None)
                if child is None:
                    continue
                if child.state != ChildState.DELETING:  # §1.4.1: simultaneous deletes
                    answer.append(child.spi_in.to_bytes(4, "big"))
                peer = self._collisions.pop(child.spi_in, None)
                if peer is not None:  # the peer won the rekey race: its new pair stands
                    self._settle_rekey(child, None, peer, now)
                    self._superseded.add(child.spi_in)
                self._remove_child(child, "peer")
        if msg.notify(NotifyType.AUTHENTICATION_FAILED) is not None:
            self._respond(ks, msg, [])
            self._fail("auth-failed", "peer rejected our AUTH", now,
                       NotifyType.AUTHENTICATION_FAILED)
            return IkeState.CLOSED
        self._respond(ks, msg, [Delete(ProtocolId.ESP, tuple(answer))] if answer else [])
        return None

    def _remove_child(self, child: ChildSa, reason: str) -> None:
        self.children.pop(child.spi_in, None)
        for old_spi, (pc, _, _) in list(self._collisions.items()):
            if pc is child:
                del self._collisions[old_spi]
        if child.announced:  # a redundant collision child was never installed
            self._emit(ChildSaDeleted(child.params, reason))

    def _on_info_response(self, ks: _Keyset, msg: Message, now: float):
        ctx = self._last_ctx
        kind = ctx["kind"]
        if kind in ("delete-ike",):
            self._close(now, "local")
            return IkeState.CLOSED
        if kind == "delete-retired":
            self._drop_keyset(ks, now)
            return None
        if kind == "delete-child":
            for spi in ctx["spis"]:
                child = self.children.get(spi)
                if child is not None:
                    self._remove_child(child, "local")
        if kind == "liveness":
            self._emit(PeerAlive())
        return None

    def _refuse_temporarily(self, ks: _Keyset, msg: Message, now: float):
        raise IkeProtocolError(NotifyType.TEMPORARY_FAILURE, "IKE SA is being deleted")


def make_cookie(secret: bytes, ni: bytes, addr: IPAddress, spi_i: bytes) -> bytes:
    """COOKIE = version | HMAC(secret, Ni | IPi | SPIi), stateless (RFC 7296 §2.6)."""
    h = hmac.new(secret, ni + addr.packed + spi_i, "sha256")
    return b"\x01" + h.digest()[:16]


class IkeEndpoint:
    """Every IKE SA of one host: routes datagrams by our SPI, creates responders for new
    IKE_SA_INIT requests (when `responder_config(local, remote)` returns a config), demands
    COOKIEs when `half_open >= cookie_threshold` (or when `demand_cookies` says so), and
    settles mutual initiation.

    Mutual initiation (both sides initiate to each other at once): when two established IKE
    SAs join the same address pair, one initiated by each side, the one whose IKE_SA_INIT
    carried the lower Ni (bytewise) survives and we delete the other, with its Child SAs,
    whichever side initiated it: a peer without this rule (charon) would keep both. Both sides
    see both nonces, so two oe-agents delete the same SA; their crossing Deletes are harmless
    (§1.4.1). INITIAL_CONTACT goes out only when no other IKE SA with the peer exists.

    Work per datagram or timer does not grow with the number of SAs: every SA tells the
    endpoint when one of its methods runs (it is then "dirty": only dirty SAs are drained and
    re-timed), deadlines sit in a heap with lazy invalidation, and SAs are indexed by peer.
    """

    def __init__(self, rng: Rng, responder_config: Callable[[IPAddress, IPAddress],
                                                              IkeConfig | None],
                 cookie_threshold: int | None = None):
        self._rng = rng
        self._responder_config = responder_config
        self._secret = rng(32)
        self.cookie_threshold = cookie_threshold
        self.demand_cookies: bool | None = None
        self._by_spi: dict[bytes, IkeSa] = {}
        self._spis_of: dict[int, set[bytes]] = {}
        self._half_open: dict[tuple[IPAddress, bytes], IkeSa] = {}
        self._half_open_key: dict[IkeSa, tuple[IPAddress, bytes]] = {}
        self._events: deque[tuple[IkeSa, IkeEvent]] = deque()
        self._out: list[Datagram] = []
        self.dropped = 0  # datagrams that fit no SA (or were refused)
        self._order: dict[IkeSa, int] = {}  # live SAs -> creation number, oldest first
        self._made = 0
        self._new_responders: list[IkeSa] = []
        self._dirty: dict[IkeSa, None] = {}  # touched since last drained (insertion-ordered)
        self._by_remote: dict[IPAddress, list[IkeSa]] = {}  # in `sas` order (find, settling)
        self._init_done: dict[IkeSa, None] = {}  # SAs in INIT_DONE (the half-open count)
        self._timer_of: dict[IkeSa, float | None] = {}  # deadline last pushed for the SA
        self._heap: list[tuple[float, int, IkeSa]] = []  # (deadline, seq, sa); lazy deletes
        self._seq = 0

    @property
    def sas(self) -> list[IkeSa]:
        """Every live IKE SA, oldest first (a copy: the endpoint keeps them in `_order`, whose
        removals are O(1), unlike a list's)."""
        return list(self._order)

    @property
    def half_open(self) -> int:
        for sa in self._dirty:
            self._note_state(sa)
        return len(self._init_done)

    def connect(self, config: IkeConfig, local, remote, now: float,
                remote_port: int | None = None) -> IkeSa:
        sa = IkeSa(config, local, remote, initiator=True, rng=self._rng,
                   remote_port=remote_port)
        self._add(sa)
        sa.connect(now)
        self._after(sa, now)
        return sa

    def find(self, remote) -> list[IkeSa]:
        remote = as_address(remote)
        return list(self._by_remote.get(remote, ()))

    def receive_datagram(self, data: bytes, local: tuple, remote: tuple, now: float) -> None:
        """An IKE message (marker stripped) that arrived on local=(ip, port) from remote."""
        try:
            h = peek_header(data)
        except IkeError:
            self.dropped += 1
            return
        raddr, laddr = as_address(remote[0]), as_address(local[0])
        if h.exchange == ExchangeType.IKE_SA_INIT and not h.response and not any(h.spi_r):
            sa = self._half_open.get((raddr, h.spi_i))
            if sa is None:
                sa = self._new_responder(data, h, laddr, local[1], raddr, remote[1], now)
                if sa is None:
                    return
        else:
            sa = self._by_spi.get(h.spi_r if h.initiator else h.spi_i)
            if sa is None:
                self.dropped += 1
                return
        sa.receive_datagram(data, (raddr, remote[1]), now, local_port=local[1], header=h)
        self._after(sa, now)

    def _new_responder(self, data, h, laddr, lport, raddr, rport, now) -> IkeSa | None:
        config = self._responder_config(laddr, raddr)
        if config is None:
            self.dropped += 1
            return None
        need = self.demand_cookies
        if need is None:
            need = self.cookie_threshold is not None and self.half_open >= self.cookie_threshold
        if need:
            try:
                msg = Message.parse(data)
                nonce = _need(msg, Nonce, "Ni").data
            except IkeError:
                self.dropped += 1
                return None
            want = make_cookie(self._secret, nonce, raddr, h.spi_i)
            first = msg.payloads[0] if msg.payloads else None
            if not (isinstance(first, Notify) and first.notify_type == NotifyType.COOKIE
                    and hmac.compare_digest(first.data, want)):
                answer = Message(h.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, False, True, 0,
                                 (Notify(NotifyType.COOKIE, want),))
                self._out.append(Datagram(answer.to_bytes(), laddr, lport, raddr, rport))
                return None
        sa = IkeSa(config, laddr, raddr, initiator=False, rng=self._rng, remote_port=rport,
                   local_port=lport)
        self._add(sa)
        self._half_open[(raddr, h.spi_i)] = sa
        self._half_open_key[sa] = (raddr, h.spi_i)
        self._new_responders.append(sa)
        return sa

    def take_new_responders(self) -> list[IkeSa]:
        """The responder SAs created since the last call (an adapter announces each once;
        walking `sas` for them would cost O(SAs) per datagram)."""
        out, self._new_responders = self._new_responders, []
        return out

    def handle_timer(self, now: float) -> None:
        """Run the SAs whose deadline has come (in the order of `sas`), and only those."""
        self._retime_dirty()
        due: list[IkeSa] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, _, sa = heappop(heap)
            if self._timer_of.get(sa, _GONE) == t:  # else a stale entry
                del self._timer_of[sa]  # popped: the next _schedule pushes again
                due.append(sa)
        due.sort(key=lambda sa: self._order.get(sa, -1))
        for sa in due:
            if sa in self._order:
                t = sa.get_timer()
                if t is not None and t <= now:
                    sa.handle_timer(now)
                    self._after(sa, now)
                    continue
                self._schedule(sa)

    def get_timer(self) -> float | None:
        self._retime_dirty()
        heap = self._heap
        while heap:
            t, _, sa = heap[0]
            if self._timer_of.get(sa, _GONE) == t:
                return t
            heappop(heap)
        return None

    def collect(self, sa: IkeSa, now: float) -> None:
        """Take in what `sa` produced after a direct call (sa.rekey_child(...), ...)."""
        self._after(sa, now)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        """Everything to send, including what direct IkeSa calls produced since."""
        while self._dirty:
            for sa in sorted(self._dirty, key=lambda sa: self._order.get(sa, -1)):
                self._after(sa, now)
        out, self._out = self._out, []
        return out

    def next_event(self) -> tuple[IkeSa, IkeEvent] | None:
        """(sa, event); call datagrams_to_send(now) first after direct IkeSa calls."""
        return self._events.popleft() if self._events else None

    def _after(self, sa: IkeSa, now: float) -> None:
        """Collect what `sa` produced, re-index its SPIs, settle duplicates, forget closed."""
        self._dirty.pop(sa, None)
        self._out.extend(sa.datagrams_to_send(now))
        established = False
        while (ev := sa.next_event()) is not None:
            self._events.append((sa, ev))
            established = established or isinstance(ev, IkeSaEstablished)
        spis = sa.local_spis
        for spi in self._spis_of.get(id(sa), set()) - spis:  # generations rekeyed away
            if self._by_spi.get(spi) is sa:
                del self._by_spi[spi]
        for spi in spis:
            self._by_spi[spi] = sa
        self._spis_of[id(sa)] = spis
        if established:
            self._settle_duplicate(sa, now)
        if sa.state == IkeState.CLOSED:
            self._forget(sa)
        elif sa in self._order:
            self._note_state(sa)
            self._schedule(sa)

    def _settle_duplicate(self, sa: IkeSa, now: float) -> None:
        for other in self._by_remote.get(sa.remote, ()):
            if (other is sa or other.state != IkeState.ESTABLISHED
                    or other.local != sa.local or other.initiated == sa.initiated):
                continue
            loser = sa if sa.first_ni > other.first_ni else other
            if loser.state == IkeState.ESTABLISHED:
                loser.delete(now)  # either end may delete (§1.4.1), whoever initiated it
                self._out.extend(loser.datagrams_to_send(now))
                while (ev := loser.next_event()) is not None:
                    self._events.append((loser, ev))
            return

    def _add(self, sa: IkeSa) -> None:
        self._order[sa] = self._made
        self._made += 1
        self._by_remote.setdefault(sa.remote, []).append(sa)
        sa._watch = self._touch
        sa._peer_busy = self._peer_busy

    def _peer_busy(self, sa: IkeSa) -> bool:
        """Another IKE SA with sa's peer is established or being set up (no INITIAL_CONTACT)."""
        return any(o is not sa and o.local == sa.local and o.state != IkeState.CLOSED
                   for o in self._by_remote.get(sa.remote, ()))

    def _touch(self, sa: IkeSa) -> None:
        self._dirty[sa] = None

    def _note_state(self, sa: IkeSa) -> None:
        if sa.state == IkeState.INIT_DONE and sa in self._order:
            self._init_done[sa] = None
        else:
            self._init_done.pop(sa, None)

    def _retime_dirty(self) -> None:
        """Deadlines of SAs touched but not yet drained (direct IkeSa calls)."""
        for sa in self._dirty:
            if sa in self._order:
                self._schedule(sa)

    def _schedule(self, sa: IkeSa) -> None:
        """Push the SA's deadline unless the heap already holds it (lazy invalidation:
        an entry counts only while it equals _timer_of[sa])."""
        t = sa.get_timer()
        if self._timer_of.get(sa, _GONE) == t:
            return
        self._timer_of[sa] = t
        if t is None:
            return
        self._seq += 1
        heappush(self._heap, (t, self._seq, sa))
        self._compact()

    def _compact(self) -> None:
        """Rebuild the heap once stale entries outnumber live ones (amortised O(1); stale
        entries would otherwise keep closed SAs alive until their old deadline)."""
        if len(self._heap) > 2 * len(self._timer_of) + 64:
            self._heap = [(t, i, s) for i, (s, t) in enumerate(self._timer_of.items())
                          if t is not None]
            self._seq = len(self._heap)
            heapify(self._heap)

    def _forget(self, sa: IkeSa) -> None:
        if self._order.pop(sa, None) is not None:
            self._by_remote[sa.remote].remove(sa)
            if not self._by_remote[sa.remote]:
                del self._by_remote[sa.remote]
        sa._watch = sa._peer_busy = None
        self._dirty.pop(sa, None)
        self._timer_of.pop(sa, None)
        self._init_done.pop(sa, None)
        for k in self._spis_of.pop(id(sa), set()):
            if self._by_spi.get(k) is sa:
                del self._by_spi[k]
        key = self._half_open_key.pop(sa, None)
        if key is not None and self._half_open.get(key) is sa:
            del self._half_open[key]
        self._compact()


_GONE = object()  # "no deadline recorded" (distinct from None = "no timer")
