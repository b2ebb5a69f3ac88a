"""`oe-agent decrypt`: the charon capture shows its inner ICMP packets; pcapng, Linux cooked,
raw ESP (transport, AES-CBC+HMAC, IPv6) decode; every bad input is one line, exit 2."""
from __future__ import annotations

import io
import ipaddress
import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from oe_agent.cli import main
from oe_agent.ike import payloads as pl
from oe_agent.ike.const import AuthMethod, EncrId, ExchangeType, IntegId
from oe_agent.ike.crypto import INTEGS, IkeCipher, IkeKeys
from oe_agent.ike.decrypt import EspKeyMismatch, decrypt_capture, open_esp
from oe_agent.ike.keylog import KeyLogWriter, parse_keylog, read_keylog
from oe_agent.ike.message import Message, add_non_esp_marker
from oe_agent.ike.pcap import CaptureError, ip_of, read_frames
from oe_agent.model import ChildSaParams, EspAlgorithm, Mode, TrafficSelector
from tests.conftest import SHARED, needs

VECTORS = SHARED / "vectors"
PCAP = VECTORS / "ike-ed25519-espinudp.pcap"
KEYS = VECTORS / "ike-ed25519-espinudp.keys.txt"


@pytest.fixture
def vectors():
    needs(PCAP.exists() and KEYS.exists(), f"test vectors in {VECTORS}")
    return PCAP, KEYS


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["decrypt", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_capture_shows_ike_and_inner_icmp(vectors, capsys):
    rc, out, err = run(capsys, vectors[0], "--keylog", vectors[1])
    assert rc == 0 and err == ""
    assert "IKE IKE_SA_INIT request #0 from initiator" in out
    assert "IDi IPV4_ADDR 192.0.2.1" in out and "AUTH DIGITAL_SIGNATURE" in out
    assert "SA #1 ESP spi 08cd5382 ENCR=AES_GCM_16-128" in out
    assert "D IKE" in out
    assert out.count("inner (tunnel) 192.0.2.1 -> 192.0.2.2 ICMP type 8 code 0") == 2
    assert out.count("inner (tunnel) 192.0.2.2 -> 192.0.2.1 ICMP type 0 code 0") == 2
    assert ' !"#$%&\'()*+,-./01234567' in out  # ping's payload pattern, as a preview
    assert out.rstrip().endswith("6 IKE messages (4 decrypted), 4 ESP packets (4 decrypted)")


def _pcap_records(path):
    with open(path, "rb") as f:
        return [(fr.linktype, fr.data) for fr in read_frames(f)]


def _write_pcapng(path, linktype, frames):
    def block(btype, body):
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += block(1, struct.pack("<HHI", linktype, 0, 65535))
    for i, data in enumerate(frames):
        out += block(6, struct.pack("<IIIII", 0, 0, i, len(data), len(data)) + data)
    path.write_bytes(out)


def _write_pcap(path, linktype, frames):
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for i, data in enumerate(frames):
        out += struct.pack("<IIII", i, 0, len(data), len(data)) + data
    path.write_bytes(out)


def test_pcapng_and_linux_cooked_give_the_same_output(vectors, tmp_path, capsys):
    _, ref, _ = run(capsys, vectors[0], "--keylog", vectors[1])
    frames = _pcap_records(vectors[0])
    assert {lt for lt, _ in frames} == {1}
    _write_pcapng(tmp_path / "c.pcapng", 1, [d for _, d in frames])
    rc, out, _ = run(capsys, tmp_path / "c.pcapng", "--keylog", vectors[1])
    assert rc == 0 and out == ref
    sll = [b"\0\0\0\1\0\6" + d[6:12] + b"\0\0" + d[12:14] + d[14:] for _, d in frames]
    _write_pcap(tmp_path / "sll.pcap", 113, sll)
    rc, out, _ = run(capsys, tmp_path / "sll.pcap", "--keylog", vectors[1])
    assert rc == 0 and out == ref
    # tcpdump -i any on Debian 12 writes LINUX_SLL2 (276): protocol first, 20-byte header
    sll2 = [d[12:14] + b"\0\0" + struct.pack("!I", 2) + b"\0\1\0\6" + d[6:12] + b"\0\0" + d[14:]
            for _, d in frames]
    _write_pcap(tmp_path / "sll2.pcap", 276, sll2)
    rc, out, _ = run(capsys, tmp_path / "sll2.pcap", "--keylog", vectors[1])
    assert rc == 0 and out == ref


def _esp_cbc(spi, seq, ekey, akey, iv, inner, next_header):
    pad = -(len(inner) + 2) % 16
    plain = inner + bytes(range(1, pad + 1)) + bytes([pad, next_header])
    enc = Cipher(algorithms.AES(ekey), modes.CBC(iv)).encryptor()
    ct = enc.update(plain) + enc.finalize()
    head = struct.pack("!II", spi, seq) + iv
    return head + ct + INTEGS[IntegId.HMAC_SHA2_256_128].icv(akey, head + ct)


def _ipv6(src, dst, nh, payload):
    return (struct.pack("!IHBB", 6 << 28, len(payload), nh, 64) + bytes.fromhex(src)
            + bytes.fromhex(dst) + payload)


def test_raw_esp_transport_cbc_ipv6(tmp_path, capsys):
    ekey, akey, iv = b"K" * 16, b"A" * 32, os.urandom(16)
    canary = b"GET /secret-canary HTTP/1.1\r\nHost: www.example\r\n\r\n" + b"x" * 40
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + canary
    src, dst = "20010db8000000000000000000000001", "20010db8000000000000000000000002"
    pkt = _ipv6(src, dst, 50, _esp_cbc(0x0000C0DE, 7, ekey, akey, iv, tcp, 6))
    _write_pcap(tmp_path / "raw.pcap", 101, [pkt, _ipv6(src, dst, 50, b"\0\0\0\1short")])
    (tmp_path / "k").write_text(
        f'"IPv6","2001:db8::1","2001:db8::2","0x0000c0de","AES-CBC [RFC3602]",'
        f'"0x{ekey.hex()}","HMAC-SHA-256-128 [RFC4868]","0x{akey.hex()}"\n')
    rc, out, err = run(capsys, tmp_path / "raw.pcap", "--keylog", tmp_path / "k")
    assert rc == 0, err
    assert "ESP spi 0x0000c0de seq 7" in out
    assert "inner (transport) 2001:db8::1 -> 2001:db8::2 TCP ports 40000 -> 80" in out
    assert "payload: GET /secret-canary HTTP/1.1..Host: www.example....xxxxxxxxxx" in out
    assert "(no esp_sa key for this SPI)" in out


def test_key_that_does_not_fit_is_reported(vectors, tmp_path, capsys):
    text = vectors[1].read_text()
    sk_ei = text.splitlines()[1].split(",")[2]
    (tmp_path / "k").write_text(text.replace(sk_ei, "00" * 36))
    rc, out, err = run(capsys, vectors[0], "--keylog", tmp_path / "k")
    assert rc == 2
    assert out.count("key does not fit: SK integrity check failed") == 2  # initiator's SKs
    assert err == "oe-agent: 2 packet(s) did not decrypt or parse with the given keys\n"


@pytest.mark.parametrize("make,words", [
    (lambda d: (d / "none.pcap", d / "k"), "no such file"),
    (lambda d: (PCAP, d / "missing.txt"), "no such file"),
    (lambda d: (d / "k", d / "k"), "not a pcap or pcapng file"),
    (lambda d: (PCAP, PCAP), "not a text file"),
    (lambda d: (PCAP, d / "bad"), "line 1: unsupported IKE encryption"),
    (lambda d: (d / "trunc.pcap", d / "k"), "truncated"),
    (lambda d: (PCAP, d / "empty-dir"), "neither ikev2_decryption_table nor esp_sa"),
])
def test_bad_input_is_one_line(vectors, tmp_path, capsys, make, words):
    (tmp_path / "k").write_text(vectors[1].read_text())
    (tmp_path / "bad").write_text('0123456789abcdef,0123456789abcdef,00,00,"3DES",,,"NONE"\n')
    (tmp_path / "trunc.pcap").write_bytes(vectors[0].read_bytes()[:100])
    (tmp_path / "empty-dir").mkdir()
    pcap, keys = make(tmp_path)
    rc, out, err = run(capsys, pcap, "--keylog", keys)
    assert rc == 2 and words in err
    assert err.count("\n") == 1 and err.startswith("oe-agent: ") and "Traceback" not in err


def _ipv4_udp(sport, dport, payload):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                        bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])) + udp)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(500, 500), (4500, 4500), (4500, 34567)]),
                          st.binary(max_size=120)), max_size=4),
       st.sampled_from([b"", b"\0\0\0\0", b"\x08\xcd\x53\x82", b"\x02\x9c\x6d\xdd"]))
