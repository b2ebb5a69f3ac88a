"""IkeSa in memory, initiator <-> responder with a fixed clock (issue 2, acceptance 3)."""
from __future__ import annotations

import ipaddress

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oe_agent.ike.auth import NullCredential, PskCredential, SignatureCredential
from oe_agent.ike.const import ExchangeType, NotifyType
from oe_agent.ike.events import (ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed,
                                 IkeSaDeleted, IkeSaEstablished, IkeSaRekeyed,
                                 NegotiationFailed, PeerAlive, PeerKeyNeeded)
from oe_agent.ike.message import Message
from oe_agent.ike.payloads import IdInitiator
from oe_agent.ike.proposal import DEFAULT_IKE
from oe_agent.ike.sa import UNAUTHENTICATED, IkeConfig
from oe_agent.ike.states import IkeState
from oe_agent.model import Mode, TrafficSelector
from tests.unit.test_ike_sa_pair import A, B, Hosts, Pair

GROUPS = {31: "x25519", 19: "ecp256", 14: "modp2048"}


@pytest.fixture(scope="session")
def keys():
    """Private keys per auth method, generated once per session (RSA is slow)."""
    rsa_i = rsa.generate_private_key(65537, 2048)
    rsa_r = rsa.generate_private_key(65537, 2048)
    return {
        "ed25519": (ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()),
        "rsa-pss": (rsa_i, rsa_r),
        "rsa-pkcs1": (rsa_i, rsa_r),
        "ecdsa-p256": (ec.generate_private_key(ec.SECP256R1()),
                       ec.generate_private_key(ec.SECP256R1())),
        "ecdsa-p384": (ec.generate_private_key(ec.SECP384R1()),
                       ec.generate_private_key(ec.SECP384R1())),
    }


def configs(keys, method: str, group: int = 31, mode: Mode = Mode.TRANSPORT, **kw):
    ike = (f"aes256gcm16-prfsha256-{GROUPS[group]}",)
    common = dict(ike_proposals=ike, mode=mode, **kw)
    if mode == Mode.TUNNEL:
        net_a = (TrafficSelector.from_network("198.51.100.0/24"),)
        net_b = (TrafficSelector.from_network("203.0.113.0/24"),)
    else:
        net_a = net_b = ()
    ida, idb = IdInitiator.from_address(A), IdInitiator.from_address(B)
    if method == "psk":
        ca = IkeConfig(ida, PskCredential(b"s3cret" * 4), peer_psk=b"s3cret" * 4,
                       ts_local=net_a, ts_remote=net_b, **common)
        cb = IkeConfig(idb, PskCredential(b"s3cret" * 4), peer_psk=b"s3cret" * 4,
                       ts_local=net_b, ts_remote=net_a, **common)
        return ca, cb
    if method == "null":
        ca = IkeConfig(IdInitiator.null(), NullCredential(), allow_null=True,
                       ts_local=net_a, ts_remote=net_b, **common)
        cb = IkeConfig(IdInitiator.null(), NullCredential(), allow_null=True,
                       ts_local=net_b, ts_remote=net_a, **common)
        return ca, cb
    ka, kb = keys[method]
    pad = "pkcs1" if method == "rsa-pkcs1" else "pss"
    ca = IkeConfig(ida, SignatureCredential(ka, pad), peer_keys=(kb.public_key(),),
                   ts_local=net_a, ts_remote=net_b, **common)
    cb = IkeConfig(idb, SignatureCredential(kb, pad), peer_keys=(ka.public_key(),),
                   ts_local=net_b, ts_remote=net_a, **common)
    return ca, cb


def established(p: Pair) -> tuple:
    """Both sides up: the one Child SA pair, mirrored."""
    assert p.i.state == p.r.state == IkeState.ESTABLISHED, (p.i.last_error, p.r.last_error)
    ci, = p.of(p.events_i, ChildSaEstablished)
    cr, = p.of(p.events_r, ChildSaEstablished)
    a, b = ci.params, cr.params
    assert (a.spi_in, a.spi_out) == (b.spi_out, b.spi_in)
    assert (a.encr_key_out, a.integ_key_out) == (b.encr_key_in, b.integ_key_in)
    assert (a.encr_key_in, a.integ_key_in) == (b.encr_key_out, b.integ_key_out)
    assert a.encr_key_in != a.encr_key_out
    assert (a.ts_local, a.ts_remote) == (b.ts_remote, b.ts_local)
    assert a.mode == b.mode and a.alg == b.alg
    return a, b


