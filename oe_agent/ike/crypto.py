"""IKEv2 cryptography, from the `cryptography` package only.

- Key exchange: DH 31 (X25519, RFC 8031), 19 (ECP-256, RFC 5903: KE data = X || Y, shared
  secret = x), 14 (MODP-2048, RFC 3526; g^ir zero-padded to the prime's length, §2.14).
  Private values come from the caller's RNG (`rng(n) -> bytes`), so a seeded RNG makes a whole
  exchange reproducible; the engine never uses a global RNG.
- PRF HMAC-SHA2-256/384/512 (RFC 4868), prf+ (RFC 7296 §2.13), SKEYSEED and the seven SK_*
  keys (§2.14), IKE SA rekey (§2.18), Child SA KEYMAT with optional PFS (§2.17).
- SK payload ciphers (§3.14): AES-GCM-16 (RFC 5282; key || 4-byte salt, 8-byte IV),
  ChaCha20-Poly1305 (RFC 7634; key || 4-byte salt, 8-byte IV), AES-CBC (16-byte IV) with
  HMAC-SHA2-256-128 (RFC 4868) over header..ciphertext.
- Descriptor tables: ENCR/INTEG/PRF/DH ids -> lengths, Wireshark names and model.EspAlgorithm
  names.
"""
from __future__ import annotations

import abc
import contextlib
import hmac as _hmac
import warnings
from dataclasses import dataclass
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from oe_agent.ike.const import DhId, EncrId, IntegId, NotifyType, PrfId
from oe_agent.ike.errors import IkeIntegrityError, IkeProtocolError

Rng = Callable[[int], bytes]

# --- PRF -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prf:
    """An HMAC PRF (RFC 4868 §2.1.2); key length = output length (RFC 7296 §2.14)."""

    id: int
    name: str
    hash: type

    @property
    def key_len(self) -> int:
        return self.hash.digest_size

    @property
    def out_len(self) -> int:
        return self.hash.digest_size

    def __call__(self, key: bytes, data: bytes) -> bytes:
        # the standard library's one-shot HMAC (OpenSSL underneath, like `cryptography`):
        # no HMAC object per call; the engine calls this ~10 times per handshake
        return _hmac.digest(key, data, self.hash.name)

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+ (§2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n); at most 255 rounds.
        The key is set up once; each round copies the keyed HMAC state."""
        if length > 255 * self.out_len:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "prf+ asked for too many bytes")
        keyed = _hmac.new(key, digestmod=self.hash.name)
        parts, t, got, n = [], b"", 0, 1
        while got < length:
            h = keyed.copy()
            h.update(t + seed + _ROUND[n])
            t = h.digest()
            parts.append(t)
            got += len(t)
            n += 1
        return b"".join(parts)[:length]


_ROUND = [bytes([n]) for n in range(256)]  # prf+ counter octets


PRFS: dict[int, Prf] = {
    PrfId.HMAC_SHA2_256: Prf(PrfId.HMAC_SHA2_256, "prf-hmac-sha2-256", hashes.SHA256),
    PrfId.HMAC_SHA2_384: Prf(PrfId.HMAC_SHA2_384, "prf-hmac-sha2-384", hashes.SHA384),
    PrfId.HMAC_SHA2_512: Prf(PrfId.HMAC_SHA2_512, "prf-hmac-sha2-512", hashes.SHA512),
}


def prf_for(prf_id: int) -> Prf:
    try:
        return PRFS[prf_id]
    except KeyError:
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN,
                               f"PRF {prf_id} not supported") from None


# --- integrity ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Integ:
    """HMAC-SHA2-N-N/2 (RFC 4868): key of the hash's length, ICV truncated to half of it."""

    id: int
    name: str  # model.EspAlgorithm.integ spelling
    hash: type
    icv_len: int
    wireshark_ike: str
    wireshark_esp: str

    @property
    def key_len(self) -> int:
        return self.hash.digest_size

    def icv(self, key: bytes, data: bytes) -> bytes:
        return _hmac.digest(key, data, self.hash.name)[:self.icv_len]

    def verify(self, key: bytes, data: bytes, icv: bytes) -> bool:
        return _hmac.compare_digest(self.icv(key, data), icv)


