"""The kernel dataplane's SA pair policies under the sequences that made the vm group matrix
flaky (a clear-or-private responder answering its peer's ESP in clear): the install order,
and two pairs of one host pair side by side with the newer one deleted first. Against the
in-memory kernel of test_xfrm_dataplane (the kernel's EEXIST/ENOENT and index rules)."""
from __future__ import annotations

import ipaddress

import pytest

from oe_agent.model import ShuntKind
from oe_agent.trap.dataplane import KernelDataplane
from oe_agent.trap.kernel import Selector
from tests.unit.test_xfrm_dataplane import A, B, FakeXfrm, params


@pytest.fixture
def dp():
    d = KernelDataplane()
    d.xfrm = FakeXfrm()
    return d


def view(dp) -> dict:
    """(src, dst, dir) -> (action, template reqids) of the kernel's policies."""
    return {(str(p.sel.src), str(p.sel.dst), p.dir): (p.action, [t.reqid for t in p.templates])
            for p in dp.xfrm.pols.values()}


async def test_out_policy_goes_last_after_both_sas_and_the_in_policy(dp):
    """The out policy sends (held packets at once): by then both SAs and the in policy that
    rejects a plaintext answer must exist."""
    await dp.set_shunt(A, B, ShuntKind.HOLD, 30)
    seen = []
    orig = dp.xfrm.add_policy

    async def spy(sel, d, **kw):
        if kw.get("priority") == dp.priority_band.start + 16:  # RANK_SA
            seen.append((d, {s.spi for s in await dp.xfrm.sas()},
                         {k[1] for k, p in dp.xfrm.pols.items() if p.templates
                          and p.templates[0].reqid != dp.trap_reqid}))
        await orig(sel, d, **kw)
    dp.xfrm.add_policy = spy
    await dp.add_child_sa(params(dp))
    dirs = [d for d, _, _ in seen]  # an out try may repeat as an update (EEXIST: the shunt)
    assert dirs.index("out") > dirs.index("in"), seen
    _, sas, sa_pols = seen[dirs.index("out")]
    assert sas == {0x2001, 0x2002} and "in" in sa_pols


@pytest.mark.parametrize("first_gone", ["older", "newer"])
async def test_two_pairs_either_deleted_first_leaves_the_other_its_policies(dp, first_gone):
    """Two Child SA pairs for one host pair (a second IKE SA with the peer): whichever is
    deleted first, the remaining pair keeps an out and an in policy naming its reqid; only
    the last deletion removes them."""
    old = params(dp, reqid=0)
    await dp.add_child_sa(old)
    new = params(dp, reqid=0, spi_in=0x3001, spi_out=0x3002)
    await dp.add_child_sa(new)
    gone, kept = (old, new) if first_gone == "older" else (new, old)
    await dp.del_child_sa(gone)
    reqid = {s.spi: s.reqid for s in await dp.xfrm.sas()}[kept.spi_in]
    assert {s.spi for s in await dp.xfrm.sas()} == {kept.spi_in, kept.spi_out}
    assert view(dp) == {("192.0.2.1/32", "192.0.2.2/32", "out"): ("allow", [reqid]),
                        ("192.0.2.2/32", "192.0.2.1/32", "in"): ("allow", [reqid])}
    assert dp._pairs[(A, B)][0] == "sa"
    await dp.clear_shunt(A, B)  # the pair's policies are an SA's, not a shunt's
    assert len(view(dp)) == 2
    await dp.del_child_sa(kept)
    assert await dp.xfrm.sas() == [] and view(dp) == {}


async def test_pairs_with_different_reqids_hand_over_the_template(dp):
    """A remaining pair with its own reqid gets the policies with its template (the in policy
    names the reqid it accepts)."""
    one = params(dp)
    two = params(dp, spi_in=0x3001, spi_out=0x3002)  # params() takes a fresh reqid
    await dp.add_child_sa(one)
    await dp.add_child_sa(two)
    await dp.del_child_sa(two)
    assert {v[1][0] for v in view(dp).values()} == {one.reqid}


