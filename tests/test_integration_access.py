"""
Allow/deny and rate limits end to end: C{twistd txlb} in a subprocess, a
real HTTP (or echo) backend in a thread, and clients whose sockets are
bound to distinct loopback addresses (127.0.0.2, 127.0.0.3) so that txlb
sees them as distinct clients.  Shared limits run against a real
C{redis-server}: two balancers share one limit, and a Redis stopped with
C{SIGSTOP} mid-traffic costs no request.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading

import pytest

from tests.support import (
    Backend,
    RedisServer,
    Txlb,
    UDPBackend,
    freePort,
    freeUDPPort,
    httpRequests,
    recvLine,
    waitFor,
)

needsRedis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


class App:
    """An HTTP backend that answers every request 200 and counts them."""

    def __init__(self) -> None:
        self.requests = 0
        self.lock = threading.Lock()

    def __call__(self, sock: socket.socket, backend: Backend) -> None:
        for _ in httpRequests(sock):
            with self.lock:
                self.requests += 1
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture
def app():
    app = App()
    backend = Backend("app-1", app)
    app.backend = backend
    yield app
    backend.stop()


def get(port: int, path: str = "/", source: str = "127.0.0.2", headers: str = "") -> tuple[int, dict, bytes]:
    """One request from C{source}, on a connection of its own: status, header fields, body."""
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n{headers}\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields, body


def pool(backend: Backend) -> str:
    return f'[pools.app]\nservers = [{{ name = "{backend.name}", address = "{backend.address}" }}]\n'


def httpService(port: int, extra: str, routes: str = "") -> str:
    return (f'\n[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
            f'pool = "app"\n{extra}\n{routes}')


def admin(port: int) -> str:
    return f'\n[admin]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'


def metric(port: int, line: str) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return line in data.decode()


def test_http_allow_and_deny_by_network(tmp_path, app):
    web, adminPort = freePort(), freePort()
    config = pool(app.backend) + httpService(
        web, 'allow = ["127.0.0.1", "127.0.0.2/32", "::1"]\ndeny = ["127.0.0.3"]',
        '[[services.routes]]\npath_prefix = "/open/"\npool = "app"\nallow = ["127.0.0.0/8"]\n',
    ) + admin(adminPort)
    with Txlb(config, tmp_path) as lb:
        status, _, body = get(web, "/", "127.0.0.2")
        assert (status, body) == (200, b"ok")
        status, fields, body = get(web, "/", "127.0.0.3")
        assert status == 403 and fields["content-type"] == "application/json"
        answer = json.loads(body)
        assert answer["error"] == "client not allowed"
        assert lb.requestEvent(answer["requestId"])["refused"] == "deny"
        status, _, body = get(web, "/", "127.0.0.4")  # in neither list: not allowed
        assert status == 403
        # The route's own rule wins: 127.0.0.0/8, and no deny.
        assert get(web, "/open/x", "127.0.0.3")[0] == 200
        assert get(web, "/open/x", "127.0.0.4")[0] == 200
        assert app.requests == 3  # the refused requests never reached the backend
        event = lb.requestEvent(answer["requestId"])
        assert event["client"] == "127.0.0.3" and event["selectedServer"] is None and event["status"] == 403
        assert metric(adminPort, 'txlb_refused_total{reason="deny",service="web"} 2.0')
        # What the status page shows, as --check prints it.
        with socket.create_connection(("127.0.0.1", adminPort), timeout=10) as s:
            s.sendall(b"GET /api/stats HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        [web] = [e for e in json.loads(data.partition(b"\r\n\r\n")[2])["services"] if e["name"] == "web"]
        assert web["policy"] == ["access: deny 127.0.0.3/32; allow only 127.0.0.1/32, 127.0.0.2/32, ::1/128",
                                 "routes[0] access: allow only 127.0.0.0/8"]


def test_tcp_allow_deny_and_per_client_limits(tmp_path):
    echo = Backend("echo-1")
    port = freePort()
    config = (pool(echo).replace("[pools.app]", "[pools.echo]")
              + f'\n[[services]]\nname = "db"\nprotocol = "tcp"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
                'pool = "echo"\ndeny = ["127.0.0.3"]\nlimits = { max_connections_per_client = 2 }\n')

    def connect(source: str) -> socket.socket:
        s = socket.socket()
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        return s

    def refused(source: str) -> bool:
        """Whether a connection from C{source} is closed at once (the reset may even beat connect())."""
        try:
            s = connect(source)
        except ConnectionResetError:
            return True
        with s:
            try:
                return s.recv(100) == b""
            except ConnectionResetError:
                return True

    try:
        with Txlb(config, tmp_path) as lb:
            a = connect("127.0.0.2")
            assert recvLine(a) == b"echo-1\n"
            assert refused("127.0.0.3")
            b = connect("127.0.0.2")
            assert recvLine(b) == b"echo-1\n"
            assert refused("127.0.0.2")
            assert echo.connections == 2  # no refused client reached the server
            a.close()
            waitFor(lambda: len([e for e in lb.events("connection") if not e.get("refused")]) == 1,
                    what="the first connection's event")
            again = connect("127.0.0.2")
            assert recvLine(again) == b"echo-1\n"
            again.sendall(b"ping\n")
            assert recvLine(again) == b"ping\n"
            waitFor(lambda: len([e for e in lb.events("connection") if e.get("refused")]) == 2,
                    what="both refused connections' events")
            refusedEvents = [e for e in lb.events("connection") if e.get("refused")]
            assert sorted((e["client"], e["refused"]) for e in refusedEvents) == [
                ("127.0.0.2", "max_connections_per_client"), ("127.0.0.3", "deny")]
            assert all(e["selectedServer"] is None for e in refusedEvents)
            for s in (b, again):
                s.close()
    finally:
        echo.stop()


def test_a_burst_above_the_limit_gets_exactly_the_excess_429s(tmp_path, app):
    web = freePort()
    config = pool(app.backend) + httpService(web, 'rate_limit = { rate = "1/m", burst = 5 }')
    with Txlb(config, tmp_path) as lb:
        answers = [get(web, "/", "127.0.0.2") for _ in range(8)]
        assert [status for status, _, _ in answers] == [200] * 5 + [429] * 3
        assert {fields["retry-after"] for status, fields, _ in answers if status == 429} == {"60"}
        # Another client has its own bucket.
        assert get(web, "/", "127.0.0.3")[0] == 200
        assert app.requests == 6
        rid = json.loads(answers[-1][2])["requestId"]
        assert lb.requestEvent(rid)["refused"] == "rate_limit"


def test_a_header_keyed_limit_follows_the_key_across_clients(tmp_path, app):
    web = freePort()
    config = pool(app.backend) + httpService(web, 'rate_limit = { rate = "1/m", burst = 2, key = "header:X-Api-Key" }')
    with Txlb(config, tmp_path):
        key = "X-Api-Key: k1\r\n"
        statuses = [get(web, "/", source, key)[0] for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4")]
        assert statuses == [200, 200, 429]
        assert get(web, "/", "127.0.0.2", "X-Api-Key: k2\r\n")[0] == 200


def test_a_reload_changes_a_limit(tmp_path, app):
    web = freePort()
    config = pool(app.backend) + httpService(web, 'rate_limit = { rate = "1/m", burst = 2 }')
    with Txlb(config, tmp_path) as lb:
        assert [get(web)[0] for _ in range(3)] == [200, 200, 429]
        lb.configPath.write_text(config.replace("burst = 2", "burst = 4"))
        lb.process.send_signal(signal.SIGHUP)
        [event] = waitFor(lambda: lb.events("config_reloaded"), what="config_reloaded")
        assert "service web: rate_limit changed" in event["changes"]
        # A changed limit starts with full buckets.
        assert [get(web)[0] for _ in range(5)] == [200] * 4 + [429]
        # A reload that leaves the limit alone keeps its buckets.
        lb.configPath.write_text(config.replace("burst = 2", "burst = 4").replace(
            'pool = "app"\nrate', 'pool = "app"\nforwarded = true\nrate'))
        lb.process.send_signal(signal.SIGHUP)
        waitFor(lambda: len(lb.events("config_reloaded")) == 2, what="the second config_reloaded")
        assert get(web)[0] == 429


def sharedConfig(app, port: int, redis: RedisServer, burst: int, rate: str = "1/m") -> str:
    return (pool(app.backend)
            + f'\n[sessions]\nredis = "{redis.address}"\n'
            + httpService(port, f'rate_limit = {{ rate = "{rate}", burst = {burst}, store = "redis", '
                                'timeout = "50ms" }'))


@needsRedis
def test_two_balancers_on_one_redis_share_a_limit(tmp_path, app):
    redis = RedisServer()
    one, two = freePort(), freePort()
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with Txlb(sharedConfig(app, one, redis, 6), tmp_path / "a") as a, \
                Txlb(sharedConfig(app, two, redis, 6), tmp_path / "b") as b:
            for lb in (a, b):
                waitFor(lambda: lb.events("rate_limit_connected"), what="the balancer's Redis connection")
            statuses = [get(port)[0] for _ in range(5) for port in (one, two)]
            assert statuses.count(200) == 6 and statuses.count(429) == 4
            assert statuses[:6] == [200] * 6
            # The shared key expires on its own: when its bucket is full again.
            pttl = int(redis.command("PTTL", "txlb:rl:web:127.0.0.2"))
            assert 5 * 60_000 < pttl <= 6 * 60_000
            assert not a.events("rate_limit_degraded") and not b.events("rate_limit_degraded")
    finally:
        redis.kill()


@needsRedis
def test_a_stopped_redis_costs_no_request(tmp_path, app):
    redis = RedisServer()
    web = freePort()
    try:
        # Each request moves its key's full-again time a minute on: Redis
        # shows how many requests it decided.
        with Txlb(sharedConfig(app, web, redis, 1000, "1/m"), tmp_path) as lb:
            waitFor(lambda: lb.events("rate_limit_connected"), what="the Redis connection")
            statuses = [get(web)[0] for _ in range(20)]
            assert 19 * 60_000 < int(redis.command("PTTL", "txlb:rl:web:127.0.0.2")) <= 20 * 60_000
            redis.process.send_signal(signal.SIGSTOP)
            try:
                statuses += [get(web)[0] for _ in range(40)]
                waitFor(lambda: lb.events("rate_limit_degraded"), what="rate_limit_degraded")
            finally:
                redis.process.send_signal(signal.SIGCONT)
            waitFor(lambda: lb.events("rate_limit_restored"), timeout=30, what="rate_limit_restored")
            statuses += [get(web)[0] for _ in range(20)]
            assert statuses == [200] * 80
            assert app.requests == 80
            # Shared again: the last 20 were decided by Redis, the 40 in between
            # locally (the one sent as Redis stopped ran when it woke: 41 at most).
            assert 39 * 60_000 < int(redis.command("PTTL", "txlb:rl:web:127.0.0.2")) <= 41 * 60_000
    finally:
        redis.kill()


def test_udp_deny_drops_datagrams_before_any_flow(tmp_path):
    backend = UDPBackend("dns-1")
    port, adminPort = freeUDPPort(), freePort()
    config = (f'[pools.dns]\nservers = [{{ name = "dns-1", address = "{backend.address}" }}]\n'
              f'\n[[services]]\nname = "dns"\nprotocol = "udp"\nlisten = "udp:{port}:interface=127.0.0.1"\n'
              'pool = "dns"\ndeny = ["127.0.0.3"]\n' + admin(adminPort))
    denied = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    allowed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        denied.bind(("127.0.0.3", 0))
        allowed.bind(("127.0.0.2", 0))
        allowed.settimeout(10)
        with Txlb(config, tmp_path):
            denied.sendto(b"q1", ("127.0.0.1", port))
            # Datagrams on one socket are taken in order: once the allowed
            # client's answer is back, the denied one was dealt with.
            allowed.sendto(b"q2", ("127.0.0.1", port))
            assert allowed.recvfrom(100)[0] == b"dns-1:q2"
            assert backend.datagrams == 1
            assert metric(adminPort, 'txlb_refused_total{reason="deny",service="dns"} 1.0')
    finally:
        denied.close()
        allowed.close()
        backend.stop()
