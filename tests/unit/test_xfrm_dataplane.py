"""The kernel dataplane's decisions without a kernel: priorities, algorithm attributes,
selectors, SA/policy shapes for a ChildSaParams, ownership and rollback (against an in-memory
stand-in for Xfrm that keeps the kernel's EEXIST/ENOENT rules)."""
from __future__ import annotations

import errno
import ipaddress

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from oe_agent.model import ChildSaParams, EspAlgorithm, Mode, ShuntKind, TrafficSelector
from oe_agent.trap import xfrm
from oe_agent.trap.dataplane import (RANK_GROUP, RANK_SA, RANK_SHUNT, KernelDataplane,
                                     PolicyConflict, group_rank)
from oe_agent.trap.kernel import (KernelPolicyExpire, Lifetime, Policy, Sa, Selector,
                                  algorithm_attrs, event_from)
from oe_agent.trap.netlink import XfrmError, parse_error

GCM = EspAlgorithm("aes-gcm-16", 128)
CBC = EspAlgorithm("aes-cbc", 256, "hmac-sha2-256-128")
A, B = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")


# --- priorities -------------------------------------------------------------------------------
@given(st.integers(0, 128), st.integers(0, 128))
def test_longer_prefix_always_wins(p1, p2):
    n1 = ipaddress.ip_network(f"2001:db8::/{p1}", strict=False)
    n2 = ipaddress.ip_network(f"2001:db8::/{p2}", strict=False)
    assume(p1 > p2)
    assert group_rank(n1, 0, 0) < group_rank(n2, 6, 22)  # lower value wins, any proto/port


def test_specific_proto_port_wins_at_same_prefix_and_all_fit_the_band():
    n = ipaddress.ip_network("192.0.2.0/24")
    assert group_rank(n, 6, 22) < group_rank(n, 6, 0) < group_rank(n, 0, 0)
    worst = group_rank(ipaddress.ip_network("::/0"), 0, 0)
    assert RANK_SA < RANK_SHUNT < RANK_GROUP <= group_rank(
        ipaddress.ip_network("::1/128"), 6, 22)
    assert worst < KernelDataplane().priority_band.stop - KernelDataplane().priority_band.start


# --- algorithms -------------------------------------------------------------------------------
def test_aead_attribute_carries_key_with_salt():
    ((name, a),) = algorithm_attrs(GCM, bytes(20))
    assert name == "XFRMA_ALG_AEAD"
    assert (a["alg_name"], a["alg_key_len"], a["alg_icv_len"]) == ("rfc4106(gcm(aes))", 160, 128)
    ((_, c),) = algorithm_attrs(EspAlgorithm("chacha20-poly1305", 256), bytes(36))
    assert c["alg_name"] == "rfc7539esp(chacha20,poly1305)" and c["alg_key_len"] == 288


def test_cbc_with_hmac_truncated_to_128():
    (cn, c), (an, a) = algorithm_attrs(CBC, bytes(32), bytes(32))
    assert (cn, c["alg_name"], c["alg_key_len"]) == ("XFRMA_ALG_CRYPT", "cbc(aes)", 256)
    assert (an, a["alg_name"], a["alg_trunc_len"]) == ("XFRMA_ALG_AUTH_TRUNC", "hmac(sha256)",
                                                       128)


@pytest.mark.parametrize("alg,ek,ik,words", [
    (GCM, bytes(16), b"", "incl. salt"),
    (EspAlgorithm("aes-gcm-16", 128, "hmac-sha2-256-128"), bytes(20), b"", "AEAD"),
    (EspAlgorithm("aes-cbc", 128), bytes(16), b"", "integrity"),
    (CBC, bytes(32), bytes(20), "32 bytes"),
    (EspAlgorithm("aes-gcm-16", 64), bytes(12), b"", "key size"),
    (EspAlgorithm("des", 64), bytes(8), b"", "unknown ESP algorithm"),
])
def test_bad_algorithms_and_keys_are_named(alg, ek, ik, words):
    with pytest.raises(ValueError, match=words):
        algorithm_attrs(alg, ek, ik)


# --- selectors and events ---------------------------------------------------------------------
@given(st.one_of(st.tuples(st.ip_addresses(v=4), st.integers(0, 32), st.ip_addresses(v=4),
                           st.integers(0, 32)),
                 st.tuples(st.ip_addresses(v=6), st.integers(0, 128), st.ip_addresses(v=6),
                           st.integers(0, 128))),
       st.integers(0, 255), st.integers(0, 65535), st.integers(0, 65535))
