"""The pluto fixture, proven against charon: raw RSA keys both ways.

This kernel has no ESP, so pluto cannot install its Child SA (ENOSYS). What holds here is the
IKE SA; the Child SA outcome is asserted as what each side reports, per role (interop README,
pitfall 11). Under a kernel with ESP (vm tier) the Child SA would install instead.
"""
from __future__ import annotations

from tests.interop.peers.charon import established, host_conn
from tests.interop.peers.pluto import rsa_conn

IKE = "aes128-sha256-modp2048"


def _setup(hosts, charon, pluto, keypair):
    a, b = hosts.pair()
    kb = keypair("rsa", 1)
    p = pluto(a)
    p.add_conn("sw", rsa_conn(left=a.v4, right=b.v4, left_rsasigkey=p.rsasigkey,
                              right_rsasigkey=kb.rfc3110))
    c = charon(b)
    c.load_key(kb)
    c.load_conn("lsw", host_conn(local=b.v4, remote=a.v4, local_key=kb,
                                 remote_pub=p.public_pem, child="lsw-host",
                                 proposals=IKE, esp_proposals="aes128gcm16"))
    return a, b, p, c


def test_pluto_initiates_to_charon(hosts, charon, pluto, keypair):
    a, b, p, c = _setup(hosts, charon, pluto, keypair)
    out = p.initiate("sw")
    p.delete("sw")  # stop pluto's revive loop (its Child SA install failed)
    assert "initiator established IKE SA" in out, out
    # charon verified pluto's AUTH with the RSA key we gave it, and has the IKE SA (pluto
    # drops its side without a Delete when its Child SA install fails here: pitfall 11)
    assert "authentication of '192.0.2.1' with RSA" in c.log_text()
    sas = c.wait_sas(lambda s: established(s, "lsw"), what="IKE SA from pluto")
    assert all(sa["remote-id"] == a.v4 for sa in established(sas, "lsw"))


def test_charon_initiates_to_pluto(hosts, charon, pluto, keypair):
    a, b, p, c = _setup(hosts, charon, pluto, keypair)
    try:
        c.initiate("lsw-host", "lsw", timeout_ms=10000)
        child_ok = True
    except Exception:
        child_ok = False
    sas = c.wait_sas(lambda s: established(s, "lsw"), what="IKE SA with pluto")
    (sa,) = established(sas, "lsw")
    assert sa["remote-id"] == a.v4
    p.wait_log(r"responder established IKE SA")
    if not child_ok:
        # pluto as responder: install fails with ENOSYS, it answers TS_UNACCEPTABLE, IKE SA stays
        assert "TS_UNACCEPTABLE" in c.log_text()
        assert "Function not implemented" in p.log_text()