def start(ca, cb, seed=1) -> Pair:
    p = Pair.make(ca, cb, seed)
    p.i.connect(p.now)
    p.run()
    return p


METHODS = ["ed25519", "rsa-pss", "rsa-pkcs1", "ecdsa-p256", "ecdsa-p384", "psk", "null"]


@pytest.mark.parametrize("mode", [Mode.TRANSPORT, Mode.TUNNEL])
@pytest.mark.parametrize("group", [31, 19, 14])
@pytest.mark.parametrize("method", METHODS)
def test_auth_method_group_mode(keys, method, group, mode):
    p = start(*configs(keys, method, group, mode))
    a, b = established(p)
    assert a.mode == mode
    ei, = p.of(p.events_i, IkeSaEstablished)
    er, = p.of(p.events_r, IkeSaEstablished)
    assert (ei.spi_i, ei.spi_r) == (er.spi_i, er.spi_r)
    assert ei.auth == er.auth == {"psk": "psk", "null": "null"}.get(method, "signature")
    assert ei.algorithms.endswith(f"/{group}")
    if mode == Mode.TUNNEL:
        assert a.ts_local == (TrafficSelector.from_network("198.51.100.0/24"),)
    else:
        assert a.ts_local == (TrafficSelector.host(A),)
    assert ei.encap == (4500, 4500)  # IKE floated (§2.23); no NAT, so ESP is not in UDP
    assert a.encap is None


@pytest.mark.parametrize("esp", ["aes128gcm16", "aes256-sha256", "chacha20poly1305"])
def test_esp_algorithms(keys, esp):
    ca, cb = configs(keys, "ed25519")
    p = start(*(IkeConfig(**{**c.__dict__, "esp_proposals": (esp,)}) for c in (ca, cb)))
    a, _ = established(p)
    assert a.alg.encr == {"aes128gcm16": "aes-gcm-16", "aes256-sha256": "aes-cbc",
                          "chacha20poly1305": "chacha20-poly1305"}[esp]
    if esp == "aes256-sha256":
        assert len(a.integ_key_in) == 32 and len(a.encr_key_in) == 32


def test_ike_cbc_hmac(keys):
    ca, cb = configs(keys, "ed25519")
    ca = IkeConfig(**{**ca.__dict__, "ike_proposals": ("aes128-sha256-prfsha256-modp2048",)})
    cb = IkeConfig(**{**cb.__dict__, "ike_proposals": DEFAULT_IKE})
    p = start(ca, cb)
    established(p)
    ei, = p.of(p.events_i, IkeSaEstablished)
    assert ei.algorithms.startswith("aes-cbc-128/")


def test_packet_loss_retransmits(keys):
    p = Pair.make(*configs(keys, "ed25519"))
    p.i.connect(p.now)
    lost = {("i", 1), ("r", 1), ("i", 3)}  # first INIT, first INIT answer, first AUTH retry
    for _ in range(10):
        p.run(drop=lambda sa, n: ("i" if sa is p.i else "r", n) in lost)
        if p.i.state == IkeState.ESTABLISHED:
            break
        p.advance()
    established(p)


def test_duplicates_get_cached_response(keys):
    p = Pair.make(*configs(keys, "ed25519"))
    p.i.connect(p.now)
    p.run(dup=True)
    established(p)
    # every request came twice; each duplicate got the cached response again
    from_r = [d for sa, d in p.wire if sa is p.r]
    assert len(from_r) == 2 * len({d.data for d in from_r})


def test_peer_unreachable_after_tries(keys):
    ca, cb = configs(keys, "ed25519", retransmit_tries=4)
    p = Pair.make(ca, cb)
    p.i.connect(p.now)
    sends = 0
    start_time = p.now
    while p.i.state != IkeState.CLOSED:
        sends += len(p.pending(p.i))
        p.advance()
        p.collect()
    fail, = p.of(p.events_i, NegotiationFailed)
    assert fail.reason == "peer-unreachable"
    assert sends == 4
    assert p.now - start_time == 1 + 2 + 4 + 8  # exponential backoff


def test_auth_timeout_is_timeout(keys):
    p = Pair.make(*configs(keys, "ed25519"))
    p.i.connect(p.now)
    p.run(drop=lambda sa, n: sa is p.i and n >= 2)  # IKE_AUTH never arrives
    while p.i.state != IkeState.CLOSED:
        p.advance()
        p.run(drop=lambda sa, n: True)
    assert [e.reason for e in p.of(p.events_i, NegotiationFailed)] == ["timeout"]


