"""Two agents with the real IKE engine (IkeEndpoint/IkeSa), wired in memory.

Each agent has its own core, fake dataplane and fake resolver (answering with the other's real
public key); datagrams pass between the two IkeLinkAdapters through the event loop.
"""
import asyncio
import ipaddress

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from oe_agent.agent.core import Agent
from oe_agent.agent.ike_link import IkeLinkAdapter
from oe_agent.agent.peer import PeerState
from oe_agent.config import parse
from oe_agent.ike import auth as ikeauth
from oe_agent.model import Acquire
from tests.unit.test_agent_fakes import Answer, FakeDataplane, FakeResolver, Key, groups

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")
A6 = ipaddress.ip_address("2001:db8::1")
B6 = ipaddress.ip_address("2001:db8::2")


class Side:
    def __init__(self, addr, addr6, group_texts, cfg_extra=""):
        self.addr, self.addr6 = addr, addr6
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.cfg = parse(f'[agent]\naddresses = ["{addr}", "{addr6}"]\n' + cfg_extra)
        self.dp = FakeDataplane()
        self.res = FakeResolver()
        self.agent = Agent(self.cfg, self.dp, None, self.res,
                           groups(group_texts, exempt=(addr, addr6)))
        self.null = "auth_null = true" in cfg_extra and "nokey" in cfg_extra
        cred = ikeauth.NullCredential() if self.null else ikeauth.SignatureCredential(self.key)
        self.link = IkeLinkAdapter(self.cfg, self.agent, self.dp, credential=cred)
        self.agent.ike = self.link

    def publish(self, other, status="secure-key"):
        """What the other side's resolver answers for our addresses."""
        keys = (Key(self.key.public_key()),) if status in ("secure-key", "insecure") else ()
        for a in (self.addr, self.addr6):
            other.res.answers[str(a)] = Answer(status, keys, ttl=600)

    def state(self, remote):
        p = self.agent.peers.get(ipaddress.ip_address(remote))
        return p.state if p else PeerState.TRAP


async def pair(ga, gb, extra_a="", extra_b=""):
    a, b = Side(A, A6, ga, extra_a), Side(B, B6, gb, extra_b)
    loop = asyncio.get_running_loop()

    def wire(dst):
        return lambda dg: loop.call_soon(dst.link.receive, dg.data, (dg.remote, dg.remote_port),
                                         (dg.local, dg.local_port))
    a.link._transport, b.link._transport = wire(b), wire(a)
    tasks = []
    for s in (a, b):
        await s.agent.start()
        await s.link.start()
        tasks.append(asyncio.create_task(s.agent.run()))
    return a, b, tasks


async def close(a, b, tasks):
    for s in (a, b):
        await s.agent.stop()
        s.link.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def until(pred, what, bound=30.0):
    """A bounded poll (never a timing assertion: the bound only stops a hang)."""
    deadline = asyncio.get_running_loop().time() + bound
    while asyncio.get_running_loop().time() < deadline:
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


POC = {"private-or-clear": "192.0.2.0/24\n2001:db8::/64\n"}
COP = {"clear-or-private": "192.0.2.0/24\n2001:db8::/64\n"}
PRIV = {"private": "192.0.2.0/24\n2001:db8::/64\n"}


def mirrored(a, b):
    (sa_a,) = a.dp.sas.values()
    (sa_b,) = b.dp.sas.values()
    return sa_a.spi_in == sa_b.spi_out and sa_a.spi_out == sa_b.spi_in \
        and sa_a.encr_key_in == sa_b.encr_key_out


@pytest.mark.parametrize("src, dst", [(A, B), (A6, B6)])
async def test_poc_to_cop_gives_one_authenticated_sa_pair(src, dst):
    a, b, tasks = await pair(POC, COP)
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=src, dst=dst))
        await until(lambda: a.state(dst) is PeerState.UP and b.state(src) is PeerState.UP, "SA up")
        assert mirrored(a, b)
        assert a.dp.shunts == {} and b.dp.shunts == {}
        assert a.res.asked == [str(dst)] and b.res.asked == [str(src)]
        assert "authenticated (DNSSEC key)" in a.agent.explain(dst, a.agent.clock())["now"]
        assert "authenticated (DNSSEC key)" in b.agent.explain(src, b.agent.clock())["now"]
    finally:
        await close(a, b, tasks)


