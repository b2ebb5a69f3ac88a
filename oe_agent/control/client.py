"""CLI verbs that talk to a running agent over its control socket (libreswan's names).

`--socket PATH` or `-c FILE` (the agent's config, for its `agent.socket`) selects the agent.
Every failure is one line and a non-zero exit: no agent listening, a bad answer, bad input.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from pathlib import Path

import aiohttp

from oe_agent.errors import UserError

DEFAULT_SOCKET = Path("/run/oe-agent/ctl.sock")
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "udplite": 136}


def socket_path(args) -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    if getattr(args, "config", None):
        from oe_agent.config import load

        return load(args.config).socket
    return DEFAULT_SOCKET


def call(args, method: str, path: str, body: dict | None = None, *, text: bool = False):
    """One request to the agent; the decoded answer, or UserError in one line."""
    sock = socket_path(args)
    timeout = aiohttp.ClientTimeout(total=getattr(args, "timeout", 10.0))

    async def go():
        conn = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            async with s.request(method, f"http://oe-agent{path}", json=body) as r:
                return r.status, await r.text()

    try:
        status, payload = asyncio.run(go())
    except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError,
            PermissionError) as e:
        why = "permission denied" if isinstance(e, PermissionError) or "Permission" in str(e) \
            else "is `oe-agent run` running?"
        raise UserError(f"no agent answering on {sock} ({why})") from None
    except asyncio.TimeoutError:
        raise UserError(f"the agent on {sock} did not answer within {timeout.total:g}s") from None
    if status != 200:
        try:
            msg = json.loads(payload)["error"]
        except (ValueError, KeyError, TypeError):
            msg = f"HTTP {status}"
        raise UserError(f"agent: {msg}")
    if text:
        return payload
    try:
        return json.loads(payload)
    except ValueError:
        raise UserError(f"bad answer from the agent on {sock}: not JSON") from None


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def cmd_status(args) -> int:
    st = call(args, "GET", "/status")
    if args.json:
        _out(json.dumps(st, indent=2))
        return 0
    _out(f"oe-agent up {st['uptime']:.0f}s on {', '.join(st['addresses']) or 'all addresses'}; "
         f"dataplane {st['dataplane']} ({st.get('detail') or ('ESP' if st['esp'] else 'no ESP')}); "
         f"{st['policies']} group policies")
    _out("peers: " + ", ".join(f"{k} {v}" for k, v in st["peers"].items())
         + f"; SA pairs {st['sas']}; shunts {st['shunts']}")
    for p in st["peer_list"]:
        _out(f"  {p['remote']:<28} {p['state']:<12} {p['group'] or '-':<17} {p['auth']}".rstrip())
    return 0


def cmd_trafficstatus(args) -> int:
    for s in call(args, "GET", "/sas"):
        _out(f"{s['remote']}: ESP in={s['spi_in']} out={s['spi_out']} {s['alg']} {s['mode']}"
             f"{' udp-encap' if s['encap'] else ''} from {s['local']}, inBytes={s['bytes_in']}, "
             f"outBytes={s['bytes_out']}, age {s['age']:.0f}s, {s['auth']} [{s['group']}]")
    return 0


def cmd_shuntstatus(args) -> int:
    for s in call(args, "GET", "/shunts"):
        _out(f"{s['remote']}: {s['kind']} ({s['reason']}{': ' + s['detail'] if s['detail'] else ''}), "
             f"age {s['age']:.0f}s, lifetime {s['lifetime']:.0f}s ({s['remaining']:.0f}s left), "
             f"packets {s['packets']}")
    return 0


def cmd_explain(args) -> int:
    addr = _parse_addr(args.addr, "ADDR")
    e = call(args, "GET", f"/peers/{addr}")
    if args.json:
        _out(json.dumps(e, indent=2))
        return 0
    g = e["group"]
    _out(f"{e['address']}: {e['now']}")
    _out(f"  group: {g['words']}" + (f" — {g['source']}" if g.get("source") else ""))
    d = e["dns"]
    if d:
        _out(f"  DNS {d['name'] or e['address']}: {d['status']} — {d['words']}"
             + (f" ({d['reason']})" if d["reason"] else "") + f", {d['keys']} key(s), ttl {d['ttl']}")
    else:
        _out("  DNS: not looked up")
    _out(f"  state: {e['state']}")
    for s in e["sas"]:
        _out(f"  SA: in {s['spi_in']} out {s['spi_out']} {s['alg']} {s['mode']}, {s['auth']}")
    if e["shunt"]:
        s = e["shunt"]
        _out(f"  shunt: {s['kind']} ({s['reason']}), {s['remaining']:.0f}s of {s['lifetime']:.0f}s left")
    if e["history"]:
        _out("  history:")
        for h in e["history"]:
            _out(f"    {h['age']:>7.1f}s ago  {h['event']}")
    return 0


def cmd_acquire(args) -> int:
    src, dst = _parse_addr(args.src, "--from"), _parse_addr(args.dst, "--to")
    proto = _parse_proto(args.proto)
    if args.dport and not proto:
        raise UserError("--dport needs --proto (tcp, udp, sctp or a number)")
    r = call(args, "POST", "/acquire", {"from": str(src), "to": str(dst), "proto": proto,
                                         "dport": args.dport})
    _out(f"{r['dst']} ({r['group']}): {r['before']} -> {r['state']}"
         + (f": {r['decision']}" if r["decision"] else ""))
    return 0


def cmd_reload(args) -> int:
    r = call(args, "POST", "/reload")
    _out(f"reloaded: {len(r['removed'])} policies removed, {len(r['installed'])} installed, "
         f"{r['peers_changed']} peers changed")
    for line in r["installed"]:
        _out(f"  + {line}")
    for line in r["removed"]:
        _out(f"  - {line}")
    return 0


def _parse_addr(text: str, what: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UserError(f"{what}: {text!r} is not an IP address") from None


def _parse_proto(text: str | None) -> int:
    if not text:
        return 0
    if text.isdigit() and int(text) <= 255:
        return int(text)
    if text.lower() in _PROTOS:
        return _PROTOS[text.lower()]
    raise UserError(f"--proto: {text!r} is not a protocol (tcp, udp, icmp, sctp or 0..255)")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1..65535)")
    return int(text)


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    sel = common.add_mutually_exclusive_group()
    sel.add_argument("--socket", metavar="PATH", help=f"control socket (default {DEFAULT_SOCKET})")
    sel.add_argument("-c", "--config", metavar="FILE", help="the agent's config (for its socket)")
    common.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)

    p = sub.add_parser("status", parents=[common], help="the agent's state in brief")
    p.add_argument("--json", action="store_true", help="the full status as JSON")
    p.set_defaults(func=cmd_status)
    sub.add_parser("trafficstatus", parents=[common],
                   help="established SAs with byte counters").set_defaults(func=cmd_trafficstatus)
    sub.add_parser("shuntstatus", parents=[common],
                   help="shunts with reason, age, lifetime").set_defaults(func=cmd_shuntstatus)
    p = sub.add_parser("explain", parents=[common],
                       help="why traffic to ADDR is encrypted, clear or dropped")
    p.add_argument("addr", metavar="ADDR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("acquire", parents=[common],
                       help="a synthetic ACQUIRE (like whack --oppohere)")
    p.add_argument("--from", dest="src", required=True, metavar="A")
    p.add_argument("--to", dest="dst", required=True, metavar="B")
    p.add_argument("--proto", metavar="P")
    p.add_argument("--dport", type=_port, default=0, metavar="N")
    p.set_defaults(func=cmd_acquire)
    sub.add_parser("reload", parents=[common],
                   help="re-read the policy groups; change kernel state by difference"
                   ).set_defaults(func=cmd_reload)
