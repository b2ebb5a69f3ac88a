"""The kernel dataplane: model.Dataplane on XFRM, with ownership by reqid and priority band.

Everything installed here carries a reqid in `reqid_band` and a priority in `priority_band`;
`start()` removes the agent's stale entries from a previous run (dump, then delete only what
is in the bands) and `stop()` removes what this run installed. Foreign policies and SAs (other
daemons, the administrator) are never touched, and a foreign policy with the same selector is
reported as a conflict instead of replaced.

Priorities (lower wins in XFRM), as offsets in the band:
  0   IPv6 neighbour discovery bypass (a trap on a /64 must not swallow NS/NA),
  16  SA pair policies (in/out, fwd in tunnel mode),
  32  shunts on a host pair (pass/drop/hold, with a lifetime),
  256 + 4*(128 - prefixlen) + (0 if port else 2) + (0 if proto else 1)  group policies:
      longest prefix first, then the more specific protocol/port (product.md §2).

Hold (product.md §3): the kernel queues the packets. `start()` sets the namespace's
`net.core.xfrm_larval_drop` to 0, so a packet that hits a trap or hold policy while its SA is
negotiated waits on that policy's queue (at most 100 packets per policy, purged after 60 s:
bounded per destination, since a hold shunt is a per-pair policy). Replacing the hold shunt by
the SA's (or the failure shunt's) out policy with UPDPOLICY moves the queue to the new policy
and sends it at once; packets queued on the group trap that caught the ACQUIRE are released
the same way by re-installing that trap unchanged (`release_held`). Under a drop shunt they are
dropped, under pass sent in the clear. An agent-side queue would need the packets in
userspace, which XFRM does not hand out; the larval queue is free and already bounded. The
previous sysctl value is restored by `stop()`. The negotiation's larval state is retired when
a failure shunt is set (ALLOCSPI with its seq, then DELSA), so a restored trap acquires again
at once rather than after `net.core.xfrm_acq_expires`.

Rekeying (RFC 7296 §2.8): a ChildSaParams with reqid 0 for a pair that already has an SA
takes that pair's reqid, so the in policy accepts both the old and the new SA while both
exist; policies are owned per selector, so deleting the old pair keeps the new one's.
"""
from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
from dataclasses import replace
from pathlib import Path

from oe_agent.model import (Acquire, Capabilities, ChildSaParams, EspAlgorithm, IPAddress,
                            IPNetwork, Mode, PolicyExpire, SaCounters, SaExpire, ShuntKind)
from oe_agent.trap import xfrm
from oe_agent.trap.kernel import (KernelAcquire, KernelPolicyExpire, Lifetime, Policy, SaSpec,
                                  Selector, Template, Xfrm, event_from)
from oe_agent.trap.netlink import EventsLost, XfrmError, XfrmEventSocket

DEFAULT_REQID_BASE = 0x0E0A0000
DEFAULT_PRIORITY_BASE = 0x0E0A0000
REQID_COUNT = 0x10000
PRIORITY_COUNT = 0x400
RANK_ND, RANK_SA, RANK_SHUNT, RANK_GROUP = 0, 16, 32, 256
SEAL_S = 120  # bound on a previous run's sealed SA pair policy (start() to the groups' traps)
LARVAL_DROP = Path("/proc/sys/net/core/xfrm_larval_drop")
UDP_ENCAP = 100  # linux/udp.h socket option
ICMPV6, ND_TYPES = 58, (135, 136)  # neighbour solicitation / advertisement (RFC 4861)
PROBE_ALGORITHMS = (
    (EspAlgorithm("aes-gcm-16", 128), 20, 0),
    (EspAlgorithm("aes-cbc", 128, "hmac-sha2-256-128"), 16, 32),
    (EspAlgorithm("chacha20-poly1305", 256), 36, 0),
)


class PolicyConflict(Exception):
    """A policy that is not the agent's already has this selector and direction."""


def group_rank(dst: IPNetwork, proto: int, port: int) -> int:
    """Longest prefix first, then proto+port over proto over any (product.md §2)."""
    return RANK_GROUP + 4 * (128 - dst.prefixlen) + (0 if port else 2) + (0 if proto else 1)


