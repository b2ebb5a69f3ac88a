"""The inbound half of policy for the userspace dataplane (routes only steer what this host
sends; XFRM also has `in` policies). One nftables table of our own, `inet oe_agent_<ifname>`:
- block: clear packets from a source whose longest-prefix group is `block` are dropped
  (product.md §2: a longer pass or trap inside a blocked prefix wins), as XFRM's block policy;
- Child SAs: clear packets from a peer (its remote traffic selectors) that has an SA are dropped,
  as XFRM's `in` policy with an ESP template does; IKE (UDP 500/4500), ESP, neighbour
  discovery and ICMP errors still pass.
Packets that come out of oe0 (decrypted ESP) are not filtered.

Needs the `nft` tool; without it the dataplane still blocks what it sends and says so.
"""
from __future__ import annotations

import asyncio
import ipaddress
import shutil
from typing import Iterable

from oe_agent.model import IPNetwork


def effective_block(policies: Iterable[tuple[IPNetwork, str]]) -> list[IPNetwork]:
    """The disjoint networks whose longest-prefix policy is "block": each blocked prefix
    minus every longer policy prefix inside it (whatever that one's kind)."""
    pol = list(policies)
    out: list[IPNetwork] = []
    for net, kind in pol:
        if kind != "block":
            continue
        rest = [net]
        for other, _ in pol:
            if (other.version == net.version and other.prefixlen > net.prefixlen
                    and other.subnet_of(net)):
                nxt = []
                for r in rest:
                    if other.subnet_of(r):
                        nxt.extend(r.address_exclude(other))
                    elif not r.subnet_of(other):
                        nxt.append(r)
                rest = nxt
        out.extend(rest)
    return sorted(ipaddress.collapse_addresses([n for n in out if n.version == 4])) + sorted(
        ipaddress.collapse_addresses([n for n in out if n.version == 6]))


class NftInbound:
    """Our nftables table: created by `start`, refreshed by `apply`, removed by `stop`."""

    def __init__(self, ifname: str, ike_ports: Iterable[int] = (500, 4500)):
        self.table = f"oe_agent_{ifname}"
        self.ike_ports = sorted(set(ike_ports))
        self.ifname = ifname
        self.available = shutil.which("nft") is not None
        self.error = "" if self.available else "nft not found"

    async def _nft(self, script: str) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(
            "nft", "-f", "-", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await p.communicate(script.encode())
        return p.returncode, err.decode(errors="replace").strip()

    async def start(self) -> bool:
        if not self.available:
            return False
        await self._nft(f"delete table inet {self.table}\n")  # a crashed run's table
        rc, err = await self._nft(
            f"table inet {self.table} {{\n"
            f"  set block4 {{ type ipv4_addr; flags interval; }}\n"
            f"  set block6 {{ type ipv6_addr; flags interval; }}\n"
            f"  set sa4 {{ type ipv4_addr; flags interval; }}\n"
            f"  set sa6 {{ type ipv6_addr; flags interval; }}\n"
            f"  chain input {{\n"
            f"    type filter hook input priority filter - 10; policy accept;\n"
            f"    iifname \"{self.ifname}\" accept\n"
            f"    ip saddr @block4 counter drop\n"
            f"    ip6 saddr @block6 counter drop\n"
            f"    meta l4proto esp accept\n"
            # neighbour discovery and the ICMP errors path MTU discovery of ESP itself needs
            f"    icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, "
            f"nd-neighbor-advert, nd-redirect, packet-too-big, destination-unreachable, "
            f"time-exceeded }} accept\n"
            f"    icmp type {{ destination-unreachable, time-exceeded }} accept\n"
            f"    udp dport {{ {', '.join(map(str, self.ike_ports))} }} accept\n"
            f"    ip saddr @sa4 counter drop\n"
            f"    ip6 saddr @sa6 counter drop\n"
            f"  }}\n"
            f"}}\n")
        if rc != 0:
            self.available, self.error = False, err or f"nft exited {rc}"
        return self.available

    async def apply(self, nets: list[IPNetwork], kind: str = "block") -> bool:
        """Make the `kind` ("block" or "sa") sets hold exactly `nets` (one nft transaction).
        False (and `error` set) if nft refused it."""
        if not self.available:
            return False
        lines = []
        for v in (4, 6):
            name = f"{kind}{v}"
            lines.append(f"flush set inet {self.table} {name}")
            elems = [str(n) for n in ipaddress.collapse_addresses(
                [n for n in nets if n.version == v])] if any(n.version == v for n in nets) else []
            if elems:
                lines.append(f"add element inet {self.table} {name} {{ {', '.join(elems)} }}")
        return await self._run(lines)

    async def update(self, kind: str, add: Iterable[IPNetwork],
                     remove: Iterable[IPNetwork]) -> bool:
        """Change the `kind` sets by difference, in one nft transaction: work in proportion to
        the change, not to the set. The caller keeps the elements disjoint (interval sets
        refuse overlaps); removals go first, so a network may be replaced by a wider one.
        False (and `error` set) if nft refused it: then nothing changed (a transaction)."""
        if not self.available:
            return False
        lines = []
        for verb, nets in (("delete", list(remove)), ("add", list(add))):
            for v in (4, 6):
                elems = [str(n) for n in nets if n.version == v]
                if elems:
                    lines.append(f"{verb} element inet {self.table} {kind}{v} "
                                 f"{{ {', '.join(elems)} }}")
        return await self._run(lines) if lines else True

    async def _run(self, lines: list[str]) -> bool:
        rc, err = await self._nft("\n".join(lines) + "\n")
        if rc != 0:
            self.error = err or f"nft exited {rc}"
        return rc == 0

    async def stop(self) -> None:
        if self.available:
            await self._nft(f"delete table inet {self.table}\n")
