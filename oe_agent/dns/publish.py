"""Publishing a host's own IPSECKEY by dynamic update (RFC 2136) signed with TSIG (RFC 8945).

The server's policy decides what a TSIG key may change; the convention (zones/README.md) is
one TSIG key per host, named like the host's owner name, allowed to touch that name only
(knot: `update-owner: key`; BIND: `update-policy { grant NAME self NAME IPSECKEY; }`).
Rollover (RFC 7583's double-publish idea, for IPSECKEY): add the new key, wait one TTL so every
cache holds both, switch the host to the new key, then remove the old one.
"""
from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update

from oe_agent.dns import transport


_TSIG_ALGORITHMS = {"hmac-sha256": dns.tsig.HMAC_SHA256, "hmac-sha384": dns.tsig.HMAC_SHA384,
                    "hmac-sha512": dns.tsig.HMAC_SHA512, "hmac-sha224": dns.tsig.HMAC_SHA224,
                    "hmac-sha1": dns.tsig.HMAC_SHA1}


class PublishError(Exception):
    """The update was refused or could not be sent; the message says which."""


@dataclass(frozen=True)
class TsigKey:
    name: dns.name.Name
    secret: bytes
    algorithm: dns.name.Name = dns.tsig.HMAC_SHA256

    @classmethod
    def from_text(cls, text: str) -> "TsigKey":
        """`[algorithm:]name:base64secret` (dig -y), a BIND `key "n" {...};` block, or knot's
        `key:` section (`id:`, `algorithm:`, `secret:`)."""
        text = text.strip()
        bind = re.search(r'key\s+"?([^"\s{]+)"?\s*\{(.*?)\}', text, re.S)
        if bind:
            alg = re.search(r"algorithm\s+([\w-]+)", bind.group(2))
            sec = re.search(r'secret\s+"([^"]+)"', bind.group(2))
            if not sec:
                raise ValueError("TSIG key: BIND key block without a secret")
            return cls._make(bind.group(1), sec.group(1), alg.group(1) if alg else "hmac-sha256")
        knot = dict(re.findall(r"(id|algorithm|secret)\s*:\s*(\S+)", text))
        if "id" in knot and "secret" in knot:
            return cls._make(knot["id"], knot["secret"], knot.get("algorithm", "hmac-sha256"))
        parts = text.split(":")
        if len(parts) == 2:
            return cls._make(parts[0], parts[1], "hmac-sha256")
        if len(parts) == 3:
            return cls._make(parts[1], parts[2], parts[0])
        raise ValueError("TSIG key: want [algorithm:]name:secret, a BIND key block or knot key")

    @classmethod
    def _make(cls, name: str, secret: str, algorithm: str) -> "TsigKey":
        try:
            raw = base64.b64decode(secret, validate=True)
        except ValueError:
            raise ValueError(f"TSIG key {name}: secret is not base64") from None
        alg = _TSIG_ALGORITHMS.get(algorithm.lower().rstrip("."))
        if alg is None:
            raise ValueError(f"TSIG key {name}: unknown algorithm {algorithm} "
                             f"(want one of {', '.join(_TSIG_ALGORITHMS)})")
        return cls(dns.name.from_text(name), raw, alg)

    @classmethod
    def from_file(cls, path) -> "TsigKey":
        try:
            return cls.from_text(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"TSIG key file {path}: {exc.strerror}") from None

    def keyring(self) -> dict:
        return {self.name: dns.tsig.Key(self.name, self.secret, self.algorithm)}


