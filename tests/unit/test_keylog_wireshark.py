"""The key log is what Wireshark reads: tshark, given our KeyLogWriter's lines as its
ikev2_decryption_table and esp_sa tables, decrypts IKE (AES-GCM, AES-CBC+HMAC) and ESP
(ESP-in-UDP AES-GCM tunnel, raw ESP over IPv6 AES-CBC+HMAC transport) that our codec made."""
from __future__ import annotations

import ipaddress
import os
import random
import struct
import subprocess

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from oe_agent.ike import payloads as pl
from oe_agent.ike.const import EncrId, ExchangeType, IntegId
from oe_agent.ike.crypto import IkeCipher, IkeKeys
from oe_agent.ike.keylog import KeyLogWriter
from oe_agent.ike.message import Message, add_non_esp_marker
from oe_agent.model import ChildSaParams, EspAlgorithm, Mode
from tests.conftest import have, needs
from tests.unit.test_decrypt import _esp_cbc, _ipv4_udp, _ipv6, _write_pcap

V6_A, V6_B = "20010db8000000000000000000000001", "20010db8000000000000000000000002"


def _ike_sa(rng, cipher: IkeCipher) -> tuple[bytes, bytes, IkeKeys]:
    e, a = cipher.encr_key_len, cipher.integ_key_len
    return rng(8), rng(8), IkeKeys(rng(32), rng(a), rng(a), rng(e), rng(e), rng(32), rng(32))


def test_tshark_decrypts_with_our_key_log(tmp_path):
    needs(have("tshark"), "tshark (Debian package tshark, in tools/install-deps.sh)")
    rng = random.Random(7).randbytes
    log = KeyLogWriter(tmp_path / "keys.log")
    frames = []

    chacha = IkeCipher.from_ids(EncrId.CHACHA20_POLY1305, None)  # no Wireshark name: a comment
    log.log_ike_sa(*_ike_sa(rng, chacha)[:2], chacha, _ike_sa(rng, chacha)[2])

    cbc = IkeCipher.from_ids(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128)
    spi_i, spi_r, k = _ike_sa(rng, cbc)
    log.log_ike_sa(spi_i, spi_r, cbc, k)
    req = Message(spi_i, spi_r, ExchangeType.IKE_AUTH, True, False, 1,
                  (pl.IdInitiator.from_fqdn("initiator.example"),))
    frames.append(_ipv4_udp(4500, 4500, add_non_esp_marker(req.encrypt(cbc, k.sk_ei, k.sk_ai, rng))))

    gcm = IkeCipher.from_ids(EncrId.AES_GCM_16, 128)
    spi_i, spi_r, k = _ike_sa(rng, gcm)
    log.log_ike_sa(spi_i, spi_r, gcm, k)
    resp = Message(spi_i, spi_r, ExchangeType.IKE_AUTH, False, True, 1,
                   (pl.IdResponder.from_fqdn("responder.example"),))
    frames.append(_ipv4_udp(4500, 4500, add_non_esp_marker(resp.encrypt(gcm, k.sk_er, k.sk_ar, rng))))

    # ESP-in-UDP, AES-GCM-16-256, tunnel mode: an inner IPv4/UDP packet
    v4 = ChildSaParams(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2"),
                       spi_in=0xC1000001, spi_out=0xC2000002, mode=Mode.TUNNEL,
                       alg=EspAlgorithm("aes-gcm-16", 256), encr_key_in=rng(36),
                       encr_key_out=rng(36))
    log.log_child_sa(v4)
    inner = _ipv4_udp(40000, 9, b"gcm-tunnel-canary")
    pad = -(len(inner) + 2) % 4  # RFC 4303 §2.4: trailer ends on a 4-byte boundary
    plain = inner + bytes(range(1, pad + 1)) + bytes([pad, 4])
    head, iv = struct.pack("!II", v4.spi_out, 1), rng(8)
    key = v4.encr_key_out
    frames.append(_ipv4_udp(4500, 4500, head + iv + AESGCM(key[:32]).encrypt(key[32:] + iv, plain, head)))

    # raw ESP over IPv6, AES-CBC-128 + HMAC-SHA2-256-128, transport mode, UDP inside
    v6 = ChildSaParams(ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2"),
                       spi_in=0xC3000003, spi_out=0xC4000004, mode=Mode.TRANSPORT,
                       alg=EspAlgorithm("aes-cbc", 128, "hmac-sha2-256-128"),
                       encr_key_in=rng(16), encr_key_out=rng(16), integ_key_in=rng(32),
                       integ_key_out=rng(32))
    log.log_child_sa(v6)
    udp = struct.pack("!HHHH", 40001, 9, 8 + 17, 0) + b"cbc-transport-can"
    frames.append(_ipv6(V6_A, V6_B, 50, _esp_cbc(v6.spi_out, 1, v6.encr_key_out,
                                                  v6.integ_key_out, rng(16), udp, 17)))
    log.close()
    _write_pcap(tmp_path / "c.pcap", 101, frames)

    # Wireshark keeps the two tables in two files of its configuration directory
    conf = tmp_path / "conf" / "wireshark"
    conf.mkdir(parents=True)
    lines = [ln for ln in (tmp_path / "keys.log").read_text().splitlines() if not ln.startswith("#")]
    (conf / "ikev2_decryption_table").write_text("".join(ln + "\n" for ln in lines if ln[0] != '"'))
    (conf / "esp_sa").write_text("".join(ln + "\n" for ln in lines if ln[0] == '"'))
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "conf")}
    r = subprocess.run(["tshark", "-r", str(tmp_path / "c.pcap"), "-o",
                        "esp.enable_encryption_decode:TRUE", "-V"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "Error loading" not in r.stderr, r.stderr
    out = r.stdout
    assert "ID_FQDN: initiator.example" in out  # CBC + HMAC IKE SA
    assert "ID_FQDN: responder.example" in out  # GCM IKE SA, responder's keys
    assert out.count("ESP Decrypted Data") == 2
    assert f"Data: {b'gcm-tunnel-canary'.hex()}" in out  # inner IPv4/UDP of the tunnel
    assert f"Data: {b'cbc-transport-can'.hex()}" in out
    assert "Src Port: 40001" in out and "Dst Port: 9" in out
