"""The kernel dataplane against this kernel's XFRM (no ESP here), run inside test namespaces.

The project's code runs in a driver process started with `ip netns exec` in a test host, so
it only ever sees that namespace's netlink; the `hosts` fixture proves the host namespace's
`ip xfrm` state and policies did not change.
"""
from __future__ import annotations

import ipaddress
import json
import os
import select
import subprocess
import sys
import time

import pytest

from oe_agent.trap.dataplane import DEFAULT_PRIORITY_BASE, DEFAULT_REQID_BASE, RANK_SHUNT
from tests.conftest import have, needs

# The driver: JSON lines in (op, args, kw), JSON lines out ({"ok": ...} or {"error": ...}).
DRIVER = r'''
import asyncio, dataclasses, enum, ipaddress, json, socket, sys
from oe_agent.trap import KernelDataplane, Lifetime, Selector, Template, XfrmError

def plain(v):
    if dataclasses.is_dataclass(v):
        d = {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        d["type"] = type(v).__name__
        return d
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return sorted(plain(x) for x in v) if isinstance(v, (set, frozenset)) else [
            plain(x) for x in v]
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (ipaddress._BaseAddress, ipaddress._BaseNetwork)):
        return str(v)
    return v

async def main():
    dp = KernelDataplane()
    queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    consumer = None

    async def consume():
        async for ev in dp.events():
            await queue.put(ev)

    async def op_start():
        nonlocal consumer
        caps = await dp.start()
        consumer = asyncio.create_task(consume())
        return caps

    async def op_event(wait=10):
        return await asyncio.wait_for(queue.get(), wait)

    async def op_send_udp(dsts, port=9999, payload="canary"):
        out = []
        for d in dsts:
            fam = socket.AF_INET6 if ":" in d else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                s.sendto(payload.encode(), (d, port))
                out.append(s.getsockname()[1])
            except OSError as e:
                out.append(-e.errno)
            finally:
                s.close()
        return out

    async def op_policy(sel, dir, priority, action="allow", reqid=0, lifetime=None):
        await dp.xfrm.add_policy(Selector(**sel), dir, priority=priority, action=action,
                                 templates=(Template(reqid=reqid, family=Selector(**sel).family),)
                                 if reqid else (), lifetime=Lifetime(**(lifetime or {})))

    async def op_alloc_spi_raw(src, dst, seq=0, reqid=0):
        return await dp.xfrm.alloc_spi(src, dst, seq=seq, reqid=reqid)

    async def op_shrink_events(size=1):
        dp._events._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    async def op_pause_events():
        consumer.cancel()

    async def op_resume_events():
        nonlocal consumer
        consumer = asyncio.create_task(consume())

    async def op_send_bypassed(dst, port, payload):
        from oe_agent.trap import enable_espinudp, socket_bypass
        s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
        socket_bypass(s)
        enable_espinudp(s)
        s.sendto(payload.encode(), (dst, port))
        s.close()

    async def op_stop_ends_events():
        await dp.stop()
        await asyncio.wait_for(consumer, 5)
        return consumer.done()

    async def op_resyncs():
        return dp.resyncs

    async def op_own():
        return {"policies": await dp.policies(), "sas": await dp.sas()}

    ops = {n[3:]: f for n, f in locals().items() if n.startswith("op_")}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        fn = ops.get(req["op"]) or getattr(dp, req["op"])
        try:
            res = {"ok": plain(await fn(*req.get("args", []), **req.get("kw", {})))}
        except XfrmError as e:
            res = {"error": "XfrmError", "errno": e.errno, "msg": str(e)}
        except Exception as e:
            res = {"error": type(e).__name__, "msg": str(e)}
        print(json.dumps(res), flush=True)
        if req["op"] in ("stop", "stop_ends_events"):
            break

asyncio.run(main())
'''


