"""One DNS exchange over asyncio: UDP with EDNS0 payload 1232, TCP when the answer is truncated.

Answers are parsed with IPSECKEY read as opaque RDATA, so a malformed IPSECKEY (gateway type
4+, short RDATA) does not make the whole message unparsable; `ipseckey.parse_rdata` decodes
each record and skips the bad ones. DNSSEC checks the same opaque bytes that were signed.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import struct

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

EDNS_PAYLOAD = 1232  # RFC 6891 §6.2.5; the 2020 DNS flag day value, no IP fragmentation
_IPSECKEY = (dns.rdataclass.IN, dns.rdatatype.IPSECKEY)


class DnsTimeout(Exception):
    """No usable answer from a server within the bound."""


@contextlib.contextmanager
def _ipseckey_opaque():
    # dnspython's IPSECKEY class rejects gateway type 4+ and would fail the whole message;
    # within this block (synchronous, no await) it is read as GenericRdata instead.
    table = dns.rdata._rdata_classes
    saved = table.get(_IPSECKEY)
    table[_IPSECKEY] = dns.rdata.GenericRdata
    try:
        yield
    finally:
        if saved is None:
            table.pop(_IPSECKEY, None)
        else:
            table[_IPSECKEY] = saved


def parse_answer(wire: bytes) -> dns.message.Message:
    with _ipseckey_opaque():
        return dns.message.from_wire(wire, ignore_trailing=True)


def parse_server(text) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53@5353', '::1#53', '[::1]:53' or (addr, port) -> (addr, port)."""
    if isinstance(text, tuple):
        addr, port = text
    else:
        text = str(text).strip()
        port = 53
        if text.startswith("["):
            addr, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                if not rest[1:].isdigit():
                    raise ValueError(f"DNS server {text!r}: bad port {rest[1:]!r}")
                port = int(rest[1:])
        else:
            addr = text
            for sep in ("@", "#"):
                if sep in addr:
                    addr, p = addr.split(sep, 1)
                    if not p.isdigit():
                        raise ValueError(f"DNS server {text!r}: bad port {p!r}")
                    port = int(p)
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"DNS server {text!r}: want an IP address (ADDR, ADDR@PORT, "
                         f"[V6]:PORT)") from None
    if not 0 < int(port) < 65536:
        raise ValueError(f"DNS server {text!r}: bad port {port}")
    return str(addr), int(port)


def make_query(qname: dns.name.Name, rdtype, cd: bool) -> dns.message.Message:
    q = dns.message.make_query(qname, rdtype, use_edns=0, want_dnssec=True,
                               payload=EDNS_PAYLOAD)
    q.id = random.SystemRandom().randrange(65536)
    if cd:
        q.flags |= dns.flags.CD
    return q


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, query: dns.message.Message):
        self.query = query
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        if self.done.done():
            return
        try:
            msg = parse_answer(data)
        except Exception:
            return  # junk or a spoof attempt: keep waiting for the real answer
        if self.query.is_response(msg):
            self.done.set_result(msg)

    def error_received(self, exc):
        if not self.done.done():
            self.done.set_exception(exc)


async def _udp(query, server: tuple[str, int], timeout: float) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(query), remote_addr=server)
    try:
        transport.sendto(query.to_wire())
        return await asyncio.wait_for(proto.done, timeout)
    finally:
        transport.close()


async def _tcp(query, server: tuple[str, int], timeout: float) -> dns.message.Message:
    async def run():
        reader, writer = await asyncio.open_connection(*server)
        try:
            wire = query.to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                msg = parse_answer(await reader.readexactly(size))
                if query.is_response(msg):
                    return msg
        finally:
            writer.close()
    return await asyncio.wait_for(run(), timeout)


async def exchange(query: dns.message.Message, server: tuple[str, int],
                   timeout: float) -> dns.message.Message:
    """UDP, then TCP if TC is set (RFC 7766 §5); DnsTimeout on silence or a network error."""
    try:
        msg = await _udp(query, server, timeout)
        if msg.flags & dns.flags.TC:
            msg = await _tcp(query, server, timeout)
        return msg
    except (asyncio.TimeoutError, OSError, EOFError, asyncio.IncompleteReadError,
            dns.exception.DNSException) as exc:
        raise DnsTimeout(f"{server[0]}@{server[1]}: {type(exc).__name__} {exc}".strip()) from None