async def probe(x: Xfrm, reqid: int) -> Capabilities:
    """Add and delete a throwaway ESP SA per algorithm and family (product.md §6):
    EPROTONOSUPPORT = no ESP at all, ENOSYS = that algorithm is missing, success = it works.
    The SA uses documentation addresses and the band's probe reqid; no policy refers to it."""
    spi = 0xFFFF0000 | int.from_bytes(os.urandom(2), "big")
    works: set[str] = set()
    no_esp: list[str] = []
    missing: list[str] = []
    for src, dst in (("192.0.2.254", "192.0.2.253"), ("2001:db8::fe", "2001:db8::fd")):
        v = ipaddress.ip_address(src).version
        for alg, klen, ilen in PROBE_ALGORITHMS:
            name = alg.encr + (f"+{alg.integ}" if alg.integ else "")
            try:
                await x.add_sa(SaSpec(ipaddress.ip_address(src), ipaddress.ip_address(dst), spi,
                                      reqid, alg, bytes(klen), bytes(ilen)))
            except XfrmError as e:
                if e.errno == errno.EPROTONOSUPPORT:
                    no_esp.append(f"IPv{v}: {e.ext_ack or 'EPROTONOSUPPORT'}")
                    break
                if e.errno == errno.ENOSYS:
                    missing.append(f"{name} (IPv{v})")
                    continue
                raise
            await x.del_sa(dst, spi)
            if v == 4:
                works.update(n for n in (alg.encr, alg.integ) if n)
    if no_esp:
        return Capabilities(esp=False, algorithms=frozenset(),
                            detail="no ESP in this kernel (" + "; ".join(no_esp) + ")")
    if not works:
        return Capabilities(esp=False, algorithms=frozenset(),
                            detail="no ESP algorithm available: " + ", ".join(missing))
    return Capabilities(esp=True, algorithms=frozenset(works),
                        detail="full ESP support" if not missing
                        else "ESP; missing: " + ", ".join(missing))


def socket_bypass(sock: socket.socket) -> None:
    """Let this socket's own packets (IKE, DNS) pass every XFRM policy: a per-socket allow
    policy in both directions (IP_XFRM_POLICY / IPV6_XFRM_POLICY), as IKE daemons do, so an
    IKE or DNS packet to a trapped peer does not wait for the SA it is negotiating."""
    if sock.family == socket.AF_INET6:
        levels = [(socket.IPPROTO_IPV6, xfrm.IPV6_XFRM_POLICY, xfrm.AF_INET6, True),
                  (socket.IPPROTO_IP, xfrm.IP_XFRM_POLICY, xfrm.AF_INET, False)]
    else:
        levels = [(socket.IPPROTO_IP, xfrm.IP_XFRM_POLICY, xfrm.AF_INET, True)]
    for level, opt, fam, required in levels:
        for d in (xfrm.XFRM_POLICY_IN, xfrm.XFRM_POLICY_OUT):
            vals = {"sel_family": fam, "dir": d, "action": xfrm.XFRM_POLICY_ALLOW}
            vals.update(Lifetime().fields())
            try:
                sock.setsockopt(level, opt, xfrm.pack(xfrm.XFRM_USERPOLICY_INFO, vals))
            except OSError:
                if required:
                    raise
                # v4-mapped traffic on a v6-only socket: nothing to bypass


def enable_espinudp(sock: socket.socket) -> None:
    """Make a UDP socket (the IKE NAT-T socket on 4500) hand ESP-in-UDP to the kernel
    (UDP_ENCAP_ESPINUDP, RFC 3948): without it, encapsulated ESP is not decrypted on receive.
    Non-ESP packets (marker 0, IKE) still reach the socket."""
    sock.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, xfrm.UDP_ENCAP_ESPINUDP)


def _addr(a) -> IPAddress:
    return ipaddress.ip_address(a)