def test_no_proposal_chosen(keys):
    ca, cb = configs(keys, "ed25519")
    cb = IkeConfig(**{**cb.__dict__, "ike_proposals": ("aes128-sha256-prfsha256-modp2048",)})
    ca = IkeConfig(**{**ca.__dict__, "ike_proposals": ("aes256gcm16-prfsha256-x25519",)})
    p = start(ca, cb)
    fi, = p.of(p.events_i, NegotiationFailed)
    assert fi.reason == "no-proposal" and fi.notify == NotifyType.NO_PROPOSAL_CHOSEN
    assert p.i.state == p.r.state == IkeState.CLOSED


def test_child_no_proposal_keeps_ike_sa(keys):
    ca, cb = configs(keys, "ed25519")
    ca = IkeConfig(**{**ca.__dict__, "esp_proposals": ("aes128gcm16",)})
    cb = IkeConfig(**{**cb.__dict__, "esp_proposals": ("aes256-sha256",)})
    p = start(ca, cb)
    assert p.i.state == IkeState.ESTABLISHED
    fi, = p.of(p.events_i, NegotiationFailed)
    assert fi.child and fi.reason == "no-proposal"
    assert not p.of(p.events_i, ChildSaEstablished)


def test_ts_unacceptable(keys):
    ca, cb = configs(keys, "ed25519", mode=Mode.TUNNEL)
    cb = IkeConfig(**{**cb.__dict__, "ts_remote": (TrafficSelector.from_network("10.9.0.0/16"),)})
    p = start(ca, cb)
    fi, = p.of(p.events_i, NegotiationFailed)
    assert fi.reason == "ts-unacceptable"


def test_tunnel_narrowing(keys):
    ca, cb = configs(keys, "ed25519", mode=Mode.TUNNEL)
    cb = IkeConfig(**{**cb.__dict__,
                      "ts_remote": (TrafficSelector.from_network("198.51.100.0/25"),)})
    p = start(ca, cb)
    a, _ = established(p)
    assert a.ts_local == (TrafficSelector.from_network("198.51.100.0/25"),)


@pytest.mark.parametrize("method", ["ed25519", "rsa-pss", "ecdsa-p256", "psk"])
def test_authentication_failed_with_wrong_key(keys, method):
    ca, cb = configs(keys, method)
    if method == "psk":
        cb = IkeConfig(**{**cb.__dict__, "peer_psk": b"other" * 5})
    else:
        wrong = keys["ed25519" if method != "ed25519" else "ecdsa-p256"][0]
        cb = IkeConfig(**{**cb.__dict__, "peer_keys": (wrong.public_key(),)})
    p = start(ca, cb)
    assert [e.reason for e in p.of(p.events_r, NegotiationFailed)] == ["auth-failed"]
    fi, = p.of(p.events_i, NegotiationFailed)
    assert fi.reason == "auth-failed" and fi.notify == NotifyType.AUTHENTICATION_FAILED
    assert not p.of(p.events_i, ChildSaEstablished) and not p.of(p.events_r, ChildSaEstablished)


def test_initiator_rejects_responder_with_wrong_key(keys):
    ca, cb = configs(keys, "ed25519")
    ca = IkeConfig(**{**ca.__dict__, "peer_keys": (keys["ed25519"][0].public_key(),)})
    p = start(ca, cb)
    assert [e.reason for e in p.of(p.events_i, NegotiationFailed)] == ["auth-failed"]
    assert p.i.state == IkeState.CLOSED
    # the responder was told (INFORMATIONAL with AUTHENTICATION_FAILED) and gave up too
    assert p.r.state == IkeState.CLOSED


def test_null_refused_unless_allowed(keys):
    ca, cb = configs(keys, "null")
    cb = IkeConfig(**{**cb.__dict__, "allow_null": False, "peer_keys": ()})
    p = start(ca, cb)
    assert [e.reason for e in p.of(p.events_r, NegotiationFailed)] == ["auth-failed"]


def test_peer_keys_supplied_later(keys):
    """The initiator asks right after IKE_SA_INIT and holds IKE_AUTH (AUTH_WAIT); the
    responder asks once it has the initiator's ID; neither asks twice."""
    ca, cb = configs(keys, "ed25519")
    ka, kb = keys["ed25519"]
    ca = IkeConfig(**{**ca.__dict__, "peer_keys": None})
    cb = IkeConfig(**{**cb.__dict__, "peer_keys": None})
    p = start(ca, cb)
    need, = p.of(p.events_i, PeerKeyNeeded)
    assert need.peer_id is None and need.remote == B  # no IDr yet: the address names it
    assert p.i.state == IkeState.AUTH_WAIT and p.r.state == IkeState.INIT_DONE
    assert not [d for s, d in p.wire if s is p.i and b"\x23" == d.data[18:19]]  # no IKE_AUTH
    p.i.supply_peer_keys([kb.public_key()], p.now)
    p.run()
    need, = p.of(p.events_r, PeerKeyNeeded)
    assert str(need.peer_id) == str(A) and need.remote == A
    assert p.r.state == IkeState.KEYS_WAIT
    p.r.supply_peer_keys([ka.public_key()], p.now)
    p.run()
    assert len(p.of(p.events_i, PeerKeyNeeded)) == 1
    established(p)
    ei, = p.of(p.events_i, IkeSaEstablished)
    assert ei.auth == "signature" and ei.local_id == ca.local_id


