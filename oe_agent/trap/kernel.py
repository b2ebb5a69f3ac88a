"""Typed XFRM operations: selectors, templates, policies and SAs as immutable values, and
`Xfrm`, which installs, reads and removes them through an `XfrmSocket`.

This layer has no notion of ownership or of the agent; `oe_agent.trap.dataplane` adds the
reqid/priority bands and the model.Dataplane protocol on top.
"""
from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass

from oe_agent.model import (Acquire, EspAlgorithm, IPAddress, IPNetwork, Mode, PolicyExpire,
                            SaExpire)
from oe_agent.trap import xfrm
from oe_agent.trap.netlink import XfrmError, XfrmSocket

MODES = {Mode.TRANSPORT: xfrm.XFRM_MODE_TRANSPORT, Mode.TUNNEL: xfrm.XFRM_MODE_TUNNEL}
_MODE_BY_NUM = {v: k for k, v in MODES.items()}
DIRS = {"in": xfrm.XFRM_POLICY_IN, "out": xfrm.XFRM_POLICY_OUT, "fwd": xfrm.XFRM_POLICY_FWD}
_DIR_BY_NUM = {v: k for k, v in DIRS.items()}

# model.EspAlgorithm names -> kernel crypto API names (RFC 4106, RFC 7634, RFC 3602 / 4868)
AEAD = {"aes-gcm-16": ("rfc4106(gcm(aes))", 128, (128, 192, 256), 32),
        "chacha20-poly1305": ("rfc7539esp(chacha20,poly1305)", 128, (256,), 32)}
CRYPT = {"aes-cbc": ("cbc(aes)", (128, 192, 256))}
INTEG = {"hmac-sha2-256-128": ("hmac(sha256)", 128, 256)}
_NAME_BY_KERNEL = {v[0]: k for k, v in {**AEAD, **CRYPT, **INTEG}.items()}


def _net(x) -> IPNetwork:
    return ipaddress.ip_network(x, strict=False)


def _inf(v: int) -> int:
    return v if v else xfrm.XFRM_INF


def _fin(v: int) -> int:
    return 0 if v == xfrm.XFRM_INF else v


@dataclass(frozen=True)
class Selector:
    """What traffic a policy or SA covers: prefixes, protocol (0 = any) and ports (0 = any;
    for ICMP the kernel compares sport with the type and dport with the code)."""

    src: IPNetwork
    dst: IPNetwork
    proto: int = 0
    sport: int = 0
    dport: int = 0

    def __post_init__(self):
        object.__setattr__(self, "src", _net(self.src))
        object.__setattr__(self, "dst", _net(self.dst))
        if self.src.version != self.dst.version:
            raise ValueError(f"selector mixes address families: {self.src} -> {self.dst}")
        for p in (self.sport, self.dport):
            if not 0 <= p <= 65535:
                raise ValueError(f"port {p} out of range")
        if not 0 <= self.proto <= 255:
            raise ValueError(f"protocol {self.proto} out of range")

    @classmethod
    def to(cls, dst, proto: int = 0, dport: int = 0) -> "Selector":
        """Any source to `dst` (a group policy)."""
        d = _net(dst)
        anynet = "0.0.0.0/0" if d.version == 4 else "::/0"
        return cls(_net(anynet), d, proto, 0, dport)

    @classmethod
    def pair(cls, src, dst, proto: int = 0, sport: int = 0, dport: int = 0) -> "Selector":
        """One host to one host (/32 or /128): shunts and SA policies."""
        return cls(_net(ipaddress.ip_address(src)), _net(ipaddress.ip_address(dst)), proto,
                   sport, dport)

    @property
    def family(self) -> int:
        return xfrm.AF_INET if self.src.version == 4 else xfrm.AF_INET6

    def reversed(self) -> "Selector":
        return Selector(self.dst, self.src, self.proto, self.dport, self.sport)

    def fields(self, prefix: str = "sel_") -> dict:
        return {
            f"{prefix}daddr": xfrm.addr_bytes(self.dst.network_address),
            f"{prefix}saddr": xfrm.addr_bytes(self.src.network_address),
            f"{prefix}dport": self.dport, f"{prefix}dport_mask": 0xFFFF if self.dport else 0,
            f"{prefix}sport": self.sport, f"{prefix}sport_mask": 0xFFFF if self.sport else 0,
            f"{prefix}family": self.family, f"{prefix}prefixlen_d": self.dst.prefixlen,
            f"{prefix}prefixlen_s": self.src.prefixlen, f"{prefix}proto": self.proto,
        }

    @classmethod
    def from_fields(cls, m, prefix: str = "sel_", family: int | None = None) -> "Selector":
        fam = m[f"{prefix}family"] or family or xfrm.AF_INET
        src = xfrm.addr_from(m[f"{prefix}saddr"], fam)
        dst = xfrm.addr_from(m[f"{prefix}daddr"], fam)
        return cls(_net(f"{src}/{m[f'{prefix}prefixlen_s']}"),
                   _net(f"{dst}/{m[f'{prefix}prefixlen_d']}"), m[f"{prefix}proto"],
                   m[f"{prefix}sport"] if m[f"{prefix}sport_mask"] else 0,
                   m[f"{prefix}dport"] if m[f"{prefix}dport_mask"] else 0)

    def __str__(self) -> str:
        p = f" proto {self.proto}" if self.proto else ""
        sp = f" sport {self.sport}" if self.sport else ""
        dp = f" dport {self.dport}" if self.dport else ""
        return f"{self.src} -> {self.dst}{p}{sp}{dp}"


