"""Simultaneous rekeys under every delivery order (hypothesis picks which in-flight datagram
arrives next): both sides always end with one IKE SA and one Child SA pair that match."""
from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oe_agent.ike.events import ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed
from oe_agent.ike.states import IkeState
from tests.unit.test_ike_sa_pair import A, B, Pair, config

KI = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KR = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _up(seed: int) -> Pair:
    p = Pair.make(config(KI, KR.public_key(), A, liveness_interval=0),
                  config(KR, KI.public_key(), B, liveness_interval=0), seed=seed)
    p.i.connect(p.now)
    p.run()
    assert p.i.state == p.r.state == IkeState.ESTABLISHED
    return p


def _shuffle_run(p: Pair, data) -> None:
    flight: list = []
    for _ in range(200):
        for sa in (p.i, p.r):
            flight += [(sa, d) for d in p.pending(sa)]
        if not flight:
            return
        sa, d = flight.pop(data.draw(st.integers(0, len(flight) - 1)))
        p.deliver(sa, [d])
        p.collect()
    raise AssertionError("no quiet state after 200 deliveries")


def _installed(events) -> set[int]:
    """Inbound SPIs the dataplane would hold after applying the events in order."""
    spis: set[int] = set()
    for e in events:
        if isinstance(e, ChildSaEstablished):
            spis.add(e.params.spi_in)
        elif isinstance(e, ChildSaRekeyed):
            spis.add(e.new.spi_in)
        elif isinstance(e, ChildSaDeleted):
            spis.discard(e.params.spi_in)
    return spis


def _settle_timers(p: Pair, data) -> None:
    """A request on a generation the peer already deleted is never answered: it lapses
    after its retransmissions (RFC 7296 §2.1). Run the clock until that has happened."""
    for _ in range(12):
        if not (p.i._retired or p.r._retired):
            return
        p.advance()
        _shuffle_run(p, data)


def _consistent(p: Pair) -> None:
    assert p.i.state == p.r.state == IkeState.ESTABLISHED, (p.i.last_error, p.r.last_error)
    assert (p.i.spi_i, p.i.spi_r) == (p.r.spi_i, p.r.spi_r)
    assert len(p.i.children) == len(p.r.children) == 1
    (ci,), (cr,) = p.i.children.values(), p.r.children.values()
    assert (ci.spi_in, ci.spi_out) == (cr.spi_out, cr.spi_in)
    assert ci.params.encr_key_out == cr.params.encr_key_in
    assert _installed(p.events_i) == {ci.spi_in} and _installed(p.events_r) == {cr.spi_in}
    assert not p.i._retired and not p.r._retired


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(1, 10_000), data=st.data())
def test_simultaneous_child_rekey_any_order(seed, data):
    p = _up(seed)
    p.i.rekey_child(next(iter(p.i.children)), p.now)
    p.r.rekey_child(next(iter(p.r.children)), p.now)
    _shuffle_run(p, data)
    _settle_timers(p, data)
    _consistent(p)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(1, 10_000), data=st.data())
def test_simultaneous_ike_rekey_any_order(seed, data):
    p = _up(seed)
    p.i.rekey(p.now)
    p.r.rekey(p.now)
    _shuffle_run(p, data)
    _settle_timers(p, data)
    _consistent(p)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(1, 10_000), data=st.data(),
       what=st.sampled_from(["child+ike", "ike+child", "delete+rekey"]))
def test_mixed_exchanges_any_order(seed, data, what):
    p = _up(seed)
    spi_i, spi_r = next(iter(p.i.children)), next(iter(p.r.children))
    if what == "child+ike":
        p.i.rekey_child(spi_i, p.now)
        p.r.rekey(p.now)
    elif what == "ike+child":
        p.i.rekey(p.now)
        p.r.rekey_child(spi_r, p.now)
    else:
        p.i.create_child(p.now)
        p.r.rekey_child(spi_r, p.now)
    _shuffle_run(p, data)
    _settle_timers(p, data)
    assert p.i.state == p.r.state == IkeState.ESTABLISHED, (p.i.last_error, p.r.last_error)
    assert (p.i.spi_i, p.i.spi_r) == (p.r.spi_i, p.r.spi_r)
    pairs_i = {(c.spi_in, c.spi_out) for c in p.i.children.values()}
    pairs_r = {(c.spi_out, c.spi_in) for c in p.r.children.values()}
    assert pairs_i == pairs_r and pairs_i
    assert _installed(p.events_i) == set(p.i.children)


def test_child_delete_on_the_old_ike_generation():
    """Found by the property above: a Child SA Delete that arrives on an IKE generation the
    receiver has just rekeyed away still deletes the Child SA."""
    p = _up(1)
    p.i.rekey_child(next(iter(p.i.children)), p.now)
    p.r.rekey(p.now)
    flight = [(p.i, d) for d in p.pending(p.i)] + [(p.r, d) for d in p.pending(p.r)]
    for pick in (0, 1, 0, 1, 0, 1, 0, 0):
        for sa in (p.i, p.r):
            flight += [(sa, d) for d in p.pending(sa)]
        if not flight:
            break
        sa, d = flight.pop(min(pick, len(flight) - 1))
        p.deliver(sa, [d])
        p.collect()
    p.run()
    for _ in range(12):
        if not (p.i._retired or p.r._retired):
            break
        p.advance()
        p.run()
    _consistent(p)