async def test_no_key_published_gives_clear_for_poc_and_drop_for_private():
    a, b, tasks = await pair(POC, COP)
    try:
        b.publish(a, "secure-denial")
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.SHUNTED, "failure shunt")
        s = a.agent.shunts.get(B)
        assert (s.kind.value, s.reason, s.lifetime) == ("pass", "no-key", 900)
        assert a.dp.sas == {} and b.dp.sas == {}
    finally:
        await close(a, b, tasks)
    a, b, tasks = await pair(PRIV, COP)
    try:
        b.publish(a, "secure-denial")
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.SHUNTED, "failure shunt")
        assert a.agent.shunts.get(B).kind.value == "drop"
    finally:
        await close(a, b, tasks)


async def test_wrong_key_in_dns_is_refused():
    a, b, tasks = await pair(PRIV, COP)
    try:
        a.publish(b)
        other = ed25519.Ed25519PrivateKey.generate().public_key()
        a.res.answers[str(B)] = Answer("secure-key", (Key(other),))
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.SHUNTED, "failure shunt")
        s = a.agent.shunts.get(B)
        assert (s.kind.value, s.reason) == ("drop", "refused") and a.dp.sas == {}
        # B finished first as responder; A's AUTHENTICATION_FAILED makes it remove its pair
        await until(lambda: b.dp.sas == {}, "B to drop the refused SA pair")
    finally:
        await close(a, b, tasks)


async def test_clear_group_does_not_answer():
    a, b, tasks = await pair(POC, {"clear": "192.0.2.0/24\n"})
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: b.link.endpoint.dropped >= 1, "B to drop the IKE_SA_INIT")
        assert b.link.endpoint.sas == [] and B not in a.dp.sas
        assert b.state(A) is PeerState.TRAP
    finally:
        await close(a, b, tasks)


async def test_mutual_initiation_ends_in_one_sa_pair():
    a, b, tasks = await pair(POC, POC)
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        b.agent.post(Acquire(src=B, dst=A))
        await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP, "SA up")
        await until(lambda: len(a.dp.sas) == 1 and len(b.dp.sas) == 1
                    and len(a.link.endpoint.sas) == 1 and len(b.link.endpoint.sas) == 1
                    and mirrored(a, b),
                    "the tie-break to leave one IKE SA and one Child SA pair")
    finally:
        await close(a, b, tasks)


async def test_auth_null_opportunistic_without_keys():
    a, b, tasks = await pair(POC, COP, "[ike]\nauth_null = true\n# nokey\n",
                             "[ike]\nauth_null = true\n# nokey\n")
    try:
        a.publish(b, "secure-denial")
        b.publish(a, "secure-denial")
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP, "SA up")
        assert mirrored(a, b)
        assert "AUTH_NULL" in a.agent.explain(B, a.agent.clock())["now"]
    finally:
        await close(a, b, tasks)


KEYED_NULL = "[ike]\nauth_null = true\n"  # a host key, AUTH_NULL allowed
ANON = "[ike]\nauth_null = true\n# nokey\n"  # no host key at all (libreswan authby=null-like)


def sent_exchanges(side) -> list:
    """(exchange, response) of every IKE datagram `side` sends from now on."""
    from oe_agent.ike.message import peek_header
    sent, inner = [], side.link._transport

    def send(dg):
        h = peek_header(dg.data)
        sent.append((h.exchange, h.response))
        inner(dg)
    side.link._transport = send
    return sent


async def both_up_with_auth_null(a, b, initiator):
    """`initiator` traps the other: one mirrored SA pair, AUTH_NULL on both sides."""
    src, dst = (A, B) if initiator is a else (B, A)
    initiator.agent.post(Acquire(src=src, dst=dst))
    await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP, "SA up")
    assert mirrored(a, b)
    assert "AUTH_NULL" in a.agent.explain(B, a.agent.clock())["now"]
    assert "AUTH_NULL" in b.agent.explain(A, b.agent.clock())["now"]


