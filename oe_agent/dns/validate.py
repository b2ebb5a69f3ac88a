"""In-process DNSSEC validation (RFC 4035 §5) from configured trust anchors, with dnspython.

The chain is built top-down on demand: trust anchor (DS or DNSKEY) -> DNSKEY rrset of the
anchor zone -> DS of each child zone (or its proven absence: an insecure delegation) -> DNSKEY
-> the signed answer. Denials are checked with NSEC (RFC 4035 §5.4) or NSEC3 (RFC 5155 §8).
Every failure raises `Bogus` with a reason in words, kept for `oe-agent explain`.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

RRSIG, NSEC, NSEC3, DS, SOA, CNAME, DNSKEY, NS = (
    dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3, dns.rdatatype.DS,
    dns.rdatatype.SOA, dns.rdatatype.CNAME, dns.rdatatype.DNSKEY, dns.rdatatype.NS)

# algorithms dnspython/cryptography validate (RFC 8624 §3.1 MUST/RECOMMENDED, plus RSASHA1)
SUPPORTED_ALGORITHMS = {5, 7, 8, 10, 13, 14, 15, 16}
SUPPORTED_DIGESTS = {1, 2, 4}

Fetch = Callable[[dns.name.Name, int], Awaitable[dns.message.Message]]


class Bogus(Exception):
    """The data should be signed and is not, or the signatures/proofs do not check."""


INSECURE = "insecure"
SECURE = "secure"


# --- trust anchors --------------------------------------------------------------------------

def parse_trust_anchors(source) -> dict[dns.name.Name, list[dns.rdata.Rdata]]:
    """DS or DNSKEY lines ("zone. [ttl] [IN] DS ..."), from a file path, text or a list of lines.
    A directory is read file by file. Lines starting with ';' or '#' are comments."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return {dns.name.from_text(str(k)): list(v) for k, v in source.items()}
    lines: list[str]
    if isinstance(source, (list, tuple)):
        lines = [str(x) for x in source]
    else:
        text = str(source)
        if any(c.isspace() for c in text.strip()):  # records, not a path
            lines = text.splitlines()
        else:
            p = Path(text)
            if p.is_dir():
                lines = [ln for f in sorted(p.iterdir()) if f.is_file()
                         for ln in f.read_text().splitlines()]
            elif p.is_file():
                lines = p.read_text().splitlines()
            else:
                raise ValueError(f"trust anchors: no such file {text}")
    anchors: dict[dns.name.Name, list[dns.rdata.Rdata]] = {}
    for n, line in enumerate(lines, 1):
        line = line.split(";")[0].strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        kind = next((t.upper() for t in tokens[1:4] if t.upper() in ("DS", "DNSKEY")), None)
        if kind is None:
            raise ValueError(f"trust anchor line {n}: want a DS or DNSKEY record: {line!r}")
        rest = tokens[tokens.index(next(t for t in tokens[1:4] if t.upper() == kind), 1) + 1:]
        try:
            name = dns.name.from_text(tokens[0])
            rd = dns.rdata.from_text(dns.rdataclass.IN, kind, " ".join(rest))
        except Exception as exc:
            raise ValueError(f"trust anchor line {n}: {exc}") from None
        anchors.setdefault(name, []).append(rd)
    return anchors


# --- helpers --------------------------------------------------------------------------------

def find(section, name, rdtype, covers=dns.rdatatype.NONE) -> dns.rrset.RRset | None:
    for rrset in section:
        if rrset.name == name and rrset.rdtype == rdtype and rrset.covers == covers:
            return rrset
    return None


def sigs_for(msg_sections, rrset) -> dns.rrset.RRset | None:
    for section in msg_sections:
        s = find(section, rrset.name, RRSIG, rrset.rdtype)
        if s is not None:
            return s
    return None


def _covers(owner: dns.name.Name, nxt: dns.name.Name, name: dns.name.Name) -> bool:
    """owner < name < next in canonical order, the last NSEC wrapping to the apex."""
    if owner < nxt:
        return owner < name < nxt
    return name > owner or name < nxt  # last NSEC of the zone: next is the apex


def _bounded(cache: dict, limit: int = 4096) -> None:
    """Keep a per-zone cache from growing without end: drop the oldest entries."""
    while len(cache) >= limit:
        del cache[next(iter(cache))]


