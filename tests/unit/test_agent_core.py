"""The core's decisions with a fake dataplane, a recording IKE link and a fake resolver.

Time is a fixed clock moved by hand; queued inputs are drained explicitly (`settle`).
"""
import asyncio
import ipaddress

import pytest

from oe_agent.agent import core
from oe_agent.agent.core import (UNAUTHENTICATED, ChildGone, ChildRekeyed, ChildUp, DnsAnswer,
                                 Failed, IkeRequest, KeyNeeded)
from oe_agent.agent.peer import PeerState
from oe_agent.errors import UserError
from oe_agent.model import Acquire, PolicyExpire, SaExpire
from tests.unit.test_agent_fakes import (LOCAL, LOCAL6, Answer, FakeDataplane, a_key, child,
                                        make_agent)

POC = ipaddress.ip_address("192.0.2.7")          # private-or-clear
PRIV = ipaddress.ip_address("198.51.100.7")      # private
COP = ipaddress.ip_address("203.0.113.7")        # clear-or-private
CLEAR = ipaddress.ip_address("203.0.113.130")
BLOCK = ipaddress.ip_address("203.0.113.200")
POC6 = ipaddress.ip_address("2001:db8::7")


def rev(a):
    return str(a)


async def settle(agent):
    """Let lookup tasks finish and handle everything they posted."""
    for _ in range(20):
        await asyncio.sleep(0)
        while not agent.queue.empty():
            item = agent.queue.get_nowait()
            if item is not None:
                await agent.handle(item)


async def started(*a, **kw):
    agent, dp, ike, res, clock, box = make_agent(*a, **kw)
    await agent.start()
    return agent, dp, ike, res, clock, box


async def acquire(agent, dst, src=None):
    dst = ipaddress.ip_address(dst)
    await agent.handle(Acquire(src=src or (LOCAL6 if dst.version == 6 else LOCAL), dst=dst))


async def test_start_installs_group_state_with_exemptions():
    agent, dp, *_ = await started()
    net = ipaddress.ip_network
    assert dp.policies[(net("192.0.2.0/24"), 0, 0)] == "trap"
    assert dp.policies[(net("198.51.100.0/25"), 0, 0)] == "trap"
    assert dp.policies[(net("203.0.113.128/26"), 0, 0)] == "pass"
    assert dp.policies[(net("203.0.113.192/26"), 0, 0)] == "block"
    assert (net("203.0.113.0/25"), 0, 0) not in dp.policies  # clear-or-private: no state
    assert dp.policies[(net("192.0.2.1/32"), 0, 0)] == "pass"  # own address never trapped
    assert dp.policies[(net("2001:db8::1/128"), 0, 0)] == "pass"


async def test_initiator_dns_in_parallel_then_keys_then_install():
    key = a_key()
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (key,))})
    res.gate.clear()  # DNS is slow: IKE_SA_INIT must not wait for it
    await acquire(agent, POC)
    await asyncio.sleep(0)
    assert ike.of("initiate") == [("initiate", POC, 1, pytest.approx(ike.of("initiate")[0][3]), False)]
    assert res.asked == [str(POC)]
    assert dp.shunts[(LOCAL, POC)][0] == "hold"
    assert agent.peers[POC].state is PeerState.NEGOTIATING
    await agent.handle(KeyNeeded(POC, ike_id=1))
    assert ike.of("keys") == []  # not before the answer
    res.gate.set()
    await settle(agent)
    assert ike.of("keys") == [("keys", POC, 1, [key.public_key])]
    await agent.handle(ChildUp(POC, child(POC), ike_id=1))
    assert agent.peers[POC].state is PeerState.UP
    assert (LOCAL, POC) not in dp.shunts and set(dp.sas) == {0x100}
    assert "authenticated (DNSSEC key)" in agent.explain(POC, clock())["now"]


async def test_answer_before_key_needed_is_kept():
    key = a_key()
    agent, dp, ike, res, *_ = await started(answers={rev(POC): Answer("secure-key", (key,))})
    await acquire(agent, POC)
    await settle(agent)
    await agent.handle(KeyNeeded(POC, ike_id=1))
    assert ike.of("keys") == [("keys", POC, 1, [key.public_key])]


@pytest.mark.parametrize("dst, kind", [(POC, "pass"), (PRIV, "drop")])
async def test_no_key_published_long_shunt_then_exact_trap_restore(dst, kind):
    agent, dp, ike, res, clock, _ = await started(answers={rev(dst): Answer("secure-denial", ttl=3600)})
    before = dp.snapshot()
    await acquire(agent, dst)
    await agent.handle(KeyNeeded(dst, ike_id=1))
    await settle(agent)
    # the waiting IKE SA is refused (the peer hears AUTHENTICATION_FAILED), not dropped
    assert ike.of("keys") == [("keys", dst, 1, [])] and ike.of("abort") == []
    assert dp.shunts[(LOCAL, dst)][0] == kind
    s = agent.shunts.get(dst)
    assert s.reason == "no-key" and s.lifetime == 3600  # negative TTL is longer than 900
    assert agent.peers[dst].state is PeerState.SHUNTED
    clock.t += 3599
    await agent.on_timers(clock())
    assert agent.peers[dst].state is PeerState.SHUNTED
    clock.t += 1
    await agent.on_timers(clock())
    assert agent.peers[dst].state is PeerState.TRAP
    assert dp.snapshot() == before  # expiry restores the trap exactly
    assert "expired" in " ".join(e["event"] for e in agent.explain(dst, clock())["history"])