class Agent:
    """The dataplane running in one test host; `call` performs one driver op."""

    def __init__(self, host):
        self.host = host
        self.proc = subprocess.Popen(host.ns(sys.executable, "-c", DRIVER), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(
                                         host.workdir / "driver.err", "wb"),
                                     start_new_session=True, text=True)
        host.procs.append(self.proc)

    def call(self, op, *args, timeout=15.0, **kw):
        self.proc.stdin.write(json.dumps({"op": op, "args": list(args), "kw": kw}) + "\n")
        self.proc.stdin.flush()
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert r, f"driver op {op} gave no answer in {timeout}s; " + (
            self.host.workdir / "driver.err").read_text()
        line = self.proc.stdout.readline()
        assert line, "driver died: " + (self.host.workdir / "driver.err").read_text()
        return json.loads(line)

    def ok(self, op, *args, **kw):
        res = self.call(op, *args, **kw)
        assert "ok" in res, res
        return res["ok"]

    def event(self, timeout=10.0):
        return self.ok("event", wait=timeout, timeout=timeout + 5)

    def stop(self):
        self.ok("stop")
        self.proc.wait(10)


@pytest.fixture
def agent_in(hosts):
    agents = []

    def start(host):
        a = Agent(host)
        caps = a.ok("start")
        a.caps = caps
        agents.append(a)
        return a

    yield start
    for a in agents:
        if a.proc.poll() is None:
            a.stop()


def addrs(a, b, ver):
    return (a.v4, b.v4) if ver == 4 else (a.v6, b.v6)


def xfrm_text(host, what):
    return host.run("ip", "xfrm", what, "list").stdout


@pytest.mark.parametrize("ver", [4, 6])
def test_trap_acquire_then_allocspi(hosts, agent_in, ver):
    a, b = hosts.pair()
    src, dst = addrs(a, b, ver)
    ag = agent_in(a)
    net = "192.0.2.0/24" if ver == 4 else "2001:db8::/64"
    ag.ok("set_trap", net, 17, 9999)
    (sport,) = ag.ok("send_udp", [dst], port=9999)
    assert sport > 0
    ev = ag.event()
    assert ev["type"] == "KernelAcquire"
    assert (ev["src"], ev["dst"], ev["proto"], ev["sport"], ev["dport"]) == (
        src, dst, 17, sport, 9999)
    plen = 32 if ver == 4 else 128
    sel = ev["selector"]
    assert (sel["src"], sel["dst"], sel["proto"]) == (f"{src}/{plen}", f"{dst}/{plen}", 17)
    (tmpl,) = ev["templates"]
    assert (tmpl["reqid"], tmpl["proto"], tmpl["mode"]) == (DEFAULT_REQID_BASE, 50, "transport")
    assert ev["priority"] >= DEFAULT_PRIORITY_BASE and ev["policy_index"] > 0
    # the kernel's larval state for this flow carries the same seq
    larval = [s for s in ag.ok("own")["sas"] if s["spi"] == 0 and s["dst"] == dst]
    assert [s["seq"] for s in larval] == [ev["seq"]], larval
    # ALLOCSPI with the ACQUIRE's seq gives the SPI to that larval state (outbound direction)
    spi_out = ag.ok("alloc_spi_raw", src, dst, seq=ev["seq"], reqid=DEFAULT_REQID_BASE)
    assert spi_out >= 0x100
    own = ag.ok("own")["sas"]
    assert [(s["dst"], s["seq"]) for s in own if s["spi"] == spi_out] == [(dst, ev["seq"])]
    assert not [s for s in own if s["spi"] == 0 and s["dst"] == dst], "larval kept SPI 0"
    # the inbound SPI (remote -> local) for the same negotiation
    spi_in = ag.ok("alloc_spi", src, dst, ev["seq"])
    assert spi_in >= 0x100 and spi_in != spi_out
    assert f"spi 0x{spi_in:08x}" in xfrm_text(a, "state")


def test_policy_lifetime_polexpire_restores_trap(hosts, agent_in):
    a, b = hosts.pair()
    ag = agent_in(a)
    ag.ok("set_trap", "192.0.2.0/24")
    ag.ok("set_shunt", a.v4, b.v4, "pass", 2)
    pols = {(p["sel"]["src"], p["sel"]["dst"]): p for p in ag.ok("own")["policies"]}
    shunt = pols[(f"{a.v4}/32", f"{b.v4}/32")]
    assert shunt["priority"] == DEFAULT_PRIORITY_BASE + RANK_SHUNT
    assert shunt["lifetime"]["hard_s"] == 2 and not shunt["templates"]
    ev = ag.event(timeout=15)
    assert ev["type"] == "KernelPolicyExpire" and ev["hard"] is True
    assert (ev["src"], ev["dst"], ev["index"]) == (f"{a.v4}/32", f"{b.v4}/32", shunt["index"])
    left = [(p["sel"]["src"], p["sel"]["dst"]) for p in ag.ok("own")["policies"]]
    assert (f"{a.v4}/32", f"{b.v4}/32") not in left
    # the trap underneath applies again: the next packet is an ACQUIRE
    ag.ok("send_udp", [b.v4])
    ev = ag.event()
    assert ev["type"] == "KernelAcquire" and ev["dst"] == b.v4