@dataclass(frozen=True)
class Template:
    """One transform a policy requires (struct xfrm_user_tmpl). Addresses None = taken from
    the packet (transport mode)."""

    reqid: int
    mode: Mode = Mode.TRANSPORT
    src: IPAddress | None = None
    dst: IPAddress | None = None
    family: int = xfrm.AF_INET
    proto: int = xfrm.IPPROTO_ESP
    spi: int = 0
    optional: bool = False

    def fields(self) -> dict:
        return {"id_daddr": xfrm.addr_bytes(self.dst), "id_spi": self.spi,
                "id_proto": self.proto, "family": self.family,
                "saddr": xfrm.addr_bytes(self.src), "reqid": self.reqid,
                "mode": MODES[self.mode], "share": xfrm.XFRM_SHARE_ANY,
                "optional": int(self.optional),
                "aalgos": 0xFFFFFFFF, "ealgos": 0xFFFFFFFF, "calgos": 0xFFFFFFFF}

    @classmethod
    def from_fields(cls, t: dict) -> "Template":
        fam = t["family"]
        src = xfrm.addr_from(t["saddr"], fam)
        dst = xfrm.addr_from(t["id_daddr"], fam)
        return cls(reqid=t["reqid"], mode=_MODE_BY_NUM.get(t["mode"], Mode.TRANSPORT),
                   src=None if src.packed == bytes(len(src.packed)) else src,
                   dst=None if dst.packed == bytes(len(dst.packed)) else dst,
                   family=fam, proto=t["id_proto"], spi=t["id_spi"],
                   optional=bool(t["optional"]))


@dataclass(frozen=True)
class Lifetime:
    """Soft/hard limits; 0 = none (XFRM_INF on the wire)."""

    soft_s: int = 0
    hard_s: int = 0
    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0

    def fields(self, prefix: str = "lft_") -> dict:
        return {f"{prefix}soft_byte_limit": _inf(self.soft_bytes),
                f"{prefix}hard_byte_limit": _inf(self.hard_bytes),
                f"{prefix}soft_packet_limit": _inf(self.soft_packets),
                f"{prefix}hard_packet_limit": _inf(self.hard_packets),
                f"{prefix}soft_add_expires_seconds": self.soft_s,
                f"{prefix}hard_add_expires_seconds": self.hard_s}

    @classmethod
    def from_fields(cls, m, prefix: str = "lft_") -> "Lifetime":
        return cls(m[f"{prefix}soft_add_expires_seconds"], m[f"{prefix}hard_add_expires_seconds"],
                   _fin(m[f"{prefix}soft_byte_limit"]), _fin(m[f"{prefix}hard_byte_limit"]),
                   _fin(m[f"{prefix}soft_packet_limit"]), _fin(m[f"{prefix}hard_packet_limit"]))


@dataclass(frozen=True)
class Policy:
    """A policy as the kernel holds it (from a dump, GETPOLICY or a POLEXPIRE)."""

    sel: Selector
    dir: str  # "in" | "out" | "fwd"
    action: str  # "allow" | "block"
    priority: int
    index: int = 0
    templates: tuple[Template, ...] = ()
    lifetime: Lifetime = Lifetime()
    add_time: int = 0
    use_time: int = 0
    mark: tuple[int, int] | None = None
    if_id: int = 0


