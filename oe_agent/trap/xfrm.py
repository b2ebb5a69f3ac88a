"""XFRM netlink messages (linux/xfrm.h) on pyroute2's nlmsg/nla framework.

pyroute2 has no XFRM family, so the structs are written down here once, as layouts: a layout
is a tuple of (name, struct format | nested layout). A nested layout is flattened into the
message's pyroute2 `fields` with `_`-joined names (`sel_daddr`, `id_spi`, `lft_hard_add_...`),
the same flat style pyroute2's own families use. C padding is explicit (`__pad` fields), so the
flattened format is exactly the kernel's x86_64/arm64 ABI; tests/unit/test_xfrm_structs.py
compiles linux/xfrm.h and checks every size and offset.

Byte order follows the header: `__be16`/`__be32` (ports, SPI) are big-endian, the rest native.
Addresses (`xfrm_address_t`) are 16 raw bytes; IPv4 uses the first 4.
"""
from __future__ import annotations

import ipaddress
import struct

from pyroute2.netlink import nla, nlmsg

# --- netlink and XFRM constants ---------------------------------------------------------------
NETLINK_XFRM = 6
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_ROOT, NLM_F_MATCH = 0x100, 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # flags of an NLMSG_ERROR (extended ack)
NLMSGERR_ATTR_MSG, NLMSGERR_ATTR_OFFS = 1, 2

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F

XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2  # EXPIRE and POLEXPIRE
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4

XFRM_INF = (1 << 64) - 1

XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_POLICY_FWD = 0, 1, 2
XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK = 0, 1
XFRM_POLICY_TYPE_MAIN = 0
XFRM_SHARE_ANY = 0
XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL = 0, 1
XFRM_STATE_NOECN = 1
XFRM_STATE_AF_UNSPEC = 32
XFRM_STATE_ESN = 128
UDP_ENCAP_ESPINUDP = 2  # RFC 3948, linux/udp.h

IPPROTO_ESP = 50
AF_INET, AF_INET6 = 2, 10
IP_XFRM_POLICY = 17  # linux/in.h
IPV6_XFRM_POLICY = 35  # linux/in6.h

# --- struct layouts ---------------------------------------------------------------------------
ADDRESS = "16s"  # xfrm_address_t

XFRM_ID = (("daddr", ADDRESS), ("spi", ">I"), ("proto", "B"), ("__pad", "3x"))
XFRM_SELECTOR = (
    ("daddr", ADDRESS), ("saddr", ADDRESS),
    ("dport", ">H"), ("dport_mask", ">H"), ("sport", ">H"), ("sport_mask", ">H"),
    ("family", "H"), ("prefixlen_d", "B"), ("prefixlen_s", "B"), ("proto", "B"),
    ("__pad", "3x"), ("ifindex", "i"), ("user", "I"),
)
XFRM_LIFETIME_CFG = tuple((n, "Q") for n in (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds",
    "soft_use_expires_seconds", "hard_use_expires_seconds"))
XFRM_LIFETIME_CUR = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))
XFRM_REPLAY_STATE = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))
XFRM_REPLAY_STATE_ESN = (("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"),
                         ("seq_hi", "I"), ("replay_window", "I"))  # + bmp[bmp_len] u32
XFRM_ALGO = (("alg_name", "64s"), ("alg_key_len", "I"))  # + key; key_len in bits
XFRM_ALGO_AUTH = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))
XFRM_ALGO_AEAD = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))
XFRM_STATS = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))
XFRM_ENCAP_TMPL = (("encap_type", "H"), ("encap_sport", ">H"), ("encap_dport", ">H"),
                   ("__pad", "2x"), ("encap_oa", ADDRESS))
XFRM_MARK = (("v", "I"), ("m", "I"))
XFRM_USERPOLICY_TYPE = (("type", "B"), ("__pad", "x"), ("reserved1", "H"),
                        ("reserved2", "B"), ("__pad2", "x"))
