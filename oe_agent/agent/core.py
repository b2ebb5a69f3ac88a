"""The Agent: the single owner of mutable agent state (product.md §1–3).

One asyncio task reads one queue. Adapters only post to it: the dataplane's events (Acquire,
SaExpire, PolicyExpire), the IKE side's events, DNS answers (lookups run as tasks that post
their result), control requests (with a future for the answer). Timers (shunt expiry, idle
checks) come from heaps whose earliest deadline bounds the wait. Every per-peer decision is a
cell of `peer.TABLE`; this module performs the cell's action.

The IKE side is reached through `IkeLink` (initiate, supply keys, rekey, delete); its events
come back as the small input types below, tagged with the peer and the IKE SA they belong to.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import ipaddress
import itertools
import logging
import random
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from oe_agent.agent import shunts as sh
from oe_agent.agent.groups import ANSWERS, INITIATES, GroupEntry, PolicyGroups, diff
from oe_agent.agent.peer import Action, PeerInput, PeerState, step
from oe_agent.config import Config, PeerConfig
from oe_agent.errors import UserError
from oe_agent.model import (Acquire, Capabilities, ChildSaParams, Dataplane, IPAddress, Mode,
                            PolicyExpire, SaExpire, ShuntKind, TrafficSelector)

log = logging.getLogger(__name__)

UNAUTHENTICATED = "unauthenticated"  # the marker supply_peer_keys takes for AUTH_NULL (RFC 7619)
HISTORY = 32                         # negotiation history lines kept per peer
MAX_PEERS = 4096                     # idle peer records kept for `explain` (memory bound)
GRACE_S = 5.0                        # a superseded SA pair still decrypts this long
OUT_WAIT_S = 10.0                    # a rekey we answered: our traffic moves to the new pair
                                     # when the peer deletes the old one, or after this
TURN_MAX = 64                        # inputs handled per turn before the kernel sync + a yield
TURN_S = 0.05                        # ... or this much time, whichever comes first
# Negotiations we initiate at once; more acquires wait (held, in order). Under a storm, work
# started beyond what the CPU can finish only times out: retransmissions and DNS timeouts
# that end in failure shunts for peers that have keys.
MAX_INITIATING = 128


# --- what the IKE side is asked to do, and what it reports -------------------------------

class IkeLink(Protocol):
    """The core's view of the IKE engine + UDP adapter (one IKE SA per peer and attempt)."""

    def initiate(self, local: IPAddress, remote: IPAddress, *, mode: Mode, auth_null: bool,
                 ts_local: tuple[TrafficSelector, ...], ts_remote: tuple[TrafficSelector, ...],
                 psk: bytes | None = None) -> Any: ...

    def supply_peer_keys(self, remote: IPAddress, ike_id: Any, keys: list | str) -> None: ...

    def abort(self, remote: IPAddress, ike_id: Any, reason: str) -> None: ...

    def rekey_child(self, remote: IPAddress, spi_in: int) -> None: ...

    def delete(self, remote: IPAddress) -> None: ...


@dataclass(frozen=True)
class IkeRequest:
    """The peer sent IKE_SA_INIT (the adapter asked `may_respond` first)."""
    remote: IPAddress
    local: IPAddress
    ike_id: Any = None


@dataclass(frozen=True)
class KeyNeeded:
    """The engine needs the peer's keys to verify AUTH (PeerKeyNeeded)."""
    remote: IPAddress
    ike_id: Any = None
    peer_id: str = ""  # the peer's ID in words ("": not named yet, an initiator's ask)
    fqdn: str = ""  # set when that ID is an FQDN: its key is looked up at that name


@dataclass(frozen=True)
class ChildUp:
    """ChildSaEstablished (initial or re-established after a peer restart)."""
    remote: IPAddress
    params: ChildSaParams
    ike_id: Any = None
    auth: str = "pubkey"  # pubkey | psk | null
    initiator: bool = True  # we started the exchange that made it (rekeys first)
    # called once the core has acted on it: the IKE side holds the answer that lets the peer
    # send on this SA until the SA is in the dataplane (or the peer's first ESP is dropped)
    installed: Callable[[], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ChildRekeyed:
    remote: IPAddress
    params: ChildSaParams
    old_spi_in: int
    ike_id: Any = None
    initiator: bool = True  # we sent the CREATE_CHILD_SA (ChildSaRekeyed.initiator)
    # as ChildUp's: called once the core has acted on it (the link holds our answer till then)
    installed: Callable[[], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ChildGone:
    """ChildSaDeleted, or IkeSaDeleted (spi_in None: every child of the peer, e.g. liveness)."""
    remote: IPAddress
    spi_in: int | None = None
    reason: str = ""
    ike_id: Any = None


@dataclass(frozen=True)
class Failed:
    """NegotiationFailed(reason): no-proposal, ts-unacceptable, auth-failed, timeout,
    peer-unreachable, internal."""
    remote: IPAddress
    reason: str
    ike_id: Any = None
    detail: str = ""


@dataclass(frozen=True)
class DnsAnswer:
    remote: IPAddress
    answer: Any  # oe_agent.dns KeyAnswer (status, keys, ttl, reason)
    name: str = ""


@dataclass
class _Request:
    verb: str
    args: dict
    future: asyncio.Future


IkeInput = IkeRequest | KeyNeeded | ChildUp | ChildRekeyed | ChildGone | Failed
_WAKE = object()  # queued by request(): the core looks at its requests
_ADDRESS = object()  # _judge's default: the peer's address answer
_MUTATING = {"acquire", "reload"}  # requests answered only once their changes are synced


# --- per-peer record ----------------------------------------------------------------------

@dataclass
class Peer:
    remote: IPAddress
    local: IPAddress | None = None
    state: PeerState = PeerState.TRAP
    group: GroupEntry | None = None
    static: PeerConfig | None = None
    answer: Any = None          # DNS answer for the address (its reverse name)
    answer_name: str = ""
    named: dict[str, Any] = field(default_factory=dict)  # FQDN identity -> answer (None: asked)
    keys_needed: dict = field(default_factory=dict)  # ike_id waiting for keys -> FQDN or ""
    fqdn_ids: dict = field(default_factory=dict)  # ike_id -> the FQDN identity it claimed
    negotiations: set = field(default_factory=set)  # ike_ids in flight
    children: dict[int, ChildSaParams] = field(default_factory=dict)  # by spi_in
    child_ike: dict[int, Any] = field(default_factory=dict)  # spi_in -> the IKE SA it is on
    # rekeyed pairs still installed (old spi_in) -> their successor while it waits for our
    # outbound traffic (a rekey the peer started), else None
    retiring: dict[int, ChildSaParams | None] = field(default_factory=dict)
    # pairs whose rekey we asked for: the in and the out SA of a pair both soft-expire
    rekey_asked: set[int] = field(default_factory=set)
    # our other local addresses with an IKE SA of their own to this peer -> that IKE SA
    extra_locals: dict = field(default_factory=dict)
    auth: str = ""              # how the SA's peer was authenticated, in words
    up_since: float = 0.0
    last_bytes: int = -1
    last_active: float = 0.0
    initiated: bool = False
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))


