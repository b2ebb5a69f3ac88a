import itertools

from hypothesis import given, strategies as st

from oe_agent.agent.peer import TABLE, Action as A, PeerInput as I, PeerState as S, render, step

# What each action implies about the state after it (the core relies on these).
RESULT_OF = {A.NEGOTIATE: {S.NEGOTIATING}, A.RENEW: {S.NEGOTIATING}, A.JOIN: {S.NEGOTIATING}, A.INSTALL: {S.UP},
             A.REPLACE: {S.UP}, A.REKEY: {S.UP}, A.FAIL: {S.SHUNTED}, A.FORGET: {S.TRAP},
             A.REMOVE: {S.TRAP}, A.DELETE: {S.TRAP}, A.ABORT: {S.TRAP}, A.RESTORE: {S.TRAP},
             A.COUNT: {S.NEGOTIATING, S.SHUNTED}, A.EXTEND: {S.UP}, A.RESPOND: {S.RESPONDING, S.NEGOTIATING, S.UP, S.SHUNTED}}


def test_every_cell_exists_and_is_consistent():
    assert len(TABLE) == len(S) * len(I)
    for s, i in itertools.product(S, I):
        action, nxt = step(s, i)
        if action is A.IGNORE:
            assert nxt is s, (s, i)  # ignoring never moves
        else:
            assert nxt in RESULT_OF[action], (s, i, action, nxt)


def test_cells_by_meaning():
    # the initiator path
    assert step(S.TRAP, I.ACQUIRE) == (A.NEGOTIATE, S.NEGOTIATING)
    assert step(S.NEGOTIATING, I.ACQUIRE) == (A.COUNT, S.NEGOTIATING)
    assert step(S.NEGOTIATING, I.CHILD_UP) == (A.INSTALL, S.UP)
    assert step(S.NEGOTIATING, I.FAILED) == (A.FAIL, S.SHUNTED)
    assert step(S.NEGOTIATING, I.SHUNT_EXPIRED) == (A.FAIL, S.SHUNTED)  # hung negotiation
    # mutual initiation: both paths go on; the engine keeps one IKE SA
    assert step(S.NEGOTIATING, I.IKE_REQUEST) == (A.RESPOND, S.NEGOTIATING)
    assert step(S.RESPONDING, I.ACQUIRE) == (A.JOIN, S.NEGOTIATING)
    # the responder path
    assert step(S.TRAP, I.IKE_REQUEST) == (A.RESPOND, S.RESPONDING)
    assert step(S.RESPONDING, I.CHILD_UP) == (A.INSTALL, S.UP)
    assert step(S.RESPONDING, I.FAILED) == (A.FORGET, S.TRAP)
    # a pair kept by the previous run is renewed only from a fresh start (no shunt of ours)
    assert step(S.TRAP, I.RENEW) == (A.RENEW, S.NEGOTIATING)
    assert all(step(s, I.RENEW)[0] is A.IGNORE for s in S if s is not S.TRAP)
    # an incoming SA replaces a pending pass shunt
    assert step(S.SHUNTED, I.IKE_REQUEST) == (A.RESPOND, S.SHUNTED)
    assert step(S.SHUNTED, I.CHILD_UP) == (A.INSTALL, S.UP)
    assert step(S.SHUNTED, I.SHUNT_EXPIRED) == (A.RESTORE, S.TRAP)
    # life of an SA
    assert step(S.UP, I.REKEY_DUE) == (A.REKEY, S.UP)
    assert step(S.UP, I.ACQUIRE) == (A.EXTEND, S.UP)  # another of our addresses
    assert step(S.UP, I.REKEYED) == (A.REPLACE, S.UP)
    assert step(S.UP, I.IKE_REQUEST) == (A.RESPOND, S.UP)  # peer restarted
    assert step(S.UP, I.CHILD_UP) == (A.REPLACE, S.UP)
    assert step(S.UP, I.SA_GONE) == (A.REMOVE, S.TRAP)
    assert step(S.UP, I.IDLE) == (A.DELETE, S.TRAP)
    assert step(S.UP, I.FAILED) == (A.IGNORE, S.UP)  # a failed rekey keeps the SA until expiry
    # reload and stop leave nothing behind
    for s in S:
        assert step(s, I.STOP)[1] is S.TRAP
        assert step(s, I.DISALLOWED)[1] is S.TRAP


def test_every_state_reachable_from_trap_and_back():
    def reach(start):
        seen, todo = {start}, [start]
        while todo:
            s = todo.pop()
            for i in I:
                n = step(s, i)[1]
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen
    assert reach(S.TRAP) == set(S)
    for s in S:
        assert S.TRAP in reach(s)


@given(st.lists(st.sampled_from(list(I)), max_size=40))
def test_random_walks_stay_in_the_table(inputs):
    s = S.TRAP
    for i in inputs:
        action, s2 = step(s, i)
        if action in (A.INSTALL, A.REPLACE):
            assert s2 is S.UP
        if s2 is S.SHUNTED and s is not S.SHUNTED:
            assert action is A.FAIL
        s = s2


def test_render_has_one_line_per_state():
    lines = render().splitlines()
    assert len(lines) == len(S) and all(any(l.startswith(s.value) for l in lines) for s in S)
