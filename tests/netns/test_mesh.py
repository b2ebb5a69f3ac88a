"""`oe-agent mesh` (the demo): every pair's outcome matches its groups; nothing is left behind."""
import json
import subprocess
import sys

from oe_agent.lab import sh


def _namespaces() -> set[str]:
    """The demo's own namespaces (other tests may run beside it)."""
    return {n for n in sh("ip", "netns", "list").stdout.split() if n.startswith("oemesh")}


def test_mesh_bad_input_refused_before_anything_is_created():
    before = _namespaces()
    r = subprocess.run([sys.executable, "-m", "oe_agent", "mesh", "--hosts", "99"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith("oe-agent: --hosts 99") and r.stderr.count("\n") == 1
    assert _namespaces() == before


def test_mesh_four_hosts_match_their_groups(root_required, tmp_path):
    before = _namespaces()
    out = tmp_path / "mesh.json"
    r = subprocess.run([sys.executable, "-m", "oe_agent", "mesh", "--hosts", "4", "--json",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert _namespaces() == before, "the demo left namespaces behind"
    rows = json.loads(out.read_text())
    assert len(rows) == 12
    bad = [r for r in rows if r["expected"] != r["outcome"]]
    assert not bad, r.stdout
    assert r.returncode == 0
    encrypted = [r for r in rows if r["outcome"] == "encrypted"]
    assert encrypted and all("ESP pkts, 0 plaintext" in r["proof"] for r in encrypted)