class KernelDataplane:
    """model.Dataplane on the kernel's XFRM, in the network namespace it is started in.

    Extra API beyond the protocol: `xfrm` (the lower-level `Xfrm`), `reqid_band`,
    `priority_band`, `capabilities`, `policies()`, `sas()`, `new_reqid()`.
    """

    def __init__(self, reqid_base: int = DEFAULT_REQID_BASE,
                 priority_base: int = DEFAULT_PRIORITY_BASE, larval_queue: bool = True,
                 nd_bypass: bool = True, adopt_sas: bool = False):
        """adopt_sas: at start keep the own SA pairs (and their policies) a previous run left
        with stop(keep_sas=True) — config `keep_sas_on_stop` — instead of removing them."""
        self.adopt_sas = adopt_sas
        self.adopted: list = []  # Sa values kept from an earlier run
        self._adopted_pairs: dict[tuple, set[int]] = {}  # (local, remote) -> kept reqids
        self._adopted_pols: dict[int, list[tuple]] = {}  # kept reqid -> its (sel, dir)
        self.reqid_band = range(reqid_base, reqid_base + REQID_COUNT)
        self.priority_band = range(priority_base, priority_base + PRIORITY_COUNT)
        self.trap_reqid = reqid_base  # the template of trap and hold policies
        self.probe_reqid = reqid_base + REQID_COUNT - 1
        self.larval_queue = larval_queue
        self.nd_bypass = nd_bypass
        self.xfrm: Xfrm | None = None
        self.capabilities: Capabilities | None = None
        self._events: XfrmEventSocket | None = None
        self._larval_fd: int | None = None  # the namespace's sysctl, opened at start
        self._larval_drop_before: bytes | None = None
        self._reqids = itertools.count(reqid_base + 1)
        self._groups: dict[tuple, str] = {}  # (dst, proto, port) -> trap|pass|block
        self._pairs: dict[tuple, tuple] = {}  # (local, remote) -> ("shunt", kind) | ("sa", key)
        self._owners: dict[tuple, object] = {}  # (sel, dir) -> "shunt" | SA key: who installed
        self._sas: dict[tuple, tuple] = {}  # (local, remote, spi_in) -> (params, policies)
        self._no_out: set[tuple] = set()  # keys of _sas whose outbound SA waits (add_outbound)
        self._allocated: set[tuple] = set()  # (dst, spi) made larval by ALLOCSPI
        self._acquire_seq: dict[tuple, tuple] = {}  # (src, dst) -> (seq, policy index)
        self._base: list[tuple] = []  # (sel, dir) of the ND bypass policies
        self._sealed: list[tuple] = []  # (sel, dir): a previous run's SA out policies, blocked
        self._kept: list[tuple] = []  # (sel, dir): blocks seal() leaves for the next run
        self.resyncs = 0  # times the event socket overflowed and state was re-read

    # --- life cycle -------------------------------------------------------------------------
    async def start(self) -> Capabilities:
        """Open the sockets (events first, so nothing is missed), enable the larval queue,
        probe ESP, remove own stale state, install the ND bypass."""
        self._events = await XfrmEventSocket.open()
        self.xfrm = await Xfrm.open()
        if self.larval_queue:
            # kept open: stop() writes to this namespace's value wherever it is called from
            self._larval_fd = os.open(LARVAL_DROP, os.O_RDWR | os.O_CLOEXEC)
            self._larval_drop_before = os.pread(self._larval_fd, 32, 0).strip()
            os.pwrite(self._larval_fd, b"0\n", 0)
        await self.reconcile(seal_pairs=True)
        self.capabilities = await probe(self.xfrm, self.probe_reqid)
        if self.nd_bypass:
            for t in ND_TYPES:
                for d in ("out", "in"):
                    sel = Selector(ipaddress.ip_network("::/0"), ipaddress.ip_network("::/0"),
                                   ICMPV6, t, 0)
                    await self._install(sel, d, RANK_ND, "allow")
                    self._base.append((sel, d))
        return self.capabilities

    async def stop(self, keep_sas: bool = False) -> None:
        """Remove everything this run installed; with keep_sas the SA pairs (and their
        policies) stay for a restart that adopts them."""
        if self.xfrm is None:
            return
        try:
            for key, kind in list(self._groups.items()):
                await self.remove_group_policy(*key)
            for (local, remote), owner in list(self._pairs.items()):
                if owner[0] == "shunt":
                    await self.clear_shunt(local, remote)
            if not keep_sas:
                for params, _pols in list(self._sas.values()):
                    await self.del_child_sa(params)
            for sel, d in self._base:
                await self.xfrm.del_policy(sel, d)
            self._base.clear()
            # a sweep by dump: adopted pairs and anything a failed call left go too
            await self.reconcile(keep_pairs=keep_sas, keep=set(self._kept))
            if self._larval_fd is not None:
                os.pwrite(self._larval_fd, self._larval_drop_before + b"\n", 0)
        finally:
            if self._larval_fd is not None:
                os.close(self._larval_fd)
                self._larval_fd = None
            self.xfrm.close()
            self.xfrm = None
            if self._events is not None:
                self._events.close()
                self._events = None

    def own_policy(self, p: Policy) -> bool:
        return p.priority in self.priority_band

    def own_reqid(self, reqid: int) -> bool:
        return reqid in self.reqid_band

    async def reconcile(self, keep_pairs: bool | None = None, seal_pairs: bool = False,
                        keep: set = frozenset()) -> tuple[int, int]:
        """Delete own policies and SAs left from an earlier run; foreign ones stay. With
        keep_pairs (default: adopt_sas) own SA pairs and their policies stay (`adopted`).
        With seal_pairs (at start) an SA pair's out policy that does not stay becomes a block
        policy in place (SEAL_S lifetime) until a group policy covering its peer is installed:
        the pair's traffic, encrypted until now (a stop with keep_sas), is dropped rather than
        sent in clear before the groups' traps are back. `keep`: (selector, dir) of own
        policies that stay. Returns (policies removed or sealed, SAs removed)."""
        np = ns = 0
        sas = await self.xfrm.sas()
        keep_pols, keep = keep, set()
        if self.adopt_sas if keep_pairs is None else keep_pairs:
            self.adopted = [sa for sa in sas if self.own_reqid(sa.reqid) and not sa.larval
                            and sa.reqid not in (self.trap_reqid, self.probe_reqid)]
            keep = {sa.reqid for sa in self.adopted}
            if keep:  # new pairs take reqids above the adopted ones
                self._reqids = itertools.count(max(keep) + 1)
        for p in await self.xfrm.policies():
            if not self.own_policy(p) or (p.sel, p.dir) in keep_pols:
                continue
            if (p.priority == self._prio(RANK_SA) and p.templates
                    and all(t.reqid in keep for t in p.templates)):
                for t in p.templates:
                    self._adopted_pols.setdefault(t.reqid, []).append((p.sel, p.dir))
                if (p.dir == "out" and p.sel.src.num_addresses == 1
                        and p.sel.dst.num_addresses == 1):
                    pair = (p.sel.src.network_address, p.sel.dst.network_address)
                    self._adopted_pairs.setdefault(pair, set()).update(
                        t.reqid for t in p.templates)
                continue
            if (seal_pairs and p.priority == self._prio(RANK_SA) and p.dir == "out"
                    and p.sel.src.num_addresses == 1 and p.sel.dst.num_addresses == 1
                    and not p.mark and not p.if_id):
                await self.xfrm.add_policy(p.sel, "out", priority=p.priority, action="block",
                                           lifetime=Lifetime(hard_s=SEAL_S), update=True)
                self._sealed.append((p.sel, "out"))
                np += 1
                continue
            if await self.xfrm.del_policy(p.sel, p.dir, mark=p.mark, if_id=p.if_id):
                np += 1
        for sa in sas:
            # larval states (SPI 0) are not addressable; the kernel expires them itself
            if (self.own_reqid(sa.reqid) and sa.spi and not (sa.reqid in keep and not sa.larval)
                    and await self.xfrm.del_sa(sa.dst, sa.spi, mark=sa.mark, if_id=sa.if_id)):
                ns += 1
        return np, ns

    def adopted_peers(self) -> list[tuple[IPAddress, IPAddress]]:
        """(local, remote) of the SA pairs kept from the previous run that still carry
        traffic: the agent renews each with a fresh IKE SA (it has none for them)."""
        return list(self._adopted_pairs)

    async def release_adopted(self, local: IPAddress, remote: IPAddress) -> bool:
        """Remove the pair's kept SAs and those of their policies this run has not since
        taken over (a new SA pair's, a shunt's). add_child_sa and set_shunt call it for
        their pair: a renewed pair replaces the kept one at once. True if there was one."""
        reqids = self._adopted_pairs.pop((_addr(local), _addr(remote)), None)
        if not reqids:
            return False
        for sa in [sa for sa in self.adopted if sa.reqid in reqids]:
            self.adopted.remove(sa)
            await self.xfrm.del_sa(sa.dst, sa.spi, mark=sa.mark, if_id=sa.if_id)
        for r in reqids:
            for sel, d in self._adopted_pols.pop(r, []):
                if (sel, d) in self._owners:
                    continue
                cur = await self.xfrm.get_policy(sel, d)
                if (cur is not None and self.own_policy(cur) and cur.templates
                        and all(t.reqid in reqids for t in cur.templates)):
                    await self.xfrm.del_policy(sel, d)
        return True

    async def seal(self, local: IPAddress, remote: IPAddress) -> None:
        """Fail closed across a restart (issue 5 acceptance 1): a block policy on the host pair
        (its SAs already gone) that stop() leaves behind, bounded by SEAL_S in the kernel. The
        next start keeps it until a group policy covers the peer again, so a `private` peer's
        traffic is never sent in clear while no agent runs."""
        local, remote = _addr(local), _addr(remote)
        sel = Selector.pair(local, remote)
        await self._install(sel, "out", RANK_SA, "block", lifetime=Lifetime(hard_s=SEAL_S))
        self._pairs.pop((local, remote), None)  # no longer a shunt or SA of this run
        self._owners.pop((sel, "out"), None)
        self._kept.append((sel, "out"))

    async def _unseal(self, dst: IPNetwork) -> None:
        """A group policy now covers dst: the sealed pairs whose peer is in it go (unless this
        run has put its own SA or shunt there since)."""
        for sel, d in [sp for sp in self._sealed
                       if sp[0].dst.version == dst.version and sp[0].dst.subnet_of(dst)]:
            self._sealed.remove((sel, d))
            if (sel, d) not in self._owners:
                await self._remove(sel, d)

    def new_reqid(self) -> int:
        """A fresh reqid from the band for one Child SA pair."""
        r = next(self._reqids)
        if r >= self.probe_reqid:
            self._reqids = itertools.count(self.reqid_band.start + 1)
            r = next(self._reqids)
        return r

    # --- policy helpers ---------------------------------------------------------------------
    def _prio(self, rank: int) -> int:
        return self.priority_band.start + rank

    async def _install(self, sel: Selector, d: str, rank: int, action: str,
                       templates: tuple[Template, ...] = (), lifetime: Lifetime = Lifetime()):
        """NEWPOLICY; on EEXIST replace it only if the existing one is ours."""
        kw = dict(priority=self._prio(rank), action=action, templates=templates,
                  lifetime=lifetime)
        try:
            await self.xfrm.add_policy(sel, d, **kw)
        except XfrmError as e:
            if e.errno != errno.EEXIST:
                raise
            cur = await self.xfrm.get_policy(sel, d)
            if cur is not None and not self.own_policy(cur):
                raise PolicyConflict(f"a foreign policy (priority {cur.priority}) already "
                                     f"covers {sel} dir {d}") from None
            await self.xfrm.add_policy(sel, d, update=True, **kw)

    async def _remove(self, sel: Selector, d: str) -> None:
        cur = await self.xfrm.get_policy(sel, d)
        if cur is not None and self.own_policy(cur):
            await self.xfrm.del_policy(sel, d)

    def _trap_template(self, family: int) -> tuple[Template, ...]:
        return (Template(reqid=self.trap_reqid, family=family),)

    # --- group policies ---------------------------------------------------------------------
    async def _group(self, kind: str, dst, proto: int, port: int) -> None:
        dst = ipaddress.ip_network(dst, strict=False)
        if port and proto not in (6, 17, 132, 33, 1, 58):
            raise ValueError(f"port {port} given for protocol {proto}, which has no ports")
        key = (dst, proto, port)
        old = self._groups.get(key)
        if old is not None and old != kind:
            await self.remove_group_policy(dst, proto, port)
        sel = Selector.to(dst, proto, port)
        rank = group_rank(dst, proto, port)
        if kind == "trap":
            await self._install(sel, "out", rank, "allow", self._trap_template(sel.family))
        elif kind == "pass":
            await self._install(sel, "out", rank, "allow")
        else:  # block both directions (product.md §2)
            await self._install(sel, "out", rank, "block")
            await self._install(sel.reversed(), "in", rank, "block")
        self._groups[key] = kind
        if self._sealed:
            await self._unseal(dst)

    async def set_trap(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None:
        """Out policy with an ESP template: the first packet makes the kernel send ACQUIRE."""
        await self._group("trap", dst, proto, port)

    async def set_pass(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None:
        await self._group("pass", dst, proto, port)

    async def set_block(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None:
        await self._group("block", dst, proto, port)

    async def remove_group_policy(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None:
        dst = ipaddress.ip_network(dst, strict=False)
        kind = self._groups.pop((dst, proto, port), None)
        sel = Selector.to(dst, proto, port)
        await self._remove(sel, "out")
        if kind in (None, "block"):
            await self._remove(sel.reversed(), "in")

    # --- shunts -----------------------------------------------------------------------------
    async def set_shunt(self, local: IPAddress, remote: IPAddress, kind: ShuntKind,
                        lifetime_s: int) -> None:
        """A /32 (/128) out policy for the pair with a hard lifetime (0 = none): pass = clear,
        drop = block, hold = a template, so packets wait on its larval queue. Its POLEXPIRE
        (hard) comes out of events(); the group policy underneath applies again by itself."""
        local, remote = _addr(local), _addr(remote)
        sel = Selector.pair(local, remote)
        kind = ShuntKind(kind)
        if kind is ShuntKind.HOLD:
            action, tmpl = "allow", self._trap_template(sel.family)
        else:
            action, tmpl = ("block" if kind is ShuntKind.DROP else "allow"), ()
        await self._install(sel, "out", RANK_SHUNT, action, tmpl, Lifetime(hard_s=lifetime_s))
        self._pairs[(local, remote)] = ("shunt", kind)
        self._owners[(sel, "out")] = "shunt"
        if self._adopted_pairs:  # the renewal failed (or the kept pair is dead): it goes
            await self.release_adopted(local, remote)
        if kind is not ShuntKind.HOLD:  # held packets follow the failure shunt (§3)
            await self._retire_larval(local, remote)
            await self.release_held(local, remote)

    async def _retire_larval(self, local: IPAddress, remote: IPAddress) -> None:
        """The negotiation is over without an SA: remove the ACQUIRE's larval state, or the
        kernel would treat the pair as "acquire in progress" (no new ACQUIRE) until
        xfrm_acq_expires, and a restored trap would stay silent. A larval state has SPI 0 and
        cannot be named by DELSA, so it first gets an SPI through ALLOCSPI with its seq."""
        seq_index = self._acquire_seq.get((local, remote))
        if seq_index is None or not seq_index[0]:
            return
        try:
            spi = await self.xfrm.alloc_spi(local, remote, seq=seq_index[0],
                                            reqid=self.trap_reqid)
        except XfrmError:
            return  # already gone
        await self.xfrm.del_sa(remote, spi)

    async def release_held(self, local: IPAddress, remote: IPAddress) -> bool:
        """Send the packets the kernel holds for this pair now rather than on its next retry.

        Packets held on a policy's queue are looked up again when that policy is replaced
        (UPDPOLICY requeues them at once). A hold shunt is replaced by the SA's or the failure
        shunt's policy anyway; for a group trap that caught the ACQUIRE, the trap is
        re-installed unchanged. True if a trap was re-installed."""
        local, remote = _addr(local), _addr(remote)
        seq_index = self._acquire_seq.pop((local, remote), None)
        if seq_index is None or not seq_index[1]:
            return False
        pol = await self.xfrm.get_policy_by_index(seq_index[1], "out")
        if (pol is None or not self.own_policy(pol) or pol.lifetime != Lifetime()
                or pol.priority < self._prio(RANK_GROUP)):
            return False  # gone, foreign, a shunt (has its own lifetime) or not a group trap
        await self.xfrm.add_policy(pol.sel, "out", priority=pol.priority, action=pol.action,
                                   templates=pol.templates, update=True)
        return True

    async def clear_shunt(self, local: IPAddress, remote: IPAddress) -> None:
        """Remove the pair's shunt (not an SA policy that replaced it)."""
        local, remote = _addr(local), _addr(remote)
        if self._pairs.get((local, remote), ("shunt",))[0] == "shunt":
            self._pairs.pop((local, remote), None)
        sel = Selector.pair(local, remote)
        if self._owners.get((sel, "out"), "shunt") == "shunt":
            self._owners.pop((sel, "out"), None)
            await self._remove(sel, "out")

    # --- SAs --------------------------------------------------------------------------------
    async def alloc_spi(self, local: IPAddress, remote: IPAddress, seq: int = 0) -> int:
        """SPI for the inbound SA (remote -> local). `seq` (an ACQUIRE's) goes with the request;
        the kernel uses it when a larval state with that seq has this destination."""
        local, remote = _addr(local), _addr(remote)
        spi = await self.xfrm.alloc_spi(remote, local, seq=seq, reqid=self.trap_reqid)
        self._allocated.add((local, spi))
        return spi

    def _specs(self, p: ChildSaParams) -> tuple[SaSpec, SaSpec]:
        life = Lifetime(p.lifetime_soft_s, p.lifetime_hard_s, p.lifetime_soft_bytes,
                        p.lifetime_hard_bytes, p.lifetime_soft_packets, p.lifetime_hard_packets)
        enc_in = enc_out = None
        if p.encap is not None:
            enc_out = (p.encap[0], p.encap[1])  # our packets: from local port to remote port
            enc_in = (p.encap[1], p.encap[0])
        sel_out = sel_in = None
        if p.mode is Mode.TRANSPORT:
            sel_out = Selector.pair(p.local, p.remote)
            sel_in = sel_out.reversed()
        seq = self._acquire_seq.get((p.local, p.remote), (0, 0))[0]
        out = SaSpec(p.local, p.remote, p.spi_out, p.reqid, p.alg, p.encr_key_out,
                     p.integ_key_out, p.mode, sel_out, enc_out, p.esn,
                     # an ESN SA needs a window even outbound (kernels without XFRMA_SA_DIR)
                     p.replay_window if p.esn else 0, life, seq)
        inb = SaSpec(p.remote, p.local, p.spi_in, p.reqid, p.alg, p.encr_key_in,
                     p.integ_key_in, p.mode, sel_in, enc_in, p.esn, p.replay_window, life)
        return inb, out

    def _policy_selectors(self, p: ChildSaParams) -> list[tuple[Selector, str]]:
        """(selector, dir) of the pair's policies: out local->remote, in (and fwd in tunnel
        mode) remote->local; one set per TS pair of the same family (RFC 7296 §2.9)."""
        locs = p.ts_local or ()
        rems = p.ts_remote or ()
        pairs = []
        if not locs or not rems:
            pairs.append(Selector.pair(p.local, p.remote))
        else:
            for tl in locs:
                for tr in rems:
                    if tl.version != tr.version:
                        continue
                    proto = tl.proto or tr.proto
                    pairs.append(Selector(tl.network(), tr.network(), proto,
                                          _single_port(tl), _single_port(tr)))
        if not pairs:
            raise ValueError("traffic selectors have no pair of one address family")
        out = []
        for sel in pairs:
            out.append((sel, "out"))
            out.append((sel.reversed(), "in"))
            if p.mode is Mode.TUNNEL:
                out.append((sel.reversed(), "fwd"))
        return out

    async def add_child_sa(self, params: ChildSaParams, outbound: bool = True) -> None:
        """Both SAs of the pair, then their policies (replacing a shunt on the pair). An SPI
        from alloc_spi is filled in (UPDSA); the outbound SA carries the pair's ACQUIRE seq so
        the kernel retires that larval state. On failure nothing of this pair stays.
        outbound=False: no outbound SA yet (`add_outbound`): a rekey keeps the reqid, and the
        kernel sends on the newest outbound SA of a reqid, which the peer may not have yet."""
        if params.reqid == 0:
            # a rekey keeps its pair's reqid (RFC 7296 §2.8: the old SA still receives while
            # the new one is installed, and an in policy names the reqid it accepts)
            pols = self._policy_selectors(params)
            same = [p for p, sels in self._sas.values()
                    if (p.local, p.remote) == (params.local, params.remote) and sels == pols]
            params = replace(params, reqid=same[-1].reqid if same else self.new_reqid())
        if not self.own_reqid(params.reqid) or params.reqid in (self.trap_reqid,
                                                                self.probe_reqid):
            raise ValueError(f"reqid {params.reqid:#x} is outside the agent's band "
                             f"{self.reqid_band.start:#x}..{self.reqid_band.stop - 2:#x}")
        local, remote = _addr(params.local), _addr(params.remote)
        inb, out = self._specs(params)
        pols = self._policy_selectors(params)
        key = (local, remote, params.spi_in)
        done_sas: list[tuple] = []
        done_pols: list[tuple] = []
        before = {sp: self._owners.get(sp) for sp in pols}
        try:
            if (local, params.spi_in) in self._allocated:
                try:
                    await self.xfrm.add_sa(inb, update=True)
                except XfrmError as e:  # the larval state timed out (xfrm_acq_expires)
                    if e.errno not in (errno.ESRCH, errno.ENOENT):
                        raise
                    await self.xfrm.add_sa(inb)
            else:
                await self.xfrm.add_sa(inb)
            done_sas.append((local, params.spi_in))
            if outbound:
                await self.xfrm.add_sa(out)
                done_sas.append((remote, params.spi_out))
            # in (and fwd) before out: the out policy is what sends, held packets included,
            # and until the in policy exists a plaintext answer to them would be accepted
            for sel, d in sorted(pols, key=lambda sp: sp[1] == "out"):
                await self._install(sel, d, RANK_SA, "allow", (self._template(params, d),))
                done_pols.append((sel, d))
        except BaseException:
            for sel, d in done_pols:
                if before[(sel, d)] not in self._sas:  # an SA's identical policy stays
                    await self._remove(sel, d)
                    self._owners.pop((sel, d), None)
            for dst, spi in done_sas:
                await self.xfrm.del_sa(dst, spi)
            raise
        self._allocated.discard((local, params.spi_in))
        for sp in pols:
            self._owners[sp] = key
        await self.release_held(local, remote)
        self._sas[key] = (params, pols)
        if not outbound:
            self._no_out.add(key)
        self._pairs[(local, remote)] = ("sa", key)
        if self._adopted_pairs:  # a renewed pair replaces the one kept by the previous run
            await self.release_adopted(local, remote)

    async def add_outbound(self, params: ChildSaParams) -> None:
        key = (_addr(params.local), _addr(params.remote), params.spi_in)
        if key in self._no_out and key in self._sas:
            # the pair as installed: its reqid (the caller's may be 0, "take one")
            await self.xfrm.add_sa(self._specs(self._sas[key][0])[1])
            self._no_out.discard(key)

    async def del_outbound(self, params: ChildSaParams) -> None:
        """Stop sending on a pair that is going (its inbound SA stays for what is in flight):
        the kernel then sends on the other pair of the same reqid."""
        key = (_addr(params.local), _addr(params.remote), params.spi_in)
        if key in self._sas and key not in self._no_out:
            await self.xfrm.del_sa(key[1], params.spi_out)
            self._no_out.add(key)

    def _template(self, params: ChildSaParams, d: str) -> Template:
        local, remote = _addr(params.local), _addr(params.remote)
        src, dst = (local, remote) if d == "out" else (remote, local)
        return Template(reqid=params.reqid, mode=params.mode, src=src, dst=dst,
                        family=xfrm.family_of(dst))

    async def del_child_sa(self, params: ChildSaParams) -> None:
        """Remove the pair's policies (if still this SA's) and both SAs.

        A policy this pair owns while another pair of ours with the same selector remains
        (two IKE SAs' pairs side by side, the newer one deleted first) passes to that pair
        instead of going: removing it would leave the remaining SAs without policies, so the
        host would answer their ESP in clear."""
        local, remote = _addr(params.local), _addr(params.remote)
        key = (local, remote, params.spi_in)
        entry = self._sas.pop(key, None)
        pols = entry[1] if entry else self._policy_selectors(params)
        # the inbound SA first: from then on nothing of the peer's is decrypted, so nothing
        # is answered in clear once the out policy is gone
        await self.xfrm.del_sa(local, params.spi_in)
        for sp in pols:
            owner = self._owners.get(sp)
            # policies since taken over (a rekeyed pair, a shunt) belong to their new owner
            if owner is not None and owner != key:
                continue
            heir = next((k for k, (_p, sels) in reversed(self._sas.items()) if sp in sels), None)
            if heir is not None:
                await self._install(*sp, RANK_SA, "allow", (self._template(self._sas[heir][0],
                                                                           sp[1]),))
                self._owners[sp] = heir
                if sp[1] == "out":
                    self._pairs[(local, remote)] = ("sa", heir)
                continue
            self._owners.pop(sp, None)
            await self._remove(*sp)
        if self._pairs.get((local, remote)) == ("sa", key):
            self._pairs.pop((local, remote), None)
        if key in self._no_out:
            self._no_out.discard(key)
        else:
            await self.xfrm.del_sa(remote, params.spi_out)

    async def counters(self) -> list[SaCounters]:
        """Bytes/packets of every own SA (larval states left out)."""
        return [SaCounters(spi=sa.spi, dst=sa.dst, bytes=sa.bytes, packets=sa.packets,
                           use_time=sa.use_time)
                for sa in await self.xfrm.sas() if self.own_reqid(sa.reqid) and not sa.larval]

    async def policies(self) -> list[Policy]:
        return [p for p in await self.xfrm.policies() if self.own_policy(p)]

    async def sas(self):
        return [sa for sa in await self.xfrm.sas() if self.own_reqid(sa.reqid)]

    # --- events -----------------------------------------------------------------------------
    def _own_event(self, ev) -> bool:
        if isinstance(ev, KernelAcquire):
            return any(self.own_reqid(t.reqid) for t in ev.templates) or (
                ev.priority in self.priority_band)
        if isinstance(ev, SaExpire):
            return self.own_reqid(ev.reqid) and ev.reqid != self.probe_reqid
        if isinstance(ev, KernelPolicyExpire):
            return ev.priority in self.priority_band
        return True

    def _note(self, ev) -> None:
        if isinstance(ev, Acquire):
            self._acquire_seq[(_addr(ev.src), _addr(ev.dst))] = (ev.seq, ev.policy_index)
        elif isinstance(ev, PolicyExpire) and ev.hard:
            if ev.src.num_addresses == 1 and ev.dst.num_addresses == 1:
                pair = (ev.src.network_address, ev.dst.network_address)
                if self._pairs.get(pair, ("",))[0] == "shunt":
                    self._pairs.pop(pair, None)
                sel = Selector.pair(*pair)
                if self._owners.get((sel, "out")) == "shunt":
                    self._owners.pop((sel, "out"), None)

    async def _resync(self) -> list:
        """After lost events: a larval state of ours is an ACQUIRE not yet seen; a shunt or SA
        we track that the kernel no longer has expired (hard). An ACQUIRE the kernel could not
        deliver leaves no larval state, so the next packet of that flow acquires again."""
        out: list = []
        sas = await self.xfrm.sas()
        have = {(sa.dst, sa.spi) for sa in sas}
        for sa in sas:
            if sa.larval and sa.spi == 0 and sa.reqid == self.trap_reqid:
                sel = sa.sel
                out.append(KernelAcquire(src=sel.src.network_address,
                                         dst=sel.dst.network_address, proto=sel.proto,
                                         sport=sel.sport, dport=sel.dport, seq=sa.seq,
                                         selector=sel,
                                         templates=self._trap_template(sel.family)))
        for (local, remote, spi_in), (params, _p) in list(self._sas.items()):
            for dst, spi in ((local, spi_in), (remote, params.spi_out)):
                if (dst, spi) not in have:
                    out.append(SaExpire(spi=spi, dst=dst, hard=True, reqid=params.reqid))
        pols = {(p.sel, p.dir) for p in await self.xfrm.policies() if self.own_policy(p)}
        for (local, remote), owner in list(self._pairs.items()):
            if owner[0] == "shunt":
                sel = Selector.pair(local, remote)
                if (sel, "out") not in pols:
                    out.append(PolicyExpire(src=sel.src, dst=sel.dst, index=0, hard=True))
        return out

    def events(self) -> "EventStream":
        """ACQUIRE/EXPIRE/POLEXPIRE of the agent's own state, as model events; after an
        overflow (ENOBUFS) the same, synthesised from a dump. One consumer at a time."""
        if self._events is None:
            raise RuntimeError("KernelDataplane.events() before start()")
        return EventStream(self)


class EventStream:
    """The iterator `KernelDataplane.events()` returns. Unlike an async generator, it stays
    usable when a `wait_for(stream.__anext__(), t)` times out: a cancelled wait loses nothing
    (messages stay in the socket or the ready list; an interrupted resync is redone)."""

    def __init__(self, dp: KernelDataplane):
        self._dp = dp
        self._ready: list = []
        self._resync = False
        self._closed = False

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Acquire | SaExpire | PolicyExpire:
        dp = self._dp
        while True:
            if self._ready:
                return self._ready.pop(0)
            if self._closed or dp._events is None:
                raise StopAsyncIteration
            if self._resync:
                evs = await dp._resync()
                self._resync = False
            else:
                try:
                    m = await dp._events.next()
                except ConnectionError:
                    raise StopAsyncIteration from None
                if isinstance(m, EventsLost):
                    dp.resyncs += 1
                    self._resync = True
                    continue
                evs = [event_from(m)]
            for ev in evs:
                if ev is not None and dp._own_event(ev):
                    dp._note(ev)
                    self._ready.append(ev)

    async def aclose(self) -> None:
        self._closed = True


def _single_port(ts) -> int:
    if ts.port_start == 0 and ts.port_end == 65535:
        return 0
    if ts.port_start == ts.port_end:
        return ts.port_start
    raise ValueError(f"port range {ts.port_start}-{ts.port_end}: XFRM selectors take one port "
                     f"or any")


async def run_probe() -> Capabilities:
    """Probe this namespace's kernel without installing anything else."""
    x = await Xfrm.open()
    try:
        return await probe(x, DEFAULT_REQID_BASE + REQID_COUNT - 1)
    finally:
        x.close()
