"""oe-agent's IKE engine as an interop peer: `engine_driver.py` runs in a test host, reads
commands (JSON lines on stdin) and prints the engine's events (`EVENT {json}` lines), which
this side polls from the driver's log with bounded waits."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.hosts import Host
from tests.interop.peers.keys import KeyPair

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class EngineConfig:
    """A static peer (no DNS): our key and the peer's raw public key, as in product.md §5."""

    local: str
    remote: str
    private_key_pem: str  # path
    peer_public_pem: str  # path
    ike_proposal: str = "aes256gcm16-prfsha256-x25519"  # strongSwan-style names
    esp_proposal: str = "aes128gcm16"
    mode: str = "tunnel"
    local_id: str | None = None
    remote_id: str | None = None
    ike_port: int = 500
    natt_port: int = 4500
    keylog: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class EnginePeer:
    """The driver process in `host`; stopped by PID through the Host."""

    def __init__(self, host: Host, config: EngineConfig, name: str = "engine"):
        self.host = host
        self.config = config
        self.name = name
        self.dir = host.workdir / name
        self.logname = f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._seen = 0  # events already returned by wait_event

    @classmethod
    def static(cls, host: Host, peer: Host, key: KeyPair, peer_pub: bytes, **kw) -> "EnginePeer":
        d = host.workdir / kw.pop("name", "engine")
        d.mkdir(parents=True, exist_ok=True)
        priv, _ = key.write(d, "local")
        pub = d / "peer.pub.pem"
        pub.write_bytes(peer_pub)
        cfg = EngineConfig(local=host.v4, remote=peer.v4, private_key_pem=str(priv),
                           peer_public_pem=str(pub), keylog=str(d / "keys.log"), **kw)
        return cls(host, cfg)

    def start(self, timeout: float = 15.0) -> "EnginePeer":
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "config.json"
        conf.write_text(json.dumps(asdict(self.config), indent=1))
        self.proc = self.host.popen(
            sys.executable, "-u", "-m", "tests.interop.peers.engine_driver", str(conf),
            log=self.logname, cwd=ROOT, stdin=subprocess.PIPE)
        self.wait_event("Ready", timeout=timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.stdin and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass
            self.host.stop(self.proc)
            self.proc = None

    def send(self, cmd: str, **args: Any) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"engine driver is not running:\n{self.output()[-3000:]}")
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        self.proc.stdin.flush()

    def output(self) -> str:
        p = self.host.workdir / self.logname
        return p.read_text(errors="replace") if p.exists() else ""

    def events(self) -> list[dict]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("EVENT "):
                out.append(json.loads(line[6:]))
        return out

    def status(self, timeout: float = 10.0) -> dict:
        """The engine's IKE SAs and their Child SAs right now (a Status event)."""
        self.send("status")
        return self.wait_event("Status", timeout=timeout)

    def events_named(self, name: str) -> list[dict]:
        return [e for e in self.events() if e["event"] == name]

    def wait_event(self, name: str | tuple[str, ...], match=lambda e: True, timeout: float = 20.0,
                   new_only: bool = True) -> dict:
        """The first event `name` (or any of several names), after the last one returned if
        new_only, that satisfies `match`."""
        names = (name,) if isinstance(name, str) else name
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events()
            start = self._seen if new_only else 0
            for i in range(start, len(evs)):
                if evs[i]["event"] in names and match(evs[i]):
                    self._seen = i + 1
                    return evs[i]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"engine driver exited ({self.proc.returncode}) before "
                                   f"{name}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine: no {name} event within {timeout} s; events: "
                                   f"{[e['event'] for e in evs]}\n{self.output()[-4000:]}")
            time.sleep(0.05)