class Agent:
    """Owns peers, shunts and group state; decisions are peer.TABLE cells."""

    def __init__(self, config: Config, dataplane: Dataplane, ike: IkeLink | None,
                 resolver: Any | None, groups: PolicyGroups, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] | None = None,
                 local_addresses: Iterable[IPAddress] = (),
                 reload_groups: Callable[[], PolicyGroups] | None = None):
        self.config = config
        self.dataplane = dataplane
        self.ike = ike
        self.resolver = resolver
        self.groups = groups
        self.clock = clock
        self.local_addresses = tuple(local_addresses) or config.addresses
        self._reload_groups = reload_groups
        self.shunts = sh.ShuntTable(dict(config.lifetimes), rng or random.SystemRandom().random)
        self.peers: dict[IPAddress, Peer] = {}
        self.static = {p.address: p for p in config.peers}
        self.kernel_state = frozenset()
        self.capabilities: Capabilities | None = None
        self.started = clock()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._timers: list[tuple[float, int, str, IPAddress]] = []
        self._doomed: dict[int, ChildSaParams] = {}  # timer seq -> SA pair deleted after grace
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._running: asyncio.Event | None = None  # set while run() is in its loop
        self.metrics = collections.Counter()
        self._requests: collections.deque[_Request] = collections.deque()  # served first
        self._first: Any = None  # the input that ended the wait for one
        self._depth = 0  # > 0 while a turn's dataplane changes are coalesced
        self._after_sync: list[Callable[[], None]] = []  # run once the turn's sync is done
        self._spi_in: dict[int, IPAddress] = {}  # our inbound SPI -> peer (SaExpire lookup)
        self._initiating: set[IPAddress] = set()  # our negotiations in flight
        self._waiting: dict[IPAddress, None] = {}  # acquired, waiting for a slot (FIFO)
        self._spi_out: dict[tuple[int, IPAddress], IPAddress] = {}  # (peer's SPI, peer)

    # --- inputs: posted by adapters -------------------------------------------------------

    def post(self, item: Any) -> None:
        """Adapters call this (sync, from the loop thread); the core task handles it."""
        self.queue.put_nowait(item)

    async def request(self, verb: str, **args) -> Any:
        """A control request, answered by the core task (so reads see consistent state). It
        goes ahead of queued events: a storm's backlog must not make the control API wait."""
        fut = asyncio.get_running_loop().create_future()
        self._requests.append(_Request(verb, args, fut))
        self.post(_WAKE)
        return await fut

    def may_respond(self, remote: IPAddress) -> bool:
        """Asked by the IKE adapter on an IKE_SA_INIT from a stranger: answer only if the
        peer's group says so (product.md §1 responder). Read-only."""
        if remote in self.static:
            return True
        g = self.groups.lookup(remote)
        return g is not None and g.group in ANSWERS

    # --- the task ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe the dataplane, install the groups' kernel state, start static peers."""
        self.capabilities = await self.dataplane.start()
        async with self._coalesced():
            await self._apply(diff(frozenset(), self.groups.kernel_state()))
            self.kernel_state = self.groups.kernel_state()
            await self._renew_adopted()
            for p in self.config.peers:
                if p.start == "trap":
                    await self.dataplane.set_trap(ipaddress.ip_network(p.address))
                if p.start == "now":
                    await self._input(self._peer(p.address), PeerInput.ACQUIRE,
                                      Acquire(src=self._local_for(p.address), dst=p.address))

    async def _renew_adopted(self) -> None:
        """SA pairs a `keep_sas_on_stop` stop left (the kernel dataplane adopts them) still
        carry traffic but have no IKE SA: each gets a new one at once (make before break, the
        peer drops its old IKE SA on our INITIAL_CONTACT), unless the peer's group no longer
        answers IKE; then the kept pair goes and the group's policy applies."""
        for local, remote in getattr(self.dataplane, "adopted_peers", lambda: [])():
            p = self._peer(remote)
            if self._answers(p):
                await self._input(p, PeerInput.RENEW, Acquire(src=local, dst=remote))
            else:
                await self.dataplane.release_adopted(local, remote)
                p.history.append((self.clock(), "SA pair kept by the previous run removed: "
                                                "its group no longer allows one"))

    async def run(self) -> None:
        """Handle queued inputs and timers until stop(), a turn at a time (`_turn`)."""
        events = asyncio.create_task(self._pump_dataplane())
        self._running = asyncio.Event()
        self._running.set()
        try:
            while not self._stopping:
                if self.queue.empty() and not self._requests:
                    deadline = self.next_deadline()
                    timeout = None if deadline is None else max(0.0, deadline - self.clock())
                    try:
                        await asyncio.wait_for(self._wait_input(), timeout)
                    except asyncio.TimeoutError:
                        pass
                await self._turn()
                await asyncio.sleep(0)  # a busy queue must not starve sockets and timers
        finally:
            events.cancel()
            self._running.clear()

    async def _wait_input(self) -> None:
        self._first = await self.queue.get()  # handled first by the next turn

    async def _turn(self) -> None:
        """Control requests first, then up to TURN_MAX queued inputs (or TURN_S of them), then
        due timers. The dataplane's kernel side (routes, nftables) is synced once for the
        whole turn; only then does the IKE side hear that its SAs are in (so the peer is
        answered once its SA can be used) and do mutating requests get their answer."""
        try:
            async with self._coalesced():
                first, self._first = self._first, None
                while self._requests:
                    await self.handle(self._requests.popleft())
                if first is not None and first is not _WAKE:
                    await self.handle(first)
                until = time.monotonic() + TURN_S
                for _ in range(TURN_MAX):
                    if self.queue.empty() or self._stopping:
                        break
                    item = self.queue.get_nowait()
                    if item is not None and item is not _WAKE:
                        await self.handle(item)
                    if self._requests or time.monotonic() > until:
                        break
                await self.on_timers(self.clock())
        except Exception:  # a timer or the sync at the turn's end failed: the agent goes on
            log.exception("error in the core's turn")

    @contextlib.asynccontextmanager
    async def _coalesced(self):
        """Coalesce the dataplane changes made inside (if the dataplane can: `coalesce()`);
        afterwards run what waited for them to be in the kernel."""
        co = getattr(self.dataplane, "coalesce", None)
        self._depth += 1
        try:
            if co is None:
                yield
            else:
                async with co():
                    yield
        finally:
            self._depth -= 1
            if not self._depth:
                done, self._after_sync = self._after_sync, []
                for fn in done:
                    try:
                        fn()
                    except Exception:
                        log.exception("after the dataplane sync")

    def _when_synced(self, fn: Callable[[], None]) -> None:
        """Run fn once this turn's dataplane changes are in (at once outside a turn)."""
        if self._depth:
            self._after_sync.append(fn)
        else:
            fn()

    async def _pump_dataplane(self) -> None:
        async for ev in self.dataplane.events():
            self.post(ev)

    async def handle(self, item: Any) -> None:
        """One input; errors are logged, never fatal to the agent."""
        try:
            if isinstance(item, _Request):
                fut = item.future
                try:
                    result = await self._control(item.verb, item.args)
                except UserError as e:
                    if not fut.done():
                        fut.set_exception(e)
                    return
                if item.verb in _MUTATING:  # answered once what it changed is in
                    self._when_synced(lambda: fut.done() or fut.set_result(result))
                elif not fut.done():
                    fut.set_result(result)
                return
            if item is _WAKE:
                return
            # by MRO: dataplanes send subclasses (the kernel's KernelAcquire is an Acquire)
            handler = next((self._HANDLERS[c] for c in type(item).__mro__
                            if c in self._HANDLERS), None)
            if handler is None:
                log.warning("unexpected input %r", item)
                return
            await handler(self, item)
        except Exception:  # one bad event must not stop the agent
            log.exception("error handling %r", item)
            if isinstance(item, _Request) and not item.future.done():
                item.future.set_exception(UserError("internal error (see the agent's log)"))

    def next_deadline(self) -> float | None:
        ds = [d for d in (self.shunts.next_deadline(), self._timers[0][0] if self._timers else None)
              if d is not None]
        return min(ds) if ds else None

    async def on_timers(self, now: float) -> None:
        for s in self.shunts.pop_expired(now):
            p = self._peer(s.remote)
            p.history.append((now, f"{s.kind.value} shunt ({s.reason}) expired after {s.lifetime:.0f}s"))
            await self._input(p, PeerInput.SHUNT_EXPIRED, s)
        while self._timers and self._timers[0][0] <= now:
            _, seq, kind, addr = heapq.heappop(self._timers)
            if kind == "idle":
                await self._idle_check(addr, now)
            elif kind == "del":
                await self._dp_del(self._doomed.pop(seq))
            elif kind == "out":
                p = self.peers.get(addr[0])
                if p is not None and p.retiring.get(addr[1]) is not None:
                    p.history.append((now, f"no Delete for the rekeyed SA {addr[1]:08x} after "
                                           f"{OUT_WAIT_S:.0f}s: sending on the new pair"))
                    await self._move_out(p, addr[1])

    async def stop(self) -> None:
        """Clean stop: delete SAs and everything installed, unless keep_sas_on_stop."""
        self._stopping = True
        self.post(None)
        # let the core task finish its current input: from here on stop() owns the state
        for _ in range(1000):
            if self._running is None or not self._running.is_set():
                break
            await asyncio.sleep(0.01)
        for t in list(self._tasks):
            t.cancel()
        keep = self.config.keep_sas_on_stop
        async with self._coalesced():
            for params in self._doomed.values():
                await self._dp_del(params)
            self._doomed.clear()
            if not keep:
                seal = getattr(self.dataplane, "seal", None)
                for p in list(self.peers.values()):
                    # fail closed (issue 5, 1): a `private` peer we had an SA with stays
                    # blocked until the next start's trap covers it, not clear in between
                    sealed = (seal is not None and bool(p.children) and p.local is not None
                              and p.group is not None and p.group.group == "private")
                    await self._input(p, PeerInput.STOP, None)
                    if sealed:
                        await seal(p.local, p.remote)
                await self._apply(diff(self.kernel_state, frozenset()))
                self.kernel_state = frozenset()
        while self._requests:  # asked while stopping: answered, not left waiting
            r = self._requests.popleft()
            if not r.future.done():
                r.future.set_exception(UserError("the agent is stopping"))
        await self.dataplane.stop(keep_sas=keep)

    # --- dataplane events -------------------------------------------------------------------

    async def _on_acquire(self, acq: Acquire) -> None:
        self.metrics["acquires"] += 1
        p = self._peer(acq.dst)
        p.local = p.local or acq.src
        if p.static is None:
            p.group = self.groups.lookup(acq.dst, acq.proto, acq.sport, acq.dport)
            if p.group is None or p.group.group not in INITIATES:
                what = p.group.group if p.group else "no group"
                p.history.append((self.clock(), f"acquire ignored: {what} does not initiate"))
                return
        await self._input(p, PeerInput.ACQUIRE, acq)

    async def _on_sa_expire(self, ev: SaExpire) -> None:
        remote = self._spi_in.get(ev.spi)  # our SPI (inbound), else the peer's (outbound)
        if remote is None:
            remote = self._spi_out.get((ev.spi, ev.dst))
        p = self.peers.get(remote) if remote is not None else None
        if p is None:
            return
        child = p.children.get(ev.spi)
        if child is None:
            child = next((c for c in p.children.values() if c.spi_out == ev.spi), None)
        if child is None:
            return
        if ev.hard:
            if p.retiring.get(child.spi_in) is not None:
                await self._move_out(p, child.spi_in)
            self._forget_child(p, child)
            p.history.append((self.clock(), f"SA {child.spi_in:08x} hard-expired"))
            if not p.children:
                await self._input(p, PeerInput.SA_GONE, None)
        else:
            await self._input(p, PeerInput.REKEY_DUE, child)

    async def _on_policy_expire(self, ev: PolicyExpire) -> None:
        # The kernel dataplane may put lifetimes on shunt policies; our heap is the clock that
        # decides, so a kernel-side expiry only means "already gone": fire ours now.
        s = self.shunts.get(ev.dst.network_address)
        if s is not None and ev.hard:
            self.shunts.remove(s.remote)
            p = self._peer(s.remote)
            p.history.append((self.clock(), f"{s.kind.value} shunt ({s.reason}) expired in the kernel"))
            await self._input(p, PeerInput.SHUNT_EXPIRED, s)

    # --- IKE events -------------------------------------------------------------------------

    async def _on_ike_request(self, ev: IkeRequest) -> None:
        p = self._peer(ev.remote)
        p.local = p.local or ev.local
        if p.static is None:
            p.group = self.groups.lookup(ev.remote)
        if not self._answers(p):
            # the adapter checked may_respond; a reload may have raced it
            if self.ike:
                self.ike.abort(ev.remote, ev.ike_id, "group does not answer")
            return
        p.negotiations.add(ev.ike_id)
        await self._input(p, PeerInput.IKE_REQUEST, ev)

    async def _on_key_needed(self, ev: KeyNeeded) -> None:
        p = self._peer(ev.remote)
        name = ev.fqdn.rstrip(".").lower()
        p.keys_needed[ev.ike_id] = name
        if name and (name not in p.named or p.named[name] is not None):
            # an FQDN identity is authenticated by its own name's key, never the address's
            # (product.md §4); its answer is kept apart from the address's, and asked afresh
            # for each IKE SA (the resolver's cache answers a repeat)
            p.named[name] = None
            self._lookup(p, name)
        if name:
            p.fqdn_ids[ev.ike_id] = name
        self._supply(p)

    async def _on_child_up(self, ev: ChildUp) -> None:
        p = self._peer(ev.remote)
        p.negotiations.discard(ev.ike_id)
        try:
            await self._input(p, PeerInput.CHILD_UP, ev)
        finally:
            if ev.installed is not None:
                self._when_synced(ev.installed)

    async def _on_child_rekeyed(self, ev: ChildRekeyed) -> None:
        try:
            await self._input(self._peer(ev.remote), PeerInput.REKEYED, ev)
        finally:
            if ev.installed is not None:
                self._when_synced(ev.installed)

    async def _on_child_gone(self, ev: ChildGone) -> None:
        p = self._peer(ev.remote)
        p.negotiations.discard(ev.ike_id)
        if ev.spi_in is not None:
            gone = [c for c in (p.children.get(ev.spi_in),) if c]
        elif ev.ike_id is not None:  # that IKE SA's children only
            gone = [c for c in p.children.values() if p.child_ike.get(c.spi_in) == ev.ike_id]
        else:
            gone = list(p.children.values())
        for c in gone:
            if p.retiring.get(c.spi_in) is not None:
                await self._move_out(p, c.spi_in)  # the peer deleted the pair it rekeyed
            if len(p.children) > 1:
                # another pair carries the traffic: packets already in flight on this one (the
                # tie-break's loser, a restarted peer's old pair) still decrypt for a moment
                self._forget_child(p, c)
                # ...but nothing more is sent on it: the kernel sends on the newest outbound
                # SA of a host pair, and the peer may delete this pair before we do
                sending = {n.spi_in for n in p.retiring.values() if n is not None}
                if any(o.spi_in not in sending for o in p.children.values()):
                    await self.dataplane.del_outbound(c)
                seq = next(self._seq)
                self._doomed[seq] = c
                heapq.heappush(self._timers, (self.clock() + GRACE_S, seq, "del", p.remote))
            else:
                await self._del_child(p, c)
        why = _GONE_WORDS.get(ev.reason, ev.reason or "deleted")
        if gone:
            p.history.append((self.clock(), f"SA deleted ({why})"))
        elif ev.spi_in is None and ev.reason and ev.reason != "local":
            p.history.append((self.clock(), f"IKE SA gone ({why})"))
        if not p.children:
            await self._input(p, PeerInput.SA_GONE, ev)

    async def _on_failed(self, ev: Failed) -> None:
        p = self._peer(ev.remote)
        p.negotiations.discard(ev.ike_id)
        p.keys_needed.pop(ev.ike_id, None)
        p.fqdn_ids.pop(ev.ike_id, None)
        self.metrics[f"negotiations_failed_{ev.reason}"] += 1
        p.history.append((self.clock(), f"negotiation failed: {ev.reason}"
                          + (f" ({ev.detail})" if ev.detail else "")))
        if p.negotiations:
            return  # mutual initiation: the other IKE SA goes on (the engine's tie-break)
        await self._input(p, PeerInput.FAILED, ev)

    async def _on_dns(self, ev: DnsAnswer) -> None:
        p = self._peer(ev.remote)
        status = getattr(ev.answer, "status", "timeout")
        self.metrics[f"dns_{status}"] += 1
        p.history.append((self.clock(), f"DNS {ev.name or ev.remote}: {status}"
                          + (f" ({ev.answer.reason})" if getattr(ev.answer, "reason", "") else "")))
        if ev.name and ev.name in p.named:
            # an FQDN identity's answer serves only the IKE SAs that asked for that name: an
            # unusable one refuses them (AUTHENTICATION_FAILED, then Failed as usual); it
            # neither replaces the address's answer nor fails the peer's other negotiations
            p.named[ev.name] = ev.answer
            self._supply(p)
            return
        p.answer, p.answer_name = ev.answer, ev.name
        verdict = self._judge(p)
        if verdict is None or any(p.keys_needed.values()):
            # (an IKE SA that waits on an FQDN identity's key decides the peer's fate itself)
            self._supply(p)
            return
        reason, detail = verdict
        # Every IKE SA with the peer is refused when it asks for the keys, now or later: the
        # peer hears AUTHENTICATION_FAILED and fails (and removes a half-made SA) at once,
        # instead of retransmitting into silence. Our shunt does not wait for that.
        self._supply(p)
        p.negotiations.clear()
        await self._input(p, PeerInput.FAILED, Failed(p.remote, reason, detail=detail))

    _HANDLERS: dict[type, Callable] = {}

    # --- decisions ----------------------------------------------------------------------------

    def _judge(self, p: Peer, a: Any = _ADDRESS) -> tuple[str, str] | None:
        """None if the DNS answer (default: the address's) lets the negotiation go on, else
        (shunt reason, detail)."""
        a = p.answer if a is _ADDRESS else a
        status = getattr(a, "status", "timeout")
        group = p.group.group if p.group else ""
        keys = list(getattr(a, "keys", None) or [])
        if status == "secure-key" and keys:
            return None
        if status == "bogus":
            return sh.BOGUS, getattr(a, "reason", "")
        if status == "insecure" and keys:
            if group == "private" or not self.config.insecure_private_or_clear:
                return sh.INSECURE, "the key is not DNSSEC-signed"
            return None
        if self._auth_null_ok(p):
            return None
        if status in ("secure-denial", "insecure", "secure-key"):
            return sh.NO_KEY, "no IPSECKEY published"
        return sh.SILENT, f"DNS {status}"

    def _auth_null_ok(self, p: Peer) -> bool:
        """AUTH_NULL OE where configured, never for `private` (it needs a secure key)."""
        return self.config.auth_null and p.group is not None and p.group.group != "private"

    def _answers(self, p: Peer) -> bool:
        return p.static is not None or (p.group is not None and p.group.group in ANSWERS)

    def _supply(self, p: Peer) -> None:
        """Give keys to every IKE SA waiting for them whose identity's DNS answer is in."""
        if not p.keys_needed or self.ike is None:
            return
        for ike_id, name in list(p.keys_needed.items()):
            keys = self._keys_for(p, name)
            if keys is None:
                continue  # its answer is not in yet
            self.ike.supply_peer_keys(p.remote, ike_id, keys)
            if keys == []:
                p.negotiations.discard(ike_id)  # it ends in AUTHENTICATION_FAILED
            del p.keys_needed[ike_id]

    def _keys_for(self, p: Peer, name: str) -> list | str | None:
        """The keys for an IKE SA whose peer claims `name` ("": its address); None: wait."""
        if p.static is not None:
            return self._static_keys(p.static)
        a = p.named.get(name) if name else p.answer
        if a is None:
            return None
        if self._judge(p, a) is not None:
            return []  # no usable key: the engine refuses the peer's AUTH
        return [k.public_key for k in (getattr(a, "keys", None) or [])] or UNAUTHENTICATED

    def _static_keys(self, pc: PeerConfig) -> list | str:
        if pc.auth == "null":
            return UNAUTHENTICATED
        if pc.auth == "psk":
            return []
        return [load_public_key(pc.public_key)]

    def _lookup(self, p: Peer, name: str | None = None) -> None:
        """Start a DNS lookup as a task that posts its answer (in parallel with IKE)."""
        if self.resolver is None:
            self.post(DnsAnswer(p.remote, _NoResolver(), name or ""))
            return
        target = name or str(p.remote)

        async def go():
            try:
                ans = await self.resolver.lookup(target)
            except Exception as e:  # the resolver's own errors become a timeout-class answer
                log.warning("lookup %s failed: %s", target, e)
                ans = _NoResolver(reason=str(e))
            self.post(DnsAnswer(p.remote, ans, target))

        t = asyncio.get_running_loop().create_task(go())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # --- performing cells ------------------------------------------------------------------------

    async def _input(self, p: Peer, inp: PeerInput, ev: Any) -> None:
        action, nxt = step(p.state, inp)
        if action is Action.IGNORE:
            log.debug("%s: %s in %s ignored", p.remote, inp.value, p.state.value)
        prev = p.state
        p.state = nxt
        await getattr(self, f"_do_{action.value}")(p, ev, prev)
        if nxt is not prev:
            log.info("%s: %s -> %s (%s)", p.remote, prev.value, nxt.value, inp.value)
            if prev is PeerState.NEGOTIATING and p.state is not PeerState.NEGOTIATING:
                self._initiating.discard(p.remote)
                self._waiting.pop(p.remote, None)
                await self._admit_waiting()

    async def _do_ignore(self, p, ev, prev):
        pass

    async def _do_negotiate(self, p: Peer, acq: Acquire, prev):
        now = self.clock()
        p.local = acq.src if acq else (p.local or self._local_for(p.remote))
        p.initiated = True
        kind = self._negotiation_kind(p)
        self.shunts.negotiation(p.remote, p.local, kind, now)
        self.shunts.count_packet(p.remote)
        await self.dataplane.set_shunt(p.local, p.remote, kind, self.config.lifetimes["negotiation"])
        p.history.append((now, f"acquire {acq.src if acq else p.local} -> {p.remote}: "
                               f"{kind.value} while negotiating"))
        await self._initiate(p)

    async def _do_renew(self, p: Peer, acq: Acquire, prev):
        """No shunt: the SA pair the previous run kept carries the traffic until the new pair
        replaces it (the dataplane removes it then, or when a failure shunt takes its place)."""
        p.local = acq.src
        p.initiated = True
        p.history.append((self.clock(), f"SA pair {p.local} -> {p.remote} kept by the previous "
                                        "run: renewing it with a new IKE SA"))
        await self._initiate(p)

    async def _initiate(self, p: Peer) -> None:
        now = self.clock()
        self.metrics["negotiations_started"] += 1
        if len(self._initiating) < MAX_INITIATING:
            self._initiating.add(p.remote)
            await self._start_ike(p)
        else:  # held like the others; its IKE and DNS start when a slot frees
            self._waiting[p.remote] = None
            p.history.append((now, f"waiting: {MAX_INITIATING} of our negotiations run already"))

    async def _admit_waiting(self) -> None:
        """Start the oldest waiting negotiations while slots are free (FIFO)."""
        while self._waiting and len(self._initiating) < MAX_INITIATING and not self._stopping:
            remote = next(iter(self._waiting))
            del self._waiting[remote]
            p = self.peers.get(remote)
            if p is None or p.state is not PeerState.NEGOTIATING:
                continue
            self._initiating.add(remote)
            await self._start_ike(p)

    async def _start_ike(self, p: Peer, local: IPAddress | None = None) -> Any:
        pc = p.static
        mode = pc.mode if pc else Mode.TRANSPORT
        if pc is None and (local is None or p.answer is None):
            p.answer = None  # IKE_AUTH waits for this lookup's answer, not an older one
            self._lookup(p)  # in parallel with IKE_SA_INIT, not before it (product.md §1.3)
        if self.ike is None:
            return None
        local = local or p.local
        ike_id = self.ike.initiate(
            local, p.remote, mode=mode,
            auth_null=(pc.auth == "null") if pc else self._auth_null_ok(p),
            ts_local=(TrafficSelector.host(local),), ts_remote=(TrafficSelector.host(p.remote),),
            psk=pc.psk.encode() if pc and pc.auth == "psk" else None)
        p.negotiations.add(ike_id)
        return ike_id

    async def _do_extend(self, p: Peer, acq: Acquire, prev):
        """Our SA pairs are per host pair (transport mode: the SA's addresses are the
        packets'), so traffic from another of our addresses to a peer that is up (a second
        address, an IPv6 temporary one) gets an IKE SA of its own; the engine keeps IKE SAs
        of different local addresses apart. An ACQUIRE from an address that has its pair
        starts nothing: it was raised before the pair was in, or the kernel lost the pair's
        outbound SA; `explain` and /metrics show it."""
        now = self.clock()
        self.metrics["acquires_while_up"] += 1
        src = acq.src if acq else p.local
        if src == p.local or any(c.local == src for c in p.children.values()):
            p.history.append((now, f"acquire {src} -> {p.remote} while up ignored (raised "
                                   "before the pair was in, or the kernel lost its outbound SA)"))
            return
        pending = p.extra_locals.get(src)
        if pending is not None and pending in p.negotiations:
            return  # that address's negotiation runs already
        p.history.append((now, f"acquire {src} -> {p.remote}: a pair of its own from {src} "
                               f"(the peer's pair is from {p.local})"))
        self.metrics["negotiations_started"] += 1
        ike_id = await self._start_ike(p, src)
        if ike_id is not None:
            p.extra_locals[src] = ike_id

    async def _do_join(self, p: Peer, acq: Acquire, prev):
        """We trapped while the peer's negotiation runs: cover our packets, don't start another."""
        kind = self._negotiation_kind(p)
        p.local = acq.src if acq else p.local
        self.shunts.negotiation(p.remote, p.local, kind, self.clock())
        await self.dataplane.set_shunt(p.local, p.remote, kind, self.config.lifetimes["negotiation"])
        p.history.append((self.clock(), f"acquire joins the peer's negotiation ({kind.value})"))

    async def _do_respond(self, p: Peer, ev: IkeRequest, prev):
        p.history.append((self.clock(), f"IKE_SA_INIT from {p.remote}: answering "
                          f"({p.group.group if p.group else 'static peer'})"))
        if p.static is None and (p.answer is None or prev is PeerState.UP):
            self._lookup(p)

    async def _do_count(self, p: Peer, ev, prev):
        self.shunts.count_packet(p.remote)

    async def _do_install(self, p: Peer, ev: ChildUp, prev):
        params = self._soft_lifetime(ev)  # reqid 0: the dataplane takes one from its band
        await self.dataplane.add_child_sa(params)
        if p.remote in self.shunts:
            self.shunts.remove(p.remote)
            await self.dataplane.clear_shunt(params.local, p.remote)
        self.shunts.succeeded(p.remote)
        self._add_child(p, params, ev.ike_id)
        p.local = params.local
        now = self.clock()
        p.up_since, p.last_active, p.last_bytes = now, now, -1
        p.auth = self._auth_words(p, ev.auth, p.fqdn_ids.pop(ev.ike_id, ""))
        self.metrics["negotiations_succeeded"] += 1
        p.history.append((now, f"Child SA up: in {params.spi_in:08x} out {params.spi_out:08x} "
                               f"{params.alg.encr}-{params.alg.encr_key_bits} {params.mode.value}, "
                               f"{p.auth}"))
        self._arm_idle(p, now)

    async def _do_replace(self, p: Peer, ev: ChildUp | ChildRekeyed, prev):
        """A rekey (RFC 7296 §2.8) installs the new pair beside the old one, which goes when
        the Delete exchange for it ends (ChildGone), GRACE_S later: packets the peer sent on
        it meanwhile still decrypt. If the peer started the rekey, it sends on the new pair
        only once it has our answer, and deletes the old one after: our traffic moves to the
        new pair when that Delete comes (or OUT_WAIT_S at most), never before the peer can
        read it. A second IKE SA's Child SA (crossing initiations, or a restarted peer) is
        installed beside the old one; the old goes when its IKE SA is deleted (the engine's
        tie-break, the peer's Delete, or liveness). One from another of our addresses
        (EXTEND) is installed beside it and both stay."""
        params = self._soft_lifetime(ev)
        old = p.children.get(ev.old_spi_in) if isinstance(ev, ChildRekeyed) else None
        if old is not None and old.spi_in == params.spi_in:
            old = None
        wait = old is not None and not ev.initiator
        if wait:
            await self.dataplane.add_child_sa(params, outbound=False)
        else:
            await self.dataplane.add_child_sa(params)
        self._add_child(p, params, ev.ike_id)
        if old is not None:
            p.child_ike[params.spi_in] = p.child_ike.get(old.spi_in, ev.ike_id)
            p.retiring[old.spi_in] = params if wait else None
            if wait:
                heapq.heappush(self._timers, (self.clock() + OUT_WAIT_S, next(self._seq), "out",
                                              (p.remote, old.spi_in)))
        if not isinstance(ev, ChildRekeyed):
            p.auth = self._auth_words(p, ev.auth, p.fqdn_ids.pop(ev.ike_id, ""))
        what = ("rekeyed" if isinstance(ev, ChildRekeyed) else "re-established"
                if params.local == p.local else f"up from {params.local}")
        p.history.append((self.clock(), f"Child SA {what}: "
                          f"in {params.spi_in:08x} out {params.spi_out:08x}"))

    async def _do_fail(self, p: Peer, ev: Failed | None, prev):
        now = self.clock()
        group = p.group.group if p.group else ""
        if not isinstance(ev, Failed):  # the negotiation shunt ran out
            reason, detail, neg_ttl = sh.SILENT, "negotiation took longer than its shunt", 0
            for ike_id in list(p.negotiations):
                if self.ike:
                    self.ike.abort(p.remote, ike_id, "timeout")
            p.negotiations.clear()
        else:
            reason = ev.reason if ev.reason in _SHUNT_REASONS else sh.IKE_REASON.get(ev.reason, sh.INTERNAL)
            detail = ev.detail or ev.reason
            neg_ttl = getattr(p.answer, "ttl", 0) if reason == sh.NO_KEY else 0
        kind = self.config.failure_shunt.get(group, ShuntKind.DROP if p.static else ShuntKind.PASS)
        s = self.shunts.failure(p.remote, p.local, kind, reason, now, neg_ttl or 0, detail)
        await self.dataplane.set_shunt(p.local or self._local_for(p.remote), p.remote, s.kind,
                                       int(s.lifetime) + 1)
        p.history.append((now, f"failure shunt {s.kind.value} for {s.lifetime:.0f}s ({reason}: {detail})"))

    async def _do_forget(self, p: Peer, ev, prev):
        p.history.append((self.clock(), "the peer's negotiation failed; nothing installed"))

    async def _do_rekey(self, p: Peer, child: ChildSaParams, prev):
        if child.spi_in in p.retiring or child.spi_in in p.rekey_asked:
            return  # rekeyed already (it goes when its Delete ends), or being rekeyed
        p.rekey_asked.add(child.spi_in)
        p.history.append((self.clock(), f"soft expire of {child.spi_in:08x}: rekeying"))
        if self.ike:
            self.ike.rekey_child(p.remote, child.spi_in)

    async def _do_remove(self, p: Peer, ev, prev):
        for c in list(p.children.values()):
            await self._del_child(p, c)
        p.history.append((self.clock(), "SA gone; the trap covers the peer again"))

    async def _do_delete(self, p: Peer, ev, prev):
        if self.ike:
            self.ike.delete(p.remote)
        for c in list(p.children.values()):
            await self._del_child(p, c)
        p.history.append((self.clock(), "SA deleted by us"))

    async def _do_abort(self, p: Peer, ev, prev):
        for ike_id in list(p.negotiations):
            if self.ike:
                self.ike.abort(p.remote, ike_id, "stopped")
        p.negotiations.clear()
        p.keys_needed.clear()
        p.fqdn_ids.clear()
        release = getattr(self.dataplane, "release_adopted", None)
        if release is not None and p.local is not None and await release(p.local, p.remote):
            p.history.append((self.clock(), "SA pair kept by the previous run removed"))
        await self._do_restore(p, ev, prev)

    async def _do_restore(self, p: Peer, ev, prev):
        s = self.shunts.remove(p.remote) or (ev if isinstance(ev, sh.Shunt) else None)
        if s is not None:
            await self.dataplane.clear_shunt(s.local or p.local or self._local_for(p.remote), p.remote)
            p.history.append((self.clock(), f"{s.kind.value} shunt removed; trap restored"))

    # --- helpers ---------------------------------------------------------------------------------

    async def _del_child(self, p: Peer, c: ChildSaParams) -> None:
        self._forget_child(p, c)
        await self._dp_del(c)

    def _add_child(self, p: Peer, c: ChildSaParams, ike_id: Any) -> None:
        p.children[c.spi_in] = c
        p.child_ike[c.spi_in] = ike_id
        self._spi_in[c.spi_in] = p.remote
        self._spi_out[(c.spi_out, p.remote)] = p.remote

    async def _move_out(self, p: Peer, old_spi_in: int) -> None:
        """Our traffic moves from a rekeyed pair to its successor (added without outbound)."""
        new = p.retiring.pop(old_spi_in, None)
        if new is not None and new.spi_in in p.children:
            await self.dataplane.add_outbound(new)
        if old_spi_in in p.children:
            p.retiring[old_spi_in] = None  # still retiring, until its Delete ends

    def _forget_child(self, p: Peer, c: ChildSaParams) -> None:
        p.retiring.pop(c.spi_in, None)
        p.rekey_asked.discard(c.spi_in)
        for old, new in list(p.retiring.items()):
            if new is not None and new.spi_in == c.spi_in:
                p.retiring[old] = None  # its successor went before taking our traffic
        if p.children.pop(c.spi_in, None) is not None:
            if self._spi_in.get(c.spi_in) == p.remote:
                del self._spi_in[c.spi_in]
            if not any(o.spi_out == c.spi_out for o in p.children.values()):
                self._spi_out.pop((c.spi_out, p.remote), None)
        p.child_ike.pop(c.spi_in, None)

    async def _dp_del(self, c: ChildSaParams) -> None:
        try:
            await self.dataplane.del_child_sa(c)
        except Exception as e:  # already gone (hard expire) is fine
            log.debug("del_child_sa %08x: %s", c.spi_in, e)

    def _soft_lifetime(self, ev: ChildUp | ChildRekeyed) -> ChildSaParams:
        """Soft expiry (the rekey trigger) `ike.rekey_margin` before the hard lifetime; the
        side that did not start the exchange waits half the margin longer, so the two sides
        rarely rekey at once (RFC 7296 §2.8.1 collisions stay the exception)."""
        p = ev.params
        if not p.lifetime_hard_s:
            return p
        margin = self.config.rekey_margin if ev.initiator else self.config.rekey_margin // 2
        soft = max(1, p.lifetime_hard_s - margin)
        return dataclasses.replace(p, lifetime_soft_s=min(soft, p.lifetime_hard_s - 1) or 1)

    def _negotiation_kind(self, p: Peer) -> ShuntKind:
        g = p.group.group if p.group else ""
        return self.config.negotiation_shunt.get(g, ShuntKind.HOLD)

    def _auth_words(self, p: Peer, auth: str, name: str = "") -> str:
        if auth == "null":
            return "unauthenticated (AUTH_NULL)"
        if auth == "psk":
            return "authenticated (PSK)"
        if p.static is not None:
            return "authenticated (static key)"
        status = getattr(p.named.get(name) if name else p.answer, "status", "")
        if status == "insecure":
            return "unauthenticated (key from unsigned DNS)"
        return "authenticated (DNSSEC key)"

    def _arm_idle(self, p: Peer, now: float) -> None:
        if self.config.idle_timeout:
            heapq.heappush(self._timers, (now + self.config.idle_timeout, next(self._seq), "idle", p.remote))

    async def _idle_check(self, addr: IPAddress, now: float) -> None:
        """Traffic in either direction (both SAs' byte counters) keeps the SA."""
        p = self.peers.get(addr)
        if p is None or p.state is not PeerState.UP:
            return
        spis = {c.spi_in for c in p.children.values()} | {c.spi_out for c in p.children.values()}
        only = getattr(self.dataplane, "counters_for", None)  # this peer's, not every SA's
        rows = await (only([c.spi_in for c in p.children.values()]) if only
                      else self.dataplane.counters())
        total = sum(c.bytes for c in rows if c.spi in spis)
        if total != p.last_bytes or now - p.last_active < self.config.idle_timeout:
            if total != p.last_bytes:
                p.last_active = now
            p.last_bytes = total
            heapq.heappush(self._timers, (p.last_active + self.config.idle_timeout,
                                          next(self._seq), "idle", addr))
            return
        p.history.append((now, f"idle for {self.config.idle_timeout}s in both directions"))
        await self._input(p, PeerInput.IDLE, None)

    def _peer(self, remote: IPAddress) -> Peer:
        p = self.peers.get(remote)
        if p is None:
            if len(self.peers) >= MAX_PEERS:
                self._forget_idle_peers()
            p = Peer(remote, static=self.static.get(remote))
            p.group = None if p.static else self.groups.lookup(remote)
            self.peers[remote] = p
        return p

    def _forget_idle_peers(self) -> None:
        """Drop the oldest quarter of the records of peers with nothing installed (their
        history only): memory stays bounded however many addresses the host talks to."""
        idle = [p for p in self.peers.values() if p.state is PeerState.TRAP and not p.children
                and p.remote not in self.shunts and not p.negotiations and not p.keys_needed]
        idle.sort(key=lambda p: p.history[-1][0] if p.history else 0.0)
        for p in idle[:max(1, MAX_PEERS // 4)]:
            del self.peers[p.remote]

    def _local_for(self, remote: IPAddress) -> IPAddress:
        for a in self.local_addresses:
            if a.version == remote.version:
                return a
        raise UserError(f"no local IPv{remote.version} address to reach {remote} from")

    async def _apply(self, d) -> None:
        for sel in d.remove:
            await self.dataplane.remove_group_policy(sel.net, sel.proto, sel.dport)
        for kp in d.install:
            fn = {"trap": self.dataplane.set_trap, "pass": self.dataplane.set_pass,
                  "block": self.dataplane.set_block}[kp.action]
            await fn(kp.selector.net, kp.selector.proto, kp.selector.dport)

    # --- control -------------------------------------------------------------------------------------

    async def _control(self, verb: str, args: dict) -> Any:
        now = self.clock()
        if verb == "status":
            return self.status(now)
        if verb == "sas":
            counted = {c.spi: c for c in await self.dataplane.counters()}
            out = []
            for p in self._sorted_peers():
                for c in p.children.values():
                    r = self._sa_record(p, c, now)
                    cin, cout = counted.get(c.spi_in), counted.get(c.spi_out)
                    r.update(bytes_in=cin.bytes if cin else 0, packets_in=cin.packets if cin else 0,
                             bytes_out=cout.bytes if cout else 0,
                             packets_out=cout.packets if cout else 0)
                    out.append(r)
            return out
        if verb == "shunts":
            return [s.to_dict(now) for s in self.shunts.all()]
        if verb == "explain":
            return self.explain(args["addr"], now)
        if verb == "acquire":
            return await self._synthetic_acquire(**args)
        if verb == "reload":
            return await self.reload()
        if verb == "metrics":
            return self.metrics_text(now)
        raise UserError(f"unknown request {verb!r}")

    async def _synthetic_acquire(self, src: IPAddress, dst: IPAddress, proto: int = 0,
                                 dport: int = 0) -> dict:
        """Like `whack --oppohere`: the decision an ACQUIRE from src to dst gets."""
        if src not in self.local_addresses and self.local_addresses:
            raise UserError(f"{src} is not one of this agent's addresses "
                            f"({', '.join(map(str, self.local_addresses))})")
        if src.version != dst.version:
            raise UserError(f"{src} and {dst} are not the same IP version")
        before = self.peers.get(dst).state if dst in self.peers else PeerState.TRAP
        await self._on_acquire(Acquire(src=src, dst=dst, proto=proto, dport=dport))
        p = self._peer(dst)
        g = p.group.group if p.group else ("static peer" if p.static else "no group")
        return {"dst": str(dst), "group": g, "before": before.value, "state": p.state.value,
                "decision": p.history[-1][1] if p.history else ""}

    async def reload(self) -> dict:
        """Re-read the groups; change kernel state by difference; keep SAs still allowed."""
        if self._reload_groups is None:
            raise UserError("this agent was started without a policies directory to reload")
        new = self._reload_groups()  # UserError leaves everything as it was
        new_state = new.kernel_state()
        d = diff(self.kernel_state, new_state)
        await self._apply(d)
        self.groups, self.kernel_state = new, new_state
        dropped = 0
        for p in list(self.peers.values()):
            if p.static is not None:
                continue
            p.group = new.lookup(p.remote)
            allowed = p.group is not None and (
                p.group.group in ANSWERS if p.state in (PeerState.UP, PeerState.RESPONDING)
                else p.group.group in INITIATES)
            if p.state is not PeerState.TRAP and not allowed:
                p.history.append((self.clock(), f"reload: now in "
                                  f"{p.group.group if p.group else 'no group'}"))
                await self._input(p, PeerInput.DISALLOWED, None)
                dropped += 1
        self.metrics["reloads"] += 1
        return {"removed": [str(s) for s in d.remove],
                "installed": [f"{p.action} {p.selector}" for p in d.install],
                "peers_changed": dropped}

    def _sorted_peers(self) -> list[Peer]:
        return sorted(self.peers.values(), key=lambda p: (p.remote.version, int(p.remote)))

    def _sa_record(self, p: Peer, c: ChildSaParams, now: float) -> dict:
        return {"remote": str(p.remote), "local": str(c.local), "spi_in": f"{c.spi_in:08x}",
                "spi_out": f"{c.spi_out:08x}", "mode": c.mode.value,
                "alg": c.alg.encr + (f"-{c.alg.encr_key_bits}") + (f"+{c.alg.integ}" if c.alg.integ else ""),
                "encap": list(c.encap) if c.encap else None, "reqid": c.reqid,
                "auth": p.auth, "age": round(now - p.up_since, 1),
                "group": p.group.group if p.group else "static"}

    def status(self, now: float) -> dict:
        states = collections.Counter(p.state.value for p in self.peers.values())
        return {"uptime": round(now - self.started, 1),
                "dataplane": type(self.dataplane).__name__,
                "esp": bool(self.capabilities and self.capabilities.esp),
                "detail": self.capabilities.detail if self.capabilities else "",
                "addresses": [str(a) for a in self.local_addresses],
                "policies": len(self.kernel_state),
                "peers": {s.value: states.get(s.value, 0) for s in PeerState},
                "sas": sum(len(p.children) for p in self.peers.values()),
                "shunts": len(self.shunts),
                "peer_list": [{"remote": str(p.remote), "state": p.state.value,
                               "group": p.group.group if p.group else ("static" if p.static else None),
                               "auth": p.auth if p.state is PeerState.UP else ""}
                              for p in self._sorted_peers()]}

    def explain(self, addr: IPAddress, now: float) -> dict:
        p = self.peers.get(addr)
        g = (p.group if p else None) or (None if addr in self.static else self.groups.lookup(addr))
        rec: dict[str, Any] = {"address": str(addr)}
        if addr in self.static:
            sp = self.static[addr]
            rec["group"] = {"name": "static peer", "source": str(self.config.path),
                            "words": f"static peer ({sp.auth}, {sp.mode.value}, start={sp.start})"}
        elif g is None:
            rec["group"] = {"name": None, "source": None,
                            "words": "no policy group covers it: traffic is left alone (clear)"}
        else:
            rec["group"] = {"name": g.group, "source": g.source, "selector": str(g.selector),
                            "words": _GROUP_WORDS[g.group]}
        a = p.answer if p else None
        if a is not None:
            rec["dns"] = {"name": p.answer_name, "status": getattr(a, "status", ""),
                          "reason": getattr(a, "reason", ""), "ttl": getattr(a, "ttl", 0),
                          "keys": len(getattr(a, "keys", None) or []),
                          "words": _DNS_WORDS.get(getattr(a, "status", ""), "")}
        else:
            rec["dns"] = None
        rec["state"] = p.state.value if p else PeerState.TRAP.value
        rec["history"] = [{"age": round(now - t, 1), "event": e} for t, e in (p.history if p else ())]
        rec["sas"] = [self._sa_record(p, c, now) for c in p.children.values()] if p else []
        s = self.shunts.get(addr)
        rec["shunt"] = s.to_dict(now) if s else None
        rec["now"] = self._now_words(p, s, g, now)
        return rec

    def _now_words(self, p: Peer | None, s, g, now: float) -> str:
        if p and p.children:
            c = next(iter(p.children.values()))
            return (f"encrypted: Child SA {c.spi_in:08x}/{c.spi_out:08x} ({c.mode.value}), "
                    f"{p.auth}, up {now - p.up_since:.0f}s")
        if s is not None:
            what = {"pass": "sent in the clear", "drop": "dropped", "hold": "held"}[s.kind.value]
            return (f"packets are {what} ({s.reason}{': ' + s.detail if s.detail else ''}) for "
                    f"{max(0.0, s.expires - now):.0f}s more")
        if p and p.state is PeerState.RESPONDING:
            return "the peer is negotiating with us"
        if p and p.state is PeerState.NEGOTIATING:  # a renewal: no shunt of ours
            return "encrypted on the SA pair kept by the previous run, while a new one is negotiated"
        if g is None:
            return "no IPsec: not covered by any group"
        return {"clear": "always in the clear (pass policy)",
                "clear-or-private": "clear until the peer initiates IKE",
                "private-or-clear": "trapped: the next packet starts a negotiation",
                "private": "trapped: the next packet starts a negotiation",
                "block": "blocked both ways"}[g.group]

    def metrics_text(self, now: float) -> str:
        lines = ["# HELP oe_agent_peers Peers by lifecycle state.", "# TYPE oe_agent_peers gauge"]
        st = self.status(now)
        for k, v in st["peers"].items():
            lines.append(f'oe_agent_peers{{state="{k}"}} {v}')
        lines += ["# HELP oe_agent_child_sas Installed Child SA pairs.", "# TYPE oe_agent_child_sas gauge",
                  f"oe_agent_child_sas {st['sas']}",
                  "# HELP oe_agent_shunts Shunts by kind and reason.", "# TYPE oe_agent_shunts gauge"]
        by = collections.Counter((s.kind.value, s.reason) for s in self.shunts.all())
        for (k, r), v in sorted(by.items()):
            lines.append(f'oe_agent_shunts{{kind="{k}",reason="{r}"}} {v}')
        lines += ["# HELP oe_agent_policies Group policies installed.", "# TYPE oe_agent_policies gauge",
                  f"oe_agent_policies {st['policies']}",
                  "# HELP oe_agent_events_total Events handled, by kind.",
                  "# TYPE oe_agent_events_total counter"]
        for k, v in sorted(self.metrics.items()):
            lines.append(f'oe_agent_events_total{{kind="{k}"}} {v}')
        lines += ["# HELP oe_agent_uptime_seconds Seconds since start.",
                  "# TYPE oe_agent_uptime_seconds gauge", f"oe_agent_uptime_seconds {st['uptime']}"]
        return "\n".join(lines) + "\n"


Agent._HANDLERS = {
    Acquire: Agent._on_acquire, SaExpire: Agent._on_sa_expire, PolicyExpire: Agent._on_policy_expire,
    IkeRequest: Agent._on_ike_request, KeyNeeded: Agent._on_key_needed, ChildUp: Agent._on_child_up,
    ChildRekeyed: Agent._on_child_rekeyed, ChildGone: Agent._on_child_gone, Failed: Agent._on_failed,
    DnsAnswer: Agent._on_dns,
}

_GONE_WORDS = {"dead-peer": "peer dead: no answer to liveness checks", "peer": "deleted by the peer",
               "local": "deleted by us", "superseded": "lost the simultaneous-initiation tie-break",
               "ike-deleted": "its IKE SA was deleted", "rekey-collision": "rekey collision"}

_SHUNT_REASONS = {sh.NO_KEY, sh.SILENT, sh.REFUSED, sh.BOGUS, sh.INSECURE, sh.INTERNAL}

_GROUP_WORDS = {
    "clear": "clear: never encrypted, no IKE",
    "clear-or-private": "clear-or-private: clear unless the peer initiates IKE (we answer)",
    "private-or-clear": "private-or-clear: we initiate; clear if that fails",
    "private": "private: we initiate; dropped if that fails",
    "block": "block: dropped both ways",
}
_DNS_WORDS = {
    "secure-key": "DNSSEC-validated key",
    "secure-denial": "DNSSEC-proven: no key published",
    "insecure": "unsigned answer: a key only good against passive observers",
    "bogus": "DNSSEC validation FAILED (possible attack)",
    "timeout": "no answer from the resolvers",
}


@dataclass(frozen=True)
class _NoResolver:
    """The answer when no resolver is configured or the lookup raised."""
    status: str = "timeout"
    keys: tuple = ()
    ttl: int = 0
    reason: str = "no resolver configured"



def load_public_key(text_or_path: str):
    """A static peer's key: IPSECKEY text ("10 0 4 . BASE64") or a PEM file."""
    from cryptography.hazmat.primitives import serialization

    if text_or_path[:1].isdigit():
        from oe_agent.dns.ipseckey import parse_text

        try:
            return parse_text(text_or_path).public_key
        except Exception as e:
            raise UserError(f"static peer key {text_or_path[:30]!r}...: {e}") from None
    try:
        data = open(text_or_path, "rb").read()
        return serialization.load_pem_public_key(data)
    except (OSError, ValueError) as e:
        raise UserError(f"{text_or_path}: cannot load public key: {e}") from None
