"""Control API and CLI verbs against a running agent on a real unix socket.

The agent (fake dataplane and IKE link, as in test_agent_core) runs its task in a background
event loop; the CLI runs here, as a user would run it.
"""
import asyncio
import ipaddress
import json
import os
import stat
import threading

import aiohttp
import pytest

from oe_agent.agent.core import ChildUp
from oe_agent.cli import main
from oe_agent.control.api import ControlServer
from oe_agent.errors import UserError
from tests.unit.test_agent_fakes import LOCAL, Answer, a_key, child, make_agent

POC = ipaddress.ip_address("192.0.2.7")
PRIV = ipaddress.ip_address("198.51.100.7")


class Running:
    def __init__(self, tmp_path):
        self.sock = tmp_path / "run" / "ctl.sock"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._setup())

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _setup(self):
        self.agent, self.dp, self.ike, self.res, self.clock, self.box = make_agent(
            answers={str(POC): Answer("secure-key", (a_key(),)),
                     str(PRIV): Answer("secure-denial", ttl=60)})
        await self.agent.start()
        self.server = ControlServer(self.agent, self.sock)
        await self.server.start()
        self.task = asyncio.create_task(self.agent.run())

    async def _teardown(self):
        await self.agent.stop()
        await asyncio.wait_for(self.task, 5)
        await self.server.stop()

    def post(self, item):
        self.loop.call_soon_threadsafe(self.agent.post, item)

    def close(self):
        try:
            self.run(self._teardown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def http(self, method, path, data=None, json_body=None):
        async def go():
            conn = aiohttp.UnixConnector(path=str(self.sock))
            async with aiohttp.ClientSession(connector=conn) as s:
                async with s.request(method, f"http://x{path}", data=data, json=json_body) as r:
                    return r.status, r.headers.get("Content-Type", ""), await r.text()
        return asyncio.run(go())

    def state(self):
        return self.run(self._state())

    async def _state(self):
        return (self.dp.snapshot(), {str(k): v.state.value for k, v in self.agent.peers.items()},
                len(self.agent.shunts))


@pytest.fixture
def agent(tmp_path):
    r = Running(tmp_path)
    try:
        yield r
    finally:
        r.close()


def cli(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, match):
    assert rc != 0
    assert err.startswith("oe-agent: ") and err.count("\n") == 1, err
    assert match in err, err


def wait_for(pred, what):
    for _ in range(200):
        if pred():
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_socket_is_0600(agent):
    assert stat.S_IMODE(os.stat(agent.sock).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(agent.sock).st_mode)


def test_second_server_on_a_live_socket_is_refused(agent):
    srv = ControlServer(agent.agent, agent.sock)
    with pytest.raises(UserError, match="another agent is listening"):
        agent.run(srv.start())


def test_status_text_and_json(agent, capsys):
    rc, out, err = cli(capsys, "status", "--socket", str(agent.sock))
    assert rc == 0 and "oe-agent up" in out and "peers: trap 0" in out
    rc, out, err = cli(capsys, "status", "--json", "--socket", str(agent.sock))
    st = json.loads(out)
    assert rc == 0 and st["dataplane"] == "FakeDataplane" and st["esp"] is True
    assert st["policies"] == len(agent.dp.policies)


def test_config_file_selects_the_socket(agent, capsys, tmp_path):
    cfg = tmp_path / "oe.toml"
    cfg.write_text(f'[agent]\nsocket = "{agent.sock}"\n')
    rc, out, err = cli(capsys, "status", "-c", str(cfg))
    assert rc == 0 and "oe-agent up" in out


def test_acquire_then_trafficstatus_and_explain(agent, capsys):
    s = str(agent.sock)
    rc, out, err = cli(capsys, "acquire", "--from", "192.0.2.1", "--to", str(POC), "--socket", s)
    assert rc == 0 and out.startswith("192.0.2.7 (private-or-clear): trap -> negotiating"), out
    assert agent.ike.of("initiate")
    agent.post(ChildUp(POC, child(POC), ike_id=1))
    agent.dp.bytes[0x100] = 1234
    wait_for(lambda: agent.state()[1].get(str(POC)) == "up", "SA up")
    rc, out, err = cli(capsys, "trafficstatus", "--socket", s)
    assert rc == 0 and out.startswith("192.0.2.7: ESP in=00000100 out=00000200 aes-gcm-16-256")
    assert " from 192.0.2.1, inBytes=" in out, out  # a peer may have a pair per local address
    assert "inBytes=1234" in out and "authenticated (DNSSEC key)" in out
    rc, out, err = cli(capsys, "explain", str(POC), "--socket", s)
    assert rc == 0 and out.startswith("192.0.2.7: encrypted: Child SA 00000100/00000200")
    assert "private-or-clear: we initiate" in out and "secure-key" in out and "history:" in out
    rc, out, err = cli(capsys, "explain", str(POC), "--json", "--socket", s)
    assert json.loads(out)["state"] == "up"


def test_shuntstatus_after_a_failure(agent, capsys):
    s = str(agent.sock)
    cli(capsys, "acquire", "--from", "192.0.2.1", "--to", str(PRIV), "--socket", s)
    wait_for(lambda: agent.state()[1].get(str(PRIV)) == "shunted", "no-key shunt")
    rc, out, err = cli(capsys, "shuntstatus", "--socket", s)
    assert rc == 0 and out.startswith("198.51.100.7: drop (no-key: no IPSECKEY published), age ")
    assert "lifetime 900s" in out


def test_acquire_with_proto_and_port(agent, capsys):
    rc, out, err = cli(capsys, "acquire", "--from", "192.0.2.1", "--to", "203.0.113.7",
                       "--proto", "tcp", "--dport", "25", "--socket", str(agent.sock))
    assert rc == 0 and "(no group)" not in out and "clear-or-private" in out
    assert "does not initiate" in out


@pytest.mark.parametrize("argv, match", [
    (["acquire", "--from", "198.51.100.99", "--to", "192.0.2.7"], "not one of this agent's addresses"),
    (["acquire", "--from", "192.0.2.1", "--to", "2001:db8::7"], "not the same IP version"),
    (["acquire", "--from", "192.0.2.1", "--to", "banana"], "--to: 'banana' is not an IP address"),
    (["acquire", "--from", "192.0.2.1", "--to", "192.0.2.7", "--dport", "22"], "--dport needs --proto"),
    (["acquire", "--from", "192.0.2.1", "--to", "192.0.2.7", "--proto", "xyz"], "not a protocol"),
    (["acquire", "--from", "192.0.2.1", "--to", "192.0.2.7", "--proto", "tcp", "--dport", "0"], "not a port"),
    (["acquire", "--from", "192.0.2.1"], "required"),
    (["explain", "not-an-address"], "ADDR: 'not-an-address' is not an IP address"),
])
def test_bad_cli_input_one_error_nothing_changed(agent, capsys, argv, match):
    before = agent.state()
    rc, out, err = cli(capsys, *argv, "--socket", str(agent.sock))
    one_line_error(rc, err, match)
    assert agent.state() == before


def test_reload_and_bad_reload(agent, capsys):
    s = str(agent.sock)
    agent.box["texts"] = {"private-or-clear": "192.0.2.0/25\n", "clear": "192.0.2.128/25\n"}
    rc, out, err = cli(capsys, "reload", "--socket", s)
    assert rc == 0 and out.startswith("reloaded: ") and "+ pass 192.0.2.128/25" in out
    agent.box["texts"] = {"private": "192.0.2.0/24\n", "clear": "192.0.2.0/24\n"}
    before = agent.state()
    rc, out, err = cli(capsys, "reload", "--socket", s)
    one_line_error(rc, err, "two groups")
    assert agent.state() == before


def test_no_agent_running(capsys, tmp_path):
    rc, out, err = cli(capsys, "status", "--socket", str(tmp_path / "none.sock"))
    one_line_error(rc, err, "no agent answering on")
    (tmp_path / "plain").write_text("")
    rc, out, err = cli(capsys, "shuntstatus", "--socket", str(tmp_path / "plain"))
    one_line_error(rc, err, "no agent answering on")


def test_api_endpoints_and_misuse(agent):
    st, ct, body = agent.http("GET", "/")
    assert st == 200 and ct.startswith("text/html") and "fetch('/status')" in body
    st, ct, body = agent.http("GET", "/metrics")
    assert st == 200 and ct.startswith("text/plain")
    assert 'oe_agent_peers{state="up"} 0' in body and "# TYPE oe_agent_child_sas gauge" in body
    for path in ("/status", "/sas", "/shunts", "/peers/192.0.2.7", "/peers/2001:db8::7"):
        st, ct, body = agent.http("GET", path)
        assert st == 200 and ct.startswith("application/json"), path
        json.loads(body)
    before = agent.state()
    for method, path, kw, code, msg in [
        ("GET", "/peers/nope", {}, 400, "not an IP address"),
        ("GET", "/nowhere", {}, 404, "Not Found"),
        ("POST", "/status", {}, 405, "Method Not Allowed"),
        ("POST", "/acquire", {"data": b"{not json"}, 400, "body must be JSON"),
        ("POST", "/acquire", {"json_body": [1]}, 400, "JSON object"),
        ("POST", "/acquire", {"json_body": {"from": "192.0.2.1"}}, 400, "missing field 'to'"),
        ("POST", "/acquire", {"json_body": {"from": "192.0.2.1", "to": "192.0.2.7", "x": 1}}, 400,
         "unknown field 'x'"),
        ("POST", "/acquire", {"json_body": {"from": "192.0.2.1", "to": "192.0.2.7", "proto": 300}},
         400, "proto"),
        ("POST", "/acquire", {"json_body": {"from": "192.0.2.1", "to": "192.0.2.7", "proto": 1,
                                            "dport": 5}}, 400, "dport needs proto"),
    ]:
        st, ct, body = agent.http(method, path, **kw)
        assert st == code and msg in json.loads(body)["error"], (path, st, body)
    assert agent.state() == before
