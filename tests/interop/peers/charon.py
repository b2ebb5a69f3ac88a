"""strongSwan's charon as an interop peer inside a test host (a network namespace).

Why it runs this way (see ../../../../shared/interop/README.md, pitfalls 2, 4, 6, 7):
- kernel-libipsec is the IPsec backend: this kernel has XFRM but no ESP, so charon does ESP
  in userspace on a TUN device (ipsec0). It always encapsulates ESP in UDP/4500 (it fakes a
  NAT) and supports tunnel mode only.
- charon writes /var/run/charon.pid, so each instance gets a private mount namespace with its
  own run dir bind-mounted on /run; its VICI socket is <rundir>/charon.vici from outside.
- kernel-netlink.fwmark = !0x42 + socket-default.fwmark = 0x42 keep charon's own IKE and
  ESP-in-UDP packets out of the /32 route into ipsec0 (host-to-host needs allow_peer_ts).
Processes are stopped by PID (the Host owns them); waits are bounded polls.
"""
from __future__ import annotations

import re
import string
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.hosts import Host
from tests.interop.peers.keys import KeyPair
from tests.interop.peers.vici import Vici, ViciError

CHARON_BIN = "/usr/lib/ipsec/charon"
TEMPLATES = Path(__file__).resolve().parent / "templates"


def render(template: str, **values: Any) -> str:
    return string.Template((TEMPLATES / template).read_text()).substitute(**values)