@dataclass
class _ZoneKeys:
    keys: dns.rrset.RRset | None  # None = insecure zone
    expires: float


class Validator:
    """Validates answers fetched with DO+CD through `fetch(name, rdtype)`."""

    def __init__(self, fetch: Fetch, anchors, *, now: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, key_cache_max: int = 3600):
        self.fetch = fetch
        self.anchors = parse_trust_anchors(anchors)
        self.now = now
        self.clock = clock
        self.key_cache_max = key_cache_max
        self._keys: dict[dns.name.Name, _ZoneKeys] = {}
        self._zone_of: dict[dns.name.Name, tuple[dns.name.Name, float]] = {}
        self.last_proof = ""  # which records proved the last denial (for the reason text)
        self.insecure_notes: dict[dns.name.Name, str] = {}  # why a zone counts as unsigned

    def anchor_for(self, name: dns.name.Name) -> dns.name.Name | None:
        best = None
        for a in self.anchors:
            if name.is_subdomain(a) and (best is None or len(a) > len(best)):
                best = a
        return best

    # --- rrsets -----------------------------------------------------------------------------

    async def rrset(self, rrset: dns.rrset.RRset, sigs: dns.rrset.RRset | None,
                    *, ds_side: bool = False, authority=()) -> str:
        """SECURE or INSECURE for one rrset, or raise Bogus. `ds_side`: a DS rrset, whose zone
        is the parent's (RFC 4035 §5.2). `authority`: where a wildcard expansion's proof that
        the name itself does not exist is (RFC 4035 §5.3.4)."""
        where = rrset.name.parent() if ds_side and len(rrset.name) > 1 else rrset.name
        anchor = self.anchor_for(where)
        if anchor is None:
            return INSECURE
        # only a zone at or below the anchor may sign here (a signer above it would be a
        # way around the anchor)
        signers = {s.signer for s in (sigs or [])
                   if where.is_subdomain(s.signer) and s.signer.is_subdomain(anchor)}
        if not signers:
            zone = await self.proof_zone(where)
            if await self.zone_keys(zone) is None:
                return INSECURE
            raise Bogus(f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)}: no RRSIG "
                        f"from zone {zone}, which is signed")
        errors = []
        for signer in sorted(signers, key=len, reverse=True):
            keys = await self.zone_keys(signer)
            if keys is None:
                return INSECURE
            try:
                dns.dnssec.validate(rrset, sigs, {signer: keys}, now=self.now())
            except (dns.dnssec.ValidationFailure, dns.dnssec.UnsupportedAlgorithm) as exc:
                errors.append(_why(sigs, self.now(), exc))
                continue
            labels = len(rrset.name) - 1 - (1 if rrset.name.is_wild() else 0)
            sig_labels = min(sg.labels for sg in sigs if sg.signer == signer)
            if sig_labels < labels:  # synthesized from a wildcard
                self._check_nsec_sigs(signer, keys, authority)
                if not _wildcard_proven(signer, authority, rrset.name, sig_labels):
                    raise Bogus(f"{rrset.name}: wildcard answer without proof that the name "
                                f"itself does not exist")
            return SECURE
        raise Bogus(f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)}: signature does "
                    f"not verify ({'; '.join(errors)})")

    # --- zones and keys ---------------------------------------------------------------------

    async def zone_of(self, name: dns.name.Name) -> dns.name.Name:
        """The apex of the zone that holds `name` (from SOA in the answer or the authority)."""
        hit = self._zone_of.get(name)
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        msg = await self.fetch(name, SOA)
        for section in (msg.answer, msg.authority):
            for rrset in section:
                if rrset.rdtype == SOA and name.is_subdomain(rrset.name):
                    _bounded(self._zone_of)
                    self._zone_of[name] = (rrset.name, self.clock() + min(
                        rrset.ttl, self.key_cache_max))
                    return rrset.name
        raise Bogus(f"cannot find the zone of {name}: no SOA in the answer")

    async def proof_zone(self, where: dns.name.Name) -> dns.name.Name:
        """The zone whose keys must have signed data at `where`; never above the anchor (an
        unsigned SOA could claim any apex: only a validated insecure delegation below the
        anchor can make data there insecure)."""
        zone = await self.zone_of(where)
        anchor = self.anchor_for(where)
        if anchor is not None and not zone.is_subdomain(anchor):
            return anchor
        return zone

    async def zone_keys(self, zone: dns.name.Name) -> dns.rrset.RRset | None:
        """The zone's validated DNSKEY rrset, None if the zone is provably insecure."""
        cached = self._keys.get(zone)
        if cached is not None and cached.expires > self.clock():
            return cached.keys
        anchor = self.anchor_for(zone)
        if anchor is None:
            keys, ttl = None, self.key_cache_max
        elif zone == anchor:
            keys, ttl = await self._anchored_keys(zone, self.anchors[zone])
        else:
            keys, ttl = await self._delegated_keys(zone)
        _bounded(self._keys)
        self._keys[zone] = _ZoneKeys(keys, self.clock() + min(ttl, self.key_cache_max))
        return keys

    async def _dnskeys(self, zone, ds_or_keys) -> tuple[dns.rrset.RRset | None, int]:
        usable = [a for a in ds_or_keys if a.algorithm in SUPPORTED_ALGORITHMS
                  and (a.rdtype == DNSKEY or a.digest_type in SUPPORTED_DIGESTS)]
        if not usable:  # RFC 4035 §5.2 / RFC 6840 §5.2: nothing we can check: insecure
            algs = sorted({a.algorithm for a in ds_or_keys})
            self.insecure_notes[zone] = (f"zone {zone} uses DNSSEC algorithm(s) {algs} this "
                                         f"validator does not support, treated as unsigned")
            return None, self.key_cache_max
        ds_or_keys = usable
        msg = await self.fetch(zone, DNSKEY)
        keys = find(msg.answer, zone, DNSKEY)
        if keys is None:
            raise Bogus(f"zone {zone}: no DNSKEY rrset (rcode {dns.rcode.to_text(msg.rcode())})")
        sigs = find(msg.answer, zone, RRSIG, DNSKEY)
        if sigs is None:
            raise Bogus(f"zone {zone}: DNSKEY rrset without RRSIG")
        trusted = []
        for k in keys:
            if not k.flags & 0x0100 or k.flags & 0x0080:  # not a zone key (RFC 4034 §2.1.1),
                continue                                  # or revoked (RFC 5011 §3)
            for a in ds_or_keys:
                if a.rdtype == DNSKEY and a == k:
                    trusted.append(k)
                elif a.rdtype == DS:
                    try:
                        if dns.dnssec.make_ds(zone, k, a.digest_type) == a:
                            trusted.append(k)
                    except (dns.dnssec.UnsupportedAlgorithm, ValueError):
                        continue
        if not trusted:
            raise Bogus(f"zone {zone}: no DNSKEY matches the "
                        f"{'trust anchor' if zone in self.anchors else 'DS records'}")
        anchor_set = dns.rrset.from_rdata_list(zone, keys.ttl, trusted)
        try:
            dns.dnssec.validate(keys, sigs, {zone: anchor_set}, now=self.now())
        except (dns.dnssec.ValidationFailure, dns.dnssec.UnsupportedAlgorithm) as exc:
            raise Bogus(f"zone {zone}: DNSKEY rrset signature does not verify "
                        f"({_why(sigs, self.now(), exc)})") from None
        return keys, min(keys.ttl, sigs.ttl)

    async def _anchored_keys(self, zone, anchors) -> tuple[dns.rrset.RRset, int]:
        return await self._dnskeys(zone, anchors)

    async def _delegated_keys(self, zone) -> tuple[dns.rrset.RRset | None, int]:
        msg = await self.fetch(zone, DS)
        ds = find(msg.answer, zone, DS)
        if ds is not None:
            if await self.rrset(ds, sigs_for([msg.answer], ds), ds_side=True) == INSECURE:
                return None, ds.ttl
            return await self._dnskeys(zone, list(ds))
        verdict, ttl = await self.denial(msg, zone, DS)
        if verdict == SECURE or verdict == INSECURE:  # no DS: an insecure delegation
            return None, ttl
        raise Bogus(f"zone {zone}: DS lookup gave {verdict}")

    # --- denial of existence ----------------------------------------------------------------

    def _check_nsec_sigs(self, zone, keys, authority) -> list[dns.rrset.RRset]:
        """The NSEC/NSEC3 rrsets of a section, each verified with the zone's keys."""
        nsecs = [r for r in authority if r.rdtype in (NSEC, NSEC3)]
        for r in nsecs:
            sig = sigs_for([authority], r)
            if sig is None:
                raise Bogus(f"{r.name} {dns.rdatatype.to_text(r.rdtype)}: no RRSIG")
            try:
                dns.dnssec.validate(r, sig, {zone: keys}, now=self.now())
            except (dns.dnssec.ValidationFailure, dns.dnssec.UnsupportedAlgorithm) as exc:
                raise Bogus(f"{r.name} {dns.rdatatype.to_text(r.rdtype)}: signature does not "
                            f"verify ({_why(sig, self.now(), exc)})") from None
        return nsecs

    async def denial(self, msg: dns.message.Message, qname: dns.name.Name,
                     qtype: int) -> tuple[str, int]:
        """(SECURE or INSECURE, negative TTL) for a NODATA/NXDOMAIN answer, or raise Bogus."""
        nxdomain = msg.rcode() == dns.rcode.NXDOMAIN
        soa = next((r for r in msg.authority if r.rdtype == SOA and qname.is_subdomain(r.name)),
                   None)
        ds_side = qtype == DS
        where = qname.parent() if ds_side and len(qname) > 1 else qname
        anchor = self.anchor_for(where)
        if soa is None:
            if anchor is None:
                return INSECURE, 0
            if await self.zone_keys(await self.proof_zone(where)) is None:
                return INSECURE, 0
            raise Bogus(f"{qname}: negative answer without SOA")
        ttl = min(soa.ttl, soa[0].minimum)
        zone = soa.name
        if anchor is None:
            return INSECURE, ttl
        if not zone.is_subdomain(anchor):
            raise Bogus(f"{qname}: negative answer claims zone {zone}, above the trust "
                        f"anchor {anchor}")
        if await self.rrset(soa, sigs_for([msg.authority], soa)) == INSECURE:
            return INSECURE, ttl
        keys = await self.zone_keys(zone)
        nsecs = self._check_nsec_sigs(zone, keys, msg.authority)
        what = "NXDOMAIN" if nxdomain else "NODATA"
        tname = dns.rdatatype.to_text(qtype)
        if any(r.rdtype == NSEC3 for r in nsecs):
            ok = _nsec3_proves(zone, [r for r in nsecs if r.rdtype == NSEC3], qname, qtype,
                               nxdomain)
        else:
            ok = _nsec_proves(zone, [r for r in nsecs if r.rdtype == NSEC], qname, qtype,
                              nxdomain)
        if not ok:
            raise Bogus(f"{qname} {tname}: {what} not proven by the NSEC/NSEC3 records")
        self.last_proof = "NSEC3" if any(r.rdtype == NSEC3 for r in nsecs) else "NSEC"
        return SECURE, ttl


