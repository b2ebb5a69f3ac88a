"""The userspace dataplane: oe_agent.model.Dataplane over the TUN device `oe0` (product.md §6).

Routing (all in the dataplane's own table and rules, nothing in `main`):
  pref P      fwmark MARK, udp sport/dport 500 and 4500, ESP  -> lookup main   (our own traffic:
              IKE, ESP-in-UDP, raw ESP and re-injected clear packets never loop into oe0)
  pref P+5    to NET [ipproto X dport Y]                      -> lookup main   (pass with a port)
  pref P+10   lookup TABLE: NET dev oe0 (trap, block, installed SAs), `throw NET` (pass: a
              route exception, so clear traffic never enters userspace)
A packet read from oe0 goes to the newest Child SA covering it, else to the shunt on its
destination (pass = sent clear through a marked raw socket, drop, hold), else to the longest-
prefix group policy: trap = Acquire (with the packet) + hold, block = drop.
Inbound ESP (UDP 4500 via `esp_received`, or raw protocol 50) is unprotected and written to oe0.
The oe0 MTU leaves room for ESP; a packet still too big for the path with DF set (or IPv6) is
answered with ICMP "fragmentation needed" / ICMPv6 "packet too big" (RFC 1191, RFC 8201).
Transport mode reassembles the host's own fragments first (it protects whole datagrams only).
A pass shunt (negotiation or failure) is a /32 or /128 `throw` route, so it overrides the trap
route of its group; hold = a bounded queue per destination, released through the SA when it is
added, sent clear when the shunt becomes pass, dropped when it becomes drop or expires.
Inbound, as XFRM's `in` policies: inbound.py drops clear packets from blocked sources and from
peers that have an SA with one nftables table of ours (needs `nft`; port-specific blocks are
outbound only). SAs live in this process and go with it (`stop(keep_sas=True)` cannot keep them).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import inspect
import itertools
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from oe_agent.errors import UserError
from oe_agent.esp import packet
from oe_agent.esp.inbound import NftInbound, effective_block
from oe_agent.esp.sa import ALGORITHMS, ChildSa, EspError
from oe_agent.esp.tun import TunDevice
from oe_agent.esp.udp import SO_MARK, RawEsp, UdpEncap, open_socket
from oe_agent.model import (Acquire, Capabilities, ChildSaParams, IPAddress, IPNetwork,
                            PolicyExpire, SaCounters, SaExpire, ShuntKind)

log = logging.getLogger(__name__)

TRAP, BLOCK, PASS = "trap", "block", "pass"
EARLY_MAX, EARLY_S = 64, 2.0  # ESP kept from a peer we negotiate with, for an SA not in yet
ACQUIRE_EXPIRES = 30.0  # like XFRM_ACQ_EXPIRES: one Acquire per destination per 30 s
TUN_QUEUE = 8192  # packets the kernel queues on oe0 for us (an ACQUIRE storm's first packets)
# worst-case ESP-in-UDP overhead over IPv6: outer IPv6 40 + UDP 8 + ESP 8 + IV 16 + pad 15 +
# trailer 2 + ICV 16 = 105; the oe0 MTU keeps local packets within the underlay MTU.
MAX_OVERHEAD = 105

Sender = Callable[[bytes, tuple, tuple], None]  # (data, (local, port), (remote, port))


@dataclass
class _Shunt:
    local: IPAddress
    kind: ShuntKind
    expires: float | None


@dataclass
class _Held:
    packets: collections.deque
    since: float


class UserspaceDataplane:
    """ESP in this process over TUN `ifname`. `udp_sender` is the IKE adapter's port-4500 send
    function (`attach_udp`); without one, `own_udp=True` opens our own 4500 sockets."""

    def __init__(self, *, ifname: str = "oe0", table: int = 28517, rule_pref: int = 2200,
                 mark: int = 0x4F45, underlay_mtu: int = 1500, hold_max: int = 32,
                 hold_destinations: int = 4096, batch: int = 64, own_udp: bool = True,
                 udp_port: int = 4500, raw_esp: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[int], bytes] = os.urandom):
        if not 1280 + MAX_OVERHEAD <= underlay_mtu <= 65535:
            raise UserError(f"underlay MTU {underlay_mtu}: needs {1280 + MAX_OVERHEAD}..65535 "
                            "(IPv6 needs 1280 inside the tunnel)")
        self.ifname, self.table, self.pref, self.mark = ifname, table, rule_pref, mark
        self.underlay_mtu = underlay_mtu
        self.mtu = underlay_mtu - MAX_OVERHEAD
        self.hold_max, self.hold_destinations, self.batch = hold_max, hold_destinations, batch
        self.own_udp, self.udp_port, self.want_raw_esp = own_udp, udp_port, raw_esp
        self.clock, self.rng = clock, rng
        self.stats: collections.Counter[str] = collections.Counter()
        self._tun: TunDevice | None = None
        self._ipr = None
        self._ifindex = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp_send: Sender | None = None
        self._udp: UdpEncap | None = None
        self._raw: RawEsp | None = None
        self._clear: dict[int, socket.socket] = {}
        self._events: asyncio.Queue = asyncio.Queue()
        self._wake = asyncio.Event()
        self._timer: asyncio.Task | None = None
        # state
        self._sa_in: dict[int, ChildSa] = {}
        self._sa_host: dict[bytes, list[ChildSa]] = {}  # single-address ts_remote, packed
        self._sa_nets: list[ChildSa] = []  # wider ts_remote (tunnel mode gateways)
        self._policies: dict[tuple[IPNetwork, int, int], str] = {}
        self._by_net: dict[IPNetwork, dict[tuple[int, int], str]] = {}  # net -> (proto, port)
        self._shunts: dict[IPAddress, _Shunt] = {}
        self._held: dict[IPAddress, _Held] = {}
        self._acquiring: dict[IPAddress, float] = {}
        self._routes: dict[IPNetwork, str] = {}  # what the table holds: "oe0" or "throw"
        self._wide_routes: collections.Counter[tuple[int, int]] = collections.Counter()
        self._sa_routes: collections.Counter[IPNetwork] = collections.Counter()
        self._port_rules: set[tuple[IPNetwork, int, int]] = set()
        self._dirty: set[IPNetwork] = set()  # routes to re-sync at the next flush
        self._defer = 0  # > 0 inside coalesce(): the kernel side waits for its end
        self._flush_lock = asyncio.Lock()
        # (when, seq, kind, key, obj): SA lifetimes, shunt expiry, acquires; an entry whose
        # obj is no longer the live one is stale and skipped (no O(state) walk per wakeup)
        self._deadlines: list[tuple[float, int, str, object, object]] = []
        self._seq = itertools.count()
        # group policies by (version, prefix length, network as int): a lookup per prefix
        # length present, without building ip_network objects on the packet path
        self._by_key: dict[tuple[int, int, int], dict[tuple[int, int], str]] = {}
        self._plens: dict[int, list[int]] = {4: [], 6: []}
        self.raw_esp = False
        self._reassembler = packet.Reassembler()
        self._rules_installed = False
        self._spi_reserved: dict[int, None] = {}  # insertion-ordered, bounded
        # spi -> [(arrival, esp, addr)]: the peer's first ESP can overtake our install (it may
        # send once it has answered IKE_AUTH, while we still check its AUTH); bounded in all,
        # kept EARLY_S, then counted as unknown SPI
        self._early: dict[int, list[tuple[float, bytes, tuple]]] = {}
        self._early_count = 0
        self._inbound = NftInbound(ifname, (500, 4500, udp_port))
        self._in_applied: set[IPNetwork] | None = set()  # the nft `sa` sets now (None: unknown)
        self._in_dirty = False
        self._wide_sa_nets = 0  # SA networks wider than one address (their /32s may overlap)
        self.inbound_block = False  # nftables drops clear packets from blocked sources
        self._blocked_in: list[IPNetwork] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Capabilities:
        """Create oe0, our rules and sockets; leftovers of a crashed run (our rules, our table)
        are removed first. UserError, with nothing left behind, if any step fails."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._start()
        except (OSError, UserError, Exception) as e:
            await self.stop()
            if isinstance(e, UserError):
                raise
            raise UserError(f"userspace dataplane: cannot start: {e}") from None
        return Capabilities(esp=True, algorithms=frozenset(ALGORITHMS),
                            detail=f"userspace ESP over TUN {self._tun.name} (mtu {self.mtu}"
                                   f"{', raw ESP' if self.raw_esp else ''}, ESP-in-UDP, "
                                   f"inbound block: {'nftables' if self.inbound_block else 'none'})")

    async def _start(self) -> None:
        from pyroute2 import AsyncIPRoute  # only here: the sans-I/O parts never need it
        self._tun = TunDevice(self.ifname)
        self._ipr = AsyncIPRoute()
        self._ifindex = (await self._ipr.link_lookup(ifname=self._tun.name))[0]
        # no link-local address, so the host sends no router solicitations or MLD into oe0;
        # rp_filter off: inbound packets appear on oe0 from addresses routed elsewhere too
        for path, value in ((f"/proc/sys/net/ipv6/conf/{self.ifname}/addr_gen_mode", "1"),
                            (f"/proc/sys/net/ipv6/conf/{self.ifname}/disable_ipv6", "0"),
                            (f"/proc/sys/net/ipv4/conf/{self.ifname}/rp_filter", "0")):
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as e:
                log.warning("cannot set %s: %s", path, e)
        # the TUN ring (txqueuelen, 500 by default) holds what the host sent while this loop
        # was busy: a burst of first packets to new destinations must not be dropped there
        await self._ipr.link("set", index=self._ifindex, mtu=self.mtu, txqlen=TUN_QUEUE,
                             state="up")
        await self._remove_rules()  # a crashed run's rules (ours by priority and table)
        for fam in (socket.AF_INET, socket.AF_INET6):
            await self._ipr.flush_routes(table=self.table, family=fam)
        self._rules_installed = True
        await self._install_rules()
        self.inbound_block = await self._inbound.start()
        if not self.inbound_block:
            log.warning("no inbound half of block (%s): only what this host sends is blocked",
                        self._inbound.error)
        for fam in (socket.AF_INET, socket.AF_INET6):
            s = open_socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
            if s is None:
                continue
            self._clear[fam] = s
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            s.setblocking(False)
        if self.want_raw_esp:
            try:
                self._raw = RawEsp(self.esp_received, self.mark, self.batch)
                self._raw.open(self._loop)
                self.raw_esp = True
            except OSError as e:
                log.info("no raw ESP sockets (%s): ESP-in-UDP only", e)
                self._raw.close(self._loop)
                self._raw = None
        if self.own_udp and self._udp_send is None:
            self._udp = UdpEncap(self.esp_received, port=self.udp_port, batch=self.batch)
            try:
                self._udp.open(self._loop)
            except OSError as e:
                raise UserError(f"cannot bind UDP port {self.udp_port} for ESP-in-UDP: "
                                f"{e.strerror} (is an IKE daemon using it?)") from None
            udp = self._udp
            self._udp_send = lambda data, local, remote: udp.sendto(data, remote)
        self._loop.add_reader(self._tun.fd, self._tun_readable)
        self._timer = asyncio.create_task(self._timer_loop())

    async def stop(self, keep_sas: bool = False) -> None:
        """Remove everything this dataplane made (SAs live in this process: they cannot be
        kept across a restart, so `keep_sas` changes nothing here)."""
        if self._timer:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        if self._tun is not None and loop is not None and self._tun.fd >= 0:
            loop.remove_reader(self._tun.fd)
        if self._udp and loop:
            self._udp.close(loop)
        if self._raw and loop:
            self._raw.close(loop)
        for s in self._clear.values():
            s.close()
        self._clear.clear()
        if self._ipr is not None:
            if self._routes:  # the table is ours alone: one flush, not a request per route
                for fam in (socket.AF_INET, socket.AF_INET6):
                    try:
                        await self._ipr.flush_routes(table=self.table, family=fam)
                    except Exception as e:
                        log.debug("flush table %d: %s", self.table, e)
                self._routes.clear()
                self._wide_routes.clear()
            for key in list(self._port_rules):
                await self._port_rule(key, add=False)
            if self._rules_installed:
                await self._remove_rules()
                self._rules_installed = False
        if self.inbound_block:
            await self._inbound.stop()
            self.inbound_block = False
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._tun is not None:
            self._tun.close()
            self._tun = None
        self._sa_in.clear()
        self._sa_host.clear()
        self._sa_nets.clear()

    def attach_udp(self, send_esp: Callable) -> None:
        """Send ESP-in-UDP through the IKE adapter's port-4500 sockets:
        `send_esp(data, (local addr, port), (remote addr, port))` (IkeAdapter.send_esp), or
        `send_esp(data, (remote addr, port))` for an owner with one socket per family. The
        adapter hands ESP it receives to `on_esp` / `esp_received`. Called after `start`, it
        also closes the 4500 sockets the dataplane opened itself: the port is the adapter's."""
        try:
            params = inspect.signature(send_esp).parameters.values()
            nargs = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        except (TypeError, ValueError):
            nargs = 3
        if nargs == 2:
            self._udp_send = lambda data, local, remote: send_esp(data, remote)
        else:
            self._udp_send = send_esp
        if self._udp is not None and self._loop is not None:
            self._udp.close(self._loop)
            self._udp = None

    def on_esp(self, data: bytes, local: tuple, remote: tuple) -> None:
        """IkeAdapter's on_esp callback: an ESP datagram (marker split done) from `remote`."""
        self.esp_received(data, (str(remote[0]), remote[1]))

    # --- rules and routes --------------------------------------------------------------------

    def _own_traffic_rules(self):
        for fam in (socket.AF_INET, socket.AF_INET6):
            yield dict(family=fam, priority=self.pref, table=254, fwmark=self.mark,
                       fwmask=0xFFFFFFFF)
            yield dict(family=fam, priority=self.pref, table=254, ip_proto=packet.PROTO_ESP)
            for port in sorted({500, 4500, self.udp_port}):
                for key in ("sport_range", "dport_range"):
                    yield dict(family=fam, priority=self.pref, table=254,
                               ip_proto=packet.PROTO_UDP, **{key: f"{port}:{port}"})
            yield dict(family=fam, priority=self.pref + 10, table=self.table)

    async def _install_rules(self) -> None:
        for r in self._own_traffic_rules():
            await self._ipr.rule("add", **r)

    async def _remove_rules(self) -> None:
        for r in self._own_traffic_rules():
            try:
                await self._ipr.rule("del", **r)
            except Exception as e:  # already gone: nothing of ours to remove
                log.debug("rule %s: %s", r, e)

    async def _route_add(self, net: IPNetwork, kind: str) -> None:
        old = self._routes.get(net)
        if old == kind:
            return
        if self._ipr is None:  # not started: the decision is recorded (unit tests read it)
            pass
        else:  # one request, also when the kind changes (replace = NLM_F_CREATE|REPLACE)
            verb = "add" if old is None else "replace"
            if kind == "throw":
                await self._ipr.route(verb, dst=str(net), type="throw", table=self.table)
            else:
                await self._ipr.route(verb, dst=str(net), oif=self._ifindex, table=self.table)
        self._routes[net] = kind
        self._route_changed(net, old is None)

    async def _route_del(self, net: IPNetwork) -> None:
        kind = self._routes.pop(net, None)
        if kind is None:
            return
        self._route_changed(net, False, gone=True)
        if self._ipr is None:
            return
        try:
            if kind == "throw":
                await self._ipr.route("del", dst=str(net), type="throw", table=self.table)
            else:
                await self._ipr.route("del", dst=str(net), oif=self._ifindex, table=self.table)
        except Exception as e:
            log.debug("route %s: %s", net, e)

    def _route_changed(self, net: IPNetwork, new: bool, gone: bool = False) -> None:
        """A route wider than one address changed: the SA host routes inside it, which exist
        only where it would not already send their traffic to oe0, are decided again."""
        if net.prefixlen == net.max_prefixlen:
            return
        key = (net.version, net.prefixlen)
        if new:
            self._wide_routes[key] += 1
        elif gone:
            self._wide_routes[key] -= 1
            if self._wide_routes[key] <= 0:
                del self._wide_routes[key]
        for n in self._sa_routes:
            if n.prefixlen == n.max_prefixlen and n.version == net.version and n.subnet_of(net):
                self._dirty.add(n)

    def _inherited(self, net: IPNetwork) -> str | None:
        """What our table does for `net` without its own route: the kind of the longest wider
        route of ours covering it (None: no route, the main table decides, as `throw`)."""
        for v, plen in sorted(self._wide_routes, key=lambda k: -k[1]):
            if v == net.version and plen < net.prefixlen:
                kind = self._routes.get(ipaddress.ip_network((net.network_address, plen),
                                                             strict=False))
                if kind is not None:
                    return kind
        return None

    @contextlib.asynccontextmanager
    async def coalesce(self):
        """Changes made inside reach the kernel once, at the end: every route that changed is
        synced once and the inbound SA set gets one incremental nftables transaction, however
        many SAs and shunts changed. The userspace side (SAs, shunts, held packets) changes at
        once, as outside. Nests; the outermost end flushes."""
        self._defer += 1
        try:
            yield self
        finally:
            self._defer -= 1
            if not self._defer:
                await self.flush()

    async def _commit(self) -> None:
        """After a change: reach the kernel now, unless inside coalesce()."""
        self._wake.set()
        if not self._defer:
            await self.flush()

    async def flush(self) -> None:
        """Sync every route marked dirty and the inbound SA set (one caller at a time: a route
        is never added twice by two tasks racing)."""
        async with self._flush_lock:
            while self._dirty:  # wider routes first: the host routes inside depend on them
                nets = sorted(self._dirty, key=lambda n: n.prefixlen)
                self._dirty.clear()
                for net in nets:
                    try:
                        await self._sync_route(net)
                    except Exception as e:  # one bad route must not stop the others
                        log.warning("route %s: %s", net, e)
            if self._in_dirty:
                self._in_dirty = False
                await self._sync_inbound_sas()

    async def _sync_route(self, net: IPNetwork) -> None:
        """The table entry for `net` from what wants it: SAs and trap/block policies need oe0;
        a pass policy or pass shunt alone makes it a route exception."""
        by_port = self._by_net.get(net, {})
        kinds = set(by_port.values())
        shunt = self._shunts.get(net.network_address) if (
            net.prefixlen == net.max_prefixlen) else None
        if self._sa_routes[net] > 0:
            if (net.prefixlen == net.max_prefixlen and not by_port
                    and self._inherited(net) == "oe0"):
                # a trap or block route of ours covers it: its traffic reaches oe0 already
                # (an ACQUIRE storm would otherwise cost one netlink request per SA)
                await self._route_del(net)
            else:
                await self._route_add(net, "oe0")
        elif shunt is not None and shunt.kind is ShuntKind.PASS:
            await self._route_add(net, "throw")  # a failure/negotiation pass beats the trap
        elif kinds & {TRAP, BLOCK}:  # a pass for some ports only is decided in userspace
            await self._route_add(net, "oe0")
        elif by_port.get((0, 0)) == PASS:
            await self._route_add(net, "throw")
        else:
            await self._route_del(net)

    async def _port_rule(self, key: tuple[IPNetwork, int, int], add: bool) -> None:
        net, proto, port = key
        r = dict(family=socket.AF_INET if net.version == 4 else socket.AF_INET6,
                 priority=self.pref + 5, table=254, dst=str(net.network_address),
                 dst_len=net.prefixlen, ip_proto=proto)
        if port:
            r["dport_range"] = f"{port}:{port}"
        try:
            if self._ipr is not None:
                await self._ipr.rule("add" if add else "del", **r)
        except Exception as e:
            if add:
                raise
            log.debug("rule %s: %s", r, e)
        (self._port_rules.add if add else self._port_rules.discard)(key)

    # --- group policies ----------------------------------------------------------------------

    async def _set_policy(self, dst, proto: int, port: int, kind: str | None) -> None:
        net = ipaddress.ip_network(dst, strict=False)
        key = (net, proto, port)
        if kind is None:
            self._policies.pop(key, None)
            self._by_net.get(net, {}).pop((proto, port), None)
            if not self._by_net.get(net, True):
                del self._by_net[net]
        else:
            self._policies[key] = kind
            self._by_net.setdefault(net, {})[(proto, port)] = kind
        nkey = (net.version, net.prefixlen, int(net.network_address))
        if net in self._by_net:
            self._by_key[nkey] = self._by_net[net]
        else:
            self._by_key.pop(nkey, None)
        for v in (4, 6):
            self._plens[v] = sorted({n.prefixlen for n in self._by_net if n.version == v},
                                    reverse=True)
        if (proto or port) and (kind == PASS) != (key in self._port_rules):
            await self._port_rule(key, add=kind == PASS)
        self._dirty.add(net)
        await self._commit()
        blocked = effective_block((n, k) for (n, pr, po), k in self._policies.items()
                                  if not (pr or po))  # port-specific blocks: outbound only
        if blocked != self._blocked_in:
            self._blocked_in = blocked
            if self.inbound_block:
                await self._inbound.apply(blocked)

    async def set_trap(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None:
        await self._set_policy(dst, proto, port, TRAP)

    async def set_pass(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None:
        await self._set_policy(dst, proto, port, PASS)

    async def set_block(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None:
        await self._set_policy(dst, proto, port, BLOCK)

    async def remove_group_policy(self, dst: IPNetwork, proto: int = 0, port: int = 0) -> None:
        await self._set_policy(dst, proto, port, None)

    def policy_for(self, info: packet.IpInfo) -> str | None:
        """Longest prefix, then the most specific protocol/port (product.md §2): one dict
        lookup per prefix length, however many policies there are."""
        if not self._by_net:
            return None
        v = info.version
        bits = 32 if v == 4 else 128
        x = int.from_bytes(info.dst_b, "big")
        for plen in self._plens[v]:
            by_port = self._by_key.get((v, plen, x >> (bits - plen) << (bits - plen)))
            if by_port:
                for key in ((info.proto, info.dport), (info.proto, 0), (0, 0)):
                    kind = by_port.get(key)
                    if kind is not None:
                        return kind
        return None

    # --- shunts ------------------------------------------------------------------------------

    async def set_shunt(self, local: IPAddress, remote: IPAddress, kind: ShuntKind,
                        lifetime_s: int) -> None:
        now = self.clock()
        shunt = self._shunts[remote] = _Shunt(local, kind, now + lifetime_s if lifetime_s else None)
        if shunt.expires is not None:
            self._at(shunt.expires, "shunt", remote, shunt)
        self._acquiring.pop(remote, None)
        self._dirty.add(ipaddress.ip_network(remote))
        if kind is ShuntKind.PASS:
            self._release(remote, clear=True)
        elif kind is ShuntKind.DROP:
            self._drop_held(remote)
        await self._commit()

    async def clear_shunt(self, local: IPAddress, remote: IPAddress) -> None:
        if self._shunts.pop(remote, None) is not None:
            self._dirty.add(ipaddress.ip_network(remote))
        await self._commit()

    # --- Child SAs ---------------------------------------------------------------------------

    async def alloc_spi(self, local: IPAddress, remote: IPAddress, seq: int = 0) -> int:
        while True:
            spi = int.from_bytes(self.rng(4), "big")
            if spi >= 0x100 and spi not in self._sa_in and spi not in self._spi_reserved:
                if len(self._spi_reserved) >= 65536:  # abandoned negotiations: forget the oldest
                    self._spi_reserved.pop(next(iter(self._spi_reserved)))
                self._spi_reserved[spi] = None  # until its SA is added
                return spi

    async def add_child_sa(self, params: ChildSaParams, outbound: bool = True) -> None:
        """outbound=False: the SA receives at once but is chosen for sending only after
        `add_outbound` (a rekey we answered: the peer may not have it yet)."""
        if params.encap is None and not self.raw_esp:
            raise UserError("this host has no raw ESP socket: the Child SA needs ESP-in-UDP")
        try:
            sa = ChildSa(params, self.clock(), self.rng)
        except ValueError as e:
            raise UserError(f"Child SA {params.spi_in:#010x}: {e}") from None
        self._sa_in[params.spi_in] = sa
        self._spi_reserved.pop(params.spi_in, None)
        deadline = sa.next_deadline()
        if deadline is not None:
            self._at(deadline, "sa", params.spi_in, sa)
        for ts in sa.ts_remote:
            net = ts.network() if ts.start != ts.end else ipaddress.ip_network(ts.start)
            # newest last: sending picks the last that covers a packet
            at = None if outbound else 0
            if ts.start == ts.end:
                lst = self._sa_host.setdefault(ts.start.packed, [])
                lst.insert(len(lst) if at is None else at, sa)
            else:
                self._sa_nets.insert(len(self._sa_nets) if at is None else at, sa)
                self._wide_sa_nets += 1
            if not self._sa_routes[net]:
                self._in_dirty = True
            self._sa_routes[net] += 1
            self._dirty.add(net)
        # what the trap held for a destination the SA covers goes out through it, in order
        for ts in sa.ts_remote:
            if ts.start == ts.end:
                dsts = [ts.start] if ts.start in self._held else []
            else:
                dsts = [d for d in self._held
                        if d.version == ts.version and ts.start <= d <= ts.end]
            for dst in dsts:
                self._acquiring.pop(dst, None)
                self._release(dst, clear=False)
        early = self._early.pop(params.spi_in, ())
        self._early_count -= len(early)
        for _, data, addr in early:
            self.stats["early-esp-delivered"] += 1
            self.esp_received(data, addr)
        await self._commit()

    async def add_outbound(self, params: ChildSaParams) -> None:
        self._send_on(params, True)

    async def del_outbound(self, params: ChildSaParams) -> None:
        """Stop sending on a pair that is going; it still receives until del_child_sa."""
        self._send_on(params, False)

    def _send_on(self, params: ChildSaParams, newest: bool) -> None:
        """Take the SA out of the lists sending picks from; newest: back in, at the end."""
        sa = self._sa_in.get(params.spi_in)
        if sa is None:
            return
        for ts in sa.ts_remote:
            lst = self._sa_host.get(ts.start.packed, []) if ts.start == ts.end else self._sa_nets
            if sa in lst:
                lst.remove(sa)
                if newest:
                    lst.append(sa)

    async def del_child_sa(self, params: ChildSaParams) -> None:
        sa = self._sa_in.get(params.spi_in)
        if sa is not None:
            self._remove_sa(sa)
        await self._commit()

    def _inbound_elements(self) -> set[IPNetwork]:
        """The SA networks as disjoint set elements: a network inside a wider one is left out
        (interval sets refuse overlaps)."""
        nets = set(self._sa_routes)
        if self._wide_sa_nets:
            wide = [n for n in nets if n.prefixlen < n.max_prefixlen]
            nets = {n for n in nets if not any(w != n and w.version == n.version
                                               and n.subnet_of(w) for w in wide)}
        return nets

    async def _sync_inbound_sas(self) -> None:
        """Peers with an SA send nothing in the clear to us any more (XFRM `in` policy): the
        nftables `sa` sets change by the difference since the last sync, in one transaction
        (a full re-apply only if that failed: state unknown)."""
        if not self.inbound_block:
            return
        want = self._inbound_elements()
        if self._in_applied is not None:
            add, gone = want - self._in_applied, self._in_applied - want
            if not add and not gone:
                return
            if await self._inbound.update("sa", add, gone):
                self._in_applied = want
                return
            log.warning("inbound SA set: incremental update failed (%s); re-applying",
                        self._inbound.error)
        self._in_applied = want if await self._inbound.apply(sorted(
            want, key=lambda n: (n.version, n)), "sa") else None

    def _remove_sa(self, sa: ChildSa) -> None:
        """Forget `sa` now; its routes are re-synced by the caller or the timer loop."""
        if self._sa_in.get(sa.params.spi_in) is not sa:
            return
        del self._sa_in[sa.params.spi_in]
        for ts in sa.ts_remote:
            net = ts.network() if ts.start != ts.end else ipaddress.ip_network(ts.start)
            if ts.start == ts.end:
                lst = self._sa_host.get(ts.start.packed, [])
                if sa in lst:
                    lst.remove(sa)
                if not lst:
                    self._sa_host.pop(ts.start.packed, None)
            else:  # counted once per wide network while installed, sending or not
                if sa in self._sa_nets:
                    self._sa_nets.remove(sa)
                self._wide_sa_nets -= 1
            self._sa_routes[net] -= 1
            if self._sa_routes[net] <= 0:
                del self._sa_routes[net]
                self._in_dirty = True
            self._dirty.add(net)
        self._wake.set()

    def child_sa(self, spi_in: int) -> ChildSa | None:
        return self._sa_in.get(spi_in)

    async def counters(self) -> list[SaCounters]:
        return self._counters(self._sa_in.values())

    async def counters_for(self, spis_in) -> list[SaCounters]:
        """The counters of the SA pairs with these inbound SPIs only (an idle check of one
        peer must not build every SA's counters)."""
        return self._counters([sa for spi in spis_in if (sa := self._sa_in.get(spi))])

    def _counters(self, sas) -> list[SaCounters]:
        mono, wall = self.clock(), time.time()
        out = []
        for sa in sas:
            for d in (sa.inbound, sa.outbound):
                st = d.stats
                use = int(wall - (mono - st.last_use)) if st.packets else 0
                out.append(SaCounters(d.spi, d.dst, st.bytes, st.packets, use))
        return out

    async def events(self) -> AsyncIterator[Acquire | SaExpire | PolicyExpire]:
        while True:
            yield await self._events.get()

    # --- outbound: packets the host routed into oe0 ------------------------------------------

    def _tun_readable(self) -> None:
        now = self.clock()
        for pkt in self._tun.read_batch(self.batch):
            try:
                self.outbound(pkt, now)
            except OSError as e:  # a send failed (no route, buffer full): the packet is lost
                self.stats["send-error"] += 1
                log.debug("send: %s", e)

    def _sa_for(self, info: packet.IpInfo) -> ChildSa | None:
        lst = self._sa_host.get(info.dst_b)
        if lst:
            for sa in reversed(lst):  # newest first: after a rekey the new SA carries traffic
                if sa.covers(info):
                    return sa
        for sa in reversed(self._sa_nets):
            if sa.covers(info):
                return sa
        return None

    def outbound(self, pkt: bytes, now: float) -> None:
        """Decide the fate of one packet read from oe0."""
        try:
            info = packet.parse(pkt)
        except packet.PacketError:
            self.stats["malformed"] += 1
            return
        sa = self._sa_for(info)
        if sa is not None:
            self._protect(sa, pkt, info, now)
            return
        dst = info.dst
        shunt = self._shunts.get(dst)
        if shunt is not None and shunt.expires is not None and shunt.expires <= now:
            self._expire_shunt(dst, shunt)
            shunt = None
        if shunt is not None:
            if shunt.kind is ShuntKind.PASS:
                self._send_clear(pkt, info)
            elif shunt.kind is ShuntKind.DROP:
                self.stats["shunt-drop"] += 1
            else:
                self._hold(pkt, info, now)
            return
        kind = self.policy_for(info)
        if kind == TRAP:
            since = self._acquiring.get(dst)
            if since is None or now - since >= ACQUIRE_EXPIRES:
                self._acquiring[dst] = now
                self._at(now + ACQUIRE_EXPIRES, "acquire", dst, now)
                self._held.pop(dst, None)  # an old, abandoned hold is not released later
                self._events.put_nowait(Acquire(info.src, dst, info.proto, info.sport,
                                                info.dport, packet=pkt))
                self._wake.set()
            self._hold(pkt, info, now)
        elif kind == BLOCK:
            self.stats["blocked"] += 1
        elif dst.is_multicast or dst.is_link_local or dst.is_unspecified:
            self.stats["not-routed"] += 1  # the host's own link chatter on oe0: nowhere to go
        else:  # pass, or a route this dataplane no longer wants: never swallow traffic
            self._send_clear(pkt, info)

    def _protect(self, sa: ChildSa, pkt: bytes, info: packet.IpInfo, now: float) -> None:
        p = sa.params
        if info.fragment and not sa.tunnel:  # transport mode protects whole datagrams
            whole = self._reassembler.add(pkt, info, now)
            if whole is None:
                return
            pkt, info = whole, packet.parse(whole)
            reassembled = True  # the host fragmented it: the outer packet is fragmented instead
        else:
            reassembled = False
        outer = (20 if p.remote.version == 4 else 40) + (8 if p.encap else 0)
        if not reassembled and len(pkt) + sa.overhead() + outer > self.underlay_mtu:
            if info.df and not info.fragment:
                room = self.underlay_mtu - outer - sa.overhead()
                self.stats["too-big"] += 1
                self._tun.write(packet.too_big(pkt, info, max(room, 576 if info.version == 4
                                                              else 1280), info.dst))
                return
        try:
            esp = sa.protect(pkt, now, info)
        except EspError as e:
            self.stats[f"out-{e.reason}"] += 1
            self._drain(sa)
            return
        if p.encap is not None:
            if self._udp_send is None:
                self.stats["no-udp-socket"] += 1
                return
            self._udp_send(esp, sa.local_ep, sa.peer)
        else:
            self._raw.sendto(esp, sa.peer)
        if sa.outbound.events:
            self._drain(sa)

    def _send_clear(self, pkt: bytes, info: packet.IpInfo) -> None:
        """Send a packet that came into oe0 in the clear (marked: it takes the main table)."""
        s = self._clear.get(socket.AF_INET if info.version == 4 else socket.AF_INET6)
        if s is None:
            self.stats["no-socket"] += 1
            return
        s.sendto(pkt, (str(info.dst), 0))
        self.stats["clear"] += 1

    def _hold(self, pkt: bytes, info: packet.IpInfo, now: float) -> None:
        held = self._held.get(info.dst)
        if held is None:
            if len(self._held) >= self.hold_destinations:
                self.stats["hold-overflow"] += 1
                return
            held = self._held[info.dst] = _Held(collections.deque(maxlen=self.hold_max), now)
        if len(held.packets) == self.hold_max:
            self.stats["hold-overflow"] += 1  # the oldest goes, as a bounded queue must
        held.packets.append(pkt)

    def _release(self, dst: IPAddress, clear: bool) -> None:
        held = self._held.pop(dst, None)
        if held is None:
            return
        now = self.clock()
        for pkt in held.packets:
            try:
                self.outbound(pkt, now) if not clear else self._send_clear(pkt, packet.parse(pkt))
            except (OSError, packet.PacketError) as e:
                self.stats["send-error"] += 1
                log.debug("releasing held packet: %s", e)

    def _drop_held(self, dst: IPAddress) -> None:
        held = self._held.pop(dst, None)
        if held is not None:
            self.stats["shunt-drop"] += len(held.packets)

    # --- inbound -----------------------------------------------------------------------------

    def esp_received(self, data: bytes, addr: tuple) -> None:
        """An ESP packet (SPI .. ICV) from `addr`: UDP 4500 (marker already split) or raw."""
        spi = int.from_bytes(data[:4], "big") if len(data) >= 8 else None
        sa = self._sa_in.get(spi) if spi is not None else None
        if sa is None:
            if spi is not None and self._early_count < EARLY_MAX and self._expects(addr[0]):
                self._early.setdefault(spi, []).append((self.clock(), bytes(data), addr))
                self._early_count += 1
                self.stats["early-esp"] += 1
                self._wake.set()
                return
            self.stats["unknown-spi" if spi is not None else "malformed"] += 1
            return
        try:
            inner = sa.unprotect(data, self.clock())
        except EspError as e:
            self.stats[f"in-{e.reason}"] += 1
            self._drain(sa)
            return
        try:
            self._tun.write(inner)
        except OSError as e:
            self.stats["tun-write-error"] += 1
            log.debug("tun write: %s", e)
        if sa.inbound.events:
            self._drain(sa)

    def _expects(self, addr: str) -> bool:
        """Is an SA with this peer being negotiated or already up (its unknown SPI may be the
        next SA's)? Only then is early ESP kept: strangers cannot fill the buffer."""
        try:
            ip = ipaddress.ip_address(addr.split("%")[0])
        except ValueError:
            return False
        return ip in self._held or ip in self._acquiring or ip.packed in self._sa_host

    # --- time --------------------------------------------------------------------------------

    def _drain(self, sa: ChildSa) -> None:
        """Queue the SA's expiry events; a hard expiry removes the pair at once, as the kernel
        deletes a hard-expired state (the next packet then meets the trap again)."""
        evs = sa.inbound.events + sa.outbound.events
        sa.inbound.events.clear()
        sa.outbound.events.clear()
        for ev in evs:
            self._events.put_nowait(ev)
        if any(ev.hard for ev in evs):
            self._remove_sa(sa)

    def _expire_shunt(self, remote: IPAddress, shunt: _Shunt) -> None:
        if self._shunts.get(remote) is shunt:
            del self._shunts[remote]
            if shunt.kind is ShuntKind.HOLD:
                self._drop_held(remote)  # the negotiation shunt ran out: nothing to release
            self._dirty.add(ipaddress.ip_network(remote))
            self._wake.set()
            self._events.put_nowait(PolicyExpire(ipaddress.ip_network(shunt.local),
                                                 ipaddress.ip_network(remote), 0, True))

    def _at(self, when: float, kind: str, key, obj) -> None:
        """Something of `kind` may be due at `when` (checked against the live state then)."""
        heapq.heappush(self._deadlines, (when, next(self._seq), kind, key, obj))
        if len(self._deadlines) > 64 + 4 * (len(self._sa_in) + len(self._shunts)
                                            + len(self._acquiring)):
            self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Drop stale entries (replaced shunts, removed SAs): the heap stays O(live state)."""
        live = [e for e in self._deadlines if self._live(e)]
        heapq.heapify(live)
        self._deadlines = live

    def _live(self, e) -> bool:
        _, _, kind, key, obj = e
        if kind == "sa":
            return self._sa_in.get(key) is obj
        if kind == "shunt":
            return self._shunts.get(key) is obj
        return self._acquiring.get(key) == obj

    def poll(self, now: float) -> float | None:
        """Fire what is due at `now` (SA lifetimes, shunt expiry, abandoned holds); return the
        next deadline. Work is per due item, not per SA or shunt held."""
        dl = self._deadlines
        again = []
        while dl and dl[0][0] <= now:
            e = heapq.heappop(dl)
            if not self._live(e):
                continue
            _, _, kind, key, obj = e
            if kind == "sa":
                obj.poll_into(now)
                self._drain(obj)
                d = obj.next_deadline()
                if d is not None and self._sa_in.get(key) is obj:
                    again.append((d, next(self._seq), kind, key, obj))
            elif kind == "shunt":
                self._expire_shunt(key, obj)
            else:  # the acquire was never answered: what it held goes
                del self._acquiring[key]
                if key not in self._shunts:
                    self._drop_held(key)
        for e in again:  # after the loop: a deadline not in the future is not refired now
            heapq.heappush(dl, e)
        nxt: list[float] = []
        for spi, early in list(self._early.items()):  # at most EARLY_MAX packets
            if now - early[0][0] >= EARLY_S:  # its SA never came: unknown SPI after all
                del self._early[spi]
                self._early_count -= len(early)
                self.stats["unknown-spi"] += len(early)
            else:
                nxt.append(early[0][0] + EARLY_S)
        while dl and not self._live(dl[0]):
            heapq.heappop(dl)
        if dl:
            nxt.append(dl[0][0])
        return min(nxt) if nxt else None

    async def _timer_loop(self) -> None:
        while True:
            self._wake.clear()
            nxt = self.poll(self.clock())
            if (self._dirty or self._in_dirty) and not self._defer:
                await self.flush()
            timeout = None if nxt is None else max(0.0, nxt - self.clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
