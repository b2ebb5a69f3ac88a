"""oe-agent: opportunistic IPsec for Linux hosts, keyed by DNS."""

__version__ = "0.1.0"