XFRM_USER_TMPL = (
    ("id", XFRM_ID), ("family", "H"), ("__pad", "2x"), ("saddr", ADDRESS),
    ("reqid", "I"), ("mode", "B"), ("share", "B"), ("optional", "B"), ("__pad2", "x"),
    ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"),
)
XFRM_USERSA_INFO = (
    ("sel", XFRM_SELECTOR), ("id", XFRM_ID), ("saddr", ADDRESS),
    ("lft", XFRM_LIFETIME_CFG), ("curlft", XFRM_LIFETIME_CUR), ("stats", XFRM_STATS),
    ("seq", "I"), ("reqid", "I"), ("family", "H"), ("mode", "B"), ("replay_window", "B"),
    ("flags", "B"), ("__pad", "7x"),
)
XFRM_USERSA_ID = (("daddr", ADDRESS), ("spi", ">I"), ("family", "H"), ("proto", "B"),
                  ("__pad", "x"))
XFRM_USERSPI_INFO = (("info", XFRM_USERSA_INFO), ("min", "I"), ("max", "I"))
XFRM_USERPOLICY_INFO = (
    ("sel", XFRM_SELECTOR), ("lft", XFRM_LIFETIME_CFG), ("curlft", XFRM_LIFETIME_CUR),
    ("priority", "I"), ("index", "I"), ("dir", "B"), ("action", "B"), ("flags", "B"),
    ("share", "B"), ("__pad", "4x"),
)
XFRM_USERPOLICY_ID = (("sel", XFRM_SELECTOR), ("index", "I"), ("dir", "B"), ("__pad", "3x"))
XFRM_USER_ACQUIRE = (
    ("id", XFRM_ID), ("saddr", ADDRESS), ("sel", XFRM_SELECTOR),
    ("policy", XFRM_USERPOLICY_INFO),
    ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"), ("seq", "I"),
)
XFRM_USER_EXPIRE = (("state", XFRM_USERSA_INFO), ("hard", "B"), ("__pad", "7x"))
XFRM_USER_POLEXPIRE = (("pol", XFRM_USERPOLICY_INFO), ("hard", "B"), ("__pad", "7x"))
XFRM_USERSA_FLUSH = (("proto", "B"),)

# C struct name -> layout, for the ABI test and for documentation.
C_STRUCTS = {
    "xfrm_id": XFRM_ID, "xfrm_selector": XFRM_SELECTOR,
    "xfrm_lifetime_cfg": XFRM_LIFETIME_CFG, "xfrm_lifetime_cur": XFRM_LIFETIME_CUR,
    "xfrm_replay_state": XFRM_REPLAY_STATE, "xfrm_replay_state_esn": XFRM_REPLAY_STATE_ESN,
    "xfrm_algo": XFRM_ALGO, "xfrm_algo_auth": XFRM_ALGO_AUTH, "xfrm_algo_aead": XFRM_ALGO_AEAD,
    "xfrm_stats": XFRM_STATS, "xfrm_encap_tmpl": XFRM_ENCAP_TMPL, "xfrm_mark": XFRM_MARK,
    "xfrm_userpolicy_type": XFRM_USERPOLICY_TYPE, "xfrm_user_tmpl": XFRM_USER_TMPL,
    "xfrm_usersa_info": XFRM_USERSA_INFO, "xfrm_usersa_id": XFRM_USERSA_ID,
    "xfrm_userspi_info": XFRM_USERSPI_INFO, "xfrm_userpolicy_info": XFRM_USERPOLICY_INFO,
    "xfrm_userpolicy_id": XFRM_USERPOLICY_ID, "xfrm_user_acquire": XFRM_USER_ACQUIRE,
    "xfrm_user_expire": XFRM_USER_EXPIRE, "xfrm_user_polexpire": XFRM_USER_POLEXPIRE,
    "xfrm_usersa_flush": XFRM_USERSA_FLUSH,
}


def flatten(layout, prefix: str = "") -> tuple[tuple[str, str], ...]:
    """Nested layout -> pyroute2 `fields`: ((flat_name, format), ...) in wire order."""
    out: list[tuple[str, str]] = []
    for name, fmt in layout:
        if isinstance(fmt, tuple):
            out.extend(flatten(fmt, f"{prefix}{name}_"))
        elif name.startswith("__"):
            out.append((f"__{prefix}{name.lstrip('_')}", fmt))
        else:
            out.append((prefix + name, fmt))
    return tuple(out)


