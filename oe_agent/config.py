"""The agent's one TOML file (product.md §7), validated at load.

Every error names the file and the key (`agent.dataplane`, `peer[2].auth`) and is a UserError,
so `oe-agent run -c FILE` prints one line and exits. Defaults live here, in `DEFAULTS`, so a
minimal file is `[agent]` alone.
"""
from __future__ import annotations

import copy
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oe_agent.errors import UserError
from oe_agent.model import IPAddress, Mode, ShuntKind

GROUPS = ("clear", "clear-or-private", "private-or-clear", "private", "block")
# Groups that negotiate as initiator (trap) and their shunt defaults: product.md §2 table.
TRAP_GROUPS = ("private-or-clear", "private")

DEFAULTS: dict[str, Any] = {
    "agent": {
        "addresses": [],                      # empty = every address of the host
        "policies": "/etc/oe-agent/policies",
        "socket": "/run/oe-agent/ctl.sock",
        "dataplane": "auto",
        "keylog": "",
        "keep_sas_on_stop": False,            # true: SAs survive a restart (reconciled at start)
        "idle_timeout": 600,                  # s without traffic either way -> delete the SA
        "log_level": "info",
    },
    "identity": {
        "key": "/etc/oe-agent/hostkey.pem",
        "id": "",                             # empty = the address in use
    },
    "dns": {
        "resolvers": [],
        "trust_anchors": "",
        "dnssec": "validate",
        "timeout": 3.0,
        "insecure_private_or_clear": True,    # §4: an insecure key beats clear, marked so
    },
    "ike": {
        "port": 500,
        "natt_port": 4500,
        "proposals": [],                      # empty = the engine's defaults (product.md §5)
        "esp_proposals": [],
        "ike_lifetime": 14400,
        "child_lifetime": 3600,
        "rekey_margin": 540,                  # rekey this long before the hard lifetime
        "liveness": 30,                       # s between liveness checks of a quiet IKE SA
        "auth_null": False,                   # answer/initiate with AUTH_NULL (RFC 7619) OE
        # a silent peer is given up after timeout * (2^tries - 1) s: 7.5 s, so a clear peer's
        # traffic waits that long once, then its failure shunt (backing off) lets it through
        "retransmit_timeout": 0.5,
        "retransmit_tries": 4,
    },
    "shunts": {
        "negotiation": {"private-or-clear": "hold", "private": "hold"},
        "failure": {"private-or-clear": "pass", "private": "drop"},
        "hold_packets": 16,
        "lifetimes": {
            "negotiation": 30,                # the most a negotiation shunt may live
            "no_key": 900,                    # secure denial (or the negative TTL if longer)
            "silent": 10,                     # first backoff for a silent/unreachable peer
            "silent_max": 600,
            "refused": 300,                   # NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE, AUTH
            "bogus": 60,                      # DNSSEC bogus: drop, short, logged
            "insecure": 300,                  # private with only an insecure key
            "internal": 60,
        },
    },
}



@dataclass(frozen=True)
class PeerConfig:
    """A static peer: no DNS, no OE groups (product.md §5)."""

    address: IPAddress
    auth: str = "pubkey"
    public_key: str = ""     # PEM path or IPSECKEY text "10 0 4 . BASE64"
    psk: str = ""
    mode: Mode = Mode.TRANSPORT
    start: str = "trap"
    id: str = ""


@dataclass(frozen=True)
class Config:
    path: Path
    addresses: tuple[IPAddress, ...]
    policies: Path
    socket: Path
    dataplane: str
    keylog: Path | None
    keep_sas_on_stop: bool
    idle_timeout: int
    log_level: str
    identity_key: Path
    identity_id: str
    resolvers: tuple[IPAddress, ...]
    trust_anchors: Path | None
    dnssec: str
    dns_timeout: float
    insecure_private_or_clear: bool
    ike_port: int
    natt_port: int
    proposals: tuple[str, ...]       # strongSwan syntax; empty = engine defaults
    esp_proposals: tuple[str, ...]
    ike_lifetime: int
    child_lifetime: int
    rekey_margin: int
    liveness: int
    auth_null: bool
    retransmit_timeout: float
    retransmit_tries: int
    negotiation_shunt: dict[str, ShuntKind]
    failure_shunt: dict[str, ShuntKind]
    hold_packets: int
    lifetimes: dict[str, int]
    peers: tuple[PeerConfig, ...] = field(default=())


