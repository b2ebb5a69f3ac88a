"""The agent: policy groups, shunts, per-peer lifecycle, and the one owner of state (core)."""
