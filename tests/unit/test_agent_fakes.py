"""In-memory stand-ins for the agent's unit tests: a Dataplane, an IKE link, a resolver.

The fake dataplane keeps exactly the state a real one would (policies, shunts, SAs) so tests
can compare whole states ("expiry restores the trap exactly"). The checks at the bottom keep
the fakes honest against the real Protocol.
"""
from __future__ import annotations

import asyncio
import ipaddress
import itertools
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from oe_agent.agent.core import Agent
from oe_agent.agent.groups import PolicyGroups
from oe_agent.config import parse
from oe_agent.model import (Capabilities, ChildSaParams, Dataplane, EspAlgorithm, Mode,
                            SaCounters, TrafficSelector)

LOCAL = ipaddress.ip_address("192.0.2.1")
LOCAL6 = ipaddress.ip_address("2001:db8::1")


class FakeDataplane:
    def __init__(self):
        self.policies: dict[tuple, str] = {}
        self.shunts: dict[tuple, tuple] = {}
        self.sas: dict[int, ChildSaParams] = {}
        self.sending: dict[tuple, int] = {}  # host pair -> the outbound SPI in use
        self.bytes: dict[int, int] = {}
        self.stopped: bool | None = None
        self.calls: list[tuple] = []
        self._events: asyncio.Queue = asyncio.Queue()

    async def start(self):
        return Capabilities(esp=True, algorithms=frozenset({"aes-gcm-16"}), detail="fake")

    async def stop(self, keep_sas: bool = False):
        self.stopped = keep_sas
        if not keep_sas:
            self.sas.clear()

    async def set_trap(self, dst, proto=0, port=0):
        self.policies[(dst, proto, port)] = "trap"

    async def set_pass(self, dst, proto=0, port=0):
        self.policies[(dst, proto, port)] = "pass"

    async def set_block(self, dst, proto=0, port=0):
        self.policies[(dst, proto, port)] = "block"

    async def remove_group_policy(self, dst, proto=0, port=0):
        del self.policies[(dst, proto, port)]

    async def set_shunt(self, local, remote, kind, lifetime_s):
        self.calls.append(("set_shunt", remote, kind.value, lifetime_s))
        self.shunts[(local, remote)] = (kind.value, lifetime_s)

    async def clear_shunt(self, local, remote):
        self.calls.append(("clear_shunt", remote))
        self.shunts.pop((local, remote), None)

    async def alloc_spi(self, local, remote, seq=0):
        return 0x1000 + len(self.sas)

    async def add_child_sa(self, params, outbound=True):
        self.sas[params.spi_in] = params
        self.bytes.setdefault(params.spi_in, 0)
        self.bytes.setdefault(params.spi_out, 0)
        if outbound:
            self.sending[(params.local, params.remote)] = params.spi_out

    async def del_outbound(self, params):
        self.calls.append(("del_outbound", params.spi_in))

    async def add_outbound(self, params):
        self.calls.append(("add_outbound", params.spi_in))
        self.sending[(params.local, params.remote)] = params.spi_out

    async def del_child_sa(self, params):
        del self.sas[params.spi_in]

    async def counters(self):
        return [SaCounters(spi, LOCAL, b, b // 100) for spi, b in self.bytes.items()]

    async def events(self):
        while True:
            yield await self._events.get()

    def snapshot(self):
        return (dict(self.policies), dict(self.shunts), set(self.sas))


@dataclass
class FakeIke:
    """Records what the core asks of the IKE side; ids count up like IKE SA handles."""

    calls: list = field(default_factory=list)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    sources: dict = field(default_factory=dict)  # IKE SA handle -> the local address it is from

    def initiate(self, local, remote, *, mode, auth_null, ts_local, ts_remote, psk=None):
        i = next(self.ids)
        self.sources[i] = local
        self.calls.append(("initiate", remote, i, mode, auth_null))
        return i

    def supply_peer_keys(self, remote, ike_id, keys):
        self.calls.append(("keys", remote, ike_id, keys))

    def abort(self, remote, ike_id, reason):
        self.calls.append(("abort", remote, ike_id, reason))

    def rekey_child(self, remote, spi_in):
        self.calls.append(("rekey", remote, spi_in))

    def delete(self, remote):
        self.calls.append(("delete", remote))

    def of(self, kind):
        return [c for c in self.calls if c[0] == kind]


@dataclass(frozen=True)
class Answer:
    status: str
    keys: tuple = ()
    ttl: int = 300
    reason: str = ""


@dataclass(frozen=True)
class Key:
    public_key: object
    precedence: int = 10
    gateway_type: int = 0
    gateway: object = None
    algorithm: int = 4


def a_key():
    return Key(ed25519.Ed25519PrivateKey.generate().public_key())


class FakeResolver:
    """Answers from a dict; `gate` (an Event) holds answers back to prove parallelism."""

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.asked: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def lookup(self, name):
        self.asked.append(name)
        await self.gate.wait()
        return self.answers.get(name, Answer("timeout", reason="not in the fake"))


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


GROUPS = {
    "private-or-clear": "192.0.2.0/24\n2001:db8::/64\n",
    "private": "198.51.100.0/25\n",
    "clear-or-private": "203.0.113.0/25\n",
    "clear": "203.0.113.128/26\n",
    "block": "203.0.113.192/26\n",
}


def groups(texts=None, exempt=(LOCAL, LOCAL6)):
    return PolicyGroups.from_texts({f"pol/{g}": (g, t) for g, t in (texts or GROUPS).items()},
                                   exempt=exempt)


def make_agent(config_text="", answers=None, group_texts=None, reload_texts=None, **kw):
    cfg = parse('[agent]\naddresses = ["192.0.2.1", "2001:db8::1"]\n' + config_text)
    dp, ike, res, clock = FakeDataplane(), FakeIke(), FakeResolver(answers), Clock()
    box = {"texts": reload_texts or group_texts}
    agent = Agent(cfg, dp, ike, res, groups(group_texts), clock=clock, rng=lambda: 0.5,
                  reload_groups=lambda: groups(box["texts"]), **kw)
    return agent, dp, ike, res, clock, box


def child(remote, spi_in=0x100, spi_out=0x200, local=LOCAL):
    remote = ipaddress.ip_address(remote)
    local = LOCAL6 if remote.version == 6 else local
    return ChildSaParams(local=local, remote=remote, spi_in=spi_in, spi_out=spi_out,
                         mode=Mode.TRANSPORT, alg=EspAlgorithm("aes-gcm-16", 256),
                         encr_key_in=b"k" * 36, encr_key_out=b"K" * 36,
                         ts_local=(TrafficSelector.host(local),),
                         ts_remote=(TrafficSelector.host(remote),))


def test_fakes_implement_the_protocol():
    for name in Dataplane.__dict__:
        if not name.startswith("_"):
            assert hasattr(FakeDataplane, name), name