async def test_silent_peer_backs_off():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    lifetimes = []
    for n in range(3):
        await acquire(agent, POC)
        await settle(agent)
        ike_id = ike.of("initiate")[-1][2]
        await agent.handle(Failed(POC, "timeout", ike_id=ike_id))
        s = agent.shunts.get(POC)
        lifetimes.append(s.lifetime)
        assert s.reason == "silent" and dp.shunts[(LOCAL, POC)][0] == "pass"
        clock.t += s.lifetime
        await agent.on_timers(clock())
    assert lifetimes == [10, 20, 40]


@pytest.mark.parametrize("reason", ["no-proposal", "ts-unacceptable", "auth-failed"])
async def test_refused_is_normal_lifetime(reason):
    agent, dp, ike, res, clock, _ = await started(answers={rev(PRIV): Answer("secure-key", (a_key(),))})
    await acquire(agent, PRIV)
    await agent.handle(Failed(PRIV, reason, ike_id=1))
    s = agent.shunts.get(PRIV)
    assert (s.reason, s.lifetime, s.kind.value) == ("refused", 300, "drop")


async def test_bogus_drops_even_for_private_or_clear(caplog):
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("bogus", reason="RRSIG expired")})
    await acquire(agent, POC)
    await settle(agent)
    s = agent.shunts.get(POC)
    assert (s.kind.value, s.reason, s.lifetime) == ("drop", "bogus", 60)
    assert dp.shunts[(LOCAL, POC)][0] == "drop"
    assert "possible attack" in caplog.text


async def test_insecure_key_ok_for_poc_marked_unauthenticated_but_not_for_private():
    k = a_key()
    agent, dp, ike, res, clock, _ = await started(
        answers={rev(POC): Answer("insecure", (k,)), rev(PRIV): Answer("insecure", (k,))})
    for dst in (POC, PRIV):
        await acquire(agent, dst)
        await agent.handle(KeyNeeded(dst, ike_id=ike.of("initiate")[-1][2]))
        await settle(agent)
    assert [(c[1], c[3] == []) for c in ike.of("keys")] == [(POC, False), (PRIV, True)]
    await agent.handle(ChildUp(POC, child(POC), ike_id=1))
    assert "unauthenticated (key from unsigned DNS)" in agent.explain(POC, clock())["now"]
    s = agent.shunts.get(PRIV)
    assert (s.kind.value, s.reason) == ("drop", "insecure")


async def test_auth_null_where_configured_never_for_private():
    agent, dp, ike, res, clock, _ = await started(
        "[ike]\nauth_null = true\n",
        answers={rev(POC): Answer("secure-denial"), rev(PRIV): Answer("secure-denial")})
    await acquire(agent, POC)
    await acquire(agent, PRIV)
    assert [(c[1], c[4]) for c in ike.of("initiate")] == [(POC, True), (PRIV, False)]
    await agent.handle(KeyNeeded(POC, ike_id=1))
    await agent.handle(KeyNeeded(PRIV, ike_id=2))
    await settle(agent)
    assert ike.of("keys") == [("keys", POC, 1, UNAUTHENTICATED), ("keys", PRIV, 2, [])]
    assert agent.shunts.get(PRIV).reason == "no-key"
    await agent.handle(ChildUp(POC, child(POC), ike_id=1, auth="null"))
    assert "AUTH_NULL" in agent.explain(POC, clock())["now"]


@pytest.mark.parametrize("dst, expect", [(COP, True), (POC, True), (PRIV, True), (CLEAR, False),
                                         (BLOCK, False), (ipaddress.ip_address("198.51.100.200"), False)])
async def test_responder_answers_only_where_the_group_says(dst, expect):
    agent, *_ = await started()
    assert agent.may_respond(dst) is expect


async def test_responder_looks_up_key_and_installs():
    key = a_key()
    agent, dp, ike, res, clock, _ = await started(answers={rev(COP): Answer("secure-key", (key,))})
    await agent.handle(IkeRequest(COP, LOCAL, ike_id="r1"))
    assert agent.peers[COP].state is PeerState.RESPONDING
    await agent.handle(KeyNeeded(COP, ike_id="r1"))
    await settle(agent)
    assert ike.of("keys") == [("keys", COP, "r1", [key.public_key])]
    await agent.handle(ChildUp(COP, child(COP), ike_id="r1"))
    assert agent.peers[COP].state is PeerState.UP and set(dp.sas) == {0x100}
    assert dp.shunts == {}


