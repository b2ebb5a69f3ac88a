"""Issue 4 acceptance 3 and 4 against knot + unbound: showhostkey lines load into knot and the
key read back verifies a signature; publish by TSIG-signed update, a key changes only its own
name; a rollover never leaves resolvers without the key in use."""
import asyncio
import base64
import contextlib
import io
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from oe_agent.cli import main
from oe_agent.dns import ipseckey
from oe_agent.dns.publish import PublishError, Publisher, TsigKey
from oe_agent.dns.resolver import KeyResolver
from tests.conftest import have, needs
from tests.interop import dnsfix

SECRETS = {f"pub{n}.oe.example.": base64.b64encode(os.urandom(32)).decode() for n in (1, 2)}


@pytest.fixture(scope="module")
def keys():
    return dnsfix.TestKeys()


def _cli(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


@pytest.fixture
def lab(hosts, keys, tmp_path):
    needs(have("knotd") and have("keymgr"), "knot (apt: knot)")
    needs(have("unbound"), "unbound (apt: unbound)")
    auth, client = hosts.add(), hosts.add()
    hostkeys = {}
    extra = {dnsfix.TOP: "", dnsfix.REV4: ""}
    for kind, argv in (("ed25519", []), ("rsa", ["--type", "rsa", "--bits", "2048"])):
        path = tmp_path / f"{kind}.pem"
        _cli("newhostkey", "--output", str(path), *argv)
        hostkeys[kind] = path
        extra[dnsfix.TOP] += _cli("showhostkey", "--key", str(path), "--ipseckey",
                                  "--fqdn", f"sk-{kind}.oe.example", "--ttl", "60")
    extra[dnsfix.REV4] += _cli("showhostkey", "--key", str(hostkeys["ed25519"]), "--ipseckey",
                               "--address", "192.0.2.7", "--precedence", "5")
    knot = dnsfix.Knot(auth, dnsfix.make_server(keys), extra=extra, tsig=SECRETS).start()
    ub = dnsfix.Unbound(client, knot.anchors_text(),
                        {z: auth.v4 for z in dnsfix.AUTO_SIGNED}).start()
    yield dict(auth=auth, client=client, knot=knot, hostkeys=hostkeys)
    ub.stop()
    knot.stop()


def _verifies(priv, pub) -> None:
    msg = b"AUTH payload octets"
    if isinstance(priv, rsa.RSAPrivateKey):
        pub.verify(priv.sign(msg, padding.PKCS1v15(), hashes.SHA256()), msg,
                   padding.PKCS1v15(), hashes.SHA256())
    else:
        pub.verify(priv.sign(msg), msg)


def test_showhostkey_lines_load_into_knot(lab):
    names = ["sk-ed25519.oe.example", "sk-rsa.oe.example", "192.0.2.7"]
    for mode in ("validate", "resolver"):
        async def run():
            r = KeyResolver(["127.0.0.1"], lab["knot"].anchors_text(), mode)
            return await asyncio.gather(*(r.lookup(n) for n in names))
        answers = dnsfix.run_in_netns(lab["client"].name, run)
        for a, kind in zip(answers, ("ed25519", "rsa", "ed25519")):
            assert a.status == "secure-key", (mode, a.query, a.reason)
            (k,) = a.keys
            priv = serialization.load_pem_private_key(lab["hostkeys"][kind].read_bytes(), None)
            _verifies(priv, k.public_key)
        assert answers[2].keys[0].precedence == 5


def _tsig(name):
    return TsigKey.from_text(f"hmac-sha256:{name}:{SECRETS[name]}")


def test_publish_with_tsig_only_own_name(lab, keys):
    auth = lab["auth"].v4
    ed = ipseckey.rdata_text(10, keys.ed25519.public_key())
    p256 = ipseckey.rdata_text(10, keys.p256.public_key())
    owner1 = ipseckey.owner_name("pub1.oe.example")
    owner2 = ipseckey.owner_name("pub2.oe.example")

    async def run():
        await Publisher(auth, owner1, _tsig("pub1.oe.example."), ttl=30).replace(ed)
        refused = None
        try:  # pub1's key tries to put a key at pub2's name
            await Publisher(auth, owner2, _tsig("pub1.oe.example."), ttl=30).replace(p256)
        except PublishError as exc:
            refused = str(exc)
        r = KeyResolver([auth], lab["knot"].anchors_text(), "validate")
        return refused, await r.lookup("pub1.oe.example"), await r.lookup("pub2.oe.example")

    refused, one, two = dnsfix.run_in_netns(lab["client"].name, run)
    assert refused is not None and "refused" in refused
    assert one.status == "secure-key"  # knot re-signed the zone after the update
    assert [k.key_bytes() for k in one.keys] == [ipseckey.public_key_bytes(
        keys.ed25519.public_key())[1]]
    assert two.status == "secure-denial", two.reason


def test_publish_verb_with_tsig_file(lab, tmp_path):
    tsig = tmp_path / "pub2.key"
    tsig.write_text(f'key "pub2.oe.example." {{ algorithm hmac-sha256; '
                    f'secret "{SECRETS["pub2.oe.example."]}"; }};\n')
    key = lab["hostkeys"]["rsa"]
    auth = lab["auth"].v4

    def run():
        out = _cli("publish", "--key", str(key), "--server", auth, "--fqdn", "pub2.oe.example",
                   "--tsig-file", str(tsig), "--ttl", "30")

        async def look():
            return await KeyResolver([auth], lab["knot"].anchors_text()).lookup(
                "pub2.oe.example")
        return out, asyncio.run(look())

    out, answer = dnsfix.run_in_netns(lab["client"].name, run)
    assert "published pub2.oe.example." in out
    priv = serialization.load_pem_private_key(key.read_bytes(), None)
    assert answer.status == "secure-key"
    _verifies(priv, answer.keys[0].public_key)

    # then roll pub2 over to the Ed25519 key with the verb; the switch command runs between
    new_key, switched = lab["hostkeys"]["ed25519"], tmp_path / "switched"

    def roll():
        out = _cli("publish", "--rollover", "--old-key", str(key), "--key", str(new_key),
                   "--server", auth, "--fqdn", "pub2.oe.example", "--tsig-file", str(tsig),
                   "--ttl", "1", "--switch-command", f"touch {switched}")

        async def look():
            return await KeyResolver([auth], lab["knot"].anchors_text()).lookup(
                "pub2.oe.example")
        return out, asyncio.run(look())

    out, answer = dnsfix.run_in_netns(lab["client"].name, roll)
    assert switched.exists() and "old key removed" in out
    (only,) = answer.keys
    _verifies(serialization.load_pem_private_key(new_key.read_bytes(), None), only.public_key)


def test_rollover_never_leaves_resolvers_without_the_key_in_use(lab, keys):
    auth = lab["auth"].v4
    ttl = 2
    old = ipseckey.rdata_text(10, keys.ed25519.public_key())
    new = ipseckey.rdata_text(10, keys.p256.public_key())
    old_b = ipseckey.public_key_bytes(keys.ed25519.public_key())[1]
    new_b = ipseckey.public_key_bytes(keys.p256.public_key())[1]
    owner = ipseckey.owner_name("pub1.oe.example")

    async def run():
        pub = Publisher(auth, owner, _tsig("pub1.oe.example."), ttl=ttl)
        await pub.replace(old)
        # the agent's view: its own cache in front of unbound's, both by TTL
        r = KeyResolver(["127.0.0.1"], None, "resolver", max_ttl=ttl)
        in_use = {"key": old_b}
        seen: list[tuple[str, bytes, set]] = []
        done = asyncio.Event()

        async def poll():
            while not done.is_set():
                a = await r.lookup("pub1.oe.example")
                seen.append((a.status, in_use["key"], {k.key_bytes() for k in a.keys}))
                await asyncio.sleep(0.1)

        def switch():
            in_use["key"] = new_b

        poller = asyncio.ensure_future(poll())
        await asyncio.sleep(ttl + 1)  # resolvers settle on the old key
        await pub.rollover(old, new, on_switch=switch)
        await asyncio.sleep(ttl + 2)  # until the old key is gone from every cache
        done.set()
        await poller
        return seen

    seen = dnsfix.run_in_netns(lab["client"].name, run)
    assert len(seen) > 20
    for status, key_in_use, published in seen:
        assert status == "secure-key" and key_in_use in published
    assert any(p == {old_b, new_b} for _s, _k, p in seen)  # both were published at once
    assert seen[0][2] == {old_b} and seen[-1][2] == {new_b}
