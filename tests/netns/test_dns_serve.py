"""`oe-agent serve-zones` in one namespace, `oe-agent lookup` from another, over the test LAN."""
import json
import sys
import time
from pathlib import Path

from tests.interop import dnsfix

ZONES = Path(__file__).resolve().parents[2] / "zones"


def test_serve_zones_and_lookup_between_namespaces(hosts, tmp_path):
    server, client = hosts.add(), hosts.add()
    anchors = tmp_path / "anchors.ds"
    server.popen(sys.executable, "-m", "oe_agent", "serve-zones", "--zones", str(ZONES),
                 "--listen", server.v4, "--listen", server.v6, "--port", "53",
                 "--anchors-out", str(anchors), log="serve.log")
    deadline = time.monotonic() + 20
    while not anchors.exists() or not anchors.read_text().strip():
        assert time.monotonic() < deadline, (server.workdir / "serve.log").read_text()
        time.sleep(0.1)
    dnsfix.wait_port(server, 53, "tcp")
    out = client.run(sys.executable, "-m", "oe_agent", "lookup", "--json",
                     "--resolver", server.v4, "--resolver", server.v6, "--anchors", str(anchors),
                     "192.0.2.1", "a.oe.example", "d.oe.example", "2001:db8::1",
                     check=False)
    assert out.returncode == 0, out.stderr
    got = {a["query"]: a for a in json.loads(out.stdout)}
    assert got["192.0.2.1"]["status"] == "secure-key"
    assert got["192.0.2.1"]["chain"] == ["1.0-63.2.0.192.in-addr.arpa."]
    assert got["a.oe.example"]["keys"][0]["algorithm"] == 4
    assert got["d.oe.example"]["status"] == "secure-denial"
    assert got["2001:db8::1"]["status"] == "secure-key"
    words = client.run(sys.executable, "-m", "oe_agent", "lookup", "--resolver",
                       f"[{server.v6}]:53", "--anchors", str(anchors), "a.oe.example").stdout
    assert "secure-key: DNSSEC-validated key(s) found" in words
