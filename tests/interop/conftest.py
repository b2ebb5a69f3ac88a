"""Fixtures of the interop tier: charon and pluto started inside `hosts` namespaces."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import needs
from tests.interop.peers import keys
from tests.interop.peers.charon import CHARON_BIN, Charon
from tests.interop.peers.pluto import LIBRESWAN, Pluto, new_nss_db

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def keypair():
    """keypair(kind, n) -> the n-th KeyPair of that kind, generated once per session."""
    cache: dict[tuple[str, int], keys.KeyPair] = {}

    def get(kind: str, n: int = 0) -> keys.KeyPair:
        if (kind, n) not in cache:
            cache[(kind, n)] = keys.generate(kind)
        return cache[(kind, n)]

    return get


@pytest.fixture
def charon(hosts):
    """charon(host, **options) -> a started Charon in that host; all stopped at teardown."""
    needs(os.access(CHARON_BIN, os.X_OK), f"{CHARON_BIN} (apt: strongswan-charon)")
    needs(Path("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so").exists(),
          "strongSwan kernel-libipsec plugin (apt: libcharon-extra-plugins)")
    needs(Path("/dev/net/tun").exists(), "/dev/net/tun (kernel-libipsec's TUN device)")
    started: list[Charon] = []

    def start(host, **kw) -> Charon:
        c = Charon(host, **kw)
        started.append(c)
        return c.start()

    yield start
    for c in reversed(started):
        c.stop()


@pytest.fixture(scope="session")
def pluto_nss(tmp_path_factory) -> Path:
    """One NSS db with an RSA host key, made once per session and copied into each pluto."""
    needs((LIBRESWAN / "pluto").exists(),
          f"libreswan unpacked in {LIBRESWAN.parents[2]} (tools/install-deps.sh)")
    d = tmp_path_factory.mktemp("pluto-nss") / "nss"
    new_nss_db(d)
    return d


@pytest.fixture
def pluto(hosts, pluto_nss):
    """pluto(host, ...) -> a started Pluto in that host; all stopped at teardown. Every pluto
    of a session has the same host key (pass nss_template=None for a fresh one)."""
    started: list[Pluto] = []

    def start(host, **kw) -> Pluto:
        kw.setdefault("nss_template", pluto_nss)
        p = Pluto(host, **kw)
        started.append(p)
        return p.start()

    yield start
    for p in reversed(started):
        p.stop()
