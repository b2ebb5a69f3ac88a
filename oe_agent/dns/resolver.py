"""Peer keys from DNS: IPSECKEY lookup, DNSSEC classification, cache, coalescing.

`KeyResolver.lookup(addr_or_fqdn)` never raises for anything a server sends; it returns a
`KeyAnswer` whose status is one of:

- secure-key: a validated IPSECKEY rrset with at least one usable key
- secure-denial: validated proof that no (usable) key is published (NXDOMAIN / NODATA)
- insecure: provably unsigned (or no trust anchor covers it, or dnssec="off"); keys may be there
- bogus: should be signed and the signatures or proofs fail (an attack indicator)
- timeout: no answer within the bound (servers silent, unreachable or failing)

DNSSEC modes: "validate" (in-process, RFC 4035 §5, queries with DO+CD), "resolver" (trust the
AD bit of a validating resolver on loopback, RFC 6698 §A.1-style local trust), "off" (labs).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import dataclasses
import time
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from oe_agent.dns import ipseckey, transport, validate
from oe_agent.dns.ipseckey import IpsecKey
from oe_agent.dns.transport import DnsTimeout

log = logging.getLogger("oe_agent.dns")

STATUSES = ("secure-key", "secure-denial", "insecure", "bogus", "timeout")
MODES = ("validate", "resolver", "off")
IPSECKEY = dns.rdatatype.IPSECKEY
# RFC 8914 extended DNS errors that mean "DNSSEC failed" (a validating resolver's bogus)
_EDE_BOGUS = {6: "DNSSEC Bogus", 7: "Signature Expired", 8: "Signature Not Yet Valid",
              9: "DNSKEY Missing", 10: "RRSIGs Missing", 11: "No Zone Key Bit Set",
              12: "NSEC Missing"}


@dataclass(frozen=True)
class KeyAnswer:
    """The outcome of one key lookup, with the reason kept for `oe-agent explain`."""

    status: str
    keys: tuple[IpsecKey, ...]
    ttl: int
    reason: str
    name: str  # the owner name asked for (reverse name or FQDN)
    query: str = ""  # what the caller passed (address or FQDN)
    chain: tuple[str, ...] = ()  # CNAME targets followed (RFC 2317 classless delegation)
    dnssec: str = "validate"
    from_cache: bool = False

    @property
    def secure(self) -> bool:
        return self.status in ("secure-key", "secure-denial")

    def gateways(self) -> list[IpsecKey]:
        """Keys in precedence order (lowest first, RFC 4025 §2.2)."""
        return sorted(self.keys, key=lambda k: k.precedence)

    def to_json(self) -> dict:
        return {
            "query": self.query, "name": self.name, "status": self.status, "ttl": self.ttl,
            "reason": self.reason, "chain": list(self.chain), "dnssec": self.dnssec,
            "from_cache": self.from_cache,
            "keys": [{"precedence": k.precedence, "gateway_type": k.gateway_type,
                      "gateway": k.gateway_text, "algorithm": k.algorithm,
                      "key_type": type(k.public_key).__name__.lstrip("_"),
                      "rdata": k.to_text()} for k in self.gateways()],
        }

    def describe(self) -> str:
        """In words, for `oe-agent lookup` and `explain`."""
        words = {
            "secure-key": "DNSSEC-validated key(s) found",
            "secure-denial": "DNSSEC proves there is no usable key",
            "insecure": "answer is not DNSSEC-signed (unauthenticated)",
            "bogus": "DNSSEC validation FAILED (possible attack)",
            "timeout": "no answer from the DNS servers",
        }[self.status]
        lines = [f"{self.query or self.name}: {self.status}: {words}",
                 f"  name {self.name}" + (f" -> {' -> '.join(self.chain)}" if self.chain else "")
                 + f", ttl {self.ttl}s, dnssec mode {self.dnssec}"
                 + (", from cache" if self.from_cache else ""),
                 f"  reason: {self.reason}"]
        for k in self.gateways():
            gw = "this host" if k.gateway_type == 0 else f"gateway {k.gateway_text}"
            lines.append(f"  key: precedence {k.precedence}, {gw}, algorithm {k.algorithm} "
                         f"({type(k.public_key).__name__.lstrip('_')})")
        return "\n".join(lines)


class _ServFail(Exception):
    def __init__(self, msg: dns.message.Message, server: str):
        super().__init__(f"{dns.rcode.to_text(msg.rcode())} from {server}")
        self.msg = msg


@dataclass
class _Entry:
    expires: float
    answer: KeyAnswer


class KeyResolver:
    """Finds and classifies peer keys; see the module docstring.

    resolvers: addresses ("192.0.2.53", "127.0.0.1@5353", ("::1", 53)); tried in order.
    trust_anchors: DS/DNSKEY lines, a file/directory of them, or a dict (validate mode).
    timeout: bound of one whole lookup, seconds; attempt_timeout: of one query.
    """

    def __init__(self, resolvers, trust_anchors=None, dnssec: str = "validate", *,
                 timeout: float = 5.0, attempt_timeout: float = 1.5, max_ttl: int = 3600,
                 max_negative_ttl: int = 3600, bogus_ttl: int = 10, max_cnames: int = 8,
                 max_entries: int = 10000, clock=time.monotonic, now=time.time):
        if dnssec not in MODES:
            raise ValueError(f"dnssec must be one of {', '.join(MODES)}, not {dnssec!r}")
        self.servers = [transport.parse_server(r) for r in resolvers]
        if not self.servers:
            raise ValueError("no DNS resolvers configured")
        if dnssec == "resolver":
            far = [a for a, _p in self.servers if not ipaddress.ip_address(a).is_loopback]
            if far:  # the AD bit is only as trustworthy as the path to the resolver
                raise ValueError(f"dnssec = \"resolver\" trusts the AD bit only from loopback; "
                                 f"{', '.join(far)} is not")
        if timeout <= 0 or attempt_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.mode = dnssec
        self.timeout = float(timeout)
        self.attempt_timeout = min(float(attempt_timeout), self.timeout)
        self.max_ttl, self.max_negative_ttl, self.bogus_ttl = max_ttl, max_negative_ttl, bogus_ttl
        self.max_cnames = max_cnames
        self.clock = clock
        self.now = now
        self.max_entries = max_entries
        self.validator = validate.Validator(self._fetch_cd, trust_anchors, now=now, clock=clock,
                                            key_cache_max=max_ttl)
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self.queries_sent = 0

    # --- public -----------------------------------------------------------------------------

    async def lookup(self, addr_or_fqdn: str) -> KeyAnswer:
        """Keys for an address (reverse name) or an FQDN. ValueError only for a bad argument."""
        owner = ipseckey.owner_name(str(addr_or_fqdn))
        key = owner.to_text().lower()
        entry = self._cache.get(key)
        now = self.clock()
        if entry is not None and entry.expires > now:
            left = max(0, int(entry.expires - now))
            return _replace(entry.answer, query=str(addr_or_fqdn), ttl=left, from_cache=True)
        fut = self._inflight.get(key)
        if fut is None:  # coalesce: one resolution per name, however many callers
            fut = asyncio.ensure_future(self._resolve_and_cache(owner, key))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        answer = await asyncio.shield(fut)
        return _replace(answer, query=str(addr_or_fqdn))

    def flush(self) -> None:
        self._cache.clear()

    # --- resolution -------------------------------------------------------------------------

    async def _resolve_and_cache(self, owner: dns.name.Name, key: str) -> KeyAnswer:
        answer = await self._resolve(owner)
        ttl = {"timeout": 0, "bogus": min(self.bogus_ttl, answer.ttl or self.bogus_ttl)}.get(
            answer.status, answer.ttl)
        if ttl > 0:
            self._store(key, _Entry(self.clock() + ttl, answer))
        return answer

    def _store(self, key: str, entry: _Entry) -> None:
        """Bounded: expired entries go first, then the oldest (insertion order)."""
        self._cache.pop(key, None)
        if len(self._cache) >= self.max_entries:
            now = self.clock()
            for k in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[k]
            while len(self._cache) >= self.max_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = entry

    async def _resolve(self, owner: dns.name.Name) -> KeyAnswer:
        base = dict(name=owner.to_text(), dnssec=self.mode)
        try:
            async with asyncio.timeout(self.timeout):
                if self.mode == "validate":
                    return await self._resolve_validate(owner, base)
                return await self._resolve_ad(owner, base)
        except (TimeoutError, DnsTimeout) as exc:
            why = str(exc) or f"no answer within {self.timeout:g}s"
            return KeyAnswer("timeout", (), 0, f"{why} (servers: {self._server_list()})", **base)
        except _ServFail as exc:
            return KeyAnswer("timeout", (), 0, f"resolver failed: {exc}", **base)
        except validate.Bogus as exc:
            return KeyAnswer("bogus", (), self.bogus_ttl, str(exc), **base)
        except Exception as exc:  # never out of lookup: a server must not crash the agent
            log.exception("key lookup for %s failed", owner)
            return KeyAnswer("bogus", (), self.bogus_ttl,
                             f"could not process the answer: {type(exc).__name__}: {exc}", **base)

    def _server_list(self) -> str:
        return ", ".join(f"{a}@{p}" if p != 53 else a for a, p in self.servers)

    async def _query(self, qname, rdtype, cd: bool) -> dns.message.Message:
        """One question to the resolvers in order, in rounds until the lookup's bound (a lost
        datagram is retried); the first NOERROR/NXDOMAIN wins. If every resolver answered
        with an error in a round, asking again would not help: raise it."""
        last: Exception | None = None
        rounds = max(1, int(self.timeout // (self.attempt_timeout * len(self.servers))))
        for _round in range(rounds):
            failures = 0
            for addr, port in self.servers:
                q = transport.make_query(qname, rdtype, cd)
                self.queries_sent += 1
                try:
                    msg = await transport.exchange(q, (addr, port), self.attempt_timeout)
                except DnsTimeout as exc:
                    last = exc
                    continue
                if msg.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return msg
                last = _ServFail(msg, addr)
                failures += 1
            if failures == len(self.servers):
                break
        raise last or DnsTimeout("no resolvers")

    async def _fetch_cd(self, qname, rdtype) -> dns.message.Message:
        return await self._query(qname, rdtype, cd=True)

    async def _resolve_validate(self, owner, base) -> KeyAnswer:
        v = self.validator
        name, chain, secure, ttl = owner, [], True, self.max_ttl
        for _ in range(self.max_cnames + 1):
            msg = await self._fetch_cd(name, IPSECKEY)
            cur = name
            while True:
                rr = validate.find(msg.answer, cur, IPSECKEY)
                if rr is not None:
                    sigs = validate.sigs_for([msg.answer], rr)
                    verdict = await v.rrset(rr, sigs, authority=msg.authority)
                    secure &= verdict == validate.SECURE
                    ttl = min(ttl, rr.ttl, self._sig_ttl(sigs))
                    return self._positive(rr, secure, ttl, chain, base,
                                          "validated from the trust anchor" if secure else
                                          self._insecure_reason(cur))
                cn = validate.find(msg.answer, cur, dns.rdatatype.CNAME)
                if cn is None:
                    break
                sigs = validate.sigs_for([msg.answer], cn)
                verdict = await v.rrset(cn, sigs, authority=msg.authority)
                secure &= verdict == validate.SECURE
                ttl = min(ttl, cn.ttl, self._sig_ttl(sigs))
                cur = cn[0].target
                chain.append(cur.to_text())
                if len(chain) > self.max_cnames:
                    raise validate.Bogus(f"CNAME chain longer than {self.max_cnames}")
            if cur != name and not _negative_about(msg, cur):
                name = cur  # the server gave only the CNAME: ask for its target
                continue
            verdict, nttl = await v.denial(msg, cur, IPSECKEY)
            secure &= verdict == validate.SECURE
            return self._negative(msg, secure, min(ttl, nttl), chain, base,
                                  f"denial proven by {v.last_proof}" if secure else
                                  self._insecure_reason(cur))
        raise validate.Bogus(f"CNAME chain longer than {self.max_cnames}")

    def _sig_ttl(self, sigs) -> int:
        """RFC 4035 §5.3.3: never cache past the signatures' expiration."""
        if not sigs:
            return self.max_ttl
        return max(0, int(min(s.expiration for s in sigs) - self.now()))

    def _insecure_reason(self, name) -> str:
        notes = [z for z in self.validator.insecure_notes if name.is_subdomain(z)]
        if notes:
            return self.validator.insecure_notes[max(notes, key=len)]
        if self.validator.anchor_for(name) is None:
            return f"no trust anchor covers {name}"
        return f"{name} is in a zone with no DS in its parent (insecure delegation)"

    async def _resolve_ad(self, owner, base) -> KeyAnswer:
        trust_ad = self.mode == "resolver"
        name, chain, secure, ttl = owner, [], True, self.max_ttl
        for _ in range(self.max_cnames + 1):
            try:
                msg = await self._query(name, IPSECKEY, cd=False)
            except _ServFail as exc:
                if not trust_ad:
                    raise
                raise await self._explain_servfail(name, exc) from None
            secure &= trust_ad and bool(msg.flags & dns.flags.AD)
            cur = name
            while True:
                rr = validate.find(msg.answer, cur, IPSECKEY)
                if rr is not None:
                    return self._positive(rr, secure, min(ttl, rr.ttl), chain, base,
                                          self._ad_reason(secure))
                cn = validate.find(msg.answer, cur, dns.rdatatype.CNAME)
                if cn is None:
                    break
                ttl = min(ttl, cn.ttl)
                cur = cn[0].target
                chain.append(cur.to_text())
                if len(chain) > self.max_cnames:
                    raise validate.Bogus(f"CNAME chain longer than {self.max_cnames}")
            if cur != name and not _negative_about(msg, cur):
                name = cur
                continue
            soa = next((r for r in msg.authority if r.rdtype == dns.rdatatype.SOA), None)
            nttl = min(soa.ttl, soa[0].minimum) if soa is not None else 0
            return self._negative(msg, secure, min(ttl, nttl), chain, base,
                                  self._ad_reason(secure))
        raise validate.Bogus(f"CNAME chain longer than {self.max_cnames}")

    def _ad_reason(self, secure: bool) -> str:
        if self.mode == "off":
            return "DNSSEC is off (dnssec = \"off\")"
        return ("resolver validated it (AD bit)" if secure
                else "resolver did not validate it (no AD bit): unsigned or no trust anchor")

    async def _explain_servfail(self, name, exc: _ServFail) -> Exception:
        """A validating resolver says SERVFAIL both for bogus data and for unreachable servers:
        tell them apart by its extended error (RFC 8914) or by asking again with CD."""
        for ede in exc.msg.extended_errors():
            if ede.code in _EDE_BOGUS:
                text = f": {ede.text}" if ede.text else ""
                return validate.Bogus(f"resolver: {_EDE_BOGUS[ede.code]}{text}")
        try:
            await self._query(name, IPSECKEY, cd=True)
        except (_ServFail, DnsTimeout) as again:
            return DnsTimeout(f"resolver failed: {exc}; with CD too: {again}")
        return validate.Bogus(f"resolver failed validation ({exc}); the data is there with CD")

    # --- results ----------------------------------------------------------------------------

    def _positive(self, rrset, secure, ttl, chain, base, reason) -> KeyAnswer:
        keys = tuple(ipseckey.decode_rrset(rrset))
        ttl = min(ttl, self.max_ttl)
        status = "insecure" if not secure else "secure-key" if keys else "secure-denial"
        if not keys:
            reason += f"; {len(rrset)} IPSECKEY record(s), none usable"
        return KeyAnswer(status, keys, ttl, reason, chain=tuple(chain), **base)

    def _negative(self, msg, secure, ttl, chain, base, reason) -> KeyAnswer:
        what = "NXDOMAIN" if msg.rcode() == dns.rcode.NXDOMAIN else "no IPSECKEY (NODATA)"
        return KeyAnswer("secure-denial" if secure else "insecure", (),
                         min(ttl, self.max_negative_ttl), f"{what}; {reason}",
                         chain=tuple(chain), **base)


def _negative_about(msg: dns.message.Message, name: dns.name.Name) -> bool:
    """Does this answer say something final about `name` (NXDOMAIN, or a SOA above it)?"""
    if msg.rcode() == dns.rcode.NXDOMAIN:
        return True
    return any(r.rdtype == dns.rdatatype.SOA and name.is_subdomain(r.name) for r in msg.authority)


def _replace(answer: KeyAnswer, **kw) -> KeyAnswer:
    return dataclasses.replace(answer, **kw)
