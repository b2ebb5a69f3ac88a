"""The guest tools/vmrun.py boots: what the rest of the tier relies on (issue 3, runner)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from tests.conftest import IN_CI, ROOT


def _mounts() -> dict[str, str]:
    out = {}
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, where, fstype, *_ = line.split()
        out[where] = fstype
    return out


def test_guest_runs_debian_kernel_with_esp_modules(esp_kernel):
    release = platform.release()
    assert Path(f"/lib/modules/{release}/modules.dep").is_file(), release
    loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    assert {"esp4", "esp6", "xfrm_user"} <= loaded, sorted(loaded)


def test_guest_environment():
    """Root, the repo as cwd, the venv's python (not a pyenv shim), OE_IN_VM and CI passed in,
    the host's / read-only under a tmpfs overlay and a private /tmp."""
    assert os.geteuid() == 0
    assert Path.cwd() == ROOT
    assert os.environ["OE_IN_VM"] == "1"
    assert bool(os.environ.get("CI")) == IN_CI
    first = os.environ["PATH"].split(":")[0]
    assert Path(first) == Path(sys.prefix) / "bin", (first, sys.prefix)
    assert "shims" not in os.environ["PATH"]
    mounts = _mounts()
    assert mounts["/"] == "overlay" and mounts["/tmp"] == "tmpfs", mounts