def _why(sigs, now: float, exc: Exception) -> str:
    """Say whether the RRSIGs were out of their validity window (RFC 4035 §5.3.1)."""
    if sigs and all(s.expiration < now for s in sigs):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(max(s.expiration for s in sigs)))
        return f"RRSIG expired at {when}"
    if sigs and all(s.inception > now for s in sigs):
        return "RRSIG not yet valid"
    if isinstance(exc, dns.dnssec.UnsupportedAlgorithm):
        return f"unsupported algorithm: {exc}"
    return f"{exc}: the data or the signature was changed"


def _wildcard_proven(zone, authority, qname, sig_labels) -> bool:
    """RFC 4035 §5.3.4 / RFC 5155 §8.8: an NSEC covering qname, or an NSEC3 covering the
    next closer name (one label below the wildcard's parent)."""
    nsecs = [r for r in authority if r.rdtype == NSEC]
    if any(_covers(r.name, r[0].next, qname) for r in nsecs):
        return True
    nsec3s = [r for r in authority if r.rdtype == NSEC3]
    if not nsec3s:
        return False
    next_closer = dns.name.Name(qname.labels[-(sig_labels + 2):])
    return _nsec3_covered(nsec3s, next_closer) is not None


def _nsec3_entries(nsec3s):
    return [(r.name.labels[0].decode().upper(),
             base64.b32hexencode(r[0].next).decode().upper(), r[0]) for r in nsec3s]