def _exchanges(p: Pair, sa) -> list:
    return [Message.parse(d.data).exchange for s, d in p.wire if s is sa]


def test_keyless_peer_gets_auth_null_from_a_keyed_initiator(keys):
    """RFC 7619: the DNS answer says "no key, AUTH_NULL allowed" (UNAUTHENTICATED only): the
    keyed initiator authenticates as ID_NULL/AUTH_NULL; a keyed responder that allows AUTH_NULL
    and has no key of the initiator answers in kind."""
    ca, cb = configs(keys, "ed25519")
    ca = IkeConfig(**{**ca.__dict__, "peer_keys": None})  # allow_null off: the marker decides
    cb = IkeConfig(**{**cb.__dict__, "peer_keys": None, "allow_null": True})
    p = start(ca, cb)
    assert p.i.state == IkeState.AUTH_WAIT
    p.i.supply_peer_keys([UNAUTHENTICATED], p.now)
    p.run()
    established(p)
    assert not p.of(p.events_r, PeerKeyNeeded)
    ei, = p.of(p.events_i, IkeSaEstablished)
    er, = p.of(p.events_r, IkeSaEstablished)
    assert ei.auth == er.auth == "null"
    assert ei.local_id == er.local_id == IdInitiator.null()
    assert str(ei.remote_id) == str(er.remote_id) == "(null)"


def test_keyed_responder_still_signs_for_a_signing_initiator(keys):
    """Only an AUTH_NULL initiator gets AUTH_NULL back: a signing one is answered with the
    responder's key even when AUTH_NULL is allowed."""
    ca, cb = configs(keys, "ed25519")
    cb = IkeConfig(**{**cb.__dict__, "allow_null": True})
    p = start(ca, cb)
    established(p)
    ei, = p.of(p.events_i, IkeSaEstablished)
    er, = p.of(p.events_r, IkeSaEstablished)
    assert ei.auth == er.auth == "signature"
    assert er.local_id == cb.local_id


def test_no_usable_key_refuses_the_responder(keys):
    """Keys supplied empty (secure denial, AUTH_NULL not allowed): IKE_AUTH still goes out
    (a responder left half-open would hold its own traffic to us), the answer is refused and
    the responder told (AUTHENTICATION_FAILED), so it drops its Child SA at once."""
    ca, cb = configs(keys, "ed25519")
    ca = IkeConfig(**{**ca.__dict__, "peer_keys": None, "allow_null": True})
    p = start(ca, cb)
    p.i.supply_peer_keys([], p.now)
    p.run()
    failed, = p.of(p.events_i, NegotiationFailed)
    assert failed.reason == "auth-failed" and not failed.child
    assert p.i.state == p.r.state == IkeState.CLOSED
    assert [e.reason for e in p.of(p.events_r, NegotiationFailed)] == ["auth-failed"]


def test_initiator_key_wait_times_out_and_delete_ends_the_wait(keys):
    ca, cb = configs(keys, "ed25519")
    ca = IkeConfig(**{**ca.__dict__, "peer_keys": None, "key_wait_timeout": 5.0})
    p = start(ca, cb)
    assert p.i.get_timer() == p.now + 5
    p.now += 5
    p.i.handle_timer(p.now)
    p.collect()
    assert [e.reason for e in p.of(p.events_i, NegotiationFailed)] == ["timeout"]
    assert _exchanges(p, p.i) == [ExchangeType.IKE_SA_INIT]
    p = start(ca, cb)
    p.i.delete(p.now)
    p.run()
    assert p.i.state == IkeState.CLOSED and p.i.get_timer() is None
    assert _exchanges(p, p.i) == [ExchangeType.IKE_SA_INIT]


