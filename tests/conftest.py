"""Shared pytest wiring: tier markers by folder, root/CI rules, test hosts in namespaces."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.hosts import HostFactory, xfrm_snapshot

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
IN_CI = bool(os.environ.get("CI"))
IN_VM = os.environ.get("OE_IN_VM") == "1"

_TIER_BY_DIR = {"unit": "unit", "netns": "netns", "interop": "interop", "vm": "vm"}


def pytest_collection_modifyitems(config, items):
    """A test's folder is its tier; a vm test outside the guest is deselected, not skipped."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        tier = _TIER_BY_DIR.get(parts[0]) if parts else None
        if tier and not any(m.name == tier for m in item.iter_markers()):
            item.add_marker(getattr(pytest.mark, tier))


def needs(condition: bool, why: str) -> None:
    """Skip outside CI when a prerequisite is missing; in CI a missing one is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {why}")
    pytest.skip(why)


@pytest.fixture
def root_required():
    needs(os.geteuid() == 0, "needs root (network namespaces, XFRM)")


@pytest.fixture
def hosts(root_required, tmp_path):
    """Factory of test hosts (namespaces on a shared bridge); removes all it made."""
    before = xfrm_snapshot()
    factory = HostFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()
        after = xfrm_snapshot()
        assert before == after, "the host namespace's XFRM state changed"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    needs(SHARED.is_dir(), f"{SHARED} (the shared design/interop/vectors folder)")
    return SHARED


def have(binary: str) -> bool:
    return subprocess.run(["sh", "-c", f"command -v {binary}"], capture_output=True).returncode == 0
