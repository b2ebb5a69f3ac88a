"""Per-peer lifecycle as data: (state, input) -> (action, next state), readable in one screen.

The core looks up the cell and performs the action; it never decides by if-chains of its own.
The table is total: every state × input has a cell (h2's style, but an agent must not crash on
a stray event, so "unexpected" cells are explicit `ignore`s that the core logs).
"""
from __future__ import annotations

import enum


class PeerState(enum.Enum):
    TRAP = "trap"                # only the group's policy covers the peer (trap, or nothing)
    NEGOTIATING = "negotiating"  # we initiated; a negotiation shunt covers the peer
    RESPONDING = "responding"    # the peer initiated; nothing of ours covers it yet
    UP = "up"                    # Child SA pair installed
    SHUNTED = "shunted"          # failure shunt until it expires


class PeerInput(enum.Enum):
    ACQUIRE = "acquire"              # a packet needs an SA
    IKE_REQUEST = "ike-request"      # the peer started IKE_SA_INIT
    CHILD_UP = "child-up"            # ChildSaEstablished (first SA, or a re-establishment)
    FAILED = "failed"                # NegotiationFailed, or DNS says no usable key
    SHUNT_EXPIRED = "shunt-expired"  # the shunt's lifetime ran out
    REKEY_DUE = "rekey-due"          # soft expire
    REKEYED = "rekeyed"              # ChildSaRekeyed: new SA replaced the old
    SA_GONE = "sa-gone"              # peer's delete, hard expire, or liveness says it is dead
    IDLE = "idle"                    # no traffic either way for idle_timeout
    DISALLOWED = "disallowed"        # a reload moved the peer to a group that forbids its state
    STOP = "stop"                    # agent shutdown
    RENEW = "renew"                  # an SA pair kept by the previous run needs an IKE SA


class Action(enum.Enum):
    NEGOTIATE = "negotiate"          # put the negotiation shunt, DNS lookup ‖ IKE_SA_INIT
    RENEW = "renew"                  # DNS lookup ‖ IKE_SA_INIT; the kept pair carries traffic
    EXTEND = "extend"                # up: traffic from another of our addresses gets its own IKE SA
    RESPOND = "respond"              # let the engine answer; look up the peer's key
    JOIN = "join"                    # a negotiation runs already (peer's): add our shunt
    COUNT = "count"                  # one more packet under the shunt
    INSTALL = "install"              # install the Child SA pair, drop the shunt, release held
    REPLACE = "replace"              # install the new SA pair, then delete the old one
    FAIL = "fail"                    # failure shunt with the reason's lifetime
    FORGET = "forget"                # a responder attempt failed: nothing to undo
    REKEY = "rekey"                  # ask the engine for CREATE_CHILD_SA
    REMOVE = "remove"                # SA gone already: remove our copy, restore the trap
    DELETE = "delete"                # send INFORMATIONAL delete, remove SAs, restore the trap
    ABORT = "abort"                  # end the negotiation, remove its shunt
    RESTORE = "restore"              # remove the shunt: the trap covers the peer again
    IGNORE = "ignore"                # nothing to do (logged)


S, I, A = PeerState, PeerInput, Action
# Columns: the inputs above, in order. One row per state.
_COLUMNS = (I.ACQUIRE, I.IKE_REQUEST, I.CHILD_UP, I.FAILED, I.SHUNT_EXPIRED, I.REKEY_DUE,
            I.REKEYED, I.SA_GONE, I.IDLE, I.DISALLOWED, I.STOP, I.RENEW)
_ROWS: dict[PeerState, tuple[tuple[Action, PeerState], ...]] = {
    #              ACQUIRE                IKE_REQUEST              CHILD_UP            FAILED               SHUNT_EXPIRED          REKEY_DUE           REKEYED             SA_GONE              IDLE                 DISALLOWED           STOP                 RENEW
    S.TRAP:        ((A.NEGOTIATE, S.NEGOTIATING), (A.RESPOND, S.RESPONDING), (A.INSTALL, S.UP), (A.IGNORE, S.TRAP), (A.IGNORE, S.TRAP), (A.IGNORE, S.TRAP), (A.IGNORE, S.TRAP), (A.IGNORE, S.TRAP), (A.IGNORE, S.TRAP), (A.IGNORE, S.TRAP), (A.IGNORE, S.TRAP), (A.RENEW, S.NEGOTIATING)),
    S.NEGOTIATING: ((A.COUNT, S.NEGOTIATING), (A.RESPOND, S.NEGOTIATING), (A.INSTALL, S.UP), (A.FAIL, S.SHUNTED), (A.FAIL, S.SHUNTED), (A.IGNORE, S.NEGOTIATING), (A.IGNORE, S.NEGOTIATING), (A.IGNORE, S.NEGOTIATING), (A.IGNORE, S.NEGOTIATING), (A.ABORT, S.TRAP), (A.ABORT, S.TRAP), (A.IGNORE, S.NEGOTIATING)),
    S.RESPONDING:  ((A.JOIN, S.NEGOTIATING), (A.RESPOND, S.RESPONDING), (A.INSTALL, S.UP), (A.FORGET, S.TRAP), (A.IGNORE, S.RESPONDING), (A.IGNORE, S.RESPONDING), (A.IGNORE, S.RESPONDING), (A.IGNORE, S.RESPONDING), (A.IGNORE, S.RESPONDING), (A.ABORT, S.TRAP), (A.ABORT, S.TRAP), (A.IGNORE, S.RESPONDING)),
    S.UP:          ((A.EXTEND, S.UP), (A.RESPOND, S.UP), (A.REPLACE, S.UP), (A.IGNORE, S.UP), (A.IGNORE, S.UP), (A.REKEY, S.UP), (A.REPLACE, S.UP), (A.REMOVE, S.TRAP), (A.DELETE, S.TRAP), (A.DELETE, S.TRAP), (A.DELETE, S.TRAP), (A.IGNORE, S.UP)),
    S.SHUNTED:     ((A.COUNT, S.SHUNTED), (A.RESPOND, S.SHUNTED), (A.INSTALL, S.UP), (A.IGNORE, S.SHUNTED), (A.RESTORE, S.TRAP), (A.IGNORE, S.SHUNTED), (A.IGNORE, S.SHUNTED), (A.IGNORE, S.SHUNTED), (A.IGNORE, S.SHUNTED), (A.RESTORE, S.TRAP), (A.RESTORE, S.TRAP), (A.IGNORE, S.SHUNTED)),
}
TABLE: dict[tuple[PeerState, PeerInput], tuple[Action, PeerState]] = {
    (state, col): cell for state, row in _ROWS.items() for col, cell in zip(_COLUMNS, row, strict=True)
}


def step(state: PeerState, inp: PeerInput) -> tuple[Action, PeerState]:
    """The cell for (state, input)."""
    return TABLE[(state, inp)]


def render() -> str:
    """The table as text (for docs and `explain`)."""
    w = max(len(s.value) for s in PeerState) + 2
    lines = []
    for s in PeerState:
        cells = [f"{i.value}->{a.value}/{n.value}" for i in _COLUMNS for a, n in [TABLE[(s, i)]]
                 if a is not Action.IGNORE]
        lines.append(f"{s.value:<{w}}" + ", ".join(cells))
    return "\n".join(lines)