def test_unauthenticated_marker_allows_null(keys):
    ca, cb = configs(keys, "null")
    cb = IkeConfig(**{**cb.__dict__, "allow_null": False})
    p = start(ca, cb)
    assert p.of(p.events_r, PeerKeyNeeded)
    p.r.supply_peer_keys([UNAUTHENTICATED], p.now)
    p.run()
    established(p)


def test_key_wait_times_out(keys):
    ca, cb = configs(keys, "ed25519")
    cb = IkeConfig(**{**cb.__dict__, "peer_keys": None, "key_wait_timeout": 5.0})
    p = start(ca, cb)
    p.now += 5
    p.r.handle_timer(p.now)
    p.collect()
    assert [e.reason for e in p.of(p.events_r, NegotiationFailed)] == ["timeout"]


# --- CREATE_CHILD_SA ----------------------------------------------------------------------

def _child(p: Pair, sa) -> int:
    return next(iter(sa.children))


@pytest.mark.parametrize("side", ["i", "r"])
@pytest.mark.parametrize("pfs", [False, True])
def test_child_rekey(keys, side, pfs):
    ca, cb = configs(keys, "ed25519", esp_proposals=("aes256gcm16-x25519",) if pfs else
                     ("aes256gcm16",))
    p = start(ca, cb)
    first, _ = established(p)
    sa = getattr(p, side)
    sa.rekey_child(_child(p, sa), p.now)
    p.run()
    for evs, mine in ((p.events_i, p.i), (p.events_r, p.r)):
        rk, = p.of(evs, ChildSaRekeyed)
        dl, = p.of(evs, ChildSaDeleted)
        assert dl.params == rk.old
        assert list(mine.children) == [rk.new.spi_in]
    ri, = p.of(p.events_i, ChildSaRekeyed)
    rr, = p.of(p.events_r, ChildSaRekeyed)
    assert (ri.new.spi_in, ri.new.spi_out) == (rr.new.spi_out, rr.new.spi_in)
    assert ri.new.encr_key_out == rr.new.encr_key_in
    assert ri.new.encr_key_out != first.encr_key_out
    assert ri.old.spi_in == first.spi_in


def test_child_rekey_collision(keys):
    p = start(*configs(keys, "ed25519"))
    established(p)
    p.i.rekey_child(_child(p, p.i), p.now)
    p.r.rekey_child(_child(p, p.r), p.now)
    p.run()
    assert len(p.i.children) == len(p.r.children) == 1
    (si, ci), = p.i.children.items()
    (sr, cr), = p.r.children.items()
    assert (ci.spi_in, ci.spi_out) == (cr.spi_out, cr.spi_in)
    ri, = p.of(p.events_i, ChildSaRekeyed)
    rr, = p.of(p.events_r, ChildSaRekeyed)
    assert ri.new.spi_in == si and rr.new.spi_in == sr
    # the surviving pair was made by the exchange without the lowest of the four nonces
    ch_i, = (c for c in [ci])
    assert min(ci.ni, ci.nr) == min(cr.ni, cr.nr)
    assert len(p.of(p.events_i, ChildSaDeleted)) == len(p.of(p.events_r, ChildSaDeleted)) == 1


def test_create_additional_child(keys):
    p = start(*configs(keys, "ed25519"))
    established(p)
    p.r.create_child(p.now)
    p.run()
    assert len(p.i.children) == len(p.r.children) == 2
    assert len(p.of(p.events_i, ChildSaEstablished)) == 2


@pytest.mark.parametrize("side", ["i", "r"])
def test_ike_rekey(keys, side):
    p = start(*configs(keys, "ed25519"))
    a, _ = established(p)
    old = (p.i.spi_i, p.i.spi_r)
    getattr(p, side).rekey(p.now)
    p.run()
    ri, = p.of(p.events_i, IkeSaRekeyed)
    rr, = p.of(p.events_r, IkeSaRekeyed)
    assert (ri.old_spi_i, ri.old_spi_r) == old
    assert (ri.spi_i, ri.spi_r) == (rr.spi_i, rr.spi_r) == (p.i.spi_i, p.i.spi_r) != old
    assert not p.i._retired and not p.r._retired  # old generation deleted
    # the new IKE SA works: a child rekey over it
    p.i.rekey_child(_child(p, p.i), p.now)
    p.run()
    assert p.of(p.events_r, ChildSaRekeyed)
    assert p.i.state == p.r.state == IkeState.ESTABLISHED


def test_ike_rekey_collision(keys):
    p = start(*configs(keys, "ed25519"))
    established(p)
    p.i.rekey(p.now)
    p.r.rekey(p.now)
    p.run()
    assert (p.i.spi_i, p.i.spi_r) == (p.r.spi_i, p.r.spi_r)
    assert not p.i._retired and not p.r._retired
    assert p.i.state == p.r.state == IkeState.ESTABLISHED
    p.r.rekey_child(_child(p, p.r), p.now)
    p.run()
    assert p.of(p.events_i, ChildSaRekeyed)


