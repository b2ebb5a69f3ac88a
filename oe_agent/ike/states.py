"""The IKE SA state machine as data (h2 style): (state, input) -> (handler, next state).

A pair missing from TABLE is a protocol error: a request is answered with INVALID_SYNTAX
(or dropped before the IKE SA is authenticated, RFC 7296 §2.21), a response is dropped.
A handler may end the IKE SA early (-> CLOSED, e.g. AUTHENTICATION_FAILED) or keep the state
(a COOKIE or INVALID_KE_PAYLOAD retry); otherwise the table's next state holds.
"""
from __future__ import annotations

import enum


class IkeState(enum.Enum):
    IDLE = "idle"  # created, nothing sent or received
    INIT_SENT = "init-sent"  # initiator: IKE_SA_INIT request out
    INIT_DONE = "init-done"  # responder: IKE_SA_INIT answered, waiting for IKE_AUTH
    # initiator: IKE_SA_INIT done, PeerKeyNeeded emitted; IKE_AUTH waits for the peer's keys
    # (DNS): they choose our own AUTH (AUTH_NULL toward a keyless peer, RFC 7619)
    AUTH_WAIT = "auth-wait"
    AUTH_SENT = "auth-sent"  # initiator: IKE_AUTH request out
    KEYS_WAIT = "keys-wait"  # either: PeerKeyNeeded emitted, IKE_AUTH held until keys arrive
    ESTABLISHED = "established"
    DELETING = "deleting"  # our Delete of the IKE SA is out
    CLOSED = "closed"  # deleted or failed; terminal


class Input(enum.Enum):
    CONNECT = "connect"  # IkeSa.connect()
    DELETE = "delete"  # IkeSa.delete()
    INIT_REQ = "IKE_SA_INIT request"
    INIT_RESP = "IKE_SA_INIT response"
    AUTH_REQ = "IKE_AUTH request"
    AUTH_RESP = "IKE_AUTH response"
    KEYS = "peer keys supplied"
    CHILD_REQ = "CREATE_CHILD_SA request"
    CHILD_RESP = "CREATE_CHILD_SA response"
    INFO_REQ = "INFORMATIONAL request"
    INFO_RESP = "INFORMATIONAL response"


S, I = IkeState, Input

TABLE: dict[tuple[IkeState, Input], tuple[str, IkeState]] = {
    (S.IDLE, I.CONNECT): ("send_init", S.INIT_SENT),
    (S.IDLE, I.INIT_REQ): ("on_init_request", S.INIT_DONE),
    (S.INIT_SENT, I.INIT_RESP): ("on_init_response", S.AUTH_SENT),  # or AUTH_WAIT
    (S.AUTH_WAIT, I.KEYS): ("send_held_auth", S.AUTH_SENT),
    (S.INIT_DONE, I.AUTH_REQ): ("on_auth_request", S.ESTABLISHED),
    (S.AUTH_SENT, I.AUTH_RESP): ("on_auth_response", S.ESTABLISHED),
    (S.KEYS_WAIT, I.KEYS): ("on_keys", S.ESTABLISHED),
    (S.KEYS_WAIT, I.AUTH_REQ): ("ignore", S.KEYS_WAIT),  # a retransmission while we wait
    (S.ESTABLISHED, I.DELETE): ("send_delete", S.DELETING),
    (S.ESTABLISHED, I.CHILD_REQ): ("on_child_request", S.ESTABLISHED),
    (S.ESTABLISHED, I.CHILD_RESP): ("on_child_response", S.ESTABLISHED),
    (S.ESTABLISHED, I.INFO_REQ): ("on_info_request", S.ESTABLISHED),
    (S.ESTABLISHED, I.INFO_RESP): ("on_info_response", S.ESTABLISHED),
    (S.DELETING, I.INFO_REQ): ("on_info_request", S.DELETING),
    (S.DELETING, I.INFO_RESP): ("on_info_response", S.DELETING),
    (S.DELETING, I.CHILD_REQ): ("refuse_temporarily", S.DELETING),
    (S.DELETING, I.CHILD_RESP): ("ignore", S.DELETING),
}

# exchange type and R flag -> input
EXCHANGE_INPUTS = {
    (34, False): I.INIT_REQ, (34, True): I.INIT_RESP,
    (35, False): I.AUTH_REQ, (35, True): I.AUTH_RESP,
    (36, False): I.CHILD_REQ, (36, True): I.CHILD_RESP,
    (37, False): I.INFO_REQ, (37, True): I.INFO_RESP,
}
