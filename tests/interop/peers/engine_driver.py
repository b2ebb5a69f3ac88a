"""Run oe-agent's IKE engine with one static peer inside a test host (the interop tests' side).

    python -m tests.interop.peers.engine_driver CONFIG.json

CONFIG is peers.engine.EngineConfig as JSON. Commands arrive as JSON lines on stdin
({"cmd": "initiate" | "rekey_child" | "rekey_ike" | "delete_child" | "delete_ike"}); every
engine event is printed as one `EVENT {json}` line (bytes as hex, addresses as text), after
`EVENT {"event": "Ready"}` once the UDP sockets are bound. The engine runs on its own asyncio
adapter (oe_agent.ike.adapter.IkeAdapter), as the agent runs it. No ESP dataplane here:
ESP-in-UDP packets that arrive on 4500 are only counted.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import ipaddress
import json
import sys
import traceback
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from oe_agent.ike import auth as ikeauth
from oe_agent.ike.adapter import IkeAdapter
from oe_agent.ike.events import ChildSaEstablished, ChildSaRekeyed
from oe_agent.ike.keylog import KeyLogWriter
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
    """One local address, one static peer, on the engine's own asyncio adapter."""

    def __init__(self, raw: dict, cfg: IkeConfig):
        self.raw, self.cfg = raw, cfg
        self.local = ipaddress.ip_address(raw["local"])
        self.remote = ipaddress.ip_address(raw["remote"])
        self.keylog = KeyLogWriter(raw["keylog"]) if raw.get("keylog") else None
        self.esp_packets = 0
        endpoint = {k: v for k, v in (raw.get("extra") or {}).items() if k == "cookie_threshold"}
        self.adapter = IkeAdapter([self.local], self.responder_config, self.on_event,
                                  ike_port=cfg.ike_port, natt_port=cfg.natt_port,
                                  on_esp=self.on_esp, **endpoint)

    def responder_config(self, local, remote) -> IkeConfig | None:
        return self.cfg if remote == self.remote else None

    def on_event(self, sa: IkeSa, ev) -> None:
        if self.keylog is not None:  # Child SA keys, Wireshark esp_sa lines
            if isinstance(ev, ChildSaEstablished):
                self.keylog.log_child_sa(ev.params)
            elif isinstance(ev, ChildSaRekeyed):
                self.keylog.log_child_sa(ev.new)
        emit(type(ev).__name__, **jsonable(ev))

    def on_esp(self, packet: bytes, local: tuple, remote: tuple) -> None:
        self.esp_packets += 1  # no dataplane in these tests: ESP is only counted

    def current(self) -> IkeSa:
        live = [sa for sa in self.adapter.endpoint.find(self.remote)
                if sa.state.value == "established"]
        if not live:
            raise LookupError("no established IKE SA")
        return live[-1]

    def command(self, cmd: dict) -> None:
        op = cmd.get("cmd")
        if op == "initiate":
            self.adapter.connect(self.cfg, self.local, self.remote)
        elif op == "rekey_child":
            sa = self.current()
            spi = cmd.get("spi_in") or next(iter(sa.children))
            self.adapter.act(lambda now: sa.rekey_child(spi, now))
        elif op == "rekey_ike":
            sa = self.current()
            self.adapter.act(sa.rekey)
        elif op == "delete_child":
            sa = self.current()
            spi = cmd.get("spi_in") or next(iter(sa.children))
            self.adapter.act(lambda now: sa.delete_child(spi, now))
        elif op == "delete_ike":
            sa = self.current()
            self.adapter.act(sa.delete)
        elif op == "status":
            emit("Status", sas=[{"state": sa.state.value, "spi_i": sa.spi_i.hex(),
                                 "spi_r": sa.spi_r.hex(), "initiated": sa.initiated,
                                 "children": [{"spi_in": ch.spi_in, "spi_out": ch.spi_out,
                                               "state": ch.state.value}
                                              for ch in sa.children.values()]}
                                for sa in self.adapter.endpoint.sas],
                 esp_packets=self.esp_packets, dropped=self.adapter.endpoint.dropped,
                 errors=self.adapter.errors)
        else:
            raise ValueError(f"unknown command {op!r}")


async def main(path: str) -> None:
    raw, cfg = load_config(path)
    d = Driver(raw, cfg)
    await d.adapter.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit("Ready")
    try:
        while line := await reader.readline():
            try:
                d.command(json.loads(line))
            except Exception:
                emit("DriverError", error=traceback.format_exc())
    finally:
        d.adapter.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
