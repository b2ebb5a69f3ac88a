"""Both sides act at once against charon: mutual initiation, simultaneous Child SA rekey and
simultaneous IKE SA rekey (RFC 7296 §2.8.1, §2.8.2; product.md §5: one IKE SA and one Child SA
pair in the end). The rekey requests are made to cross for sure with nftables in the engine's
host (see `cross`). Each test then asserts the settled outcome: one IKE SA and one Child SA,
the same SPIs on both sides."""
from __future__ import annotations

import time

from tests.interop.peers.charon import sole_child
from tests.interop.peers.wire import Partition
from tests.interop.test_ike_charon import settled, setup_pair, spi_hex


def engine_settled(engine, timeout: float = 20.0) -> tuple[dict, dict]:
    """The engine has one established IKE SA with one installed Child SA (bounded poll)."""
    deadline = time.monotonic() + timeout
    while True:
        st = engine.status()
        sas = [s for s in st["sas"] if s["state"] == "established"]
        if len(st["sas"]) == 1 and len(sas) == 1:
            children = sas[0]["children"]
            if len(children) == 1 and children[0]["state"] == "installed":
                return sas[0], children[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine did not settle: {st}")
        time.sleep(0.2)


def both_agree(engine, c) -> None:
    """Both settle (bounded) on the same single IKE SA and Child SA pair."""
    try:
        sa, child = settled(c, "one IKE SA and one Child SA on charon")
    except TimeoutError as e:
        notes = [ln for ln in c.log_text().splitlines()
                 if "destroying duplicate" in ln or " established between" in ln
                 or "received DELETE for IKE_SA" in ln]
        raise AssertionError(f"{e}\nengine: {engine.status()}\ncharon:\n" + "\n".join(notes)) \
            from None
    esa, echild = engine_settled(engine)
    assert (esa["spi_i"], esa["spi_r"]) == (sa["initiator-spi"], sa["responder-spi"])
    assert spi_hex(echild["spi_in"]) == child["spi-out"]
    assert spi_hex(echild["spi_out"]) == child["spi-in"]


PATIENT = {"retransmit_tries": 6}  # charon keeps retransmitting through the partition


def cross(engine, engine_request, charon_request) -> None:
    """Make two requests truly cross: both are sent while the engine's host is cut off; then
    only requests pass (responses dropped) until each side has received the other's request
    while its own was unanswered; then the link heals and the retransmissions settle it."""
    cut = Partition(engine.host)
    cut.cut()
    engine_request()
    charon_request()
    cut.wait_dropped(1, 1)  # both requests are out (and lost)
    cut.requests_only()
    cut.wait_dropped(1, 1, timeout=15)  # each side answered the other's request (answer lost)
    cut.heal()


def test_mutual_initiation(hosts, charon, keypair):
    engine, c = setup_pair(hosts, charon, keypair, "ed25519", "x25519-gcm")
    engine.start()
    cut = Partition(engine.host)
    cut.cut()
    engine.send("initiate")
    c.initiate_nowait("oe-host", "oe")
    cut.wait_dropped(1, 1)  # both IKE_SA_INIT requests are out
    cut.heal()
    engine.wait_event("ChildSaEstablished", timeout=30)
    both_agree(engine, c)


def test_simultaneous_child_rekey(hosts, charon, keypair):
    engine, c = setup_pair(hosts, charon, keypair, "ed25519", "x25519-gcm",
                           charon_opts=PATIENT)
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    _, child = settled(c, "established")
    cross(engine, lambda: engine.send("rekey_child"), lambda: c.rekey(child_id=child["uniqueid"]))
    engine.wait_event("ChildSaRekeyed", timeout=30)
    settled(c, "rekeyed", lambda s, ch: ch["spi-in"] != child["spi-in"])
    both_agree(engine, c)


def test_simultaneous_ike_rekey(hosts, charon, keypair):
    engine, c = setup_pair(hosts, charon, keypair, "ed25519", "x25519-gcm",
                           charon_opts=PATIENT)
    engine.start()
    engine.send("initiate")
    engine.wait_event("ChildSaEstablished")
    sa, child = settled(c, "established")
    cross(engine, lambda: engine.send("rekey_ike"), lambda: c.rekey(ike_id=sa["uniqueid"]))
    engine.wait_event("IkeSaRekeyed", timeout=30)
    settled(c, "IKE rekeyed", lambda s, ch: s["initiator-spi"] != sa["initiator-spi"])
    both_agree(engine, c)
    assert sole_child(c.list_sas(), "oe")[1]["spi-in"] == child["spi-in"]