async def find_zone(server: tuple[str, int], owner: dns.name.Name, timeout: float) -> dns.name.Name:
    """The zone that holds `owner`, from the SOA the server returns (answer or authority)."""
    q = dns.message.make_query(owner, dns.rdatatype.SOA)
    try:
        msg = await dns.asyncquery.udp(q, server[0], timeout=timeout, port=server[1])
    except (dns.exception.DNSException, OSError) as exc:
        raise PublishError(f"cannot ask {server[0]} for the zone of {owner}: {exc}") from None
    for rrset in msg.answer + msg.authority:
        if rrset.rdtype == dns.rdatatype.SOA and owner.is_subdomain(rrset.name):
            return rrset.name
    raise PublishError(f"{server[0]} does not say which zone holds {owner} "
                       f"(rcode {dns.rcode.to_text(msg.rcode())})")


async def send_update(server: tuple[str, int], update: dns.update.UpdateMessage,
                      timeout: float) -> None:
    """Send over TCP (updates may be large: RSA keys); PublishError unless NOERROR."""
    try:
        resp = await dns.asyncquery.tcp(update, server[0], timeout=timeout, port=server[1])
    except dns.tsig.PeerError as exc:
        # knot answers an update its ACL denies with NOTAUTH + TSIG error BADKEY
        raise PublishError(f"{server[0]} refused the update: TSIG key {update.keyname} is "
                           f"unknown there or not allowed to change this name ({exc})") from None
    except (dns.exception.DNSException, OSError) as exc:
        raise PublishError(f"update to {server[0]} failed: {type(exc).__name__} {exc}") from None
    rc = resp.rcode()
    if rc != dns.rcode.NOERROR:
        raise PublishError(f"{server[0]} refused the update: {dns.rcode.to_text(rc)}"
                           + (" (the TSIG key may not change this name)"
                              if rc in (dns.rcode.REFUSED, dns.rcode.NOTAUTH) else ""))


class Publisher:
    """Updates one owner name's IPSECKEY rrset at one primary server."""

    def __init__(self, server, owner: dns.name.Name, tsig: TsigKey, *, zone=None,
                 ttl: int = 300, timeout: float = 5.0):
        self.server = transport.parse_server(server)
        self.owner = owner
        self.tsig = tsig
        self.zone = dns.name.from_text(str(zone)) if zone else None
        self.ttl = ttl
        self.timeout = timeout

    async def _update(self) -> dns.update.UpdateMessage:
        if self.zone is None:
            self.zone = await find_zone(self.server, self.owner, self.timeout)
        return dns.update.UpdateMessage(self.zone, keyring=self.tsig.keyring(),
                                        keyname=self.tsig.name,
                                        keyalgorithm=self.tsig.algorithm)

    async def replace(self, rdata_text: str) -> None:
        """The owner's IPSECKEY rrset becomes exactly this one record."""
        up = await self._update()
        up.replace(self.owner, self.ttl, dns.rdatatype.IPSECKEY, rdata_text)
        await send_update(self.server, up, self.timeout)

    async def add(self, rdata_text: str) -> None:
        up = await self._update()
        up.add(self.owner, self.ttl, dns.rdatatype.IPSECKEY, rdata_text)
        await send_update(self.server, up, self.timeout)

    async def remove(self, rdata_text: str) -> None:
        up = await self._update()
        up.delete(self.owner, dns.rdatatype.IPSECKEY, rdata_text)
        await send_update(self.server, up, self.timeout)

    async def rollover(self, old_text: str, new_text: str, *, wait: float | None = None,
                       on_switch: Callable[[], Awaitable[None] | None] | None = None,
                       report: Callable[[str], None] = lambda s: None,
                       sleep=asyncio.sleep) -> None:
        """Add new -> wait TTL (caches now hold both) -> switch -> remove old."""
        # one TTL, plus a margin for caches that count whole seconds
        wait = self.ttl + max(2, self.ttl // 10) if wait is None else wait
        await self.add(new_text)
        report(f"added the new key at {self.owner}; waiting {wait:g}s (the TTL) for caches")
        await sleep(wait)
        if on_switch is not None:
            r = on_switch()
            if asyncio.iscoroutine(r):
                await r
        report("switched to the new key; removing the old one")
        await self.remove(old_text)
        report("old key removed")