def test_policy_soft_then_hard_expire(hosts, agent_in):
    a, b = hosts.pair()
    ag = agent_in(a)
    sel = {"src": f"{a.v4}/32", "dst": f"{b.v4}/32", "proto": 17, "dport": 53}
    ag.ok("policy", sel, "out", DEFAULT_PRIORITY_BASE + 40, lifetime={"soft_s": 1, "hard_s": 3})
    first, second = ag.event(timeout=15), ag.event(timeout=15)
    assert (first["type"], first["hard"], second["hard"]) == ("KernelPolicyExpire", False, True)
    assert first["dst"] == f"{b.v4}/32" and first["proto"] == 17


def test_larval_state_hard_expire(hosts, agent_in):
    a, b = hosts.pair()
    a.run("sysctl", "-qw", "net.core.xfrm_acq_expires=2")
    ag = agent_in(a)
    ag.ok("set_trap", f"{b.v4}/32")
    ag.ok("send_udp", [b.v4])
    acq = ag.event()
    assert acq["type"] == "KernelAcquire"
    exp = ag.event(timeout=15)
    assert exp["type"] == "SaExpire" and exp["hard"] is True
    assert (exp["spi"], exp["dst"], exp["reqid"]) == (0, b.v4, DEFAULT_REQID_BASE)
    assert not [s for s in ag.ok("own")["sas"] if s["dst"] == b.v4]


def _ping(host, dst) -> bool:
    return host.run("ping", "-c", "1", "-W", "1", dst, check=False).returncode == 0


def _udp_arrives(src_host, dst_host, dst, port=7777, tries=3) -> bool:
    """Send a datagram from src_host; True if dst_host's listener got it (bounded wait)."""
    fam = "-6" if ":" in dst else "-4"
    code = ("import socket,sys;f=socket.AF_INET6 if sys.argv[1]=='-6' else socket.AF_INET;"
            "s=socket.socket(f,socket.SOCK_DGRAM);s.bind(('', int(sys.argv[2])));"
            "s.settimeout(float(sys.argv[3]));print(s.recv(100).decode())")
    listener = subprocess.Popen(dst_host.ns(sys.executable, "-c", code, fam, str(port), "3"),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.3)
        for _ in range(tries):
            src_host.run(sys.executable, "-c",
                         "import socket,sys;f=socket.AF_INET6 if ':' in sys.argv[1] else "
                         "socket.AF_INET;socket.socket(f,socket.SOCK_DGRAM).sendto(b'canary',"
                         "(sys.argv[1],int(sys.argv[2])))", dst, str(port), check=False)
        out, _ = listener.communicate(timeout=10)
        return "canary" in out
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()


@pytest.mark.parametrize("ver", [4, 6])
def test_pass_and_block_change_reachability(hosts, agent_in, ver):
    needs(have("ping"), "ping (iputils-ping)")
    a, b = hosts.pair()
    src, dst = addrs(a, b, ver)
    assert _ping(a, dst) and _udp_arrives(a, b, dst)
    ag = agent_in(a)
    net = "192.0.2.0/24" if ver == 4 else "2001:db8::/64"
    host = f"{dst}/{32 if ver == 4 else 128}"
    ag.ok("set_block", host)
    assert not _ping(a, dst), "block out: ping went through"
    assert not _ping(b, src), "block is both directions: the reply must be dropped"
    ag.ok("remove_group_policy", host)
    assert _ping(a, dst)
    ag.ok("set_trap", net)  # no ESP: trapped traffic never leaves
    assert not _udp_arrives(a, b, dst)
    ag.ok("set_pass", host)  # longest prefix wins over the trap
    assert _udp_arrives(a, b, dst) and _ping(a, dst)
    ag.ok("remove_group_policy", host)
    assert not _udp_arrives(a, b, dst)
    ag.ok("set_shunt", src, dst, "pass", 0)  # a pass shunt on the pair also opens it
    assert _udp_arrives(a, b, dst)
    ag.ok("set_shunt", src, dst, "drop", 0)
    assert not _ping(a, dst)
    ag.ok("clear_shunt", src, dst)
    ag.stop()
    assert _ping(a, dst) and _udp_arrives(a, b, dst), "stop() must leave nothing behind"
    assert xfrm_text(a, "policy").strip() == ""


