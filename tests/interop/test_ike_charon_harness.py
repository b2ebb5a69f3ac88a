"""The harness itself, charon <-> charon: two namespaces, raw public keys, an IKE SA and a
Child SA, traffic through kernel-libipsec's tunnel, rekey and delete over VICI.

It documents how the interop fixtures are used and proves them before the agent is involved.
"""
from __future__ import annotations

import base64
import os
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import needs
from tests.interop.peers.charon import established, hold_half_open, host_conn, sole_child
from tests.interop.peers.vici import decode_message, encode_message
from tests.interop.peers.wire import canary_seen, read_pcap

CANARY = b"oe-agent-canary!"  # 16 bytes: ping -p repeats it through the payload

SUITES = {
    # key kind, IKE proposal, ESP proposal
    "ed25519-x25519-gcm": ("ed25519", "aes256gcm16-prfsha256-x25519", "aes128gcm16"),
    "rsa-modp2048-cbc": ("rsa", "aes128-sha256-modp2048", "aes128-sha256"),
}


def _pair(hosts, charon, keypair, kind, ike, esp, **charon_opts):
    a, b = hosts.pair()
    ka, kb = keypair(kind, 0), keypair(kind, 1)
    ca, cb = charon(a, **charon_opts), charon(b, **charon_opts)
    for c, me, peer, mine, theirs in ((ca, a, b, ka, kb), (cb, b, a, kb, ka)):
        c.load_key(mine)
        c.load_conn("peer", host_conn(local=me.v4, remote=peer.v4, local_key=mine,
                                      remote_pub=theirs.public_pem, child="host",
                                      proposals=ike, esp_proposals=esp))
    return a, b, ca, cb


def _settled(c, what, new_than=None, timeout=15.0):
    """Wait until `c` has one IKE SA with one installed Child SA (fresh SPIs if `new_than`)."""
    def ok(sas):
        got = sole_child(sas, "peer")
        if got is None or new_than is None:
            return got is not None
        sa, child = got
        old_sa, old_child = new_than
        return (child["spi-in"] not in (old_child["spi-in"], old_child["spi-out"])
                and (new_than[0] is None or sa["initiator-spi"] != old_sa["initiator-spi"]))
    return sole_child(c.wait_sas(ok, timeout=timeout, what=what), "peer")


@pytest.mark.parametrize("suite", SUITES)
def test_charon_to_charon_tunnel(hosts, charon, keypair, suite):
    kind, ike, esp = SUITES[suite]
    a, b, ca, cb = _pair(hosts, charon, keypair, kind, ike, esp)

    ca.initiate("host", "peer")

    sa_a, child_a = _settled(ca, "established")
    sa_b, child_b = _settled(cb, "established")
    assert sa_a["initiator-spi"] == sa_b["initiator-spi"]
    assert sa_a["responder-spi"] == sa_b["responder-spi"]
    # each side's inbound SPI is the other's outbound one
    assert child_a["spi-in"] == child_b["spi-out"] and child_a["spi-out"] == child_b["spi-in"]
    assert child_a["mode"] == "TUNNEL"
    # kernel-libipsec always encapsulates (it fakes a NAT), so both sides are on 4500
    assert child_a.get("encap") == "yes"
    assert sa_a["local-port"] == sa_a["remote-port"] == "4500"

    # traffic goes through ipsec0: counted by both Child SAs, ESP-in-UDP on the wire, and the
    # plaintext canary never on the veth
    tcpdump, pcap = hosts.capture(b, "udp", name="tunnel")
    a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "-p", CANARY.hex(), b.v4)
    b.stop(tcpdump)
    _, child_b = _settled(cb, "counted")
    assert int(child_b["packets-in"]) >= 3 and int(child_b["packets-out"]) >= 3
    esp = [p for p in read_pcap(pcap) if p.is_esp_in_udp]
    assert len(esp) >= 6
    # the SPIs on the wire are exactly the pair both sides listed
    assert {p.payload[:4].hex() for p in esp} == {child_b["spi-in"], child_b["spi-out"]}
    assert not canary_seen(pcap, CANARY)