# --- INFORMATIONAL -----------------------------------------------------------------------

@pytest.mark.parametrize("side", ["i", "r"])
def test_delete_child(keys, side):
    p = start(*configs(keys, "ed25519"))
    a, _ = established(p)
    sa = getattr(p, side)
    sa.delete_child(_child(p, sa), p.now)
    p.run()
    for evs in (p.events_i, p.events_r):
        d, = p.of(evs, ChildSaDeleted)
        assert d.params.spi_in in (a.spi_in, a.spi_out)
    assert not p.i.children and not p.r.children
    assert p.i.state == IkeState.ESTABLISHED


@pytest.mark.parametrize("side", ["i", "r"])
def test_delete_ike(keys, side):
    p = start(*configs(keys, "ed25519"))
    established(p)
    getattr(p, side).delete(p.now)
    p.run()
    assert p.i.state == p.r.state == IkeState.CLOSED
    for evs in (p.events_i, p.events_r):
        assert len(p.of(evs, ChildSaDeleted)) == 1
        assert len(p.of(evs, IkeSaDeleted)) == 1
    reasons = {e.reason for e in p.of(p.events_i + p.events_r, IkeSaDeleted)}
    assert reasons == {"local", "peer"}


def test_liveness_and_dead_peer(keys):
    ca, cb = configs(keys, "ed25519", liveness_interval=10.0, retransmit_tries=3)
    p = start(ca, cb)
    established(p)
    p.now += 10
    p.i.handle_timer(p.now)
    p.run()
    assert p.of(p.events_i, PeerAlive)
    # now the peer goes silent
    while p.i.state != IkeState.CLOSED:
        p.advance()
        p.run(drop=lambda sa, n: True)
    d, = p.of(p.events_i, IkeSaDeleted)
    assert d.reason == "dead-peer"
    assert len(p.of(p.events_i, ChildSaDeleted)) == 1


def test_nat_detected_keepalives_and_encap(keys):
    """The responder sees the initiator from another address/port (a NAT rewrote it)."""
    ca, cb = configs(keys, "ed25519", keepalive_interval=20.0, liveness_interval=0)
    p = Pair.make(ca, cb)
    p.i.connect(p.now)
    nat_port = {500: 31000, 4500: 32000}

    def deliver(sa, datagrams):
        peer = p.peer_of(sa)
        for d in datagrams:
            if sa is p.i:  # through the NAT
                peer.receive_datagram(d.data, (A, nat_port[d.local_port]), p.now,
                                      local_port=d.remote_port)
            else:
                peer.receive_datagram(d.data, (B, d.local_port), p.now,
                                      local_port={31000: 500, 32000: 4500}[d.remote_port])
    p.deliver = deliver
    p.run()
    a, b = established(p)
    ei, = p.of(p.events_i, IkeSaEstablished)
    er, = p.of(p.events_r, IkeSaEstablished)
    assert ei.nat_local and not ei.nat_remote
    assert er.nat_remote and not er.nat_local
    assert a.encap == (4500, 4500) and b.encap == (4500, 32000)
    p.now += 20
    p.i.handle_timer(p.now)
    ka = [d for d in p.i.datagrams_to_send(p.now) if d.keepalive]
    assert ka and ka[0].wire() == b"\xff" and ka[0].local_port == 4500


def test_floated_datagrams_carry_marker(keys):
    p = Pair.make(*configs(keys, "ed25519"))
    p.i.connect(p.now)
    p.run()
    ports = [(d.local_port, d.remote_port, d.wire()[:4] == b"\0\0\0\0") for _, d in p.wire]
    assert ports[0] == (500, 500, False)
    assert all(x == (4500, 4500, True) for x in ports[2:])


# --- endpoints: cookies, INVALID_KE_PAYLOAD, mutual initiation -----------------------------

def test_cookie_challenge(keys):
    ca, cb = configs(keys, "ed25519")
    h = Hosts.make(ca, cb, cookie_threshold=0)
    sa = h.a.connect(ca, A, B, h.now)
    h.run()
    assert sa.state == IkeState.ESTABLISHED
    first = Message.parse(h.sent[1][1].data)
    assert first.response and first.notify(NotifyType.COOKIE) is not None
    retry = Message.parse(h.sent[2][1].data)
    assert retry.payloads[0].notify_type == NotifyType.COOKIE


