import ipaddress
from pathlib import Path

import pytest

from oe_agent import config
from oe_agent.errors import UserError
from oe_agent.model import Mode, ShuntKind

SPEC_EXAMPLE = """
[agent]
addresses = ["192.0.2.1"]
policies = "/etc/oe-agent/policies"
socket = "/run/oe-agent/ctl.sock"
dataplane = "auto"
keylog = ""

[identity]
key = "/etc/oe-agent/hostkey.pem"
id = "192.0.2.1"

[dns]
resolvers = ["192.0.2.53"]
trust_anchors = "/etc/oe-agent/anchors"
dnssec = "validate"

[ike]
port = 500
natt_port = 4500

[[peer]]
address = "192.0.2.2"
public_key = "/etc/oe-agent/peers/b.pub"
auth = "pubkey"
mode = "tunnel"
start = "now"
"""


def test_spec_example_loads(tmp_path):
    f = tmp_path / "oe.toml"
    f.write_text(SPEC_EXAMPLE)
    c = config.load(f)
    assert c.addresses == (ipaddress.ip_address("192.0.2.1"),)
    assert c.policies == Path("/etc/oe-agent/policies")
    assert c.dataplane == "auto" and c.keylog is None
    assert c.identity_id == "192.0.2.1"
    assert c.resolvers == (ipaddress.ip_address("192.0.2.53"),)
    assert c.ike_port == 500 and c.natt_port == 4500
    (p,) = c.peers
    assert p.address == ipaddress.ip_address("192.0.2.2") and p.mode is Mode.TUNNEL
    assert p.start == "now" and p.public_key == "/etc/oe-agent/peers/b.pub"
    # defaults embedded
    assert c.negotiation_shunt == {"private-or-clear": ShuntKind.HOLD, "private": ShuntKind.HOLD}
    assert c.failure_shunt == {"private-or-clear": ShuntKind.PASS, "private": ShuntKind.DROP}
    assert c.lifetimes["no_key"] == 900
    assert c.proposals == () and c.esp_proposals == ()  # the engine's defaults


def test_minimal_file_is_all_defaults(tmp_path):
    c = config.parse("", tmp_path / "x.toml")
    assert c.addresses == () and c.dataplane == "auto" and c.peers == ()
    assert c.socket == Path("/run/oe-agent/ctl.sock")


def test_relative_paths_are_relative_to_the_file(tmp_path):
    c = config.parse('[agent]\npolicies = "pol"\nsocket = "s.sock"\n', tmp_path / "x.toml")
    assert c.policies == tmp_path / "pol" and c.socket == tmp_path / "s.sock"


def test_shunt_and_lifetime_overrides():
    c = config.parse("""
[shunts]
negotiation = { private-or-clear = "pass" }
[shunts.lifetimes]
no_key = 60
silent = 2
silent_max = 30
[ike]
proposals = ["aes128-sha256-prfsha384-modp2048"]
esp_proposals = ["chacha20poly1305"]
child_lifetime = 120
rekey_margin = 20
""")
    assert c.negotiation_shunt["private-or-clear"] is ShuntKind.PASS
    assert c.negotiation_shunt["private"] is ShuntKind.HOLD
    assert c.lifetimes["no_key"] == 60 and c.lifetimes["refused"] == 300
    assert c.proposals == ("aes128-sha256-prfsha384-modp2048",)
    assert c.esp_proposals == ("chacha20poly1305",)


@pytest.mark.parametrize("text, key", [
    ("[agent]\ndataplane = \"fast\"\n", "agent.dataplane"),
    ("[agent]\nfoo = 1\n", "agent.foo"),
    ("[agent]\naddresses = [\"192.0.2.300\"]\n", "agent.addresses"),
    ("[agent]\naddresses = \"192.0.2.1\"\n", "agent.addresses"),
    ("[agent]\nkeep_sas_on_stop = 1\n", "agent.keep_sas_on_stop"),
    ("[agent]\nidle_timeout = true\n", "agent.idle_timeout"),
    ("[identity]\nid = \"not a name!\"\n", "identity.id"),
    ("[dns]\ndnssec = \"resolver\"\nresolvers = [\"192.0.2.53\"]\n", "dns.resolvers"),
    ("[dns]\ndnssec = \"maybe\"\n", "dns.dnssec"),
    ("[ike]\nport = 70000\n", "ike.port"),
    ("[ike]\nport = 4500\n", "ike.natt_port"),
    ("[ike]\nproposals = [\"aes256gcm16-prfsha256-x448\"]\n", "ike.proposals"),
    ("[ike]\nproposals = [\"aes256-prfsha256-x25519\"]\n", "ike.proposals"),
    ("[ike]\nproposals = [3]\n", "ike.proposals"),
    ("[ike]\nesp_proposals = [\"aes256gcm16-prfsha256-x25519\"]\n", "ike.esp_proposals"),
    ("[ike]\nchild_lifetime = 100\nrekey_margin = 100\n", "ike.rekey_margin"),
    ("[shunts]\nfailure = { private = \"hold\" }\n", "shunts.failure.private"),
    ("[shunts]\nnegotiation = { clear = \"pass\" }\n", "shunts.negotiation.clear"),
    ("[shunts.lifetimes]\nno_key = 0\n", "shunts.lifetimes.no_key"),
    ("[shunts.lifetimes]\nsilent = 100\nsilent_max = 10\n", "shunts.lifetimes.silent_max"),
    ("[shunts.lifetimes]\nforever = 1\n", "shunts.lifetimes.forever"),
    ("[[peer]]\nauth = \"null\"\n", "peer[0].address"),
    ("[[peer]]\naddress = \"192.0.2.2\"\nauth = \"pubkey\"\n", "peer[0].public_key"),
    ("[[peer]]\naddress = \"192.0.2.2\"\nauth = \"psk\"\n", "peer[0].psk"),
    ("[[peer]]\naddress = \"192.0.2.2\"\nauth = \"cert\"\n", "peer[0].auth"),
    ("[[peer]]\naddress = \"192.0.2.2\"\nauth = \"null\"\n[[peer]]\naddress = \"192.0.2.2\"\n"
     "auth = \"null\"\n", "peer[1].address"),
    ("[[peer]]\naddress = \"192.0.2.2\"\nauth = \"null\"\nmode = \"beet\"\n", "peer[0].mode"),
    ("agent = 3\n", "agent"),
    ("[extra]\n", "(top level).extra"),
])
def test_errors_name_file_and_key(tmp_path, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        config.load(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: {key}: "), msg
    assert "\n" not in msg


def test_toml_syntax_error_names_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[agent\n")
    with pytest.raises(UserError, match=f"^{f}: not valid TOML"):
        config.load(f)


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read config"):
        config.load(tmp_path / "nope.toml")