def test_selector_fields_roundtrip(nets, proto, sport, dport):
    s, sp, d, dp = nets
    sel = Selector(ipaddress.ip_network(f"{s}/{sp}", strict=False),
                   ipaddress.ip_network(f"{d}/{dp}", strict=False), proto, sport, dport)
    raw = xfrm.pack(xfrm.XFRM_SELECTOR, {k[4:]: v for k, v in sel.fields().items()})
    back = xfrm.unpack(xfrm.XFRM_SELECTOR, raw)
    assert Selector.from_fields({"sel_" + k: v for k, v in back.items()}) == sel
    assert sel.reversed().reversed() == sel


def test_selector_rejects_mixed_families_and_bad_ports():
    with pytest.raises(ValueError, match="families"):
        Selector.pair("192.0.2.1", "2001:db8::1")
    with pytest.raises(ValueError, match="port"):
        Selector.pair("192.0.2.1", "192.0.2.2", 17, 70000)


def _wire(layout, values, msg_type):
    body = xfrm.pack(layout, values)
    hdr = xfrm.struct.pack("IHHII", 16 + len(body), msg_type, 0, 0, 0)
    return xfrm.decode(hdr + body)


def test_expire_and_polexpire_become_model_events():
    m = _wire(xfrm.XFRM_USER_EXPIRE, {
        "state_id_daddr": xfrm.addr_bytes(B), "state_id_spi": 0xC0FFEE, "state_family": 2,
        "state_reqid": 9, "hard": 0}, xfrm.XFRM_MSG_EXPIRE)
    ev = event_from(m)
    assert (ev.spi, ev.dst, ev.hard, ev.reqid) == (0xC0FFEE, B, False, 9)
    m = _wire(xfrm.XFRM_USER_POLEXPIRE, {
        **Selector.pair(A, B, 6).fields("pol_sel_"), "pol_index": 42, "pol_priority": 7,
        "pol_dir": 1, "hard": 1}, xfrm.XFRM_MSG_POLEXPIRE)
    ev = event_from(m)
    assert isinstance(ev, KernelPolicyExpire)
    assert (str(ev.src), str(ev.dst), ev.index, ev.hard, ev.priority, ev.dir, ev.proto) == (
        "192.0.2.1/32", "192.0.2.2/32", 42, True, 7, "out", 6)