async def test_fqdn_identity_is_keyed_by_its_own_name_whatever_order_the_answers_come():
    """The key of a peer that names itself by FQDN comes from that name (product.md §4): an
    address answer arriving later neither replaces it nor fails the peer, and the address's
    own negotiations still get the address's key."""
    fq, addr_key = a_key(), a_key()
    agent, dp, ike, res, clock, _ = await started(answers={
        rev(COP): Answer("secure-key", (addr_key,)), "host.example.org": Answer("secure-key", (fq,))})
    res.gate.clear()
    await agent.handle(IkeRequest(COP, LOCAL, ike_id="r1"))
    await agent.handle(KeyNeeded(COP, ike_id="r1", peer_id="Host.Example.Org.", fqdn="Host.Example.Org."))
    await asyncio.sleep(0)
    assert res.asked == [str(COP), "host.example.org"]
    # the FQDN's answer first, the address's after it
    await agent.handle(DnsAnswer(COP, res.answers["host.example.org"], "host.example.org"))
    assert ike.of("keys") == [("keys", COP, "r1", [fq.public_key])]
    res.gate.set()
    await settle(agent)
    assert ike.of("keys") == [("keys", COP, "r1", [fq.public_key])]
    await agent.handle(KeyNeeded(COP, ike_id="r2", peer_id=str(COP)))  # an IP identity
    assert ike.of("keys")[-1] == ("keys", COP, "r2", [addr_key.public_key])
    await agent.handle(ChildUp(COP, child(COP), ike_id="r1"))
    assert agent.peers[COP].state is PeerState.UP
    assert agent.explain(COP, clock())["dns"]["name"] == str(COP)


async def test_fqdn_identity_without_a_key_refuses_that_ike_sa_only():
    """No key at the FQDN: that IKE SA is refused (the engine answers AUTHENTICATION_FAILED);
    the address's good answer stays, and no shunt is decided on the FQDN's word."""
    addr_key = a_key()
    agent, dp, ike, res, clock, _ = await started(answers={
        rev(POC): Answer("secure-key", (addr_key,)), "nokey.example.org": Answer("secure-denial")})
    await acquire(agent, POC)
    await settle(agent)
    await agent.handle(KeyNeeded(POC, ike_id="r1", peer_id="nokey.example.org", fqdn="nokey.example.org"))
    await settle(agent)
    assert ike.of("keys") == [("keys", POC, "r1", [])]
    assert agent.peers[POC].state is PeerState.NEGOTIATING and dp.shunts[(LOCAL, POC)][0] == "hold"
    await agent.handle(KeyNeeded(POC, ike_id=1))
    assert ike.of("keys")[-1] == ("keys", POC, 1, [addr_key.public_key])


async def test_address_denial_does_not_fail_a_peer_waiting_on_its_fqdn_key():
    fq = a_key()
    agent, dp, ike, res, clock, _ = await started(answers={
        rev(POC): Answer("secure-denial"), "host.example.org": Answer("secure-key", (fq,))})
    await agent.handle(IkeRequest(POC, LOCAL, ike_id="r1"))
    await agent.handle(KeyNeeded(POC, ike_id="r1", peer_id="host.example.org", fqdn="host.example.org"))
    await settle(agent)
    assert ike.of("keys") == [("keys", POC, "r1", [fq.public_key])]
    assert POC not in agent.shunts
    await agent.handle(ChildUp(POC, child(POC), ike_id="r1"))
    assert agent.peers[POC].state is PeerState.UP
    assert "authenticated (DNSSEC key)" in agent.explain(POC, clock())["now"]


async def test_responder_for_a_group_that_does_not_answer_aborts():
    agent, dp, ike, *_ = await started()
    await agent.handle(IkeRequest(CLEAR, LOCAL, ike_id="r1"))
    assert ike.of("abort") == [("abort", CLEAR, "r1", "group does not answer")]
    assert agent.peers[CLEAR].state is PeerState.TRAP


async def test_incoming_sa_replaces_pending_pass_shunt():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await acquire(agent, POC)
    await agent.handle(Failed(POC, "timeout", ike_id=1))
    assert dp.shunts[(LOCAL, POC)][0] == "pass"
    await agent.handle(IkeRequest(POC, LOCAL, ike_id="r"))
    await agent.handle(ChildUp(POC, child(POC), ike_id="r"))
    assert agent.peers[POC].state is PeerState.UP
    assert dp.shunts == {} and POC not in agent.shunts


async def test_mutual_initiation_ends_in_one_sa_pair():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await acquire(agent, POC)                                  # our IKE SA 1
    await agent.handle(IkeRequest(POC, LOCAL, ike_id="theirs"))  # theirs crosses it
    await settle(agent)
    # the engine's tie-break: ours loses, theirs completes
    await agent.handle(Failed(POC, "internal", ike_id=1, detail="lost simultaneous-init tie-break"))
    assert agent.peers[POC].state is PeerState.NEGOTIATING and agent.shunts.get(POC).reason == "negotiating"
    await agent.handle(ChildUp(POC, child(POC), ike_id="theirs"))
    assert agent.peers[POC].state is PeerState.UP and len(dp.sas) == 1 and dp.shunts == {}


