"""
TLS end to end: certificates from trustme, twistd txlb in a subprocess, real
clients (curl, openssl s_client, Python's ssl) and a TLS backend.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess

import pytest
import trustme

from tests.support import Backend, httpRequests, Txlb, freePort, poolToml, recvAll, recvLine, waitFor


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def certs(ca, tmp_path):
    for name in ("localhost", "shop.example"):
        cert = ca.issue_cert(name, "127.0.0.1")
        cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return tmp_path


def httpBackend(name: str, tlsContext: ssl.SSLContext | None = None) -> Backend:
    def serve(sock, backend):
        if tlsContext is not None:
            try:
                sock = tlsContext.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                return
        for head in httpRequests(sock):
            proto = [l.split(b": ", 1)[1] for l in head.split(b"\r\n") if l.lower().startswith(b"x-forwarded-proto")]
            body = json.dumps({"server": name, "proto": proto[0].decode() if proto else None}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return Backend(name, serve)


def httpsService(port: int, certs, extra: str = "") -> str:
    return (
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "p"\n'
        'tls = { certificates = [{ cert = "localhost.pem", key = "localhost.key" }, '
        '{ cert = "shop.example.pem", key = "shop.example.key" }] }\n' + extra
    )


@pytest.fixture
def https(certs):
    backends = [httpBackend("a"), httpBackend("b")]
    port = freePort()
    lb = Txlb(poolToml("p", backends) + httpsService(port, certs), certs).start()
    yield lb, port, certs
    lb.stop()
    for b in backends:
        b.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_through_an_https_service(https):
    lb, port, certs = https
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n", "--cacert", str(certs / "ca.pem"),
         f"https://localhost:{port}/", f"https://localhost:{port}/"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert {a["server"] for a in answers} == {"a", "b"}
    assert all(a["proto"] == "https" for a in answers)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_sni_with_openssl_s_client(https):
    lb, port, certs = https
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "shop.example",
         "-alpn", "http/1.1", "-CAfile", str(certs / "ca.pem")],
        input="", capture_output=True, text=True, timeout=30,
    )
    assert "DNS:shop.example" in subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=out.stdout, capture_output=True, text=True
    ).stdout
    assert "ALPN protocol: http/1.1" in out.stdout
    assert "Verify return code: 0 (ok)" in out.stdout


def test_tls11_is_refused_and_plaintext_disturbs_nobody(https):
    lb, port, certs = https
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(certs / "ca.pem"))
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.warns(DeprecationWarning):
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            context.wrap_socket(raw, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert b"HTTP/1.1 200" not in recvAll(plain)
    good = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with good.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert recvAll(s).startswith(b"HTTP/1.1 200 OK")


def test_tcp_service_terminates_tls(certs):
    backends = [Backend("t1"), Backend("t2")]
    port = freePort()
    config = poolToml("p", backends) + (
        f'[[services]]\nname = "tls-tcp"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "p"\n'
        'tls = { certificates = [{ cert = "localhost.pem", key = "localhost.key" }] }\n'
    )
    lb = Txlb(config, certs).start()
    try:
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        names = []
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as s:
                    names.append(recvLine(s).strip())
                    s.sendall(b"echo me\n")
                    assert recvLine(s) == b"echo me\n"
        assert sorted(names) == [b"t1", b"t1", b"t2", b"t2"]
        events = waitFor(lambda: len(lb.events("connection")) == 4 and lb.events("connection"))
        assert not any(e["splice"] for e in events)  # TLS stays in userspace
    finally:
        lb.stop()
        for b in backends:
            b.stop()


def test_backend_tls_is_verified(certs):
    serverContext = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serverContext.load_cert_chain(str(certs / "localhost.pem"), str(certs / "localhost.key"))
    backend = httpBackend("secure", serverContext)
    right, wrong = freePort(), freePort()
    config = (
        f'[pools.right]\nservers = [{{ name = "secure", address = "{backend.address}" }}]\n'
        'tls = { ca = "ca.pem", server_name = "localhost" }\n'
        f'[pools.wrong]\nservers = [{{ name = "secure", address = "{backend.address}" }}]\n'
        'tls = { ca = "ca.pem", server_name = "not-this-one.example" }\n'
        'retries = 0\n'
        f'[[services]]\nname = "r"\nprotocol = "http"\nlisten = "tcp:{right}:interface=127.0.0.1"\npool = "right"\n'
        f'[[services]]\nname = "w"\nprotocol = "http"\nlisten = "tcp:{wrong}:interface=127.0.0.1"\npool = "wrong"\n'
    )
    lb = Txlb(config, certs).start(listening=2)
    try:
        import urllib.error
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{right}/", timeout=10) as response:
            assert json.loads(response.read())["server"] == "secure"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{wrong}/", timeout=10)
        assert info.value.code == 502
    finally:
        lb.stop()
        backend.stop()


def test_mutual_tls_to_the_backend(certs, ca):
    client = ca.issue_cert("txlb-client")
    client.private_key_pem.write_to_path(str(certs / "client.key"))
    client.cert_chain_pems[0].write_to_path(str(certs / "client.pem"))
    serverContext = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
    serverContext.load_cert_chain(str(certs / "localhost.pem"), str(certs / "localhost.key"))
    serverContext.verify_mode = ssl.CERT_REQUIRED
    backend = httpBackend("mtls", serverContext)
    withCert, without = freePort(), freePort()
    config = (
        f'[pools.mtls]\nservers = [{{ name = "mtls", address = "{backend.address}" }}]\nretries = 0\n'
        'tls = { ca = "ca.pem", server_name = "localhost", cert = "client.pem", key = "client.key" }\n'
        f'[pools.plain]\nservers = [{{ name = "mtls", address = "{backend.address}" }}]\nretries = 0\n'
        'tls = { ca = "ca.pem", server_name = "localhost" }\n'
        f'[[services]]\nname = "a"\nprotocol = "http"\nlisten = "tcp:{withCert}:interface=127.0.0.1"\npool = "mtls"\n'
        f'[[services]]\nname = "b"\nprotocol = "http"\nlisten = "tcp:{without}:interface=127.0.0.1"\npool = "plain"\n'
    )
    lb = Txlb(config, certs).start(listening=2)
    try:
        import urllib.error
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{withCert}/", timeout=10) as response:
            assert json.loads(response.read())["server"] == "mtls"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{without}/", timeout=10)
        assert info.value.code == 502
    finally:
        lb.stop()
        backend.stop()
