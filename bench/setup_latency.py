#!/usr/bin/env python3
"""Benchmark (not a test): OE setup latency, first packet -> SA installed, oe-agent <-> oe-agent
vs libreswan <-> libreswan, both keyed by DNS (IPSECKEY in DNSSEC-signed reverse zones from
the same knotd), p50/p99 over N peers (default 50) each, in one QEMU boot (real ESP).

    sudo .venv/bin/python bench/setup_latency.py [--quick] [-n 50] [--ed25519]

This host prepares what is slow or impossible in the guest (RSA-3072 keys: the agents' PEM
files and the plutos' NSS dbs; ubshim.so, compiled from the C below), then runs
bench/setup_latency_guest.py inside tools/vmrun.py's guest (Debian's kernel, TCG) and reads
its guest.json. Both sides use the kernel's ESP: the agent with `dataplane = "kernel"`,
pluto 4.10 (tools/.cache/libreswan) with the ubshim.so LD_PRELOAD that stops its libunbound
from answering the documentation reverse zones itself (shared/interop README, pitfall 1).
What is measured and how: see setup_latency_guest.py and bench/README.md. Prints the table
and the oe-agent/libreswan ratio, writes JSON into bench/results/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, BenchError, need_memory, need_root, need_tools,  # noqa: E402
                    percentile, positive, run_main, table, write_json)

MAX_N = 120          # peer addresses per side: 198.51.100.1-121 / .129-249, 203.0.113.1-121
GUEST_MEM = "2G"
WALL_LIMIT = 15 * 60
LIBRESWAN = ROOT / "tools" / ".cache" / "libreswan" / "usr" / "libexec" / "ipsec"
RSA_BITS = 3072      # libreswan 4.10's rsasigkey default; the agent gets the same size

# pluto's libunbound serves 2.0.192.in-addr.arpa, 100.51.198.in-addr.arpa, 113.0.203... as
# empty local zones (RFC 6303 defaults) and pluto has no option against it: after it reads
# resolv.conf, turn that off (`unblock-lan-zones`). Declared here: no libunbound-dev needed.
UBSHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
struct ub_ctx;
int ub_ctx_set_option(struct ub_ctx *ctx, const char *opt, const char *val);
int ub_ctx_resolvconf(struct ub_ctx *ctx, const char *fname)
{
	int (*next)(struct ub_ctx *, const char *) =
		(int (*)(struct ub_ctx *, const char *))dlsym(RTLD_NEXT, "ub_ctx_resolvconf");
	int r = next(ctx, fname);
	ub_ctx_set_option(ctx, "unblock-lan-zones:", "yes");
	return r;
}
"""


def load_vmrun():
    spec = importlib.util.spec_from_file_location("vmrun", ROOT / "tools" / "vmrun.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def preflight(args) -> None:
    """Every refusal before anything is created."""
    if args.n > MAX_N:
        raise BenchError(f"-n {args.n} is too large: at most {MAX_N} peers per side "
                         "(each side's peer addresses fit in half a documentation /24)")
    if args.timeout <= 0 or args.budget <= 60:
        raise BenchError("--timeout must be > 0 and --budget > 60 seconds")
    need_root()
    need_tools("ip", "unshare", "knotd", "knotc", "keymgr", "certutil", "gcc")
    missing = [t for t in ("pluto", "whack", "addconn", "rsasigkey", "showhostkey")
               if not os.access(LIBRESWAN / t, os.X_OK)]
    if missing:
        raise BenchError(f"libreswan is not unpacked ({LIBRESWAN}/{missing[0]} missing): run "
                         "tools/install-deps.sh")
    vm = load_vmrun()
    if not shutil.which(vm.QEMU):
        raise BenchError(f"{vm.QEMU} not found (apt-get install qemu-system-x86)")
    try:
        vm.find_kernel(None)
    except vm.Missing as e:
        raise BenchError(f"no guest kernel: {e}") from None
    if not (vm.BUSYBOX.is_file() and vm._is_static(vm.BUSYBOX)):
        raise BenchError(f"{vm.BUSYBOX} is not a static busybox (apt-get install busybox-static)")
    need_memory(2600, f"the QEMU guest ({GUEST_MEM})")


def sh(*cmd, **kw) -> str:
    try:
        return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                              timeout=300, **kw).stdout
    except subprocess.CalledProcessError as e:
        raise BenchError(f"{Path(str(cmd[0])).name} failed: {(e.stderr or e.stdout).strip()}")


