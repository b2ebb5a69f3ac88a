"""Key log in Wireshark's ikev2_decryption_table / esp_sa formats: writer, reader, strongSwan
save-keys input, and errors that name the line."""
from __future__ import annotations

import ipaddress
import re
import stat
from dataclasses import replace

import pytest

from oe_agent.ike.const import EncrId, IntegId
from oe_agent.ike.crypto import IkeCipher, IkeKeys
from oe_agent.ike.keylog import (IkeKeyLine, KeyLogError, KeyLogWriter, esp_lines, parse_keylog,
                                 read_keylog)
from oe_agent.model import ChildSaParams, EspAlgorithm, Mode

SPI_I, SPI_R = bytes.fromhex("0123456789abcdef"), bytes.fromhex("fedcba9876543210")


def _ike_keys(cipher: IkeCipher) -> IkeKeys:
    e, a = cipher.encr_key_len, cipher.integ_key_len
    return IkeKeys(b"d" * 32, b"A" * a, b"B" * a, b"E" * e, b"F" * e, b"p" * 32, b"q" * 32)


def _child(alg: EspAlgorithm, v6=False) -> ChildSaParams:
    local, remote = ("2001:db8::1", "2001:db8::2") if v6 else ("192.0.2.1", "192.0.2.2")
    ekey = 16 + (4 if alg.integ is None else 0)
    return ChildSaParams(ipaddress.ip_address(local), ipaddress.ip_address(remote),
                         spi_in=0xC0000001, spi_out=0x00000A0B, mode=Mode.TRANSPORT, alg=alg,
                         encr_key_in=b"i" * ekey, encr_key_out=b"o" * ekey,
                         integ_key_in=b"I" * 32 if alg.integ else b"",
                         integ_key_out=b"O" * 32 if alg.integ else b"")


def test_writer_lines_read_back(tmp_path):
    path = tmp_path / "keys.log"
    w = KeyLogWriter(path)
    gcm = IkeCipher.from_ids(EncrId.AES_GCM_16, 256)
    cbc = IkeCipher.from_ids(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)
    w.log_ike_sa(SPI_I, SPI_R, gcm, _ike_keys(gcm))
    w.log_ike_sa(SPI_R, SPI_I, cbc, _ike_keys(cbc))
    w.log_child_sa(_child(EspAlgorithm("aes-gcm-16", 128)))
    w.log_child_sa(_child(EspAlgorithm("aes-cbc", 128, "hmac-sha2-256-128"), v6=True))
    w.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert f'{SPI_I.hex()},{SPI_R.hex()},{(b"E" * 36).hex()},{(b"F" * 36).hex()},' \
           f'"AES-GCM-256 with 16 octet ICV [RFC5282]",,,"NONE [RFC4306]"' in text.splitlines()
    assert '"IPv4","192.0.2.1","192.0.2.2","0x00000a0b","AES-GCM with 16 octet ICV [RFC4106]",' \
           f'"0x{(b"o" * 20).hex()}","NULL",""' in text.splitlines()
    assert re.search(r'^"IPv6","2001:db8::2","2001:db8::1","0xc0000001","AES-CBC \[RFC3602\]",'
                     r'"0x(69){16}","HMAC-SHA-256-128 \[RFC4868\]","0x(49){32}"$', text, re.M)
    table = read_keylog(path)
    gcm_line = table.ike[(SPI_I, SPI_R)]
    assert gcm_line.cipher() == gcm and gcm_line.sk_ei == b"E" * 36
    cbc_line = table.ike[(SPI_R, SPI_I)]
    assert cbc_line.cipher() == cbc and (cbc_line.sk_ai, cbc_line.sk_ar) == (b"A" * 32, b"B" * 32)
    v6 = table.esp_for(0xC0000001, "2001:db8::2", "2001:db8::1")
    assert v6.integ.name == "hmac-sha2-256-128" and v6.encr.name == "aes-cbc"
    assert v6.encr_key == b"i" * 16 and v6.integ_key == b"I" * 32
    assert table.esp_for(0xC0000001, "2001:db8::9", "2001:db8::1") is None