def test_error_message_with_extended_ack():
    """NLMSG_ERROR (capped) + NLMSGERR_ATTR_MSG -> errno and the kernel's text."""
    text = b"Requested type not found\0"
    tlv = xfrm.struct.pack("HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
    orig = xfrm.struct.pack("IHHII", 300, xfrm.XFRM_MSG_NEWSA, 5, 1, 0)
    body = xfrm.struct.pack("i", -errno.EPROTONOSUPPORT) + orig + tlv
    msg = xfrm.struct.pack("IHHII", 16 + len(body), 2,
                           xfrm.NLM_F_CAPPED | xfrm.NLM_F_ACK_TLVS, 1, 0) + body
    assert parse_error(msg, 0, len(msg)) == (errno.EPROTONOSUPPORT, "Requested type not found")
    e = XfrmError(errno.EPROTONOSUPPORT, "XFRM_MSG_NEWSA", "Requested type not found")
    assert e.errno == errno.EPROTONOSUPPORT and "Requested type not found" in str(e)


# --- the dataplane against an in-memory kernel ------------------------------------------------
class FakeXfrm:
    """Policies keyed by (selector, dir), SAs by (dst, spi); the kernel's errors."""

    def __init__(self):
        self.pols: dict[tuple, Policy] = {}
        self.sas_: dict[tuple, Sa] = {}
        self.fail_sa_spi: int | None = None
        self.next_index = 1

    async def add_policy(self, sel, dir, *, priority, action="allow", templates=(),
                         lifetime=Lifetime(), update=False, mark=None, if_id=0):
        key = (sel, dir)
        if key in self.pols and not update:
            raise XfrmError(errno.EEXIST, "XFRM_MSG_NEWPOLICY")
        idx = self.pols[key].index if key in self.pols else self.next_index
        self.next_index += 1
        self.pols[key] = Policy(sel, dir, action, priority, idx, tuple(templates), lifetime)

    async def del_policy(self, sel, dir, *, mark=None, if_id=0):
        return self.pols.pop((sel, dir), None) is not None

    async def get_policy(self, sel, dir, *, mark=None, if_id=0):
        return self.pols.get((sel, dir))

    async def get_policy_by_index(self, index, dir):
        return next((p for p in self.pols.values() if p.index == index), None)

    async def policies(self):
        return list(self.pols.values())

    async def add_sa(self, spec, update=False):
        if spec.spi == self.fail_sa_spi:
            raise XfrmError(errno.ENOSYS, "XFRM_MSG_NEWSA", "Requested AEAD algorithm not found")
        algorithm_attrs(spec.alg, spec.encr_key, spec.integ_key)
        self.sas_[(spec.dst, spec.spi)] = Sa(spec.src, spec.dst, spec.spi, 50, spec.mode,
                                             spec.reqid, spec.seq, spec.sel or Selector.pair(
                                                 spec.src, spec.dst), (spec.alg.encr,),
                                             spec.encap)

    async def del_sa(self, dst, spi, *, mark=None, if_id=0):
        return self.sas_.pop((dst, spi), None) is not None

    async def sas(self):
        return list(self.sas_.values())

    async def alloc_spi(self, src, dst, *, reqid=0, seq=0, mode=Mode.TRANSPORT, **kw):
        spi = 0x1000 + len(self.sas_)
        self.sas_[(ipaddress.ip_address(dst), spi)] = Sa(
            ipaddress.ip_address(src), ipaddress.ip_address(dst), spi, 50, mode, reqid, seq,
            Selector.pair(src, dst))
        return spi


@pytest.fixture
def dp():
    d = KernelDataplane()
    d.xfrm = FakeXfrm()
    return d


def params(dp, **kw):
    base = dict(local=A, remote=B, spi_in=0x2001, spi_out=0x2002, mode=Mode.TRANSPORT, alg=GCM,
                encr_key_in=bytes(20), encr_key_out=bytes(20), reqid=dp.new_reqid())
    base.update(kw)
    return ChildSaParams(**base)


async def test_reconcile_removes_only_own_entries(dp):
    k = dp.xfrm
    own = dp.priority_band.start + 300
    await k.add_policy(Selector.to("198.51.100.0/24"), "out", priority=own)
    await k.add_policy(Selector.to("203.0.113.0/24"), "out", priority=1000)
    await k.alloc_spi(B, A, reqid=dp.reqid_band.start + 5)
    await k.alloc_spi(B, A, reqid=77)
    assert await dp.reconcile() == (1, 1)
    assert [p.priority for p in await k.policies()] == [1000]
    assert [s.reqid for s in await k.sas()] == [77]


async def test_foreign_policy_is_a_conflict_not_replaced(dp):
    await dp.xfrm.add_policy(Selector.to("203.0.113.0/24"), "out", priority=5)
    with pytest.raises(PolicyConflict, match="foreign"):
        await dp.set_trap("203.0.113.0/24")
    assert (await dp.xfrm.get_policy(Selector.to("203.0.113.0/24"), "out")).priority == 5


async def test_group_kinds_replace_each_other(dp):
    await dp.set_trap("192.0.2.0/24")
    await dp.set_block("192.0.2.0/24")
    pols = {(str(p.sel.dst), p.dir): p for p in await dp.xfrm.policies()}
    assert pols[("192.0.2.0/24", "out")].action == "block"
    assert pols[("0.0.0.0/0", "in")].action == "block"
    await dp.set_pass("192.0.2.0/24")
    pols = await dp.xfrm.policies()
    assert [(p.dir, p.action, p.templates) for p in pols] == [("out", "allow", ())]
    await dp.remove_group_policy("192.0.2.0/24")
    assert await dp.xfrm.policies() == []


async def test_child_sa_pair_shape_tunnel_encap(dp):
    p = params(dp, mode=Mode.TUNNEL, encap=(4500, 4501), alg=CBC, encr_key_in=bytes(32),
               encr_key_out=bytes(32), integ_key_in=bytes(32), integ_key_out=bytes(32),
               ts_local=(TrafficSelector.from_network("10.1.0.0/16"),),
               ts_remote=(TrafficSelector.from_network("10.2.0.0/16", 17, 53),
                          TrafficSelector.from_network("2001:db8:2::/48")))
    await dp.add_child_sa(p)
    sas = {s.spi: s for s in await dp.xfrm.sas()}
    assert sas[0x2002].dst == B and sas[0x2002].encap == (4500, 4501)  # ours: local -> remote
    assert sas[0x2001].dst == A and sas[0x2001].encap == (4501, 4500)
    pols = {(str(p.sel.src), str(p.sel.dst), p.dir): p for p in await dp.xfrm.policies()}
    assert set(pols) == {("10.1.0.0/16", "10.2.0.0/16", "out"),
                         ("10.2.0.0/16", "10.1.0.0/16", "in"),
                         ("10.2.0.0/16", "10.1.0.0/16", "fwd")}
    out = pols[("10.1.0.0/16", "10.2.0.0/16", "out")]
    assert out.sel.proto == 17 and out.sel.dport == 53
    (t,) = out.templates
    assert (t.src, t.dst, t.mode, t.reqid) == (A, B, Mode.TUNNEL, p.reqid)
    assert out.priority == dp.priority_band.start + RANK_SA
    await dp.del_child_sa(p)
    assert await dp.xfrm.sas() == [] and await dp.xfrm.policies() == []


async def test_failed_child_sa_leaves_nothing(dp):
    dp.xfrm.fail_sa_spi = 0x2002
    with pytest.raises(XfrmError):
        await dp.add_child_sa(params(dp))
    assert await dp.xfrm.sas() == [] and await dp.xfrm.policies() == []


async def test_reqid_outside_band_is_refused_and_zero_takes_one(dp):
    with pytest.raises(ValueError, match="band"):
        await dp.add_child_sa(params(dp, reqid=5))
    await dp.add_child_sa(params(dp, reqid=0))
    (sa, _) = await dp.xfrm.sas()
    assert sa.reqid in dp.reqid_band and sa.reqid != dp.trap_reqid


async def test_sa_replaces_hold_shunt_and_clear_shunt_keeps_sa_policy(dp):
    await dp.set_shunt(A, B, ShuntKind.HOLD, 30)
    (hold,) = await dp.xfrm.policies()
    assert hold.templates[0].reqid == dp.trap_reqid and hold.lifetime.hard_s == 30
    p = params(dp)
    await dp.add_child_sa(p)
    out = await dp.xfrm.get_policy(Selector.pair(A, B), "out")
    assert out.priority == dp.priority_band.start + RANK_SA and out.lifetime == Lifetime()
    await dp.clear_shunt(A, B)  # must not remove the SA's policy that replaced the shunt
    assert await dp.xfrm.get_policy(Selector.pair(A, B), "out") == out


async def test_allocated_spi_is_filled_not_added(dp):
    seen = []
    orig = dp.xfrm.add_sa

    async def spy(spec, update=False):
        seen.append((spec.spi, update))
        await orig(spec, update)
    dp.xfrm.add_sa = spy
    spi = await dp.alloc_spi(A, B, seq=7)
    await dp.add_child_sa(params(dp, spi_in=spi))
    assert seen == [(spi, True), (0x2002, False)]


async def test_rekey_keeps_reqid_and_old_delete_keeps_new_policies(dp):
    """RFC 7296 §2.8: install the new pair, then delete the old; the old one's removal must not
    take the policies the new one uses, and both share the reqid the in policy accepts."""
    old = params(dp, reqid=0)
    await dp.add_child_sa(old)
    pols_before = await dp.xfrm.policies()
    new = params(dp, reqid=0, spi_in=0x3001, spi_out=0x3002)
    await dp.add_child_sa(new)
    reqids = {s.spi: s.reqid for s in await dp.xfrm.sas()}
    assert len(set(reqids.values())) == 1 and set(reqids) == {0x2001, 0x2002, 0x3001, 0x3002}
    dp.xfrm.fail_sa_spi = 0x4002  # a failed third install leaves the pair as it was
    with pytest.raises(XfrmError):
        await dp.add_child_sa(params(dp, reqid=0, spi_in=0x4001, spi_out=0x4002))
    await dp.del_child_sa(old)
    assert {s.spi for s in await dp.xfrm.sas()} == {0x3001, 0x3002}
    assert [(p.sel, p.dir, p.templates) for p in await dp.xfrm.policies()] == [
        (p.sel, p.dir, p.templates) for p in pols_before]
    await dp.del_child_sa(new)
    assert await dp.xfrm.sas() == [] and await dp.xfrm.policies() == []


async def test_a_rekey_we_answered_gets_its_outbound_sa_only_on_add_outbound(dp):
    """The kernel sends on the newest outbound SA of a reqid, and a rekey keeps the reqid:
    the new outbound SA must not exist before the peer can read it."""
    old = params(dp)
    await dp.add_child_sa(old)
    new = params(dp, reqid=0, spi_in=0x3001, spi_out=0x3002)
    await dp.add_child_sa(new, outbound=False)
    assert {s.spi for s in await dp.xfrm.sas()} == {0x2001, 0x2002, 0x3001}
    await dp.add_outbound(new)
    await dp.add_outbound(new)  # once only
    assert {s.spi for s in await dp.xfrm.sas()} == {0x2001, 0x2002, 0x3001, 0x3002}
    # on the pair's reqid, which its out policy's template names (the caller's says 0)
    assert {s.reqid for s in await dp.xfrm.sas()} == {old.reqid}
    await dp.del_child_sa(old)
    await dp.del_child_sa(new)
    assert await dp.xfrm.sas() == [] and await dp.xfrm.policies() == []
    # deleted before its outbound SA came: nothing to remove but what is there
    await dp.add_child_sa(old)
    await dp.add_child_sa(new, outbound=False)
    await dp.del_child_sa(new)
    assert {s.spi for s in await dp.xfrm.sas()} == {0x2001, 0x2002}
    assert {p.templates[0].reqid for p in await dp.xfrm.policies()} == {old.reqid}


async def test_a_going_pair_stops_sending_and_still_receives(dp):
    first = params(dp)
    await dp.add_child_sa(first)
    second = params(dp, reqid=0, spi_in=0x3001, spi_out=0x3002)  # a crossing's other pair
    await dp.add_child_sa(second)
    await dp.del_outbound(second)
    await dp.del_outbound(second)  # once only
    assert {s.spi for s in await dp.xfrm.sas()} == {0x2001, 0x2002, 0x3001}
    await dp.del_child_sa(second)
    assert {s.spi for s in await dp.xfrm.sas()} == {0x2001, 0x2002}
    assert {p.templates[0].reqid for p in await dp.xfrm.policies()} == {first.reqid}


async def test_adopt_keeps_own_sa_pairs_of_a_kept_stop():
    """keep_sas_on_stop: the next run adopts its SA pairs and their policies, still removes
    its other stale state, and hands out reqids above the adopted ones."""
    first = KernelDataplane()
    first.xfrm = FakeXfrm()
    p = params(first)
    await first.add_child_sa(p)
    await first.set_trap("198.51.100.0/24")
    second = KernelDataplane(adopt_sas=True)
    second.xfrm = first.xfrm
    assert await second.reconcile() == (1, 0)
    assert {s.spi for s in second.adopted} == {0x2001, 0x2002}
    assert {(str(x.sel.dst), x.dir) for x in await second.xfrm.policies()} == {
        ("192.0.2.2/32", "out"), ("192.0.2.1/32", "in")}
    assert second.new_reqid() > p.reqid
    third = KernelDataplane()
    third.xfrm = first.xfrm
    assert await third.reconcile() == (2, 2)


async def test_clean_stop_also_removes_adopted_pairs_and_kept_stop_keeps_them(dp):
    await dp.add_child_sa(params(dp))
    await dp.set_trap("198.51.100.0/24")
    await dp.set_shunt(A, ipaddress.ip_address("192.0.2.3"), ShuntKind.DROP, 60)
    xf = dp.xfrm
    xf.close = lambda: None
    await dp.stop(keep_sas=True)
    assert {s.spi for s in await xf.sas()} == {0x2001, 0x2002}
    assert {p.priority - dp.priority_band.start for p in await xf.policies()} == {RANK_SA}
    again = KernelDataplane(adopt_sas=True)
    again.xfrm = xf
    await again.reconcile()
    await again.stop()
    assert await xf.sas() == [] and await xf.policies() == []


async def _adopting(keep=2):
    """A run that kept `keep` SA pairs (to B, and to C) and the run after it, adopting."""
    first = KernelDataplane()
    first.xfrm = FakeXfrm()
    c = ipaddress.ip_address("192.0.2.3")
    await first.add_child_sa(params(first))
    if keep > 1:
        await first.add_child_sa(params(first, remote=c, spi_in=0x2101, spi_out=0x2102))
    second = KernelDataplane(adopt_sas=True)
    second.xfrm = first.xfrm
    await second.reconcile()
    return second, c


async def test_a_renewed_pair_replaces_the_adopted_one_and_leaves_the_others():
    dp, c = await _adopting()
    assert sorted(dp.adopted_peers()) == [(A, B), (A, c)]
    await dp.add_child_sa(params(dp, reqid=0, spi_in=0x3001, spi_out=0x3002))
    assert dp.adopted_peers() == [(A, c)]
    assert {s.spi for s in await dp.xfrm.sas()} == {0x3001, 0x3002, 0x2101, 0x2102}
    pols = {(str(x.sel.src), str(x.sel.dst)): x.templates[0].reqid
            for x in await dp.xfrm.policies()}
    new = pols[("192.0.2.1/32", "192.0.2.2/32")]
    assert pols[("192.0.2.2/32", "192.0.2.1/32")] == new > pols[("192.0.2.1/32", "192.0.2.3/32")]
    await dp.del_child_sa(params(dp, reqid=0, spi_in=0x3001, spi_out=0x3002))
    assert {s.spi for s in await dp.xfrm.sas()} == {0x2101, 0x2102}
    assert {str(x.sel.dst) for x in await dp.xfrm.policies()} == {"192.0.2.3/32", "192.0.2.1/32"}


@pytest.mark.parametrize("kind", [ShuntKind.DROP, ShuntKind.PASS])
async def test_a_failed_renewal_shunt_replaces_the_adopted_pair(kind):
    dp, _ = await _adopting(keep=1)
    await dp.set_shunt(A, B, kind, 60)
    assert dp.adopted_peers() == [] and dp.adopted == [] and await dp.xfrm.sas() == []
    (pol,) = await dp.xfrm.policies()
    assert (str(pol.sel.dst), pol.dir, pol.priority - dp.priority_band.start) == (
        "192.0.2.2/32", "out", RANK_SHUNT)
    assert not await dp.release_adopted(A, B)  # nothing left to release


async def test_esn_outbound_sa_gets_the_window_too(dp):
    seen = []
    orig = dp.xfrm.add_sa

    async def spy(spec, update=False):
        seen.append((spec.spi, spec.esn, spec.replay_window))
        await orig(spec, update)
    dp.xfrm.add_sa = spy
    await dp.add_child_sa(params(dp, esn=True, replay_window=128))
    await dp.add_child_sa(params(dp, spi_in=0x5001, spi_out=0x5002, local=A,
                                 remote=ipaddress.ip_address("192.0.2.9")))
    assert seen == [(0x2001, True, 128), (0x2002, True, 128), (0x5001, False, 64),
                    (0x5002, False, 0)]


async def test_event_stream_survives_a_timed_out_wait(dp):
    """wait_for(stream.__anext__(), t) timing out must not end the stream (an async
    generator would be finished by the cancellation)."""
    import asyncio

    from oe_agent.trap.netlink import EventsLost

    class Socket:
        def __init__(self):
            self.queue = asyncio.Queue()

        async def next(self):
            return await self.queue.get()

    dp._events = Socket()
    stream = dp.events()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(stream.__anext__(), 0.05)
    ours = {"state_id_daddr": xfrm.addr_bytes(B), "state_id_spi": 0x77, "state_family": 2,
            "state_reqid": dp.reqid_band.start + 3, "hard": 1}
    foreign = {**ours, "state_id_spi": 0x78, "state_reqid": 5}
    await dp._events.queue.put(_wire(xfrm.XFRM_USER_EXPIRE, foreign, xfrm.XFRM_MSG_EXPIRE))
    await dp._events.queue.put(EventsLost())  # the resync finds nothing tracked: no event
    await dp._events.queue.put(_wire(xfrm.XFRM_USER_EXPIRE, ours, xfrm.XFRM_MSG_EXPIRE))
    ev = await asyncio.wait_for(stream.__anext__(), 1)  # the foreign expire is filtered
    assert (ev.spi, ev.hard) == (0x77, True)
    assert dp.resyncs == 1
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
