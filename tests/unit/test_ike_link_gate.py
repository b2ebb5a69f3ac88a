"""IkeLinkAdapter's install gate holds only the datagrams of the IKE SA whose Child SA is being
installed (the IKE_AUTH response), never another IKE SA's with the same peer: a loaded core
once held a crossing pair's other IKE SA (its liveness answers, its IKE_AUTH) past the peer's
retransmission budget, and both IKE SAs died (tests/vm/test_oe_mesh.py)."""
import asyncio

from oe_agent.agent.peer import PeerState
from oe_agent.ike.message import peek_header
from oe_agent.model import Acquire, Mode
from tests.unit.test_agent_ike import COP, POC, A, B, close, pair, until


async def test_a_pending_install_holds_only_its_own_ike_sa():
    a, b, tasks = await pair(POC, COP)
    release = asyncio.Event()
    slow_add = b.dp.add_child_sa

    async def add_child_sa(params):
        await release.wait()  # the core is busy elsewhere: the install takes its time
        await slow_add(params)

    b.dp.add_child_sa = add_child_sa
    sent = []
    to_a = b.link._transport

    def send(dg):
        h = peek_header(dg.data)
        sent.append((h.spi_i, h.exchange, h.response))
        to_a(dg)

    b.link._transport = send
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: b.link._gates, "B's Child SA waiting for its install")
        (first,) = {i for i, e, r in sent if e == 34 and r}  # A's IKE SA, answered by B
        # B starts an IKE SA of its own to A meanwhile: its IKE_SA_INIT leaves at once
        second = b.link.initiate(B, A, mode=Mode.TRANSPORT, auth_null=False, ts_local=(),
                                 ts_remote=())
        await until(lambda: (second.spi_i, 34, False) in sent, "the other IKE SA's request")
        assert (first, 35, True) not in sent, "the IKE_AUTH response left before the install"
        release.set()
        await until(lambda: (first, 35, True) in sent, "the IKE_AUTH response after the install")
        await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP, "SA up")
        await until(lambda: not b.link._gates, "every gate open once its install is in")
    finally:
        release.set()
        await close(a, b, tasks)