async def test_deleting_an_unknown_pair_keeps_policies_another_pair_owns(dp):
    """del_child_sa for a pair the dataplane no longer tracks (deleted twice, hard-expired)
    must not take the policies of the pair that now carries the traffic."""
    a = params(dp, reqid=0)
    await dp.add_child_sa(a)
    await dp.del_child_sa(a)
    b = params(dp, reqid=0, spi_in=0x3001, spi_out=0x3002)
    await dp.add_child_sa(b)
    await dp.del_child_sa(a)  # again: a stale delete
    assert len(view(dp)) == 2 and {s.spi for s in await dp.xfrm.sas()} == {0x3001, 0x3002}
    assert await dp.xfrm.get_policy(Selector.pair(A, B), "out") is not None


async def test_delete_removes_the_inbound_sa_before_the_policies(dp):
    """Once the out policy is gone a reply would go in clear: by then nothing of the peer's
    may be decrypted any more."""
    p = params(dp)
    await dp.add_child_sa(p)
    order = []
    del_sa, del_pol = dp.xfrm.del_sa, dp.xfrm.del_policy

    async def spy_sa(dst, spi, **kw):
        order.append(("sa", spi))
        return await del_sa(dst, spi, **kw)

    async def spy_pol(sel, d, **kw):
        order.append(("policy", d))
        return await del_pol(sel, d, **kw)
    dp.xfrm.del_sa, dp.xfrm.del_policy = spy_sa, spy_pol
    await dp.del_child_sa(p)
    assert order[0] == ("sa", p.spi_in) and order.index(("policy", "out")) > 0, order


async def test_a_kept_pair_is_sealed_at_start_until_its_group_is_back():
    """keep_sas_on_stop, then a start that does not adopt: the kept pair's out policy turns
    into a block in place (bounded lifetime) instead of going, so the peer's traffic is not
    sent in clear before the group's trap covers it; installing that group removes it."""
    first = KernelDataplane()
    first.xfrm = FakeXfrm()
    first.xfrm.close = lambda: None
    p = params(first)
    await first.add_child_sa(p)
    await first.set_trap("192.0.2.0/25")
    xf = first.xfrm
    await first.stop(keep_sas=True)
    second = KernelDataplane()
    second.xfrm = xf
    await second.reconcile(seal_pairs=True)
    assert await second.xfrm.sas() == []
    (sealed,) = await second.xfrm.policies()
    assert (sealed.sel, sealed.dir, sealed.action) == (Selector.pair(A, B), "out", "block")
    assert 0 < sealed.lifetime.hard_s <= 300
    await second.set_pass("198.51.100.0/24")  # another group: the seal stays
    assert await second.xfrm.get_policy(Selector.pair(A, B), "out") == sealed
    await second.set_trap("192.0.2.0/25")
    assert await second.xfrm.get_policy(Selector.pair(A, B), "out") is None
    assert {str(x.sel.dst) for x in await second.xfrm.policies()} == {"198.51.100.0/24",
                                                                      "192.0.2.0/25"}


async def test_seal_outlives_a_clean_stop_and_goes_when_the_group_is_back():
    """A stopping agent seals a `private` peer it had an SA with: the block stays after
    stop() (bounded by its lifetime), everything else goes; the next start keeps it until
    the group's trap covers the peer."""
    first = KernelDataplane()
    first.xfrm = xf = FakeXfrm()
    xf.close = lambda: None
    p = params(first)
    await first.add_child_sa(p)
    await first.set_trap("192.0.2.0/25")
    await first.set_shunt(A, ipaddress.ip_address("192.0.2.3"), ShuntKind.DROP, 60)
    await first.del_child_sa(p)
    await first.seal(A, B)
    await first.stop()
    (kept,) = await xf.policies()
    assert (kept.sel, kept.dir, kept.action) == (Selector.pair(A, B), "out", "block")
    assert 0 < kept.lifetime.hard_s <= 300 and await xf.sas() == []
    second = KernelDataplane()
    second.xfrm = xf
    await second.reconcile(seal_pairs=True)
    assert [x.action for x in await xf.policies()] == ["block"]
    await second.set_trap("192.0.2.0/25")
    assert [(str(x.sel.dst), x.action) for x in await xf.policies()] == [("192.0.2.0/25", "allow")]
