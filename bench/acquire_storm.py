#!/usr/bin/env python3
"""Benchmark (not a test): an ACQUIRE storm against one agent. N new destinations (default
1000) get their first packet within 1 s; half have a key in DNS, half have none. Measures the
time until every destination has an SA or a shunt, the acquires lost (must be 0) and the DNS
queries sent per name (counted at the embedded DNS server, in its process).

    sudo .venv/bin/python bench/acquire_storm.py [--quick] [-n 1000] [--spread 1.0]

Setup, all real parts, in namespaces on the lab bridge:
- h1 (192.0.2.1): `oe-agent run` with the userspace dataplane (this kernel has no ESP),
  private-or-clear for 198.51.100.0/24, 203.0.113.0/24 and 2001:db8:b::/64, DNSSEC-validating
  against the embedded server; the storm comes from a sender process in h1, one UDP datagram
  per destination, spread evenly over --spread seconds.
- h2 (192.0.2.2): holds every destination address (two /24s give 508 IPv4 addresses, so past
  500 the destinations continue in 2001:db8:b::/64). An IKE responder (oe-agent's engine on its
  asyncio adapter) answers on the keyed half, with one Ed25519 key published in DNS for each
  keyed address; nothing listens on the unkeyed half.
- h3 (192.0.2.53): the embedded authoritative server (oe_agent.dns.server.AuthServer) serving
  the signed reverse zones; its per-(name, type) query counter is written out at the end.
There is no libreswan/strongSwan run to compare with: neither has DNS-keyed OE that can run on
this kernel (no ESP: pluto's and charon's SA installs fail, interop README), so the figures are
absolute, against the targets (0 lost, <= 1 DNS query per name, all settled within 5 s).
Writes JSON into bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, BenchError, cpu_seconds, lab, need_root, need_tools,  # noqa: E402
                    positive, run_main, summary, table, write_json)

DNS_V4, DNS_V6 = "192.0.2.53", "2001:db8::53"
V6_NET = "2001:db8:b::/64"
MAX_N = 2000  # each destination is an address, a socket pair on the responder, a peer
SETTLE_TIMEOUT = 180.0
TIMELINE_STATES = ("up", "shunted", "negotiating", "responding", "trap")


def destinations(n: int) -> list[str]:
    v4 = [f"{net}.{i}" for i in range(1, 251) for net in ("198.51.100", "203.0.113")]
    v6 = [f"2001:db8:b::{i:x}" for i in range(1, n + 1)]
    return (v4 + v6)[:n]


# --- helpers run inside the namespaces ------------------------------------------------------

def serve_dns(zone_dir: str, anchors: str, out: str) -> int:
    """The embedded server with its query counter; writes the counter to `out` on SIGTERM."""
    from oe_agent.dns.server import AuthServer

    async def run() -> None:
        server = AuthServer.from_directory(zone_dir)
        for addr in (DNS_V4, DNS_V6):
            await server.start(addr, 53)
        tmp = Path(anchors + ".tmp")
        tmp.write_text("\n".join(server.ds_records()) + "\n")
        tmp.replace(anchors)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        Path(out).write_text(json.dumps({"queries": [[q, t, c] for (q, t), c in
                                                     server.queries.items()],
                                         "tcp": server.tcp_queries}))
        await server.close()

    asyncio.run(run())
    return 0


def run_sampled(out: str, argv: list[str]) -> int:
    """Run `python -m oe_agent ARGV` under a statistical profiler (stdlib only): a CPU-time
    timer (ITIMER_PROF, every 5 ms of the process's CPU) interrupts the main thread, whose
    stack is counted; at exit leaf functions, inclusive counts and whole stacks go to `out`.
    Unlike cProfile it barely slows the agent, so the shares are those of a normal run."""
    import runpy

    stacks: collections.Counter = collections.Counter()

    def sample(signum, frame) -> None:
        st = []
        while frame is not None and len(st) < 40:
            code = frame.f_code
            st.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        stacks[tuple(reversed(st))] += 1

    signal.signal(signal.SIGPROF, sample)
    signal.setitimer(signal.ITIMER_PROF, 0.005, 0.005)
    sys.argv = ["oe_agent", *argv]
    try:
        runpy.run_module("oe_agent", run_name="__main__")
    except SystemExit:
        pass
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        leaf: collections.Counter = collections.Counter()
        incl: collections.Counter = collections.Counter()
        for st, c in stacks.items():
            leaf[st[-1]] += c
            for fn in set(":".join(f.split(":")[:2]) for f in st):
                incl[fn] += c
        Path(out).write_text(json.dumps({
            "interval_cpu_s": 0.005, "samples": sum(stacks.values()),
            "inclusive": incl.most_common(300), "leaf": leaf.most_common(150),
            "stacks": [[list(st), c] for st, c in stacks.most_common(400)]}, indent=1))
    return 0


def serve_responder(cfg_path: str) -> int:
    """IKE responder for the keyed destinations: one static peer (the agent's key)."""
    from cryptography.hazmat.primitives import serialization

    from oe_agent.ike import auth as ikeauth
    from oe_agent.ike.adapter import IkeAdapter
    from oe_agent.ike.payloads import IdInitiator
    from oe_agent.ike.sa import IkeConfig

    raw = json.loads(Path(cfg_path).read_text())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    key = serialization.load_pem_private_key(raw["key_pem"].encode(), None)
    peer = serialization.load_pem_public_key(raw["peer_pem"].encode())
    agents = {ipaddress.ip_address(a) for a in raw["agent"]}
    configs = {}

    def config(local, remote):
        if remote not in agents:
            return None
        if local not in configs:
            configs[local] = IkeConfig(local_id=IdInitiator.from_address(str(local)),
                                       credential=ikeauth.SignatureCredential(key),
                                       peer_keys=(peer,), liveness_interval=0)
        return configs[local]

    async def run() -> None:
        adapter = IkeAdapter(raw["addresses"], config, lambda sa, ev: None,
                             cookie_threshold=None)
        await adapter.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        adapter.close()

    asyncio.run(run())
    return 0


SENDER = """
import socket, sys, time
dsts = sys.argv[2:]; spread = float(sys.argv[1])
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
t0 = time.monotonic(); print(f"start {t0}", flush=True)
for i, d in enumerate(dsts):
    due = t0 + spread * i / len(dsts)
    while time.monotonic() < due: time.sleep(max(0, min(0.001, due - time.monotonic())))
    try: (s6 if ':' in d else s4).sendto(b'storm', (d, 9))
    except OSError as e: print('send', d, e, flush=True)
print(f"end {time.monotonic()}", flush=True)
"""


# --- the benchmark --------------------------------------------------------------------------

def reverse_zone(addr: str) -> str:
    a = ipaddress.ip_address(addr)
    if a.version == 4:
        return ".".join(reversed(addr.split(".")[:3])) + ".in-addr.arpa"
    net = ipaddress.ip_network(V6_NET)
    nibbles = net.network_address.exploded.replace(":", "")[:16]
    return ".".join(reversed(nibbles)) + ".ip6.arpa"


def write_zones(zdir: Path, dsts: list[str], keyed: set[str], key) -> None:
    from oe_agent.dns.tools import ipseckey_lines

    zdir.mkdir()
    by_zone: dict[str, list[str]] = {}
    for d in dsts:
        by_zone.setdefault(reverse_zone(d), [])
    records = [ln for ln in ipseckey_lines(key, sorted(keyed)) if not ln.startswith(";")]
    for r in records:
        owner = r.split()[0].rstrip(".")
        zone = next(z for z in by_zone if owner.endswith("." + z))
        by_zone[zone].append(r)
    for origin, lines in by_zone.items():
        head = [f"$ORIGIN {origin}.", "$TTL 300",
                "@ SOA ns.oe.example. hostmaster.oe.example. 1 3600 600 86400 300",
                "@ NS ns.oe.example."]
        (zdir / f"{origin}.zone").write_text("\n".join(head + lines) + "\n")


def wait_for(path: Path, what: str, proc, timeout: float = 30.0, text: bytes | None = None,
             log: Path | None = None):
    """Bounded wait for a file (a socket: its existence; `text`: that text in it)."""
    deadline = time.monotonic() + timeout
    while True:
        if path.is_socket() or (path.exists() and path.stat().st_size
                                and (text is None or text in path.read_bytes())):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            log = log or path
            tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
            raise BenchError(f"{what} did not start: {tail}")
        time.sleep(0.05)


def status(sock: Path) -> dict:
    from oe_agent.control.client import call
    return call(argparse.Namespace(socket=str(sock), timeout=10.0), "GET", "/status")


def body(args) -> int:
    if args.n > MAX_N:
        raise BenchError(f"-n {args.n} is too large: at most {MAX_N} destinations here "
                         "(each is an address, two sockets on the responder and a peer)")
    if args.n < 2:
        raise BenchError("-n must be at least 2 (half keyed, half not)")
    need_root()
    need_tools("ip", "nft")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * args.n + 256:
        raise BenchError(f"open-file limit {hard} is too low for {args.n} destinations "
                         f"(the responder binds two sockets per keyed address); ulimit -n")

    from oe_agent.dns.tools import generate_key, write_private_key

    dsts = destinations(args.n)
    keyed = {d for i, d in enumerate(dsts) if i % 2 == 0}
    agent_key, resp_key = generate_key("ed25519"), generate_key("ed25519")
    from cryptography.hazmat.primitives import serialization
    pem = lambda k: k.private_bytes(serialization.Encoding.PEM,  # noqa: E731
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    pub = lambda k: k.public_key().public_bytes(serialization.Encoding.PEM,  # noqa: E731
                                                serialization.PublicFormat.SubjectPublicKeyInfo
                                                ).decode()
    me = str(Path(__file__).resolve())
    with lab("storm") as hosts:
        a = hosts.add()
        b = hosts.add()
        dns = hosts.add(v4=DNS_V4, v6=DNS_V6)
        # destinations live on h2; h1 routes them there
        a.run("ip", "route", "add", "198.51.100.0/24", "via", b.v4)
        a.run("ip", "route", "add", "203.0.113.0/24", "via", b.v4)
        a.run("ip", "-6", "route", "add", V6_NET, "via", b.v6)
        batch = "".join(f"addr add {d}/{128 if ':' in d else 32} dev lo\n" for d in dsts)
        b.run("ip", "-batch", "-", input=batch, timeout=120)
        # DNS
        zdir = dns.workdir / "zones"
        write_zones(zdir, dsts, keyed, resp_key)
        anchors, counts = dns.workdir / "anchors", dns.workdir / "queries.json"
        dproc = dns.popen(sys.executable, me, "--serve-dns", str(zdir), str(anchors),
                          str(counts), log="dns.log", cwd=str(ROOT))
        wait_for(anchors, "the embedded DNS server", dproc, log=dns.workdir / "dns.log")
        # responder for the keyed half
        rcfg = b.workdir / "responder.json"
        rcfg.write_text(json.dumps({"addresses": sorted(keyed), "agent": [a.v4, a.v6],
                                    "key_pem": pem(resp_key), "peer_pem": pub(agent_key)}))
        rproc = b.popen(sys.executable, me, "--serve-responder", str(rcfg), log="responder.log",
                        cwd=str(ROOT))
        wait_for(b.workdir / "responder.log", "the IKE responder", rproc, text=b"ready")
        # the agent under test
        write_private_key(a.workdir / "hostkey.pem", agent_key)
        pol = a.workdir / "policies"
        pol.mkdir()
        for g in ("clear", "clear-or-private", "private-or-clear", "private", "block"):
            nets = ["198.51.100.0/24", "203.0.113.0/24", V6_NET] if g == "private-or-clear" else []
            (pol / g).write_text("".join(f"{c}\n" for c in nets))
        sock = a.workdir / "ctl.sock"
        (a.workdir / "oe-agent.toml").write_text(
            f'[agent]\naddresses = ["{a.v4}", "{a.v6}"]\npolicies = "{pol}"\n'
            f'socket = "{sock}"\ndataplane = "userspace"\nlog_level = "warning"\n'
            f'[identity]\nkey = "{a.workdir / "hostkey.pem"}"\n'
            f'[dns]\nresolvers = ["{DNS_V4}"]\ntrust_anchors = "{anchors}"\n'
            f'dnssec = "validate"\ntimeout = 2.0\n')
        prof = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
        if args.sample:
            prof = [me, "--run-sampled", str(Path(args.sample).resolve()), "--"]
        agent = a.popen(sys.executable, *prof, *([] if args.sample else ["-m", "oe_agent"]),
                        "run", "-c",
                        str(a.workdir / "oe-agent.toml"), log="agent.log", cwd=str(ROOT))
        wait_for(sock, "the agent", agent, log=a.workdir / "agent.log")
        st = status(sock)
        print(f"agent up: dataplane {st['dataplane']}; {len(keyed)} keyed + "
              f"{args.n - len(keyed)} unkeyed destinations; storm over {args.spread:g} s",
              flush=True)
        # the storm; the agent's CPU is counted from here (not its start-up)
        cpu_start = cpu_seconds(agent.pid) or 0.0
        peers_cpu_start = {"responder": cpu_seconds(rproc.pid) or 0.0,
                           "dns_server": cpu_seconds(dproc.pid) or 0.0}
        (a.workdir / "sender.py").write_text(SENDER)
        sender = a.popen(sys.executable, str(a.workdir / "sender.py"), str(args.spread), *dsts,
                         log="sender.log")
        wait_for(a.workdir / "sender.log", "the sender", sender, text=b"start")
        t0 = float((a.workdir / "sender.log").read_text().split()[1])
        first_final: dict[str, float] = {}
        final_state: dict[str, str] = {}
        dset = set(dsts)
        polls, missed, timeline = [], 0, []
        from oe_agent.errors import UserError
        while True:
            try:
                st = status(sock)
            except UserError:  # the agent's loop was busy for the whole poll timeout
                missed += 1
                if time.monotonic() - t0 > args.timeout:
                    raise BenchError(f"the agent stopped answering its control socket "
                                     f"({missed} polls missed)") from None
                continue
            now = time.monotonic() - t0
            polls.append(now)
            by_state = collections.Counter()
            for p in st["peer_list"]:
                r = p["remote"]
                if r in dset:
                    by_state[p["state"]] += 1
                    if p["state"] in ("up", "shunted"):
                        first_final.setdefault(r, now)
                        final_state[r] = p["state"]
            # states of the destinations over time: where a slow run spends it
            timeline.append([round(now, 2), *(by_state[k] for k in TIMELINE_STATES)])
            if len(first_final) == len(dsts) or now > args.timeout:
                break
            time.sleep(0.2)
        sender.wait(10)
        sender_log = (a.workdir / "sender.log").read_text()
        end = float(sender_log.split("end ")[1].split()[0])
        seen = {p["remote"]: p["state"] for p in st["peer_list"]}
        try:  # the agent's event counters: why negotiations failed, DNS statuses
            from oe_agent.control.client import call
            mtext = call(argparse.Namespace(socket=str(sock), timeout=10.0), "GET", "/metrics",
                         text=True)
            agent_events = {ln.split('"')[1]: int(ln.split()[-1]) for ln in mtext.splitlines()
                            if ln.startswith("oe_agent_events_total{")}
        except Exception as e:  # a figure less, not a failed run
            agent_events = {"error": str(e)}
        agent_cpu = cpu_seconds(agent.pid)
        agent_cpu = None if agent_cpu is None else agent_cpu - cpu_start
        children_cpu = cpu_seconds(agent.pid, children=True)  # e.g. the nft runs it waited for
        peers_cpu = {k: round((cpu_seconds(p.pid) or 0.0) - peers_cpu_start[k], 2)
                     for k, p in (("responder", rproc), ("dns_server", dproc))}
        end_states = dict(collections.Counter(seen.get(d, "absent") for d in dsts))
        first_poll = polls[0] if polls else None
        log_tail = (a.workdir / "agent.log").read_text(errors="replace").splitlines()[-30:]
        time.sleep(0.5)
        a.stop(agent, wait=120.0 if args.profile or args.sample else 5.0)  # profiles: at exit
        dns.stop(dproc)
        q = json.loads(counts.read_text()) if counts.exists() else {"queries": []}

    from oe_agent.dns import ipseckey
    names = {ipseckey.owner_name(d).to_text().lower(): d for d in dsts}
    per_name = {d: 0 for d in dsts}
    other = 0
    for qname, qtype, c in q["queries"]:
        d = names.get(qname.lower())
        if d is not None:
            per_name[d] += c
        else:
            other += c
    lost = sorted(d for d in dsts if d not in seen)
    unsettled = sorted(d for d in dsts if d in seen and d not in first_final)
    keyed_up = sum(1 for d in keyed if final_state.get(d) == "up")
    unkeyed_shunted = sum(1 for d in dset - keyed if final_state.get(d) == "shunted")
    wrong = sorted(d for d in dsts if d in final_state and
                   final_state[d] != ("up" if d in keyed else "shunted"))
    settle_all = max(first_final.values()) if len(first_final) == len(dsts) else None
    # per destination: from its own first packet (the sender keeps an even schedule)
    sent_at = {d: args.spread * i / len(dsts) for i, d in enumerate(dsts)}
    kt = [first_final[d] - sent_at[d] for d in keyed if d in first_final]
    ut = [first_final[d] - sent_at[d] for d in dset - keyed if d in first_final]
    report = {"benchmark": "acquire_storm", "n": args.n, "keyed": len(keyed),
              "spread_s": args.spread, "storm_sent_s": end - t0,
              "setup": "oe-agent run (userspace dataplane) in h1; engine responder for the "
                       "keyed half in h2; embedded signed DNS in h3; no peer implementation "
                       "(none runs DNS-keyed OE on this kernel)",
              "all_settled_s": settle_all, "keyed_up": keyed_up,
              "unkeyed_shunted": unkeyed_shunted, "acquires_lost": len(lost),
              "lost": lost[:20], "unsettled": unsettled[:20], "n_unsettled": len(unsettled),
              "unexpected_outcome": wrong[:20], "n_unexpected": len(wrong),
              "settle_time_keyed": summary(kt), "settle_time_unkeyed": summary(ut),
              "dns_queries_per_name": summary(list(per_name.values())),
              "dns_queries_other": other, "dns_tcp_queries": q.get("tcp", 0),
              "poll_interval_s": 0.2, "agent_cpu_s": agent_cpu,
              "agent_cpu_ms_per_destination": None if agent_cpu is None else
              agent_cpu * 1000 / args.n, "agent_children_cpu_s": children_cpu,
              "status_polls": len(polls), "status_polls_missed": missed,
              "other_processes_cpu_s": peers_cpu, "agent_events": agent_events,
              "timeline_columns": ["t_s", *TIMELINE_STATES], "timeline": timeline,
              "first_status_answer_s": first_poll, "end_states": end_states,
              "agent_log_tail": log_tail}
    for k in ("settle_time_keyed", "settle_time_unkeyed", "dns_queries_per_name"):
        report[k].pop("runs")
    print()
    print(f"ACQUIRE storm: {args.n} destinations ({len(keyed)} keyed) in "
          f"{end - t0:.2f} s, one agent (userspace dataplane); status polled every 0.2 s")
    dq = report["dns_queries_per_name"]
    rows = [["first packet -> SA, keyed (s)", *(report["settle_time_keyed"][k] for k in
                                        ("min", "median", "max")), "all within 5 s"],
            ["first packet -> shunt, unkeyed (s)", *(report["settle_time_unkeyed"][k] for k in
                                             ("min", "median", "max")), "all within 5 s"],
            ["DNS queries per name", dq["min"], dq["median"], dq["max"], "<= 1"]]
    print(table(["measure", "min", "median", "max", "target"], rows))
    print(f"states at the end: {end_states}; first /status answer after the storm began: "
          f"{first_poll if first_poll is None else round(first_poll, 2)} s, "
          f"{missed} polls timed out (10 s each)")
    when = "never" if settle_all is None else f"{settle_all:.2f} s"
    print(f"all settled: {when} after the storm's first packet; "
          f"keyed up {keyed_up}/{len(keyed)}, unkeyed shunted {unkeyed_shunted}/"
          f"{args.n - len(keyed)}; acquires lost {len(lost)} (target 0); unsettled at the end "
          f"{len(unsettled)}; unexpected outcomes {len(wrong)}; other DNS queries (zone keys, "
          f"the agent's own) {other}; agent CPU {agent_cpu:.2f} s from the storm to the end "
          f"({(agent_cpu or 0) * 1000 / args.n:.1f} ms per destination), plus {children_cpu} s "
          f"in child processes it ran (nft); CPU of the responder {peers_cpu['responder']} s, "
          f"of the DNS server {peers_cpu['dns_server']} s; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"agent events: {agent_events}")
    step = max(1, len(timeline) // 12)
    print("timeline (s: " + "/".join(TIMELINE_STATES) + "): " + ", ".join(
        f"{t:g}: {'/'.join(map(str, c))}" for t, *c in timeline[::step] + timeline[-1:]))
    out = write_json("acquire_storm", report)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--run-sampled"] and len(sys.argv) > 4:  # the agent, sampled
        return run_sampled(sys.argv[2], sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 destinations")
    ap.add_argument("-n", type=positive, default=None, help="destinations (default 1000)")
    ap.add_argument("--spread", type=float, default=1.0, help="storm length in seconds")
    ap.add_argument("--timeout", type=float, default=SETTLE_TIMEOUT,
                    help="give up waiting after this many seconds")
    ap.add_argument("--profile", metavar="FILE",
                    help="run the agent under cProfile and write its stats to FILE")
    ap.add_argument("--sample", metavar="FILE",
                    help="run the agent under a sampling profiler (5 ms) and write JSON to FILE")
    ap.add_argument("--serve-dns", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--serve-responder", help=argparse.SUPPRESS)
    try:
        args = ap.parse_args()
    except SystemExit as e:
        return int(e.code or 0)
    if args.serve_dns:
        return serve_dns(*args.serve_dns)
    if args.serve_responder:
        return serve_responder(args.serve_responder)

    args.n = args.n or (200 if args.quick else 1000)
    return run_main("acquire_storm", lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
