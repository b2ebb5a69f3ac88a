"""oe-agent's IKE engine against charon beyond the happy path: negotiation failures with the
reasons the agent maps to shunts, INVALID_KE_PAYLOAD retry, liveness both ways, Child SA
rekey with PFS, retransmission after a lost response, IPv6, other signature and cipher
choices (RFC 7296 sections named per test)."""
from __future__ import annotations

import re

import pytest

from tests.interop.peers.charon import ViciError, established, host_conn
from tests.interop.peers.engine import EnginePeer
from tests.interop.test_ike_charon import SUITES, assert_agree, settled, setup_pair, spi_hex


def _pair(hosts, charon, keypair, *, kind="ed25519", ike, esp, charon_esp=None, charon_ike=None,
          engine_peer_key=None, charon_peer_key=None, child_extra=None, conn_extra=None,
          engine_extra=None, v6=False, charon_opts=None):
    """Like test_ike_charon.setup_pair, with every knob: proposals per side, wrong keys."""
    e_host, c_host = hosts.pair()
    ke, kc = keypair(kind, 0), keypair(kind, 1)
    e_addr, c_addr = (e_host.v6, c_host.v6) if v6 else (e_host.v4, c_host.v4)
    c = charon(c_host, **(charon_opts or {}))
    c.load_key(kc)
    c.load_conn("oe", host_conn(local=c_addr, remote=e_addr, local_key=kc,
                                remote_pub=(charon_peer_key or ke).public_pem, child="oe-host",
                                proposals=charon_ike or ike, esp_proposals=charon_esp or esp,
                                child_extra=child_extra or {}, **(conn_extra or {})))
    engine = EnginePeer.static(e_host, c_host, ke, (engine_peer_key or kc).public_pem,
                               ike_proposal=ike, esp_proposal=esp, extra=engine_extra or {})
    if v6:
        engine.config.local, engine.config.remote = e_addr, c_addr
    return engine, c


def test_invalid_ke_payload_retry(hosts, charon, keypair):
    """The engine guesses X25519, charon wants MODP-2048: INVALID_KE_PAYLOAD, then a second
    IKE_SA_INIT with the group charon asked for (§1.2, §2.7)."""
    engine, c = _pair(hosts, charon, keypair, ike="aes128-sha256-x25519-modp2048",
                      charon_ike="aes128-sha256-modp2048", esp="aes128-sha256")
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    sa, _ = settled(c, "established after the KE retry")
    assert sa["dh-group"] == "MODP_2048"
    log = c.log_text()
    assert "requesting MODP_2048" in log and "N(INVAL_KE)" in log


def test_cookie_from_engine(hosts, charon, keypair):
    """The engine as responder demands a COOKIE (threshold 0: always, RFC 7296 §2.6); charon
    repeats its IKE_SA_INIT with it and the SAs come up."""
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      esp="aes128gcm16", engine_extra={"cookie_threshold": 0})
    engine.start()
    c.initiate("oe-host", "oe")
    engine.wait_event("ChildSaEstablished")
    settled(c, "established after the engine's cookie")
    log = c.log_text()
    assert "received COOKIE notify" in log
    assert "generating IKE_SA_INIT request 0 [ N(COOKIE) " in log


def test_no_proposal_chosen_from_charon(hosts, charon, keypair):
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      charon_ike="aes128-sha256-modp2048", esp="aes128gcm16")
    engine.start()
    engine.send("initiate")
    failed = engine.wait_event("NegotiationFailed")
    assert failed["reason"] == "no-proposal"
    assert "N(NO_PROP)" in c.log_text()
    assert not established(c.list_sas())


def test_no_proposal_chosen_by_engine(hosts, charon, keypair):
    """charon offers only what the engine does not accept: the engine answers
    NO_PROPOSAL_CHOSEN and charon gives up."""
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      charon_ike="aes128-sha256-modp2048", esp="aes128gcm16")
    engine.start()
    with pytest.raises(ViciError):
        c.initiate("oe-host", "oe", timeout_ms=10000)
    assert "received NO_PROPOSAL_CHOSEN notify" in c.log_text()
    assert not established(c.list_sas())


def test_auth_failed_engine_has_wrong_charon_key(hosts, charon, keypair):
    """The engine cannot verify charon's AUTH (§2.15): auth-failed, no SA left on charon."""
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      esp="aes128gcm16", engine_peer_key=keypair("ed25519", 7))
    engine.start()
    engine.send("initiate")
    failed = engine.wait_event("NegotiationFailed")
    assert failed["reason"] == "auth-failed"
    assert not engine.events_named("IkeSaEstablished")
    c.wait_sas(lambda s: not established(s), what="no established IKE SA on charon")


def test_auth_failed_charon_has_wrong_engine_key(hosts, charon, keypair):
    """charon cannot verify the engine's AUTH and answers AUTHENTICATION_FAILED."""
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      esp="aes128gcm16", charon_peer_key=keypair("ed25519", 7))
    engine.start()
    engine.send("initiate")
    failed = engine.wait_event("NegotiationFailed")
    assert failed["reason"] == "auth-failed"
    assert "N(AUTH_FAILED)" in c.log_text()
    assert not established(c.list_sas())


