"""
The TCP balancer end to end: C{twistd txlb} in a subprocess, real backends
on 127.0.0.1, real client sockets.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import (
    Backend,
    Txlb,
    connect,
    freePort,
    poolToml,
    recvAll,
    recvLine,
    tcpServiceToml,
    waitFor,
)

MiB = 1024 * 1024


@pytest.fixture
def backends():
    started = [Backend(f"server-{i}") for i in (1, 2, 3)]
    yield started
    for b in started:
        b.stop()


def balancer(backends, port, pool_extra="", log_access=True):
    config = (
        f"[log]\naccess = {'true' if log_access else 'false'}\n"
        + poolToml("p", backends, extra=pool_extra)
        + tcpServiceToml("svc", port, "p")
    )
    return Txlb(config)


def whoAnswers(port: int) -> str:
    with connect(port) as s:
        return recvLine(s).decode().strip()


def test_round_robin_spreads_evenly_and_logs_each_connection(backends):
    port = freePort()
    with balancer(backends, port) as lb:
        landed = Counter(whoAnswers(port) for _ in range(30))
        assert landed == {"server-1": 10, "server-2": 10, "server-3": 10}
        events = waitFor(lambda: len(lb.events("connection")) == 30 and lb.events("connection"))
    assert Counter(e["selectedServer"] for e in events) == landed
    event = events[0]
    assert event["service"] == "svc" and event["pool"] == "p"
    assert event["client"] == "127.0.0.1"
    assert event["bytesOut"] == len("server-1\n")
    assert all(e["splice"] for e in events)  # plaintext TCP: the kernel moves the bytes
    assert "durationMs" in event


def test_servers_named_by_host_name_are_spliced_too(backends):
    """
    A literal IP is connected directly; a host name goes through Twisted's
    endpoint (and resolver), and the two sockets are then spliced the same.
    """
    for b in backends:
        b.address = f"localhost:{b.port}"
    port = freePort()
    with balancer(backends, port) as lb:
        landed = Counter(whoAnswers(port) for _ in range(9))
        assert landed == {"server-1": 3, "server-2": 3, "server-3": 3}
        with connect(port) as s:
            assert recvLine(s).startswith(b"server-")
            s.sendall(b"echo this\n")
            assert recvLine(s) == b"echo this\n"
        events = waitFor(lambda: len(lb.events("connection")) == 10 and lb.events("connection"))
    assert all(e["splice"] for e in events)
    assert sum(e["bytesIn"] for e in events) == len(b"echo this\n")


def test_a_dead_server_costs_no_client_a_connection(backends):
    port = freePort()
    dead = backends[1]
    dead.stop()  # nothing listens on its port any more
    with balancer(backends, port) as lb:
        landed = Counter(whoAnswers(port) for _ in range(30))
        assert sum(landed.values()) == 30
        assert set(landed) == {"server-1", "server-3"}
        failures = lb.events("connect_failed")
        assert failures and all(e["server"] == "server-2" for e in failures)


def test_100_mib_passes_intact(backends):
    port = freePort()
    payload = bytes(range(256)) * (4 * 1024)  # 1 MiB with a pattern
    with balancer(backends, port):
        with connect(port, timeout=60) as s:
            assert recvLine(s).startswith(b"server-")
            received = bytearray()

            def send():
                for _ in range(100):
                    s.sendall(payload)
                s.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                received += chunk
            sender.join()
        assert len(received) == 100 * MiB
        assert received == payload * 100


def test_half_closed_client_still_gets_its_answer():
    """The client sends, shuts down its writing side, and reads the reply."""

    def countThenAnswer(sock, backend):
        total = len(recvAll(sock))
        sock.sendall(f"{backend.name} got {total} bytes\n".encode())

    backend = Backend("counter", countThenAnswer)
    port = freePort()
    try:
        with balancer([backend], port):
            with connect(port) as s:
                s.sendall(b"x" * 100_000)
                s.shutdown(socket.SHUT_WR)
                assert recvAll(s) == b"counter got 100000 bytes\n"
    finally:
        backend.stop()


def test_server_half_close_lets_client_keep_sending():
    """The server speaks first and shuts down its side; the client's bytes still arrive."""
    got = []

    def greetThenListen(sock, backend):
        sock.sendall(b"hello\n")
        sock.shutdown(socket.SHUT_WR)
        got.append(recvAll(sock))

    backend = Backend("greeter", greetThenListen)
    port = freePort()
    try:
        with balancer([backend], port):
            with connect(port) as s:
                assert recvAll(s) == b"hello\n"  # EOF from the server came through
                s.sendall(b"after your EOF")
                s.shutdown(socket.SHUT_WR)
                waitFor(lambda: got, what="the backend to read to EOF")
        assert got == [b"after your EOF"]
    finally:
        backend.stop()