def _nsec3_hash(nsec3s, name) -> str:
    p = nsec3s[0][0]
    return dns.dnssec.nsec3_hash(name, p.salt, p.iterations, p.algorithm)


def _nsec3_covered(nsec3s, name):
    hv = _nsec3_hash(nsec3s, name)
    for owner, nxt, rd in _nsec3_entries(nsec3s):
        if (owner < hv < nxt) if owner < nxt else (hv > owner or hv < nxt):
            return rd
    return None


def _nsec_proves(zone, nsecs, qname, qtype, nxdomain) -> bool:
    """RFC 4035 §5.4 (and §3.1.3 for empty non-terminals)."""
    if not nxdomain:
        for r in nsecs:
            if r.name == qname:
                t = _bitmap(r[0])
                if qtype in t or CNAME in t:
                    return False
                delegation = NS in t and SOA not in t
                # "no DS" proves an insecure delegation only at a cut (RFC 4035 §5.2); other
                # types at a cut belong to the child, so the parent's NSEC cannot deny them
                return delegation if qtype == DS else not delegation
        if qtype == DS:
            return False  # an empty non-terminal is no zone cut
        cover = next((r for r in nsecs if _covers(r.name, r[0].next, qname)), None)
        if cover is not None:  # wildcard NODATA (RFC 4035 §3.1.3.4): *.CE exists, lacks qtype
            ce = max((_ancestor(qname, cover.name), _ancestor(qname, cover[0].next)), key=len)
            wild = dns.name.Name((b"*",) + ce.labels)
            for r in nsecs:
                if r.name == wild:
                    t = _bitmap(r[0])
                    return qtype not in t and CNAME not in t
        # empty non-terminal: an NSEC covers qname and its next name lies below qname
        return any(_covers(r.name, r[0].next, qname) and r[0].next.is_subdomain(qname)
                   for r in nsecs)
    cover = next((r for r in nsecs if _covers(r.name, r[0].next, qname)), None)
    if cover is None:
        return False
    ce = max((_ancestor(qname, cover.name), _ancestor(qname, cover[0].next)), key=len)
    if not ce.is_subdomain(zone):
        ce = zone
    wildcard = dns.name.Name((b"*",) + ce.labels)
    return any(_covers(r.name, r[0].next, wildcard) for r in nsecs)


