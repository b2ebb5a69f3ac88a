"""Kernel XFRM dataplane: trap/pass/block policies, ACQUIRE/EXPIRE events, ESP SA pairs.

Everything acts on the network namespace of the process that opens the sockets (start the
agent inside its namespace; nothing here enters another one).

Public API (stable; other parts and the vm tier use it):

    from oe_agent.trap import KernelDataplane, Xfrm, Selector, Template, Lifetime, SaSpec

    dp = KernelDataplane(adopt_sas=False)  # implements oe_agent.model.Dataplane; adopt_sas
                                           #   keeps pairs of a stop(keep_sas=True) run
    caps = await dp.start()                # Capabilities(esp, algorithms, detail); reconciles
    await dp.set_trap("192.0.2.0/24")      # also set_pass / set_block / remove_group_policy
    async for ev in dp.events(): ...       # KernelAcquire(Acquire) | SaExpire |
                                           #   KernelPolicyExpire(PolicyExpire)
    spi = await dp.alloc_spi(local, remote, seq=ev.seq)   # inbound SPI (remote -> local)
    await dp.add_child_sa(params)          # model.ChildSaParams: both SAs + in/out(/fwd)
                                           #   policies; reqid 0 = take one from the band
    await dp.set_shunt(local, remote, ShuntKind.HOLD, lifetime_s=30); await dp.clear_shunt(..)
    await dp.counters()                    # [SaCounters] of own SAs
    await dp.del_child_sa(params); await dp.stop(keep_sas=False)
    dp.xfrm                                # the lower-level Xfrm below, on the same socket
    dp.reqid_band, dp.priority_band, dp.trap_reqid, dp.new_reqid()

    x = await Xfrm.open()                  # typed XFRM operations, no ownership rules
    await x.add_policy(Selector.to("192.0.2.0/24", proto=17, dport=53), "out",
                       priority=..., action="allow"|"block", templates=(Template(reqid),),
                       lifetime=Lifetime(hard_s=30), update=False, mark=None, if_id=0)
    await x.del_policy(sel, "out"); await x.get_policy(sel, "in"); await x.policies()
    spi = await x.alloc_spi(src, dst, reqid=..., seq=acquire_seq)
    await x.add_sa(SaSpec(src, dst, spi, reqid, EspAlgorithm(...), encr_key, integ_key,
                          mode=Mode.TUNNEL, encap=(4500, 4500), lifetime=Lifetime(...)))
    await x.get_sa(dst, spi); await x.del_sa(dst, spi); await x.sas()  # Sa with counters

    caps = await run_probe()               # probe only: EPROTONOSUPPORT = no ESP,
                                           #   ENOSYS = algorithm missing, ok = works
    socket_bypass(sock)                    # IKE/DNS sockets skip XFRM policies
    enable_espinudp(sock)                  # the 4500 socket decapsulates ESP-in-UDP (RFC 3948)

Errors: XfrmError (an OSError: .errno, .ext_ack = the kernel's message); PolicyConflict when a
foreign policy holds a selector; ValueError for bad keys/selectors.
Wire level: oe_agent.trap.xfrm (structs/messages), oe_agent.trap.netlink (XfrmSocket,
XfrmEventSocket). `python -m oe_agent.trap` prints the probe result of this namespace.
"""
from oe_agent.trap.dataplane import (DEFAULT_PRIORITY_BASE, DEFAULT_REQID_BASE,
                                     KernelDataplane, PolicyConflict, enable_espinudp, probe,
                                     run_probe, socket_bypass)
from oe_agent.trap.kernel import (KernelAcquire, KernelPolicyExpire, Lifetime, Policy, Sa,
                                  SaSpec, Selector, Template, Xfrm)
from oe_agent.trap.netlink import EventsLost, XfrmError, XfrmEventSocket, XfrmSocket

__all__ = [
    "DEFAULT_PRIORITY_BASE", "DEFAULT_REQID_BASE", "EventsLost", "KernelAcquire",
    "KernelDataplane", "KernelPolicyExpire", "Lifetime", "Policy", "PolicyConflict", "Sa",
    "SaSpec", "Selector", "Template", "Xfrm", "XfrmError", "XfrmEventSocket", "XfrmSocket",
    "enable_espinudp", "probe", "run_probe", "socket_bypass",
]