@dataclass(frozen=True)
class SaSpec:
    """One direction of an ESP SA to install (src -> dst, SPI chosen by the receiver)."""

    src: IPAddress
    dst: IPAddress
    spi: int
    reqid: int
    alg: EspAlgorithm
    encr_key: bytes
    integ_key: bytes = b""
    mode: Mode = Mode.TRANSPORT
    sel: Selector | None = None  # transport default: the host pair
    encap: tuple[int, int] | None = None  # (sport, dport) ESP-in-UDP, RFC 3948
    esn: bool = False
    replay_window: int = 0
    lifetime: Lifetime = Lifetime()
    seq: int = 0  # an ACQUIRE's seq: the kernel replaces that larval state (outbound SA)
    mark: tuple[int, int] | None = None
    if_id: int = 0


@dataclass(frozen=True)
class Sa:
    """An SA as the kernel holds it (dump/GETSA/EXPIRE). Larval states have no algorithm."""

    src: IPAddress
    dst: IPAddress
    spi: int
    proto: int
    mode: Mode
    reqid: int
    seq: int
    sel: Selector
    algorithms: tuple[str, ...] = ()  # model names where known, else kernel names
    encap: tuple[int, int] | None = None
    lifetime: Lifetime = Lifetime()
    bytes: int = 0
    packets: int = 0
    add_time: int = 0
    use_time: int = 0
    replay_window: int = 0
    esn: bool = False
    mark: tuple[int, int] | None = None
    if_id: int = 0

    @property
    def larval(self) -> bool:
        return not self.algorithms


@dataclass(frozen=True)
class KernelAcquire(Acquire):
    """An XFRM ACQUIRE: the model's Acquire plus the kernel's selector and templates."""

    selector: Selector | None = None
    templates: tuple[Template, ...] = ()
    priority: int = 0


@dataclass(frozen=True)
class KernelPolicyExpire(PolicyExpire):
    """A POLEXPIRE: the model's PolicyExpire plus the policy's direction and priority."""

    dir: str = "out"
    priority: int = 0
    proto: int = 0


def _mark(m) -> tuple[int, int] | None:
    a = m.get_attr("XFRMA_MARK")
    return (a["v"], a["m"]) if a else None


def policy_from(m, prefix: str = "") -> Policy:
    """Decode a xfrm_userpolicy_info message (or the `pol_` part of a POLEXPIRE)."""
    tmpls = m.get_attr("XFRMA_TMPL") or []
    return Policy(
        sel=Selector.from_fields(m, f"{prefix}sel_"),
        dir=_DIR_BY_NUM.get(m[f"{prefix}dir"], str(m[f"{prefix}dir"])),
        action="block" if m[f"{prefix}action"] == xfrm.XFRM_POLICY_BLOCK else "allow",
        priority=m[f"{prefix}priority"], index=m[f"{prefix}index"],
        templates=tuple(Template.from_fields(t) for t in tmpls),
        lifetime=Lifetime.from_fields(m, f"{prefix}lft_"),
        add_time=m[f"{prefix}curlft_add_time"], use_time=m[f"{prefix}curlft_use_time"],
        mark=_mark(m), if_id=m.get_attr("XFRMA_IF_ID") or 0)


def sa_from(m, prefix: str = "") -> Sa:
    """Decode a xfrm_usersa_info message (or the `state_` part of an EXPIRE)."""
    fam = m[f"{prefix}family"]
    algs = []
    for attr in ("XFRMA_ALG_AEAD", "XFRMA_ALG_CRYPT", "XFRMA_ALG_AUTH_TRUNC", "XFRMA_ALG_AUTH"):
        a = m.get_attr(attr)
        if a:
            kname = a["alg_name"].rstrip(b"\0").decode(errors="replace")
            algs.append(_NAME_BY_KERNEL.get(kname, kname))
    enc = m.get_attr("XFRMA_ENCAP")
    esn = m.get_attr("XFRMA_REPLAY_ESN_VAL")
    return Sa(
        src=xfrm.addr_from(m[f"{prefix}saddr"], fam),
        dst=xfrm.addr_from(m[f"{prefix}id_daddr"], fam),
        spi=m[f"{prefix}id_spi"], proto=m[f"{prefix}id_proto"],
        mode=_MODE_BY_NUM.get(m[f"{prefix}mode"], Mode.TRANSPORT),
        reqid=m[f"{prefix}reqid"], seq=m[f"{prefix}seq"],
        sel=Selector.from_fields(m, f"{prefix}sel_", fam),
        algorithms=tuple(algs),
        encap=(enc["encap_sport"], enc["encap_dport"]) if enc else None,
        lifetime=Lifetime.from_fields(m, f"{prefix}lft_"),
        bytes=m[f"{prefix}curlft_bytes"], packets=m[f"{prefix}curlft_packets"],
        add_time=m[f"{prefix}curlft_add_time"], use_time=m[f"{prefix}curlft_use_time"],
        replay_window=esn["replay_window"] if esn else m[f"{prefix}replay_window"],
        esn=bool(m[f"{prefix}flags"] & xfrm.XFRM_STATE_ESN),
        mark=_mark(m), if_id=m.get_attr("XFRMA_IF_ID") or 0)