def test_probe_reports_no_esp(hosts, agent_in):
    a = hosts.add()
    # the kernel's own answer, through iproute2 rather than the project's code
    r = a.run("ip", "xfrm", "state", "add", "src", "192.0.2.10", "dst", "192.0.2.11", "proto",
              "esp", "spi", "0x4242", "mode", "transport", "enc", "cbc(aes)", "0x" + "00" * 16,
              "auth-trunc", "hmac(sha256)", "0x" + "00" * 32, "128", check=False)
    needs(r.returncode != 0 and ("Requested type not found" in r.stderr
                                 or "Protocol not supported" in r.stderr),
          f"a kernel without ESP (this machine's); iproute2 said: {r.stderr.strip() or 'ok'}")
    ag = agent_in(a)
    assert ag.caps["esp"] is False and ag.caps["algorithms"] == []
    assert "no ESP" in ag.caps["detail"]
    assert xfrm_text(a, "state").strip() == "", "the probe SA must be gone"
    out = a.run(sys.executable, "-m", "oe_agent.trap").stdout
    assert out.startswith("esp=no"), out


def test_reconcile_removes_only_own_entries(hosts, agent_in):
    a, b = hosts.pair()
    own_prio = DEFAULT_PRIORITY_BASE + 300
    a.run("ip", "xfrm", "policy", "add", "src", "0.0.0.0/0", "dst", "198.51.100.0/24",
          "dir", "out", "priority", str(own_prio), "tmpl", "proto", "esp", "reqid",
          str(DEFAULT_REQID_BASE), "mode", "transport")
    a.run("ip", "xfrm", "policy", "add", "src", "0.0.0.0/0", "dst", "203.0.113.0/24",
          "dir", "out", "priority", "1000", "action", "block")
    a.run("ip", "xfrm", "state", "allocspi", "src", b.v4, "dst", a.v4, "proto", "esp",
          "reqid", str(DEFAULT_REQID_BASE + 5), "mode", "transport")
    a.run("ip", "xfrm", "state", "allocspi", "src", b.v4, "dst", a.v4, "proto", "esp",
          "reqid", "77", "mode", "transport")
    ag = agent_in(a)
    pol = xfrm_text(a, "policy")
    assert "203.0.113.0/24" in pol and "priority 1000" in pol, pol
    assert "198.51.100.0/24" not in pol, pol
    st = xfrm_text(a, "state")
    assert "reqid 77 " in st and f"reqid {DEFAULT_REQID_BASE + 5} " not in st, st
    # the foreign policy also blocks the agent from taking its selector
    res = ag.call("set_block", "203.0.113.0/24")
    assert res.get("error") == "PolicyConflict", res
    ag.stop()
    assert "priority 1000" in xfrm_text(a, "policy")


def test_lost_events_resync_by_dump(hosts, agent_in):
    """A tiny receive buffer and a burst of ACQUIREs overflow the event socket (ENOBUFS). The
    dataplane re-reads state by dump: the shunt whose POLEXPIRE was lost is reported expired.
    The kernel makes no larval state for an ACQUIRE it could not deliver, so the flows it
    dropped acquire again on their next packet."""
    a, b = hosts.pair()
    ag = agent_in(a)
    ag.ok("set_trap", "198.51.100.0/24")
    a.run("ip", "route", "add", "198.51.100.0/24", "dev", "eth0")
    dsts = [str(ipaddress.ip_address("198.51.100.10") + i) for i in range(60)]
    ag.ok("pause_events")
    ag.ok("shrink_events", 1)
    ag.ok("set_shunt", a.v4, b.v4, "drop", 1)
    ag.ok("send_udp", dsts)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and f"{b.v4}/32" in xfrm_text(a, "policy"):
        time.sleep(0.2)
    assert f"{b.v4}/32" not in xfrm_text(a, "policy"), "the shunt did not expire"
    ag.ok("shrink_events", 1 << 20)
    ag.ok("resume_events")
    seen, expired = set(), []
    for _ in range(2 * len(dsts)):
        res = ag.call("event", wait=3, timeout=10)
        if "ok" not in res:
            break
        ev = res["ok"]
        if ev["type"] == "KernelAcquire":
            seen.add(ev["dst"])
        elif ev["type"] in ("PolicyExpire", "KernelPolicyExpire"):
            expired.append(ev)
    assert ag.ok("resyncs") >= 1
    assert [(e["src"], e["dst"], e["hard"]) for e in expired] == [
        (f"{a.v4}/32", f"{b.v4}/32", True)]
    assert 0 < len(seen) < len(dsts), "the burst should have overflowed the socket"
    ag.ok("send_udp", sorted(set(dsts) - seen))
    while seen != set(dsts):
        ev = ag.event(timeout=10)
        if ev["type"] == "KernelAcquire":
            seen.add(ev["dst"])
    assert seen == set(dsts)


