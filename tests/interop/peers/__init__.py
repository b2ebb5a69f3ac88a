"""Real IKE peers for the interop tier: strongSwan charon and libreswan pluto in test hosts,
a VICI client, raw key generation, and a driver that runs oe-agent's IKE engine in a host."""