def event_from(m) -> KernelAcquire | SaExpire | KernelPolicyExpire | None:
    """A multicast message -> the model's typed event (None for other messages)."""
    if isinstance(m, xfrm.xfrm_user_acquire):
        sel = Selector.from_fields(m, "sel_")
        tmpls = tuple(Template.from_fields(t) for t in (m.get_attr("XFRMA_TMPL") or []))
        return KernelAcquire(
            src=sel.src.network_address, dst=sel.dst.network_address, proto=sel.proto,
            sport=sel.sport, dport=sel.dport, seq=m["seq"], policy_index=m["policy_index"],
            selector=sel, templates=tmpls, priority=m["policy_priority"])
    if isinstance(m, xfrm.xfrm_user_expire):
        fam = m["state_family"]
        return SaExpire(spi=m["state_id_spi"], dst=xfrm.addr_from(m["state_id_daddr"], fam),
                        hard=bool(m["hard"]), reqid=m["state_reqid"])
    if isinstance(m, xfrm.xfrm_user_polexpire):
        sel = Selector.from_fields(m, "pol_sel_")
        return KernelPolicyExpire(src=sel.src, dst=sel.dst, index=m["pol_index"],
                                  hard=bool(m["hard"]), priority=m["pol_priority"],
                                  dir=_DIR_BY_NUM.get(m["pol_dir"], "out"), proto=sel.proto)
    return None


def algorithm_attrs(alg: EspAlgorithm, encr_key: bytes, integ_key: bytes = b"") -> list:
    """XFRMA_ALG_* attributes for one SA; ValueError names what is wrong with the keys."""
    if alg.encr in AEAD:
        name, icv, sizes, salt = AEAD[alg.encr]
        if alg.integ:
            raise ValueError(f"{alg.encr} is AEAD: no integrity algorithm ({alg.integ})")
        if alg.encr_key_bits not in sizes:
            raise ValueError(f"{alg.encr}: key size {alg.encr_key_bits} not one of {sizes}")
        if len(encr_key) * 8 != alg.encr_key_bits + salt:
            raise ValueError(f"{alg.encr}-{alg.encr_key_bits}: key must be "
                             f"{(alg.encr_key_bits + salt) // 8} bytes incl. salt, "
                             f"got {len(encr_key)}")
        return [("XFRMA_ALG_AEAD", {"alg_name": name, "alg_key_len": len(encr_key) * 8,
                                    "alg_icv_len": icv, "alg_key": encr_key})]
    if alg.encr in CRYPT:
        name, sizes = CRYPT[alg.encr]
        if alg.encr_key_bits not in sizes or len(encr_key) * 8 != alg.encr_key_bits:
            raise ValueError(f"{alg.encr}: {len(encr_key)}-byte key for "
                             f"{alg.encr_key_bits} bits (allowed {sizes})")
        if alg.integ not in INTEG:
            raise ValueError(f"{alg.encr} needs an integrity algorithm, one of {sorted(INTEG)}; "
                             f"got {alg.integ}")
        iname, trunc, ibits = INTEG[alg.integ]
        if len(integ_key) * 8 != ibits:
            raise ValueError(f"{alg.integ}: key must be {ibits // 8} bytes, got {len(integ_key)}")
        return [("XFRMA_ALG_CRYPT", {"alg_name": name, "alg_key_len": len(encr_key) * 8,
                                     "alg_key": encr_key}),
                ("XFRMA_ALG_AUTH_TRUNC", {"alg_name": iname, "alg_key_len": ibits,
                                          "alg_trunc_len": trunc, "alg_key": integ_key})]
    raise ValueError(f"unknown ESP algorithm {alg.encr!r} "
                     f"(known: {', '.join(sorted({**AEAD, **CRYPT}))})")