async def test_acquire_while_the_peer_negotiates_joins_it():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await agent.handle(IkeRequest(POC, LOCAL, ike_id="theirs"))
    await acquire(agent, POC)
    assert ike.of("initiate") == [] and dp.shunts[(LOCAL, POC)][0] == "hold"
    await agent.handle(ChildUp(POC, child(POC), ike_id="theirs"))
    assert dp.shunts == {} and agent.peers[POC].state is PeerState.UP


async def up(agent, dst, spi=0x100):
    await acquire(agent, dst)
    await settle(agent)
    ike_id = agent.ike.of("initiate")[-1][2]
    await agent.handle(ChildUp(dst, child(dst, spi, spi + 1), ike_id=ike_id))
    assert agent.peers[dst].state is PeerState.UP


async def test_acquire_from_another_local_address_gets_a_pair_of_its_own():
    """Transport-mode pairs are per host pair: traffic from a second address of ours (an IPv6
    temporary address, say) to a peer that is up gets its own IKE SA, once; the first pair
    stays. An ACQUIRE from the address that has its pair starts nothing, but is shown."""
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    await acquire(agent, POC)  # raised before the pair was in
    assert len(ike.of("initiate")) == 1
    other = ipaddress.ip_address("192.0.2.99")
    await acquire(agent, POC, src=other)
    await acquire(agent, POC, src=other)  # its negotiation runs: not a second one
    p = agent.peers[POC]
    starts = ike.of("initiate")
    assert len(starts) == 2 and ike.sources[starts[1][2]] == other, starts
    assert p.state is PeerState.UP and not dp.shunts
    await agent.handle(KeyNeeded(POC, ike_id=starts[1][2]))
    assert any(c[0] == "keys" and c[2] == starts[1][2] and c[3] for c in ike.calls), ike.calls
    await agent.handle(ChildUp(POC, child(POC, 0x500, 0x501, local=other), ike_id=starts[1][2]))
    assert set(p.children) == {0x100, 0x500} and set(dp.sas) == {0x100, 0x500}
    assert p.state is PeerState.UP and p.local == ipaddress.ip_address(LOCAL)
    await acquire(agent, POC, src=other)  # it has its pair now
    assert len(ike.of("initiate")) == 2
    events = [e for _, e in p.history]
    assert sum("while up ignored" in e for e in events) == 2, events
    assert any(f"a pair of its own from {other}" in e for e in events), events
    assert any(f"Child SA up from {other}" in e for e in events), events
    assert agent.metrics["acquires_while_up"] == 4
    assert 'oe_agent_events_total{kind="acquires_while_up"} 4' in agent.metrics_text(clock())


async def test_rekey_on_soft_expire_then_replace():
    """Our rekey: the new pair sends at once; the old one still decrypts until its Delete
    exchange ends, and GRACE_S after that (what the peer sent on it meanwhile)."""
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    await agent.handle(SaExpire(spi=0x100, dst=LOCAL, hard=False))
    assert ike.of("rekey") == [("rekey", POC, 0x100)]
    await agent.handle(SaExpire(spi=0x101, dst=POC, hard=False))  # the out SA's, same pair
    assert len(ike.of("rekey")) == 1  # being rekeyed: asked once, logged once
    assert sum("rekeying" in e for _, e in agent.peers[POC].history) == 1
    await agent.handle(ChildRekeyed(POC, child(POC, 0x300, 0x301), old_spi_in=0x100))
    assert set(dp.sas) == {0x100, 0x300} and dp.sending[(LOCAL, POC)] == 0x301
    await agent.handle(SaExpire(spi=0x100, dst=LOCAL, hard=False))  # its soft expire again
    assert len(ike.of("rekey")) == 1  # rekeyed already: not again
    await agent.handle(ChildGone(POC, 0x100, reason="local"))  # our Delete was answered
    assert set(agent.peers[POC].children) == {0x300} and set(dp.sas) == {0x100, 0x300}
    clock.t += core.GRACE_S + 0.1
    await agent.on_timers(clock())
    assert set(dp.sas) == {0x300} and agent.peers[POC].state is PeerState.UP


