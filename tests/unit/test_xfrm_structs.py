"""Every XFRM struct size and field offset matches linux/xfrm.h (compiled with gcc here), and
messages survive an encode/decode round trip through pyroute2's framework."""
from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oe_agent.trap import xfrm
from tests.conftest import needs

HEADER = Path("/usr/include/linux/xfrm.h")


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    """`sizeof:S` and `S:member.path` -> number, printed by a C program built from the header."""
    needs(shutil.which("gcc") is not None, "gcc (build-essential) to compile linux/xfrm.h")
    needs(HEADER.exists(), "linux/xfrm.h (linux-libc-dev)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/xfrm.h>',
             'int main(void) {']
    for name, layout in xfrm.C_STRUCTS.items():
        lines.append(f'printf("sizeof:{name} %zu\\n", sizeof(struct {name}));')
        for _flat, cpath, _off, _size in xfrm.leaves(layout):
            lines.append(f'printf("{name}:{cpath} %zu %zu\\n", offsetof(struct {name}, {cpath}),'
                         f' sizeof(((struct {name} *)0)->{cpath}));')
    lines += ['return 0;', '}']
    d = tmp_path_factory.mktemp("xfrmabi")
    (d / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        key, *nums = line.split()
        table[key] = tuple(int(n) for n in nums)
    return table


@pytest.mark.parametrize("name", sorted(xfrm.C_STRUCTS))
def test_struct_matches_kernel_header(c_layout, name):
    layout = xfrm.C_STRUCTS[name]
    assert xfrm.size_of(layout) == c_layout[f"sizeof:{name}"][0], name
    for _flat, cpath, off, size in xfrm.leaves(layout):
        c_off, c_size = c_layout[f"{name}:{cpath}"]
        assert (off, size) == (c_off, c_size), f"{name}.{cpath}"


def test_every_leaf_is_checked(c_layout):
    """The flattened pyroute2 fields cover the whole struct (no member forgotten)."""
    for name, layout in xfrm.C_STRUCTS.items():
        named = sum(s for *_, s in xfrm.leaves(layout))
        pads = sum(xfrm.struct.calcsize(f) for n, f in xfrm.flatten(layout) if f.endswith("x"))
        assert named + pads == xfrm.size_of(layout), name


def _roundtrip(msg, msg_type):
    wire = xfrm.encode(msg, msg_type, xfrm.NLM_F_REQUEST, 7)
    back = xfrm.decode(wire)
    assert back["header"]["type"] == msg_type and back["header"]["sequence_number"] == 7
    assert back["header"]["length"] == len(wire)
    return back


ports = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), u32, ports, ports, u32, u64, u64,
       st.binary(min_size=16, max_size=36))
def test_usersa_info_roundtrip(addrs, spi, sport, dport, reqid, soft, hard, key):
    src, dst = addrs
    fam = xfrm.family_of(src)
    m = xfrm.xfrm_usersa_info()
    m.update({"sel_daddr": xfrm.addr_bytes(dst), "sel_saddr": xfrm.addr_bytes(src),
              "sel_dport": dport, "sel_dport_mask": 0xFFFF, "sel_sport": sport,
              "sel_family": fam, "sel_prefixlen_d": dst.max_prefixlen, "id_spi": spi,
              "id_daddr": xfrm.addr_bytes(dst), "id_proto": xfrm.IPPROTO_ESP,
              "saddr": xfrm.addr_bytes(src), "lft_soft_byte_limit": soft,
              "lft_hard_byte_limit": hard, "reqid": reqid, "family": fam, "mode": 1,
              "flags": xfrm.XFRM_STATE_ESN})
    m["attrs"] = [
        ("XFRMA_ALG_AEAD", {"alg_name": "rfc4106(gcm(aes))", "alg_key_len": len(key) * 8,
                            "alg_icv_len": 128, "alg_key": key}),
        ("XFRMA_ENCAP", {"encap_type": xfrm.UDP_ENCAP_ESPINUDP, "encap_sport": sport,
                         "encap_dport": dport}),
        ("XFRMA_REPLAY_ESN_VAL", {"bmp_len": 2, "replay_window": 64, "bmp": bytes(8)}),
        ("XFRMA_IF_ID", reqid),
        ("XFRMA_MARK", {"v": reqid, "m": 0xFFFFFFFF}),
    ]
    b = _roundtrip(m, xfrm.XFRM_MSG_NEWSA)
    assert xfrm.addr_from(b["sel_daddr"], fam) == dst
    assert xfrm.addr_from(b["saddr"], fam) == src
    assert (b["sel_dport"], b["sel_sport"], b["id_spi"]) == (dport, sport, spi)
    assert (b["lft_soft_byte_limit"], b["lft_hard_byte_limit"]) == (soft, hard)
    assert (b["reqid"], b["mode"], b["flags"]) == (reqid, 1, xfrm.XFRM_STATE_ESN)
    aead = b.get_attr("XFRMA_ALG_AEAD")
    assert aead["alg_name"].rstrip(b"\0") == b"rfc4106(gcm(aes))"
    assert aead["alg_key"] == key and aead["alg_icv_len"] == 128
    enc = b.get_attr("XFRMA_ENCAP")
    assert (enc["encap_type"], enc["encap_sport"], enc["encap_dport"]) == (2, sport, dport)
    esn = b.get_attr("XFRMA_REPLAY_ESN_VAL")
    assert (esn["bmp_len"], esn["replay_window"], esn["bmp"]) == (2, 64, bytes(8))
    assert b.get_attr("XFRMA_IF_ID") == reqid
    assert b.get_attr("XFRMA_MARK")["v"] == reqid


