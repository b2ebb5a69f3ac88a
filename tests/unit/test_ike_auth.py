"""AUTH payloads: RFC 7427 signatures with their AlgorithmIdentifier, the legacy methods 1 and
9/10, PSK and AUTH_NULL, and the signed octets of RFC 7296 §2.15."""
from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from oe_agent.ike.auth import (AuthError, NullCredential, PskCredential, SignatureCredential,
                               SignatureScheme, algorithm_identifier, parse_algorithm_identifier,
                               sign, signed_octets, verify)
from oe_agent.ike.const import AuthMethod, HashAlgorithm


def prf(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


OCTETS = b"IKE_SA_INIT bytes" + b"\x11" * 32 + b"maced id"
ALL_HASHES = [2, 3, 4, 5]


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(65537, 2048)


# RFC 7427 Appendix A (and RFC 8420 §2 for Ed25519): the DER AlgorithmIdentifiers
APPENDIX_A = {
    SignatureScheme("rsa-pkcs1", "sha256"): "300d06092a864886f70d01010b0500",
    SignatureScheme("rsa-pkcs1", "sha384"): "300d06092a864886f70d01010c0500",
    SignatureScheme("rsa-pkcs1", "sha512"): "300d06092a864886f70d01010d0500",
    SignatureScheme("ecdsa", "sha256"): "300a06082a8648ce3d040302",
    SignatureScheme("ecdsa", "sha384"): "300a06082a8648ce3d040303",
    SignatureScheme("ecdsa", "sha512"): "300a06082a8648ce3d040304",
    SignatureScheme("ed25519"): "300506032b6570",
}


@pytest.mark.parametrize("scheme", APPENDIX_A, ids=str)
def test_algorithm_identifiers(scheme):
    blob = algorithm_identifier(scheme)
    assert blob.hex() == APPENDIX_A[scheme]
    parsed, off = parse_algorithm_identifier(bytes([len(blob)]) + blob + b"sig")
    assert parsed == scheme and off == 1 + len(blob)


def test_pss_identifier_round_trip():
    blob = algorithm_identifier(SignatureScheme("rsa-pss", "sha256", 32))
    assert blob.startswith(bytes.fromhex("3041" "06092a864886f70d01010a"))
    parsed, _ = parse_algorithm_identifier(bytes([len(blob)]) + blob)
    assert parsed == SignatureScheme("rsa-pss", "sha256", 32)


@pytest.mark.parametrize("bad", [b"", b"\x05\x30\x03\x06\x01", b"\x02\x30\x00",
                                 b"\x07" + bytes.fromhex("300506032b6571"),
                                 b"\x09\x30\x07\x06\x05\x2b\x0e\x03\x02\x1d"])
def test_bad_identifiers_are_auth_errors(bad):
    with pytest.raises(AuthError):
        parse_algorithm_identifier(bad)


def _keys(rsa_key):
    return {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "rsa": rsa_key,
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
    }


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "p256", "p384"])
@pytest.mark.parametrize("hashes", [ALL_HASHES, [2], None], ids=["all", "sha256", "none"])
def test_sign_verify(rsa_key, kind, hashes):
    key = _keys(rsa_key)[kind]
    method, data = sign(SignatureCredential(key), OCTETS, prf, b"", hashes)
    if hashes is None and kind == "rsa":
        assert method == AuthMethod.RSA_SIG  # RFC 7296 method 1 for peers without RFC 7427
    elif hashes is None and kind == "p256":
        assert method == AuthMethod.ECDSA_SHA256_P256 and len(data) == 64  # RFC 4754
    elif hashes is None and kind == "p384":
        assert method == AuthMethod.ECDSA_SHA384_P384 and len(data) == 96
    else:
        assert method == AuthMethod.DIGITAL_SIGNATURE
    assert verify(method, data, OCTETS, prf, b"", keys=[key.public_key()]) == "signature"
    with pytest.raises(AuthError):
        verify(method, data, OCTETS + b"x", prf, b"", keys=[key.public_key()])


def test_strongest_announced_hash_is_used(rsa_key):
    _, data = sign(SignatureCredential(rsa_key), OCTETS, prf, b"",
                   [HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384])
    scheme, _ = parse_algorithm_identifier(data)
    assert scheme == SignatureScheme("rsa-pss", "sha384", 48)
    _, data = sign(SignatureCredential(rsa_key, "pkcs1"), OCTETS, prf, b"", [2])
    assert parse_algorithm_identifier(data)[0] == SignatureScheme("rsa-pkcs1", "sha256")


def test_any_of_several_keys_verifies(rsa_key):
    k = ed25519.Ed25519PrivateKey.generate()
    method, data = sign(SignatureCredential(k), OCTETS, prf, b"", ALL_HASHES)
    others = [rsa_key.public_key(), ed25519.Ed25519PrivateKey.generate().public_key()]
    assert verify(method, data, OCTETS, prf, b"", keys=others + [k.public_key()])
    with pytest.raises(AuthError, match="any of 2"):
        verify(method, data, OCTETS, prf, b"", keys=others)
    with pytest.raises(AuthError, match="no public key"):
        verify(method, data, OCTETS, prf, b"", keys=[])


def test_psk_is_rfc7296_formula():
    method, data = sign(PskCredential(b"secret"), OCTETS, prf, b"", None)
    assert method == AuthMethod.SHARED_KEY_MIC
    assert data == prf(prf(b"secret", b"Key Pad for IKEv2"), OCTETS)
    assert verify(method, data, OCTETS, prf, b"", psk=b"secret") == "psk"
    with pytest.raises(AuthError):
        verify(method, data, OCTETS, prf, b"", psk=b"other")
    with pytest.raises(AuthError):
        verify(method, data, OCTETS, prf, b"")


def test_null_auth_keys_with_sk_p():
    method, data = sign(NullCredential(), OCTETS, prf, b"SK_pi", None)
    assert method == AuthMethod.NULL
    assert data == prf(prf(b"SK_pi", b"Key Pad for IKEv2"), OCTETS)  # RFC 7619 §2.1
    assert verify(method, data, OCTETS, prf, b"SK_pi", allow_null=True) == "null"
    with pytest.raises(AuthError, match="policy"):
        verify(method, data, OCTETS, prf, b"SK_pi")
    with pytest.raises(AuthError):
        verify(method, data, OCTETS, prf, b"SK_px", allow_null=True)


def test_signed_octets_layout():
    assert signed_octets(b"MSG", b"NONCE", prf, b"k", b"\x01\0\0\0\xc0\0\x02\x01") == (
        b"MSG" + b"NONCE" + prf(b"k", b"\x01\0\0\0\xc0\0\x02\x01"))


def test_unknown_method_refused():
    with pytest.raises(AuthError, match="not supported"):
        verify(3, b"x", OCTETS, prf, b"", keys=[ed25519.Ed25519PrivateKey.generate()
                                                .public_key()])
