"""IkeEndpoint work per datagram / timer does not grow with the number of IKE SAs: counted
(which IkeSa objects get asked for output or deadlines), never timed."""
from __future__ import annotations

import gc
import ipaddress
import weakref

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from oe_agent.ike.events import ChildSaRekeyed, IkeSaEstablished
from oe_agent.ike.sa import IkeSa
from oe_agent.ike.states import IkeState
from tests.unit.test_ike_sa_pair import A, B, Hosts, config

IDLE = 1000  # half-open initiators to peers that never answer, each with its own deadline


@pytest.fixture
def crowd():
    """Host A holds IDLE pending SAs plus one established SA with host B."""
    ka, kb = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    ca = config(ka, kb.public_key(), A)
    cb = config(kb, ka.public_key(), B)
    h = Hosts.make(ca, cb)
    live = h.a.connect(ca, A, B, h.now)
    h.run()
    assert live.state == IkeState.ESTABLISHED
    assert any(isinstance(e, IkeSaEstablished) for e in h.events["a"])
    base = ipaddress.ip_address("2001:db8::1:0")
    for k in range(IDLE):  # staggered: SA k's retransmit falls due k ms after SA k-1's
        h.a.connect(ca, A, base + k, h.now + k / 1000)
    h.a.datagrams_to_send(h.now)  # the IKE_SA_INIT requests go nowhere
    while h.a.next_event() is not None:
        pass
    assert len(h.a.sas) == IDLE + 1
    return h, live


@pytest.fixture
def touched(monkeypatch):
    """ids of the IkeSa objects whose get_timer / datagrams_to_send ran since cleared."""
    seen: set[int] = set()
    for name in ("get_timer", "datagrams_to_send"):
        orig = getattr(IkeSa, name)

        def spy(self, *a, _orig=orig, **kw):
            seen.add(id(self))
            return _orig(self, *a, **kw)
        monkeypatch.setattr(IkeSa, name, spy)
    return seen


def brute_force_timer(ep) -> float | None:
    return min((t for sa in ep.sas if (t := sa.get_timer()) is not None), default=None)


def test_datagram_touches_only_its_sa(crowd, touched):
    h, live = crowd
    peer = h.b.sas[0]
    peer.check_liveness(h.now)  # B asks; A's answer must come from `live` alone
    (req,) = h.b.datagrams_to_send(h.now)
    touched.clear()
    h.a.receive_datagram(req.data, (req.remote, req.remote_port), (req.local, req.local_port),
                         h.now)
    out = h.a.datagrams_to_send(h.now)
    when = h.a.get_timer()
    assert touched <= {id(live)}
    assert [d.remote for d in out] == [B]
    assert when == brute_force_timer(h.a)


def test_timer_runs_only_due_sas(crowd, touched):
    h, _ = crowd
    first = h.a.get_timer()
    assert first == brute_force_timer(h.a)
    touched.clear()
    h.a.handle_timer(first)  # exactly one pending SA is due: it retransmits
    out = h.a.datagrams_to_send(first)
    nxt = h.a.get_timer()
    assert len(touched) <= 3
    assert len(out) == 1
    assert nxt is not None and nxt > first
    assert nxt == brute_force_timer(h.a)


def test_direct_call_sent_without_collect(crowd, touched):
    """sa.rekey_child(...) as the agent or IkeAdapter.act does: the endpoint learns of it
    by itself, and only that SA is drained."""
    h, live = crowd
    touched.clear()
    live.rekey_child(next(iter(live.children)), h.now)
    assert h.a.get_timer() == brute_force_timer(h.a)
    touched.clear()
    out = h.a.datagrams_to_send(h.now)
    assert touched <= {id(live)}
    assert [d.remote for d in out] == [B]
    h.b.receive_datagram(out[0].data, (out[0].remote, out[0].remote_port),
                         (out[0].local, out[0].local_port), h.now)
    h.run()
    assert any(isinstance(e, ChildSaRekeyed) for e in h.events["a"])


def test_indexes_follow_closing(crowd):
    """find() and the half-open count come from indexes that must drop closed SAs."""
    h, live = crowd
    assert h.a.find(B) == [live]
    live.delete(h.now)
    h.run()
    assert h.a.find(B) == [] and live not in h.a.sas
    assert h.a.get_timer() == brute_force_timer(h.a)
    assert h.a.half_open == sum(1 for sa in h.a.sas if sa.state == IkeState.INIT_DONE)


def test_closed_sas_are_not_kept(crowd):
    """Deadlines of closed SAs left in the timer heap must not keep those SAs alive."""
    h, live = crowd
    idle = [sa for sa in h.a.sas if sa is not live]
    ref = weakref.ref(idle[0])
    for sa in idle:
        sa.delete(h.now)  # half-open: closes at once
    h.a.datagrams_to_send(h.now)
    while h.a.next_event() is not None:
        pass
    del idle, sa
    gc.collect()
    assert ref() is None
    assert h.a.sas == [live]
    assert h.a.get_timer() == live.get_timer()