INTEGS: dict[int, Integ] = {
    IntegId.HMAC_SHA2_256_128: Integ(IntegId.HMAC_SHA2_256_128, "hmac-sha2-256-128", hashes.SHA256,
                                     16, "HMAC_SHA2_256_128 [RFC4868]",
                                     "HMAC-SHA-256-128 [RFC4868]"),
    IntegId.HMAC_SHA2_384_192: Integ(IntegId.HMAC_SHA2_384_192, "hmac-sha2-384-192", hashes.SHA384,
                                     24, "HMAC_SHA2_384_192 [RFC4868]",
                                     "HMAC-SHA-384-192 [RFC4868]"),
    IntegId.HMAC_SHA2_512_256: Integ(IntegId.HMAC_SHA2_512_256, "hmac-sha2-512-256", hashes.SHA512,
                                     32, "HMAC_SHA2_512_256 [RFC4868]",
                                     "HMAC-SHA-512-256 [RFC4868]"),
}


def integ_for(integ_id: int) -> Integ:
    try:
        return INTEGS[integ_id]
    except KeyError:
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN,
                               f"integrity {integ_id} not supported") from None


# --- encryption ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Encr:
    """An encryption transform: key sizes in bits, salt/IV/block/ICV lengths in bytes."""

    id: int
    name: str  # model.EspAlgorithm.encr spelling
    aead: bool
    key_bits: tuple[int, ...]
    salt_len: int
    iv_len: int
    block_len: int
    icv_len: int  # AEAD tag; 0 for CBC (the ICV comes from the INTEG transform)
    needs_key_length: bool  # KEY_LENGTH attribute required in the proposal (§3.3.5)

    def key_len(self, key_bits: int) -> int:
        """Bytes of SK_e / ESP key material: the key and the salt (RFC 5282 §7.1, RFC 7634 §2)."""
        return key_bits // 8 + self.salt_len

    def wireshark_ike(self, key_bits: int) -> str:
        if self.id == EncrId.AES_GCM_16:
            return f"AES-GCM-{key_bits} with 16 octet ICV [RFC5282]"
        if self.id == EncrId.AES_CBC:
            return f"AES-CBC-{key_bits} [RFC3602]"
        return "CHACHA20-POLY1305 [RFC7634]"

    def wireshark_esp(self, key_bits: int) -> str:
        if self.id == EncrId.AES_GCM_16:
            return "AES-GCM with 16 octet ICV [RFC4106]"
        if self.id == EncrId.AES_CBC:
            return "AES-CBC [RFC3602]"
        return "ChaCha20 with Poly1305 [RFC7634]"


ENCRS: dict[int, Encr] = {
    EncrId.AES_GCM_16: Encr(EncrId.AES_GCM_16, "aes-gcm-16", True, (128, 256), 4, 8, 1, 16, True),
    EncrId.AES_CBC: Encr(EncrId.AES_CBC, "aes-cbc", False, (128, 256), 0, 16, 16, 0, True),
    EncrId.CHACHA20_POLY1305: Encr(EncrId.CHACHA20_POLY1305, "chacha20-poly1305", True, (256,),
                                   4, 8, 1, 16, False),
}
ENCR_BY_NAME = {e.name: e for e in ENCRS.values()}
INTEG_BY_NAME = {i.name: i for i in INTEGS.values()}


