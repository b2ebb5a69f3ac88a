"""Run the userspace dataplane with manually keyed Child SAs (like `ip xfrm state add` with
fixed keys): for tests, the benchmark and peers that do not do IKE.

    python -m oe_agent.esp CONFIG.json

CONFIG: {"ifname": "oe0", "underlay_mtu": 1500, "udp_port": 4500,
         "child_sas": [ChildSaParams as JSON: keys in hex, alg {"encr", "encr_key_bits",
                       "integ"}, mode "transport"|"tunnel", ts_* as CIDR strings,
                       encap [lport, rport] or null], "trap"|"pass"|"block": [CIDR, ...]}
Prints "oe_agent.esp ready" once routes and sockets are up; on SIGTERM/SIGINT removes everything and prints
one JSON line of counters (dataplane and per SA).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import sys
from dataclasses import fields

from oe_agent.errors import UserError
from oe_agent.model import ChildSaParams, EspAlgorithm, Mode, TrafficSelector

_BYTES = {"encr_key_in", "encr_key_out", "integ_key_in", "integ_key_out"}


def params_to_json(p: ChildSaParams) -> dict:
    out = {}
    for f in fields(p):
        v = getattr(p, f.name)
        if f.name in _BYTES:
            v = v.hex()
        elif f.name in ("local", "remote"):
            v = str(v)
        elif f.name == "mode":
            v = v.value
        elif f.name == "alg":
            v = {"encr": v.encr, "encr_key_bits": v.encr_key_bits, "integ": v.integ}
        elif f.name in ("ts_local", "ts_remote"):
            v = [str(ts.network()) for ts in v]
        elif f.name == "encap":
            v = list(v) if v else None
        out[f.name] = v
    return out


def params_from_json(d: dict) -> ChildSaParams:
    """ChildSaParams from its JSON form; UserError naming the field that is wrong."""
    if not isinstance(d, dict):
        raise UserError(f"child SA: expected an object, got {type(d).__name__}")
    known = {f.name for f in fields(ChildSaParams)}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"child SA: unknown field(s) {sorted(unknown)}")
    kw = dict(d)
    try:
        for k in _BYTES & set(kw):
            kw[k] = bytes.fromhex(kw[k])
        kw["local"] = ipaddress.ip_address(kw["local"])
        kw["remote"] = ipaddress.ip_address(kw["remote"])
        kw["mode"] = Mode(kw.get("mode", "transport"))
        kw["alg"] = EspAlgorithm(**kw["alg"])
        for k in ("ts_local", "ts_remote"):
            kw[k] = tuple(TrafficSelector.from_network(n) for n in kw.get(k, ()))
        if kw.get("encap") is not None:
            kw["encap"] = tuple(int(x) for x in kw["encap"])
        return ChildSaParams(**kw)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"child SA: bad or missing field: {e}") from None


async def run(config: dict) -> dict:
    from oe_agent.esp.dataplane import UserspaceDataplane
    if not isinstance(config, dict) or not isinstance(config.get("child_sas", []), list):
        raise UserError("config: expected an object with a list 'child_sas'")
    dp = UserspaceDataplane(ifname=config.get("ifname", "oe0"),
                            underlay_mtu=int(config.get("underlay_mtu", 1500)),
                            udp_port=int(config.get("udp_port", 4500)),
                            raw_esp=bool(config.get("raw_esp", True)))
    sas = [params_from_json(d) for d in config.get("child_sas", [])]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await dp.start()
    try:
        for kind in ("pass", "trap", "block"):
            for net in config.get(kind, []):
                await getattr(dp, f"set_{kind}")(ipaddress.ip_network(net))
        for p in sas:
            await dp.add_child_sa(p)

        async def log_events():
            async for ev in dp.events():
                print(f"event {ev!r}"[:300], flush=True)

        task = asyncio.create_task(log_events())
        print("oe_agent.esp ready", flush=True)
        await stop.wait()
        task.cancel()
        sa_stats = {}
        for p in sas:
            sa = dp.child_sa(p.spi_in)
            sa_stats[f"{p.spi_in:#010x}"] = {
                "in": {"packets": sa.inbound.stats.packets, "bytes": sa.inbound.stats.bytes,
                       **{k: v for k, v in sa.inbound.stats.refused.items() if v}},
                "out": {"packets": sa.outbound.stats.packets, "bytes": sa.outbound.stats.bytes}}
        return {"dataplane": dict(dp.stats), "sas": sa_stats}
    finally:
        await dp.stop()


def register(sub) -> None:
    """`oe-agent esp-static CONFIG.json` (oe_agent.cli)."""
    p = sub.add_parser("esp-static", help="run the userspace ESP dataplane with manual keys",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="JSON: child_sas, trap/pass/block (see oe_agent/esp/static.py)")
    p.set_defaults(func=lambda args: main([args.config]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m oe_agent.esp CONFIG.json", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            config = json.load(f)
        result = asyncio.run(run(config))
    except (OSError, json.JSONDecodeError) as e:
        print(f"oe_agent.esp: {argv[0]}: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"oe_agent.esp: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0
