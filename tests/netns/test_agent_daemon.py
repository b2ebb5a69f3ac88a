"""The daemon in a namespace: group state in the dataplane, reload by difference (SIGHUP and
`oe-agent reload`), host addresses never trapped, the CLI against it, clean stop on SIGTERM.

Kernel dataplane: policies seen with `ip -n NS xfrm policy`. Userspace dataplane: routes in its
own table (dev oe0 = trap/block, throw = pass).
"""
import ipaddress
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import needs

TABLE = "28517"  # the userspace dataplane's routing table


def oe(*argv, check=True):
    r = subprocess.run([sys.executable, "-m", "oe_agent", *argv], capture_output=True, text=True,
                       timeout=60)
    if check and r.returncode:
        raise AssertionError(f"oe-agent {' '.join(argv)}: rc {r.returncode}: {r.stderr}")
    return r


def poll(pred, what, bound=20.0):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kernel_dataplane_present() -> bool:
    try:
        import oe_agent.trap.dataplane  # noqa: F401
        return True
    except ImportError:
        return False


def write_key(path):
    k = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return path


def write_policies(d, **groups):
    d.mkdir(exist_ok=True)
    for g in ("clear", "clear-or-private", "private-or-clear", "private", "block"):
        (d / g).write_text(groups.get(g.replace("-", "_"), "# empty\n"))


def state(host, dataplane):
    """What the dataplane holds, as comparable lines."""
    if dataplane == "kernel":
        out = host.run("ip", "xfrm", "policy", "list").stdout
        blocks = re.split(r"\n(?=src )", out.strip()) if out.strip() else []
        # per-socket policies (the IKE sockets' bypass) live and die with the process
        return {" ".join(b.splitlines()[0].split()) + " " + " ".join(b.split()[4:8])
                for b in blocks if "\tsocket " not in b and " socket " not in b}
    out = host.run("ip", "route", "show", "table", TABLE, check=False).stdout
    out6 = host.run("ip", "-6", "route", "show", "table", TABLE, check=False).stdout
    return {" ".join(l.split()[:3]) for l in (out + out6).splitlines() if l.strip()}


def groups_only(st):
    """The state minus the per-peer shunt entries of the acquire test peer."""
    return {l for l in st if "192.0.2.7" not in l.split()[:3] and "192.0.2.7/32" not in l}


def covers(st, dataplane, net, action):
    if dataplane == "kernel":
        return any(f"dst {net}" in l for l in st)
    n = ipaddress.ip_network(net)
    if n.prefixlen == n.max_prefixlen:  # ip route prints host routes without the length
        net = str(n.network_address)
    if action == "pass":
        return f"throw {net}" in {" ".join(l.split()[:2]) for l in st}
    return any(l.startswith(f"{net} dev oe0") for l in st)