async def test_a_rekey_the_peer_started_moves_our_traffic_when_it_deletes_the_old_pair():
    """RFC 7296 §2.8: the peer sends on the new pair once it has our answer, then deletes the
    old one; until that Delete our traffic stays on the old pair (the peer may not have the
    new one yet), and the new pair only receives."""
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    await agent.handle(ChildRekeyed(POC, child(POC, 0x300, 0x301), old_spi_in=0x100,
                                    initiator=False))
    assert set(dp.sas) == {0x100, 0x300} and dp.sending[(LOCAL, POC)] == 0x101
    await agent.handle(ChildGone(POC, 0x100, reason="peer"))
    assert dp.sending[(LOCAL, POC)] == 0x301 and ("add_outbound", 0x300) in dp.calls
    clock.t += core.GRACE_S + 0.1
    await agent.on_timers(clock())
    assert set(dp.sas) == {0x300}
    # a peer that never deletes the old pair: our traffic moves after OUT_WAIT_S anyway
    await agent.handle(ChildRekeyed(POC, child(POC, 0x500, 0x501), old_spi_in=0x300,
                                    initiator=False))
    assert dp.sending[(LOCAL, POC)] == 0x301
    clock.t += core.OUT_WAIT_S + 0.1
    await agent.on_timers(clock())
    assert dp.sending[(LOCAL, POC)] == 0x501 and set(dp.sas) == {0x300, 0x500}
    assert "no Delete for the rekeyed SA" in " ".join(e for _, e in agent.peers[POC].history)


async def test_peer_dead_removes_sas_and_next_packet_renegotiates():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    await agent.handle(ChildGone(POC, None, reason="liveness: peer dead"))
    assert dp.sas == {} and agent.peers[POC].state is PeerState.TRAP
    await up(agent, POC, spi=0x500)  # restart detected: re-established on the next packet
    assert set(dp.sas) == {0x500}


async def test_peer_restart_new_ike_sa_then_old_one_goes():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    await agent.handle(IkeRequest(POC, LOCAL, ike_id="new"))
    await agent.handle(ChildUp(POC, child(POC, 0x700, 0x701), ike_id="new"))
    assert set(dp.sas) == {0x100, 0x700}  # the new pair is in at once
    # the old IKE SA dies (liveness, the peer's Delete, or the tie-break): only its SAs go
    await agent.handle(ChildGone(POC, None, reason="dead-peer", ike_id=1))
    assert set(agent.peers[POC].children) == {0x700} and agent.peers[POC].state is PeerState.UP
    assert set(dp.sas) == {0x100, 0x700}  # the old pair still decrypts for a moment
    clock.t += 5
    await agent.on_timers(clock())
    assert set(dp.sas) == {0x700}


async def test_crossing_initiations_loser_deleted_keeps_winner():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await acquire(agent, POC)                                   # ours: IKE SA 1
    await agent.handle(IkeRequest(POC, LOCAL, ike_id="theirs"))
    await agent.handle(ChildUp(POC, child(POC, 0x100, 0x101), ike_id=1))
    await agent.handle(ChildUp(POC, child(POC, 0x200, 0x201), ike_id="theirs"))
    # the engine's tie-break deletes one IKE SA with its Child SA; either may lose
    await agent.handle(ChildGone(POC, 0x100, reason="ike-deleted", ike_id=1))
    await agent.handle(ChildGone(POC, None, reason="superseded", ike_id=1))
    assert set(agent.peers[POC].children) == {0x200} and agent.peers[POC].state is PeerState.UP
    # the loser still decrypts for GRACE_S, but sends nothing more (the peer may drop it first)
    assert dp.calls.count(("del_outbound", 0x100)) == 1 and 0x100 in dp.sas
    clock.t += 5
    await agent.on_timers(clock())
    assert set(dp.sas) == {0x200}


async def test_hard_expire_of_last_sa_restores_trap():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    dp.sas.clear()  # the kernel removed it
    await agent.handle(SaExpire(spi=0x100, dst=LOCAL, hard=True))
    assert agent.peers[POC].state is PeerState.TRAP