class Charon:
    """One charon daemon in `host`. Use as a context manager or call start()/stop()."""

    def __init__(self, host: Host, *, name: str = "charon", cookie_threshold: int | None = None,
                 log_keys: bool = False, retransmit_tries: int = 3, backend: str = "libipsec"):
        self.host = host
        self.name = name
        self.dir = host.workdir / name
        self.rundir = self.dir / "run"
        self.conf = self.dir / "strongswan.conf"
        self.log = self.dir / "charon.log"
        self.socket = self.rundir / "charon.vici"
        self.cookie_threshold = cookie_threshold
        self.log_keys = log_keys
        self.retransmit_tries = retransmit_tries
        if backend not in ("libipsec", "netlink"):
            raise ValueError(f"backend {backend!r}: libipsec or netlink")
        self.backend = backend  # netlink: the kernel's ESP (vm tier); libipsec: userspace ESP
        self.proc: subprocess.Popen | None = None
        self._vici: Vici | None = None

    # --- lifecycle ---
    def write_config(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        dos = self.cookie_threshold is not None
        self.conf.write_text(render(
            "strongswan.conf",
            rundir=self.rundir, log=self.log,
            dos_protection="yes" if dos else "no",
            # with DoS protection on, only the global threshold is what the test sets
            cookie_threshold=self.cookie_threshold if dos else 30,
            cookie_threshold_ip=self.cookie_threshold if dos else 3,
            block_threshold=1000 if dos else 5,
            retransmit_tries=self.retransmit_tries,
            ike_level=4 if self.log_keys else 2,
            chd_level=4 if self.log_keys else 2,
            libipsec="kernel-libipsec" if self.backend == "libipsec" else "",
        ))

    def start(self, timeout: float = 10.0) -> "Charon":
        self.write_config()
        for stale in (self.socket, self.rundir / "charon.pid"):
            stale.unlink(missing_ok=True)
        # ip netns exec, unshare and sh all exec: the Popen's pid is charon's own pid
        self.proc = self.host.popen(
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount --bind '{self.rundir}' /run && "
            f"exec env STRONGSWAN_CONF='{self.conf}' {CHARON_BIN}",
            log=f"{self.name}.stdout", cwd=self.dir)
        # the socket file exists from bind(), a moment before listen(): poll until we connect
        deadline = time.monotonic() + timeout
        while self._vici is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"charon exited ({self.proc.returncode}): {self.tail()}")
            if self.socket.is_socket():
                try:
                    self._vici = Vici(self.socket)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"charon's VICI socket did not answer: {self.tail()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._vici is not None:
            self._vici.close()
            self._vici = None
        if self.proc is not None:
            self.host.stop(self.proc)
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def tail(self, lines: int = 30) -> str:
        out = []
        for f in (self.host.workdir / f"{self.name}.stdout", self.log):
            if f.exists():
                out += f.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # --- VICI ---
    @property
    def vici(self) -> Vici:
        if self._vici is None:
            self._vici = Vici(self.socket)
        return self._vici

    def session(self) -> Vici:
        """A second connection, e.g. to listen for events while the first one runs commands."""
        return Vici(self.socket)

    def load_key(self, key: KeyPair) -> None:
        self.vici.command("load-key", {"type": key.vici_type, "data": key.private_pem})

    def load_conn(self, name: str, conn: dict[str, Any]) -> None:
        self.vici.command("load-conn", {name: conn})

    def unload_conn(self, name: str) -> None:
        self.vici.command("unload-conn", {"name": name})

    def initiate(self, child: str, ike: str | None = None, timeout_ms: int = 15000) -> dict:
        """Initiate and wait (bounded) until the Child SA is up or failed; ViciError if failed."""
        msg: dict[str, Any] = {"child": child, "timeout": timeout_ms, "init-limits": "no"}
        if ike:
            msg["ike"] = ike
        return self.vici.command("initiate", msg)

    def initiate_nowait(self, child: str, ike: str | None = None) -> None:
        """Start an initiation and return at once (VICI timeout < 0)."""
        msg: dict[str, Any] = {"child": child, "timeout": -1}
        if ike:
            msg["ike"] = ike
        self.vici.command("initiate", msg)

    def terminate(self, *, ike: str | None = None, child: str | None = None,
                  ike_id: str | None = None, child_id: str | None = None,
                  force: bool = False, timeout_ms: int = 10000) -> dict:
        msg: dict[str, Any] = {"timeout": timeout_ms}
        for k, v in (("ike", ike), ("child", child), ("ike-id", ike_id), ("child-id", child_id)):
            if v is not None:
                msg[k] = v
        if force:
            msg["force"] = "yes"
        return self.vici.command("terminate", msg)

    def rekey(self, *, ike: str | None = None, child: str | None = None,
              ike_id: str | None = None, child_id: str | None = None) -> dict:
        """Start a rekey (asynchronous in charon: watch list_sas / the rekey events)."""
        msg: dict[str, Any] = {}
        for k, v in (("ike", ike), ("child", child), ("ike-id", ike_id), ("child-id", child_id)):
            if v is not None:
                msg[k] = v
        return self.vici.command("rekey", msg)

    def list_sas(self, ike: str | None = None) -> list[dict[str, Any]]:
        """Every IKE SA (optionally of one conn) as a dict with 'name' added; children in
        'child-sas' keyed by '<name>-<uniqueid>'."""
        # no "noblock": it skips IKE SAs that are checked out at that moment (busy with a
        # message), which made SAs vanish from a listing now and then
        msg: dict[str, Any] = {}
        if ike:
            msg["ike"] = ike
        _, events = self.vici.request("list-sas", msg, stream="list-sa")
        out = []
        for ev in events:
            for name, sa in ev.items():
                out.append(dict(sa, name=name))
        return out

    def wait_sas(self, predicate, timeout: float = 15.0, what: str = "IKE SAs") -> list[dict]:
        """Poll list_sas() until predicate(sas) is true; bounded."""
        deadline = time.monotonic() + timeout
        while True:
            sas = self.list_sas()
            if predicate(sas):
                return sas
            if time.monotonic() > deadline:
                raise TimeoutError(f"charon {self.host.name}: {what} not reached; SAs: {sas}"
                                   f"\n--- log tail ---\n{self.tail()}")
            time.sleep(0.1)


def established(sas: list[dict], name: str | None = None) -> list[dict]:
    return [s for s in sas if s.get("state") == "ESTABLISHED" and (name is None or s["name"] == name)]


def installed_children(sa: dict) -> list[dict]:
    return [c for c in (sa.get("child-sas") or {}).values() if c.get("state") == "INSTALLED"]


def sole_child(sas: list[dict], name: str | None = None) -> tuple[dict, dict] | None:
    """(IKE SA, Child SA) when exactly one IKE SA is established with exactly one installed
    Child SA -- the settled state after an establishment, rekey or collision; else None."""
    est = established(sas, name)
    if len(est) != 1 or len(sas) != 1:
        return None
    children = installed_children(est[0])
    if len(children) != 1 or len(est[0].get("child-sas") or {}) != 1:
        return None
    return est[0], children[0]


