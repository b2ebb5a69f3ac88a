#!/usr/bin/env python3
"""Benchmark (not a test): OE setup latency, first packet -> SA installed, oe-agent <-> oe-agent
with keys from DNS, p50/p99 over N peers (default 50), one peer at a time.

    sudo .venv/bin/python bench/setup_latency.py [--quick] [-n 50]

What runs (this machine, namespaces on the lab bridge): the embedded authoritative server with
the signed 2.0.192.in-addr.arpa zone (one Ed25519 IPSECKEY per host) in 192.0.2.53; the agent
under test in 192.0.2.1 and N peer agents in 192.0.2.2.., every one `oe-agent run` with the
userspace dataplane (this kernel has no ESP), private-or-clear for 192.0.2.0/24, validating
DNSSEC from the zone's DS. For each peer in turn, a sender in 192.0.2.1 sends one UDP datagram
and prints its monotonic send time; the agent's control socket (/status) is polled every 10 ms
until that peer is `up`. Latency = up - send (poll resolution 10 ms); both sides look their
peer's key up in DNS.

NOT measured here (what the issue asks beyond this): the libreswan <-> libreswan OE side and
the kernel dataplane. Both need real ESP, i.e. the QEMU guest (tools/vmrun.py): pluto's SA
install fails with ENOSYS on this kernel (shared/interop/README.md), and libreswan's
DNS-keyed OE also needs knot + the ubshim.so LD_PRELOAD (pitfall 1) inside the guest. The
anchor figure from shared/interop/vm/libreswan-oe-bench (AUTH_NULL OE, not DNS-keyed, TCG
guest) is printed for context only; it is not a same-run ratio.
Writes JSON into bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, BenchError, lab, need_memory, need_root, need_tools,  # noqa: E402
                    percentile, positive, run_main, summary, table, write_json)

DNS_V4, DNS_V6 = "192.0.2.53", "2001:db8::53"
MAX_N = 150  # one agent process (~60 MB) per peer
AGENT_MB = 70
ZONE = "2.0.192.in-addr.arpa"
SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t = time.monotonic(); s.sendto(b'first', (sys.argv[1], 9)); print(t, flush=True)
"""


def wait_file(path: Path, what: str, proc, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_socket() or (path.is_file() and path.stat().st_size)):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
            raise BenchError(f"{what} did not start: {tail}")
        time.sleep(0.05)


async def wait_up(sock: Path, remote: str, timeout: float) -> float | None:
    """Poll the agent's /status every 10 ms until `remote` is up; the monotonic time then."""
    import aiohttp
    conn = aiohttp.UnixConnector(path=str(sock))
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=10)) as s:
        while time.monotonic() < deadline:
            async with s.get("http://oe-agent/status") as r:
                st = await r.json()
            now = time.monotonic()
            for p in st.get("peer_list", []):
                if p["remote"] == remote and p["state"] in ("up", "shunted"):
                    return now if p["state"] == "up" else -now
            await asyncio.sleep(0.01)
    return None


def agent_config(h, anchors: Path) -> Path:
    pol = h.workdir / "policies"
    pol.mkdir(exist_ok=True)
    for g in ("clear", "clear-or-private", "private-or-clear", "private", "block"):
        (pol / g).write_text("192.0.2.0/24\n" if g == "private-or-clear" else "")
    cfg = h.workdir / "oe-agent.toml"
    cfg.write_text(f'[agent]\naddresses = ["{h.v4}"]\npolicies = "{pol}"\n'
                   f'socket = "{h.workdir / "ctl.sock"}"\ndataplane = "userspace"\n'
                   f'log_level = "warning"\n[identity]\nkey = "{h.workdir / "hostkey.pem"}"\n'
                   f'[dns]\nresolvers = ["{DNS_V4}"]\ntrust_anchors = "{anchors}"\n'
                   f'dnssec = "validate"\ntimeout = 2.0\n')
    return cfg