async def test_idle_teardown_counts_both_directions():
    agent, dp, ike, res, clock, _ = await started("idle_timeout = 100\n",
                                                  answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    clock.t += 100
    await agent.on_timers(clock())          # first check records the counters
    dp.bytes[0x100] += 500                  # inbound only
    clock.t += 100
    await agent.on_timers(clock())
    assert agent.peers[POC].state is PeerState.UP
    dp.bytes[0x101] += 500                  # outbound only
    clock.t += 100
    await agent.on_timers(clock())
    assert agent.peers[POC].state is PeerState.UP
    clock.t += 100
    await agent.on_timers(clock())
    assert agent.peers[POC].state is PeerState.TRAP
    assert ike.of("delete") == [("delete", POC)] and dp.sas == {}


async def test_negotiation_shunt_expiry_is_a_silent_failure():
    agent, dp, ike, res, clock, _ = await started()
    res.gate.clear()
    await acquire(agent, POC)
    clock.t += 30
    await agent.on_timers(clock())
    s = agent.shunts.get(POC)
    assert s.reason == "silent" and agent.peers[POC].state is PeerState.SHUNTED
    assert ("abort", POC, 1, "timeout") in ike.calls


async def test_kernel_policy_expire_restores_trap():
    agent, dp, ike, res, clock, _ = await started()
    await acquire(agent, POC)
    await agent.handle(Failed(POC, "no-proposal", ike_id=1))
    await agent.handle(PolicyExpire(src=ipaddress.ip_network(LOCAL), dst=ipaddress.ip_network(POC),
                                    index=1, hard=True))
    assert agent.peers[POC].state is PeerState.TRAP and dp.shunts == {}


async def test_acquires_for_groups_that_do_not_initiate_are_ignored():
    agent, dp, ike, *_ = await started()
    for dst in (COP, CLEAR, BLOCK, LOCAL, ipaddress.ip_address("198.51.100.200")):
        await acquire(agent, dst)
    assert ike.calls == [] and dp.shunts == {}


async def test_stop_deletes_everything_or_keeps_sas():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    await acquire(agent, PRIV)
    await agent.stop()
    assert dp.sas == {} and dp.shunts == {} and dp.policies == {} and dp.stopped is False
    assert ("delete", POC) in ike.calls

    agent, dp, ike, res, clock, _ = await started("keep_sas_on_stop = true\n",
                                                  answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)
    await agent.stop()
    assert set(dp.sas) == {0x100} and dp.stopped is True and dp.policies


class AdoptingDataplane(FakeDataplane):
    """The kernel dataplane's adoption contract: kept pairs listed at start, released when the
    pair gets a new SA or a shunt, or on request."""

    def __init__(self, kept):
        super().__init__()
        self.kept = {(LOCAL, ipaddress.ip_address(r)) for r in kept}
        self.released = []

    def adopted_peers(self):
        return sorted(self.kept)

    async def release_adopted(self, local, remote):
        if (local, remote) in self.kept:
            self.kept.discard((local, remote))
            self.released.append(remote)
            return True
        return False

    async def add_child_sa(self, params, outbound=True):
        await super().add_child_sa(params, outbound)
        await self.release_adopted(params.local, params.remote)

    async def set_shunt(self, local, remote, kind, lifetime_s):
        await super().set_shunt(local, remote, kind, lifetime_s)
        await self.release_adopted(local, remote)


async def test_pairs_kept_by_the_previous_run_are_renewed_make_before_break():
    """keep_sas_on_stop: at start each kept pair whose group answers IKE gets a new IKE SA
    with no shunt (the kept pair carries the traffic meanwhile); the new pair replaces it.
    A kept pair whose group is now clear goes at once."""
    agent, dp, ike, res, clock, _ = make_agent("keep_sas_on_stop = true\n",
                                               answers={rev(POC): Answer("secure-key", (a_key(),)),
                                                        rev(COP): Answer("secure-key", (a_key(),))})
    agent.dataplane = dp = AdoptingDataplane([POC, COP, CLEAR])
    await agent.start()
    assert dp.released == [CLEAR]
    assert {c[1] for c in ike.of("initiate")} == {POC, COP} and dp.shunts == {}
    assert agent.peers[POC].state is PeerState.NEGOTIATING
    assert "kept by the previous run" in agent.explain(POC, clock())["now"]
    await settle(agent)
    ids = {c[1]: c[2] for c in ike.of("initiate")}
    await agent.handle(KeyNeeded(POC, ike_id=ids[POC]))
    await agent.handle(ChildUp(POC, child(POC), ike_id=ids[POC]))
    assert agent.peers[POC].state is PeerState.UP and dp.released == [CLEAR, POC]
    assert dp.calls == []  # no shunt was put on the renewed pairs, none removed
    # the other renewal fails: the failure shunt takes the kept pair's place
    await agent.handle(Failed(COP, "timeout", ike_id=ids[COP]))
    assert dp.released == [CLEAR, POC, COP] and dp.shunts[(LOCAL, COP)][0] == "pass"


async def test_a_renewal_aborted_by_a_reload_removes_the_kept_pair():
    agent, dp, ike, res, clock, box = make_agent("keep_sas_on_stop = true\n")
    agent.dataplane = dp = AdoptingDataplane([POC])
    await agent.start()
    box["texts"] = {"clear": "192.0.2.0/24\n"}
    await agent.reload()
    assert dp.released == [POC] and agent.peers[POC].state is PeerState.TRAP
    assert ike.of("abort")


async def test_reload_by_difference_keeps_allowed_sas():
    new = {"private-or-clear": "192.0.2.0/25\n2001:db8::/64\n", "private": "198.51.100.0/25\n",
           "clear": "192.0.2.128/25\n"}
    agent, dp, ike, res, clock, box = await started(
        answers={rev(POC): Answer("secure-key", (a_key(),)),
                 "192.0.2.200": Answer("secure-key", (a_key(),))}, reload_texts=new)
    await up(agent, POC)
    await up(agent, ipaddress.ip_address("192.0.2.200"), spi=0x900)
    before = dict(dp.policies)
    out = await agent.reload()
    net = ipaddress.ip_network
    assert dp.policies[(net("192.0.2.0/25"), 0, 0)] == "trap"
    assert dp.policies[(net("192.0.2.128/25"), 0, 0)] == "pass"
    assert (net("192.0.2.0/24"), 0, 0) not in dp.policies
    assert (net("203.0.113.192/26"), 0, 0) not in dp.policies  # block went away
    assert dp.policies[(net("192.0.2.1/32"), 0, 0)] == "pass"  # own address still exempt
    assert before != dp.policies and out["peers_changed"] == 1
    assert agent.peers[POC].state is PeerState.UP and 0x100 in dp.sas      # still allowed: kept
    assert agent.peers[ipaddress.ip_address("192.0.2.200")].state is PeerState.TRAP
    assert 0x900 not in dp.sas                                              # now clear: deleted


async def test_bad_reload_changes_nothing():
    agent, dp, ike, res, clock, box = await started()
    box["texts"] = {"private": "192.0.2.0/24\n", "clear": "192.0.2.0/24\n"}
    before = dp.snapshot()
    with pytest.raises(UserError, match="two groups"):
        await agent.reload()
    assert dp.snapshot() == before


async def test_explain_in_words():
    agent, dp, ike, res, clock, _ = await started(answers={rev(PRIV): Answer("secure-denial", ttl=60)})
    await acquire(agent, PRIV)
    await settle(agent)
    e = agent.explain(PRIV, clock())
    assert e["group"]["name"] == "private" and e["group"]["source"] == "pol/private:1"
    assert e["dns"]["status"] == "secure-denial" and "no key published" in e["dns"]["words"]
    assert e["shunt"]["kind"] == "drop" and e["shunt"]["reason"] == "no-key"
    assert e["now"].startswith("packets are dropped (no-key")
    assert [h["event"].split(":")[0] for h in e["history"]][:2] == [
        "acquire 192.0.2.1 -> 198.51.100.7", "DNS 198.51.100.7"]
    e = agent.explain(CLEAR, clock())
    assert e["state"] == "trap" and e["now"] == "always in the clear (pass policy)"


async def test_ipv6_initiator():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC6): Answer("secure-key", (a_key(),))})
    await up(agent, POC6)
    assert dp.sas[0x100].remote == POC6 and dp.sas[0x100].local == LOCAL6


