"""The test-host harness itself: two namespaces reach each other over v4 and v6."""


def test_two_hosts_ping(hosts):
    a, b = hosts.pair()
    assert a.run("ping", "-c1", "-W2", b.v4).returncode == 0
    assert a.run("ping", "-6", "-c1", "-W2", b.v6).returncode == 0