def test_line_round_trip_and_chacha():
    cc = IkeCipher.from_ids(EncrId.CHACHA20_POLY1305, None)
    line = IkeKeyLine.of(SPI_I, SPI_R, cc, _ike_keys(cc))
    assert line.to_line().startswith("#ikev2: ")  # a comment to Wireshark (no such name)
    table = parse_keylog("# comment\n\n" + line.to_line() + "\n")
    assert table.ike[(SPI_I, SPI_R)] == line and line.cipher() == cc
    params = replace(_child(EspAlgorithm("chacha20-poly1305", 256)), encr_key_in=b"k" * 36,
                     encr_key_out=b"K" * 36)
    out, inb = esp_lines(params)
    assert inb.encr_key == b"k" * 36 and inb.spi == params.spi_in
    assert out.encr_name == "ChaCha20 with Poly1305 [RFC7634]"
    assert parse_keylog(out.to_line()).esp[0x00000A0B] == [out]


def test_strongswan_save_keys_directory(tmp_path):
    """save-keys writes ikev2_decryption_table and esp_sa (older "AES-GCM [RFC4106]" names)."""
    (tmp_path / "ikev2_decryption_table").write_text(
        f"{SPI_I.hex()},{SPI_R.hex()},{'11' * 16},{'22' * 16},\"AES-CBC-128 [RFC3602]\","
        f"{'33' * 32},{'44' * 32},\"HMAC_SHA2_256_128 [RFC4868]\"\n")
    (tmp_path / "esp_sa").write_text(
        '"IPv4","192.0.2.1","192.0.2.2","0xc1234567","AES-GCM [RFC4106]","0x' + "55" * 20
        + '","ANY 128 bit authentication [no checking]","0x"\n')
    table = read_keylog(tmp_path)
    assert table.ike[(SPI_I, SPI_R)].cipher().integ.name == "hmac-sha2-256-128"
    esp = table.esp_for(0xC1234567, "192.0.2.1", "192.0.2.2")
    assert esp.encr.name == "aes-gcm-16" and esp.integ is None and esp.integ_key == b""


def test_vector_key_file_reads_and_rewrites_identically(shared_dir):
    path = shared_dir / "vectors" / "ike-ed25519-espinudp.keys.txt"
    table = read_keylog(path)
    lines = [ln.to_line() for ln in table.ike.values()] + [
        ln.to_line() for lst in table.esp.values() for ln in lst]
    assert lines == [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]


GOOD_IKE = (f"{SPI_I.hex()},{SPI_R.hex()},{'11' * 36},{'22' * 36},"
            '"AES-GCM-256 with 16 octet ICV [RFC5282]",,,"NONE [RFC4306]"')


@pytest.mark.parametrize("line,words", [
    (GOOD_IKE.replace("11" * 36, "11" * 20), "SK_ei is 20 bytes"),
    (GOOD_IKE.replace("AES-GCM-256", "AES-GCM-512"), "unsupported IKE encryption"),
    (GOOD_IKE.replace(SPI_I.hex(), "xyz"), "SPIi is not hex"),
    (GOOD_IKE.replace(SPI_I.hex(), "0123"), "16 hex digits"),
    (",".join(GOOD_IKE.split(",")[:5]), "5 fields"),
    (GOOD_IKE.replace(',,,"NONE', f',{"aa" * 32},{"bb" * 32},"NONE'), "SK_ai is 32 bytes"),
    ('"IPv4","192.0.2.1","192.0.2.2","0x1","AES-CBC [RFC3602]","0x' + "00" * 16
     + '","NULL",""', "SPI"),
    ('"IPv4","192.0.2.1","192.0.2.2","0x00000001","AES-CBC [RFC3602]","0x' + "00" * 16
     + '","NULL",""', "needs an integrity"),
    ('"IPv4","192.0.2.1","192.0.2.2","0x00000001","AES-GCM [RFC4106]","0x' + "00" * 17
     + '","NULL",""', "17 bytes does not fit"),
    ('"IPv4","not-an-ip","192.0.2.2","0x00000001","AES-GCM [RFC4106]","0x' + "00" * 20
     + '","NULL",""', "address"),
])
def test_bad_lines_name_the_line(line, words):
    with pytest.raises(KeyLogError) as e:
        parse_keylog("# header\n" + line + "\n", source="k.txt")
    assert str(e.value).startswith("k.txt line 2: ") and words in str(e.value)