def leaves(layout, path: str = "") -> list[tuple[str, str, int, int]]:
    """(flat name, C member path, offset, size) of every named leaf, for the ABI test."""
    out = []
    off = 0
    for name, fmt in layout:
        if isinstance(fmt, tuple):
            for flat, cpath, o, s in leaves(fmt, f"{path}{name}."):
                out.append((f"{name}_{flat}", cpath, off + o, s))
            off += size_of(fmt)
        else:
            s = struct.calcsize(fmt)
            if not name.startswith("__"):
                out.append((name, path + name, off, s))
            off += s
    return out


def size_of(layout) -> int:
    return sum(struct.calcsize(f) for _, f in flatten(layout))


def pack(layout, values: dict) -> bytes:
    """Encode a flat dict (names as in `flatten`) to the C struct; missing fields are zero."""
    out = bytearray()
    for name, fmt in flatten(layout):
        if fmt.endswith("x"):
            out += bytes(struct.calcsize(fmt))
            continue
        v = values.get(name)
        if v is None:
            v = b"" if fmt.endswith("s") else 0
        if isinstance(v, str):
            v = v.encode()
        out += struct.pack(fmt, v)
    return bytes(out)


def unpack(layout, data: bytes, offset: int = 0) -> dict:
    """Decode the C struct at `offset` into a flat dict (padding left out)."""
    values = {}
    for name, fmt in flatten(layout):
        if not fmt.endswith("x"):
            values[name] = struct.unpack_from(fmt, data, offset)[0]
        offset += struct.calcsize(fmt)
    return values


def _defaults(layout) -> dict:
    return {n: b"" for n, f in flatten(layout) if f.endswith("s")}


# --- address helpers --------------------------------------------------------------------------
def addr_bytes(addr) -> bytes:
    """IPv4/IPv6 address (or None) -> 16-byte xfrm_address_t."""
    if addr is None:
        return bytes(16)
    return ipaddress.ip_address(addr).packed.ljust(16, b"\0")


def addr_from(raw: bytes, family: int):
    raw = bytes(raw).ljust(16, b"\0")
    if family == AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw[:16])


def family_of(addr) -> int:
    return AF_INET if ipaddress.ip_address(addr).version == 4 else AF_INET6


# --- NLAs -------------------------------------------------------------------------------------
class _struct_tail(nla):
    """A fixed C struct followed by a variable tail (an algorithm key, a replay bitmap)."""

    __slots__ = ()
    layout: tuple = ()
    tail = "alg_key"

    def decode(self):
        nla.decode(self)
        start = self.offset + 4 + size_of(self.layout)
        self[self.tail] = bytes(self.data[start:self.offset + self.length])


