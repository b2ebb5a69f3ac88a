"""The example zones in zones/ load, sign and answer: each documented case holds."""
from pathlib import Path

import pytest

from oe_agent.dns.resolver import KeyResolver
from oe_agent.dns.server import AuthServer

ZONES = Path(__file__).resolve().parents[2] / "zones"


@pytest.fixture
async def served():
    srv = AuthServer.from_directory(ZONES)
    host, port = await srv.start()
    yield srv, KeyResolver([f"{host}@{port}"], "\n".join(srv.ds_records()), "validate")
    await srv.close()


async def test_example_zones_validate(served):
    srv, r = served
    # the classless child is delegated from its parent: only two top zones need anchors
    assert sorted(ln.split()[0] for ln in srv.ds_records()) == [
        "2.0.192.in-addr.arpa.", "8.b.d.0.1.0.0.2.ip6.arpa.", "oe.example."]
    expect = {"a.oe.example": ("secure-key", 4), "b.oe.example": ("secure-key", 3),
              "c.oe.example": ("secure-key", 2), "d.oe.example": ("secure-denial", None),
              "192.0.2.1": ("secure-key", 4), "192.0.2.3": ("secure-key", 2),
              "192.0.2.4": ("secure-denial", None), "192.0.2.100": ("secure-key", 4),
              "2001:db8::1": ("secure-key", 4), "2001:db8::2": ("secure-denial", None)}
    for name, (status, alg) in expect.items():
        a = await r.lookup(name)
        assert a.status == status, (name, a.reason)
        assert [k.algorithm for k in a.keys] == ([alg] if alg else [])
    a = await r.lookup("192.0.2.2")
    assert a.chain == ("2.0-63.2.0.192.in-addr.arpa.",)
    gw = await r.lookup("behind.oe.example")
    assert (gw.keys[0].gateway_type, str(gw.keys[0].gateway)) == (1, "192.0.2.20")
