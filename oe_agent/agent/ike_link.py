"""The agent's link to the IKE engine: drives one `IkeEndpoint` (all IKE SAs of this host) and
turns its events into the core's inputs (product.md §1, §5).

The engine is sans-I/O; this adapter owns the clock, the RNG, one timer and the UDP sockets
(ports 500 and 4500 on each local address). With `transport` given, datagrams go there
instead of to sockets: tests wire two agents together in memory with real `IkeSa` objects.
On port 4500, ESP-in-UDP (non-zero first four bytes, RFC 3948) goes to the dataplane: the
kernel decapsulates it itself (UDP_ENCAP socket option); the userspace dataplane is handed the
packets (`esp_received`) and sends its own through our socket (`attach_udp`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import os
import socket
import time
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization

from oe_agent.agent.core import (Agent, ChildGone, ChildRekeyed, ChildUp, Failed, IkeRequest,
                                 KeyNeeded)
from oe_agent.config import Config
from oe_agent.errors import UserError
from oe_agent.ike import auth as ikeauth
from oe_agent.ike import events as ev
from oe_agent.ike.const import ExchangeType, IdType
from oe_agent.ike.keylog import KeyLogWriter
from oe_agent.ike.message import peek_header
from oe_agent.ike.payloads import IdInitiator
from oe_agent.ike.sa import Datagram, IkeConfig, IkeEndpoint, IkeSa
from oe_agent.model import IPAddress, Mode, TrafficSelector

log = logging.getLogger(__name__)

NON_ESP_MARKER = b"\x00\x00\x00\x00"
UDP_ENCAP, UDP_ENCAP_ESPINUDP = 100, 2  # linux/udp.h
_AUTH = {"signature": "pubkey", "psk": "psk", "null": "null"}


def load_identity(cfg: Config):
    """Our credential: the host key (PEM, PKCS#8) — or AUTH_NULL when there is none and
    `ike.auth_null` is on (anonymous OE, RFC 7619)."""
    try:
        data = cfg.identity_key.read_bytes()
    except FileNotFoundError:
        if cfg.auth_null:
            log.warning("no host key at %s: AUTH_NULL only", cfg.identity_key)
            return ikeauth.NullCredential()
        raise UserError(f"{cfg.path}: identity.key: {cfg.identity_key} does not exist "
                        "(make one with `oe-agent newhostkey`)") from None
    except OSError as e:
        raise UserError(f"{cfg.path}: identity.key: {cfg.identity_key}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UserError(f"{cfg.path}: identity.key: {cfg.identity_key}: not a PEM private key "
                        f"({e})") from None
    return ikeauth.SignatureCredential(key)


class IkeLinkAdapter:
    """Implements core.IkeLink over an IkeEndpoint. ike_id = the IkeSa object itself."""

    def __init__(self, cfg: Config, agent: Agent, dataplane: Any = None, *,
                 credential=None, rng: Callable[[int], bytes] = os.urandom,
                 clock: Callable[[], float] = time.monotonic,
                 transport: Callable[[Datagram], None] | None = None):
        self.cfg, self.agent, self.dataplane = cfg, agent, dataplane
        self.credential = credential if credential is not None else load_identity(cfg)
        self.clock = clock
        self.endpoint = IkeEndpoint(rng, self._responder_config)
        self._transport = transport
        self._announced: set[int] = set()
        # (remote, IKE SA's SPIi) -> [installs the core has not confirmed, datagrams of that
        # IKE SA held until it has]
        self._gates: dict[tuple[IPAddress, bytes], list] = {}
        self._socks: dict[tuple[IPAddress, int], socket.socket] = {}
        self._timer: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        # agent.keylog: Wireshark's key tables (product §7); off unless configured.
        self.keylog = KeyLogWriter(cfg.keylog) if cfg.keylog else None

    # --- IkeLink (called by the core task) -------------------------------------------------------

    def initiate(self, local, remote, *, mode: Mode, auth_null: bool,
                 ts_local: tuple[TrafficSelector, ...], ts_remote: tuple[TrafficSelector, ...],
                 psk: bytes | None = None) -> IkeSa:
        config = self._config(local, mode=mode, allow_null=auth_null, psk=psk,
                              ts_local=ts_local, ts_remote=ts_remote)
        sa = self.endpoint.connect(config, local, remote, self.clock())
        self._announced.add(id(sa))
        self._pump()
        return sa

    def supply_peer_keys(self, remote, ike_id: IkeSa, keys) -> None:
        from oe_agent.ike.sa import UNAUTHENTICATED

        keys = [UNAUTHENTICATED] if keys == "unauthenticated" else list(keys)
        ike_id.supply_peer_keys(keys, self.clock())
        self._after(ike_id)

    def abort(self, remote, ike_id: IkeSa, reason: str) -> None:
        if ike_id is not None and hasattr(ike_id, "delete"):
            log.debug("%s: ending IKE SA %s (%s)", remote, ike_id.spi_i.hex(), reason)
            self._open_gate(ike_id.remote)
            ike_id.delete(self.clock())
            self._after(ike_id)

    def rekey_child(self, remote, spi_in: int) -> None:
        for sa in self.endpoint.find(remote):
            if spi_in in sa.children:
                sa.rekey_child(spi_in, self.clock())
                self._after(sa)

    def delete(self, remote) -> None:
        self._open_gate(remote)
        for sa in self.endpoint.find(remote):
            log.debug("%s: deleting IKE SA %s", remote, sa.spi_i.hex())
            sa.delete(self.clock())
            self._after(sa)

    # --- configs ---------------------------------------------------------------------------------

    def _config(self, local, *, mode: Mode, allow_null: bool, psk: bytes | None = None,
                ts_local=(), ts_remote=()) -> IkeConfig:
        cred = ikeauth.PskCredential(psk) if psk else self.credential
        if isinstance(cred, ikeauth.NullCredential):
            local_id = IdInitiator.null()
        elif self.cfg.identity_id and not _is_ip(self.cfg.identity_id):
            local_id = IdInitiator.from_fqdn(self.cfg.identity_id)
        else:
            local_id = IdInitiator.from_address(local)
        kw = {}
        if self.cfg.proposals:
            kw["ike_proposals"] = self.cfg.proposals
        if self.cfg.esp_proposals:
            kw["esp_proposals"] = self.cfg.esp_proposals
        return IkeConfig(local_id=local_id, credential=cred, peer_psk=psk, allow_null=allow_null,
                         mode=mode, ts_local=tuple(ts_local), ts_remote=tuple(ts_remote),
                         ike_lifetime_s=self.cfg.ike_lifetime,
                         child_lifetime_s=self.cfg.child_lifetime,
                         liveness_interval=float(self.cfg.liveness),
                         retransmit_timeout=self.cfg.retransmit_timeout,
                         retransmit_tries=self.cfg.retransmit_tries,
                         ike_port=self.cfg.ike_port, natt_port=self.cfg.natt_port, **kw)

    def _responder_config(self, local: IPAddress, remote: IPAddress) -> IkeConfig | None:
        """Answer only if the peer's group says so (product.md §1 responder)."""
        if not self.agent.may_respond(remote):
            log.info("IKE_SA_INIT from %s: its group does not answer; dropped", remote)
            return None
        pc = self.agent.static.get(remote)
        if pc is not None:
            return self._config(local, mode=pc.mode, allow_null=pc.auth == "null",
                                psk=pc.psk.encode() if pc.auth == "psk" else None)
        g = self.agent.groups.lookup(remote)
        allow_null = self.cfg.auth_null and g is not None and g.group != "private"
        return self._config(local, mode=Mode.TRANSPORT, allow_null=allow_null)

    # --- engine output -> core inputs -------------------------------------------------------------

    def _after(self, sa: IkeSa) -> None:
        # the endpoint collects what an SA produced only through its own calls
        self.endpoint._after(sa, self.clock())
        self._pump()

    def _pump(self) -> None:
        """Send what the engine wrote and post its events to the core.

        A new Child SA closes its IKE SA's gate: what that IKE SA sends (the IKE_AUTH response
        that lets the peer send on the SA) waits until the core says the SA is installed.
        Otherwise the peer's first ESP can arrive before our inbound SA exists, and is dropped.
        Only that IKE SA's datagrams wait (by SPIi, RFC 7296 §3.1): a loaded core may take
        longer than the peer's retransmission budget, and holding everything to the peer
        killed the other IKE SA of a crossing pair (its liveness answers and IKE_AUTH were
        held too: ten hosts initiating at once in the vm tier, tests/vm/test_oe_mesh.py).
        A rekey we answer is gated the same way (the initiator sends on the new pair as soon
        as it has our answer); the core installs it without its outbound SA until the
        initiator deletes the old pair, so we never send on it before the peer can read it.
        A rekey we started is gated too: its Delete of the old pair moves the peer's traffic
        to the new one, so it leaves only once our inbound SA of the new pair is in."""
        now = self.clock()
        out = self.endpoint.datagrams_to_send(now)
        inputs = []
        for sa in self.endpoint.take_new_responders():
            if id(sa) not in self._announced:
                self._announced.add(id(sa))
                inputs.append(IkeRequest(sa.remote, sa.local, ike_id=sa))
        while (item := self.endpoint.next_event()) is not None:
            sa, e = item
            if self.keylog is not None:
                self._log_keys(sa, e)
            for inp in self._translate(sa, e):
                log.debug("%s: %s from IKE SA %s (%s)", sa.remote, type(inp).__name__,
                          sa.spi_i.hex(), "ours" if sa.initiated else "theirs")
                if isinstance(inp, (ChildUp, ChildRekeyed)):
                    key = (inp.remote, sa.spi_i)
                    gate = self._gates.setdefault(key, [0, []])
                    gate[0] += 1
                    inp = dataclasses.replace(inp, installed=functools.partial(
                        self._installed, key, gate))
                inputs.append(inp)
        for dg in out:
            gate = self._gates.get((dg.remote, dg.data[:8])) if self._gates else None
            if gate is not None:
                gate[1].append(dg)
            else:
                self._send(dg)
        for inp in inputs:
            self.agent.post(inp)
        if self._wake is not None:
            self._wake.set()

    def _installed(self, key: tuple[IPAddress, bytes], gate: list) -> None:
        """The core acted on a ChildUp or ChildRekeyed of that IKE SA: open its gate once the last is in."""
        gate[0] -= 1
        if gate[0] <= 0 and self._gates.get(key) is gate:
            self._release(key)

    def _open_gate(self, remote: IPAddress) -> None:
        """Send what waited at every gate of remote's IKE SAs (all of it: a Delete must not
        wait for installs the core will never make, e.g. when it stops)."""
        for key in [k for k in self._gates if k[0] == remote]:
            self._release(key)

    def _release(self, key: tuple[IPAddress, bytes]) -> None:
        for dg in self._gates.pop(key)[1]:
            self._send(dg)

    def _log_keys(self, sa: IkeSa, e) -> None:
        if isinstance(e, (ev.IkeSaEstablished, ev.IkeSaRekeyed)):
            self.keylog.log_ike_sa(*sa.ike_keys())
        elif isinstance(e, ev.ChildSaEstablished):
            self.keylog.log_child_sa(e.params)
        elif isinstance(e, ev.ChildSaRekeyed):
            self.keylog.log_child_sa(e.new)

    def _translate(self, sa: IkeSa, e) -> list:
        r = sa.remote
        if isinstance(e, ev.PeerKeyNeeded):
            # an initiator asks before IKE_AUTH, when the peer has not named itself yet
            pid = "" if e.peer_id is None else str(e.peer_id)
            fqdn = pid if getattr(e.peer_id, "id_type", None) == IdType.FQDN else ""
            return [KeyNeeded(r, ike_id=sa, peer_id=pid, fqdn=fqdn)]
        if isinstance(e, ev.ChildSaEstablished):
            return [ChildUp(r, e.params, ike_id=sa, auth=_AUTH.get(sa.peer_auth, "pubkey"),
                            initiator=e.initiator)]
        if isinstance(e, ev.ChildSaRekeyed):
            return [ChildRekeyed(r, e.new, e.old.spi_in, ike_id=sa, initiator=e.initiator)]
        if isinstance(e, ev.ChildSaDeleted):
            if e.reason == "rekey-collision":
                return []  # the redundant SA of a collision never reached the core
            return [ChildGone(r, e.params.spi_in, e.reason, ike_id=sa)]
        if isinstance(e, ev.IkeSaDeleted):
            self._announced.discard(id(sa))
            return [ChildGone(r, None, e.reason, ike_id=sa)]
        if isinstance(e, ev.NegotiationFailed):
            if e.child:  # a failed rekey or extra child: the current SA stays until it expires
                log.info("%s: Child SA exchange failed: %s %s", r, e.reason, e.detail)
                return []
            self._announced.discard(id(sa))
            return [Failed(r, e.reason, ike_id=sa, detail=e.detail)]
        return []

    # --- I/O --------------------------------------------------------------------------------------

    def receive(self, data: bytes, local: tuple, remote: tuple) -> None:
        """One IKE message (marker stripped) that arrived on local=(ip, port) from remote."""
        self.endpoint.receive_datagram(data, local, remote, self.clock())
        self._pump()

    def _send(self, dg: Datagram) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("IKE %d bytes to %s:%d from %s:%d%s", len(dg.data), dg.remote,
                      dg.remote_port, dg.local, dg.local_port, _describe(dg.data))
        if self._transport is not None:
            self._transport(dg)
            return
        s = self._socks.get((dg.local, dg.local_port))
        if s is None:
            log.warning("no socket on %s:%d for IKE to %s", dg.local, dg.local_port, dg.remote)
            return
        try:
            s.sendto(dg.wire(), (str(dg.remote), dg.remote_port))
        except OSError as e:
            log.info("IKE to %s:%d: %s", dg.remote, dg.remote_port, e.strerror)

    async def start(self, addresses=()) -> None:
        """Open the sockets (unless a transport is wired) and run the engine's timer."""
        self._wake = asyncio.Event()
        if self._transport is None:
            self._open(addresses or self.agent.local_addresses)
        self._timer = asyncio.get_running_loop().create_task(self._timer_loop())

    def stop(self) -> None:
        if self.keylog is not None:
            self.keylog.close()
            self.keylog = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_event_loop()
        for s in self._socks.values():
            try:
                loop.remove_reader(s.fileno())
            except (ValueError, RuntimeError):
                pass
            s.close()
        self._socks.clear()

    async def _timer_loop(self) -> None:
        while True:
            t = self.endpoint.get_timer()
            delay = None if t is None else max(0.0, t - self.clock())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self.endpoint.handle_timer(self.clock())
            self._pump()

    def _open(self, addresses) -> None:
        loop = asyncio.get_running_loop()
        bypass = None
        kernel = type(self.dataplane).__name__ == "KernelDataplane"
        if kernel:
            from oe_agent.trap import socket_bypass as bypass
        for a in addresses:
            a = ipaddress.ip_address(a)
            if a.is_link_local:
                continue  # would need a scope; OE peers are reached on global addresses
            fam = socket.AF_INET6 if a.version == 6 else socket.AF_INET
            for port in (self.cfg.ike_port, self.cfg.natt_port):
                s = socket.socket(fam, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s.bind((str(a), port))
                except OSError as e:
                    s.close()
                    raise UserError(f"cannot bind IKE port {a}:{port}: {e.strerror}") from None
                if bypass is not None:
                    bypass(s)  # IKE to a trapped peer must not wait for its own SA
                if port == self.cfg.natt_port and kernel:
                    s.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
                s.setblocking(False)
                self._socks[(a, port)] = s
                loop.add_reader(s.fileno(), self._readable, s, a, port)
        if hasattr(self.dataplane, "attach_udp"):
            self.dataplane.attach_udp(self._esp_sendto)

    def _esp_sendto(self, data: bytes, addr: tuple) -> None:
        """The userspace dataplane's ESP-in-UDP out through our port-4500 socket."""
        v = ipaddress.ip_address(addr[0]).version
        for (a, port), s in self._socks.items():
            if port == self.cfg.natt_port and a.version == v:
                try:
                    s.sendto(data, addr)
                except OSError as e:
                    log.debug("ESP to %s: %s", addr, e.strerror)
                return

    def _readable(self, s: socket.socket, local: IPAddress, port: int) -> None:
        for _ in range(64):
            try:
                data, addr = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("IKE socket %s:%d: %s", local, port, e.strerror)
                break
            remote = (ipaddress.ip_address(addr[0].split("%")[0]), addr[1])
            if port == self.cfg.natt_port:
                if len(data) == 1 and data[0] == 0xFF:
                    continue  # NAT keepalive (RFC 3948 §2.3)
                if data[:4] != NON_ESP_MARKER:
                    if hasattr(self.dataplane, "esp_received"):
                        self.dataplane.esp_received(data, (str(remote[0]), remote[1]))
                    continue
                data = data[4:]
            if log.isEnabledFor(logging.DEBUG):
                log.debug("IKE %d bytes from %s:%d on %s:%d%s", len(data), remote[0], remote[1],
                          local, port, _describe(data))
            self.endpoint.receive_datagram(data, (local, port), remote, self.clock())
            for sa in self.endpoint.find(remote[0]):
                if sa.last_error:
                    log.info("IKE from %s: %s", remote[0], sa.last_error)
                    sa.last_error = ""
        self._pump()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _describe(data: bytes) -> str:
    """': INFORMATIONAL request 2, SPIs 1a2b../3c4d..' for debug traces (never raises)."""
    try:
        h = peek_header(data)
        kind = ExchangeType(h.exchange).name if h.exchange in ExchangeType._value2member_map_ \
            else str(h.exchange)
    except Exception:
        return ""
    return (f": {kind} {'response' if h.response else 'request'} {h.message_id}, "
            f"SPIs {h.spi_i.hex()[:8]}/{h.spi_r.hex()[:8]}")
