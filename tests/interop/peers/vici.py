"""A small client for strongSwan's VICI protocol (charon's control socket).

Wire format (strongSwan src/libcharon/plugins/vici/README.md): each packet is a 32-bit
big-endian length, a type byte, a name (length byte + bytes) for the named types, then a
message: a flat stream of elements that open and close sections and lists.

Only what the interop tests need: requests (with the events a streaming command such as
`list-sas` emits before its response) and event subscriptions (`ike-updown`, `child-rekey`...).
Values come back as `str` (VICI values are bytes; charon sends text for everything we read).
"""
from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

# packet types
CMD_REQUEST, CMD_RESPONSE, CMD_UNKNOWN = 0, 1, 2
EVENT_REGISTER, EVENT_UNREGISTER, EVENT_CONFIRM, EVENT_UNKNOWN, EVENT = 3, 4, 5, 6, 7
_NAMED = {CMD_REQUEST, EVENT_REGISTER, EVENT_UNREGISTER, EVENT}

# message elements
SECTION_START, SECTION_END, KEY_VALUE, LIST_START, LIST_ITEM, LIST_END = 1, 2, 3, 4, 5, 6


class ViciError(Exception):
    """charon refused a command, or the socket spoke something we cannot read."""


def _name(n: str) -> bytes:
    b = n.encode()
    if not 0 < len(b) < 256:
        raise ViciError(f"VICI name length out of range: {n!r}")
    return bytes([len(b)]) + b


def _value(v: Any) -> bytes:
    if isinstance(v, bool):
        v = "yes" if v else "no"
    b = v if isinstance(v, bytes) else str(v).encode()
    if len(b) > 0xFFFF:
        raise ViciError("VICI value longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def encode_message(msg: dict[str, Any]) -> bytes:
    """dict -> VICI elements: dict = section, list/tuple = list, anything else = key/value."""
    out = bytearray()
    for key, v in msg.items():
        if isinstance(v, dict):
            out += bytes([SECTION_START]) + _name(key) + encode_message(v) + bytes([SECTION_END])
        elif isinstance(v, (list, tuple)):
            out += bytes([LIST_START]) + _name(key)
            for item in v:
                out += bytes([LIST_ITEM]) + _value(item)
            out += bytes([LIST_END])
        else:
            out += bytes([KEY_VALUE]) + _name(key) + _value(v)
    return bytes(out)


def decode_message(data: bytes) -> dict[str, Any]:
    """VICI elements -> nested dicts/lists of str. Strict: a malformed stream raises ViciError."""
    root: dict[str, Any] = {}
    sections = [root]
    current_list: list[str] | None = None
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ViciError("truncated VICI message")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    def name() -> str:
        return take(take(1)[0]).decode()

    def value() -> str:
        (n,) = struct.unpack("!H", take(2))
        return take(n).decode(errors="replace")

    while pos < len(data):
        kind = take(1)[0]
        if kind == SECTION_START:
            d: dict[str, Any] = {}
            sections[-1][name()] = d
            sections.append(d)
        elif kind == SECTION_END:
            if len(sections) == 1:
                raise ViciError("unbalanced VICI section end")
            sections.pop()
        elif kind == KEY_VALUE:
            k = name()
            sections[-1][k] = value()
        elif kind == LIST_START:
            current_list = []
            sections[-1][name()] = current_list
        elif kind == LIST_ITEM:
            if current_list is None:
                raise ViciError("VICI list item outside a list")
            current_list.append(value())
        elif kind == LIST_END:
            current_list = None
        else:
            raise ViciError(f"unknown VICI element type {kind}")
    if len(sections) != 1:
        raise ViciError("unterminated VICI section")
    return root


@dataclass
class Event:
    name: str
    body: dict[str, Any]


class Vici:
    """One connection to charon's VICI socket.

    The socket path may be longer than sun_path allows (pytest's tmp dirs), so we connect
    through /proc/self/fd/N of the directory that holds it.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0):
        self.path = os.fspath(path)
        self.events: list[Event] = []  # events seen and not yet taken by wait_event()
        dirfd = os.open(os.path.dirname(self.path) or ".", os.O_PATH | os.O_DIRECTORY)
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(self.path)}")
        finally:
            os.close(dirfd)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- framing ---
    def _send(self, ptype: int, name: str | None = None, msg: dict | None = None) -> None:
        body = bytes([ptype]) + (_name(name) if name is not None else b"")
        body += encode_message(msg or {})
        self.sock.sendall(struct.pack("!I", len(body)) + body)

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ViciError("charon closed the VICI socket")
            buf += chunk
        return bytes(buf)

    def _recv(self) -> tuple[int, str | None, dict[str, Any]]:
        (length,) = struct.unpack("!I", self._read(4))
        data = self._read(length)
        ptype, pos, name = data[0], 1, None
        if ptype in _NAMED:
            n = data[1]
            name, pos = data[2:2 + n].decode(), 2 + n
        return ptype, name, decode_message(data[pos:])

    # --- commands ---
    def request(self, command: str, msg: dict | None = None,
                stream: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run a command; returns (response, bodies of `stream` events it emitted).

        Streaming commands (list-sas -> 'list-sa', list-conns -> 'list-conn') need the event
        registered for the duration of the command, as VICI's README describes.
        """
        if stream:
            self.register(stream)
        try:
            self._send(CMD_REQUEST, command, msg)
            streamed: list[dict[str, Any]] = []
            while True:
                ptype, name, body = self._recv()
                if ptype == CMD_RESPONSE:
                    return body, streamed
                if ptype == CMD_UNKNOWN:
                    raise ViciError(f"charon does not know the VICI command {command!r}")
                if ptype == EVENT:
                    if name == stream:
                        streamed.append(body)
                    else:
                        self.events.append(Event(name or "", body))
        finally:
            if stream:
                self.unregister(stream)

    def command(self, command: str, msg: dict | None = None) -> dict[str, Any]:
        """A command that answers success=yes/no; raises ViciError with charon's errmsg."""
        resp, _ = self.request(command, msg)
        if resp.get("success") != "yes":
            raise ViciError(f"{command}: {resp.get('errmsg', resp)}")
        return resp

    def _subscription(self, ptype: int, event: str) -> None:
        self._send(ptype, event)
        while True:
            rtype, name, body = self._recv()
            if rtype == EVENT_CONFIRM:
                return
            if rtype == EVENT_UNKNOWN:
                raise ViciError(f"charon does not know the VICI event {event!r}")
            if rtype == EVENT:
                self.events.append(Event(name or "", body))

    def register(self, event: str) -> None:
        self._subscription(EVENT_REGISTER, event)

    def unregister(self, event: str) -> None:
        self._subscription(EVENT_UNREGISTER, event)

    def wait_event(self, name: str, timeout: float = 10.0, match=lambda body: True) -> dict:
        """The next registered event `name` whose body satisfies `match`; bounded wait."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.name == name and match(ev.body):
                    del self.events[i]
                    return ev.body
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no VICI event {name!r} within {timeout} s")
            old = self.sock.gettimeout()
            self.sock.settimeout(left)
            try:
                ptype, ename, body = self._recv()
            except socket.timeout:
                raise TimeoutError(f"no VICI event {name!r} within {timeout} s") from None
            finally:
                self.sock.settimeout(old)
            if ptype == EVENT:
                self.events.append(Event(ename or "", body))
