"""`agent.keylog`: the agent writes every IKE and Child SA's keys in Wireshark's tables, and
the project's own reader (the one `oe-agent decrypt` uses) finds the SAs that came up."""
import stat

from oe_agent.ike.keylog import read_keylog
from oe_agent.model import Acquire
from oe_agent.agent.peer import PeerState
from tests.unit.test_agent_ike import A, B, COP, POC, close, pair, until


async def test_keylog_has_the_ike_and_esp_keys_of_an_sa(tmp_path):
    log = tmp_path / "keys.txt"
    a, b, tasks = await pair(POC, COP, extra_a=f'keylog = "{log}"\n')
    try:
        a.publish(b)
        b.publish(a)
        a.agent.post(Acquire(src=A, dst=B))
        await until(lambda: a.state(B) is PeerState.UP and b.state(A) is PeerState.UP, "SA up")
        (sa,) = a.dp.sas.values()
    finally:
        await close(a, b, tasks)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    table = read_keylog(log)
    assert len(table.ike) == 1
    (ike,) = table.ike.values()
    assert ike.spi_i and ike.spi_r
    assert {sa.spi_in, sa.spi_out} <= set(table.esp)


async def test_no_keylog_unless_configured(tmp_path):
    a, b, tasks = await pair(POC, COP)
    try:
        assert a.link.keylog is None and b.link.keylog is None
    finally:
        await close(a, b, tasks)
