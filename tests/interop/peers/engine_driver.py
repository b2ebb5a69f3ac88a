"""Run oe-agent's IKE engine with one static peer inside a test host (the interop tests' side).

    python -m tests.interop.peers.engine_driver CONFIG.json

CONFIG is peers.engine.EngineConfig as JSON. Commands arrive as JSON lines on stdin
({"cmd": "initiate" | "rekey_child" | "rekey_ike" | "delete_child" | "delete_ike"}); every
engine event is printed as one `EVENT {json}` line (bytes as hex, addresses as text), after
`EVENT {"event": "Ready"}` once the UDP sockets are bound. No ESP dataplane: ESP-in-UDP
packets that arrive on 4500 are only counted.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import ipaddress
import json
import os
import sys
import time
import traceback
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from oe_agent.ike import auth as ikeauth
from oe_agent.ike.events import ChildSaEstablished, ChildSaRekeyed
from oe_agent.ike.keylog import KeyLogWriter
from oe_agent.ike.message import classify_udp4500, peek_header
from oe_agent.ike.payloads import IdInitiator
from oe_agent.ike.sa import IkeConfig, IkeSa
from oe_agent.model import Mode


def jsonable(v):
    """Events and ChildSaParams as plain JSON: bytes -> hex, enums -> value, IPs -> str."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def emit(name: str, **fields) -> None:
    print("EVENT " + json.dumps({"event": name, **fields}), flush=True)


def load_config(path: str) -> tuple[dict, IkeConfig]:
    raw = json.loads(Path(path).read_text())
    key = serialization.load_pem_private_key(Path(raw["private_key_pem"]).read_bytes(), None)
    peer = serialization.load_pem_public_key(Path(raw["peer_public_pem"]).read_bytes())
    extra = raw.get("extra") or {}
    cfg = IkeConfig(
        local_id=IdInitiator.from_address(raw.get("local_id") or raw["local"]),
        credential=ikeauth.SignatureCredential(key, **extra.get("credential", {})),
        peer_keys=(peer,),
        ike_proposals=(raw["ike_proposal"],),
        esp_proposals=(raw["esp_proposal"],),
        mode=Mode(raw.get("mode", "tunnel")),
        ike_port=raw.get("ike_port", 500),
        natt_port=raw.get("natt_port", 4500),
        **extra.get("ike_config", {}),
    )
    return raw, cfg


class Driver:
    """One local address, one peer; the IKE SAs with it, routed by SPI."""

    def __init__(self, raw: dict, cfg: IkeConfig):
        self.raw, self.cfg = raw, cfg
        self.local = ipaddress.ip_address(raw["local"])
        self.remote = ipaddress.ip_address(raw["remote"])
        self.sas: list[IkeSa] = []
        self.transports: dict[int, asyncio.DatagramTransport] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.keylog = KeyLogWriter(raw["keylog"]) if raw.get("keylog") else None
        self.esp_packets = 0

    def now(self) -> float:
        return time.monotonic()

    # --- input ---
    def datagram(self, data: bytes, addr: tuple, local_port: int) -> None:
        if local_port == self.cfg.natt_port:
            kind, data = classify_udp4500(data)
            if kind == "esp":
                self.esp_packets += 1
                return
            if kind != "ike":
                return
        try:
            h = peek_header(data)
        except Exception as e:  # the engine's own parse errors: drop, as the adapter would
            emit("Dropped", reason=str(e))
            return
        sa = self.find(h)
        if sa is None:
            if h.exchange == 34 and not h.response and not any(h.spi_r):
                sa = IkeSa(self.cfg, self.local, addr[0], initiator=False, rng=os.urandom,
                           remote_port=addr[1], local_port=local_port)
                self.sas.append(sa)
            else:
                emit("Dropped", reason=f"no SA for SPIs {h.spi_i.hex()}/{h.spi_r.hex()}")
                return
        sa.receive_datagram(data, addr, self.now(), local_port=local_port)
        if sa.last_error:
            emit("EngineError", error=sa.last_error)
            sa.last_error = ""
        self.pump()

    def find(self, h) -> IkeSa | None:
        for sa in self.sas:
            if h.spi_i in sa.local_spis or h.spi_r in sa.local_spis:
                return sa
            if not sa.initiated and sa.spi_i == h.spi_i:  # retransmitted IKE_SA_INIT
                return sa
        return None

    # --- output ---
    def pump(self) -> None:
        now = self.now()
        for sa in self.sas:
            for d in sa.datagrams_to_send(now):
                t = self.transports.get(d.local_port)
                if t is not None:
                    t.sendto(d.wire(), (str(d.remote), d.remote_port))
            while (ev := sa.next_event()) is not None:
                self.log_keys(sa, ev)
                emit(type(ev).__name__, **jsonable(ev))
        deadlines = [t for t in (sa.get_timer() for sa in self.sas) if t is not None]
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if deadlines:
            delay = max(0.0, min(deadlines) - now)
            self.timer = asyncio.get_running_loop().call_later(delay, self.tick)

    def tick(self) -> None:
        self.timer = None
        now = self.now()
        for sa in self.sas:
            t = sa.get_timer()
            if t is not None and t <= now:
                sa.handle_timer(now)
        self.pump()

    def log_keys(self, sa: IkeSa, ev) -> None:
        """Child SA keys in Wireshark's esp_sa format, to decrypt the test's captures."""
        if self.keylog is None:
            return
        if isinstance(ev, ChildSaEstablished):
            self.keylog.log_child_sa(ev.params)
        elif isinstance(ev, ChildSaRekeyed):
            self.keylog.log_child_sa(ev.new)

    # --- commands ---
    def current(self) -> IkeSa:
        live = [sa for sa in self.sas if sa.state.value not in ("closed",)]
        if not live:
            raise LookupError("no IKE SA")
        return live[-1]

    def command(self, cmd: dict) -> None:
        now = self.now()
        op = cmd.get("cmd")
        if op == "initiate":
            sa = IkeSa(self.cfg, self.local, self.remote, initiator=True, rng=os.urandom)
            self.sas.append(sa)
            sa.connect(now)
        elif op == "rekey_child":
            sa = self.current()
            sa.rekey_child(cmd.get("spi_in") or next(iter(sa.children)), now)
        elif op == "rekey_ike":
            self.current().rekey(now)
        elif op == "delete_child":
            sa = self.current()
            sa.delete_child(cmd.get("spi_in") or next(iter(sa.children)), now)
        elif op == "delete_ike":
            self.current().delete(now)
        elif op == "status":
            emit("Status", sas=[{"state": sa.state.value, "spi_i": sa.spi_i.hex(),
                                 "spi_r": sa.spi_r.hex(), "children": list(sa.children)}
                                for sa in self.sas], esp_packets=self.esp_packets)
        else:
            raise ValueError(f"unknown command {op!r}")
        self.pump()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, driver: Driver, port: int):
        self.driver, self.port = driver, port

    def datagram_received(self, data, addr):
        try:
            self.driver.datagram(data, addr, self.port)
        except Exception:
            emit("DriverError", error=traceback.format_exc())


async def main(path: str) -> None:
    raw, cfg = load_config(path)
    d = Driver(raw, cfg)
    loop = asyncio.get_running_loop()
    for port in (cfg.ike_port, cfg.natt_port):
        t, _ = await loop.create_datagram_endpoint(lambda p=port: _Udp(d, p),
                                                   local_addr=(raw["local"], port))
        d.transports[port] = t
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit("Ready")
    while line := await reader.readline():
        try:
            d.command(json.loads(line))
        except Exception:
            emit("DriverError", error=traceback.format_exc())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
