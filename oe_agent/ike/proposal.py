"""What we offer and what we accept: SA proposals (RFC 7296 §3.3) for IKE and ESP.

Proposals are written in strongSwan's syntax ("aes256gcm16-prfsha256-x25519", "aes128-sha256")
so a config line reads the same in oe-agent, strongSwan and the interop tests. As responder we
take the first of the peer's proposals that one of ours covers, choosing in each transform type
the first transform (in the peer's order) that we allow (§2.7). As initiator we check that the
responder's choice is one transform per type from the proposal it names.
"""
from __future__ import annotations

from dataclasses import dataclass

from oe_agent.ike.const import (DhId, EncrId, EsnId, IntegId, NotifyType, PrfId, ProtocolId,
                                TransformType)
from oe_agent.ike.errors import IkeProtocolError
from oe_agent.ike.payloads import Proposal, SecurityAssociation, Transform
from oe_agent.model import EspAlgorithm

# Default IKE offer (product.md §5): AES-GCM-16-256 / PRF-SHA2-256 / X25519 first.
DEFAULT_IKE = ("aes256gcm16-aes128gcm16-chacha20poly1305-prfsha256-prfsha384-prfsha512"
               "-x25519-ecp256-modp2048",
               "aes256-aes128-sha256-prfsha256-prfsha384-prfsha512-x25519-ecp256-modp2048")
DEFAULT_ESP = ("aes256gcm16-aes128gcm16-chacha20poly1305-noesn", "aes256-aes128-sha256-noesn")

AEAD = frozenset({EncrId.AES_GCM_16, EncrId.CHACHA20_POLY1305})

_TOKENS: dict[str, tuple[int, int, int | None]] = {
    "aes128gcm16": (TransformType.ENCR, EncrId.AES_GCM_16, 128),
    "aes192gcm16": (TransformType.ENCR, EncrId.AES_GCM_16, 192),
    "aes256gcm16": (TransformType.ENCR, EncrId.AES_GCM_16, 256),
    "aes128gcm": (TransformType.ENCR, EncrId.AES_GCM_16, 128),
    "aes256gcm": (TransformType.ENCR, EncrId.AES_GCM_16, 256),
    "aes128": (TransformType.ENCR, EncrId.AES_CBC, 128),
    "aes192": (TransformType.ENCR, EncrId.AES_CBC, 192),
    "aes256": (TransformType.ENCR, EncrId.AES_CBC, 256),
    "chacha20poly1305": (TransformType.ENCR, EncrId.CHACHA20_POLY1305, None),
    "sha256": (TransformType.INTEG, IntegId.HMAC_SHA2_256_128, None),
    "sha2_256": (TransformType.INTEG, IntegId.HMAC_SHA2_256_128, None),
    "sha384": (TransformType.INTEG, IntegId.HMAC_SHA2_384_192, None),
    "sha512": (TransformType.INTEG, IntegId.HMAC_SHA2_512_256, None),
    "prfsha256": (TransformType.PRF, PrfId.HMAC_SHA2_256, None),
    "prfsha384": (TransformType.PRF, PrfId.HMAC_SHA2_384, None),
    "prfsha512": (TransformType.PRF, PrfId.HMAC_SHA2_512, None),
    "x25519": (TransformType.DH, DhId.CURVE25519, None),
    "curve25519": (TransformType.DH, DhId.CURVE25519, None),
    "ecp256": (TransformType.DH, DhId.ECP_256, None),
    "modp2048": (TransformType.DH, DhId.MODP_2048, None),
    "esn": (TransformType.ESN, EsnId.ESN, None),
    "noesn": (TransformType.ESN, EsnId.NO_ESN, None),
}


_INTEG_PRF = {IntegId.HMAC_SHA2_256_128: PrfId.HMAC_SHA2_256,
              IntegId.HMAC_SHA2_384_192: PrfId.HMAC_SHA2_384,
              IntegId.HMAC_SHA2_512_256: PrfId.HMAC_SHA2_512}


class ProposalSyntaxError(ValueError):
    """A proposal string names an algorithm we do not implement."""