class _xfrma(nlmsg):
    """XFRMA_* attribute classes and the attribute map shared by all XFRM messages."""

    __slots__ = ()
    prefix = "XFRMA_"

    class xfrm_algo(_struct_tail):
        __slots__ = ()
        layout = XFRM_ALGO
        fields = flatten(XFRM_ALGO) + (("alg_key", "s"),)
        defaults = {"alg_name": b"", "alg_key": b""}

    class xfrm_algo_auth(_struct_tail):
        __slots__ = ()
        layout = XFRM_ALGO_AUTH
        fields = flatten(XFRM_ALGO_AUTH) + (("alg_key", "s"),)
        defaults = {"alg_name": b"", "alg_key": b""}

    class xfrm_algo_aead(_struct_tail):
        __slots__ = ()
        layout = XFRM_ALGO_AEAD
        fields = flatten(XFRM_ALGO_AEAD) + (("alg_key", "s"),)
        defaults = {"alg_name": b"", "alg_key": b""}

    class xfrm_replay_state_esn(_struct_tail):
        __slots__ = ()
        layout = XFRM_REPLAY_STATE_ESN
        tail = "bmp"
        fields = flatten(XFRM_REPLAY_STATE_ESN) + (("bmp", "s"),)
        defaults = {"bmp": b""}

    class xfrm_encap_tmpl(nla):
        __slots__ = ()
        fields = flatten(XFRM_ENCAP_TMPL)
        defaults = _defaults(XFRM_ENCAP_TMPL)

    class xfrm_lifetime_cur(nla):
        __slots__ = ()
        fields = flatten(XFRM_LIFETIME_CUR)

    class xfrm_replay_state(nla):
        __slots__ = ()
        fields = flatten(XFRM_REPLAY_STATE)

    class xfrm_mark(nla):
        __slots__ = ()
        fields = flatten(XFRM_MARK)

    class xfrm_userpolicy_type(nla):
        __slots__ = ()
        fields = flatten(XFRM_USERPOLICY_TYPE)

    class xfrm_usersa_info(nla):
        __slots__ = ()
        fields = flatten(XFRM_USERSA_INFO)
        defaults = _defaults(XFRM_USERSA_INFO)

    class xfrm_userpolicy_info(nla):
        __slots__ = ()
        fields = flatten(XFRM_USERPOLICY_INFO)
        defaults = _defaults(XFRM_USERPOLICY_INFO)

    class xfrm_address(nla):
        __slots__ = ()
        fields = (("value", ADDRESS),)
        defaults = {"value": b""}

    class xfrm_tmpls(nla):
        """XFRMA_TMPL: an array of struct xfrm_user_tmpl with no per-entry NLA header."""

        __slots__ = ()
        fields = (("value", "s"),)

        def encode(self):
            self["value"] = b"".join(pack(XFRM_USER_TMPL, t) for t in self.value)
            nla.encode(self)

        def decode(self):
            nla.decode(self)
            raw = bytes(self.data[self.offset + 4:self.offset + self.length])
            n = size_of(XFRM_USER_TMPL)
            self.value = [unpack(XFRM_USER_TMPL, raw, i) for i in range(0, len(raw) - n + 1, n)]

    nla_map = (
        (0, "XFRMA_UNSPEC", "none"),
        (1, "XFRMA_ALG_AUTH", "xfrm_algo"),
        (2, "XFRMA_ALG_CRYPT", "xfrm_algo"),
        (3, "XFRMA_ALG_COMP", "xfrm_algo"),
        (4, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
        (5, "XFRMA_TMPL", "xfrm_tmpls"),
        (6, "XFRMA_SA", "xfrm_usersa_info"),
        (7, "XFRMA_POLICY", "xfrm_userpolicy_info"),
        (8, "XFRMA_SEC_CTX", "hex"),
        (9, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        (10, "XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        (11, "XFRMA_REPLAY_THRESH", "uint32"),
        (12, "XFRMA_ETIMER_THRESH", "uint32"),
        (13, "XFRMA_SRCADDR", "xfrm_address"),
        (14, "XFRMA_COADDR", "xfrm_address"),
        (15, "XFRMA_LASTUSED", "uint64"),
        (16, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        (17, "XFRMA_MIGRATE", "hex"),
        (18, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        (19, "XFRMA_KMADDRESS", "hex"),
        (20, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        (21, "XFRMA_MARK", "xfrm_mark"),
        (22, "XFRMA_TFCPAD", "uint32"),
        (23, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        (24, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (25, "XFRMA_PROTO", "uint8"),
        (26, "XFRMA_ADDRESS_FILTER", "hex"),
        (27, "XFRMA_PAD", "none"),
        (28, "XFRMA_OFFLOAD_DEV", "hex"),
        (29, "XFRMA_SET_MARK", "uint32"),
        (30, "XFRMA_SET_MARK_MASK", "uint32"),
        (31, "XFRMA_IF_ID", "uint32"),
        (32, "XFRMA_MTIMER_THRESH", "uint32"),
        (33, "XFRMA_SA_DIR", "uint8"),
    )


# --- messages ---------------------------------------------------------------------------------
class xfrm_usersa_info(_xfrma):
    """NEWSA / UPDSA (and the kernel's answers to GETSA and ALLOCSPI)."""

    __slots__ = ()
    fields = flatten(XFRM_USERSA_INFO)
    defaults = _defaults(XFRM_USERSA_INFO)


class xfrm_usersa_id(_xfrma):
    """DELSA / GETSA: (daddr, spi, proto) names one SA."""

    __slots__ = ()
    fields = flatten(XFRM_USERSA_ID)
    defaults = _defaults(XFRM_USERSA_ID)


class xfrm_userspi_info(_xfrma):
    """ALLOCSPI: `info_seq` ties it to an ACQUIRE's larval state."""

    __slots__ = ()
    fields = flatten(XFRM_USERSPI_INFO, "")
    defaults = _defaults(XFRM_USERSPI_INFO)


class xfrm_userpolicy_info(_xfrma):
    """NEWPOLICY / UPDPOLICY (and GETPOLICY answers)."""

    __slots__ = ()
    fields = flatten(XFRM_USERPOLICY_INFO)
    defaults = _defaults(XFRM_USERPOLICY_INFO)


class xfrm_userpolicy_id(_xfrma):
    """DELPOLICY / GETPOLICY: selector + dir (or index) names one policy."""

    __slots__ = ()
    fields = flatten(XFRM_USERPOLICY_ID)
    defaults = _defaults(XFRM_USERPOLICY_ID)


class xfrm_user_acquire(_xfrma):
    """ACQUIRE (multicast group XFRMNLGRP_ACQUIRE); XFRMA_TMPL carries the templates."""

    __slots__ = ()
    fields = flatten(XFRM_USER_ACQUIRE)
    defaults = _defaults(XFRM_USER_ACQUIRE)


class xfrm_user_expire(_xfrma):
    """EXPIRE (group XFRMNLGRP_EXPIRE): soft (hard=0) or hard lifetime of an SA."""

    __slots__ = ()
    fields = flatten(XFRM_USER_EXPIRE)
    defaults = _defaults(XFRM_USER_EXPIRE)


class xfrm_user_polexpire(_xfrma):
    """POLEXPIRE (group XFRMNLGRP_EXPIRE): a policy lifetime ran out."""

    __slots__ = ()
    fields = flatten(XFRM_USER_POLEXPIRE)
    defaults = _defaults(XFRM_USER_POLEXPIRE)


class xfrm_usersa_flush(_xfrma):
    __slots__ = ()
    fields = flatten(XFRM_USERSA_FLUSH)


class xfrm_flushpolicy(_xfrma):
    """FLUSHPOLICY has no body, only an optional XFRMA_POLICY_TYPE."""

    __slots__ = ()
    fields = ()


class xfrm_dump_request(_xfrma):
    """A GETSA/GETPOLICY dump request: no body (the kernel parses attributes right after the
    netlink header for dumps, so a struct there would be read as attributes)."""

    __slots__ = ()
    fields = ()


# message type -> class, for decoding what the kernel sends (requests use the same classes)
MSG_CLASSES: dict[int, type[nlmsg]] = {
    XFRM_MSG_NEWSA: xfrm_usersa_info,
    XFRM_MSG_UPDSA: xfrm_usersa_info,
    XFRM_MSG_DELSA: xfrm_usersa_id,
    XFRM_MSG_GETSA: xfrm_usersa_id,
    XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_GETPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_ALLOCSPI: xfrm_userspi_info,
    XFRM_MSG_ACQUIRE: xfrm_user_acquire,
    XFRM_MSG_EXPIRE: xfrm_user_expire,
    XFRM_MSG_POLEXPIRE: xfrm_user_polexpire,
    XFRM_MSG_FLUSHSA: xfrm_usersa_flush,
    XFRM_MSG_FLUSHPOLICY: xfrm_flushpolicy,
}


def encode(msg: nlmsg, msg_type: int, flags: int, seq: int) -> bytes:
    """Fill the netlink header and encode `msg` to wire bytes."""
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


def decode(data: bytes, offset: int = 0) -> nlmsg | None:
    """Decode one XFRM message at `offset` (None for types this module does not know)."""
    (msg_type,) = struct.unpack_from("H", data, offset + 4)
    cls = MSG_CLASSES.get(msg_type)
    if cls is None:
        return None
    (length,) = struct.unpack_from("I", data, offset)
    msg = cls(bytearray(data[offset:offset + length]))
    msg.decode()
    return msg
