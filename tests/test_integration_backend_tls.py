"""
HTTP/1.1 pools over TLS end to end: twistd txlb in a subprocess, TLS
backends on loopback with trustme certificates.  What failed is named in
C{connect_failed} and in health checks' reasons; a SIGHUP that changes a
pool's C{tls} is obeyed by the very next request, even with a keep-alive
connection to the server open.
"""

from __future__ import annotations

import json
import signal
import ssl
import urllib.error
import urllib.request

import pytest
import trustme

from tests.support import Backend, Txlb, freePort, httpRequests, waitFor


@pytest.fixture
def files(tmp_path):
    """The server's certificate for localhost (from C{ca.pem}), a client one, and C{other-ca.pem}."""
    ca = trustme.CA()
    for name, issued in [("localhost", ca.issue_cert("localhost", "127.0.0.1")), ("client", ca.issue_cert("txlb"))]:
        issued.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        issued.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return tmp_path


def tlsBackend(name: str, files, clientCerts: bool = False) -> Backend:
    """An HTTP/1.1 server over TLS answering its name, counting the TLS connections it took."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files / "ca.pem"))
    context.load_cert_chain(str(files / "localhost.pem"), str(files / "localhost.key"))
    if clientCerts:
        context.verify_mode = ssl.CERT_REQUIRED

    def serve(sock, backend):
        try:
            sock = context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with backend.lock:
            backend.handshakes += 1
        try:
            for _ in httpRequests(sock):
                body = json.dumps({"server": name}).encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (ssl.SSLError, OSError):
            return

    backend = Backend(name, serve)
    backend.handshakes = 0
    return backend


def config(port: int, backend: Backend, tls: str, extra: str = "") -> str:
    return (
        f'[pools.p]\nservers = [{{ name = "{backend.name}", address = "{backend.address}" }}]\nretries = 0\n'
        f"tls = {{ {tls} }}\n{extra}"
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "p"\n'
    )


def get(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert json.loads(response.read())["server"] == "secure"
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("tls, clientCerts, why", [
    ('ca = "other-ca.pem", server_name = "localhost"', False, "TLS with secure failed: certificate verify failed"),
    ('ca = "ca.pem", server_name = "api.internal"', False,
     "TLS with secure failed: the server's certificate is not for api.internal"),
    ('ca = "ca.pem", server_name = "localhost"', True, "TLS with secure failed: tlsv13 alert certificate required"),
])
def test_what_failed_is_named_and_the_client_gets_502(files, tls, clientCerts, why):
    backend = tlsBackend("secure", files, clientCerts)
    port = freePort()
    lb = Txlb(config(port, backend, tls), files).start()
    try:
        assert get(port) == 502
        [failed] = waitFor(lambda: lb.events("connect_failed"), what="connect_failed")
        assert (failed["server"], failed["why"]) == ("secure", why)
    finally:
        lb.stop()
        backend.stop()


@pytest.mark.parametrize("kind, tls, clientCerts, why", [
    ("tcp", 'ca = "other-ca.pem", server_name = "localhost"', False, "TLS failed: certificate verify failed"),
    ("http", 'ca = "ca.pem", server_name = "api.internal"', False,
     "TLS failed: the server's certificate is not for api.internal"),
    ("http", 'ca = "ca.pem", server_name = "localhost"', True, "TLS failed: tlsv13 alert certificate required"),
])
def test_a_health_check_over_the_pools_tls_says_why_it_failed(files, kind, tls, clientCerts, why):
    backend = tlsBackend("secure", files, clientCerts)
    port = freePort()
    health = f'[pools.p.health]\nkind = "{kind}"\ninterval = "1s"\ntimeout = "1s"\nrise = 1\nfall = 1\n'
    lb = Txlb(config(port, backend, tls, health), files).start()
    try:
        def down():
            return [e for e in lb.events("server_state") if e.get("health") == "unhealthy"]

        [event] = waitFor(down, what="the server to go down")
        assert event["reason"] == f"1 consecutive failure: {why}"
    finally:
        lb.stop()
        backend.stop()


def test_sighup_changing_the_pools_ca_applies_to_the_next_request(files):
    backend = tlsBackend("secure", files)
    port = freePort()
    lb = Txlb(config(port, backend, 'ca = "ca.pem", server_name = "localhost"'), files).start()
    try:
        assert [get(port) for _ in range(3)] == [200] * 3
        assert backend.handshakes == 1  # one keep-alive connection, now idle
        lb.configPath.write_text(config(port, backend, 'ca = "other-ca.pem", server_name = "localhost"'))
        lb.process.send_signal(signal.SIGHUP)
        [event] = waitFor(lambda: lb.events("config_reloaded"), what="config_reloaded")
        assert event["changes"] == ["pool p: tls changed"]
        # Not the idle connection verified against the old CA: a new one,
        # which the new CA does not verify.
        assert get(port) == 502
        [failed] = lb.events("connect_failed")
        assert failed["why"] == "TLS with secure failed: certificate verify failed"
        lb.configPath.write_text(config(port, backend, 'ca = "ca.pem", server_name = "localhost"'))
        lb.process.send_signal(signal.SIGHUP)
        waitFor(lambda: len(lb.events("config_reloaded")) == 2, what="the second config_reloaded")
        assert get(port) == 200
    finally:
        lb.stop()
        backend.stop()
