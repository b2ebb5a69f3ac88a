import ipaddress
import logging

import pytest

from oe_agent.agent import shunts as sh
from oe_agent.agent.shunts import ShuntTable
from oe_agent.config import DEFAULTS
from oe_agent.model import ShuntKind

A = ipaddress.ip_address("192.0.2.2")
B = ipaddress.ip_address("2001:db8::2")
L = ipaddress.ip_address("192.0.2.1")
LT = dict(DEFAULTS["shunts"]["lifetimes"])


def table(rng=lambda: 0.5):
    return ShuntTable(dict(LT), rng)


def test_lifetimes_by_reason():
    t = table()
    assert t.failure(A, L, ShuntKind.PASS, sh.NO_KEY, 0).lifetime == 900
    assert t.failure(A, L, ShuntKind.PASS, sh.NO_KEY, 0, negative_ttl=3600).lifetime == 3600
    assert t.failure(A, L, ShuntKind.PASS, sh.NO_KEY, 0, negative_ttl=60).lifetime == 900
    assert t.failure(A, L, ShuntKind.PASS, sh.REFUSED, 0).lifetime == 300
    assert t.failure(A, L, ShuntKind.DROP, sh.INSECURE, 0).lifetime == 300
    assert t.failure(A, L, ShuntKind.PASS, sh.SILENT, 0).lifetime == 10  # rng 0.5 = no jitter


def test_bogus_is_a_short_drop_logged_as_attack(caplog):
    t = table()
    with caplog.at_level(logging.WARNING):
        s = t.failure(A, L, ShuntKind.PASS, sh.BOGUS, 0, detail="RRSIG expired")
    assert s.kind is ShuntKind.DROP and s.lifetime == 60
    assert "possible attack" in caplog.text and "192.0.2.2" in caplog.text


def test_silent_backoff_doubles_caps_and_resets():
    t = table()
    lts = [t.failure(A, L, ShuntKind.PASS, sh.SILENT, 0).lifetime for _ in range(8)]
    assert lts == [10, 20, 40, 80, 160, 320, 600, 600]
    # another peer has its own schedule
    assert t.failure(B, L, ShuntKind.PASS, sh.SILENT, 0).lifetime == 10
    t.succeeded(A)
    assert t.failure(A, L, ShuntKind.PASS, sh.SILENT, 0).lifetime == 10
    # a different reason resets the schedule too
    t.failure(A, L, ShuntKind.PASS, sh.SILENT, 0)
    t.failure(A, L, ShuntKind.PASS, sh.REFUSED, 0)
    assert t.failure(A, L, ShuntKind.PASS, sh.SILENT, 0).lifetime == 10


@pytest.mark.parametrize("r, expect", [(0.0, 8.0), (0.999999, 12.0)])
def test_jitter_bounds(r, expect):
    t = table(lambda: r)
    assert t.failure(A, L, ShuntKind.PASS, sh.SILENT, 0).lifetime == pytest.approx(expect, rel=1e-4)


def test_jitter_never_exceeds_max():
    t = table(lambda: 0.999999)
    for _ in range(10):
        s = t.failure(A, L, ShuntKind.PASS, sh.SILENT, 0)
    assert s.lifetime == 600


def test_expiry_through_heap_with_replacement_and_removal():
    t = table()
    t.negotiation(A, L, ShuntKind.HOLD, now=0)         # expires 30
    t.failure(B, L, ShuntKind.DROP, sh.REFUSED, now=0)  # expires 300
    assert t.next_deadline() == 30
    # replacing A's shunt makes the old heap entry stale
    t.failure(A, L, ShuntKind.PASS, sh.NO_KEY, now=5)  # expires 905
    assert t.next_deadline() == 300
    assert t.pop_expired(299) == []
    (s,) = t.pop_expired(300)
    assert s.remote == B and B not in t and len(t) == 1
    assert t.remove(A).reason == sh.NO_KEY
    assert t.next_deadline() is None and t.pop_expired(10**9) == []


def test_visible_record_and_packet_count():
    t = table()
    t.negotiation(A, L, ShuntKind.HOLD, now=100)
    t.count_packet(A, 3)
    t.failure(A, L, ShuntKind.PASS, sh.SILENT, now=110, detail="no answer to IKE_SA_INIT")
    d = t.get(A).to_dict(now=115)
    assert d == {"remote": "192.0.2.2", "local": "192.0.2.1", "kind": "pass", "reason": "silent",
                 "detail": "no answer to IKE_SA_INIT", "age": 5.0, "lifetime": 10.0,
                 "remaining": 5.0, "packets": 3}


def test_reason_maps():
    assert sh.IKE_REASON["no-proposal"] == sh.IKE_REASON["auth-failed"] == sh.REFUSED
    assert sh.IKE_REASON["timeout"] == sh.IKE_REASON["peer-unreachable"] == sh.SILENT
    assert sh.DNS_REASON["secure-denial"] == sh.NO_KEY and sh.DNS_REASON["bogus"] == sh.BOGUS