def test_any_udp_content_never_crashes_decrypt(frames, prefix):
    """Whatever rides on the IKE/NAT-T ports, decrypt prints something and goes on."""
    needs(KEYS.exists(), f"test vectors in {VECTORS}")
    keys = read_keylog(KEYS)
    pcap = io.BytesIO()
    pcap.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
    for (sport, dport), data in frames:
        pkt = _ipv4_udp(sport, dport, prefix + data)
        pcap.write(struct.pack("<IIII", 0, 0, len(pkt), len(pkt)) + pkt)
    pcap.seek(0)
    out = io.StringIO()
    summary = decrypt_capture(pcap, keys, out)
    assert summary.ike + summary.esp <= len(frames)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x0a\x0d\x0d\x0a", b""]),
       st.binary(max_size=300))
def test_garbage_captures_raise_only_capture_error(magic, rest):
    try:
        for frame in read_frames(io.BytesIO(magic + rest)):
            ip_of(frame)
    except CaptureError:
        pass


def test_own_key_log_decrypts_own_messages(tmp_path, capsys):
    """What the engine sends (codec + SK with AES-CBC/HMAC) and the keys KeyLogWriter logs
    are enough for decrypt: the agent's key log path end to end, with an ESP-in-UDP packet
    in transport mode carrying UDP."""
    rng = random.Random(4).randbytes
    cipher = IkeCipher.from_ids(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128)
    keys = IkeKeys(rng(32), rng(32), rng(32), rng(32), rng(32), rng(32), rng(32))
    spi_i, spi_r = rng(8), rng(8)
    rsa_sha256 = bytes.fromhex("300d06092a864886f70d01010b0500")
    msg = Message(spi_i, spi_r, ExchangeType.IKE_AUTH, True, False, 1, (
        pl.IdInitiator.from_fqdn("a.example"),
        pl.Authentication(AuthMethod.DIGITAL_SIGNATURE, bytes([15]) + rsa_sha256 + rng(256)),
        pl.TsInitiator((TrafficSelector.host("192.0.2.1", 17),)),
        pl.TsResponder((TrafficSelector.host("192.0.2.2", 17, 53),))))
    wire = msg.encrypt(cipher, keys.sk_ei, keys.sk_ai, rng)
    params = ChildSaParams(ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2"),
                           spi_in=0xC1000001, spi_out=0xC2000002, mode=Mode.TRANSPORT,
                           alg=EspAlgorithm("aes-gcm-16", 256), encr_key_in=rng(36),
                           encr_key_out=rng(36), encap=(4500, 4500))
    udp_inner = struct.pack("!HHHH", 5353, 53, 8 + 12, 0) + b"dns-question"
    plain = udp_inner + b"\x01\x02" + bytes([2, 17])  # 2 padding octets, next header UDP
    head, iv = struct.pack("!II", params.spi_out, 1), rng(8)
    k = params.encr_key_out
    esp = head + iv + AESGCM(k[:32]).encrypt(k[32:] + iv, plain, head)
    _write_pcap(tmp_path / "own.pcap", 101, [_ipv4_udp(4500, 4500, add_non_esp_marker(wire)),
                                             _ipv4_udp(4500, 4500, esp)])
    w = KeyLogWriter(tmp_path / "keys.log")
    w.log_ike_sa(spi_i, spi_r, cipher, keys)
    w.log_child_sa(params)
    w.close()
    rc, out, err = run(capsys, tmp_path / "own.pcap", "--keylog", tmp_path / "keys.log")
    assert rc == 0, err
    assert "IDi FQDN a.example" in out
    assert "AUTH DIGITAL_SIGNATURE sha256WithRSAEncryption, 272 bytes" in out
    assert "TSr 192.0.2.2-192.0.2.2 proto 17 ports 53-53" in out
    assert "inner (transport) 192.0.2.1 -> 192.0.2.2 UDP ports 5353 -> 53, 12 bytes payload" in out
    assert "payload: dns-question" in out
    assert out.rstrip().endswith("1 IKE messages (1 decrypted), 1 ESP packets (1 decrypted)")


