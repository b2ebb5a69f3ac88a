"""Raw public keys for interop peers (RFC 7670 raw keys; strongSwan's `pubkeys`, libreswan's
`rsasigkey`), generated with `cryptography` so the tests need no `pki` run per key."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

# RSA size: 2048 is enough for interop and keeps key generation cheap on a shared 2-core box.
RSA_BITS = 2048


@dataclass(frozen=True)
class KeyPair:
    """A private key and its public half, with the encodings the peers read."""

    kind: str  # "ed25519", "rsa" or "ecdsa-p256"
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @property
    def vici_type(self) -> str:
        """charon's load-key type."""
        return {"ed25519": "ed25519", "rsa": "rsa", "ecdsa-p256": "ecdsa"}[self.kind]

    @property
    def public(self):
        return self.private.public_key()

    @property
    def private_pem(self) -> bytes:
        """PKCS#8 PEM: charon's `load-key` (type any/rsa/ed25519) reads it."""
        return self.private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    @property
    def public_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM: what swanctl's `pubkeys` takes (files or inline data)."""
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def rfc3110(self) -> str:
        """RSA public key in RFC 3110 §2 form, base64 (libreswan's `0s...`, IPSECKEY alg 2)."""
        if self.kind != "rsa":
            raise ValueError("RFC 3110 form exists for RSA keys only")
        nums = self.public.public_numbers()
        e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        head = bytes([len(e)]) if len(e) < 256 else b"\x00" + len(e).to_bytes(2, "big")
        return base64.b64encode(head + e + n).decode()

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        priv, pub = directory / f"{stem}.key.pem", directory / f"{stem}.pub.pem"
        priv.write_bytes(self.private_pem)
        priv.chmod(0o600)
        pub.write_bytes(self.public_pem)
        return priv, pub


def generate(kind: str) -> KeyPair:
    if kind == "ed25519":
        return KeyPair(kind, ed25519.Ed25519PrivateKey.generate())
    if kind == "rsa":
        return KeyPair(kind, rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS))
    if kind == "ecdsa-p256":
        return KeyPair(kind, ec.generate_private_key(ec.SECP256R1()))
    raise ValueError(f"unknown key kind {kind!r} (ed25519, rsa or ecdsa-p256)")


def load_public_pem(data: bytes):
    return serialization.load_pem_public_key(data)