def test_charon_rekey_and_delete(hosts, charon, keypair):
    """Child and IKE rekey, then delete, all over VICI; the peer follows each step."""
    kind, ike, esp = SUITES["ed25519-x25519-gcm"]
    a, b, ca, cb = _pair(hosts, charon, keypair, kind, ike, esp)
    ca.initiate("host", "peer")
    first = _settled(ca, "established")
    _settled(cb, "established")

    ca.rekey(child_id=first[1]["uniqueid"])
    rekeyed_a = _settled(ca, "child rekeyed", new_than=(None, first[1]))
    rekeyed_b = _settled(cb, "child rekeyed", new_than=(None, first[1]))
    assert rekeyed_a[1]["spi-in"] == rekeyed_b[1]["spi-out"]
    assert rekeyed_a[0]["initiator-spi"] == first[0]["initiator-spi"]

    cb.rekey(ike_id=rekeyed_b[0]["uniqueid"])
    new_b = _settled(cb, "IKE rekeyed", new_than=(rekeyed_b[0], {"spi-in": "", "spi-out": ""}))
    new_a = _settled(ca, "IKE rekeyed", new_than=(rekeyed_a[0], {"spi-in": "", "spi-out": ""}))
    assert new_a[0]["initiator-spi"] == new_b[0]["initiator-spi"]
    # the Child SA moves over to the new IKE SA unchanged (RFC 7296 §2.8)
    assert new_a[1]["spi-in"] == rekeyed_a[1]["spi-in"]

    cb.terminate(ike="peer")
    ca.wait_sas(lambda s: not s, what="all SAs gone after the peer's delete")
    assert not cb.list_sas()


def test_charon_cookie_threshold(hosts, charon, keypair):
    """cookie_threshold = 1 and one half-open IKE SA: the responder demands a COOKIE
    (RFC 7296 §2.6) and the initiator retries with it."""
    kind, ike, esp = SUITES["ed25519-x25519-gcm"]
    a, b = hosts.pair()
    c = hosts.add()
    ka, kb, kc = keypair(kind, 0), keypair(kind, 1), keypair(kind, 2)
    ca, cb, cc = charon(a), charon(b, cookie_threshold=1), charon(c)
    cb.load_key(kb)
    cb.load_conn("half", host_conn(local=b.v4, remote=c.v4, local_key=kb, remote_pub=kc.public_pem,
                                   child="half", proposals=ike, esp_proposals=esp))
    for ch, me, peer, mine, theirs in ((ca, a, b, ka, kb), (cb, b, a, kb, ka)):
        ch.load_key(mine)
        ch.load_conn("peer", host_conn(local=me.v4, remote=peer.v4, local_key=mine,
                                       remote_pub=theirs.public_pem, child="host",
                                       proposals=ike, esp_proposals=esp))
    hold_half_open(cc, b, key=kc, target_pub=kb.public_pem, proposals=ike)
    assert "sending COOKIE" not in cb.log_text()

    ca.initiate("host", "peer")

    cb.wait_sas(lambda s: established(s, "peer"), what="established")
    assert "sending COOKIE notify" in cb.log_text()
    assert "received COOKIE notify" in ca.log_text()


def test_vici_codec_round_trip():
    """Our VICI encoder and decoder agree on nested sections, lists and values."""
    names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20)
    values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50)
    tree = st.recursive(
        st.dictionaries(names, st.one_of(values, st.lists(values, max_size=4)), max_size=4),
        lambda children: st.dictionaries(names, st.one_of(values, children), max_size=4),
        max_leaves=12)

    @given(tree)
    def check(msg):
        assert decode_message(encode_message(msg)) == msg

    check()


def test_rfc3110_form_matches_strongswan_pki(tmp_path, keypair):
    """keys.KeyPair.rfc3110 (what pluto's rsasigkey= gets) equals `pki --outform dnskey`."""
    needs(os.access("/usr/bin/pki", os.X_OK), "strongSwan's pki (apt: strongswan-pki)")
    k = keypair("rsa", 0)
    _, pub = k.write(tmp_path, "k")
    conf = tmp_path / "strongswan.conf"
    conf.write_text("pki {\n load = pem pkcs1 pkcs8 openssl pubkey dnskey\n}\n")
    out = subprocess.run(["pki", "--pub", "--type", "pub", "--in", str(pub), "--outform", "dnskey"],
                         capture_output=True, check=True, timeout=30,
                         env=dict(os.environ, STRONGSWAN_CONF=str(conf))).stdout
    assert base64.b64decode(out) == base64.b64decode(k.rfc3110)