def _collector(host, port, seconds):
    """A UDP listener in `host` that prints every datagram it gets for `seconds`."""
    code = ("import socket,sys,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.bind(('',int(sys.argv[1])));end=time.monotonic()+float(sys.argv[2])\n"
            "print('ready',flush=True)\n"
            "while time.monotonic()<end:\n"
            " s.settimeout(max(0.01,end-time.monotonic()))\n"
            " try: print(s.recv(100).decode(),flush=True)\n"
            " except OSError: pass\n")
    p = subprocess.Popen(host.ns(sys.executable, "-c", code, str(port), str(seconds)),
                         stdout=subprocess.PIPE, start_new_session=True)
    host.procs.append(p)
    assert _received(p, {"ready"}) == {"ready"}
    return p


def _received(p, want, bound=10.0):
    """Lines the collector printed until all of `want` came or the bound passed (raw reads:
    a buffered readline would hide a second line from select)."""
    fd = p.stdout.fileno()
    buf = b""
    got: set[str] = set()
    deadline = time.monotonic() + bound
    while not want <= got and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        got.update(x.decode().strip() for x in lines)
    return got


def test_held_packets_follow_the_failure_shunt(hosts, agent_in):
    """Hold (product.md §3): the first packet waits on the trap, the next on the hold shunt;
    when the negotiation fails into a pass shunt both are sent in the clear, not dropped."""
    a, b = hosts.pair()
    ag = agent_in(a)
    ag.ok("set_trap", f"{b.v4}/32")
    listener = _collector(b, 7001, 30)
    ag.ok("send_udp", [b.v4], port=7001, payload="first")
    acq = ag.event()
    assert acq["type"] == "KernelAcquire" and acq["dport"] == 7001
    ag.ok("set_shunt", a.v4, b.v4, "hold", 30)
    (sport,) = ag.ok("send_udp", [b.v4], port=7001, payload="second")
    assert sport > 0, f"the held packet was refused: errno {-sport}"
    assert _received(listener, {"first"}, bound=1.0) == set(), "held packets leaked"
    ag.ok("set_shunt", a.v4, b.v4, "pass", 30)
    got = _received(listener, {"first", "second"})
    assert got == {"first", "second"}
    # the larval state is retired with the negotiation: once the shunt goes, the trap
    # acquires again at once (not only after xfrm_acq_expires)
    assert not [s for s in ag.ok("own")["sas"] if s["dst"] == b.v4]
    ag.ok("clear_shunt", a.v4, b.v4)
    ag.ok("send_udp", [b.v4], port=7001, payload="third")
    again = ag.event()
    assert again["type"] == "KernelAcquire" and again["seq"] != acq["seq"]


def test_bypassed_socket_skips_the_trap_and_stop_ends_events(hosts, agent_in):
    """IKE/DNS sockets carry a per-socket allow policy, so they reach a trapped peer; stop()
    ends the event stream instead of leaving its consumer waiting."""
    a, b = hosts.pair()
    ag = agent_in(a)
    ag.ok("set_trap", f"{b.v4}/32")
    listener = _collector(b, 7002, 20)
    ag.ok("send_bypassed", b.v4, 7002, "ike")
    assert _received(listener, {"ike"}) == {"ike"}
    ag.ok("send_udp", [b.v4], port=7002, payload="trapped")
    assert ag.event()["type"] == "KernelAcquire"
    assert _received(listener, {"trapped"}, bound=1.0) == set()
    assert ag.ok("stop_ends_events") is True
    ag.proc.wait(10)
    assert xfrm_text(a, "policy").strip() == ""
