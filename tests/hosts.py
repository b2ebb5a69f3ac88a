"""Test hosts for the tiers: the lab's namespaces (oe_agent/lab.py), re-exported."""
from oe_agent.lab import Host, HostFactory, sh, xfrm_snapshot  # noqa: F401