def body(args) -> int:
    if args.n > MAX_N:
        raise BenchError(f"-n {args.n} is too large: at most {MAX_N} peer agents here")
    need_root()
    need_tools("ip", "nft")
    need_memory((args.n + 1) * AGENT_MB, f"-n {args.n} ({args.n + 1} agent processes)")
    from oe_agent.dns.tools import generate_key, ipseckey_lines, write_private_key

    lat: list[float] = []
    failed: list[str] = []
    with lab("setuplat") as hosts:
        dns = hosts.add(v4=DNS_V4, v6=DNS_V6)
        a = hosts.add(v4="192.0.2.1", v6="2001:db8::1")
        peers = [hosts.add(v4=f"192.0.2.{i + 2}", v6=f"2001:db8::{i + 2:x}")
                 for i in range(args.n)]
        records = []
        for h in [a, *peers]:
            key = generate_key("ed25519")
            write_private_key(h.workdir / "hostkey.pem", key)
            records += [ln for ln in ipseckey_lines(key, [h.v4]) if not ln.startswith(";")]
        zdir = dns.workdir / "zones"
        zdir.mkdir()
        (zdir / f"{ZONE}.zone").write_text("\n".join(
            [f"$ORIGIN {ZONE}.", "$TTL 300",
             "@ SOA ns.oe.example. hostmaster.oe.example. 1 3600 600 86400 300",
             "@ NS ns.oe.example.", *records]) + "\n")
        anchors = dns.workdir / "anchors"
        dproc = dns.popen(sys.executable, "-m", "oe_agent", "serve-zones", "--zones", str(zdir),
                          "--listen", DNS_V4, "--port", "53", "--anchors-out", str(anchors),
                          log="dns.log", cwd=str(ROOT))
        wait_file(anchors, "the embedded DNS server", dproc, dns.workdir / "dns.log")
        procs = []
        for h in [a, *peers]:
            procs.append((h, h.popen(sys.executable, "-m", "oe_agent", "run", "-c",
                                     str(agent_config(h, anchors)), log="agent.log",
                                     cwd=str(ROOT))))
        for h, p in procs:
            wait_file(h.workdir / "ctl.sock", f"the agent in {h.v4}", p, h.workdir / "agent.log")
        print(f"{args.n + 1} agents up; one peer at a time", flush=True)
        (a.workdir / "sender.py").write_text(SENDER)
        for h in peers:
            out = a.run(sys.executable, str(a.workdir / "sender.py"), h.v4)
            sent = float(out.stdout.split()[0])
            up = asyncio.run(wait_up(a.workdir / "ctl.sock", h.v4, args.timeout))
            if up is None or up < 0:
                failed.append(h.v4)
                print(f"  {h.v4}: {'timeout' if up is None else 'shunted'}", flush=True)
            else:
                lat.append(up - sent)
        dns.stop(dproc)

    if not lat:
        raise BenchError(f"no SA came up ({len(failed)} failed)")
    ms = [x * 1000 for x in lat]
    report = {"benchmark": "setup_latency", "n": args.n, "tier": "netns (userspace dataplane)",
              "oe-agent_ms": summary(ms), "p50_ms": percentile(ms, 50),
              "p99_ms": percentile(ms, 99), "failed": failed,
              "missing": "libreswan <-> libreswan OE and the kernel dataplane: need the QEMU "
                         "guest (real ESP); not run",
              "context": {"libreswan_auth_null_oe_p50_ms_tcg_guest": "90-120",
                          "source": "shared/interop/vm/libreswan-oe-bench"}}
    print()
    print(f"first packet -> SA up, oe-agent <-> oe-agent, DNS keys, {len(ms)} peers "
          f"({len(failed)} failed), status polled every 10 ms")
    print(table(["side", "min ms", "p50 ms", "p99 ms", "max ms", "ratio"],
                [["oe-agent (netns, userspace)", min(ms), report["p50_ms"], report["p99_ms"],
                  max(ms), "n/a"],
                 ["libreswan (vm tier)", "not run", "", "", "", ""]]))
    print("libreswan <-> libreswan DNS-keyed OE needs the QEMU guest (real ESP, knot, ubshim); "
          "not part of this run, so no ratio")
    out = write_json("setup_latency", report)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 peers")
    ap.add_argument("-n", type=positive, default=None, help="peers (default 50)")
    ap.add_argument("--timeout", type=float, default=20.0, help="per peer, seconds")
    try:
        args = ap.parse_args()
    except SystemExit as e:
        return int(e.code or 0)
    args.n = args.n or (10 if args.quick else 50)
    return run_main("setup_latency", lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
