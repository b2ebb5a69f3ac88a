"""vm tier: runs inside the QEMU guest started by tools/vmrun.py, whose kernel has real ESP.

`make test` runs the whole tier in one boot: tools/vmrun.py -- pytest -m vm tests/vm.
"""
from __future__ import annotations

import pytest

from tests.conftest import IN_VM, needs
from tests.vm.wire import kernel_has_esp


@pytest.fixture(autouse=True)
def in_guest():
    needs(IN_VM, "the vm tier runs inside QEMU: tools/vmrun.py -- .venv/bin/python -m pytest "
                 "-m vm tests/vm")


@pytest.fixture(scope="session")
def esp_kernel():
    """This kernel implements ESP (esp4/esp6 loaded)."""
    needs(IN_VM and kernel_has_esp(), "a kernel with ESP (esp4/esp6 modules)")
