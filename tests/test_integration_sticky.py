"""
Sticky sessions as an operator meets them: twistd txlb in front of real
HTTP and TCP backends on loopback; for the shared store, a real
C{redis-server} started on a free port by the test, two balancers using it,
and Redis killed (and started again) while they run.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import time
from collections import Counter

import pytest

from tests.support import Backend, RedisServer, Txlb, freePort, recvLine, waitFor
from tests.test_health_service import flippable


def request(port: int, headers: dict = {}, source: str = "127.0.0.1") -> tuple[int, str, dict]:
    """One GET on a new connection: (status, server, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/", headers=headers)
        response = conn.getresponse()
        body = response.read()
        server = json.loads(body)["server"] if response.status == 200 else None
        return response.status, server, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def pool(backends, health: str = 'kind = "none"') -> str:
    servers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in backends)
    return f'[pools.api]\nalgorithm = "round_robin"\nservers = [{servers}]\n[pools.api.health]\n{health}\n'


def httpService(port: int, sticky: str, name: str = "web", poolName: str = "api") -> str:
    return (
        f'[[services]]\nname = "{name}"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'pool = "{poolName}"\nsticky = {sticky}\n'
    )


@pytest.fixture
def backends():
    states = [{"status": 200} for _ in range(3)]
    servers = [flippable(f"server-{i + 1}", states[i]) for i in range(3)]
    yield servers, states
    for b in servers:
        b.stop()


def test_cookie_mode_keeps_a_client_and_moves_it_when_its_server_fails(tmp_path, backends):
    servers, states = backends
    web = freePort()
    health = 'kind = "http"\npath = "/health"\ninterval = "200ms"\ntimeout = "150ms"\nrise = 2\nfall = 2'
    config = pool(servers, health) + httpService(web, '{ mode = "cookie" }')
    with Txlb(config, tmp_path) as lb:
        status, first, headers = request(web)
        assert status == 200
        assert headers["set-cookie"] == f"LB_SERVER={first}; Path=/; HttpOnly"
        cookie = {"Cookie": f"LB_SERVER={first}"}
        for _ in range(15):
            status, server, headers = request(web, cookie)
            assert (status, server) == (200, first) and "set-cookie" not in headers
        cookieless = Counter(request(web)[1] for _ in range(9))
        assert len(cookieless) == 3
        # Forged cookies: normal answers, and a real cookie instead.
        for forged in ("server-99", "x" * 5000, "../../etc/passwd", ""):
            status, server, headers = request(web, {"Cookie": f"LB_SERVER={forged}"})
            assert status == 200 and headers["set-cookie"] == f"LB_SERVER={server}; Path=/; HttpOnly"
        # The client's server fails its checks: the next request moves, with a new cookie, and stays.
        states[int(first[-1]) - 1]["status"] = 503
        waitFor(lambda: [e for e in lb.events("server_state") if e["server"] == first],
                timeout=10, what=f"{first} to leave rotation")
        status, moved, headers = request(web, cookie)
        assert status == 200 and moved != first
        assert headers["set-cookie"] == f"LB_SERVER={moved}; Path=/; HttpOnly"
        for _ in range(10):
            status, server, headers = request(web, {"Cookie": f"LB_SERVER={moved}"})
            assert (status, server) == (200, moved) and "set-cookie" not in headers
        events = waitFor(lambda: [e for e in lb.events("sticky_reassigned") if e["previousServer"] == first],
                         timeout=5, what="the sticky_reassigned event")
        assert (events[0]["selectedServer"], events[0]["reason"], events[0]["client"]) == (moved, "down", "127.0.0.1")