def parse_proposal(text: str, protocol: int, number: int = 1) -> Proposal:
    """'aes256gcm16-prfsha256-x25519' -> a Proposal payload value (SPI left empty).

    IKE proposals without a PRF get PRF-HMAC-SHA2-256; ESP proposals without an ESN token get
    NO_ESN; an ESP DH token asks for PFS in CREATE_CHILD_SA.
    """
    transforms: list[Transform] = []
    for tok in text.strip().lower().split("-"):
        if tok not in _TOKENS:
            raise ProposalSyntaxError(f"unknown algorithm {tok!r} in proposal {text!r} "
                                      f"(known: {', '.join(sorted(_TOKENS))})")
        ttype, tid, bits = _TOKENS[tok]
        t = Transform(ttype, tid, bits)
        if t not in transforms:
            transforms.append(t)
    types = {t.type for t in transforms}
    if TransformType.ENCR not in types:
        raise ProposalSyntaxError(f"proposal {text!r} has no encryption algorithm")
    encrs = [t for t in transforms if t.type == TransformType.ENCR]
    aead = {t.id in AEAD for t in encrs}
    if len(aead) > 1:
        raise ProposalSyntaxError(f"proposal {text!r} mixes AEAD and non-AEAD ciphers")
    is_aead = aead.pop()
    if not is_aead and TransformType.INTEG not in types:
        raise ProposalSyntaxError(f"proposal {text!r}: AES-CBC needs an integrity algorithm")
    if is_aead and TransformType.INTEG in types:
        if protocol != ProtocolId.IKE or TransformType.PRF in types:
            raise ProposalSyntaxError(f"proposal {text!r}: an AEAD cipher takes no integrity")
        # strongSwan reads "aes128gcm16-sha256-x25519" as PRF-HMAC-SHA2-256 for IKE
        transforms = [Transform(TransformType.PRF, _INTEG_PRF[t.id]) if
                      t.type == TransformType.INTEG else t for t in transforms]
        types = {t.type for t in transforms}
    if protocol == ProtocolId.IKE:
        if TransformType.ESN in types:
            raise ProposalSyntaxError(f"ESN is an ESP transform, not IKE ({text!r})")
        if TransformType.PRF not in types:
            transforms.append(Transform(TransformType.PRF, PrfId.HMAC_SHA2_256))
        if TransformType.DH not in types:
            raise ProposalSyntaxError(f"IKE proposal {text!r} has no DH group")
    else:
        if TransformType.PRF in types:
            raise ProposalSyntaxError(f"PRF is an IKE transform, not ESP ({text!r})")
        if TransformType.ESN not in types:
            transforms.append(Transform(TransformType.ESN, EsnId.NO_ESN))
    order = [TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH,
             TransformType.ESN]
    transforms.sort(key=lambda t: order.index(t.type))
    return Proposal(number, protocol, b"", tuple(transforms))


def proposals(texts: tuple[str, ...] | list[str], protocol: int) -> tuple[Proposal, ...]:
    return tuple(parse_proposal(t, protocol, i + 1) for i, t in enumerate(texts))


@dataclass(frozen=True)
class Suite:
    """The algorithms one SA runs with (one transform per type)."""

    encr: int
    encr_bits: int | None
    integ: int | None
    prf: int | None
    dh: int | None
    esn: bool = False

    @property
    def aead(self) -> bool:
        return self.encr in AEAD

    @classmethod
    def from_proposal(cls, p: Proposal) -> Suite:
        def one(ttype: int) -> Transform | None:
            ts = p.transforms_of(ttype)
            return ts[0] if ts else None

        encr, integ, prf, dh, esn = (one(t) for t in (TransformType.ENCR, TransformType.INTEG,
                                                      TransformType.PRF, TransformType.DH,
                                                      TransformType.ESN))
        if encr is None:
            raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "proposal without ENCR")
        return cls(encr.id, encr.key_length, integ.id if integ and integ.id else None,
                   prf.id if prf else None, dh.id if dh and dh.id else None,
                   bool(esn and esn.id == EsnId.ESN))

    # --- ESP view (for ChildSaParams and KEYMAT, RFC 7296 §2.17) ---
    def esp_algorithm(self) -> EspAlgorithm:
        if self.encr == EncrId.AES_GCM_16:
            return EspAlgorithm("aes-gcm-16", self.encr_bits or 128)
        if self.encr == EncrId.CHACHA20_POLY1305:
            return EspAlgorithm("chacha20-poly1305", 256)
        if self.encr == EncrId.AES_CBC and self.integ == IntegId.HMAC_SHA2_256_128:
            return EspAlgorithm("aes-cbc", self.encr_bits or 128, "hmac-sha2-256-128")
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, f"no ESP algorithm for {self}")

    def esp_key_sizes(self) -> tuple[int, int]:
        """(encryption key bytes incl. AEAD salt, integrity key bytes) per direction."""
        alg = self.esp_algorithm()
        if alg.encr == "aes-gcm-16":
            return alg.encr_key_bits // 8 + 4, 0  # RFC 4106 §8.1: 4-byte salt
        if alg.encr == "chacha20-poly1305":
            return 36, 0  # RFC 7634 §2: 32-byte key + 4-byte salt
        return alg.encr_key_bits // 8, 32


def _allowed(ours: Proposal) -> dict[int, list[Transform]]:
    out: dict[int, list[Transform]] = {}
    for t in ours.transforms:
        out.setdefault(t.type, []).append(t)
    return out


