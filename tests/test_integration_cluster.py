"""
Clusters end to end: real C{twistd} nodes and one real C{redis-server} on
loopback, each node with its own 127.0.0.x address.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request

import pytest
from twisted.names import dns

from tests.support import Backend, RedisServer, Txlb, freePort, poolToml, recvLine, waitFor

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
    pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed"),
]

HEARTBEAT, FAILOVER_AFTER = 0.5, 2.0


@pytest.fixture
def redis():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def backend():
    b = Backend("server-1")
    yield b
    b.stop()


class Node:
    """One txlb node: its config, addresses and process."""

    def __init__(self, name: str, address: str, mode: str, redis: RedisServer, backend: Backend,
                 port: int, dnsPort: int = 0, on_active: str = "") -> None:
        self.name, self.address, self.port = name, address, port
        self.admin = freePort()
        self.dnsPort = dnsPort
        dnsToml = (
            f'[dns]\nlisten = "udp:{dnsPort}:interface=127.0.0.1"\nname = "lb.example.com"\nttl = 7\n'
            if dnsPort else ""
        )
        self.txlb = Txlb(
            f'[admin]\nlisten = "tcp:{self.admin}:interface=127.0.0.1"\n'
            f'[log]\nformat = "json"\naccess = false\n'
            f'[cluster]\nmode = "{mode}"\nnode = "{name}"\nredis = "{redis.address}"\n'
            f'heartbeat = "{int(HEARTBEAT * 1000)}ms"\nfailover_after = "{int(FAILOVER_AFTER)}s"\n'
            f'address = "{address}"\non_active = "{on_active}"\n'
            f"{dnsToml}"
            + poolToml("p", [backend], extra='health = { kind = "none" }')
            + f'[[services]]\nname = "tcp"\nprotocol = "tcp"\nlisten = "tcp:{port}:interface={address}"\npool = "p"\n'
        )

    def start(self, listening: int) -> "Node":
        self.txlb.start(listening=listening)
        return self

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def serves(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=2) as s:
                return recvLine(s) == b"server-1\n"
        except OSError:
            return False


def dnsQuery(port: int, name: bytes) -> dns.Message:
    query = dns.Message(id=4242, recDes=1)
    query.queries = [dns.Query(name, dns.A, dns.IN)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(query.toStr(), ("127.0.0.1", port))
        data, _ = s.recvfrom(4096)
    response = dns.Message()
    response.fromStr(data)
    return response


def test_active_passive_failover(redis, backend):
    port = freePort()
    a = Node("lb-a", "127.0.0.2", "active-passive", redis, backend, port)
    b = Node("lb-b", "127.0.0.3", "active-passive", redis, backend, port, on_active="touch became-active")
    try:
        a.start(listening=2)
        waitFor(lambda: a.api("/api/cluster")["active"], what="a to be active")
        b.start(listening=1)
        waitFor(lambda: len(b.api("/api/cluster")["nodes"]) == 2, what="b to see a")
        status = b.api("/api/cluster")
        assert (status["mode"], status["node"], status["active"], status["leader"]) == (
            "active-passive", "lb-b", False, "lb-a",
        )
        assert a.serves()
        assert not b.serves()
        assert not (b.txlb.dir / "became-active").exists()

        a.txlb.process.kill()  # kill -9: no goodbye, the lease must expire
        killed = time.monotonic()
        waitFor(b.serves, timeout=FAILOVER_AFTER + 2, what="b to serve")
        assert time.monotonic() - killed <= FAILOVER_AFTER + 2
        [failover] = waitFor(lambda: b.txlb.events("failover"), what="the failover event")
        assert (failover["failedLoadBalancer"], failover["newActiveLoadBalancer"], failover["failoverStatus"]) == (
            "lb-a", "lb-b", "completed",
        )
        waitFor(lambda: (b.txlb.dir / "became-active").exists(), what="on_active to run")
        assert [e["exitCode"] for e in b.txlb.events("on_active")] == [0]
        waitFor(lambda: [n["node"] for n in b.api("/api/cluster")["nodes"]] == ["lb-b"], what="a to leave")
    finally:
        a.txlb.stop()
        b.txlb.stop()
    # A clean stop gives the lease up.
    assert redis.command("EXISTS", "txlb:cluster:leader") == "0"


def test_active_active_shares_admin_changes(redis, backend):
    port = freePort()
    dnsA, dnsB = freePort(), freePort()
    a = Node("lb-a", "127.0.0.2", "active-active", redis, backend, port, dnsPort=dnsA)
    b = Node("lb-b", "127.0.0.3", "active-active", redis, backend, port, dnsPort=dnsB)
    try:
        a.start(listening=3)
        b.start(listening=3)
        for node in (a, b):
            waitFor(lambda: len(node.api("/api/cluster")["nodes"]) == 2, what=f"{node.name} to see both")
            status = node.api("/api/cluster")
            assert (status["mode"], status["node"], status["active"]) == ("active-active", node.name, True)
            assert [(n["node"], n["address"], n["active"]) for n in status["nodes"]] == [
                ("lb-a", "127.0.0.2", True), ("lb-b", "127.0.0.3", True),
            ]
        assert a.serves() and b.serves()

        a.api("/api/pools/p/servers/server-1/drain", method="POST")
        state = lambda: b.api("/api/pools/p")["servers"][0]["state"]
        waitFor(lambda: state() in ("draining", "drained"), timeout=3, what="the drain on b")
        [change] = b.txlb.events("cluster_change")
        assert (change["op"], change["origin"], change["applied"]) == ("drain", "lb-a", True)
        a.api("/api/pools/p/servers/server-1/enable", method="POST")
        waitFor(lambda: state() == "up", timeout=3, what="the enable on b")
        assert a.txlb.events("cluster_change") == []

        # DNS on either node: both nodes, the configured TTL, rotating.
        for dnsPort in (dnsA, dnsB):
            response = dnsQuery(dnsPort, b"LB.example.com")
            assert (response.rCode, response.auth) == (dns.OK, 1)
            assert sorted(r.payload.dottedQuad() for r in response.answers) == ["127.0.0.2", "127.0.0.3"]
            assert {r.ttl for r in response.answers} == {7}
        firsts = {dnsQuery(dnsA, b"lb.example.com").answers[0].payload.dottedQuad() for _ in range(4)}
        assert firsts == {"127.0.0.2", "127.0.0.3"}
        assert dnsQuery(dnsA, b"other.example.com").rCode == dns.EREFUSED

        b.txlb.process.kill()
        waitFor(
            lambda: [r.payload.dottedQuad() for r in dnsQuery(dnsA, b"lb.example.com").answers] == ["127.0.0.2"],
            timeout=FAILOVER_AFTER + 2, what="the dead node to leave DNS",
        )
        assert a.serves()
    finally:
        a.txlb.stop()
        b.txlb.stop()


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (dnsutils)")
def test_dig_against_a_node(redis, backend):
    import subprocess

    dnsPort = freePort()
    a = Node("lb-a", "127.0.0.2", "active-passive", redis, backend, freePort(), dnsPort=dnsPort)
    a.start(listening=3)
    try:
        waitFor(lambda: a.api("/api/cluster")["active"], what="a to be active")
        out = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(dnsPort), "+noall", "+answer", "+tries=1", "+time=3", "lb.example.com"],
            capture_output=True, text=True, timeout=10,
        ).stdout
        assert [line.split() for line in out.splitlines() if line.strip()] == [
            ["lb.example.com.", "7", "IN", "A", "127.0.0.2"],
        ]
    finally:
        a.txlb.stop()