def test_cookie_only_over_threshold(keys):
    ca, cb = configs(keys, "ed25519")
    h = Hosts.make(ca, cb, cookie_threshold=1)
    h.a.connect(ca, A, B, h.now)
    h.run()
    assert not any(Message.parse(d.data).notify(NotifyType.COOKIE) for _, d in h.sent
                   if d.data[17] == ExchangeType.IKE_SA_INIT)


def test_invalid_ke_payload_retry(keys):
    ca, cb = configs(keys, "ed25519")
    ca = IkeConfig(**{**ca.__dict__, "ike_proposals": ("aes256gcm16-prfsha256-x25519-ecp256",)})
    cb = IkeConfig(**{**cb.__dict__, "ike_proposals": ("aes256gcm16-prfsha256-ecp256",)})
    h = Hosts.make(ca, cb)
    sa = h.a.connect(ca, A, B, h.now)
    h.run()
    assert sa.state == IkeState.ESTABLISHED
    ev = next(e for e in h.events["a"] if isinstance(e, IkeSaEstablished))
    assert ev.algorithms.endswith("/19")
    answer = Message.parse(h.sent[1][1].data)
    assert answer.notify(NotifyType.INVALID_KE_PAYLOAD).data == b"\x00\x13"


def test_mutual_initiation_one_ike_sa(keys):
    ca, cb = configs(keys, "ed25519")
    h = Hosts.make(ca, cb)
    h.a.connect(ca, A, B, h.now)
    h.b.connect(cb, B, A, h.now)
    h.run()
    assert len(h.a.sas) == len(h.b.sas) == 1
    sa_a, sa_b = h.a.sas[0], h.b.sas[0]
    assert sa_a.state == sa_b.state == IkeState.ESTABLISHED
    assert (sa_a.spi_i, sa_a.spi_r) == (sa_b.spi_i, sa_b.spi_r)
    assert len(sa_a.children) == len(sa_b.children) == 1
    (ca_, c1), = sa_a.children.items()
    (cb_, c2), = sa_b.children.items()
    assert (c1.spi_in, c1.spi_out) == (c2.spi_out, c2.spi_in)
    # the survivor is the IKE SA with the lower initiator nonce
    assert sa_a.first_ni == min(e.first_ni for e in (sa_a, sa_b))


def test_endpoint_refuses_unknown_peers():
    from oe_agent.ike.sa import IkeEndpoint
    from tests.unit.test_ike_sa_pair import seeded

    ep = IkeEndpoint(seeded(3), lambda local, remote: None)
    ep.receive_datagram(b"\x01" * 8 + bytes(8) + b"\x21\x20\x22\x08" + bytes(4)
                        + (28).to_bytes(4, "big"), (A, 500), (B, 500), 0.0)
    assert ep.dropped == 1 and not ep.sas and not ep.datagrams_to_send(0.0)


def test_ipv6_pair(keys):
    from oe_agent.ike.sa import IkeSa
    from tests.unit.test_ike_sa_pair import seeded

    a6, b6 = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")
    ca, cb = configs(keys, "ed25519")
    ca = IkeConfig(**{**ca.__dict__, "local_id": IdInitiator.from_address(a6)})
    p = Pair(IkeSa(ca, a6, b6, initiator=True, rng=seeded(1)),
             IkeSa(cb, b6, a6, initiator=False, rng=seeded(2)))
    p.i.connect(p.now)
    p.run()
    a, _ = established(p)
    assert a.ts_local == (TrafficSelector.host(a6),)


def test_endpoint_collects_direct_calls(keys):
    """An API call on an IkeSa (as the agent and the adapter's act() do) goes out with the
    endpoint's next datagrams_to_send, without waiting for a timer."""
    ca, cb = configs(keys, "ed25519")
    h = Hosts.make(ca, cb)
    sa = h.a.connect(ca, A, B, h.now)
    h.run()
    sa.rekey_child(next(iter(sa.children)), h.now)
    h.run()
    assert any(isinstance(e, ChildSaRekeyed) for e in h.events["b"])


@pytest.mark.parametrize("bad", [{"ike_proposals": ("aes999-x25519",)},
                                 {"esp_proposals": ("aes128gcm16-prfsha256",)},
                                 {"credential": "key"}, {"local_id": "192.0.2.1"},
                                 {"retransmit_tries": 0}, {"mode": "tunnel"}])
def test_config_errors_at_construction(keys, bad):
    ca, _ = configs(keys, "ed25519")
    with pytest.raises(ValueError):
        IkeConfig(**{**ca.__dict__, **bad})


