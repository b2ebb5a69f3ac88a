"""vm tier: runs inside the QEMU guest started by tools/vmrun.py, whose kernel has real ESP.

`make test` runs the whole tier in one boot: tools/vmrun.py -- pytest -m vm tests/vm.
Every `ip` or python process costs ~0.5-2 s in the guest, so the tests share one pair of
hosts (`lan`, made once by tests.hosts.HostFactory) and reset their XFRM state between tests.
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import IN_VM, needs
from tests.hosts import HostFactory, xfrm_snapshot
from tests.vm.wire import flush_xfrm, in_netns, kernel_has_esp


@pytest.fixture(autouse=True)
def in_guest():
    needs(IN_VM, "the vm tier runs inside QEMU: tools/vmrun.py -- .venv/bin/python -m pytest "
                 "-m vm tests/vm")


@pytest.fixture(scope="session")
def esp_kernel():
    """This kernel implements ESP (esp4/esp6 loaded)."""
    needs(IN_VM and kernel_has_esp(), "a kernel with ESP (esp4/esp6 modules)")


@pytest.fixture(scope="session")
def lan(tmp_path_factory, esp_kernel):
    """Two test hosts on one bridge for the whole tier; the guest's own XFRM must not change."""
    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")
    before = xfrm_snapshot()
    factory = HostFactory(tmp_path_factory.mktemp("lan"))
    try:
        factory.pair()
        yield factory
    finally:
        factory.close()
    assert xfrm_snapshot() == before, "the guest namespace's XFRM state changed"


@pytest.fixture
def pair(lan):
    """(factory, a, b) with empty XFRM state, emptied again after the test."""
    a, b = lan.hosts[:2]
    flush_xfrm(a, b)
    yield lan, a, b
    flush_xfrm(a, b)


@pytest.fixture
async def dataplanes(pair):
    """The project's kernel dataplane started in each host's namespace: (a, b, dp_a, dp_b)."""
    from oe_agent.trap.dataplane import KernelDataplane

    _, a, b = pair
    dps = []
    try:
        for h in (a, b):
            dp = KernelDataplane()
            with in_netns(h):  # sockets and the larval_drop sysctl belong to h's namespace
                await dp.start()
            dps.append(dp)
        yield a, b, dps[0], dps[1]
    finally:
        for h, dp in zip((a, b), dps):
            with in_netns(h):
                await dp.stop()