class _Reader:
    """Reads one table with type checks; every error names file and key."""

    def __init__(self, path: Path, prefix: str, table: Any, defaults: dict[str, Any]):
        self.path, self.prefix, self.defaults = path, prefix, defaults
        if not isinstance(table, dict):
            self.fail("", f"must be a table, not {type(table).__name__}")
        unknown = sorted(set(table) - set(defaults))
        if unknown:
            self.fail(unknown[0], f"unknown key (known: {', '.join(sorted(defaults))})")
        self.table = table

    def fail(self, key: str, msg: str):
        name = f"{self.prefix}.{key}" if key else self.prefix
        raise UserError(f"{self.path}: {name}: {msg}")

    def get(self, key: str, kind: type | tuple[type, ...]):
        v = self.table.get(key, self.defaults[key])
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(v, bool) and bool not in kinds:  # bool is an int in Python, not in TOML
            self.fail(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(v, kind):
            self.fail(key, f"expected {_kind_name(kind)}, got {type(v).__name__} {v!r}")
        return v

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        v = self.get(key, str)
        if v not in choices:
            self.fail(key, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def number(self, key: str, lo: float, hi: float, kind=int):
        v = self.get(key, kind if kind is int else (int, float))
        if not lo <= v <= hi:
            self.fail(key, f"{v} is out of range {lo}..{hi}")
        return v

    def address(self, key: str, v: Any) -> IPAddress:
        try:
            return ipaddress.ip_address(v)
        except (ValueError, TypeError):
            self.fail(key, f"{v!r} is not an IP address")

    def addresses(self, key: str) -> tuple[IPAddress, ...]:
        v = self.get(key, list)
        return tuple(self.address(key, a) for a in v)


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _proposal(r: _Reader, key: str, text: Any, esp: bool) -> str:
    """strongSwan-style proposal text, checked by the IKE engine's own parser."""
    from oe_agent.ike.const import ProtocolId
    from oe_agent.ike.proposal import parse_proposal

    if not isinstance(text, str) or not text:
        r.fail(key, f"{text!r} is not a proposal string")
    try:
        parse_proposal(text, ProtocolId.ESP if esp else ProtocolId.IKE)
    except ValueError as e:
        r.fail(key, str(e))
    return text


def load(path: str | Path) -> Config:
    """Read and validate the config file; UserError (naming file and key) on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read config: {e.strerror or e}") from None
    return parse(text, path)


def parse(text: str, path: Path | str = "<config>") -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    top = _Reader(path, "(top level)", data, {**DEFAULTS, "peer": []})
    a = _Reader(path, "agent", data.get("agent", {}), DEFAULTS["agent"])
    i = _Reader(path, "identity", data.get("identity", {}), DEFAULTS["identity"])
    d = _Reader(path, "dns", data.get("dns", {}), DEFAULTS["dns"])
    k = _Reader(path, "ike", data.get("ike", {}), DEFAULTS["ike"])
    s = _Reader(path, "shunts", data.get("shunts", {}), DEFAULTS["shunts"])

    def rel(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else (path.parent / q)

    def shunt_table(key: str, allowed: tuple[str, ...]) -> dict[str, ShuntKind]:
        raw = {**DEFAULTS["shunts"][key], **s.get(key, dict)}
        out = {}
        for group, kind in raw.items():
            if group not in TRAP_GROUPS:
                s.fail(f"{key}.{group}", f"only {', '.join(TRAP_GROUPS)} have shunts")
            if kind not in allowed:
                s.fail(f"{key}.{group}", f"{kind!r} is not one of {', '.join(allowed)}")
            out[group] = ShuntKind(kind)
        return out

    lt_table = s.get("lifetimes", dict)
    lt = _Reader(path, "shunts.lifetimes", lt_table, DEFAULTS["shunts"]["lifetimes"])
    lifetimes = {key: lt.number(key, 1, 7 * 86400) for key in DEFAULTS["shunts"]["lifetimes"]}
    if lifetimes["silent_max"] < lifetimes["silent"]:
        lt.fail("silent_max", f"{lifetimes['silent_max']} is less than silent ({lifetimes['silent']})")

    peers_raw = top.get("peer", list)
    peers = []
    peer_defaults = {"address": None, "public_key": "", "psk": "", "auth": "pubkey",
                     "mode": "transport", "start": "trap", "id": ""}
    seen: set[IPAddress] = set()
    for n, raw in enumerate(peers_raw):
        p = _Reader(path, f"peer[{n}]", raw, peer_defaults)
        if "address" not in raw:
            p.fail("address", "missing (every [[peer]] needs an address)")
        addr = p.address("address", raw["address"])
        if addr in seen:
            p.fail("address", f"{addr} is already a static peer")
        seen.add(addr)
        auth = p.choice("auth", ("pubkey", "psk", "null"))
        pk, psk = p.get("public_key", str), p.get("psk", str)
        if auth == "pubkey" and not pk:
            p.fail("public_key", "auth = \"pubkey\" needs a public_key (PEM path or IPSECKEY text)")
        if auth == "psk" and not psk:
            p.fail("psk", "auth = \"psk\" needs a psk")
        if pk and not pk.lstrip()[:1].isdigit():
            pk = str(rel(pk))  # a path; IPSECKEY text starts with the precedence number
        peers.append(PeerConfig(address=addr, auth=auth, public_key=pk, psk=psk,
                                mode=Mode(p.choice("mode", ("transport", "tunnel"))),
                                start=p.choice("start", ("now", "trap", "listen")),
                                id=p.get("id", str)))

    keylog = a.get("keylog", str)
    anchors = d.get("trust_anchors", str)
    dnssec = d.choice("dnssec", ("validate", "resolver", "off"))
    resolvers = d.addresses("resolvers")
    if dnssec == "resolver" and any(not r.is_loopback for r in resolvers):
        d.fail("resolvers", "dnssec = \"resolver\" trusts the AD bit only from loopback resolvers")
    if dnssec == "validate" and "trust_anchors" in data.get("dns", {}) and not anchors:
        d.fail("trust_anchors", "empty, but dnssec = \"validate\" needs trust anchors")
    ident = i.get("id", str)
    if ident and not _is_id(ident):
        i.fail("id", f"{ident!r} is neither an IP address nor a domain name")
    ike_lt, child_lt = k.number("ike_lifetime", 60, 86400 * 7), k.number("child_lifetime", 30, 86400 * 7)
    margin = k.number("rekey_margin", 1, 86400)
    if margin >= child_lt:
        k.fail("rekey_margin", f"{margin} must be less than child_lifetime ({child_lt})")
    port, natt = k.number("port", 1, 65535), k.number("natt_port", 1, 65535)
    if port == natt:
        k.fail("natt_port", f"must differ from port ({port})")

    return Config(
        path=path,
        addresses=a.addresses("addresses"),
        policies=rel(a.get("policies", str)),
        socket=rel(a.get("socket", str)),
        dataplane=a.choice("dataplane", ("auto", "kernel", "userspace")),
        keylog=rel(keylog) if keylog else None,
        keep_sas_on_stop=a.get("keep_sas_on_stop", bool),
        idle_timeout=a.number("idle_timeout", 0, 86400 * 7),
        log_level=a.choice("log_level", ("debug", "info", "warning", "error")),
        identity_key=rel(i.get("key", str)),
        identity_id=ident,
        resolvers=resolvers,
        trust_anchors=rel(anchors) if anchors else None,
        dnssec=dnssec,
        dns_timeout=float(d.number("timeout", 0.1, 60, kind=float)),
        insecure_private_or_clear=d.get("insecure_private_or_clear", bool),
        ike_port=port,
        natt_port=natt,
        proposals=tuple(_proposal(k, "proposals", t, esp=False) for t in k.get("proposals", list)),
        esp_proposals=tuple(_proposal(k, "esp_proposals", t, esp=True)
                            for t in k.get("esp_proposals", list)),
        ike_lifetime=ike_lt,
        child_lifetime=child_lt,
        rekey_margin=margin,
        liveness=k.number("liveness", 0, 3600),
        auth_null=k.get("auth_null", bool),
        retransmit_timeout=float(k.number("retransmit_timeout", 0.05, 60, kind=float)),
        retransmit_tries=k.number("retransmit_tries", 1, 20),
        negotiation_shunt=shunt_table("negotiation", ("hold", "pass", "drop")),
        failure_shunt=shunt_table("failure", ("pass", "drop")),
        hold_packets=s.number("hold_packets", 0, 1024),
        lifetimes=lifetimes,
        peers=tuple(peers),
    )


def _is_id(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        labels = text.rstrip(".").split(".")
        return all(lb and len(lb) <= 63 and all(c.isalnum() or c == "-" for c in lb)
                   for lb in labels) and len(text) <= 253


def default_copy() -> dict[str, Any]:
    """The defaults as a fresh dict (for docs and tests that build configs)."""
    return copy.deepcopy(DEFAULTS)
