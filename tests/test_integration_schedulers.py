"""
Every algorithm end to end: C{twistd txlb} in a subprocess with a config
naming it, real backends on loopback, real client sockets.  Clients that
must look different bind to their own 127.0.x.y source address first.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import (
    ROOT,
    Backend,
    Txlb,
    connect,
    freePort,
    nameThenEcho,
    recvLine,
    tcpServiceToml,
    waitFor,
)

PLUGIN_EXAMPLE = ROOT / "tests" / "plugin_example"


@pytest.fixture
def backends():
    started = [Backend(f"server-{i}") for i in (1, 2, 3)]
    yield started
    for b in started:
        b.stop()


def config(backends, algorithm: str, weights=None, extra: str = "", port: int = 0) -> str:
    weights = weights or [1] * len(backends)
    servers = ",\n".join(
        f'  {{ name = "{b.name}", address = "{b.address}", weight = {w} }}'
        for b, w in zip(backends, weights)
    )
    return (
        "[log]\naccess = true\n"
        f'[pools.p]\nalgorithm = "{algorithm}"\nservers = [\n{servers}\n]\n{extra}\n'
        + tcpServiceToml("svc", port, "p")
    )


def directory(path: Path) -> Path:
    path.mkdir()
    return path


def whoAnswers(port: int, source: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        return recvLine(s).decode().strip()


def clientAddress(i: int) -> str:
    return f"127.0.{i // 200 + 1}.{i % 200 + 1}"


def test_weighted_round_robin_every_window_of_four(backends):
    port = freePort()
    with Txlb(config(backends, "weighted_round_robin", [1, 2, 1], port=port)) as lb:
        landed = [whoAnswers(port) for _ in range(24)]
        events = waitFor(lambda: len(lb.events("connection")) == 24 and lb.events("connection"))
    expected = {"server-1": 1, "server-2": 2, "server-3": 1}
    for start in range(0, 24, 4):
        assert Counter(landed[start : start + 4]) == expected, landed
    assert {e["selectedServer"] for e in events} == set(expected)


def test_least_connections_six_held_connections(backends):
    port = freePort()
    with Txlb(config(backends, "least_connections", port=port)):
        held = []
        try:
            for _ in range(6):
                s = connect(port)
                held.append(s)
                recvLine(s)  # connected through to a backend
            assert Counter(b.connections for b in backends) == {2: 3}
            # Short connections meanwhile rotate over the equal servers.
            assert Counter(whoAnswers(port) for _ in range(6)) == {
                "server-1": 2,
                "server-2": 2,
                "server-3": 2,
            }
        finally:
            for s in held:
                s.close()


def test_ip_hash_thirty_clients_keep_their_server(backends):
    port = freePort()
    clients = [clientAddress(i) for i in range(30)]
    with Txlb(config(backends, "ip_hash", port=port)) as lb:
        first = {c: whoAnswers(port, c) for c in clients}
        for _ in range(2):
            assert {c: whoAnswers(port, c) for c in clients} == first
        events = waitFor(lambda: len(lb.events("connection")) == 90 and lb.events("connection"))
    assert set(first.values()) == {"server-1", "server-2", "server-3"}
    assert {e["client"] for e in events} == set(clients)


def test_consistent_hash_a_fourth_server_moves_a_quarter_to_it(backends, tmp_path):
    """
    300 clients, then txlb restarted with a fourth server: between 10% and
    40% of the clients move, every one of them to the new server, and the
    others land exactly where the first process sent them.  (The fourth
    server is added through the config and a restart here; the same ring
    code serves a server added at run time.)
    """
    clients = [clientAddress(i) for i in range(300)]
    fourth = Backend("server-4")
    try:
        port = freePort()
        extra = 'hash_key = "client_ip"'
        with Txlb(config(backends, "consistent_hash", extra=extra, port=port), directory(tmp_path / "a")):
            before = {c: whoAnswers(port, c) for c in clients}
        port = freePort()
        everyone = [*backends, fourth]
        with Txlb(config(everyone, "consistent_hash", extra=extra, port=port), directory(tmp_path / "b")):
            after = {c: whoAnswers(port, c) for c in clients}
    finally:
        fourth.stop()
    moved = [c for c in clients if before[c] != after[c]]
    assert {after[c] for c in moved} == {"server-4"}
    assert 0.10 <= len(moved) / len(clients) <= 0.40
    assert set(before.values()) == {"server-1", "server-2", "server-3"}


def test_consistent_hash_server_added_at_run_time(backends, tmp_path):
    """
    The same through the admin API, with no restart: a fourth server added
    to a running txlb takes between 10% and 40% of 300 clients, and nobody
    else moves.
    """
    import json
    import urllib.request

    clients = [clientAddress(i) for i in range(300)]
    fourth = Backend("server-4")
    port, admin = freePort(), freePort()
    extra = 'hash_key = "client_ip"'
    text = f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n' + config(backends, "consistent_hash", extra=extra, port=port)
    lb = Txlb(text, tmp_path).start(listening=2)
    try:
        before = {c: whoAnswers(port, c) for c in clients}
        body = json.dumps({"name": "server-4", "address": fourth.address}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{admin}/api/pools/p/servers", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
        after = {c: whoAnswers(port, c) for c in clients}
    finally:
        lb.stop()
        fourth.stop()
    moved = [c for c in clients if before[c] != after[c]]
    assert {after[c] for c in moved} == {"server-4"}
    assert 0.10 <= len(moved) / len(clients) <= 0.40


def test_least_response_time_prefers_the_fast_server():
    """
    One backend answers at once, two wait 150 ms before their first byte;
    four clients at a time, 48 connections: at least two thirds go to the
    fast one.
    """

    def slow(sock, backend):
        time.sleep(0.15)  # the backend's own delay before its first byte
        nameThenEcho(sock, backend)

    servers = [Backend("slow-1", slow), Backend("fast"), Backend("slow-2", slow)]
    port = freePort()
    try:
        with Txlb(config(servers, "least_response_time", port=port)) as lb:
            with ThreadPoolExecutor(4) as pool:
                landed = Counter(pool.map(lambda _: whoAnswers(port), range(48)))
            waitFor(lambda: len(lb.events("connection")) == 48 and lb.events("connection"))
    finally:
        for s in servers:
            s.stop()
    assert landed["fast"] >= 32, landed
    assert sum(landed.values()) == 48


@pytest.mark.parametrize("algorithm", ["least_bandwidth", "random", "power_of_two", "round_robin"])
def test_other_algorithms_serve_every_server(backends, algorithm):
    port = freePort()
    with Txlb(config(backends, algorithm, port=port)):
        landed = Counter(whoAnswers(port) for _ in range(60))
    assert sum(landed.values()) == 60
    assert set(landed) == {"server-1", "server-2", "server-3"}


def test_default_algorithm_is_power_of_two(backends):
    port = freePort()
    text = config(backends, "power_of_two", port=port).replace('algorithm = "power_of_two"\n', "")
    assert "algorithm" not in text
    with Txlb(text):
        landed = Counter(whoAnswers(port) for _ in range(30))
    assert set(landed) == {"server-1", "server-2", "server-3"}


def test_plugin_from_a_separate_directory(backends, tmp_path, monkeypatch):
    """
    The example plugin of docs/plugins.md, copied to a directory of its own
    and put on PYTHONPATH, is found by the name in the config; its options
    reach it, and retries honour it (the preferred server stopped, the next
    one in its order takes over).
    """
    site = tmp_path / "site"
    shutil.copytree(PLUGIN_EXAMPLE, site)
    assert not (site / "twisted" / "__init__.py").exists()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()
    monkeypatch.setenv("PYTHONPATH", str(site))
    port = freePort()
    extra = 'options = { order = ["server-2", "server-3"] }'
    with Txlb(config(backends, "failover", extra=extra, port=port), directory(tmp_path / "lb")) as lb:
        assert [whoAnswers(port) for _ in range(5)] == ["server-2"] * 5
        backends[1].stop()
        assert [whoAnswers(port) for _ in range(3)] == ["server-3"] * 3
        events = waitFor(lambda: len(lb.events("connection")) == 8 and lb.events("connection"))
    assert [e["selectedServer"] for e in events] == ["server-2"] * 5 + ["server-3"] * 3


def test_plugin_options_are_checked_before_starting(backends, tmp_path, monkeypatch):
    site = tmp_path / "site"
    shutil.copytree(PLUGIN_EXAMPLE, site)
    monkeypatch.setenv("PYTHONPATH", str(site))
    lb = Txlb(config(backends, "failover", extra="options = { order = 3 }", port=freePort()), directory(tmp_path / "lb"))
    with pytest.raises(AssertionError, match="exited"):
        lb.start()
    lb.stop()
    assert "pools.p.options" in lb.logPath.read_text()
    assert "order must be a list of server names" in lb.logPath.read_text()
