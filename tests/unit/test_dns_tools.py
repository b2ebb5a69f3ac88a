"""Key tools: newhostkey, showhostkey output through dnspython's zone parser, TSIG key files,
lookup against the embedded server, one-line errors."""
import asyncio
import json
import stat

import dns.name
import dns.zone
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from oe_agent.cli import main
from oe_agent.dns import ipseckey
from oe_agent.dns.publish import TsigKey
from tests.interop import dnsfix


def _sign_and_verify(priv, pub):
    msg = b"IKE_AUTH octets"
    if isinstance(priv, rsa.RSAPrivateKey):
        sig = priv.sign(msg, padding.PKCS1v15(), hashes.SHA256())
        pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
    else:
        pub.verify(priv.sign(msg), msg)


@pytest.mark.parametrize("argv", [[], ["--type", "rsa", "--bits", "2048"]])
def test_newhostkey_then_showhostkey_loads_into_dnspython(tmp_path, capsys, argv):
    key = tmp_path / "host.pem"
    assert main(["newhostkey", "--output", str(key), *argv]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    capsys.readouterr()
    assert main(["showhostkey", "--key", str(key), "--ipseckey", "--address", "192.0.2.1",
                 "--address", "2001:db8::1", "--fqdn", "a.oe.example", "--ttl", "60"]) == 0
    lines = capsys.readouterr().out
    zone = dns.zone.from_text("$ORIGIN .\n@ 60 IN SOA ns. h. 1 1 1 1 1\n@ 60 IN NS ns.\n" + lines,
                              origin=dns.name.root, relativize=False, check_origin=False)
    priv = serialization.load_pem_private_key(key.read_bytes(), None)
    owners = ["1.2.0.192.in-addr.arpa.", ipseckey.owner_name("2001:db8::1").to_text(),
              "a.oe.example."]
    for owner in owners:
        rrset = zone.find_rrset(owner, "IPSECKEY")
        (k,) = ipseckey.decode_rrset(rrset)
        assert k.precedence == 10 and k.gateway_type == 0 and rrset.ttl == 60
        _sign_and_verify(priv, k.public_key)


def test_newhostkey_never_overwrites(tmp_path, capsys):
    key = tmp_path / "host.pem"
    key.write_text("precious")
    assert main(["newhostkey", "--output", str(key)]) == 2
    assert key.read_text() == "precious"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not overwriting" in err


@pytest.mark.parametrize("argv, words", [
    (["newhostkey", "--output", "X", "--type", "rsa", "--bits", "1024"], "2048-4096"),
    (["newhostkey", "--output", "X", "--bits", "2048"], "rsa only"),
    (["showhostkey", "--key", "/nonexistent", "--pubkey"], "No such file"),
    (["showhostkey", "--key", "KEY", "--ipseckey"], "--address ADDR or --fqdn"),
    (["showhostkey", "--key", "KEY", "--ipseckey", "--fqdn", "nodots"], "not a DNS name"),
    (["lookup", "x.oe.example", "--dnssec", "resolver", "--resolver", "192.0.2.53"], "loopback"),
    (["publish", "--key", "KEY", "--server", "127.0.0.1", "--fqdn", "a.oe.example"], "TSIG"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, words):
    key = tmp_path / "k.pem"
    main(["newhostkey", "--output", str(key)])
    capsys.readouterr()
    argv = [str(key) if a == "KEY" else str(tmp_path / a) if a == "X" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_showhostkey_pubkey_is_pem(tmp_path, capsys):
    key = tmp_path / "k.pem"
    main(["newhostkey", "--output", str(key)])
    capsys.readouterr()
    main(["showhostkey", "--key", str(key), "--pubkey"])
    pub = serialization.load_pem_public_key(capsys.readouterr().out.encode())
    _sign_and_verify(serialization.load_pem_private_key(key.read_bytes(), None), pub)


def test_tsig_key_formats():
    secret = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"
    forms = [f"hmac-sha256:h1.oe.example:{secret}", f"h1.oe.example:{secret}",
             f'key "h1.oe.example" {{ algorithm hmac-sha256; secret "{secret}"; }};',
             f"key:\n  - id: h1.oe.example\n    algorithm: hmac-sha256\n    secret: {secret}\n"]
    for text in forms:
        k = TsigKey.from_text(text)
        assert k.name == dns.name.from_text("h1.oe.example") and k.secret == b"secret" * 4
    with pytest.raises(ValueError, match="not base64"):
        TsigKey.from_text("n.oe.example:***")
    with pytest.raises(ValueError, match="unknown algorithm"):
        TsigKey.from_text(f"hmac-md99:n.oe.example:{secret}")


def test_lookup_verb_json(tmp_path, capsys):
    keys = dnsfix.TestKeys()
    anchors = tmp_path / "anchors"

    async def run():
        srv = dnsfix.make_server(keys)
        host, port = await srv.start()
        anchors.write_text(dnsfix.anchors_text(srv))
        try:
            # the CLI runs its own event loop: run it in a thread
            return await asyncio.to_thread(main, [
                "lookup", "--json", "--resolver", f"{host}@{port}", "--anchors", str(anchors),
                "192.0.2.5", "host.tampered.oe.example"])
        finally:
            await srv.close()

    rc = asyncio.run(run())
    out = json.loads(capsys.readouterr().out)
    assert rc == 1  # one of them is bogus
    assert [a["status"] for a in out] == ["secure-key", "bogus"]
    assert out[0]["chain"] == ["5.0-63.2.0.192.in-addr.arpa."]


def test_server_address_forms():
    from oe_agent.dns.transport import parse_server
    assert parse_server("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_server("127.0.0.1@5353") == ("127.0.0.1", 5353)
    assert parse_server("::1#5353") == ("::1", 5353)
    assert parse_server("[2001:db8::53]:54") == ("2001:db8::53", 54)
    for bad in ("ns.oe.example", "127.0.0.1@x", "[::1]:", "127.0.0.1@70000"):
        with pytest.raises(ValueError, match="DNS server"):
            parse_server(bad)
