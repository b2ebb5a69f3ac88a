"""Real IKE peers for the interop tier: strongSwan charon and libreswan pluto in test hosts,
a VICI client, raw key generation, and a driver that runs oe-agent's IKE engine in a host.

Fixtures (tests/interop/conftest.py), all stopped by PID at teardown:
    keypair(kind, n)           session-cached KeyPair ("ed25519", "rsa", "ecdsa-p256")
    charon(host, cookie_threshold=None, log_keys=False, retransmit_tries=3) -> Charon
    pluto(host) -> Pluto       (RSA host key in its own NSS db: .rsasigkey, .public_pem)

    c = charon(b)
    c.load_key(kb)
    c.load_conn("oe", host_conn(local=b.v4, remote=a.v4, local_key=kb, remote_pub=ka.public_pem,
                                child="oe-host", proposals="aes256gcm16-prfsha256-x25519",
                                esp_proposals="aes128gcm16"))
    c.initiate("oe-host", "oe"); c.rekey(child_id=...); c.terminate(ike="oe")
    c.list_sas() / c.wait_sas(pred) / sole_child(sas, "oe") / child_keys(c.log_text())

    engine = EnginePeer.static(a, b, ka, kb.public_pem, ike_proposal=..., esp_proposal=...)
    engine.start(); engine.send("initiate" | "rekey_child" | "rekey_ike" | "delete_child" |
    "delete_ike"); engine.wait_event("ChildSaEstablished") -> dict (bytes as hex)

wire.read_pcap / canary_seen / Partition (nftables cut, requests-only, heal) prove things on
the wire. Pitfalls behind every choice: ../../../../shared/interop/README.md.
"""