def test_ip_mode_keeps_each_client_address_on_one_server_for_http_and_tcp(tmp_path, backends):
    servers, _ = backends
    echoes = [Backend(f"tcp-{i}") for i in range(3)]
    web, db = freePort(), freePort()
    echoServers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in echoes)
    config = (
        pool(servers)
        + f'[pools.db]\nalgorithm = "round_robin"\nservers = [{echoServers}]\nhealth = {{ kind = "none" }}\n'
        + httpService(web, '{ mode = "ip" }')
        + f'[[services]]\nname = "db"\nprotocol = "tcp"\nlisten = "tcp:{db}:interface=127.0.0.1"\npool = "db"\n'
        + 'sticky = { mode = "ip" }\n'
    )
    clients = [f"127.0.{x}.{y}" for x in (1, 2) for y in range(1, 11)]
    lb = Txlb(config, tmp_path)
    try:
        lb.start(listening=2)
        httpServers, tcpServers = {}, {}
        for _ in range(3):
            for client in clients:
                status, server, _ = request(web, source=client)
                assert status == 200
                assert httpServers.setdefault(client, server) == server, client
                with socket.create_connection(("127.0.0.1", db), timeout=10, source_address=(client, 0)) as s:
                    name = recvLine(s).strip().decode()
                assert tcpServers.setdefault(client, name) == name, client
        assert len(set(httpServers.values())) >= 2
        assert len(set(tcpServers.values())) >= 2
    finally:
        lb.stop()
        for b in echoes:
            b.stop()


# Redis.


def redisCommand(port: int, *args: str):
    """One command over RESP on a new connection (enough for PING, TTL, KEYS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)
        s.sendall(payload)
        return _readReply(s.makefile("rb"))


def _readReply(f):
    line = f.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else f.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return [_readReply(f) for _ in range(int(rest))]
    raise AssertionError(f"Redis answered {line!r}")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_two_balancers_on_one_redis_agree_and_survive_its_loss(tmp_path, backends):
    servers, _ = backends
    port = freePort()
    redis = RedisServer(port)
    sessions = f'[sessions]\nstore = "redis"\nredis = "tcp:host=127.0.0.1:port={port}"\nttl = "10m"\n'
    ports = [freePort(), freePort()]
    lbs = []
    try:
        for i, web in enumerate(ports):
            config = sessions + pool(servers) + httpService(web, '{ mode = "key", key = "header:X-Session" }')
            (tmp_path / f"lb{i}").mkdir()
            lbs.append(Txlb(config, tmp_path / f"lb{i}").start())
        for lb in lbs:
            waitFor(lambda: lb.events("sessions_connected"), timeout=10, what="txlb to reach Redis")
        ids = [f"session-{i:02d}" for i in range(12)]
        placed = {}
        for round in range(4):
            for n, sid in enumerate(ids):
                web = ports[(n + round) % 2]  # each id through both balancers, in turn
                status, server, _ = request(web, {"X-Session": sid})
                assert status == 200
                assert placed.setdefault(sid, server) == server, (sid, round)
        assert len(set(placed.values())) >= 2
        keys = sorted(redisCommand(port, "KEYS", "txlb:sticky:*"))
        assert keys == [f"txlb:sticky:web:{sid}" for sid in ids]
        for key in keys:
            assert 590 <= redisCommand(port, "TTL", key) <= 600
            assert redisCommand(port, "GET", key) == placed[key.rsplit(":", 1)[1]]

        # Redis hangs: requests wait for it only briefly, then not at all.
        redis.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            for n in range(12):
                status, server, _ = request(ports[n % 2], {"X-Session": ids[n]})
                assert (status, server) == (200, placed[ids[n]])
            assert time.monotonic() - started < 3
            for lb in lbs:
                [degraded] = waitFor(lambda: lb.events("sessions_degraded"), timeout=5, what="the outage event")
                assert degraded["reason"] == "no answer within 75ms"
        finally:
            redis.process.send_signal(signal.SIGCONT)
        for lb in lbs:
            waitFor(lambda: lb.events("sessions_restored"), timeout=20, what="txlb to use Redis again")

        # Redis dies: every request still answered, sessions kept from memory.
        redis.kill()
        for n in range(30):
            sid = ids[n % 12]
            status, server, _ = request(ports[n % 2], {"X-Session": sid})
            assert status == 200
            assert server == placed[sid]
        for lb in lbs:  # once per outage
            waitFor(lambda: len(lb.events("sessions_degraded")) == 2, timeout=5, what="the second outage event")

        # Redis is back (empty): both balancers use it again.
        redis = RedisServer(port)
        for lb in lbs:
            waitFor(lambda: len(lb.events("sessions_restored")) == 2, timeout=20, what="txlb to use Redis again")
        status, server, _ = request(ports[0], {"X-Session": "after"})
        assert status == 200
        for n in range(4):
            assert request(ports[n % 2], {"X-Session": "after"})[1] == server
        assert redisCommand(port, "GET", "txlb:sticky:web:after") == server
    finally:
        for lb in lbs:
            lb.stop()
        redis.kill()