@pytest.mark.parametrize("dataplane", ["userspace", "kernel"])
def test_daemon_groups_reload_cli_and_clean_stop(hosts, dataplane):
    if dataplane == "kernel":
        needs(kernel_dataplane_present(), "the kernel dataplane (oe_agent.trap.dataplane)")
    h = hosts.add()
    wd = h.workdir
    pol = wd / "policies"
    write_policies(pol, private_or_clear="192.0.2.0/24\n2001:db8::/64\n", clear="198.51.100.0/24\n",
                   block="203.0.113.0/24\n")
    sock = wd / "ctl.sock"
    cfg = wd / "oe.toml"
    key = write_key(wd / "hostkey.pem")
    cfg.write_text(f'[agent]\npolicies = "{pol}"\nsocket = "{sock}"\ndataplane = "{dataplane}"\n'
                   f'idle_timeout = 0\n[identity]\nkey = "{key}"\n[dns]\nresolvers = ["192.0.2.53"]\ndnssec = "off"\ntimeout = 60.0\n'
                   f'[shunts.lifetimes]\nnegotiation = 600\n')  # the silent resolver: a long hold
    before = state(h, dataplane)
    p = h.popen(sys.executable, "-m", "oe_agent", "run", "-c", str(cfg), log="agent.log")
    try:
        poll(lambda: oe("status", "--socket", str(sock), check=False).returncode == 0
             or p.poll() is not None, "the agent's socket")
        assert p.poll() is None, (wd / "agent.log").read_text()
        st = json.loads(oe("status", "--json", "--socket", str(sock)).stdout)
        assert "192.0.2.1" in st["addresses"] and st["policies"] >= 4
        s1 = state(h, dataplane)
        assert covers(s1, dataplane, "192.0.2.0/24", "trap")
        assert covers(s1, dataplane, "2001:db8::/64", "trap")
        assert covers(s1, dataplane, "198.51.100.0/24", "pass")
        assert covers(s1, dataplane, "203.0.113.0/24", "block")
        # own addresses and the resolver are exempt inside the trapped prefix
        for a in ("192.0.2.1/32", "2001:db8::1/128", "192.0.2.53/32"):
            assert covers(s1, dataplane, a, "pass"), (a, s1)
        # explain in words, from the running agent
        ex = oe("explain", "203.0.113.9", "--socket", str(sock)).stdout
        assert "block" in ex and "blocked both ways" in ex

        # a synthetic acquire: a hold shunt while negotiating, visible in shuntstatus
        out = oe("acquire", "--from", "192.0.2.1", "--to", "192.0.2.7", "--socket", str(sock)).stdout
        assert "192.0.2.7 (private-or-clear): trap -> negotiating" in out
        sh = oe("shuntstatus", "--socket", str(sock)).stdout
        # hold while the lookup runs; the unreachable resolver soon makes it a silent failure
        assert re.match(r"192\.0\.2\.7: (hold \(negotiating\)|pass \(silent: DNS timeout\)), age ", sh), sh

        # reload by difference (SIGHUP): block goes, a clear exception comes, traps stay
        write_policies(pol, private_or_clear="192.0.2.0/24\n2001:db8::/64\n",
                       clear="198.51.100.0/24\n192.0.2.128/25\n")
        p.send_signal(signal.SIGHUP)  # p is `ip netns exec`, which execs python: same PID
        poll(lambda: covers(state(h, dataplane), dataplane, "192.0.2.128/25", "pass"), "clear /25")
        s2 = state(h, dataplane)
        assert not covers(s2, dataplane, "203.0.113.0/24", "block")
        assert covers(s2, dataplane, "192.0.2.0/24", "trap") and covers(s2, dataplane, "192.0.2.1/32", "pass")

        # a bad reload (`oe-agent reload`): one error line, nothing changes
        (pol / "private").write_text("192.0.2.0/24\n")
        r = oe("reload", "--socket", str(sock), check=False)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "two groups" in r.stderr
        assert groups_only(state(h, dataplane)) == groups_only(s2)
        (pol / "private").write_text("")
        r = oe("reload", "--socket", str(sock))
        assert r.stdout.startswith("reloaded: 0 policies removed, 0 installed")
    finally:
        h.stop(p, signal.SIGTERM, wait=20)
    log = (wd / "agent.log").read_text()
    assert p.returncode == 0, log
    assert "Traceback" not in log, log
    assert state(h, dataplane) == before  # nothing of ours left behind
    assert not sock.exists()
    if dataplane == "userspace":
        assert "oe0" not in h.run("ip", "link").stdout