def _match(peer: Proposal, ours: Proposal) -> tuple[Transform, ...] | None:
    """One transform per type from `peer` (its order) that `ours` allows, or None."""
    allowed = _allowed(ours)
    peer_types = {t.type for t in peer.transforms}
    chosen = []
    for ttype in sorted(peer_types | set(allowed)):
        offered = [t for t in peer.transforms if t.type == ttype]
        ok = allowed.get(ttype)
        if ok is None:
            # we do not use this type: acceptable only if the peer also offers "none"
            if ttype == TransformType.INTEG and any(t.id == IntegId.NONE for t in offered):
                continue
            if ttype == TransformType.DH and any(t.id == DhId.NONE for t in offered):
                continue
            if ttype == TransformType.ESN and any(t.id == EsnId.NO_ESN for t in offered):
                chosen.append(Transform(TransformType.ESN, EsnId.NO_ESN))
                continue
            return None
        if not offered:
            if ttype == TransformType.ESN:
                continue  # absent ESN means no ESN
            if ttype == TransformType.INTEG and all(
                    t.id in AEAD for t in peer.transforms if t.type == TransformType.ENCR):
                continue
            return None
        pick = next((t for t in offered if _same(t, ok)), None)
        if pick is None:
            return None
        chosen.append(Transform(pick.type, pick.id, pick.key_length))
    return tuple(chosen)


def _same(t: Transform, allowed: list[Transform]) -> bool:
    return any(t.id == a.id and t.key_length == a.key_length for a in allowed)


def select(peer_sa: SecurityAssociation, ours: tuple[Proposal, ...], protocol: int,
           ke_group: int | None = None) -> Proposal:
    """Responder's choice: the first peer proposal one of ours covers (§2.7); its SPI is the
    peer's. `ke_group` prefers the group of the peer's KE payload when the peer offers it, so an
    acceptable KE is not answered with INVALID_KE_PAYLOAD. Raises NO_PROPOSAL_CHOSEN."""
    for peer in peer_sa.proposals:
        if peer.protocol != protocol:
            continue
        for mine in ours:
            chosen = _match(peer, mine)
            if chosen is None:
                continue
            if ke_group is not None:
                offered = [t.id for t in peer.transforms_of(TransformType.DH)]
                allowed = [t.id for t in mine.transforms_of(TransformType.DH)]
                if ke_group in offered and ke_group in allowed:
                    chosen = tuple(Transform(TransformType.DH, ke_group) if t.type ==
                                   TransformType.DH else t for t in chosen)
            return Proposal(peer.number, protocol, peer.spi, chosen)
    raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "none of the peer's proposals fits")


def check_choice(answer: SecurityAssociation, offered: tuple[Proposal, ...],
                 protocol: int) -> Proposal:
    """Initiator's check of the responder's SA: one proposal, ours by number, one transform of
    each type we offered, each one we offered in that proposal (§2.7)."""
    if len(answer.proposals) != 1:
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN,
                               f"responder chose {len(answer.proposals)} proposals")
    got = answer.proposals[0]
    mine = next((p for p in offered if p.number == got.number), None)
    if mine is None or got.protocol != protocol:
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN,
                               f"responder chose proposal {got.number} we did not offer")
    allowed = _allowed(mine)
    seen: set[int] = set()
    for t in got.transforms:
        if t.type in seen:
            raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN, "two transforms of one type")
        seen.add(t.type)
        if not _same(t, allowed.get(t.type, [])) and not (
                t.type == TransformType.ESN and t.id == EsnId.NO_ESN
                and TransformType.ESN not in allowed):
            raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN,
                                   f"responder chose transform {t.type}/{t.id} we did not offer")
    missing = {ty for ty in allowed if ty != TransformType.ESN} - seen
    if missing:
        raise IkeProtocolError(NotifyType.NO_PROPOSAL_CHOSEN,
                               f"responder's choice lacks transform types {sorted(missing)}")
    return got


def with_spi(ps: tuple[Proposal, ...], spi: bytes) -> tuple[Proposal, ...]:
    return tuple(Proposal(p.number, p.protocol, spi, p.transforms) for p in ps)


def without_dh(ps: tuple[Proposal, ...]) -> tuple[Proposal, ...]:
    """ESP proposals for IKE_AUTH: no DH transform there (§1.2)."""
    return tuple(Proposal(p.number, p.protocol, p.spi,
                          tuple(t for t in p.transforms if t.type != TransformType.DH))
                 for p in ps)


def dh_groups(ps: tuple[Proposal, ...]) -> list[int]:
    """DH groups in offer order (the first is the one we send a KE for)."""
    out: list[int] = []
    for p in ps:
        for t in p.transforms_of(TransformType.DH):
            if t.id and t.id not in out:
                out.append(t.id)
    return out
