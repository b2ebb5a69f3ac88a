"""Issue 2, acceptance 1: the IKE engine is sans-I/O. No socket, no clock, no global RNG in
oe_agent/ike/ — except the asyncio adapter and the pcap/decrypt tooling, which are I/O."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

IKE = Path(__file__).resolve().parents[2] / "oe_agent" / "ike"
EXEMPT = {"adapter.py", "decrypt.py", "pcap.py"}
BANNED_MODULES = {"socket", "time", "random", "secrets", "asyncio", "select", "selectors",
                  "datetime", "uuid", "ssl"}
BANNED_ATTRS = {("os", "urandom"), ("os", "getrandom"), ("os", "times")}


def violations(source: str) -> list[str]:
    """Every banned import or call in `source`, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in BANNED_MODULES:
                    found.append(f"{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in BANNED_MODULES:
                found.append(f"{node.lineno}: from {node.module} import ...")
            if mod == "os" and any(("os", a.name) in BANNED_ATTRS for a in node.names):
                found.append(f"{node.lineno}: from os import {[a.name for a in node.names]}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in BANNED_ATTRS:
                found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "__import__":
            found.append(f"{node.lineno}: __import__")
    return found


ENGINE = sorted(p for p in IKE.glob("*.py") if p.name not in EXEMPT)


def test_engine_files_exist():
    names = {p.name for p in ENGINE}
    assert {"sa.py", "auth.py", "proposal.py", "states.py", "message.py", "crypto.py"} <= names


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: p.name)
def test_no_io_clock_or_global_rng(path):
    assert violations(path.read_text()) == [], f"{path.name} is not sans-I/O"


@pytest.mark.parametrize("bad", ["import time", "from random import randbytes",
                                 "import os\nx = os.urandom(8)", "import socket.socket",
                                 "from os import urandom", "__import__('secrets')",
                                 "from asyncio import sleep"])
def test_scanner_catches(bad):
    assert violations(bad)
