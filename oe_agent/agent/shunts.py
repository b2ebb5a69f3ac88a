"""Shunts: what happens to a peer's packets while no SA exists (product.md §3).

One shunt per remote address, in a dict (O(1)); expiry through one timer heap with lazy
deletion, so nothing ever scans the table. Lifetimes depend on why a negotiation failed:
no key published -> long; silent peer -> short, exponential backoff with jitter; refused ->
normal; DNSSEC bogus -> short drop, logged as an attack indicator.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Callable

from oe_agent.model import IPAddress, ShuntKind

log = logging.getLogger(__name__)

# Reasons a shunt exists, in the words status shows.
NEGOTIATING = "negotiating"
NO_KEY = "no-key"            # authenticated denial: the peer publishes no key
SILENT = "silent"            # IKE timeout, ICMP unreachable, DNS timeout
REFUSED = "refused"          # NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE, AUTHENTICATION_FAILED
BOGUS = "bogus"              # DNSSEC validation failed: possible attack
INSECURE = "insecure"        # `private` peer with only an unsigned key
INTERNAL = "internal"

# NegotiationFailed reasons of the IKE engine (brief) and DNS statuses -> shunt reason.
IKE_REASON = {"no-proposal": REFUSED, "ts-unacceptable": REFUSED, "auth-failed": REFUSED,
              "timeout": SILENT, "peer-unreachable": SILENT, "internal": INTERNAL}
DNS_REASON = {"secure-denial": NO_KEY, "bogus": BOGUS, "timeout": SILENT, "insecure": INSECURE}


@dataclass
class Shunt:
    remote: IPAddress
    local: IPAddress | None
    kind: ShuntKind
    reason: str
    created: float
    lifetime: float
    detail: str = ""
    packets: int = 0
    attempt: int = 0  # backoff step of a silent peer

    @property
    def expires(self) -> float:
        return self.created + self.lifetime

    def to_dict(self, now: float) -> dict:
        return {"remote": str(self.remote), "local": str(self.local) if self.local else None,
                "kind": self.kind.value, "reason": self.reason, "detail": self.detail,
                "age": round(now - self.created, 1), "lifetime": round(self.lifetime, 1),
                "remaining": round(max(0.0, self.expires - now), 1), "packets": self.packets}


@dataclass
class ShuntTable:
    """All shunts by remote address, with a heap of expiry times."""

    lifetimes: dict[str, int]
    rng: Callable[[], float]  # uniform [0, 1): jitter; injected so tests are exact
    jitter: float = 0.2       # +-20 % of a backoff step
    _by_addr: dict[IPAddress, Shunt] = field(default_factory=dict)
    _heap: list[tuple[float, int, IPAddress]] = field(default_factory=list)
    _seq: int = 0
    _silent_steps: dict[IPAddress, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._by_addr)

    def __contains__(self, addr: IPAddress) -> bool:
        return addr in self._by_addr

    def get(self, addr: IPAddress) -> Shunt | None:
        return self._by_addr.get(addr)

    def all(self) -> list[Shunt]:
        return sorted(self._by_addr.values(), key=lambda s: (s.remote.version, s.remote))

    def _put(self, s: Shunt) -> Shunt:
        self._by_addr[s.remote] = s
        self._seq += 1
        heapq.heappush(self._heap, (s.expires, self._seq, s.remote))
        return s

    def negotiation(self, remote: IPAddress, local: IPAddress | None, kind: ShuntKind,
                    now: float) -> Shunt:
        """The shunt that covers a peer while IKE runs; bounded so a hung negotiation ends."""
        return self._put(Shunt(remote, local, kind, NEGOTIATING, now,
                               self.lifetimes["negotiation"]))

    def lifetime(self, reason: str, remote: IPAddress, negative_ttl: float = 0) -> tuple[float, int]:
        """(lifetime, backoff step) for a failure shunt."""
        lt = self.lifetimes
        if reason == NO_KEY:
            return float(max(lt["no_key"], negative_ttl)), 0
        if reason == SILENT:
            step = self._silent_steps.get(remote, 0)
            base = min(lt["silent"] * 2 ** step, lt["silent_max"])
            jittered = base * (1 + self.jitter * (2 * self.rng() - 1))
            return min(jittered, float(lt["silent_max"])), step
        return float(lt.get(reason, lt["refused"])), 0

    def failure(self, remote: IPAddress, local: IPAddress | None, kind: ShuntKind, reason: str,
                now: float, negative_ttl: float = 0, detail: str = "") -> Shunt:
        """The failure shunt; a silent peer's next failure waits twice as long."""
        if reason == BOGUS:
            kind = ShuntKind.DROP
            log.warning("DNSSEC bogus answer for %s (%s): possible attack, dropping for %ss",
                        remote, detail or "no detail", self.lifetimes["bogus"])
        lifetime, step = self.lifetime(reason, remote, negative_ttl)
        if reason == SILENT:
            self._silent_steps[remote] = step + 1
        else:
            self._silent_steps.pop(remote, None)
        old = self._by_addr.get(remote)
        s = Shunt(remote, local, kind, reason, now, lifetime, detail,
                  packets=old.packets if old else 0, attempt=step)
        return self._put(s)

    def succeeded(self, remote: IPAddress) -> None:
        """An SA came up: forget the backoff."""
        self._silent_steps.pop(remote, None)

    def remove(self, remote: IPAddress) -> Shunt | None:
        """Drop the shunt (its heap entry dies lazily)."""
        return self._by_addr.pop(remote, None)

    def count_packet(self, remote: IPAddress, n: int = 1) -> None:
        s = self._by_addr.get(remote)
        if s:
            s.packets += n

    def next_deadline(self) -> float | None:
        while self._heap:
            t, _, addr = self._heap[0]
            s = self._by_addr.get(addr)
            if s is not None and s.expires == t:
                return t
            heapq.heappop(self._heap)  # stale: removed or replaced
        return None

    def pop_expired(self, now: float) -> list[Shunt]:
        """Shunts whose lifetime ran out, removed from the table (the caller restores traps)."""
        out = []
        while (t := self.next_deadline()) is not None and t <= now:
            _, _, addr = heapq.heappop(self._heap)
            out.append(self._by_addr.pop(addr))
        return out