def test_child_rekey_collision_late_request(keys):
    """r's rekey request reaches i only after i's own rekey finished (§2.8.1 late case)."""
    p = start(*configs(keys, "ed25519"))
    established(p)
    p.i.rekey_child(_child(p, p.i), p.now)
    p.r.rekey_child(_child(p, p.r), p.now)
    req_i, req_r = p.pending(p.i), p.pending(p.r)
    p.deliver(p.i, req_i)  # r answers i's rekey (collision noted at r)
    p.deliver(p.r, p.pending(p.r))  # i finishes: rekeyed, sends Delete of the old pair
    p.deliver(p.r, req_r)  # only now r's own request arrives at i
    p.collect()
    p.run()
    assert len(p.i.children) == len(p.r.children) == 1
    (ci,), (cr,) = p.i.children.values(), p.r.children.values()
    assert (ci.spi_in, ci.spi_out) == (cr.spi_out, cr.spi_in)
    for evs in (p.events_i, p.events_r):
        assert len(p.of(evs, ChildSaRekeyed)) == 1
        assert not [e for e in p.of(evs, NegotiationFailed)]


def test_ike_rekey_collision_late_request(keys):
    p = start(*configs(keys, "ed25519"))
    established(p)
    p.i.rekey(p.now)
    p.r.rekey(p.now)
    req_i, req_r = p.pending(p.i), p.pending(p.r)
    p.deliver(p.i, req_i)
    p.deliver(p.r, p.pending(p.r))  # i done: switches, deletes the old IKE SA
    p.deliver(p.r, req_r)  # i answers TEMPORARY_FAILURE on the old generation
    p.collect()
    p.run()
    assert p.i.state == p.r.state == IkeState.ESTABLISHED
    assert (p.i.spi_i, p.i.spi_r) == (p.r.spi_i, p.r.spi_r)
    p.r.rekey_child(_child(p, p.r), p.now)
    p.run()
    assert p.of(p.events_i, ChildSaRekeyed)


def test_delete_during_ike_auth_still_reaches_the_responder(keys):
    """delete() while our IKE_AUTH is out: the responder may already hold the SA, so the
    Delete follows as soon as IKE_AUTH completes (nothing is left behind on either side)."""
    p = Pair.make(*configs(keys, "ed25519"))
    p.i.connect(p.now)
    p.deliver(p.i, p.pending(p.i))
    p.deliver(p.r, p.pending(p.r))
    p.deliver(p.i, p.pending(p.i))  # IKE_AUTH request: r is established now
    assert p.r.state == IkeState.ESTABLISHED and p.i.state == IkeState.AUTH_SENT
    p.i.delete(p.now)
    p.run()
    p.advance(0)
    p.run()
    assert p.i.state == p.r.state == IkeState.CLOSED
    p.collect()
    assert len(p.of(p.events_r, IkeSaDeleted)) == 1


def test_transport_mode_through_an_address_translating_nat(keys):
    """The initiator (192.0.2.1 inside) appears as 203.0.113.7 to the responder: transport
    mode host selectors are taken as observed (RFC 7296 §2.23.1)."""
    from oe_agent.ike.sa import IkeSa
    from tests.unit.test_ike_sa_pair import seeded

    public = ipaddress.ip_address("203.0.113.7")
    ca, cb = configs(keys, "ed25519")
    p = Pair(IkeSa(ca, A, B, initiator=True, rng=seeded(1)),
             IkeSa(cb, B, public, initiator=False, rng=seeded(2)))

    def deliver(sa, datagrams):
        for d in datagrams:
            if sa is p.i:
                p.r.receive_datagram(d.data, (public, 40000 + d.local_port), p.now,
                                     local_port=d.remote_port)
            else:
                p.i.receive_datagram(d.data, (B, d.local_port), p.now,
                                     local_port=d.remote_port - 40000)
    p.deliver = deliver
    p.i.connect(p.now)
    p.run()
    assert p.i.state == p.r.state == IkeState.ESTABLISHED, (p.i.last_error, p.r.last_error)
    a, = (e.params for e in p.of(p.events_i, ChildSaEstablished))
    b, = (e.params for e in p.of(p.events_r, ChildSaEstablished))
    assert (a.spi_in, a.encr_key_in) == (b.spi_out, b.encr_key_out)
    assert a.ts_local == (TrafficSelector.host(A),) and a.ts_remote == (TrafficSelector.host(B),)
    assert b.ts_remote == (TrafficSelector.host(public),)
    assert a.encap == (4500, 4500) and b.encap == (4500, 44500)
