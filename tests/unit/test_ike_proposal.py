"""Proposals: strongSwan-syntax offers, the responder's choice (RFC 7296 §2.7) and the
initiator's check of it."""
from __future__ import annotations

import pytest

from oe_agent.ike.const import (DhId, EncrId, EsnId, IntegId, NotifyType, PrfId, ProtocolId,
                                TransformType)
from oe_agent.ike.errors import IkeProtocolError
from oe_agent.ike.payloads import Proposal, SecurityAssociation, Transform
from oe_agent.ike.proposal import (DEFAULT_ESP, DEFAULT_IKE, ProposalSyntaxError, Suite,
                                   check_choice, dh_groups, parse_proposal, proposals, select,
                                   with_spi, without_dh)

IKE, ESP = ProtocolId.IKE, ProtocolId.ESP


def test_default_ike_offer_starts_with_gcm256_sha256_x25519():
    first = proposals(DEFAULT_IKE, IKE)[0]
    assert first.transforms_of(TransformType.ENCR)[0] == Transform(1, EncrId.AES_GCM_16, 256)
    assert first.transforms_of(TransformType.PRF)[0].id == PrfId.HMAC_SHA2_256
    assert first.transforms_of(TransformType.DH)[0].id == DhId.CURVE25519
    assert dh_groups(proposals(DEFAULT_IKE, IKE)) == [31, 19, 14]


def test_aead_ike_integ_token_means_prf():
    p = parse_proposal("aes256gcm16-sha384-x25519", IKE)
    assert p.transforms_of(TransformType.PRF)[0].id == PrfId.HMAC_SHA2_384
    assert not p.transforms_of(TransformType.INTEG)


def test_parse_fills_prf_and_esn():
    p = parse_proposal("aes128-sha256-modp2048", IKE)
    assert [t.type for t in p.transforms] == [1, 2, 3, 4]
    e = parse_proposal("aes128gcm16", ESP)
    assert e.transforms[-1] == Transform(TransformType.ESN, EsnId.NO_ESN)


@pytest.mark.parametrize("text,proto", [("aes999", IKE), ("aes128gcm16-sha256", ESP),
                                        ("aes128gcm16-sha256-prfsha256-x25519", IKE),
                                        ("aes128-x25519", IKE), ("aes128gcm16-prfsha256", IKE),
                                        ("aes128gcm16-esn-x25519", IKE),
                                        ("aes128gcm16-prfsha256", ESP), ("x25519", ESP)])
def test_bad_proposals(text, proto):
    with pytest.raises(ProposalSyntaxError):
        parse_proposal(text, proto)


def test_responder_takes_first_peer_proposal_it_accepts():
    peer = proposals(("aes256gcm16-prfsha512-ecp256", "aes128-sha256-prfsha256-modp2048"), IKE)
    ours = proposals(("aes128-aes256-sha256-prfsha256-modp2048-x25519",), IKE)
    chosen = select(SecurityAssociation(peer), ours, IKE)
    assert chosen.number == 2
    s = Suite.from_proposal(chosen)
    assert (s.encr, s.encr_bits, s.integ, s.prf, s.dh) == (EncrId.AES_CBC, 128,
                                                           IntegId.HMAC_SHA2_256_128,
                                                           PrfId.HMAC_SHA2_256, DhId.MODP_2048)


def test_peer_transform_order_wins_within_a_proposal():
    peer = proposals(("aes128gcm16-aes256gcm16-prfsha384-prfsha256-ecp256-x25519",), IKE)
    chosen = select(SecurityAssociation(peer), proposals(DEFAULT_IKE, IKE), IKE)
    s = Suite.from_proposal(chosen)
    assert (s.encr_bits, s.prf, s.dh) == (128, PrfId.HMAC_SHA2_384, DhId.ECP_256)
    # ...unless the peer's KE already uses another group it offers: no INVALID_KE round trip
    s = Suite.from_proposal(select(SecurityAssociation(peer), proposals(DEFAULT_IKE, IKE), IKE,
                                   ke_group=31))
    assert s.dh == 31


def test_no_proposal_chosen():
    peer = proposals(("aes128-sha256-prfsha256-modp2048",), IKE)
    with pytest.raises(IkeProtocolError) as e:
        select(SecurityAssociation(peer), proposals(("aes256gcm16-x25519",), IKE), IKE)
    assert e.value.notify_type == NotifyType.NO_PROPOSAL_CHOSEN
    with pytest.raises(IkeProtocolError):  # wrong protocol
        select(SecurityAssociation(peer), proposals(DEFAULT_ESP, ESP), ESP)


def test_unknown_transforms_are_skipped_not_fatal():
    odd = Proposal(1, IKE, b"", (Transform(1, 99), Transform(1, EncrId.AES_GCM_16, 128),
                                 Transform(2, 77), Transform(2, PrfId.HMAC_SHA2_256),
                                 Transform(4, 31)))
    s = Suite.from_proposal(select(SecurityAssociation((odd,)), proposals(DEFAULT_IKE, IKE), IKE))
    assert s.encr == EncrId.AES_GCM_16 and s.prf == PrfId.HMAC_SHA2_256


def test_esp_choice_with_spi_and_esn():
    offer = with_spi(proposals(("aes256gcm16-esn-noesn",), ESP), b"\x01\x02\x03\x04")
    chosen = select(SecurityAssociation(offer), proposals(DEFAULT_ESP, ESP), ESP)
    assert chosen.spi == b"\x01\x02\x03\x04"
    assert Suite.from_proposal(chosen).esn is False  # we offer only NO_ESN
    assert Suite.from_proposal(chosen).esp_algorithm().encr == "aes-gcm-16"
    assert Suite.from_proposal(chosen).esp_key_sizes() == (36, 0)


def test_without_dh_for_ike_auth():
    p, = without_dh(proposals(("aes128gcm16-x25519",), ESP))
    assert not p.transforms_of(TransformType.DH)


def test_initiator_checks_the_choice():
    offered = proposals(DEFAULT_IKE, IKE)
    good = select(SecurityAssociation(offered), offered, IKE)
    assert check_choice(SecurityAssociation((good,)), offered, IKE) == good
    two = SecurityAssociation((good, good))
    extra = SecurityAssociation((Proposal(1, IKE, b"", good.transforms + (Transform(1, 12, 128),)),))
    foreign = SecurityAssociation((Proposal(1, IKE, b"", (Transform(1, 20, 192),) +
                                            good.transforms[1:]),))
    missing = SecurityAssociation((Proposal(1, IKE, b"", good.transforms[:-1]),))
    unknown_number = SecurityAssociation((Proposal(9, IKE, b"", good.transforms),))
    for bad in (two, extra, foreign, missing, unknown_number):
        with pytest.raises(IkeProtocolError) as e:
            check_choice(bad, offered, IKE)
        assert e.value.notify_type == NotifyType.NO_PROPOSAL_CHOSEN