async def test_static_peer_start_now_and_trap(tmp_path):
    key = a_key()
    from oe_agent.dns.ipseckey import rdata_text
    text = rdata_text(10, key.public_key)
    agent, dp, ike, res, clock, _ = await started(
        f'[[peer]]\naddress = "203.0.113.60"\npublic_key = "{text}"\nmode = "tunnel"\nstart = "now"\n'
        f'[[peer]]\naddress = "203.0.113.61"\nauth = "psk"\npsk = "s3cret"\nstart = "trap"\n')
    s60, s61 = ipaddress.ip_address("203.0.113.60"), ipaddress.ip_address("203.0.113.61")
    (call,) = ike.of("initiate")
    assert call[1] == s60 and call[3].value == "tunnel" and res.asked == []
    await agent.handle(KeyNeeded(s60, ike_id=1))
    (keys,) = ike.of("keys")
    assert keys[3][0].public_bytes_raw() == key.public_key.public_bytes_raw()
    assert dp.policies[(ipaddress.ip_network(s61), 0, 0)] == "trap"
    assert agent.may_respond(s61)


async def test_run_loop_handles_posts_and_control_requests():
    agent, dp, ike, res, clock, _ = make_agent(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await agent.start()
    task = asyncio.create_task(agent.run())
    dp._events.put_nowait(Acquire(src=LOCAL, dst=POC))
    st = None
    for _ in range(100):
        st = await agent.request("status")
        if st["peers"]["negotiating"] == 1:
            break
        await asyncio.sleep(0.01)
    assert st["peers"]["negotiating"] == 1
    with pytest.raises(UserError, match="unknown request"):
        await agent.request("nope")
    await agent.stop()
    await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("initiator, soft", [(True, 3600 - 540), (False, 3600 - 270)])
async def test_soft_lifetime_is_the_rekey_margin_before_hard(initiator, soft):
    import dataclasses
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await acquire(agent, POC)
    params = dataclasses.replace(child(POC), lifetime_soft_s=3240, lifetime_hard_s=3600)
    await agent.handle(ChildUp(POC, params, ike_id=1, initiator=initiator))
    assert dp.sas[0x100].lifetime_soft_s == soft and dp.sas[0x100].lifetime_hard_s == 3600


async def test_idle_peer_records_are_bounded(monkeypatch):
    from oe_agent.agent import core
    monkeypatch.setattr(core, "MAX_PEERS", 8)
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await up(agent, POC)  # one peer with an SA: never forgotten
    for n in range(40):
        clock.t += 1
        await acquire(agent, ipaddress.ip_address(f"203.0.113.{n + 1}"))  # clear-or-private: ignored
    assert len(agent.peers) <= 8 and agent.peers[POC].state is PeerState.UP
    assert ipaddress.ip_address("203.0.113.40") in agent.peers  # the newest stay


async def test_dataplane_event_subclasses_are_handled():
    """The kernel dataplane sends KernelAcquire, a subclass of model.Acquire."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class KernelishAcquire(Acquire):
        extra: int = 0

    agent, dp, ike, res, clock, _ = await started()
    await agent.handle(KernelishAcquire(src=LOCAL, dst=POC, extra=1))
    assert agent.peers[POC].state is PeerState.NEGOTIATING and ike.of("initiate")


async def test_control_requests_go_ahead_of_a_backlog():
    """A storm's queued events must not make the control API wait behind them."""
    agent, dp, ike, res, clock, _ = await started()
    for n in range(200):
        agent.post(Acquire(src=LOCAL, dst=ipaddress.ip_address(f"192.0.2.{n % 250 + 2}")))
    task = asyncio.create_task(agent.run())
    st = await agent.request("status")
    assert sum(st["peers"].values()) < 200  # answered before the backlog was worked off
    await agent.stop()
    await asyncio.wait_for(task, 5)


class CoalescingDataplane:
    """The fake dataplane plus coalesce(): records when the batch reached the kernel."""

    def __init__(self, dp, log):
        self._dp, self.log = dp, log

    def __getattr__(self, name):
        return getattr(self._dp, name)

    async def add_child_sa(self, params, outbound=True):
        self.log.append(("add", params.spi_in))
        await self._dp.add_child_sa(params, outbound)

    def coalesce(self):
        import contextlib
        log = self.log

        @contextlib.asynccontextmanager
        async def cm():
            yield
            log.append("synced")
        return cm()


async def test_installed_is_called_once_the_turns_changes_are_synced():
    """ike_link answers the peer when installed() is called: only after the sync, and once
    per ChildUp, whatever else the turn handled."""
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    log: list = []
    agent.dataplane = CoalescingDataplane(dp, log)
    await acquire(agent, POC)
    agent.post(ChildUp(POC, child(POC), ike_id=1, installed=lambda: log.append("installed")))
    agent.post(Acquire(src=LOCAL, dst=ipaddress.ip_address("192.0.2.9")))
    task = asyncio.create_task(agent.run())
    for _ in range(200):
        if "installed" in log:
            break
        await asyncio.sleep(0.01)
    assert log[:3] == [("add", 0x100), "synced", "installed"]
    await agent.stop()
    await asyncio.wait_for(task, 5)


async def test_sa_expire_finds_its_peer_by_either_spi():
    agent, dp, ike, res, clock, _ = await started(answers={rev(POC): Answer("secure-key", (a_key(),))})
    await acquire(agent, POC)
    c = child(POC)
    await agent.handle(ChildUp(POC, c, ike_id=1))
    await agent.handle(SaExpire(c.spi_out, POC, False))  # outbound soft expire: rekey
    assert ike.of("rekey")
    await agent.handle(SaExpire(c.spi_in, LOCAL, True))  # inbound hard expire: gone
    assert agent.peers[POC].state is PeerState.TRAP and not agent.peers[POC].children
    assert agent._spi_in == {} and agent._spi_out == {}


async def test_initiations_beyond_the_limit_wait_in_order(monkeypatch):
    """A storm starts at most MAX_INITIATING negotiations; the others are held (their packets
    too) and start, oldest first, as slots free."""
    from oe_agent.agent import core
    monkeypatch.setattr(core, "MAX_INITIATING", 2)
    agent, dp, ike, res, clock, _ = await started()
    dsts = [ipaddress.ip_address(f"192.0.2.{n}") for n in (7, 8, 9, 10)]
    for d in dsts:
        await acquire(agent, d)
    assert [c[1] for c in ike.of("initiate")] == dsts[:2]
    assert all(agent.peers[d].state is PeerState.NEGOTIATING for d in dsts)
    assert all(dp.shunts[(LOCAL, d)][0] == "hold" for d in dsts)
    assert "waiting" in agent.peers[dsts[2]].history[-1][1]
    await agent.handle(Failed(dsts[1], "timeout", ike_id=ike.of("initiate")[1][2]))
    assert [c[1] for c in ike.of("initiate")] == dsts[:3]
    await agent.handle(ChildUp(dsts[0], child(dsts[0]), ike_id=ike.of("initiate")[0][2]))
    assert [c[1] for c in ike.of("initiate")] == dsts


async def test_idle_check_asks_for_the_peers_counters_only():
    agent, dp, ike, res, clock, _ = await started("idle_timeout = 100\n",
                                                  answers={rev(POC): Answer("secure-key", (a_key(),))})
    asked: list = []

    async def counters_for(spis_in):
        asked.append(list(spis_in))
        return [c for c in await dp.counters() if c.spi in (0x100, 0x101)]

    dp.counters_for = counters_for
    await up(agent, POC)
    clock.t += 100
    await agent.on_timers(clock())
    dp.bytes[0x101] += 500
    clock.t += 100
    await agent.on_timers(clock())
    assert agent.peers[POC].state is PeerState.UP
    clock.t += 100
    await agent.on_timers(clock())
    assert agent.peers[POC].state is PeerState.TRAP and asked == [[0x100]] * 3