@pytest.mark.parametrize("keyed_initiates", [True, False])
async def test_keyed_auth_null_agent_and_a_keyless_peer(keyed_initiates):
    """RFC 7619 OE with a host that has a key and allows AUTH_NULL, toward a host that has
    none (secure denial for it): both directions end in AUTH_NULL on both sides."""
    a, b, tasks = await pair(POC, POC, KEYED_NULL, ANON)
    try:
        a.publish(b)  # B could verify A, but A must not sign: B has no key to answer with
        b.publish(a, "secure-denial")
        await both_up_with_auth_null(a, b, initiator=a if keyed_initiates else b)
    finally:
        await close(a, b, tasks)


async def test_keyed_agents_use_auth_null_when_the_responder_publishes_no_key():
    a, b, tasks = await pair(POC, COP, KEYED_NULL, KEYED_NULL)
    try:
        a.publish(b)
        b.publish(a, "secure-denial")  # B has a key but did not publish it
        # A authenticates as AUTH_NULL and B, which holds a key, answers in kind
        await both_up_with_auth_null(a, b, initiator=a)
    finally:
        await close(a, b, tasks)


async def test_ike_auth_waits_for_the_dns_answer():
    """DNS runs in parallel with IKE_SA_INIT; IKE_AUTH leaves only once the answer is in."""
    a, b, tasks = await pair(POC, COP)
    sent = sent_exchanges(a)
    try:
        a.publish(b)
        b.publish(a)
        a.res.gate.clear()
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: [sa.state.value for sa in a.link.endpoint.find(B)] == ["auth-wait"],
                    "IKE_SA_INIT done, IKE_AUTH held")
        assert a.res.asked == [str(B)] and sent == [(34, False)]
        assert a.state(B) is PeerState.NEGOTIATING
        a.res.gate.set()
        await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP, "SA up")
        assert sent[:2] == [(34, False), (35, False)]
    finally:
        await close(a, b, tasks)


@pytest.mark.parametrize("groups_a, extra_a, shunt", [
    (POC, "", "pass"),  # AUTH_NULL off
    (PRIV, KEYED_NULL, "drop"),  # AUTH_NULL on, but never for `private`
])
async def test_secure_denial_without_auth_null_fails_at_once(groups_a, extra_a, shunt):
    """No key and no AUTH_NULL: the failure shunt at once (no AUTH_NULL attempt); the
    responder is told and keeps no SA."""
    a, b, tasks = await pair(groups_a, COP, extra_a, KEYED_NULL)
    try:
        a.publish(b)
        b.publish(a, "secure-denial")
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.SHUNTED, "failure shunt")
        s = a.agent.shunts.get(B)
        assert (s.kind.value, s.reason) == (shunt, "no-key")
        await until(lambda: not a.link.endpoint.sas and not b.link.endpoint.sas
                    and b.dp.sas == {}, "both IKE SAs gone, no SA left on B")
        assert a.dp.sas == {}
    finally:
        await close(a, b, tasks)


async def test_rekey_through_the_engine_replaces_the_pair():
    a, b, tasks = await pair(POC, COP)
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP, "SA up")
        (old,) = a.dp.sas
        from oe_agent.model import SaExpire
        a.agent.post(SaExpire(spi=old, dst=A, hard=False))
        await until(lambda: len(a.dp.sas) == 1 and old not in a.dp.sas and len(b.dp.sas) == 1
                    and set(a.dp.sas) != {old}, "rekeyed pair")
        await until(lambda: mirrored(a, b), "both sides on the new pair")
        # B answered the rekey: its traffic moved to the new pair when A deleted the old one
        (new_b,) = b.dp.sas.values()
        assert [c for c in b.dp.calls if c[0] == "add_outbound"] == [("add_outbound", new_b.spi_in)]
        assert b.dp.sending[(B, A)] == new_b.spi_out and a.dp.sending[(A, B)] == new_b.spi_in
        assert not [c for c in a.dp.calls if c[0] == "add_outbound"]  # A's went in at once
    finally:
        await close(a, b, tasks)


