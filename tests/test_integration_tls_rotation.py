"""
Certificates renewed in place and TCP services over backend TLS, end to
end: twistd txlb in a subprocess, TLS backends on loopback with trustme
certificates.  A SIGHUP with the same config reads a pool's CA file again
when it was replaced under the same path (one process, and two workers);
a TCP service's failed handshake is a failed connect, named, and the
next server is tried.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import urllib.error
import urllib.request

import pytest
import trustme

from tests.support import Backend, Txlb, freePort, httpRequests, recvLine, waitFor


def serverContext(ca: trustme.CA) -> ssl.SSLContext:
    """A server's TLS: a certificate for localhost from C{ca}."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


def tlsBackend(name: str, context: ssl.SSLContext, serve) -> Backend:
    """A server over TLS with C{backend.context}, replaceable, counting its handshakes."""

    def handle(sock, backend):
        try:
            sock = backend.context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with backend.lock:
            backend.handshakes += 1
        try:
            serve(sock, backend)
        except (ssl.SSLError, OSError):
            return

    backend = Backend(name, handle)
    backend.context = context
    backend.handshakes = 0
    return backend


def answerName(sock, backend) -> None:
    for _ in httpRequests(sock):
        body = json.dumps({"server": backend.name}).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def get(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def config(port: int, backends, extra: str = "") -> str:
    servers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in backends)
    return (
        f"{extra}[pools.p]\nservers = [{servers}]\nretries = 0\n"
        'tls = { ca = "ca.pem", server_name = "localhost" }\n'
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "p"\n'
    )


def test_sighup_reads_a_ca_replaced_under_the_same_path(tmp_path):
    old, new = trustme.CA(), trustme.CA()
    old.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    backend = tlsBackend("secure", serverContext(old), answerName)
    port = freePort()
    text = config(port, [backend])
    lb = Txlb(text, tmp_path).start()
    try:
        assert [get(port) for _ in range(3)] == [200] * 3
        assert backend.handshakes == 1  # one keep-alive connection, now idle
        # The server's certificate renewed by a new CA, written over the old CA file.
        backend.context = serverContext(new)
        new.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        lb.process.send_signal(signal.SIGHUP)
        [event] = waitFor(lambda: lb.events("config_reloaded"), what="config_reloaded")
        assert event["changes"] == ["pool p: tls files changed"]
        # Not the idle connection: a new one, verified with the new CA.
        assert get(port) == 200
        assert backend.handshakes == 2
        assert lb.events("connect_failed") == []
    finally:
        lb.stop()
        backend.stop()


def answerOnce(sock, backend) -> None:
    """One answer, then the connection closes: each request is a new connection, a new handshake."""
    for _ in httpRequests(sock):
        body = json.dumps({"server": backend.name}).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return


def test_workers_read_a_renewed_ca_even_when_only_servers_changed_too(tmp_path):
    old, new = trustme.CA(), trustme.CA()
    old.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    first = tlsBackend("first", serverContext(old), answerOnce)
    second = tlsBackend("second", serverContext(new), answerOnce)
    port = freePort()
    workers = '[txlb]\nworkers = 2\nshutdown_timeout = "5s"\n'
    lb = Txlb(config(port, [first], workers), tmp_path).start()
    try:
        waitFor(lambda: len({e["worker"] for e in lb.events("worker_started")}) == 2, what="two workers")
        assert [get(port) for _ in range(4)] == [200] * 4
        # In one reload, a server added (which workers could take as state)
        # and the CA renewed in place, with the first server's certificate.
        first.context = serverContext(new)
        new.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        lb.configPath.write_text(config(port, [first, second], workers))
        lb.process.send_signal(signal.SIGHUP)
        [event] = waitFor(lambda: lb.events("config_reloaded"), what="config_reloaded")
        assert event["changes"] == ["pool p: server second added", "pool p: tls files changed"]
        waitFor(lambda: len(lb.events("worker_stopped")) == 2, what="the old workers stopped")
        assert [get(port) for _ in range(6)] == [200] * 6
        assert lb.events("connect_failed") == []
    finally:
        lb.stop()
        first.stop()
        second.stop()


def echoLines(sock, backend) -> None:
    sock.sendall(backend.name.encode() + b"\n")
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def test_a_tcp_service_tries_the_next_server_when_tls_fails(tmp_path):
    trusted, other = trustme.CA(), trustme.CA()
    trusted.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    bad = tlsBackend("bad", serverContext(other), echoLines)
    good = tlsBackend("good", serverContext(trusted), echoLines)
    port = freePort()
    text = (
        f'[pools.p]\nalgorithm = "round_robin"\nretries = 1\n'
        f'servers = [{{ name = "bad", address = "{bad.address}" }}, {{ name = "good", address = "{good.address}" }}]\n'
        'tls = { ca = "ca.pem", server_name = "localhost" }\n'
        f'[[services]]\nname = "t"\nprotocol = "tcp"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "p"\n'
    )
    lb = Txlb(text, tmp_path).start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert recvLine(s) == b"good\n"
            s.sendall(b"over tls\n")
            assert recvLine(s) == b"over tls\n"
        [failed] = waitFor(lambda: lb.events("connect_failed"), what="connect_failed")
        assert (failed["server"], failed["why"]) == ("bad", "TLS with bad failed: certificate verify failed")
        [event] = waitFor(lambda: lb.events("connection"), what="the connection event")
        assert (event["selectedServer"], event["retries"], event["splice"]) == ("good", 1, False)
        assert "error" not in event, event["error"]
    finally:
        lb.stop()
        bad.stop()
        good.stop()


@pytest.fixture(autouse=True)
def _noProxy(monkeypatch):
    """urllib must not send loopback requests through a proxy from the environment."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