def prepare(work: Path, ed25519: bool) -> None:
    """Keys for every daemon, and ubshim.so, into work/ (shared with the guest)."""
    from oe_agent.dns.tools import generate_key, write_private_key
    keys = work / "keys"
    keys.mkdir()
    kinds = [("rsa-3072", "rsa", RSA_BITS)] + ([("ed25519", "ed25519", None)] if ed25519 else [])
    for name, kind, bits in kinds:
        for role in ("init", "resp"):
            write_private_key(keys / f"{name}-{role}.pem", generate_key(kind, bits))
    lsw = {}
    for role in ("init", "resp"):
        nss = keys / f"nss-{role}"
        nss.mkdir()
        sh("certutil", "-N", "-d", f"sql:{nss}", "--empty-password")
        sh(LIBRESWAN / "rsasigkey", "--nssdir", nss, RSA_BITS)
        m = re.search(r"ckaid: ([0-9a-f]+)", sh(LIBRESWAN / "showhostkey", "--nssdir", nss,
                                                 "--list"))
        if not m:
            raise BenchError(f"showhostkey found no key in {nss}")
        left = sh(LIBRESWAN / "showhostkey", "--nssdir", nss, "--left", "--ckaid", m[1])
        k = re.search(r"leftrsasigkey=0s(\S+)", left)
        if not k:
            raise BenchError("showhostkey --left printed no rsasigkey")
        lsw[role] = {"ckaid": m[1], "rsasigkey": k[1]}
    (keys / "libreswan.json").write_text(json.dumps(lsw))
    (work / "ubshim.c").write_text(UBSHIM_C)
    sh("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", work / "ubshim.so", work / "ubshim.c",
       "-ldl")


def stats(results: list[dict]) -> dict:
    ms = [r["ms"] for r in results if r["ms"] is not None]
    d = {"peers": len(results), "ok": len(ms), "failed": [r["peer"] for r in results
                                                          if r["ms"] is None]}
    if ms:
        d.update(min=min(ms), p50=percentile(ms, 50), p99=percentile(ms, 99), max=max(ms))
    return d


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def body(args) -> int:
    preflight(args)
    sides = ["oe-agent-rsa", "libreswan"] + (["oe-agent-ed25519"] if args.ed25519 else [])
    old = signal.signal(signal.SIGTERM, _sigterm)
    # a shell starts background jobs with SIGINT ignored, and python then keeps it so
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="setuplat."))
    vmrun = None
    t_start = time.monotonic()
    args.load_at_start = os.getloadavg()
    ok = False
    try:
        work.chmod(0o755)
        print(f"preparing keys (RSA-{RSA_BITS}, NSS dbs) and ubshim.so in {work}", flush=True)
        prepare(work, args.ed25519)
        vm_timeout = WALL_LIMIT - (time.monotonic() - t_start) - 30
        cmd = [sys.executable, str(ROOT / "tools" / "vmrun.py"), "--mem", GUEST_MEM,
               "--rw", str(work), "--timeout", f"{vm_timeout:.0f}", "--",
               sys.executable, "bench/setup_latency_guest.py", "--work", str(work),
               "--ubshim", str(work / "ubshim.so"), "-n", str(args.n),
               "--sides", ",".join(sides), "--timeout", str(args.timeout),
               "--budget", str(min(args.budget, vm_timeout - 90))]
        print(f"booting the QEMU guest (TCG); {len(sides)} sides x {args.n} peers, one at a "
              "time, interleaved", flush=True)
        vmrun = subprocess.Popen(cmd, cwd=ROOT)
        rc = vmrun.wait()
        guest = work / "guest.json"
        if not guest.is_file():
            raise BenchError(f"the guest run gave no result (vmrun exit {rc}; its output is "
                             "above)")
        data = json.loads(guest.read_text())
        if "error" in data:
            raise BenchError(f"the guest run failed: {data['error']} (logs: {work}/logs)")
        ok = True
        return report(args, data, sides, time.monotonic() - t_start)
    finally:
        if vmrun is not None and vmrun.poll() is None:
            vmrun.terminate()  # vmrun kills QEMU's process group on SIGTERM
            try:
                vmrun.wait(30)
            except subprocess.TimeoutExpired:
                vmrun.kill()
                vmrun.wait()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif ok or args.keep:
            print(f"kept {work} (logs in {work}/logs)")
        elif not (work / "guest.json").exists():
            shutil.rmtree(work, ignore_errors=True)  # interrupted: nothing worth keeping
        signal.signal(signal.SIGTERM, old)