def watch(side, order: list, note) -> None:
    """Slow installs on `side` and a look at what it sends, both appended to `order` as they
    happen: ("installed", spi_in), and note(header) of each datagram unless None."""
    from oe_agent.ike.message import peek_header
    slow_add = side.dp.add_child_sa

    async def add_child_sa(params, outbound=True):
        await asyncio.sleep(0.05)  # a dataplane that takes its time (nft, netlink)
        await slow_add(params, outbound)
        order.append(("installed", params.spi_in))

    side.dp.add_child_sa = add_child_sa
    forward = side.link._transport

    def send(dg):
        seen = note(peek_header(dg.data))
        if seen is not None:
            order.append(seen)
        forward(dg)

    side.link._transport = send


async def test_responder_answers_only_once_its_sa_is_installed():
    """The IKE_AUTH response lets the initiator send ESP at once: it leaves only after the
    responder's dataplane holds the new SA; so does the answer to a rekey (CREATE_CHILD_SA)."""
    from oe_agent.model import SaExpire
    a, b, tasks = await pair(POC, COP)
    order = []
    watch(b, order, lambda h: ("answered", h.exchange)  # IKE_AUTH, CREATE_CHILD_SA answers
          if h.response and h.exchange in (35, 36) else None)
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP, "SA up")
        assert [k for k, _ in order] == ["installed", "answered"], order
        (old,) = a.dp.sas
        a.agent.post(SaExpire(spi=old, dst=A, hard=False))  # A rekeys: B answers
        await until(lambda: len(order) == 4, "the rekey answered")
        assert order[2:] == [("installed", order[2][1]), ("answered", 36)], order
    finally:
        await close(a, b, tasks)


async def test_rekey_initiator_deletes_the_old_pair_only_once_the_new_is_in():
    """The Delete of the rekeyed pair moves the peer's traffic to the new one (RFC 7296 §2.8):
    it left before the initiator's core had installed the new pair, and the peer's first
    datagram on it could be dropped (the vm rekey test lost one of 4330 back to back)."""
    from oe_agent.model import SaExpire
    a, b, tasks = await pair(POC, COP)
    order = []
    watch(a, order, lambda h: ("informational", None)  # INFORMATIONAL request: the Delete
          if not h.response and h.exchange == 37 else None)
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP
                    and len(a.dp.sas) == 1, "SA up")
        (old,) = a.dp.sas
        order.clear()
        a.agent.post(SaExpire(spi=old, dst=A, hard=False))  # A rekeys, then deletes old
        await until(lambda: ("informational", None) in order, "the old pair's Delete")
        assert order[0][0] == "installed" and order[0][1] != old, order
        await until(lambda: len(a.dp.sas) == 1 and old not in a.dp.sas and len(b.dp.sas) == 1,
                    "the old pair gone")
        assert mirrored(a, b), "both sides on the new pair"
        assert not a.link._gates, "A's gate open once its install is in"
    finally:
        await close(a, b, tasks)


async def test_stop_deletes_the_peer_sas_too():
    a, b, tasks = await pair(POC, COP)
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: b.state(A) is PeerState.UP, "SA up")
        await a.agent.stop()  # sends the IKE Delete
        await until(lambda: b.state(A) is PeerState.TRAP and b.dp.sas == {}, "B to remove its SAs")
    finally:
        await close(a, b, tasks)


async def test_responder_without_the_initiators_key_refuses_at_once():
    a, b, tasks = await pair(POC, COP)
    try:
        a.publish(b, "secure-denial")  # B finds no key for A
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.SHUNTED, "A's failure shunt")
        s = a.agent.shunts.get(B)
        # AUTHENTICATION_FAILED from B: refused, not a silent peer after retransmissions
        assert (s.kind.value, s.reason) == ("pass", "refused") and a.dp.sas == {}
        await until(lambda: b.state(A) is PeerState.TRAP and b.dp.sas == {}, "B back to trap")
    finally:
        await close(a, b, tasks)


