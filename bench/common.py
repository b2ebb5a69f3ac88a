"""Shared plumbing of the benchmarks (not tests): preflight checks that fail before anything is
created, a lab of namespaces that is torn down by PID also on Ctrl-C/SIGTERM, min/median/max
summaries, the result table and the JSON file in bench/results/."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
CHARON_BIN = "/usr/lib/ipsec/charon"
LIBIPSEC = "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"


class BenchError(Exception):
    """A precondition or input the benchmark cannot run with: one line, no traceback."""


def fail(name: str, msg: str) -> int:
    print(f"{name}: {msg}", file=sys.stderr)
    return 2


def need_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (it creates network namespaces); run it with sudo")


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if not (shutil.which(t) or os.access(t, os.X_OK))]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (tools/install-deps.sh)")


def need_charon() -> None:
    if not os.access(CHARON_BIN, os.X_OK) or not Path(LIBIPSEC).exists():
        raise BenchError(f"strongSwan charon with kernel-libipsec is needed ({CHARON_BIN}, "
                         f"{LIBIPSEC}); apt-get install strongswan-charon "
                         "libstrongswan-extra-plugins or run tools/install-deps.sh")


def need_memory(mbytes: float, what: str) -> None:
    """Refuse a size the machine cannot hold (MemAvailable), before anything starts."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        avail = int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return
    if mbytes > avail * 0.8:
        raise BenchError(f"{what} needs about {mbytes:.0f} MB, only {avail:.0f} MB available")


def positive(value: str) -> int:
    """argparse type: a positive integer."""
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"not an integer: {value!r}") from None
    if n <= 0:
        raise ValueError(f"must be positive: {value}")
    return n


def summary(values: list[float]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None, "runs": []}
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "runs": values}


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table (markdown-compatible) so it can be pasted into bench/README.md."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return "—" if v is None else str(v)
    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells)])


def write_json(name: str, report: dict) -> Path:
    report.setdefault("when", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    report.setdefault("cpus", os.cpu_count())
    # the machine is shared: absolute times scale with its load, ratios much less
    report.setdefault("loadavg_1_5_15", os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out


def cpu_seconds(pid: int, children: bool = False) -> float | None:
    """utime + stime of a process (`ip netns exec` execs, so a Host.popen pid is the program);
    `children`: only the CPU of its finished, waited-for children (cutime + cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        i = 13 if children else 11
        return (int(fields[i]) + int(fields[i + 1])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def lab(name: str):
    """A HostFactory in a temporary directory; namespaces and their processes are removed (by
    PID) when the block ends, also on Ctrl-C or SIGTERM."""
    from oe_agent.lab import HostFactory
    old = signal.signal(signal.SIGTERM, _sigterm)
    with tempfile.TemporaryDirectory(prefix=f"{name}.") as tmp:
        hosts = HostFactory(Path(tmp), prefix=f"ob{name[:4]}{os.getpid() % 10000}")
        try:
            yield hosts
        finally:
            # a second Ctrl-C during teardown must not leave namespaces behind
            prev = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                hosts.close()
            finally:
                signal.signal(signal.SIGINT, prev)
                signal.signal(signal.SIGTERM, old)


def run_main(name: str, fn) -> int:
    """Run a benchmark's body; BenchError and Ctrl-C end with one line, not a traceback."""
    try:
        return fn() or 0
    except BenchError as e:
        return fail(name, str(e))
    except KeyboardInterrupt:
        print(f"{name}: interrupted; namespaces and processes removed", file=sys.stderr)
        return 130


# --- in-process IKE: real IkeSa pairs over memory -------------------------------------------

def engine_config(key, peer_public, local: str, **kw):
    """An IkeConfig for one side of an in-process pair (static peer key, address ID)."""
    from oe_agent.ike import auth as ikeauth
    from oe_agent.ike.payloads import IdInitiator
    from oe_agent.ike.sa import IkeConfig
    return IkeConfig(local_id=IdInitiator.from_address(local),
                     credential=ikeauth.SignatureCredential(key),
                     peer_keys=(peer_public,), **kw)


def shuttle(endpoints: dict, now: float, limit: int = 100) -> list:
    """Deliver datagrams between in-memory IkeEndpoints (keyed by address) until quiet;
    returns every (endpoint address, sa, event) seen."""
    import ipaddress
    events = []
    for _ in range(limit):
        moved = False
        for addr, ep in list(endpoints.items()):
            for d in ep.datagrams_to_send(now):
                dst = endpoints.get(ipaddress.ip_address(d.remote))
                if dst is None:
                    continue
                moved = True
                dst.receive_datagram(d.data, (d.remote, d.remote_port),
                                     (d.local, d.local_port), now)
            while (item := ep.next_event()) is not None:
                events.append((addr, *item))
        if not moved:
            return events
    raise RuntimeError("in-process IKE did not settle")
