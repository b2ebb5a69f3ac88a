"""The real charon capture in ../shared/vectors: every IKE message parses and decrypts, the keys
derived from the logged DH secret, nonces and SPIs equal the key file, ESP decrypts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from oe_agent.ike import crypto
from oe_agent.ike.const import ExchangeType, PrfId, ProtocolId
from oe_agent.ike.decrypt import open_esp
from oe_agent.ike.keylog import read_keylog
from oe_agent.ike.message import Message, classify_udp4500
from oe_agent.ike.payloads import (Delete, EncryptedPayload, IdInitiator, IdResponder, Nonce,
                                   SecurityAssociation)
from oe_agent.ike.pcap import ip_of, read_frames
from tests.conftest import SHARED, needs

VECTORS = SHARED / "vectors"
PCAP = VECTORS / "ike-ed25519-espinudp.pcap"
KEYS = VECTORS / "ike-ed25519-espinudp.keys.txt"
LOG = VECTORS / "ike-ed25519-espinudp.initiator-charon.log"


@pytest.fixture(scope="module")
def capture():
    needs(PCAP.exists() and KEYS.exists() and LOG.exists(), f"test vectors in {VECTORS}")
    ike, esp = [], []
    with open(PCAP, "rb") as f:
        for frame in read_frames(f):
            ip = ip_of(frame)
            udp = ip.payload
            dport, data = int.from_bytes(udp[2:4], "big"), udp[8:]
            if dport == 4500:
                kind, data = classify_udp4500(data)
                (ike if kind == "ike" else esp).append((ip, data))
            else:
                ike.append((ip, data))
    return ike, esp


def charon_dumps(path: Path) -> dict[str, list[bytes]]:
    """`name => N bytes @ addr` followed by hex-dump lines, as charon logs at level 4."""
    out: dict[str, list[bytes]] = {}
    name = None
    for line in path.read_text().splitlines():
        m = re.search(r"> (.+?) => \d+ bytes @ 0x", line)
        if m:
            name = m.group(1)
            out.setdefault(name, []).append(b"")
            continue
        m = re.search(r">\s+\d+: ((?:[0-9A-F]{2} )+)", line)
        if m and name:
            out[name][-1] += bytes.fromhex(m.group(1))
        else:
            name = None
    return out


@pytest.fixture(scope="module")
def dumps():
    needs(LOG.exists(), f"charon log in {VECTORS}")
    return charon_dumps(LOG)


@pytest.fixture(scope="module")
def keys():
    needs(KEYS.exists(), f"key file in {VECTORS}")
    return read_keylog(KEYS)


def test_every_ike_message_parses_and_decrypts(capture, keys):
    ike, _ = capture
    msgs = [Message.parse(data) for _, data in ike]
    assert [m.exchange for m in msgs] == [ExchangeType.IKE_SA_INIT] * 2 + [
        ExchangeType.IKE_AUTH] * 2 + [ExchangeType.INFORMATIONAL] * 2
    assert [m.response for m in msgs] == [False, True] * 3
    line = keys.ike[(msgs[1].spi_i, msgs[1].spi_r)]
    opened = []
    for m in msgs[2:]:
        assert isinstance(m.payloads[-1], EncryptedPayload)
        sk = (line.sk_ei, line.sk_ai) if m.initiator else (line.sk_er, line.sk_ar)
        opened.append(m.decrypted(line.cipher(), *sk))
    auth_req, auth_resp, delete, _ = opened
    assert str(auth_req.get(IdInitiator)) == "192.0.2.1"
    assert str(auth_resp.get(IdResponder)) == "192.0.2.2"
    assert auth_resp.get(SecurityAssociation).proposals[0].spi.hex() == "08cd5382"
    assert auth_req.get(SecurityAssociation).proposals[0].spi.hex() == "029c6ddd"
    assert delete.get(Delete) == Delete(ProtocolId.IKE)
    assert opened[3].payloads == ()


def test_clear_messages_reencode_byte_for_byte(capture):
    ike, _ = capture
    for _, data in ike[:2]:
        assert Message.parse(data).to_bytes() == data


def test_decrypted_messages_reencrypt_byte_for_byte(capture, keys):
    """Same keys and IV -> the same datagram: our SK encoding matches charon's (§3.14)."""
    ike, _ = capture
    line = next(iter(keys.ike.values()))
    for _, data in ike[2:]:
        m = Message.parse(data)
        sk = (line.sk_ei, line.sk_ai) if m.initiator else (line.sk_er, line.sk_ar)
        iv = m.encrypted.data[:8]
        assert m.decrypted(line.cipher(), *sk).encrypt(line.cipher(), *sk, lambda n: iv) == data


def test_sk_keys_from_logged_values_match_key_file(capture, dumps, keys):
    ike, _ = capture
    init_req, init_resp = Message.parse(ike[0][1]), Message.parse(ike[1][1])
    ni, nr = init_req.get(Nonce).data, init_resp.get(Nonce).data
    g_ir = dumps["shared Diffie Hellman secret"][0]
    prf = crypto.prf_for(PrfId.HMAC_SHA2_256)
    seed = crypto.skeyseed(prf, ni, nr, g_ir)
    assert seed == dumps["SKEYSEED"][0]
    line = keys.ike[(init_resp.spi_i, init_resp.spi_r)]
    k = crypto.derive_ike_keys(prf, line.cipher(), seed, ni, nr, init_resp.spi_i, init_resp.spi_r)
    assert (k.sk_ei, k.sk_er, k.sk_ai, k.sk_ar) == (line.sk_ei, line.sk_er, b"", b"")
    assert (k.sk_d, k.sk_pi, k.sk_pr) == (dumps["Sk_d secret"][0], dumps["Sk_pi secret"][0],
                                          dumps["Sk_pr secret"][0])
    # KEYMAT (§2.17) gives the ESP keys of the key file: initiator->responder first
    child = crypto.child_keys(prf, k.sk_d, ni, nr, 20, 0)
    assert keys.esp[0x08CD5382][0].encr_key == child.encr_i
    assert keys.esp[0x029C6DDD][0].encr_key == child.encr_r
    # AUTH octets (§2.15): first message + peer nonce + prf(SK_p, IDx'), as charon signed them
    auth_req = Message.parse(ike[2][1]).decrypted(line.cipher(), line.sk_ei, b"")
    octets = dumps["octets = message + nonce + prf(Sk_px, IDx')"]
    assert octets[0] == ike[0][1] + nr + prf(k.sk_pi, auth_req.get(IdInitiator).to_bytes())


def test_esp_packets_decrypt_to_icmp(capture, keys):
    _, esp = capture
    assert len(esp) == 4
    for ip, packet in esp:
        spi = int.from_bytes(packet[:4], "big")
        nh, inner = open_esp(keys.esp_for(spi, ip.src, ip.dst), packet)
        assert nh == 4  # tunnel mode: an IPv4 packet inside
        assert inner[9] == 1 and inner[12:16] == ip.src.packed and inner[16:20] == ip.dst.packed
        assert inner[20] in (0, 8)  # ICMP echo reply / request
