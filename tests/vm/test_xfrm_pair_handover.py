"""Two Child SA pairs of one host pair on real kernel ESP (a second IKE SA with the same peer:
a restarted or re-initiating peer), the newer one deleted first: the older pair keeps its
policies and the traffic stays ESP both ways. Before the dataplane handed the policies over,
the host kept the older SAs without policies and answered the peer's ESP in clear (the vm
group matrix's private -> clear-or-private flake)."""
from __future__ import annotations

from oe_agent.model import Mode
from tests.vm.test_kernel_esp import GCM, install_pair
from tests.vm.wire import CANARY, sniff, udp_exchange


async def test_deleting_the_newer_of_two_pairs_keeps_traffic_encrypted(dataplanes, lan):
    a, b, dp_a, dp_b = dataplanes
    old_a, old_b = await install_pair(dp_a, dp_b, a.v4, b.v4, Mode.TRANSPORT, GCM)
    new_a, new_b = await install_pair(dp_a, dp_b, a.v4, b.v4, Mode.TRANSPORT, GCM)
    await dp_b.del_child_sa(new_b)
    await dp_a.del_child_sa(new_a)
    with sniff(lan, b) as wire:
        assert udp_exchange(a, a.v4, b, b.v4) == CANARY
        back = CANARY + b"-back"
        assert udp_exchange(b, b.v4, a, a.v4, payload=back, port=5001) == back
    clear = wire.plaintext()
    assert not clear, "the canary crossed the veth in clear:\n" + "\n".join(clear)
    spis = {spi for _, spi in wire.esp()}
    assert {old_a.spi_out, old_a.spi_in} <= spis, (spis, old_a)
    assert not {new_a.spi_out, new_a.spi_in} & spis, spis
    for dp, local in ((dp_a, a.v4), (dp_b, b.v4)):
        pols = {(p.dir, tuple(t.reqid for t in p.templates)) for p in await dp.policies()
                if p.sel.src.prefixlen == 32 and p.sel.dst.prefixlen == 32}
        want = old_a.reqid if dp is dp_a else old_b.reqid
        assert pols == {("out", (want,)), ("in", (want,))}, (local, pols)
    await dp_a.del_child_sa(old_a)
    await dp_b.del_child_sa(old_b)
    assert not [p for p in await dp_a.policies() if p.sel.src.prefixlen == 32]