@given(st.lists(st.tuples(v4, v4, u32, u32), min_size=1, max_size=4), u32, u32)
def test_policy_with_templates_roundtrip(tmpls, prio, index):
    m = xfrm.xfrm_userpolicy_info()
    m.update({"sel_family": xfrm.AF_INET, "priority": prio, "index": index,
              "dir": xfrm.XFRM_POLICY_OUT, "action": xfrm.XFRM_POLICY_ALLOW,
              "lft_hard_add_expires_seconds": 30})
    m["attrs"] = [("XFRMA_TMPL", [
        {"id_daddr": xfrm.addr_bytes(d), "id_spi": spi, "id_proto": xfrm.IPPROTO_ESP,
         "family": xfrm.AF_INET, "saddr": xfrm.addr_bytes(s), "reqid": reqid,
         "mode": xfrm.XFRM_MODE_TUNNEL, "aalgos": 0xFFFFFFFF}
        for s, d, spi, reqid in tmpls])]
    b = _roundtrip(m, xfrm.XFRM_MSG_NEWPOLICY)
    assert (b["priority"], b["index"], b["lft_hard_add_expires_seconds"]) == (prio, index, 30)
    got = b.get_attr("XFRMA_TMPL")
    assert len(got) == len(tmpls)
    for t, (s, d, spi, reqid) in zip(got, tmpls):
        assert xfrm.addr_from(t["id_daddr"], xfrm.AF_INET) == d
        assert xfrm.addr_from(t["saddr"], xfrm.AF_INET) == s
        assert (t["id_spi"], t["reqid"], t["mode"], t["aalgos"]) == (spi, reqid, 1, 0xFFFFFFFF)


def test_acquire_decodes_kernel_layout():
    """An ACQUIRE built byte by byte from the C layout decodes into the named fields."""
    body = xfrm.pack(xfrm.XFRM_USER_ACQUIRE, {
        "id_daddr": xfrm.addr_bytes("2001:db8::2"), "id_proto": xfrm.IPPROTO_ESP,
        "saddr": xfrm.addr_bytes("2001:db8::1"), "sel_family": xfrm.AF_INET6,
        "sel_daddr": xfrm.addr_bytes("2001:db8::2"), "sel_dport": 53, "sel_proto": 17,
        "policy_index": 0x1234, "policy_priority": 99, "seq": 0xABCDEF})
    tmpl = xfrm.pack(xfrm.XFRM_USER_TMPL, {"reqid": 77, "id_proto": xfrm.IPPROTO_ESP,
                                           "family": xfrm.AF_INET6})
    attr = xfrm.struct.pack("HH", 4 + len(tmpl), 5) + tmpl
    payload = body + attr
    hdr = xfrm.struct.pack("IHHII", 16 + len(payload), xfrm.XFRM_MSG_ACQUIRE, 0, 0, 0)
    m = xfrm.decode(hdr + payload)
    assert isinstance(m, xfrm.xfrm_user_acquire)
    assert m["seq"] == 0xABCDEF and m["policy_index"] == 0x1234
    assert xfrm.addr_from(m["sel_daddr"], m["sel_family"]) == ipaddress.ip_address("2001:db8::2")
    assert (m["sel_dport"], m["sel_proto"]) == (53, 17)
    assert m.get_attr("XFRMA_TMPL")[0]["reqid"] == 77


def test_pack_unpack_inverse():
    vals = {"sel_dport": 500, "priority": 3, "lft_soft_byte_limit": xfrm.XFRM_INF, "dir": 1}
    raw = xfrm.pack(xfrm.XFRM_USERPOLICY_INFO, vals)
    assert len(raw) == xfrm.size_of(xfrm.XFRM_USERPOLICY_INFO) == 168
    back = xfrm.unpack(xfrm.XFRM_USERPOLICY_INFO, raw)
    assert {k: back[k] for k in vals} == vals