def test_liveness_check_from_charon(hosts, charon, keypair):
    """charon's DPD (an empty INFORMATIONAL, §1.4) is answered by the engine."""
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      esp="aes128gcm16", conn_extra={"dpd_delay": "1s"})
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    settled(c, "established")
    c.wait_sas(lambda s: "parsed INFORMATIONAL response 2 [ ]" in c.log_text(), timeout=15,
               what="charon's DPD answered")
    assert "sending DPD request" in c.log_text()
    assert established(c.list_sas(), "oe")


def test_liveness_check_from_engine(hosts, charon, keypair):
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      esp="aes128gcm16", engine_extra={"ike_config": {"liveness_interval": 1.0}})
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    engine.wait_event("PeerAlive", timeout=15)
    assert "parsed INFORMATIONAL request 2 [ ]" in c.log_text()
    assert established(c.list_sas(), "oe")


@pytest.mark.parametrize("from_engine", [True, False], ids=["engine", "charon"])
def test_child_rekey_with_pfs(hosts, charon, keypair, from_engine):
    """A DH group in the ESP proposal: the rekeying CREATE_CHILD_SA carries KE (§1.3.3) and the
    new Child SA's keys include g^ir; both sides land on the same SPIs."""
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      esp="aes128gcm16-x25519")
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    sa, child = settled(c, "established")
    if from_engine:
        engine.send("rekey_child")
    else:
        c.rekey(child_id=child["uniqueid"])
    ev = engine.wait_event("ChildSaRekeyed")
    _, child2 = settled(c, "rekeyed with PFS", lambda s, ch: ch["spi-in"] != child["spi-in"])
    assert child2.get("dh-group") == "CURVE_25519"
    assert spi_hex(ev["new"]["spi_in"]) == child2["spi-out"]
    assert spi_hex(ev["new"]["spi_out"]) == child2["spi-in"]
    assert re.search(r"CREATE_CHILD_SA request \d+ \[[^\]]*N\(REKEY_SA\)[^\]]* KE ", c.log_text())


def test_retransmission_after_lost_response(hosts, charon, keypair):
    """nftables drops charon's first IKE_SA_INIT response: the engine retransmits the same
    request (§2.1) and charon, seeing a retransmission, answers again."""
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      esp="aes128gcm16", engine_extra={"ike_config": {"retransmit_timeout": 0.5}})
    engine.host.run("nft", "-f", "-", input="table inet loss {\n chain in {\n"
                    "  type filter hook input priority 0; policy accept;\n"
                    "  udp sport 500 numgen inc mod 1000 0 drop\n }\n}\n")
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    settled(c, "established after a retransmission")
    assert "received retransmit of request with ID 0, retransmitting response" in c.log_text()


@pytest.mark.parametrize("engine_initiates", [True, False], ids=["engine-init", "charon-init"])
def test_ipv6(hosts, charon, keypair, engine_initiates):
    engine, c = _pair(hosts, charon, keypair, ike="aes256gcm16-prfsha256-x25519",
                      esp="aes128gcm16", v6=True)
    engine.start()
    if engine_initiates:
        engine.send("initiate")
    else:
        c.initiate("oe-host", "oe")
    ike_ev = engine.wait_event("IkeSaEstablished")
    child_ev = engine.wait_event("ChildSaEstablished")
    sa, child = settled(c, "established over IPv6")
    assert sa["remote-host"] == engine.config.local
    assert_agree(sa, child, ike_ev, child_ev, "x25519-gcm")


@pytest.mark.parametrize("padding", ["pss", "pkcs1"])
def test_rsa_signature_paddings(hosts, charon, keypair, padding):
    """RFC 7427 RSA signatures with either padding are accepted by charon; charon's own
    (PKCS#1 v1.5 SHA2-256) is accepted by the engine."""
    engine, c = _pair(hosts, charon, keypair, kind="rsa", ike="aes128-sha256-modp2048",
                      esp="aes128-sha256", engine_extra={"credential": {"rsa_padding": padding}})
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    settled(c, "established")
    want = "RSA_EMSA_PSS" if padding == "pss" else "RSA_EMSA_PKCS1"
    assert f"authentication of '{engine.config.local}' with {want}" in c.log_text()


def test_chacha20_poly1305(hosts, charon, keypair):
    """IKE with ChaCha20-Poly1305 (RFC 7634) and the same for ESP."""
    engine, c = _pair(hosts, charon, keypair, ike="chacha20poly1305-prfsha256-x25519",
                      esp="chacha20poly1305")
    engine.start()
    engine.send("initiate")
    child_ev = engine.wait_event(("ChildSaEstablished", "NegotiationFailed"))
    assert child_ev["event"] == "ChildSaEstablished", child_ev
    sa, child = settled(c, "established")
    assert sa["encr-alg"] == "CHACHA20_POLY1305"
    assert child["encr-alg"] == "CHACHA20_POLY1305"
    assert child_ev["params"]["alg"]["encr"] == "chacha20-poly1305"


def test_ecdsa_p256(hosts, charon, keypair):
    """ECDSA P-256 raw keys (RFC 7427 with ecdsa-with-SHA256) both ways."""
    engine, c = _pair(hosts, charon, keypair, kind="ecdsa-p256",
                      ike="aes256gcm16-prfsha256-ecp256", esp="aes128gcm16")
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    sa, _ = settled(c, "established")
    assert sa["dh-group"] == "ECP_256"
    assert f"authentication of '{engine.config.local}' with ECDSA" in c.log_text()
