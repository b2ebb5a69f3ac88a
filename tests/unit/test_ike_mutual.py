"""Mutual initiation against a peer without our tie-break (as strongSwan charon), and
INITIAL_CONTACT only when no other IKE SA with the peer exists (RFC 7296 §1.4.1, §2.4)."""
from __future__ import annotations

import pytest

from oe_agent.ike.const import ExchangeType, NotifyType
from oe_agent.ike.events import IkeSaDeleted
from oe_agent.ike.message import Message, peek_header
from oe_agent.ike.sa import IkeEndpoint
from oe_agent.ike.states import IkeState
from tests.unit.test_ike_sa import configs, keys  # noqa: F401  (session fixture)
from tests.unit.test_ike_sa_pair import A, B, Hosts, seeded


class NoTieBreak(IkeEndpoint):
    """A peer that keeps every IKE SA it establishes (charon has no mutual-initiation rule)."""

    def _settle_duplicate(self, sa, now):
        return None


def one_sa_each(h: Hosts):
    live_a = [s for s in h.a.sas if s.state != IkeState.CLOSED]
    live_b = [s for s in h.b.sas if s.state != IkeState.CLOSED]
    assert len(live_a) == len(live_b) == 1, (h.a.sas, h.b.sas)
    sa_a, sa_b = live_a[0], live_b[0]
    assert sa_a.state == sa_b.state == IkeState.ESTABLISHED
    assert (sa_a.spi_i, sa_a.spi_r) == (sa_b.spi_i, sa_b.spi_r)
    (c1,), (c2,) = sa_a.children.values(), sa_b.children.values()
    assert (c1.spi_in, c1.spi_out) == (c2.spi_out, c2.spi_in)
    return sa_a, sa_b


def settle(h: Hosts) -> None:
    h.run()
    for _ in range(20):  # bounded: retransmissions of anything still open
        if h.a.get_timer() is None and h.b.get_timer() is None:
            break
        if all(s.state in (IkeState.ESTABLISHED, IkeState.CLOSED) for s in h.a.sas + h.b.sas) \
                and not any(s._ks.pending for s in h.a.sas + h.b.sas):
            break
        h.advance()
        h.run()


@pytest.mark.parametrize("seed", range(6))
def test_mutual_initiation_against_peer_without_tie_break(keys, seed):  # noqa: F811
    """Whichever SA loses (ours or the peer's), we delete it: both end with one IKE SA."""
    ca, cb = configs(keys, "ed25519")
    a = IkeEndpoint(seeded(seed * 2 + 100), lambda local, remote: ca)
    b = NoTieBreak(seeded(seed * 2 + 101), lambda local, remote: cb)
    h = Hosts(a, b)
    mine = a.connect(ca, A, B, h.now)
    theirs = b.connect(cb, B, A, h.now)
    settle(h)
    sa_a, _ = one_sa_each(h)
    assert sa_a.first_ni == min(mine.first_ni, theirs.first_ni)  # the lower Ni survives
    # the loser went by a Delete from us, acknowledged by the peer
    assert any(isinstance(e, IkeSaDeleted) for e in h.events["b"])
    assert {mine.state, theirs.state} == {IkeState.ESTABLISHED, IkeState.CLOSED}


@pytest.mark.parametrize("seed", range(4))
def test_mutual_initiation_both_delete_the_loser(keys, seed):  # noqa: F811
    """Two oe-agents both delete the losing SA: the crossing Deletes are harmless."""
    ca, cb = configs(keys, "ed25519")
    h = Hosts.make(ca, cb, seed=seed * 2 + 40)
    mine = h.a.connect(ca, A, B, h.now)
    theirs = h.b.connect(cb, B, A, h.now)
    settle(h)
    sa_a, _ = one_sa_each(h)
    assert sa_a.first_ni == min(mine.first_ni, theirs.first_ni)
    # each side sent a Delete for the loser; each answered the other's (§1.4.1)
    assert any(isinstance(e, IkeSaDeleted) for e in h.events["a"])
    assert any(isinstance(e, IkeSaDeleted) for e in h.events["b"])


def _auth_requests(h: Hosts, sas) -> list[tuple[object, Message]]:
    """Decrypted IKE_AUTH requests sent by the initiator SAs `sas`."""
    out = []
    for _, d in h.sent:
        hdr = peek_header(d.data)
        if hdr.exchange != ExchangeType.IKE_AUTH or hdr.response:
            continue
        sa = next(s for s in sas if s.spi_i == hdr.spi_i)
        spi_i, spi_r, cipher, k = sa.ike_keys()
        out.append((sa, Message.parse(d.data).decrypted(cipher, k.sk_ei, k.sk_ai)))
    return out


def test_initial_contact_only_without_other_sa(keys):  # noqa: F811
    ca, cb = configs(keys, "ed25519")
    h = Hosts.make(ca, cb)
    first = h.a.connect(ca, A, B, h.now)
    settle(h)
    assert first.state == IkeState.ESTABLISHED
    # a second IKE SA with the same peer while the first stands: no INITIAL_CONTACT
    second = h.a.connect(ca, A, B, h.now)
    settle(h)
    assert second.state == IkeState.ESTABLISHED
    sent = dict((id(sa), msg) for sa, msg in _auth_requests(h, [first, second]))
    assert sent[id(first)].notify(NotifyType.INITIAL_CONTACT) is not None
    assert sent[id(second)].notify(NotifyType.INITIAL_CONTACT) is None


def test_no_initial_contact_while_peer_sa_half_open(keys):  # noqa: F811
    """Mutual initiation: each side's IKE_AUTH is built while the peer's SA is half-open."""
    ca, cb = configs(keys, "ed25519")
    h = Hosts(IkeEndpoint(seeded(5), lambda local, remote: ca),
              NoTieBreak(seeded(6), lambda local, remote: cb))
    mine = h.a.connect(ca, A, B, h.now)
    theirs = h.b.connect(cb, B, A, h.now)
    settle(h)
    requests = _auth_requests(h, [mine, theirs])
    assert {id(sa) for sa, _ in requests} == {id(mine), id(theirs)}
    assert all(m.notify(NotifyType.INITIAL_CONTACT) is None for _, m in requests)