def _ancestor(a: dns.name.Name, b: dns.name.Name) -> dns.name.Name:
    """Longest common ancestor of two names."""
    _rel, _order, nlabels = a.fullcompare(b)
    return dns.name.Name(a.labels[len(a.labels) - nlabels:])


def _bitmap(nsec_rdata) -> set[int]:
    out = set()
    for window, bitmap in nsec_rdata.windows:
        for i, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (0x80 >> bit):
                    out.add(window * 256 + i * 8 + bit)
    return out


def _nsec3_proves(zone, nsec3s, qname, qtype, nxdomain) -> bool:
    """RFC 5155 §8.5-8.7: matching NSEC3 for NODATA, closest-encloser proof for NXDOMAIN."""
    entries = _nsec3_entries(nsec3s)

    def match(name):
        hv = _nsec3_hash(nsec3s, name)
        return next((e for e in entries if e[0] == hv), None)

    def covered(name):
        return _nsec3_covered(nsec3s, name)

    if not nxdomain:
        m = match(qname)
        if m is not None:
            t = _bitmap(m[2])
            if qtype in t or CNAME in t:
                return False
            delegation = NS in t and SOA not in t
            return delegation if qtype == DS else not delegation
        if qtype != DS:
            return False
    # closest encloser proof (§8.3)
    name = qname
    while len(name) > len(zone):
        parent = name.parent()
        if match(parent) is not None:
            nc = covered(name)
            if nc is None:
                return False
            if not nxdomain:  # DS NODATA under opt-out (§8.6): insecure delegation allowed
                return bool(nc.flags & 1)
            return covered(dns.name.Name((b"*",) + parent.labels)) is not None
        name = parent
    return False