def _mark_attrs(mark, if_id) -> list:
    attrs = []
    if mark is not None:
        attrs.append(("XFRMA_MARK", {"v": mark[0], "m": mark[1]}))
    if if_id:
        attrs.append(("XFRMA_IF_ID", if_id))
    return attrs


class Xfrm:
    """XFRM operations on the namespace the socket was opened in (no ownership rules here)."""

    def __init__(self, sock: XfrmSocket):
        self.sock = sock

    @classmethod
    async def open(cls) -> "Xfrm":
        return cls(await XfrmSocket.open())

    def close(self) -> None:
        self.sock.close()

    # --- policies ---------------------------------------------------------------------------
    async def add_policy(self, sel: Selector, dir: str, *, priority: int, action: str = "allow",
                         templates: tuple[Template, ...] = (), lifetime: Lifetime = Lifetime(),
                         update: bool = False, mark: tuple[int, int] | None = None,
                         if_id: int = 0) -> None:
        """NEWPOLICY (EEXIST if one has this selector+dir) or, with update, UPDPOLICY."""
        if action not in ("allow", "block"):
            raise ValueError(f"policy action must be allow or block, not {action!r}")
        m = xfrm.xfrm_userpolicy_info()
        m.update(sel.fields())
        m.update(lifetime.fields())
        m.update({"priority": priority, "dir": DIRS[dir], "share": xfrm.XFRM_SHARE_ANY,
                  "action": xfrm.XFRM_POLICY_BLOCK if action == "block"
                  else xfrm.XFRM_POLICY_ALLOW})
        attrs = []
        if templates:
            attrs.append(("XFRMA_TMPL", [t.fields() for t in templates]))
        m["attrs"] = attrs + _mark_attrs(mark, if_id)
        await self.sock.request(
            m, xfrm.XFRM_MSG_UPDPOLICY if update else xfrm.XFRM_MSG_NEWPOLICY)

    def _policy_id(self, sel: Selector, dir: str, mark, if_id, index: int = 0):
        m = xfrm.xfrm_userpolicy_id()
        m.update(sel.fields())
        m.update({"dir": DIRS[dir], "index": index})
        m["attrs"] = _mark_attrs(mark, if_id)
        return m

    async def del_policy(self, sel: Selector, dir: str, *, mark=None, if_id: int = 0) -> bool:
        """Remove one policy; False if there was none."""
        try:
            await self.sock.request(self._policy_id(sel, dir, mark, if_id),
                                    xfrm.XFRM_MSG_DELPOLICY)
        except XfrmError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    async def get_policy(self, sel: Selector, dir: str, *, mark=None,
                         if_id: int = 0) -> Policy | None:
        try:
            got = await self.sock.request(self._policy_id(sel, dir, mark, if_id),
                                          xfrm.XFRM_MSG_GETPOLICY)
        except XfrmError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return policy_from(got[0]) if got else None

    async def get_policy_by_index(self, index: int, dir: str) -> Policy | None:
        """GETPOLICY by the kernel's index (an ACQUIRE's or POLEXPIRE's policy)."""
        m = xfrm.xfrm_userpolicy_id()
        m.update({"dir": DIRS[dir], "index": index})
        try:
            got = await self.sock.request(m, xfrm.XFRM_MSG_GETPOLICY)
        except XfrmError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return policy_from(got[0]) if got else None

    async def policies(self) -> list[Policy]:
        got = await self.sock.dump(xfrm.xfrm_dump_request(), xfrm.XFRM_MSG_GETPOLICY)
        return [policy_from(m) for m in got if isinstance(m, xfrm.xfrm_userpolicy_info)]

    # --- SAs --------------------------------------------------------------------------------
    async def alloc_spi(self, src, dst, *, reqid: int = 0, seq: int = 0,
                        mode: Mode = Mode.TRANSPORT, spi_min: int = 0x100,
                        spi_max: int = 0xFFFFFFFF) -> int:
        """ALLOCSPI for an SA src -> dst. With an ACQUIRE's `seq` whose larval state has this
        dst, the kernel gives the SPI to that larval state; otherwise it makes a new one."""
        src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        fam = xfrm.family_of(dst)
        m = xfrm.xfrm_userspi_info()
        m.update({"info_id_daddr": xfrm.addr_bytes(dst), "info_id_proto": xfrm.IPPROTO_ESP,
                  "info_saddr": xfrm.addr_bytes(src), "info_family": fam,
                  "info_sel_family": fam, "info_reqid": reqid, "info_seq": seq,
                  "info_mode": MODES[mode], "min": spi_min, "max": spi_max})
        m.update(Lifetime().fields("info_lft_"))
        got = await self.sock.request(m, xfrm.XFRM_MSG_ALLOCSPI)
        if not got:
            raise XfrmError(errno.EIO, "XFRM_MSG_ALLOCSPI", "no SA in the answer")
        return got[0]["id_spi"]

    async def add_sa(self, spec: SaSpec, update: bool = False) -> None:
        """NEWSA, or UPDSA to fill a larval state (one made by ALLOCSPI)."""
        src, dst = ipaddress.ip_address(spec.src), ipaddress.ip_address(spec.dst)
        if src.version != dst.version:
            raise ValueError(f"SA {src} -> {dst} mixes address families")
        fam = xfrm.family_of(dst)
        sel = spec.sel
        if sel is None and spec.mode is Mode.TRANSPORT:
            sel = Selector.pair(src, dst)
        m = xfrm.xfrm_usersa_info()
        if sel is not None:
            m.update(sel.fields())
        else:
            m["sel_family"] = fam
        m.update(spec.lifetime.fields())
        m.update({"id_daddr": xfrm.addr_bytes(dst), "id_spi": spec.spi,
                  "id_proto": xfrm.IPPROTO_ESP, "saddr": xfrm.addr_bytes(src),
                  "family": fam, "mode": MODES[spec.mode], "reqid": spec.reqid,
                  "seq": spec.seq, "flags": xfrm.XFRM_STATE_ESN if spec.esn else 0})
        attrs = algorithm_attrs(spec.alg, spec.encr_key, spec.integ_key)
        if spec.encap is not None:
            attrs.append(("XFRMA_ENCAP", {"encap_type": xfrm.UDP_ENCAP_ESPINUDP,
                                          "encap_sport": spec.encap[0],
                                          "encap_dport": spec.encap[1]}))
        if spec.esn and not spec.replay_window:
            raise ValueError("an ESN SA needs a replay window > 0 (the kernel refuses 0)")
        if spec.esn or spec.replay_window:
            # the ESN replay attribute also lifts the legacy 32-packet window limit
            words = max(1, (spec.replay_window + 31) // 32)
            attrs.append(("XFRMA_REPLAY_ESN_VAL", {"bmp_len": words,
                                                   "replay_window": spec.replay_window,
                                                   "bmp": bytes(4 * words)}))
        m["attrs"] = attrs + _mark_attrs(spec.mark, spec.if_id)
        await self.sock.request(m, xfrm.XFRM_MSG_UPDSA if update else xfrm.XFRM_MSG_NEWSA)

    def _sa_id(self, dst, spi: int, mark, if_id):
        dst = ipaddress.ip_address(dst)
        m = xfrm.xfrm_usersa_id()
        m.update({"daddr": xfrm.addr_bytes(dst), "spi": spi, "family": xfrm.family_of(dst),
                  "proto": xfrm.IPPROTO_ESP})
        m["attrs"] = _mark_attrs(mark, if_id)
        return m

    async def del_sa(self, dst, spi: int, *, mark=None, if_id: int = 0) -> bool:
        """Remove one ESP SA; False if there was none."""
        try:
            await self.sock.request(self._sa_id(dst, spi, mark, if_id), xfrm.XFRM_MSG_DELSA)
        except XfrmError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT):
                return False
            raise
        return True

    async def get_sa(self, dst, spi: int, *, mark=None, if_id: int = 0) -> Sa | None:
        try:
            got = await self.sock.request(self._sa_id(dst, spi, mark, if_id),
                                          xfrm.XFRM_MSG_GETSA)
        except XfrmError as e:
            if e.errno in (errno.ESRCH, errno.ENOENT):
                return None
            raise
        return sa_from(got[0]) if got else None

    async def sas(self) -> list[Sa]:
        got = await self.sock.dump(xfrm.xfrm_dump_request(), xfrm.XFRM_MSG_GETSA)
        return [sa_from(m) for m in got if isinstance(m, xfrm.xfrm_usersa_info)]