def test_many_concurrent_clients(backends):
    port = freePort()

    def client(n: int) -> int:
        ok = 0
        for i in range(20):
            with connect(port) as s:
                assert recvLine(s).startswith(b"server-")
                message = f"client {n} connection {i}\n".encode()
                s.sendall(message)
                assert recvLine(s) == message
                ok += 1
        return ok

    with balancer(backends, port, log_access=False):
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(client, range(20)))
    assert results == [20] * 20
    assert sum(b.connections for b in backends) == 400


def test_slow_reader_does_not_grow_memory():
    """
    A backend sends 300 MiB to a client that reads slowly.  Backpressure
    must stop the backend rather than let txlb buffer: whenever the client
    stops reading, the backend soon stops making progress and txlb's memory
    stays put.
    """
    sent = [0]
    total = 300 * MiB
    block = b"z" * MiB

    def source(sock, backend):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        while sent[0] < total:
            sock.sendall(block)
            sent[0] += len(block)

    backend = Backend("source", source)
    port = freePort()
    try:
        with balancer([backend], port) as lb:
            baseline = lb.rss()
            peak = baseline
            with connect(port, timeout=60) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                received = 0
                while received < total:
                    # Stop reading until backpressure has stalled the backend:
                    # no progress over ten polls in a row.
                    progress = {"last": -1, "still": 0}

                    def backendStalled():
                        if sent[0] >= total:
                            return True
                        progress["still"] = progress["still"] + 1 if sent[0] == progress["last"] else 0
                        progress["last"] = sent[0]
                        return progress["still"] >= 10

                    waitFor(backendStalled, timeout=30, what="the backend to stall")
                    peak = max(peak, lb.rss())
                    assert sent[0] - received < 64 * MiB, "txlb buffered far more than its peer buffers"
                    # Then read a slice of 30 MiB.
                    target = min(total, received + 30 * MiB)
                    while received < target:
                        chunk = s.recv(1 << 20)
                        assert chunk
                        received += len(chunk)
                assert received == total
            assert peak - baseline < 64 * MiB
    finally:
        backend.stop()


def refused(port: int) -> bool:
    try:
        connect(port).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_open_connections_finish(backends):
    port = freePort()
    lb = balancer(backends, port).start()
    try:
        with connect(port) as s:
            assert recvLine(s).startswith(b"server-")
            lb.process.terminate()
            waitFor(lambda: lb.events("shutdown"), what="the shutdown event")
            assert lb.events("shutdown")[0]["inFlight"] == 1
            waitFor(lambda: refused(port), what="the listening port to close")
            s.sendall(b"still here\n")
            assert recvLine(s) == b"still here\n"
            assert lb.process.poll() is None
        assert lb.process.wait(30) == 0
    finally:
        lb.stop()


def test_shutdown_timeout_closes_what_is_left(backends):
    port = freePort()
    config = "[txlb]\nshutdown_timeout = \"500ms\"\n" + poolToml("p", backends) + tcpServiceToml("svc", port, "p")
    lb = Txlb(config).start()
    try:
        with connect(port) as s:
            assert recvLine(s).startswith(b"server-")
            lb.process.terminate()
            assert lb.process.wait(30) == 0
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass  # aborted: closed all the same
        [event] = [e for e in lb.events("connection") if e.get("error")]
        assert event["error"] == "shutdown timeout"
    finally:
        lb.stop()


def test_passive_ejection_stops_trying_a_dead_server(backends):
    port = freePort()
    backends[2].stop()
    lb = balancer(backends, port, pool_extra='passive = { consecutive_failures = 2, eject_for = "60s" }').start()
    try:
        for _ in range(6):
            whoAnswers(port)
        [ejected] = waitFor(lambda: lb.events("server_ejected"))
        assert (ejected["server"], ejected["ejectFor"]) == ("server-3", 60.0)
        assert ejected["reason"].startswith("2 consecutive failures: connect failed")
        failures = len(lb.events("connect_failed"))
        landed = Counter(whoAnswers(port) for _ in range(12))
        assert landed == {"server-1": 6, "server-2": 6}
        assert len(lb.events("connect_failed")) == failures  # never tried again
    finally:
        lb.stop()
