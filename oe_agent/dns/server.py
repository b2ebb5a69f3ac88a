"""A small embedded authoritative DNS server (UDP + TCP, asyncio) for the demo and fast tests.

It serves every `*.zone` file of a directory, signs each zone (NSEC, one ECDSA P-256 CSK per
zone, RFC 6781 §3.1.4.1 "single-type signing") with keys it makes at start, puts NS + DS for
hosted child zones into their hosted parents, answers DO queries with RRSIGs and denial proofs
(RFC 4035 §3.1), and sets TC when a UDP answer exceeds the client's payload (RFC 6891 §7).
Its trust anchors are the DS records of the top-most zones. Wildcards are synthesized
(RFC 4592) with their NSEC proofs.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import datetime
import logging
import struct
from pathlib import Path

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger("oe_agent.dns.server")

RRSIG, NSEC, DS, NS, SOA, CNAME, DNSKEY = (dns.rdatatype.RRSIG, dns.rdatatype.NSEC,
                                           dns.rdatatype.DS, dns.rdatatype.NS,
                                           dns.rdatatype.SOA, dns.rdatatype.CNAME,
                                           dns.rdatatype.DNSKEY)
UDP_PAYLOAD = 1232  # what we accept from clients at most (DNS flag day 2020)


def load_zone_dir(path: Path | str) -> dict[dns.name.Name, dns.zone.Zone]:
    """Every `<origin>.zone` file of a directory (origin from the file name)."""
    zones = {}
    files = sorted(Path(path).glob("*.zone"))
    if not files:
        raise ValueError(f"no *.zone files in {path}")
    for f in files:
        origin = dns.name.from_text(f.name[:-len(".zone")])
        try:
            zones[origin] = dns.zone.from_file(str(f), origin=origin, relativize=False)
        except Exception as exc:
            raise ValueError(f"{f}: {exc}") from None
    return zones


class AuthServer:
    """Authoritative answers for a set of zones; see the module docstring.

    `unsigned`: zones served without DNSSEC (an insecure delegation: NS but no DS in the parent).
    `expired`: zones signed with RRSIGs that expired yesterday (a bogus case for tests).
    `queries` counts every query received, by (qname, qtype) text.
    """

    def __init__(self, zones: dict[dns.name.Name, dns.zone.Zone], *, unsigned=(), expired=(),
                 lifetime: int = 14 * 86400):
        self.zones = dict(zones)
        self.unsigned = {dns.name.from_text(str(z)) for z in unsigned}
        self.expired = {dns.name.from_text(str(z)) for z in expired}
        self.keys: dict[dns.name.Name, tuple] = {}
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.tcp_queries = 0
        self._transports: list = []
        self._servers: list[asyncio.base_events.Server] = []
        self._nsec_index: dict[dns.name.Name, list[dns.name.Name]] = {}
        self._sign_all(lifetime)

    @classmethod
    def from_directory(cls, path, **kw) -> "AuthServer":
        return cls(load_zone_dir(path), **kw)

    # --- zone tree and signing --------------------------------------------------------------

    def parent_of(self, origin: dns.name.Name) -> dns.name.Name | None:
        best = None
        for z in self.zones:
            if z != origin and origin.is_subdomain(z) and (best is None or len(z) > len(best)):
                best = z
        return best

    def _sign_all(self, lifetime: int) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        for origin in sorted(self.zones, key=len, reverse=True):  # children before parents
            zone = self.zones[origin]
            parent = self.parent_of(origin)
            if parent is not None:  # delegate the child from its hosted parent
                with self.zones[parent].writer() as txn:
                    txn.add(origin, zone.get_rdataset(origin, NS))
            if origin in self.unsigned:
                continue
            key = ec.generate_private_key(ec.SECP256R1())
            dnskey = dns.dnssec.make_dnskey(key.public_key(),
                                            dns.dnssec.Algorithm.ECDSAP256SHA256, flags=257)
            day = datetime.timedelta(days=1)
            if origin in self.expired:
                inception, expiration = now - 3 * day, now - day
            else:
                inception = now - datetime.timedelta(hours=1)  # tolerate clock skew
                expiration = now + datetime.timedelta(seconds=lifetime)
            soa_ttl = zone.get_rdataset(origin, SOA).ttl
            dns.dnssec.sign_zone(zone, keys=[(key, dnskey)], dnskey_ttl=soa_ttl,
                                 inception=inception, expiration=expiration)
            self.keys[origin] = (key, dnskey)
            if parent is not None:
                ds = dns.dnssec.make_ds(origin, dnskey, "SHA256")
                with self.zones[parent].writer() as txn:
                    txn.add(origin, dns.rdataset.from_rdata(soa_ttl, ds))
        for origin in self.zones:
            self._index(origin)

    def _index(self, origin: dns.name.Name) -> None:
        zone = self.zones[origin]
        self._nsec_index[origin] = sorted(n for n, node in zone.nodes.items()
                                          if node.get_rdataset(dns.rdataclass.IN, NSEC))

    def replace(self, owner, rdtype, ttl: int, *texts: str) -> None:
        """Replace an rrset's data but keep its old RRSIG: a tampered record (tests)."""
        owner = dns.name.from_text(str(owner))
        origin = self.zone_for(owner)
        rds = dns.rdataset.from_text_list(dns.rdataclass.IN, rdtype, ttl, list(texts),
                                          origin=origin)
        with self.zones[origin].writer() as txn:
            txn.replace(owner, rds)

    def ds_records(self) -> list[str]:
        """Trust anchors: DS lines of every signed zone without a hosted signed parent."""
        out = []
        for origin, (_key, dnskey) in sorted(self.keys.items()):
            parent = self.parent_of(origin)
            if parent is None or parent in self.unsigned:
                ds = dns.dnssec.make_ds(origin, dnskey, "SHA256")
                ttl = self.zones[origin].get_rdataset(origin, SOA).ttl
                out.append(f"{origin} {ttl} IN DS {ds}")
        return out

    def zone_text(self, origin) -> str:
        """The (signed) zone as a master file, e.g. to load a pre-signed zone into knot."""
        origin = dns.name.from_text(str(origin))
        return self.zones[origin].to_text(relativize=False)

    # --- answering --------------------------------------------------------------------------

    def zone_for(self, qname: dns.name.Name, rdtype=None) -> dns.name.Name | None:
        best = None
        for z in self.zones:
            if qname.is_subdomain(z) and (best is None or len(z) > len(best)):
                best = z
        if best is not None and rdtype == DS and qname == best:  # DS lives in the parent
            parent = self.parent_of(best)
            if parent is not None:
                return parent
        return best

    def _rrsets(self, zone, name, rdtype, do: bool) -> list[dns.rrset.RRset]:
        node = zone.get_node(name)
        if node is None:
            return []
        out = []
        rds = node.get_rdataset(dns.rdataclass.IN, rdtype)
        if rds is not None:
            out.append(dns.rrset.from_rdata_list(name, rds.ttl, list(rds)))
            if do:
                sigs = node.get_rdataset(dns.rdataclass.IN, RRSIG, rdtype)
                if sigs is not None:
                    out.append(dns.rrset.from_rdata_list(name, sigs.ttl, list(sigs)))
        return out

    def _covering_nsec(self, origin, name) -> dns.name.Name | None:
        names = self._nsec_index.get(origin) or []
        if not names:
            return None
        i = bisect.bisect_right(names, name) - 1
        return names[i] if i >= 0 else names[-1]

    def _delegation(self, zone, origin, qname) -> dns.name.Name | None:
        """The highest non-apex name between the apex and qname with NS (a zone cut)."""
        if not qname.is_subdomain(origin):
            return None
        labels = qname.relativize(origin).labels
        for i in range(len(labels) - 1, -1, -1):
            n = dns.name.Name(labels[i:]).derelativize(origin)
            node = zone.get_node(n)
            if node is not None and node.get_rdataset(dns.rdataclass.IN, NS) is not None:
                return n
        return None

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(query, our_payload=UDP_PAYLOAD)
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            resp.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY
                           else dns.rcode.FORMERR)
            return resp
        q = query.question[0]
        qname, qtype = q.name, q.rdtype
        do = query.edns >= 0 and bool(query.ednsflags & dns.flags.DO)
        self.queries[(qname.to_text(), dns.rdatatype.to_text(qtype))] += 1
        origin = self.zone_for(qname, qtype)
        if origin is None:
            resp.set_rcode(dns.rcode.REFUSED)
            return resp
        zone = self.zones[origin]
        cut = self._delegation(zone, origin, qname)
        if cut is not None and not (cut == qname and qtype == DS):
            resp.flags &= ~dns.flags.AA  # referral (RFC 1034 §4.3.2)
            resp.authority += self._rrsets(zone, cut, NS, False)
            ds = self._rrsets(zone, cut, DS, do)
            resp.authority += ds or (self._rrsets(zone, cut, NSEC, do) if do else [])
            return resp
        resp.flags |= dns.flags.AA
        name = qname
        for _ in range(8):  # follow CNAMEs inside this zone, like knot and BIND
            node = zone.get_node(name)
            if node is None:
                if self._wildcard(resp, zone, origin, name, qtype, do):
                    return resp
                break
            found = self._rrsets(zone, name, qtype, do)
            if found:
                resp.answer += found
                return resp
            cname = self._rrsets(zone, name, CNAME, do) if qtype != CNAME else []
            if not cname:
                break
            resp.answer += cname
            name = cname[0][0].target
            if self.zone_for(name) != origin or self._delegation(zone, origin, name):
                return resp  # the target is in another zone: the resolver follows it
        else:
            return resp
        self._negative(resp, zone, origin, name, do)
        return resp

    def _exists(self, zone, name) -> bool:
        """A node, or an empty non-terminal (a name with descendants)."""
        return zone.get_node(name) is not None or any(n.is_subdomain(name) for n in zone.nodes)

    def _closest_encloser(self, zone, origin, name) -> dns.name.Name:
        ce = name.parent()
        while ce != origin and not self._exists(zone, ce):
            ce = ce.parent()
        return ce

    def _wildcard(self, resp, zone, origin, name, qtype, do) -> bool:
        """RFC 4592 synthesis from *.<closest encloser>, with the NSEC proving that `name`
        itself does not exist (RFC 4035 §3.1.3.3). False if no wildcard applies."""
        if self._exists(zone, name):
            return False
        wild = dns.name.Name((b"*",) + self._closest_encloser(zone, origin, name).labels)
        node = zone.get_node(wild)
        if node is None:
            return False
        rds = node.get_rdataset(dns.rdataclass.IN, qtype)
        if rds is None:  # wildcard NODATA: SOA, NSEC covering name, NSEC at the wildcard
            resp.authority += self._rrsets(zone, origin, SOA, do)
            if do:
                cover = self._covering_nsec(origin, name)
                for owner in dict.fromkeys(o for o in (cover, wild) if o is not None):
                    resp.authority += self._rrsets(zone, owner, NSEC, True)
            return True
        resp.answer.append(dns.rrset.from_rdata_list(name, rds.ttl, list(rds)))
        if do:
            sigs = node.get_rdataset(dns.rdataclass.IN, RRSIG, qtype)
            if sigs is not None:  # the RRSIG labels field tells resolvers it was a wildcard
                resp.answer.append(dns.rrset.from_rdata_list(name, sigs.ttl, list(sigs)))
            cover = self._covering_nsec(origin, name)
            if cover is not None:
                resp.authority += self._rrsets(zone, cover, NSEC, True)
        return True

    def _negative(self, resp, zone, origin, name, do) -> None:
        """NODATA or NXDOMAIN with SOA and, under DO, the NSEC proof (RFC 4035 §3.1.3)."""
        exists = self._exists(zone, name)  # an empty non-terminal gives NODATA
        if not exists:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        soa = self._rrsets(zone, origin, SOA, do)
        if soa:  # negative TTL = min(SOA TTL, SOA minimum), RFC 2308 §5 / RFC 9077
            ttl = min(soa[0].ttl, soa[0][0].minimum)
            soa[0] = dns.rrset.from_rdata_list(origin, ttl, list(soa[0]))
        resp.authority += soa
        if not do:
            return
        owners = []
        if zone.get_node(name) is not None:
            owners.append(name)
        else:
            owners.append(self._covering_nsec(origin, name))
            if not exists:  # and no wildcard at the closest encloser
                ce = self._closest_encloser(zone, origin, name)
                owners.append(self._covering_nsec(origin, dns.name.Name((b"*",) + ce.labels)))
        for owner in dict.fromkeys(o for o in owners if o is not None):
            resp.authority += self._rrsets(zone, owner, NSEC, True)

    # --- transports ------------------------------------------------------------------------

    def handle_wire(self, wire: bytes, udp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:
            log.info("dropping unparsable query: %s", exc)
            return None
        resp = self.answer(query)
        if not udp:
            self.tcp_queries += 1
            return resp.to_wire(max_size=65535)
        limit = 512 if query.edns < 0 else max(512, min(query.payload, UDP_PAYLOAD))
        try:
            return resp.to_wire(max_size=limit)
        except dns.exception.TooBig:  # RFC 2181 §9: say so, the client retries over TCP
            resp.answer, resp.authority, resp.additional = [], [], []
            resp.flags |= dns.flags.TC
            return resp.to_wire(max_size=limit)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on UDP and TCP; port 0 picks a free port (the same for both)."""
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                out = server.handle_wire(data, True)
                if out is not None:
                    self.transport.sendto(out, addr)

        for _ in range(20):  # a free port that is free for both UDP and TCP
            transport, _p = await loop.create_datagram_endpoint(Udp, local_addr=(host, port))
            bound = transport.get_extra_info("sockname")[1]
            try:
                tcp = await asyncio.start_server(self._tcp_client, host, bound)
            except OSError:
                transport.close()
                if port:
                    raise
                continue
            self._transports.append(transport)
            self._servers.append(tcp)
            return host, bound
        raise OSError("no free port for UDP and TCP")

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while True:
                head = await reader.readexactly(2)
                wire = await reader.readexactly(struct.unpack("!H", head)[0])
                out = self.handle_wire(wire, False)
                if out is None:
                    break
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for t in self._transports:
            t.close()
        for s in self._servers:
            s.close()
            await s.wait_closed()
        self._transports.clear()
        self._servers.clear()


async def serve(zone_dir: str, listen: list[str], port: int, anchors_out: str | None,
                ready=print) -> None:
    """Run until cancelled: the `serve-zones` verb."""
    server = AuthServer.from_directory(zone_dir)
    for addr in listen:
        await server.start(addr, port)
    ds = "\n".join(server.ds_records()) + "\n"
    if anchors_out:  # atomically: whoever waits for the file must never read half of it
        tmp = Path(f"{anchors_out}.tmp")
        tmp.write_text(ds)
        tmp.replace(anchors_out)
    ready(f"serving {', '.join(str(z) for z in sorted(server.zones))} on "
          f"{', '.join(listen)} port {port}; trust anchors:\n{ds}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


def register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zones", required=True, help="directory of <origin>.zone files")
    p.add_argument("--listen", action="append", default=None,
                   help="address to listen on (repeatable; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--anchors-out", help="write the DS trust anchors to this file")
