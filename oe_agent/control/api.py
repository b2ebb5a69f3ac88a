"""Control API: aiohttp on a unix socket, mode 0600 (product.md §7).

Handlers are thin: they validate input and pass a request to the agent's core task, which
answers from the one consistent state. Bad input gets 400 with {"error": "..."}, and the
agent is not touched.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from pathlib import Path

from aiohttp import web

from oe_agent.errors import UserError

log = logging.getLogger(__name__)

AGENT_KEY = web.AppKey("agent", object)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>oe-agent</title>
<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.up{color:#070}.shunted{color:#a00}</style>
</head><body><h1>oe-agent</h1><p id="sum">loading…</p>
<table><thead><tr><th>peer</th><th>group</th><th>state</th><th>auth</th></tr></thead>
<tbody id="peers"></tbody></table>
<script>
async function poll(){
  try{
    const s = await (await fetch('/status')).json();
    document.getElementById('sum').textContent =
      `up ${s.uptime}s, dataplane ${s.dataplane}, ${s.sas} SA pairs, ${s.shunts} shunts, ${s.policies} policies`;
    document.getElementById('peers').innerHTML = s.peer_list.map(p =>
      `<tr class="${p.state}"><td>${p.remote}</td><td>${p.group||''}</td><td>${p.state}</td><td>${p.auth}</td></tr>`).join('');
  }catch(e){document.getElementById('sum').textContent='agent not answering: '+e;}
}
poll(); setInterval(poll, 2000);
</script></body></html>
"""


def _error(status: int, msg: str) -> web.Response:
    return web.json_response({"error": msg}, status=status)


def _addr(text: str, what: str):
    try:
        return ipaddress.ip_address(text)
    except (ValueError, TypeError):
        raise UserError(f"{what}: {text!r} is not an IP address") from None


def _int(body: dict, key: str, lo: int, hi: int) -> int:
    v = body.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise UserError(f"{key}: {v!r} is not an integer in {lo}..{hi}")
    return v


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except UserError as e:
        return _error(400, str(e))
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, e.reason)
        raise


async def status(request):
    return web.json_response(await request.app[AGENT_KEY].request("status"))


async def sas(request):
    return web.json_response(await request.app[AGENT_KEY].request("sas"))


async def shunts(request):
    return web.json_response(await request.app[AGENT_KEY].request("shunts"))


async def peer(request):
    addr = _addr(request.match_info["addr"], "address")
    return web.json_response(await request.app[AGENT_KEY].request("explain", addr=addr))


async def acquire(request):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError("body must be JSON: {\"from\": A, \"to\": B, \"proto\": P, \"dport\": N}") from None
    if not isinstance(body, dict):
        raise UserError("body must be a JSON object")
    unknown = set(body) - {"from", "to", "proto", "dport"}
    if unknown:
        raise UserError(f"unknown field {sorted(unknown)[0]!r} (known: from, to, proto, dport)")
    for k in ("from", "to"):
        if k not in body:
            raise UserError(f"missing field {k!r}")
    src, dst = _addr(body["from"], "from"), _addr(body["to"], "to")
    proto, dport = _int(body, "proto", 0, 255), _int(body, "dport", 0, 65535)
    if dport and proto not in (6, 17, 132, 136):
        raise UserError("dport needs proto tcp (6), udp (17), sctp (132) or udplite (136)")
    return web.json_response(await request.app[AGENT_KEY].request(
        "acquire", src=src, dst=dst, proto=proto, dport=dport))


async def reload(request):
    return web.json_response(await request.app[AGENT_KEY].request("reload"))


async def metrics(request):
    text = await request.app[AGENT_KEY].request("metrics")
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def page(request):
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8")


def make_app(agent) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[AGENT_KEY] = agent
    app.add_routes([web.get("/", page), web.get("/status", status), web.get("/sas", sas),
                    web.get("/shunts", shunts), web.get("/peers/{addr}", peer),
                    web.post("/acquire", acquire), web.post("/reload", reload),
                    web.get("/metrics", metrics)])
    return app


def socket_in_use(path: Path) -> bool:
    """A live agent answers on the socket (a crashed one leaves only the file behind)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlServer:
    """The API on its unix socket; refuses to take over a live agent's socket."""

    def __init__(self, agent, path: Path):
        self.agent, self.path = agent, Path(path)
        self._runner: web.AppRunner | None = None

    def check_free(self) -> None:
        """UserError if a live agent answers on the path (called before touching anything)."""
        if (self.path.exists() or self.path.is_symlink()) and socket_in_use(self.path):
            raise UserError(f"{self.path}: another agent is listening there")

    async def start(self) -> None:
        self.check_free()
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # stale, from a crash
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.path.parent}: cannot create socket directory: {e.strerror}") from None
        self._runner = web.AppRunner(make_app(self.agent), access_log=None)
        await self._runner.setup()
        old = os.umask(0o177)  # the socket is born 0600: nobody else can connect in between
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        except OSError as e:
            await self._runner.cleanup()
            raise UserError(f"{self.path}: cannot listen: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

