"""IKE_AUTH authentication: the signed octets (RFC 7296 §2.15) and every AUTH method we speak.

- method 14, digital signature (RFC 7427): Ed25519 (RFC 8420), RSA-PSS, RSA PKCS#1 v1.5 and
  ECDSA with SHA2-256/384/512, each announced by its ASN.1 AlgorithmIdentifier (RFC 7427 App. A);
- method 1, RSA PKCS#1 v1.5 with SHA-1 (RFC 7296 §3.8), accepted from old peers and used only
  when the peer sent no SIGNATURE_HASH_ALGORITHMS;
- methods 9/10, ECDSA with a fixed curve and hash (RFC 4754), for the same peers;
- method 2, pre-shared key: prf(prf(secret, "Key Pad for IKEv2"), octets);
- method 13, AUTH_NULL (RFC 7619 §2.1): the PSK computation keyed with SK_pi / SK_pr.

Pure functions; the PRF is passed in as a callable (key, data) -> bytes.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature, encode_dss_signature)

from oe_agent.ike.const import AuthMethod, HashAlgorithm

Prf = Callable[[bytes, bytes], bytes]
PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey

KEY_PAD = b"Key Pad for IKEv2"  # RFC 7296 §2.15

# Hashes we announce in SIGNATURE_HASH_ALGORITHMS (RFC 7427 §4; IDENTITY for Ed25519, RFC 8420).
OUR_HASH_ALGORITHMS = (HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512,
                       HashAlgorithm.IDENTITY)


class AuthError(Exception):
    """The AUTH payload is malformed or does not verify (-> AUTHENTICATION_FAILED)."""


# ---------------------------------------------------------------- ASN.1 (just enough DER)

def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(nb)]) + nb + body


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _seq(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


_NULL = b"\x05\x00"
_OID_RSA_PKCS1 = {"sha1": "1.2.840.113549.1.1.5", "sha256": "1.2.840.113549.1.1.11",
                  "sha384": "1.2.840.113549.1.1.12", "sha512": "1.2.840.113549.1.1.13"}
_OID_ECDSA = {"sha256": "1.2.840.10045.4.3.2", "sha384": "1.2.840.10045.4.3.3",
              "sha512": "1.2.840.10045.4.3.4"}
_OID_HASH = {"sha256": "2.16.840.1.101.3.4.2.1", "sha384": "2.16.840.1.101.3.4.2.2",
             "sha512": "2.16.840.1.101.3.4.2.3", "sha1": "1.3.14.3.2.26"}
_OID_PSS = "1.2.840.113549.1.1.10"
_OID_MGF1 = "1.2.840.113549.1.1.8"
_OID_ED25519 = "1.3.101.112"
_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
           "sha512": hashes.SHA512}
_HASH_BY_ID = {HashAlgorithm.SHA2_256: "sha256", HashAlgorithm.SHA2_384: "sha384",
               HashAlgorithm.SHA2_512: "sha512"}


def _pss_blob(h: str) -> bytes:
    """RSASSA-PSS AlgorithmIdentifier with MGF1 of the same hash, salt = hash length (App. A.4)."""
    hash_alg = _seq(_oid(_OID_HASH[h]), _NULL)
    params = _seq(_der(0xA0, hash_alg), _der(0xA1, _seq(_oid(_OID_MGF1), hash_alg)),
                  _der(0xA2, _der(0x02, bytes([_HASHES[h].digest_size]))))
    return _seq(_oid(_OID_PSS), params)


@lru_cache(maxsize=32)
def algorithm_identifier(scheme: "SignatureScheme") -> bytes:
    """The DER AlgorithmIdentifier that precedes a method-14 signature (RFC 7427 §3); a few
    fixed values, so built once each."""
    if scheme.kind == "ed25519":
        return _seq(_oid(_OID_ED25519))
    if scheme.kind == "rsa-pss":
        return _pss_blob(scheme.hash)
    if scheme.kind == "rsa-pkcs1":
        return _seq(_oid(_OID_RSA_PKCS1[scheme.hash]), _NULL)
    return _seq(_oid(_OID_ECDSA[scheme.hash]))


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, body, next position); AuthError on anything truncated or oversized."""
    if pos + 2 > len(data):
        raise AuthError("truncated ASN.1")
    tag, n = data[pos], data[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 2 or pos + k > len(data):
            raise AuthError("bad ASN.1 length")
        n = int.from_bytes(data[pos:pos + k], "big")
        pos += k
    if pos + n > len(data):
        raise AuthError("truncated ASN.1")
    return tag, data[pos:pos + n], pos + n


def _oid_text(body: bytes) -> str:
    if not body:
        raise AuthError("empty OID")
    parts = [min(body[0] // 40, 2), body[0] - 40 * min(body[0] // 40, 2)]
    v = 0
    for b in body[1:]:
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(v)
            v = 0
    return ".".join(map(str, parts))


@dataclass(frozen=True)
class SignatureScheme:
    """kind: 'ed25519' | 'rsa-pss' | 'rsa-pkcs1' | 'ecdsa'; hash: 'sha1'/'sha256'/... ('' for
    Ed25519); salt_len for PSS."""

    kind: str
    hash: str = ""
    salt_len: int = 0


def parse_algorithm_identifier(data: bytes) -> tuple[SignatureScheme, int]:
    """Split method-14 AUTH data: (scheme, offset of the signature) (RFC 7427 §3)."""
    if not data:
        raise AuthError("empty AUTH data")
    n = data[0]
    blob = data[1:1 + n]
    if len(blob) != n:
        raise AuthError("AlgorithmIdentifier longer than AUTH data")
    return _scheme_of(bytes(blob)), 1 + n


@lru_cache(maxsize=64)
def _scheme_of(blob: bytes) -> SignatureScheme:
    """The scheme an AlgorithmIdentifier names (peers send the same few blobs every time)."""
    tag, body, end = _read_tlv(blob, 0)
    if tag != 0x30 or end != len(blob):
        raise AuthError("AlgorithmIdentifier is not one SEQUENCE")
    tag, oid_body, pos = _read_tlv(body, 0)
    if tag != 0x06:
        raise AuthError("AlgorithmIdentifier without OID")
    oid = _oid_text(oid_body)
    if oid == _OID_ED25519:
        return SignatureScheme("ed25519")
    for h, o in _OID_RSA_PKCS1.items():
        if oid == o:
            return SignatureScheme("rsa-pkcs1", h)
    for h, o in _OID_ECDSA.items():
        if oid == o:
            return SignatureScheme("ecdsa", h)
    if oid == _OID_PSS:
        return _parse_pss_params(body[pos:])
    raise AuthError(f"signature algorithm {oid} not supported")


def _parse_pss_params(rest: bytes) -> SignatureScheme:
    """RSASSA-PSS-params (RFC 4055 §3.1): hash, MGF1 hash (must match), salt length."""
    h, salt = "sha1", 20  # the ASN.1 defaults
    tag, params, _ = _read_tlv(rest, 0)
    if tag != 0x30:
        raise AuthError("bad RSASSA-PSS params")
    pos = 0
    mgf_hash = "sha1"
    while pos < len(params):
        tag, body, pos = _read_tlv(params, pos)
        if tag == 0xA0:
            h = _hash_name(body)
        elif tag == 0xA1:
            _, mgf, _ = _read_tlv(body, 0)
            _, mgf_oid, p2 = _read_tlv(mgf, 0)
            if _oid_text(mgf_oid) != _OID_MGF1:
                raise AuthError("PSS mask function is not MGF1")
            mgf_hash = _hash_name(mgf[p2:])
        elif tag == 0xA2:
            _, ib, _ = _read_tlv(body, 0)
            if not ib or len(ib) > 2:
                raise AuthError("bad PSS salt length")
            salt = int.from_bytes(ib, "big")
    if mgf_hash != h:
        raise AuthError("PSS with a different MGF1 hash is not supported")
    if h == "sha1":
        raise AuthError("RSA-PSS with SHA-1 is not accepted")
    return SignatureScheme("rsa-pss", h, salt)


def _hash_name(seq: bytes) -> str:
    _, alg, _ = _read_tlv(seq, 0)
    _, oid_body, _ = _read_tlv(alg, 0)
    oid = _oid_text(oid_body)
    for name, o in _OID_HASH.items():
        if o == oid:
            return name
    raise AuthError(f"hash {oid} not supported")


# ---------------------------------------------------------------- signed octets

def signed_octets(real_message: bytes, peer_nonce: bytes, prf: Prf, sk_p: bytes,
                  id_body: bytes) -> bytes:
    """RealMessage | Nonce(peer) | prf(SK_px, RestOfIDPayload) (RFC 7296 §2.15).

    `real_message` is our (or the peer's) IKE_SA_INIT message as sent; `id_body` is the ID
    payload without its generic header (ID type, 3 reserved octets, data).
    """
    return real_message + peer_nonce + prf(sk_p, id_body)


# ---------------------------------------------------------------- credentials (our side)

@dataclass(frozen=True)
class SignatureCredential:
    """Our private key. `rsa_padding` chooses PSS (default) or PKCS#1 v1.5 for RSA keys."""

    key: PrivateKey
    rsa_padding: str = "pss"


@dataclass(frozen=True)
class PskCredential:
    secret: bytes


@dataclass(frozen=True)
class NullCredential:
    """Anonymous (RFC 7619): ID_NULL and AUTH_NULL."""


Credential = SignatureCredential | PskCredential | NullCredential


def _pick_hash(peer_hashes: Iterable[int], key_bits: int = 0) -> str:
    """The strongest SHA-2 the peer announced (SHA2-256 when it announced none we know)."""
    peer = set(peer_hashes)
    for hid in (HashAlgorithm.SHA2_512, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_256):
        if hid in peer:
            if hid == HashAlgorithm.SHA2_512 and 0 < key_bits < 1024:
                continue
            return _HASH_BY_ID[hid]
    return "sha256"


def _curve_hash(curve: ec.EllipticCurve) -> str:
    return {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}.get(
        curve.name, "sha256")


def sign(cred: Credential, octets: bytes, prf: Prf, sk_p: bytes,
         peer_hashes: Sequence[int] | None) -> tuple[int, bytes]:
    """(AUTH method, AUTH data) proving `octets` with our credential.

    `peer_hashes` is the peer's SIGNATURE_HASH_ALGORITHMS (None if it sent none: then RSA falls
    back to method 1 and ECDSA to methods 9/10, which every IKEv2 peer knows).
    """
    if isinstance(cred, PskCredential):
        return AuthMethod.SHARED_KEY_MIC, prf(prf(cred.secret, KEY_PAD), octets)
    if isinstance(cred, NullCredential):
        return AuthMethod.NULL, prf(prf(sk_p, KEY_PAD), octets)
    key = cred.key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        scheme = SignatureScheme("ed25519")
        return AuthMethod.DIGITAL_SIGNATURE, _with_ai(scheme, key.sign(octets))
    if isinstance(key, rsa.RSAPrivateKey):
        if peer_hashes is None:
            return AuthMethod.RSA_SIG, key.sign(octets, padding.PKCS1v15(), hashes.SHA1())
        h = _pick_hash(peer_hashes, key.key_size)
        if cred.rsa_padding == "pkcs1":
            return AuthMethod.DIGITAL_SIGNATURE, _with_ai(
                SignatureScheme("rsa-pkcs1", h), key.sign(octets, padding.PKCS1v15(),
                                                          _HASHES[h]()))
        salt = _HASHES[h].digest_size
        sig = key.sign(octets, padding.PSS(padding.MGF1(_HASHES[h]()), salt), _HASHES[h]())
        return AuthMethod.DIGITAL_SIGNATURE, _with_ai(SignatureScheme("rsa-pss", h, salt), sig)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        h = _curve_hash(key.curve)
        der = key.sign(octets, ec.ECDSA(_HASHES[h]()))
        if peer_hashes is None and h in ("sha256", "sha384"):
            r, s = decode_dss_signature(der)
            n = (key.curve.key_size + 7) // 8
            method = AuthMethod.ECDSA_SHA256_P256 if h == "sha256" else AuthMethod.ECDSA_SHA384_P384
            return method, r.to_bytes(n, "big") + s.to_bytes(n, "big")
        return AuthMethod.DIGITAL_SIGNATURE, _with_ai(SignatureScheme("ecdsa", h), der)
    raise AuthError(f"unsupported private key type {type(key).__name__}")


def _with_ai(scheme: SignatureScheme, sig: bytes) -> bytes:
    ai = algorithm_identifier(scheme)
    return bytes([len(ai)]) + ai + sig


# ---------------------------------------------------------------- verification (peer's side)

def verify(method: int, data: bytes, octets: bytes, prf: Prf, sk_p: bytes, *,
           keys: Sequence[PublicKey] = (), psk: bytes | None = None,
           allow_null: bool = False) -> str:
    """Check the peer's AUTH payload; returns how it authenticated ('signature', 'psk', 'null').

    `keys` are the peer's acceptable public keys (any one may verify: DNS may publish several),
    `psk` its shared secret, `allow_null` whether AUTH_NULL is acceptable. Raises AuthError.
    """
    if method == AuthMethod.SHARED_KEY_MIC:
        if psk is None:
            raise AuthError("peer used a pre-shared key; none is configured for it")
        if not hmac.compare_digest(prf(prf(psk, KEY_PAD), octets), data):
            raise AuthError("pre-shared key AUTH does not match")
        return "psk"
    if method == AuthMethod.NULL:
        if not allow_null:
            raise AuthError("peer used AUTH_NULL; policy needs authentication")
        if not hmac.compare_digest(prf(prf(sk_p, KEY_PAD), octets), data):
            raise AuthError("AUTH_NULL value does not match")
        return "null"
    if not keys:
        raise AuthError("no public key for the peer")
    if method == AuthMethod.DIGITAL_SIGNATURE:
        scheme, off = parse_algorithm_identifier(data)
        sig = data[off:]
    elif method == AuthMethod.RSA_SIG:
        scheme, sig = SignatureScheme("rsa-pkcs1", "sha1"), data
    elif method in (AuthMethod.ECDSA_SHA256_P256, AuthMethod.ECDSA_SHA384_P384,
                    AuthMethod.ECDSA_SHA512_P521):
        h = {AuthMethod.ECDSA_SHA256_P256: "sha256", AuthMethod.ECDSA_SHA384_P384: "sha384",
             AuthMethod.ECDSA_SHA512_P521: "sha512"}[AuthMethod(method)]
        if len(data) % 2 or not data:
            raise AuthError("bad ECDSA signature length")
        half = len(data) // 2
        sig = encode_dss_signature(int.from_bytes(data[:half], "big"),
                                   int.from_bytes(data[half:], "big"))
        scheme = SignatureScheme("ecdsa", h)
    else:
        raise AuthError(f"AUTH method {method} not supported")
    for key in keys:
        if _verify_one(key, scheme, sig, octets):
            return "signature"
    raise AuthError(f"{scheme.kind} signature does not verify with any of {len(keys)} key(s)")


def _verify_one(key: PublicKey, scheme: SignatureScheme, sig: bytes, octets: bytes) -> bool:
    try:
        if scheme.kind == "ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, octets)
            return True
        if scheme.kind == "rsa-pkcs1" and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, octets, padding.PKCS1v15(), _HASHES[scheme.hash]())
            return True
        if scheme.kind == "rsa-pss" and isinstance(key, rsa.RSAPublicKey):
            h = _HASHES[scheme.hash]()
            key.verify(sig, octets, padding.PSS(padding.MGF1(h), scheme.salt_len), h)
            return True
        if scheme.kind == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, octets, ec.ECDSA(_HASHES[scheme.hash]()))
            return True
    except (InvalidSignature, ValueError):
        return False
    return False