def test_second_daemon_on_the_same_socket_is_refused(hosts):
    h = hosts.add()
    pol = h.workdir / "policies"
    write_policies(pol, private="192.0.2.0/24\n")
    sock = h.workdir / "ctl.sock"
    cfg = h.workdir / "oe.toml"
    key = write_key(h.workdir / "hostkey.pem")
    cfg.write_text(f'[agent]\npolicies = "{pol}"\nsocket = "{sock}"\ndataplane = "userspace"\n'
                   f'[identity]\nkey = "{key}"\n')
    p = h.popen(sys.executable, "-m", "oe_agent", "run", "-c", str(cfg), log="a1.log")
    try:
        poll(lambda: oe("status", "--socket", str(sock), check=False).returncode == 0
             or p.poll() is not None, "first agent")
        r = subprocess.run(h.ns(sys.executable, "-m", "oe_agent", "run", "-c", str(cfg)),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "another agent is listening" in r.stderr
        assert r.stderr.count("\n") == 1
        assert oe("status", "--socket", str(sock), check=False).returncode == 0  # first one fine
    finally:
        h.stop(p, signal.SIGTERM, wait=20)


def test_crash_leaves_state_that_the_next_start_reconciles(hosts):
    """SIGKILL leaves the kernel dataplane's policies behind; the next start removes them
    (they carry the agent's priority band) before installing its own, and a clean stop after
    that leaves nothing."""
    needs(kernel_dataplane_present(), "the kernel dataplane (oe_agent.trap.dataplane)")
    h = hosts.add()
    pol = h.workdir / "policies"
    write_policies(pol, private="192.0.2.0/24\n", block="203.0.113.0/24\n")
    sock = h.workdir / "ctl.sock"
    key = write_key(h.workdir / "hostkey.pem")
    cfg = h.workdir / "oe.toml"
    cfg.write_text(f'[agent]\npolicies = "{pol}"\nsocket = "{sock}"\ndataplane = "kernel"\n'
                   f'[identity]\nkey = "{key}"\n')
    before = state(h, "kernel")
    p = h.popen(sys.executable, "-m", "oe_agent", "run", "-c", str(cfg), log="run1.log")
    poll(lambda: oe("status", "--socket", str(sock), check=False).returncode == 0
         or p.poll() is not None, "first agent")
    running = state(h, "kernel")
    h.stop(p, signal.SIGKILL)
    assert state(h, "kernel") == running != before  # the crash left its policies
    p = h.popen(sys.executable, "-m", "oe_agent", "run", "-c", str(cfg), log="run2.log")
    try:
        poll(lambda: oe("status", "--socket", str(sock), check=False).returncode == 0
             or p.poll() is not None, "second agent (stale socket replaced)")
        assert p.poll() is None, (h.workdir / "run2.log").read_text()
        assert state(h, "kernel") == running  # reconciled: the same policies, no duplicates
    finally:
        h.stop(p, signal.SIGTERM, wait=20)
    assert p.returncode == 0 and state(h, "kernel") == before


@pytest.mark.parametrize("dataplane", ["userspace", "kernel"])
def test_a_real_packet_is_an_acquire(hosts, dataplane):
    """A datagram to a trapped destination reaches the agent as an ACQUIRE (XFRM_MSG_ACQUIRE on
    the kernel dataplane, the packet itself on oe0): a hold shunt while IKE runs, then the
    silent peer's pass shunt."""
    if dataplane == "kernel":
        needs(kernel_dataplane_present(), "the kernel dataplane (oe_agent.trap.dataplane)")
    h = hosts.add()
    pol = h.workdir / "policies"
    write_policies(pol, private_or_clear="192.0.2.0/24\n")
    sock = h.workdir / "ctl.sock"
    key = write_key(h.workdir / "hostkey.pem")
    cfg = h.workdir / "oe.toml"
    cfg.write_text(f'[agent]\npolicies = "{pol}"\nsocket = "{sock}"\ndataplane = "{dataplane}"\n'
                   f'[identity]\nkey = "{key}"\n[ike]\nretransmit_tries = 2\n')
    p = h.popen(sys.executable, "-m", "oe_agent", "run", "-c", str(cfg), log="agent.log")
    try:
        poll(lambda: sock.exists() or p.poll() is not None, "the agent")
        assert p.poll() is None, (h.workdir / "agent.log").read_text()
        h.run(sys.executable, "-c", "import socket; s=socket.socket(socket.AF_INET, "
              "socket.SOCK_DGRAM); s.sendto(b'x', ('192.0.2.77', 9))", check=False)
        sh = poll(lambda: oe("shuntstatus", "--socket", str(sock)).stdout, "a shunt")
        assert re.match(r"192\.0\.2\.77: (hold \(negotiating\)|pass \(silent)", sh), sh
        ex = json.loads(oe("explain", "192.0.2.77", "--json", "--socket", str(sock)).stdout)
        assert ex["history"][0]["event"].startswith("acquire 192.0.2.1 -> 192.0.2.77"), ex
    finally:
        h.stop(p, signal.SIGTERM, wait=20)
    assert p.returncode == 0