def encr_for(encr_id: int, key_bits: int | None) -> tuple[Encr, int]:
    """The descriptor and key size for a proposed ENCR transform, or NO_PROPOSAL_CHOSEN."""
    e = ENCRS.get(encr_id)
    if e is None:
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, f"encryption {encr_id} not supported")
    bits = key_bits if key_bits is not None else (None if e.needs_key_length else e.key_bits[0])
    if bits not in e.key_bits:
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, f"{e.name} key length {key_bits}")
    return e, bits


@dataclass(frozen=True)
class IkeCipher:
    """The SK payload protection of one IKE SA (§3.14): an ENCR transform with its key size and,
    for non-AEAD ciphers, an INTEG transform. Keys are passed per call (SK_ei/SK_er differ)."""

    encr: Encr
    key_bits: int
    integ: Integ | None = None

    @classmethod
    def from_ids(cls, encr_id: int, key_bits: int | None, integ_id: int = 0) -> IkeCipher:
        e, bits = encr_for(encr_id, key_bits)
        if e.aead:
            if integ_id not in (0, None):
                raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN,
                                       "AEAD with an INTEG transform")
            return cls(e, bits, None)
        return cls(e, bits, integ_for(integ_id))

    @property
    def encr_key_len(self) -> int:
        return self.encr.key_len(self.key_bits)

    @property
    def integ_key_len(self) -> int:
        return self.integ.key_len if self.integ else 0

    @property
    def iv_len(self) -> int:
        return self.encr.iv_len

    @property
    def icv_len(self) -> int:
        return self.integ.icv_len if self.integ else self.encr.icv_len

    def pad_len(self, plain_len: int) -> int:
        """Padding octets before the pad-length octet (§3.14); AEAD needs none (RFC 5282 §3)."""
        b = self.encr.block_len
        return (-(plain_len + 1)) % b

    def wireshark_ike_names(self) -> tuple[str, str]:
        integ = self.integ.wireshark_ike if self.integ else "NONE [RFC4306]"
        return self.encr.wireshark_ike(self.key_bits), integ

    def _aead(self, sk_e: bytes):
        k = sk_e[:self.key_bits // 8]
        return AESGCM(k) if self.encr.id == EncrId.AES_GCM_16 else ChaCha20Poly1305(k)

    def _check_keys(self, sk_e: bytes, sk_a: bytes) -> None:
        if len(sk_e) != self.encr_key_len or len(sk_a) != self.integ_key_len:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX,
                                   f"key lengths {len(sk_e)}/{len(sk_a)} do not fit "
                                   f"{self.encr.name}-{self.key_bits}: need "
                                   f"{self.encr_key_len}/{self.integ_key_len}")

    def seal(self, sk_e: bytes, sk_a: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt padded `plaintext`; returns ciphertext || ICV (the SK payload after the IV).
        AEAD: `aad` = message start .. end of the SK generic header (RFC 5282 §5.1).
        CBC: the ICV is over `aad` || IV || ciphertext (§3.14)."""
        self._check_keys(sk_e, sk_a)
        if len(iv) != self.iv_len:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "IV length")
        if self.encr.aead:
            return self._aead(sk_e).encrypt(sk_e[-4:] + iv, plaintext, aad)
        if len(plaintext) % 16:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "CBC plaintext not block aligned")
        enc = Cipher(algorithms.AES(sk_e), modes.CBC(iv)).encryptor()
        ct = enc.update(plaintext) + enc.finalize()
        return ct + self.integ.icv(sk_a, aad + iv + ct)

    def open(self, sk_e: bytes, sk_a: bytes, iv: bytes, ct_icv: bytes, aad: bytes) -> bytes:
        """Inverse of seal(); IkeIntegrityError when the ICV does not verify."""
        self._check_keys(sk_e, sk_a)
        if len(iv) != self.iv_len or len(ct_icv) < self.icv_len:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "SK payload too short")
        if self.encr.aead:
            try:
                return self._aead(sk_e).decrypt(sk_e[-4:] + iv, ct_icv, aad)
            except InvalidTag:
                raise IkeIntegrityError() from None
        ct, icv = ct_icv[:-self.icv_len], ct_icv[-self.icv_len:]
        if not self.integ.verify(sk_a, aad + iv + ct, icv):
            raise IkeIntegrityError()
        if len(ct) % 16:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "CBC ciphertext not block aligned")
        dec = Cipher(algorithms.AES(sk_e), modes.CBC(iv)).decryptor()
        return dec.update(ct) + dec.finalize()


# --- key exchange -------------------------------------------------------------------------

# RFC 3526 §3, 2048-bit MODP group, generator 2
MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)


@contextlib.contextmanager
def _ffdh_allowed():
    """cryptography 50 warns that finite-field DH is deprecated (on every attribute access of
    its dh module); product §5 still needs group 14, so the warning is silenced here only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


with _ffdh_allowed():
    _DHParameterNumbers, _DHPublicNumbers, _DHPrivateNumbers = (
        dh.DHParameterNumbers, dh.DHPublicNumbers, dh.DHPrivateNumbers)
    _MODP_2048 = _DHParameterNumbers(MODP_2048_P, 2)
# order of the P-256 group (FIPS 186-4 D.1.2.3)
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class KeyExchangeMethod(abc.ABC):
    """One side of a DH exchange: `public` is the KE payload data; `shared(peer)` gives g^ir.

    A peer value of the wrong length or not on the curve/group raises IkeProtocolError
    (INVALID_SYNTAX), so a bad KE payload never escapes as another exception."""

    group: int
    public: bytes

    @abc.abstractmethod
    def shared(self, peer: bytes) -> bytes:
        """g^ir from the peer's KE data."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} group {self.group}>"


class X25519Exchange(KeyExchangeMethod):
    group = DhId.CURVE25519
    public_len = 32

    def __init__(self, rng: Rng):
        self._key = x25519.X25519PrivateKey.from_private_bytes(rng(32))
        self.public = self._key.public_key().public_bytes_raw()

    def shared(self, peer: bytes) -> bytes:
        if len(peer) != 32:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"X25519 KE of {len(peer)} bytes")
        try:
            return self._key.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
        except ValueError:  # all-zero result: a small-order point (RFC 7748 §6.1)
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "X25519 small-order KE") from None


class Ecp256Exchange(KeyExchangeMethod):
    group = DhId.ECP_256
    public_len = 64

    def __init__(self, rng: Rng):
        scalar = int.from_bytes(rng(40), "big") % (_P256_N - 1) + 1
        self._key = ec.derive_private_key(scalar, ec.SECP256R1())
        nums = self._key.public_key().public_numbers()
        self.public = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")  # RFC 5903 §7

    def shared(self, peer: bytes) -> bytes:
        if len(peer) != 64:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"ECP-256 KE of {len(peer)} bytes")
        try:
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + peer)
            return self._key.exchange(ec.ECDH(), pub)
        except ValueError:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX,
                                   "ECP-256 KE not on the curve") from None


class Modp2048Exchange(KeyExchangeMethod):
    group = DhId.MODP_2048
    public_len = 256

    def __init__(self, rng: Rng):
        # 256-bit exponent: twice the ~112-bit strength of the group (RFC 3526 §8)
        x = int.from_bytes(rng(32), "big") | (1 << 255)
        y = pow(2, x, MODP_2048_P)
        with _ffdh_allowed():
            pub = _DHPublicNumbers(y, _MODP_2048)
            self._key = _DHPrivateNumbers(x, pub).private_key()
        self.public = y.to_bytes(256, "big")

    def shared(self, peer: bytes) -> bytes:
        if len(peer) != 256:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, f"MODP-2048 KE of {len(peer)} bytes")
        y = int.from_bytes(peer, "big")
        if not 1 < y < MODP_2048_P - 1:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "MODP-2048 KE out of range")
        try:
            with _ffdh_allowed():
                s = self._key.exchange(_DHPublicNumbers(y, _MODP_2048).public_key())
        except ValueError:
            raise IkeProtocolError(NotifyType.INVALID_SYNTAX, "MODP-2048 KE rejected") from None
        return s.rjust(256, b"\0")  # g^ir has the prime's length (§2.14)


DH_GROUPS: dict[int, type[KeyExchangeMethod]] = {
    DhId.CURVE25519: X25519Exchange, DhId.ECP_256: Ecp256Exchange, DhId.MODP_2048: Modp2048Exchange,
}


def key_exchange(group: int, rng: Rng) -> KeyExchangeMethod:
    """A fresh private value for `group` drawn from `rng`; INVALID_KE_PAYLOAD if unsupported."""
    cls = DH_GROUPS.get(group)
    if cls is None:
        raise IkeProtocolError(NotifyType.INVALID_KE_PAYLOAD, f"DH group {group} not supported")
    return cls(rng)


# --- key derivation -----------------------------------------------------------------------

@dataclass(frozen=True)
class IkeKeys:
    """The seven keys of an IKE SA (§2.14), in prf+ order."""

    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes

    def outbound(self, initiator: bool) -> tuple[bytes, bytes]:
        """(SK_e, SK_a) to protect what this side sends."""
        return (self.sk_ei, self.sk_ai) if initiator else (self.sk_er, self.sk_ar)

    def inbound(self, initiator: bool) -> tuple[bytes, bytes]:
        """(SK_e, SK_a) to open what the peer sends."""
        return self.outbound(not initiator)


def skeyseed(prf: Prf, ni: bytes, nr: bytes, g_ir: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (§2.14)."""
    return prf(ni + nr, g_ir)


def skeyseed_rekey(prf_old: Prf, sk_d_old: bytes, g_ir_new: bytes, ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) with the old SA's PRF (§2.18)."""
    return prf_old(sk_d_old, g_ir_new + ni + nr)


def derive_ike_keys(prf: Prf, cipher: IkeCipher, seed: bytes, ni: bytes, nr: bytes,
                    spi_i: bytes, spi_r: bytes) -> IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr)."""
    lens = [prf.key_len, cipher.integ_key_len, cipher.integ_key_len, cipher.encr_key_len,
            cipher.encr_key_len, prf.key_len, prf.key_len]
    stream = prf.plus(seed, ni + nr + spi_i + spi_r, sum(lens))
    parts, off = [], 0
    for n in lens:
        parts.append(stream[off:off + n])
        off += n
    return IkeKeys(*parts)


@dataclass(frozen=True)
class ChildKeys:
    """ESP keys of a Child SA (§2.17): initiator->responder first, then responder->initiator."""

    encr_i: bytes
    integ_i: bytes
    encr_r: bytes
    integ_r: bytes


def child_keys(prf: Prf, sk_d: bytes, ni: bytes, nr: bytes, encr_len: int, integ_len: int,
               g_ir: bytes = b"") -> ChildKeys:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (§2.17), split encr/integ per direction.
    `encr_len` includes the salt for AEAD (Encr.key_len)."""
    km = prf.plus(sk_d, g_ir + ni + nr, 2 * (encr_len + integ_len))
    a = encr_len + integ_len
    return ChildKeys(km[:encr_len], km[encr_len:a], km[a:a + encr_len], km[a + encr_len:2 * a])


__all__ = [
    "Rng", "Prf", "PRFS", "prf_for", "Integ", "INTEGS", "integ_for", "Encr", "ENCRS", "encr_for",
    "ENCR_BY_NAME", "INTEG_BY_NAME", "IkeCipher", "KeyExchangeMethod", "X25519Exchange",
    "Ecp256Exchange", "Modp2048Exchange", "DH_GROUPS", "key_exchange", "IkeKeys", "skeyseed",
    "skeyseed_rekey", "derive_ike_keys", "ChildKeys", "child_keys", "MODP_2048_P",
]