def _free_port_pair():
    import socket
    for _ in range(50):
        s1, s2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s1.bind(("127.0.0.1", 0))
            port = s1.getsockname()[1]
            s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
        finally:
            s1.close()
            s2.close()
    raise AssertionError("no free port pair")


async def test_real_udp_sockets_on_loopback():
    """The socket path (recv batches, pump after every read), not only the in-memory one."""
    port = _free_port_pair()
    la, lb = ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.3")
    sides = []
    for me, g in ((la, {"private-or-clear": "127.0.0.0/8\n"}), (lb, {"clear-or-private": "127.0.0.0/8\n"})):
        cfg = parse(f'[agent]\naddresses = ["{me}"]\n[ike]\nport = {port}\nnatt_port = {port + 1}\n')
        dp, res = FakeDataplane(), FakeResolver()
        agent = Agent(cfg, dp, None, res, groups(g, exempt=(me,)))
        key = ed25519.Ed25519PrivateKey.generate()
        agent.ike = IkeLinkAdapter(cfg, agent, dp, credential=ikeauth.SignatureCredential(key))
        sides.append((agent, res, key, dp))
    (a, ares, akey, adp), (b, bres, bkey, bdp) = sides
    ares.answers[str(lb)] = Answer("secure-key", (Key(bkey.public_key()),))
    bres.answers[str(la)] = Answer("secure-key", (Key(akey.public_key()),))
    tasks = []
    for agent, *_ in sides:
        await agent.ike.start()
        await agent.start()
        tasks.append(asyncio.create_task(agent.run()))
    try:
        a.post(Acquire(src=la, dst=lb))
        await until(lambda: lb in a.peers and a.peers[lb].state is PeerState.UP
                    and la in b.peers and b.peers[la].state is PeerState.UP, "SA up over UDP")
        (sa_a,), (sa_b,) = adp.sas.values(), bdp.sas.values()
        assert sa_a.spi_in == sa_b.spi_out and sa_a.spi_out == sa_b.spi_in
    finally:
        for agent, *_ in sides:
            await agent.stop()
            agent.ike.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_ten_agents_initiating_at_once_make_45_sa_pairs():
    """Every host traps every other and all send at once: crossing initiations everywhere,
    and in the end exactly one Child SA pair per host pair (45), no duplicates."""
    n = 10
    loop = asyncio.get_running_loop()
    sides = []
    for i in range(1, n + 1):
        s = Side(ipaddress.ip_address(f"192.0.2.{i}"), ipaddress.ip_address(f"2001:db8::{i:x}"), POC)
        sides.append(s)
    by_addr = {s.addr: s for s in sides}
    for s in sides:
        s.link._transport = (lambda dg: loop.call_soon(
            by_addr[dg.remote].link.receive, dg.data, (dg.remote, dg.remote_port),
            (dg.local, dg.local_port)))
        for o in sides:
            if o is not s:
                s.publish(o)
    tasks = []
    for s in sides:
        await s.agent.start()
        await s.link.start()
        tasks.append(asyncio.create_task(s.agent.run()))
    try:
        for s in sides:
            for o in sides:
                if o is not s:
                    s.agent.post(Acquire(src=s.addr, dst=o.addr))

        def settled():
            return all(len(s.dp.sas) == n - 1 and len(s.link.endpoint.sas) == n - 1
                       and all(s.state(o.addr) is PeerState.UP for o in sides if o is not s)
                       for s in sides)
        await until(settled, "one SA pair per host pair")
        pairs = set()
        for s in sides:
            for sa in s.dp.sas.values():
                peer = by_addr[sa.remote]
                (mate,) = [x for x in peer.dp.sas.values() if x.spi_out == sa.spi_in]
                assert mate.spi_in == sa.spi_out and mate.encr_key_out == sa.encr_key_in
                pairs.add(frozenset((sa.spi_in, sa.spi_out)))
        assert len(pairs) == n * (n - 1) // 2 == 45
    finally:
        for s in sides:
            await s.agent.stop()
            s.link.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