@pytest.mark.parametrize("alg", ["gcm", "cbc"])
def test_esp_with_extended_sequence_numbers(alg):
    """ESN SAs (RFC 4303 §2.2.1) authenticate the high-order sequence bits too (here 0)."""
    spi, seq, iv = 0x00001234, 5, b"\x07" * (8 if alg == "gcm" else 16)
    plain = b"\x45" + bytes(19) + b"esn-canary" + bytes([0, 4])  # 32 bytes: no padding
    head = struct.pack("!II", spi, seq)
    if alg == "gcm":
        key = b"G" * 20
        esn_aad = head[:4] + bytes(4) + head[4:]
        pkt = head + iv + AESGCM(key[:16]).encrypt(key[16:] + iv, plain, esn_aad)
        line = f'"IPv4","*","*","0x{spi:08x}","AES-GCM [RFC4106]","0x{key.hex()}","NULL",""'
    else:
        ekey, akey = b"C" * 16, b"H" * 32
        enc = Cipher(algorithms.AES(ekey), modes.CBC(iv)).encryptor()
        ct = enc.update(plain) + enc.finalize()
        icv = INTEGS[IntegId.HMAC_SHA2_256_128].icv(akey, head + iv + ct + bytes(4))
        pkt = head + iv + ct + icv
        line = (f'"IPv4","*","*","0x{spi:08x}","AES-CBC [RFC3602]","0x{ekey.hex()}",'
                f'"HMAC-SHA-256-128 [RFC4868]","0x{akey.hex()}"')
    key_line = parse_keylog(line).esp[spi][0]
    nh, payload = open_esp(key_line, pkt)
    assert nh == 4 and payload[20:] == b"esn-canary"
    with pytest.raises(EspKeyMismatch):
        open_esp(key_line, pkt[:-1] + bytes([pkt[-1] ^ 1]))
