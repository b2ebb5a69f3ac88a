"""Known answers for the IKE crypto (RFC 7748, RFC 4868/4231) and self-consistency of the DH
groups, prf+, key derivation and the SK ciphers."""
from __future__ import annotations

import random

import pytest

from oe_agent.ike import crypto
from oe_agent.ike.const import DhId, EncrId, IntegId, NotifyType, PrfId
from oe_agent.ike.errors import IkeIntegrityError, IkeProtocolError


def seeded(seed: int):
    r = random.Random(seed)
    return r.randbytes


def fixed(value: bytes):
    return lambda n: value[:n]


# --- RFC 7748 X25519 -----------------------------------------------------------------------

@pytest.mark.parametrize("scalar,u,out", [  # RFC 7748 §5.2
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
])
def test_x25519_rfc7748_scalar_mult(scalar, u, out):
    kx = crypto.X25519Exchange(fixed(bytes.fromhex(scalar)))
    assert kx.shared(bytes.fromhex(u)).hex() == out


def test_x25519_rfc7748_iterated_1000():
    """RFC 7748 §5.2: k = u = 9, k, u = X25519(k, u), k; after 1 and 1000 iterations."""
    k = u = (9).to_bytes(32, "little")
    for i in range(1, 1001):
        k, u = crypto.X25519Exchange(fixed(k)).shared(u), k
        if i == 1:
            assert k.hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_x25519_rfc7748_dh():
    """RFC 7748 §6.1: Alice and Bob's public keys and shared secret."""
    a = crypto.key_exchange(DhId.CURVE25519, fixed(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")))
    b = crypto.key_exchange(DhId.CURVE25519, fixed(bytes.fromhex(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")))
    assert a.public.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert b.public.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert a.shared(b.public).hex() == shared == b.shared(a.public).hex()


def test_x25519_small_order_point_is_protocol_error():
    kx = crypto.key_exchange(DhId.CURVE25519, seeded(1))
    with pytest.raises(IkeProtocolError) as e:
        kx.shared(bytes(32))  # u = 0: all-zero shared secret (RFC 7748 §6.1)
    assert e.value.notify_type == NotifyType.INVALID_SYNTAX


def test_ecp256_rfc5903_vector():
    """RFC 5903 §8.1: KE data is gx || gy (§7), the shared secret is x of g^ir."""
    def scalar_rng(hex_scalar):  # Ecp256Exchange takes rng(40) mod (n - 1) + 1
        return fixed((int(hex_scalar, 16) - 1).to_bytes(40, "big"))

    i = crypto.key_exchange(DhId.ECP_256, scalar_rng(
        "C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433"))
    r = crypto.key_exchange(DhId.ECP_256, scalar_rng(
        "C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53"))
    assert i.public.hex().upper() == (
        "DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180"
        "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3")
    assert r.public.hex().upper() == (
        "D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
        "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB")
    girx = "D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE"
    assert i.shared(r.public).hex().upper() == girx == r.shared(i.public).hex().upper()


# --- RFC 4868 / RFC 4231 HMAC-SHA2 -----------------------------------------------------------

HI = b"Hi There"
JEFE = b"what do ya want for nothing?"
RFC4231 = {  # test cases 1 and 2, also RFC 4868 §2.7.1 PRF-1 and PRF-2
    (PrfId.HMAC_SHA2_256, 1): "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    (PrfId.HMAC_SHA2_384, 1): "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
                              "faea9ea9076ede7f4af152e8b2fa9cb6",
    (PrfId.HMAC_SHA2_512, 1): "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
                              "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
    (PrfId.HMAC_SHA2_256, 2): "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    (PrfId.HMAC_SHA2_384, 2): "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
                              "8e2240ca5e69e2c78b3239ecfab21649",
    (PrfId.HMAC_SHA2_512, 2): "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
                              "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
}
CASE_INPUT = {1: (b"\x0b" * 20, HI), 2: (b"Jefe", JEFE)}
TRUNC_INTEG = {PrfId.HMAC_SHA2_256: IntegId.HMAC_SHA2_256_128,
               PrfId.HMAC_SHA2_384: IntegId.HMAC_SHA2_384_192,
               PrfId.HMAC_SHA2_512: IntegId.HMAC_SHA2_512_256}


@pytest.mark.parametrize("prf_id,case", sorted(RFC4231))
def test_prf_hmac_sha2_vectors(prf_id, case):
    key, data = CASE_INPUT[case]
    assert crypto.prf_for(prf_id)(key, data).hex() == RFC4231[(prf_id, case)]


@pytest.mark.parametrize("prf_id,case", sorted(RFC4231))
def test_integ_truncates_to_leftmost_half(prf_id, case):
    """RFC 4868 §2.3: the ICV is the left-most half of the HMAC output."""
    key, data = CASE_INPUT[case]
    full = bytes.fromhex(RFC4231[(prf_id, case)])
    integ = crypto.integ_for(TRUNC_INTEG[prf_id])
    assert integ.icv(key, data) == full[:len(full) // 2]
    assert integ.icv_len == len(full) // 2 and integ.key_len == len(full)


@pytest.mark.parametrize("key,data,full", [  # RFC 4868 §2.7.2.1 AUTH256-1..4
    ("0b" * 32, HI.hex(), "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"),
    ("4a656665" * 8, JEFE.hex(), "167f928588c5cc2eef8e3093caa0e87c9ff566a14794aa61648d81621a2a40c6"),
    ("aa" * 32, "dd" * 50, "cdcb1220d1ecccea91e53aba3092f962e549fe6ce9ed7fdc43191fbde45c30b0"),
    ("0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20", "cd" * 50,
     "372efcf9b40b35c2115b1346903d2ef42fced46f0846e7257bb156d3d7b30d3f"),
])
def test_hmac_sha2_256_128_rfc4868_auth_vectors(key, data, full):
    k, d = bytes.fromhex(key), bytes.fromhex(data)
    assert crypto.prf_for(PrfId.HMAC_SHA2_256)(k, d).hex() == full
    integ = crypto.integ_for(IntegId.HMAC_SHA2_256_128)
    assert integ.icv(k, d).hex() == full[:32]
    assert integ.verify(k, d, bytes.fromhex(full[:32]))
    assert not integ.verify(k, d + b"x", bytes.fromhex(full[:32]))


# --- prf+ and key derivation ------------------------------------------------------------------

def test_prf_plus_follows_rfc7296_2_13():
    prf = crypto.prf_for(PrfId.HMAC_SHA2_256)
    k, s = b"key", b"seed"
    t1 = prf(k, s + b"\x01")
    t2 = prf(k, t1 + s + b"\x02")
    t3 = prf(k, t2 + s + b"\x03")
    assert prf.plus(k, s, 80) == (t1 + t2 + t3)[:80]
    assert len(prf.plus(k, s, 255 * 32)) == 255 * 32
    with pytest.raises(IkeProtocolError):
        prf.plus(k, s, 255 * 32 + 1)


def test_ike_keys_split_in_prf_plus_order():
    prf = crypto.prf_for(PrfId.HMAC_SHA2_384)
    cipher = crypto.IkeCipher.from_ids(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)
    ni, nr, si, sr = b"n" * 32, b"r" * 32, b"i" * 8, b"s" * 8
    seed = crypto.skeyseed(prf, ni, nr, b"g" * 32)
    assert seed == prf(ni + nr, b"g" * 32)
    keys = crypto.derive_ike_keys(prf, cipher, seed, ni, nr, si, sr)
    stream = prf.plus(seed, ni + nr + si + sr, 48 + 32 + 32 + 16 + 16 + 48 + 48)
    assert keys.sk_d + keys.sk_ai + keys.sk_ar + keys.sk_ei + keys.sk_er + keys.sk_pi \
        + keys.sk_pr == stream
    assert [len(k) for k in (keys.sk_d, keys.sk_ai, keys.sk_ei, keys.sk_pi)] == [48, 32, 16, 48]
    assert keys.outbound(True) == (keys.sk_ei, keys.sk_ai) == keys.inbound(False)


def test_rekey_skeyseed_and_child_keymat():
    prf = crypto.prf_for(PrfId.HMAC_SHA2_256)
    sk_d, g, ni, nr = b"d" * 32, b"g" * 32, b"i" * 32, b"r" * 32
    assert crypto.skeyseed_rekey(prf, sk_d, g, ni, nr) == prf(sk_d, g + ni + nr)
    plain = crypto.child_keys(prf, sk_d, ni, nr, 20, 0)
    km = prf.plus(sk_d, ni + nr, 40)
    assert (plain.encr_i, plain.encr_r, plain.integ_i) == (km[:20], km[20:], b"")
    pfs = crypto.child_keys(prf, sk_d, ni, nr, 16, 32, g_ir=g)
    km = prf.plus(sk_d, g + ni + nr, 96)
    assert (pfs.encr_i, pfs.integ_i, pfs.encr_r, pfs.integ_r) == (
        km[:16], km[16:48], km[48:64], km[64:])


# --- key exchange -----------------------------------------------------------------------------

@pytest.mark.parametrize("group,length", [(DhId.CURVE25519, 32), (DhId.ECP_256, 64),
                                          (DhId.MODP_2048, 256)])
def test_dh_agreement_and_reproducible_from_rng(group, length):
    a, b = crypto.key_exchange(group, seeded(1)), crypto.key_exchange(group, seeded(2))
    assert len(a.public) == len(b.public) == length
    assert a.shared(b.public) == b.shared(a.public)
    assert crypto.key_exchange(group, seeded(1)).public == a.public  # the RNG decides
    assert a.public != b.public


@pytest.mark.parametrize("group,bad", [
    (DhId.CURVE25519, b"\x01" * 31), (DhId.ECP_256, b"\x01" * 64), (DhId.ECP_256, b"\x01" * 65),
    (DhId.MODP_2048, b"\x00" * 256), (DhId.MODP_2048, b"\xff" * 256), (DhId.MODP_2048, b"\x02"),
])
def test_bad_peer_ke_is_protocol_error(group, bad):
    with pytest.raises(IkeProtocolError):
        crypto.key_exchange(group, seeded(3)).shared(bad)


def test_unsupported_group_is_invalid_ke():
    with pytest.raises(IkeProtocolError) as e:
        crypto.key_exchange(DhId.MODP_1024, seeded(1))
    assert e.value.notify_type == NotifyType.INVALID_KE_PAYLOAD


def test_modp_shared_secret_is_padded_to_prime_length():
    """§2.14: g^ir is as long as the prime even when it has leading zero bytes (seeds 5 and 66
    give such a secret)."""
    a = crypto.key_exchange(DhId.MODP_2048, seeded(5))
    b = crypto.key_exchange(DhId.MODP_2048, seeded(66))
    s = a.shared(b.public)
    assert len(s) == 256 and s[0] == 0
    x = int.from_bytes(seeded(5)(32), "big") | (1 << 255)  # the exponent Modp2048Exchange draws
    assert s == pow(int.from_bytes(b.public, "big"), x, crypto.MODP_2048_P).to_bytes(256, "big")
    assert a.public == pow(2, x, crypto.MODP_2048_P).to_bytes(256, "big")


# --- SK ciphers -------------------------------------------------------------------------------

CIPHERS = [(EncrId.AES_GCM_16, 128, 0), (EncrId.AES_GCM_16, 256, 0),
           (EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128),
           (EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128),
           (EncrId.CHACHA20_POLY1305, None, 0)]


@pytest.mark.parametrize("encr,bits,integ", CIPHERS)
def test_cipher_seal_open_and_tamper(encr, bits, integ):
    c = crypto.IkeCipher.from_ids(encr, bits, integ)
    rng = seeded(7)
    sk_e, sk_a = rng(c.encr_key_len), rng(c.integ_key_len)
    iv, aad = rng(c.iv_len), b"header" * 5
    plain = b"x" * (32 if not c.encr.aead else 27)
    sealed = c.seal(sk_e, sk_a, iv, plain, aad)
    assert len(sealed) == len(plain) + c.icv_len
    assert c.open(sk_e, sk_a, iv, sealed, aad) == plain
    with pytest.raises(IkeIntegrityError):
        c.open(sk_e, sk_a, iv, sealed, aad + b"!")
    with pytest.raises(IkeIntegrityError):
        c.open(sk_e, sk_a, iv, bytes([sealed[0] ^ 1]) + sealed[1:], aad)


def test_cipher_key_lengths_and_names():
    gcm = crypto.IkeCipher.from_ids(EncrId.AES_GCM_16, 256)
    assert (gcm.encr_key_len, gcm.integ_key_len, gcm.iv_len, gcm.icv_len) == (36, 0, 8, 16)
    assert gcm.wireshark_ike_names() == ("AES-GCM-256 with 16 octet ICV [RFC5282]",
                                         "NONE [RFC4306]")
    cbc = crypto.IkeCipher.from_ids(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)
    assert (cbc.encr_key_len, cbc.integ_key_len, cbc.iv_len, cbc.icv_len) == (16, 32, 16, 16)
    assert cbc.wireshark_ike_names() == ("AES-CBC-128 [RFC3602]", "HMAC_SHA2_256_128 [RFC4868]")
    cc = crypto.IkeCipher.from_ids(EncrId.CHACHA20_POLY1305, None)
    assert (cc.encr_key_len, cc.key_bits) == (36, 256)
    assert {e.name for e in crypto.ENCRS.values()} == {"aes-gcm-16", "aes-cbc",
                                                        "chacha20-poly1305"}
    assert crypto.INTEGS[IntegId.HMAC_SHA2_256_128].name == "hmac-sha2-256-128"


@pytest.mark.parametrize("encr,bits,integ", [
    (EncrId.AES_GCM_16, None, 0), (EncrId.AES_GCM_16, 192, 0), (EncrId.AES_CBC, 128, 0),
    (EncrId.AES_GCM_16, 128, IntegId.HMAC_SHA2_256_128), (EncrId.TRIPLE_DES, None, 2),
    (EncrId.AES_CBC, 128, IntegId.HMAC_SHA1_96)])
def test_unsupported_transforms_are_no_proposal_chosen(encr, bits, integ):
    with pytest.raises(IkeProtocolError) as e:
        crypto.IkeCipher.from_ids(encr, bits, integ)
    assert e.value.notify_type == NotifyType.NO_PROPOSAL_CHOSEN


def test_wrong_key_length_is_a_protocol_error_not_a_crash():
    c = crypto.IkeCipher.from_ids(EncrId.AES_GCM_16, 128)
    with pytest.raises(IkeProtocolError):
        c.seal(b"k" * 16, b"", b"i" * 8, b"p", b"")
