"""In-memory initiator <-> responder harness for IkeSa (aioquic's tests/test_connection.py
shape): a fixed clock, a seeded RNG, and delivery with optional loss and duplication."""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from oe_agent.ike.auth import SignatureCredential
from oe_agent.ike.payloads import IdInitiator
from oe_agent.ike.sa import IkeConfig, IkeSa

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")


def seeded(seed: int):
    r = random.Random(seed)
    return r.randbytes


def config(key=None, peer_key=None, addr=A, **kw) -> IkeConfig:
    key = key or ed25519.Ed25519PrivateKey.generate()
    kw.setdefault("local_id", IdInitiator.from_address(addr))
    kw.setdefault("credential", SignatureCredential(key))
    if peer_key is not None:
        kw.setdefault("peer_keys", (peer_key,))
    return IkeConfig(**kw)


@dataclass
class Pair:
    """Two IkeSa objects wired together; `now` is the shared fixed clock."""

    i: IkeSa
    r: IkeSa
    now: float = 1000.0
    events_i: list = field(default_factory=list)
    events_r: list = field(default_factory=list)
    wire: list = field(default_factory=list)  # every datagram sent, (sender, Datagram)
    sent_count: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sent_count = {id(self.i): 0, id(self.r): 0}

    @classmethod
    def make(cls, cfg_i: IkeConfig, cfg_r: IkeConfig, seed: int = 1) -> "Pair":
        i = IkeSa(cfg_i, A, B, initiator=True, rng=seeded(seed))
        r = IkeSa(cfg_r, B, A, initiator=False, rng=seeded(seed + 100))
        return cls(i, r)

    def peer_of(self, sa: IkeSa) -> IkeSa:
        return self.r if sa is self.i else self.i

    def collect(self) -> None:
        for sa, evs in ((self.i, self.events_i), (self.r, self.events_r)):
            while (e := sa.next_event()) is not None:
                evs.append(e)

    def pending(self, sa: IkeSa) -> list:
        return [d for d in sa.datagrams_to_send(self.now) if not d.keepalive]

    def deliver(self, sa: IkeSa, datagrams: list) -> None:
        peer = self.peer_of(sa)
        for d in datagrams:
            peer.receive_datagram(d.data, (d.local, d.local_port), self.now,
                                  local_port=d.remote_port)

    def run(self, drop=None, dup: bool = False, rounds: int = 50) -> None:
        """Exchange datagrams until both sides are quiet. `drop(sender, n)` decides whether
        the n-th datagram of a sender (counted over the whole test) is lost; `dup` delivers each one twice."""
        counts = self.sent_count
        for _ in range(rounds):
            moved = False
            for sa in (self.i, self.r):
                out = self.pending(sa)
                for d in out:
                    counts[id(sa)] += 1
                    moved = True
                    self.wire.append((sa, d))
                    if drop is not None and drop(sa, counts[id(sa)]):
                        continue
                    self.deliver(sa, [d, d] if dup else [d])
            self.collect()
            if not moved:
                return

    def advance(self, seconds: float | None = None) -> None:
        """Move the clock to the next timer (or by `seconds`) and fire both timers."""
        if seconds is None:
            timers = [t for t in (self.i.get_timer(), self.r.get_timer()) if t is not None]
            self.now = max(self.now, min(timers))
        else:
            self.now += seconds
        for sa in (self.i, self.r):
            t = sa.get_timer()
            if t is not None and t <= self.now:
                sa.handle_timer(self.now)

    def of(self, sa_events: list, cls) -> list:
        return [e for e in sa_events if isinstance(e, cls)]


@dataclass
class Hosts:
    """Two IkeEndpoints (hosts A and B) on one wire, with a fixed clock."""

    a: object
    b: object
    now: float = 1000.0
    events: dict = field(default_factory=lambda: {"a": [], "b": []})
    sent: list = field(default_factory=list)

    @classmethod
    def make(cls, cfg_a: IkeConfig, cfg_b: IkeConfig, seed: int = 7, **kw) -> "Hosts":
        from oe_agent.ike.sa import IkeEndpoint

        a = IkeEndpoint(seeded(seed), lambda local, remote: cfg_a, **kw)
        b = IkeEndpoint(seeded(seed + 1), lambda local, remote: cfg_b, **kw)
        return cls(a, b)

    def run(self, rounds: int = 50, drop=None) -> None:
        for _ in range(rounds):
            moved = False
            for src, dst, name in ((self.a, self.b, "a"), (self.b, self.a, "b")):
                for d in src.datagrams_to_send(self.now):
                    if d.keepalive:
                        continue
                    moved = True
                    self.sent.append((name, d))
                    if drop is not None and drop(name, d):
                        continue
                    dst.receive_datagram(d.data, (d.remote, d.remote_port),
                                         (d.local, d.local_port), self.now)
            for ep, name in ((self.a, "a"), (self.b, "b")):
                while (x := ep.next_event()) is not None:
                    self.events[name].append(x[1])
            if not moved:
                return

    def advance(self) -> None:
        timers = [t for t in (self.a.get_timer(), self.b.get_timer()) if t is not None]
        self.now = max(self.now, min(timers))
        self.a.handle_timer(self.now)
        self.b.handle_timer(self.now)
