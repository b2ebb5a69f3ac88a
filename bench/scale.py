#!/usr/bin/env python3
"""Benchmark (not a test): memory and idle CPU of one agent holding N established peers
(default 10 000): bytes per peer and timer wakeups per second while idle.

    .venv/bin/python bench/scale.py [--quick] [-n 10000] [--idle 10]

What is built, in this process (in-memory peers, as the issue allows):
- the agent's side: one IkeEndpoint (oe_agent.ike.sa) configured as the agent configures it
  (address IDs, Ed25519, transport mode, the engine's default proposals, liveness 30 s) and one
  UserspaceDataplane (oe_agent.esp.dataplane, not started: no TUN, its SA tables only);
- N peers at 2001:db8:1::/64 addresses: for each, a real IKE_SA_INIT + IKE_AUTH between the
  agent's endpoint (initiator) and a peer endpoint over memory, then the agent's Child SA is
  added to the dataplane (add_child_sa). The peers' own IKE state is dropped after every batch,
  so what stays is the agent's.
Memory: tracemalloc over the first 1000 peers (live Python bytes allocated while they were set
up, the peers' side garbage-collected; tracing all 10 000 would triple the set-up time) and the
RSS delta over all N (an upper bound: it also holds freed pages of the dropped peer side), each
divided by the number of peers. Idle: the clock is frozen while the
peers are set up (so all timers stay where a real agent would have them), then runs for
--idle seconds with the IKE adapter's timer discipline (one timer at the endpoint's earliest
deadline) and the dataplane's poll loop; every wakeup is counted, and a wakeup at which no SA
timer of the endpoint or the dataplane was due is "beyond due timers" (target 0). The CPU
seconds of that window are measured too. No other implementation is run: charon/pluto cannot
be loaded with 10 000 peers in-process; libreswan's figure (~70 kB RSS per OE peer, measured
in the QEMU guest, shared/interop/vm/libreswan-oe-bench) is quoted for context only.
Writes JSON into bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, BenchError, need_memory, positive, run_main, table,  # noqa: E402
                    write_json)

AGENT = ipaddress.ip_address("2001:db8::1")
MAX_N = 50000
BATCH = 250


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peer_address(i: int) -> ipaddress.IPv6Address:
    return ipaddress.ip_address(f"2001:db8:1::{i + 1:x}")


class Clock:
    """Frozen at `t` while peers are set up; then advancing with the monotonic clock."""

    def __init__(self) -> None:
        self.frozen: float | None = time.monotonic()
        self.offset = 0.0

    def __call__(self) -> float:
        return self.frozen if self.frozen is not None else time.monotonic() - self.offset

    def run(self) -> None:
        self.offset = time.monotonic() - self.frozen
        self.frozen = None


async def build(n: int, clock: Clock, progress: bool, args_sample: int, budget: float):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from common import engine_config
    from oe_agent.esp.dataplane import UserspaceDataplane
    from oe_agent.ike.events import ChildSaEstablished
    from oe_agent.ike.sa import IkeEndpoint

    agent_key = ed25519.Ed25519PrivateKey.generate()
    peer_key = ed25519.Ed25519PrivateKey.generate()
    agent_cfg = engine_config(agent_key, peer_key.public_key(), str(AGENT))
    peer_cfgs: dict = {}

    def peer_config(local, remote):
        if local not in peer_cfgs:
            peer_cfgs[local] = engine_config(peer_key, agent_key.public_key(), str(local))
        return peer_cfgs[local]

    rng = os.urandom
    dp = UserspaceDataplane(clock=clock)
    dp.raw_esp = True  # not started: the SA tables only (raw ESP would be found at start)
    ep = IkeEndpoint(rng, lambda l, r: None)
    gc.collect()
    base_rss, base_py = rss_bytes(), tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    sample = min(n, args_sample)
    py = None
    rates = []
    for start in range(0, n, BATCH):
        if time.perf_counter() - t0 > budget:
            print(f"  set-up budget of {budget:.0f} s spent at {start} peers: measuring there",
                  flush=True)
            break
        if start == sample and tracemalloc.is_tracing():
            gc.collect()
            py = (tracemalloc.get_traced_memory()[0] - base_py) / sample
            tracemalloc.stop()  # its overhead would triple the set-up time of 10 000 peers
        peers = IkeEndpoint(rng, peer_config)
        now = clock()
        for i in range(start, min(n, start + BATCH)):
            ep.connect(agent_cfg, AGENT, peer_address(i), now)
        for _ in range(20):  # IKE_SA_INIT, IKE_AUTH: a few rounds settle the batch
            moved = False
            for d in ep.datagrams_to_send(now):
                moved = True
                peers.receive_datagram(d.data, (d.remote, d.remote_port),
                                       (d.local, d.local_port), now)
            for d in peers.datagrams_to_send(now):
                moved = True
                ep.receive_datagram(d.data, (d.remote, d.remote_port),
                                    (d.local, d.local_port), now)
            while (item := ep.next_event()) is not None:
                if isinstance(item[1], ChildSaEstablished):
                    await dp.add_child_sa(item[1].params)
            while peers.next_event() is not None:
                pass
            if not moved:
                break
        del peers
        done = min(n, start + BATCH)
        if progress and (done % 1000 == 0 or done == n):
            el = time.perf_counter() - t0
            rates.append((done, el))
            print(f"  {done} peers up ({el:.0f} s, {done / el:.0f}/s)", flush=True)
    setup_s = time.perf_counter() - t0
    setup_cpu = time.process_time() - cpu0
    established = sum(1 for sa in ep.sas if sa.state.value == "established")
    failed = len(ep.sas) - established
    gc.collect()
    if tracemalloc.is_tracing():
        sample = max(1, len(ep.sas))
        py = (tracemalloc.get_traced_memory()[0] - base_py) / sample
        tracemalloc.stop()
    rss = rss_bytes() - base_rss
    return ep, dp, {"established": established, "failed": failed,
                    "child_sas_in_dataplane": len(dp._sa_in), "setup_s": setup_s,
                    "setup_cpu_s": setup_cpu, "tracemalloc_bytes_per_peer": py,
                    "tracemalloc_sample_peers": sample, "rss_delta_bytes": rss,
                    "progress_peers_seconds": rates, "budget_s": budget,
                    "reached_n": established >= n}


async def idle(ep, dp, clock: Clock, seconds: float) -> dict:
    """The IKE adapter's timer discipline (IkeAdapter.flush/_on_timer) plus the dataplane's
    poll loop, for `seconds`; counts wakeups and whether anything was due at each."""
    clock.run()
    end = clock() + seconds
    wakeups = due_wakeups = ike_due = dp_due = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    dp_next = dp.poll(clock())
    while True:
        ike_next = ep.get_timer()  # what IkeAdapter.flush re-arms its one timer with
        nxt = min([t for t in (ike_next, dp_next) if t is not None], default=None)
        if nxt is None or nxt > end:
            await asyncio.sleep(max(0.0, end - clock()))
            break
        await asyncio.sleep(max(0.0, nxt - clock()))
        now = clock()
        wakeups += 1
        n_ike = sum(1 for sa in ep.sas if (t := sa.get_timer()) is not None and t <= now)
        n_dp = 1 if dp_next is not None and dp_next <= now else 0
        ike_due += n_ike
        dp_due += n_dp
        if n_ike or n_dp:
            due_wakeups += 1
        ep.handle_timer(now)
        ep.datagrams_to_send(now)  # nowhere to send them: the peers are in-memory only
        while ep.next_event() is not None:
            pass
        dp_next = dp.poll(now)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - t0
    # what IkeAdapter.flush costs after every datagram at this size (it walks every SA twice)
    c0 = time.process_time()
    for _ in range(5):
        ep.datagrams_to_send(clock())
        ep.get_timer()
    flush_ms = (time.process_time() - c0) * 1000 / 5
    return {"adapter_flush_cpu_ms": flush_ms, "seconds": wall, "wakeups": wakeups,
            "wakeups_per_s": wakeups / wall,
            "wakeups_with_due_timer": due_wakeups,
            "wakeups_beyond_due_timers": wakeups - due_wakeups,
            "ike_sa_timers_due": ike_due, "dataplane_polls_due": dp_due,
            "cpu_s": cpu, "cpu_fraction": cpu / wall,
            "next_ike_deadline_in_s": (ep.get_timer() or 0) - clock() if ep.sas else None}


def body(args) -> int:
    if args.n > MAX_N:
        raise BenchError(f"-n {args.n} is too large: at most {MAX_N} peers here")
    # a generous bound: ~40 kB per peer while both sides exist, plus the interpreter
    need_memory(args.n * 40 / 1024 + 200, f"-n {args.n}")
    tracemalloc.start()
    clock = Clock()
    print(f"setting up {args.n} peers in-process (real IKE_SA_INIT + IKE_AUTH each) ...",
          flush=True)

    async def go():
        ep, dp, mem = await build(args.n, clock, progress=True, args_sample=args.sample,
                                  budget=args.budget)
        idl = await idle(ep, dp, clock, args.idle)
        return mem, idl

    mem, idl = asyncio.run(go())
    n = max(1, mem["established"])
    per_py, per_rss = mem["tracemalloc_bytes_per_peer"], mem["rss_delta_bytes"] / n
    report = {"benchmark": "scale", "n": args.n, "idle_window_s": args.idle,
              "setup": "in-process: agent IkeEndpoint + UserspaceDataplane tables (not started)"
                       "; peers' IKE state dropped per batch",
              "memory": mem, "bytes_per_peer_tracemalloc": per_py,
              "bytes_per_peer_rss": per_rss, "idle": idl,
              "context": {"libreswan_rss_per_oe_peer_bytes": 71 * 1024,
                          "source": "shared/interop/vm/libreswan-oe-bench (QEMU guest)"}}
    print()
    if not mem["reached_n"]:
        print(f"NOTE: only {mem['established']} of {args.n} peers within the set-up budget; "
              "the figures below are at that count")
    print(f"{mem['established']} peers established ({mem['failed']} failed), "
          f"{mem['child_sas_in_dataplane']} Child SAs in the dataplane, set up in "
          f"{mem['setup_s']:.0f} s ({mem['established'] / mem['setup_s']:.0f} peers/s)")
    rows = [[f"bytes per peer (tracemalloc, first {mem['tracemalloc_sample_peers']})",
             f"{per_py:.0f}", "<= 16384",
             f"{per_py / 16384:.2f}x of target"],
            [f"bytes per peer (RSS delta, all {n})", f"{per_rss:.0f}", "<= 16384",
             f"libreswan ~72 kB/peer: {per_rss / (71 * 1024):.2f}x"],
            [f"idle wakeups/s over {idl['seconds']:.1f} s", f"{idl['wakeups_per_s']:.2f}", "", ""],
            ["idle wakeups beyond due timers", idl["wakeups_beyond_due_timers"], "0", ""],
            ["idle CPU (fraction of one core)", f"{idl['cpu_fraction']:.4f}", "", ""],
            ["CPU of one IkeAdapter.flush (ms, per datagram)",
             f"{idl['adapter_flush_cpu_ms']:.2f}", "", "walks every IKE SA"]]
    print(table(["measure", "oe-agent", "target", "context"], rows))
    out = write_json("scale", report)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1000 peers, 5 s idle")
    ap.add_argument("-n", type=positive, default=None, help="peers (default 10000)")
    ap.add_argument("--idle", type=float, default=None, help="idle window (default 10 s)")
    ap.add_argument("--budget", type=float, default=600.0,
                    help="stop adding peers after this many seconds and measure there "
                         "(keeps the run within 15 minutes on a busy machine)")
    try:
        args = ap.parse_args()
    except SystemExit as e:
        return int(e.code or 0)
    args.n = args.n or (1000 if args.quick else 10000)
    args.idle = args.idle or (5.0 if args.quick else 10.0)
    args.sample = 1000
    return run_main("scale", lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