def host_conn(*, local: str, remote: str, local_key: KeyPair, remote_pub: bytes,
              child: str, proposals: str, esp_proposals: str,
              local_id: str | None = None, remote_id: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """A swanctl-style host-to-host connection for load-conn: raw public keys (RFC 7427
    signatures), tunnel mode (kernel-libipsec has no transport mode), dynamic TS."""
    conn: dict[str, Any] = {
        "version": 2,
        "local_addrs": [local],
        "remote_addrs": [remote],
        "proposals": [proposals],
        "local": {"auth": "pubkey", "id": local_id or local, "pubkeys": [local_key.public_pem]},
        "remote": {"auth": "pubkey", "id": remote_id or remote, "pubkeys": [remote_pub]},
        "children": {child: {"mode": "tunnel", "local_ts": ["dynamic"],
                             "remote_ts": ["dynamic"], "esp_proposals": [esp_proposals]}},
    }
    child_extra = extra.pop("child_extra", {})
    conn["children"][child].update(child_extra)
    conn.update(extra)
    return conn


__all__ = ["Charon", "ViciError", "established", "installed_children", "host_conn", "render"]


def hold_half_open(charon: Charon, target, *, key: KeyPair, target_pub: bytes,
                   proposals: str = "aes256gcm16-prfsha256-x25519") -> dict:
    """Leave one half-open IKE SA on `target`'s charon (RFC 7296 §2.6 counts these).

    `charon` (in a third host) sends IKE_SA_INIT; nftables in its namespace drops everything it
    sends to port 4500, so the IKE_AUTH (charon floats: kernel-libipsec fakes a NAT) never
    arrives. The responder keeps the IKE SA half-open (charon: 30 s), which is what makes
    `cookie_threshold = 1` demand a COOKIE from the next initiator. Returns our IKE SA.
    """
    host = charon.host
    host.run("nft", "-f", "-", input="table inet halfopen {\n chain out {\n"
             "  type filter hook output priority 0; policy accept;\n"
             "  udp dport 4500 drop\n }\n}\n")
    charon.load_key(key)
    charon.load_conn("halfopen", host_conn(local=host.v4, remote=target.v4, local_key=key,
                                           remote_pub=target_pub, child="halfopen",
                                           proposals=proposals, esp_proposals="aes128gcm16"))
    charon.initiate_nowait("halfopen", "halfopen")
    sas = charon.wait_sas(lambda s: any(sa.get("responder-spi", "0" * 16).strip("0")
                                        for sa in s), what="IKE_SA_INIT answered")
    return sas[0]


_DUMP_HEAD = re.compile(r"\] (?:<[^>]*> )?(.+?) => (\d+) bytes @ 0x[0-9a-f]+$")
_DUMP_LINE = re.compile(r"\] (?:<[^>]*> )?\s*\d+: ((?:[0-9A-F]{2} ?){1,16})")


def logged_secrets(log: str) -> list[tuple[str, bytes]]:
    """(label, bytes) of every chunk charon dumped (log level 4: 'Sk_d secret', 'encryption
    initiator key', ...), in log order. Only with Charon(log_keys=True): test use only."""
    out: list[tuple[str, bytes]] = []
    lines = log.splitlines()
    i = 0
    while i < len(lines):
        m = _DUMP_HEAD.search(lines[i])
        i += 1
        if not m:
            continue
        label, size, buf = m.group(1), int(m.group(2)), bytearray()
        while len(buf) < size and i < len(lines):
            d = _DUMP_LINE.search(lines[i])
            if not d:
                break
            buf += bytes.fromhex(d.group(1).replace(" ", "")[:2 * (size - len(buf))])
            i += 1
        if len(buf) == size:
            out.append((label, bytes(buf)))
    return out


def child_keys(log: str) -> list[dict[str, bytes]]:
    """Per Child SA derivation (RFC 7296 §2.17 KEYMAT order): {'encr_i', 'encr_r', 'integ_i',
    'integ_r'}; the _i keys protect initiator-to-responder traffic."""
    out: list[dict[str, bytes]] = []
    names = {"encryption initiator key": "encr_i", "encryption responder key": "encr_r",
             "integrity initiator key": "integ_i", "integrity responder key": "integ_r"}
    for label, value in logged_secrets(log):
        if label == "encryption initiator key":
            out.append({})
        if label in names and out:
            out[-1][names[label]] = value
    return out
