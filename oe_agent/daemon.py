"""`oe-agent run -c FILE`: the daemon, in the foreground (systemd runs it as is).

Wires config -> policy groups -> dataplane (kernel XFRM if the probe finds ESP, else the
userspace TUN dataplane; `agent.dataplane` forces one) -> IKE adapter -> DNS KeyResolver ->
the Agent core -> the control socket. SIGHUP reloads the groups; SIGTERM/SIGINT stop cleanly
(SAs deleted unless `agent.keep_sas_on_stop`).
"""
from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import signal

from oe_agent import config as config_mod
from oe_agent.agent.core import Agent
from oe_agent.agent.groups import PolicyGroups
from oe_agent.config import Config
from oe_agent.control.api import ControlServer
from oe_agent.errors import UserError
from oe_agent.model import IPAddress

log = logging.getLogger("oe_agent")


async def host_addresses() -> tuple[IPAddress, ...]:
    """Every address configured in this namespace (they are never trapped)."""
    from pyroute2 import AsyncIPRoute

    out = []
    async with AsyncIPRoute() as ipr:
        async for msg in await ipr.addr("dump"):
            a = msg.get_attr("IFA_ADDRESS")
            if a:
                out.append(ipaddress.ip_address(a.split("%")[0]))
    return tuple(out)


def _optional(module: str):
    """A part that may not be in this build (import errors inside it still surface)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise


async def make_dataplane(cfg: Config):
    """auto: kernel ESP if the probe finds it, else userspace; or what the config forces."""
    kernel = _optional("oe_agent.trap")
    choice = cfg.dataplane
    if choice == "auto":
        choice = "userspace"
        if kernel is not None:
            caps = await kernel.run_probe()
            if caps.esp:
                choice = "kernel"
            else:
                log.info("kernel has no ESP (%s): using the userspace dataplane", caps.detail)
    if choice == "kernel":
        if kernel is None:
            raise UserError(f"{cfg.path}: agent.dataplane: the kernel dataplane is not in this build")
        # keep_sas_on_stop: the next start adopts the kept pairs and renews them (core)
        return kernel.KernelDataplane(adopt_sas=cfg.keep_sas_on_stop)
    from oe_agent.esp.dataplane import UserspaceDataplane

    # the IKE link owns port 4500 and hands ESP-in-UDP over (attach_udp / esp_received)
    return UserspaceDataplane(hold_max=max(1, cfg.hold_packets), udp_port=cfg.natt_port,
                              own_udp=False)


def make_resolver(cfg: Config):
    if not cfg.resolvers:
        log.warning("no [dns] resolvers configured: only static peers and AUTH_NULL can work")
        return None
    from oe_agent.dns.resolver import KeyResolver

    try:
        return KeyResolver([str(r) for r in cfg.resolvers],
                           str(cfg.trust_anchors) if cfg.trust_anchors else None,
                           cfg.dnssec, timeout=cfg.dns_timeout)
    except (ValueError, OSError) as e:
        raise UserError(f"{cfg.path}: dns: {e}") from None


def make_ike(cfg: Config, agent: Agent, dataplane):
    """The IKE engine's adapter, bound to the agent."""
    from oe_agent.agent.ike_link import IkeLinkAdapter

    return IkeLinkAdapter(cfg, agent, dataplane)


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.agent: Agent | None = None
        self._stop = asyncio.Event()

    def load_groups(self, local) -> PolicyGroups:
        return PolicyGroups.load(self.cfg.policies, exempt=local, resolvers=self.cfg.resolvers)

    async def run(self) -> int:
        cfg = self.cfg
        ControlServer(None, cfg.socket).check_free()  # a second agent touches nothing
        local = cfg.addresses or await host_addresses()
        groups = self.load_groups(local)  # errors before touching any kernel state
        dataplane = await make_dataplane(cfg)
        resolver = make_resolver(cfg)
        agent = Agent(cfg, dataplane, None, resolver, groups, local_addresses=local,
                      reload_groups=lambda: self.load_groups(local))
        self.agent = agent
        agent.ike = make_ike(cfg, agent, dataplane)
        server = ControlServer(agent, cfg.socket)
        loop = asyncio.get_running_loop()
        try:
            await agent.ike.start(local)  # sockets first: static peers may start at once
            await agent.start()
            await server.start()  # last: the socket appearing means the agent is ready
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            log.info("oe-agent running: %s, %d group policies, control %s",
                     agent.capabilities.detail if agent.capabilities else "?",
                     len(agent.kernel_state), cfg.socket)
            core = asyncio.create_task(agent.run())
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({core, stop}, return_when=asyncio.FIRST_COMPLETED)
            if core in done:
                core.result()  # the core died: surface why
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await server.stop()
            await agent.stop()  # IKE Deletes go out before the sockets close
            agent.ike.stop()
            log.info("oe-agent stopped")
        return 0

    def _reload(self) -> None:
        async def go():
            try:
                r = await self.agent.request("reload")
                log.info("reloaded: %d removed, %d installed, %d peers changed",
                         len(r["removed"]), len(r["installed"]), r["peers_changed"])
            except UserError as e:
                log.error("reload failed, nothing changed: %s", e)
        asyncio.get_running_loop().create_task(go())


def cmd_run(args) -> int:
    cfg = config_mod.load(args.config)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    for h in logging.getLogger().handlers:  # pyroute2's and asyncio's debug output drown ours
        h.addFilter(lambda r: r.levelno >= logging.WARNING
                    or not r.name.startswith(("pyroute2", "asyncio")))
    try:
        return asyncio.run(Daemon(cfg).run())
    except PermissionError as e:
        raise UserError(f"permission denied ({e.strerror or e}): the agent needs root "
                        "(CAP_NET_ADMIN)") from None
    except OSError as e:  # the dataplane or a socket could not start: one line, not a trace
        log.debug("start failed", exc_info=True)
        raise UserError(f"cannot start: {e}") from None


def register(sub) -> None:
    p = sub.add_parser("run", help="run the agent in the foreground")
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="the agent's TOML config")
    p.set_defaults(func=cmd_run)
