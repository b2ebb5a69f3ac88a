"""Policy groups: libreswan's /etc/ipsec.d/policies/ files, loaded unchanged (product.md §2).

Five files — clear, clear-or-private, private-or-clear, private, block — one CIDR per line,
optionally `CIDR proto sport dport` (0 = any), `#` comments. Lookup is longest prefix, then the
most specific protocol/port. The same selector in two files is an error naming both places,
not libreswan's silent first-wins. `kernel_state()` is the set of policies the groups imply;
two loads differ by `diff()`, which is what a reload applies.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from oe_agent.config import GROUPS
from oe_agent.errors import UserError
from oe_agent.model import IPAddress, IPNetwork

INITIATES = frozenset({"private-or-clear", "private"})
ANSWERS = frozenset({"clear-or-private", "private-or-clear", "private"})
# What each group puts in the kernel (product.md §2 table); clear-or-private puts nothing.
KERNEL_ACTION = {"clear": "pass", "private-or-clear": "trap", "private": "trap", "block": "block"}

_PROTO_NAMES = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51,
                "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132, "udplite": 136}


@dataclass(frozen=True)
class Selector:
    """Destination CIDR with optional protocol and ports (libreswan's `CIDR proto sport dport`)."""

    net: IPNetwork
    proto: int = 0
    sport: int = 0
    dport: int = 0

    def __str__(self) -> str:
        s = str(self.net)
        if self.proto:
            s += f" {self.proto} {self.sport} {self.dport}"
        return s

    def sort_key(self) -> tuple:
        return (self.net.version, self.net, self.proto, self.sport, self.dport)

    def specificity(self) -> tuple[int, int, int, int]:
        return (self.net.prefixlen, bool(self.proto), bool(self.dport), bool(self.sport))

    def matches(self, addr: IPAddress, proto: int, sport: int, dport: int) -> bool:
        return (addr in self.net and (not self.proto or self.proto == proto)
                and (not self.sport or self.sport == sport)
                and (not self.dport or self.dport == dport))


@dataclass(frozen=True)
class GroupEntry:
    """One line of one group file (or an exemption the agent adds itself)."""

    group: str
    selector: Selector
    source: str  # "path:line", or why the agent added it ("own address", "DNS resolver")


@dataclass(frozen=True)
class KernelPolicy:
    """One policy the groups imply: action is trap, pass or block."""

    selector: Selector
    action: str


@dataclass(frozen=True)
class GroupDiff:
    """What a reload changes: selectors to remove, policies to (re)install."""

    remove: tuple[Selector, ...]
    install: tuple[KernelPolicy, ...]

    def __bool__(self) -> bool:
        return bool(self.remove or self.install)


def parse_line(text: str, where: str) -> Selector | None:
    """One line of a group file; None for blank and comment lines."""
    text = text.split("#", 1)[0].strip()
    if not text:
        return None
    words = text.split()
    if len(words) > 4:
        raise UserError(f"{where}: expected CIDR [proto [sport [dport]]], got {text!r}")
    try:
        net = ipaddress.ip_network(words[0], strict=False)
    except ValueError:
        raise UserError(f"{where}: {words[0]!r} is not a CIDR") from None
    proto = _proto(words[1], where) if len(words) > 1 else 0
    ports = [_port(w, where) for w in words[2:]]
    sport = ports[0] if ports else 0
    dport = ports[1] if len(ports) > 1 else 0
    if (sport or dport) and proto not in (6, 17, 132, 136):
        raise UserError(f"{where}: ports need tcp, udp, sctp or udplite, not protocol {proto}")
    return Selector(net, proto, sport, dport)


def _proto(word: str, where: str) -> int:
    if word.isdigit():
        n = int(word)
        if n > 255:
            raise UserError(f"{where}: protocol {n} is out of range 0..255")
        return n
    if word.lower() in _PROTO_NAMES:
        return _PROTO_NAMES[word.lower()]
    try:
        return socket.getprotobyname(word)
    except OSError:
        raise UserError(f"{where}: unknown protocol {word!r}") from None


def _port(word: str, where: str) -> int:
    if not word.isdigit() or int(word) > 65535:
        raise UserError(f"{where}: {word!r} is not a port number (0 = any)")
    return int(word)


class PolicyGroups:
    """The loaded groups: lookup by address, and the kernel state they imply."""

    def __init__(self, entries: Iterable[GroupEntry], exempt: Iterable[GroupEntry] = ()):
        self._by_sel: dict[Selector, GroupEntry] = {}
        for e in entries:
            old = self._by_sel.get(e.selector)
            if old and old.group != e.group:
                raise UserError(f"{e.selector.net}{_sel_suffix(e.selector)} is in two groups: "
                                f"{old.source} ({old.group}) and {e.source} ({e.group})")
            self._by_sel.setdefault(e.selector, e)
        # Exemptions (own addresses, resolvers) outrank any group: host prefixes that pass.
        self._exempt = {e.selector.net: e for e in exempt}
        self._by_net: dict[IPNetwork, list[GroupEntry]] = {}
        for e in self._by_sel.values():
            self._by_net.setdefault(e.selector.net, []).append(e)
        for lst in self._by_net.values():
            lst.sort(key=lambda e: e.selector.specificity(), reverse=True)
        self._prefixes = {4: sorted({n.prefixlen for n in self._by_net if n.version == 4}, reverse=True),
                          6: sorted({n.prefixlen for n in self._by_net if n.version == 6}, reverse=True)}

    @classmethod
    def load(cls, directory: Path, exempt: Iterable[IPAddress] = (),
             resolvers: Iterable[IPAddress] = ()) -> "PolicyGroups":
        """Read the five files (missing ones are empty, as in libreswan)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"{directory}: policies directory does not exist")
        texts = {}
        for g in GROUPS:
            p = directory / g
            try:
                texts[str(p)] = (g, p.read_text())
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        return cls.from_texts(texts, exempt, resolvers)

    @classmethod
    def from_texts(cls, texts: dict[str, tuple[str, str]], exempt: Iterable[IPAddress] = (),
                   resolvers: Iterable[IPAddress] = ()) -> "PolicyGroups":
        """texts: {file name: (group, content)}."""
        entries = []
        for fname, (group, content) in texts.items():
            if group not in GROUPS:
                raise UserError(f"{fname}: {group!r} is not a policy group")
            for n, line in enumerate(content.splitlines(), 1):
                sel = parse_line(line, f"{fname}:{n}")
                if sel is not None:
                    entries.append(GroupEntry(group, sel, f"{fname}:{n}"))
        ex = [GroupEntry("clear", Selector(ipaddress.ip_network(a)), "own address") for a in exempt]
        ex += [GroupEntry("clear", Selector(ipaddress.ip_network(a)), "DNS resolver")
               for a in resolvers]
        return cls(entries, ex)

    def entries(self) -> list[GroupEntry]:
        return sorted(self._by_sel.values(), key=lambda e: (e.group, e.selector.sort_key()))

    def lookup(self, addr: IPAddress | str, proto: int = 0, sport: int = 0,
               dport: int = 0) -> GroupEntry | None:
        """The group for a destination: longest prefix, then most specific proto/port.
        None when no group covers it (then the agent leaves it alone: clear)."""
        addr = ipaddress.ip_address(addr)
        host = ipaddress.ip_network(addr)
        if host in self._exempt:
            return self._exempt[host]
        for plen in self._prefixes[addr.version]:
            net = ipaddress.ip_network((addr, plen), strict=False)
            for e in self._by_net.get(net, ()):
                if e.selector.matches(addr, proto, sport, dport):
                    return e
        return None

    def kernel_state(self) -> frozenset[KernelPolicy]:
        """The policies the groups imply; own addresses and resolvers get host pass policies
        wherever a trap or block group would cover them (a lookup must never wait on itself)."""
        out = {KernelPolicy(e.selector, KERNEL_ACTION[e.group])
               for e in self._by_sel.values() if e.group in KERNEL_ACTION}
        for net, e in self._exempt.items():
            addr = net.network_address
            covering = [x for x in self._by_sel.values() if addr in x.selector.net
                        and KERNEL_ACTION.get(x.group) in ("trap", "block")]
            if covering:
                out.discard(KernelPolicy(e.selector, "trap"))
                out.discard(KernelPolicy(e.selector, "block"))
                out.add(KernelPolicy(e.selector, "pass"))
        return frozenset(out)


def diff(old: frozenset[KernelPolicy], new: frozenset[KernelPolicy]) -> GroupDiff:
    """Reload by difference: a selector whose action changes is re-installed (replaced in
    place), not removed, so nothing is uncovered in between."""
    old_by = {p.selector: p.action for p in old}
    new_by = {p.selector: p.action for p in new}
    remove = tuple(sorted((s for s in old_by if s not in new_by), key=Selector.sort_key))
    install = tuple(sorted((p for p in new if old_by.get(p.selector) != p.action),
                           key=lambda p: p.selector.sort_key()))
    return GroupDiff(remove, install)


def _sel_suffix(s: Selector) -> str:
    return f" {s.proto} {s.sport} {s.dport}" if s.proto else ""