def report(args, data: dict, sides: list[str], wall: float) -> int:
    names = {"oe-agent-rsa": "oe-agent", "libreswan": "libreswan",
             "oe-agent-ed25519": "oe-agent (Ed25519)"}
    per = {}
    for kind in sides:
        side = data["sides"][names[kind]]
        per[names[kind]] = {**stats(side["results"]), "auth": side["auth"],
                            "warmup_ms": side["warmup"]["ms"],
                            "sa_pairs_at_end": side["sa_pairs_at_end"],
                            "netlink_overruns": side["netlink_overruns"]}
    lsw = per["libreswan"]
    rows = []
    for name, s in per.items():
        ratio = ""
        if name != "libreswan" and s.get("p50") and lsw.get("p50"):
            ratio = f"{s['p50'] / lsw['p50']:.2f}x p50, {s['p99'] / lsw['p99']:.2f}x p99"
            s["ratio_p50"] = s["p50"] / lsw["p50"]
            s["ratio_p99"] = s["p99"] / lsw["p99"]
        rows.append([f"{name} <-> {name}", s["auth"],
                     f"{s['ok']} ({len(s['failed'])} failed)", s.get("min"), s.get("p50"),
                     s.get("p99"), s.get("max"), ratio])
    print()
    print(f"first packet -> SA installed (both directions, XFRM netlink notification in the "
          f"initiator's namespace), DNS-keyed OE, QEMU guest (kernel {data['kernel']}, TCG, "
          f"{data['cpus']} vCPUs), peers one at a time, sides interleaved")
    print(table(["side", "auth", "peers", "min ms", "p50 ms", "p99 ms", "max ms",
                 "oe-agent/libreswan"], rows))
    if data.get("budget_hit_after") is not None:
        print(f"note: the measuring budget ran out after {data['budget_hit_after']} peers "
              "per side")
    out = {"benchmark": "setup_latency", "tier": "vm (QEMU TCG, real ESP, kernel dataplane)",
           "n": args.n, "measured_per_side": data["measured_per_side"],
           "per_peer_timeout_s": args.timeout, "wall_s": round(wall, 1), "sides": per,
           "loadavg_at_start": args.load_at_start,
           "guest": data}
    path = write_json("setup_latency", out)
    print(f"wrote {path.relative_to(ROOT)} (wall time {wall:.0f} s; load average "
          f"{args.load_at_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 peers per side")
    ap.add_argument("-n", type=positive, default=None, help=f"peers per side (default 50, "
                                                            f"at most {MAX_N})")
    ap.add_argument("--ed25519", action="store_true",
                    help="also measure oe-agent with Ed25519 keys (libreswan has no Ed25519)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per peer, seconds (30)")
    ap.add_argument("--budget", type=float, default=720.0,
                    help="guest seconds for set-up + measuring; the rest of 15 min is margin")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (daemon logs)")
    try:
        args = ap.parse_args()
    except SystemExit as e:
        return int(e.code or 0)
    args.n = args.n or (10 if args.quick else 50)
    return run_main("setup_latency", lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
