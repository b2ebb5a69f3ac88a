"""The IKE engine's one exception hierarchy (parsers raise nothing else on bad input).

Every error carries the Notify type a peer should get (RFC 7296 §3.10.1), so the state
machine can answer with it, or drop the message where the RFC says so (§2.21).
"""
from __future__ import annotations


class IkeError(Exception):
    """Base of every error the IKE engine raises on purpose."""


class IkeProtocolError(IkeError):
    """A message or payload violates the protocol; `notify_type` says how (RFC 7296 §3.10.1).

    `data` is the notification data to send with it (e.g. the payload type octet for
    UNSUPPORTED_CRITICAL_PAYLOAD, §2.5).
    """

    def __init__(self, notify_type: int, detail: str = "", data: bytes = b""):
        self.notify_type = int(notify_type)
        self.detail = detail
        self.data = data
        from oe_agent.ike.const import NotifyType  # late: const imports nothing of ours

        try:
            name = NotifyType(self.notify_type).name
        except ValueError:
            name = str(self.notify_type)
        super().__init__(f"{name}: {detail}" if detail else name)


class IkeIntegrityError(IkeProtocolError):
    """The SK payload's ICV did not verify: the message is dropped without reply (§2.21.2)."""

    def __init__(self, detail: str = "integrity check failed"):
        from oe_agent.ike.const import NotifyType

        super().__init__(NotifyType.INVALID_SYNTAX, detail)
