"""The IKE SA state table (states.py), cell by cell: every listed pair has a handler, every
missing pair is a protocol error that leaves the SA as it was."""
from __future__ import annotations

import itertools

import pytest

from oe_agent.ike.errors import IkeProtocolError
from oe_agent.ike.sa import IkeSa
from oe_agent.ike.states import EXCHANGE_INPUTS, TABLE, IkeState, Input
from tests.unit.test_ike_sa_pair import A, B, config, seeded


def test_table_fits_one_screen_and_names_real_handlers():
    assert len(TABLE) <= 40
    for (state, inp), (handler, nxt) in TABLE.items():
        assert callable(getattr(IkeSa, "_" + handler)), handler
        assert isinstance(nxt, IkeState)
    assert not any(s == IkeState.CLOSED for s, _ in TABLE), "CLOSED is terminal"


def test_every_exchange_has_an_input():
    assert set(EXCHANGE_INPUTS.values()) == set(Input) - {Input.CONNECT, Input.DELETE, Input.KEYS}


MISSING = [(s, i) for s, i in itertools.product(IkeState, Input) if (s, i) not in TABLE]


@pytest.mark.parametrize("state,inp", MISSING, ids=lambda x: getattr(x, "value", x))
def test_missing_cells_are_protocol_errors(state, inp):
    sa = IkeSa(config(addr=A), A, B, initiator=True, rng=seeded(1))
    sa.state = state
    with pytest.raises(IkeProtocolError):
        sa._dispatch(inp, sa._ks, None, 0.0)
    assert sa.state == state
    assert sa.datagrams_to_send(0.0) == []


def test_api_calls_outside_their_states_do_nothing():
    sa = IkeSa(config(addr=A), A, B, initiator=True, rng=seeded(1))
    for call in (sa.rekey, sa.check_liveness, lambda now: sa.rekey_child(1234, now),
                 lambda now: sa.delete_child(1234, now), sa.create_child):
        call(0.0)
    assert sa.state == IkeState.IDLE and sa.datagrams_to_send(0.0) == []
    assert sa.next_event() is None
