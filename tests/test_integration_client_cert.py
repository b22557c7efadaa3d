"""
Client certificates end to end: CAs and certificates from trustme, twistd
txlb in a subprocess, real clients (Python's ssl, httpx over HTTP/2,
openssl s_client) and backends that answer with the headers they got.

One txlb runs the services most tests share: C{required} (HTTP, client
certificate required), C{optional}, C{sni} (optional for localhost with the
first CA, required for shop.example with the other CA), C{tcp} (TCP,
required), C{plain} (HTTP, no TLS) and C{tls} (HTTPS, no client_ca).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request

import httpx
import pytest
import trustme

from tests.support import (
    Backend,
    Txlb,
    freePort,
    httpRequests,
    poolToml,
    recvAll,
    recvLine,
    sourceEnv,
    twistdCommand,
    waitFor,
)

_CLIENT_CERT_HEADERS = (b"x-client-cert-subject", b"x-client-cert-verified")


def headersBackend(name: str) -> Backend:
    """Answers each request with JSON: its name and the X-Client-Cert-* headers it got."""

    def serve(sock, backend):
        for head in httpRequests(sock):
            seen: dict[str, list[str]] = {}
            for line in head.split(b"\r\n")[1:]:
                field, _, value = line.partition(b":")
                if field.lower() in _CLIENT_CERT_HEADERS:
                    seen.setdefault(field.lower().decode(), []).append(value.strip().decode())
            body = json.dumps({"server": name, "headers": seen}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return Backend(name, serve)


@pytest.fixture(scope="module")
def cas():
    return trustme.CA(), trustme.CA()


def writeCerts(directory, ca, other) -> None:
    for name in ("localhost", "shop.example"):
        cert = ca.issue_cert(name, "127.0.0.1")
        cert.private_key_pem.write_to_path(str(directory / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))


def service(name: str, port: int, tls: str = "", protocol: str = "http", pool: str = "web") -> str:
    return (f'[[services]]\nname = "{name}"\nprotocol = "{protocol}"\n'
            f'listen = "tcp:{port}:interface=127.0.0.1"\npool = "{pool}"\n' + (f"tls = {tls}\n" if tls else ""))


LOCALHOST = '{ cert = "localhost.pem", key = "localhost.key" }'


@pytest.fixture(scope="module")
def env(cas, tmp_path_factory):
    ca, other = cas
    directory = tmp_path_factory.mktemp("client-cert")
    writeCerts(directory, ca, other)
    web, echo = headersBackend("web-1"), Backend("echo")
    ports = {name: freePort() for name in ("required", "optional", "sni", "tcp", "plain", "tls", "admin")}
    config = (
        f'[admin]\nlisten = "tcp:{ports["admin"]}:interface=127.0.0.1"\n'
        + poolToml("web", [web]) + poolToml("echo", [echo])
        + service("required", ports["required"], f'{{ client_ca = "ca.pem", certificates = [{LOCALHOST}] }}')
        + service("optional", ports["optional"],
                  f'{{ client_ca = "ca.pem", client_auth = "optional", certificates = [{LOCALHOST}] }}')
        + service("sni", ports["sni"], (
            f'{{ client_ca = "ca.pem", client_auth = "optional", certificates = [{LOCALHOST}, '
            '{ cert = "shop.example.pem", key = "shop.example.key", client_ca = "other-ca.pem", '
            'client_auth = "required" }] }'))
        + service("tcp", ports["tcp"], f'{{ client_ca = "ca.pem", certificates = [{LOCALHOST}] }}',
                  protocol="tcp", pool="echo")
        + service("plain", ports["plain"])
        + service("tls", ports["tls"], f"{{ certificates = [{LOCALHOST}] }}")
    )
    lb = Txlb(config, directory).start(listening=7)
    yield {"lb": lb, "ports": ports, "dir": directory, "ca": ca, "other": other, "echo": echo}
    lb.stop()
    web.stop()
    echo.stop()


def clientContext(env, cert=None) -> ssl.SSLContext:
    """A client trusting txlb's certificates, presenting C{cert} (a trustme leaf) if given."""
    context = ssl.create_default_context(cafile=str(env["dir"] / "ca.pem"))
    if cert is not None:
        cert.configure_cert(context)
    return context


def get(env, serviceName: str, cert=None, sni: str = "localhost", headers: bytes = b"") -> dict:
    """One HTTPS request: the backend's JSON answer."""
    with socket.create_connection(("127.0.0.1", env["ports"][serviceName]), timeout=10) as raw:
        with clientContext(env, cert).wrap_socket(raw, server_hostname=sni) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: " + sni.encode() + b"\r\n" + headers + b"Connection: close\r\n\r\n")
            answer = recvAll(s)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    return json.loads(answer.partition(b"\r\n\r\n")[2])["headers"]


def refused(env, serviceName: str, cert=None, sni: str = "localhost") -> str:
    """
    The handshake ends without an answer: the error the client saw.  With
    TLS 1.3 the client's side of the handshake may end before the server
    has read the certificate; the alert then comes on the first read.
    """
    try:
        with socket.create_connection(("127.0.0.1", env["ports"][serviceName]), timeout=10) as raw:
            with clientContext(env, cert).wrap_socket(raw, server_hostname=sni) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                answer = recvAll(s)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return str(e)
    assert answer == b"", answer
    return "closed"


def person(ca, name: str):
    return ca.issue_cert(f"{name}@example.com", common_name=name, organization_name="Example")


def metric(env, serviceName: str, reason: str = "client_cert") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{env['ports']['admin']}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("txlb_refused_total{") and f'service="{serviceName}"' in line \
                and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def refusedEvents(env, serviceName: str) -> list[dict]:
    return [e for e in env["lb"].events("client_cert_refused") if e["service"] == serviceName]


def test_required_refuses_a_client_without_a_certificate(env):
    before = metric(env, "required")
    why = refused(env, "required")
    assert "certificate required" in why or "alert" in why or why == "closed", why
    waitFor(lambda: metric(env, "required") == before + 1, what="the refusal counted")
    event = waitFor(lambda: [e for e in refusedEvents(env, "required") if e["reason"] == "no client certificate"])[-1]
    assert event["client"] == "127.0.0.1" and event["serverName"] == "localhost"


def test_required_passes_a_good_certificate_and_the_backend_sees_its_subject(env):
    headers = get(env, "required", person(env["ca"], "alice"))
    [subject] = headers["x-client-cert-subject"]
    assert subject.startswith("CN=alice,") and subject.endswith(",O=Example"), subject
    assert headers["x-client-cert-verified"] == ["SUCCESS"]


def test_a_certificate_from_another_ca_is_refused_and_counted(env):
    for serviceName in ("required", "optional"):
        before = metric(env, serviceName)
        refused(env, serviceName, person(env["other"], "mallory"))
        waitFor(lambda: metric(env, serviceName) == before + 1, what=f"the refusal counted on {serviceName}")
        event = waitFor(lambda: [e for e in refusedEvents(env, serviceName) if e.get("subject")])[-1]
        assert event["subject"].startswith("CN=mallory,") and "not signed by the client CA" in event["reason"]


def test_optional_without_a_certificate_says_none(env):
    assert get(env, "optional") == {"x-client-cert-verified": ["NONE"]}
    assert get(env, "optional", person(env["ca"], "carol"))["x-client-cert-verified"] == ["SUCCESS"]


FORGED = b"X-Client-Cert-Subject: CN=admin\r\nx-client-cert-verified: SUCCESS\r\n"


def test_forged_client_certificate_headers_never_reach_a_backend(env):
    assert get(env, "optional", headers=FORGED) == {"x-client-cert-verified": ["NONE"]}
    alice = get(env, "required", person(env["ca"], "alice"), headers=FORGED)
    assert alice["x-client-cert-subject"][0].startswith("CN=alice,") and alice["x-client-cert-verified"] == ["SUCCESS"]
    assert get(env, "tls", headers=FORGED) == {}
    with socket.create_connection(("127.0.0.1", env["ports"]["plain"]), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n" + FORGED + b"Connection: close\r\n\r\n")
        answer = recvAll(s)
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["headers"] == {}


def test_http2_streams_carry_the_connections_certificate(env):
    context = clientContext(env, person(env["ca"], "dave"))
    with httpx.Client(http2=True, http1=False, verify=context, timeout=10) as client:
        answers = [client.get(f"https://localhost:{env['ports']['required']}/", headers={
            "X-Client-Cert-Subject": "CN=admin"}) for _ in range(3)]
    for answer in answers:
        assert answer.http_version == "HTTP/2"
        headers = answer.json()["headers"]
        assert headers["x-client-cert-subject"][0].startswith("CN=dave,") and len(headers["x-client-cert-subject"]) == 1
        assert headers["x-client-cert-verified"] == ["SUCCESS"]


def test_each_sni_name_asks_its_own(env):
    """localhost: optional, the first CA; shop.example: required, the other CA."""
    assert get(env, "sni") == {"x-client-cert-verified": ["NONE"]}
    assert get(env, "sni", person(env["ca"], "erin"))["x-client-cert-subject"][0].startswith("CN=erin,")
    before = metric(env, "sni")
    refused(env, "sni", sni="shop.example")
    refused(env, "sni", person(env["ca"], "erin"), sni="shop.example")
    assert get(env, "sni", person(env["other"], "frank"), sni="shop.example")["x-client-cert-subject"][0].startswith(
        "CN=frank,")
    waitFor(lambda: metric(env, "sni") == before + 2, what="both refusals counted")


def test_a_tcp_service_reaches_no_backend_before_the_certificate_passed(env):
    connections = env["echo"].connections
    refused(env, "tcp")
    waitFor(lambda: [e for e in env["lb"].events("connection")
                     if e["service"] == "tcp" and e.get("refused") == "client_cert"], what="the connection event")
    assert env["echo"].connections == connections
    with socket.create_connection(("127.0.0.1", env["ports"]["tcp"]), timeout=10) as raw:
        with clientContext(env, person(env["ca"], "grace")).wrap_socket(raw, server_hostname="localhost") as s:
            assert recvLine(s) == b"echo\n"
            s.sendall(b"hello\n")
            assert recvLine(s) == b"hello\n"
    assert env["echo"].connections == connections + 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("version, alert", [("-tls1_3", "certificate required"), ("-tls1_2", "handshake failure")])
def test_openssl_s_client_sees_the_alert(env, version, alert):
    out = subprocess.run(
        # -ign_eof: read until txlb closes (TLS 1.3's alert comes after the client's handshake ended)
        ["openssl", "s_client", version, "-ign_eof", "-connect", f"127.0.0.1:{env['ports']['required']}",
         "-servername", "localhost", "-CAfile", str(env["dir"] / "ca.pem")],
        input="GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", capture_output=True, text=True, timeout=30,
    )
    assert f"alert {alert}" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "HTTP/1.1 200" not in out.stdout


def test_a_reload_with_a_new_ca_applies_to_new_connections(cas, tmp_path):
    ca, other = cas
    writeCerts(tmp_path, ca, other)
    web = headersBackend("web-1")
    port = freePort()
    text = poolToml("web", [web]) + service("mtls", port, f'{{ client_ca = "ca.pem", certificates = [{LOCALHOST}] }}')
    lb = Txlb(text, tmp_path).start()
    env = {"ports": {"mtls": port}, "dir": tmp_path}
    try:
        assert get(env, "mtls", person(ca, "alice"))["x-client-cert-verified"] == ["SUCCESS"]
        refused(env, "mtls", person(other, "bob"))
        lb.configPath.write_text(text.replace('client_ca = "ca.pem"', 'client_ca = "other-ca.pem"'))
        lb.process.send_signal(signal.SIGHUP)
        (event,) = waitFor(lambda: lb.events("config_reloaded"), what="config_reloaded")
        assert any("tls" in change for change in event["changes"]), event
        assert get(env, "mtls", person(other, "bob"))["x-client-cert-subject"][0].startswith("CN=bob,")
        refused(env, "mtls", person(ca, "alice"))
        # The same file name with a new CA in it: a reload reads it again.
        ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
        lb.process.send_signal(signal.SIGHUP)
        waitFor(lambda: len(lb.events("config_reloaded")) == 2, what="the second reload")
        assert get(env, "mtls", person(ca, "alice"))["x-client-cert-subject"][0].startswith("CN=alice,")
        refused(env, "mtls", person(other, "bob"))
    finally:
        lb.stop()
        web.stop()


def test_check_names_the_key_of_a_client_auth_without_client_ca(cas, tmp_path):
    writeCerts(tmp_path, *cas)
    path = tmp_path / "txlb.toml"
    path.write_text('[pools.web]\nservers = [{ name = "a", address = "127.0.0.1:9001" }]\n'
                    + service("web", freePort(), f'{{ client_auth = "optional", certificates = [{LOCALHOST}] }}'))
    out = subprocess.run(twistdCommand("txlb", "--config", str(path), "--check"), capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=sourceEnv())
    assert out.returncode == 1
    assert f"{path}:8: services[0].tls.client_auth: needs client_ca" in out.stderr, out.stderr
    path.write_text(path.read_text().replace("client_auth", 'client_ca = "ca.pem", client_auth'))
    out = subprocess.run(twistdCommand("txlb", "--config", str(path), "--check"), capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=sourceEnv())
    assert out.returncode == 0, out.stderr
    assert f"client certificates optional, signed by {tmp_path / 'ca.pem'}" in out.stdout


def test_worker_processes_verify_and_the_master_counts_their_refusals(cas, tmp_path):
    ca, other = cas
    writeCerts(tmp_path, ca, other)
    web = headersBackend("web-1")
    port, admin = freePort(), freePort()
    text = (f'[txlb]\nworkers = 2\nshutdown_timeout = "10s"\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
            + poolToml("web", [web])
            + service("mtls", port, f'{{ client_ca = "ca.pem", certificates = [{LOCALHOST}] }}'))
    lb = Txlb(text, tmp_path).start()
    env = {"ports": {"mtls": port, "admin": admin}, "dir": tmp_path}
    try:
        waitFor(lambda: len({e["worker"] for e in lb.events("worker_started")}) == 2, what="two workers")
        for _ in range(4):  # the kernel spreads connections over both workers' sockets
            refused(env, "mtls")
            assert get(env, "mtls", person(ca, "alice"))["x-client-cert-subject"][0].startswith("CN=alice,")
        waitFor(lambda: metric(env, "mtls") == 4, what="four refusals added up by the master")
    finally:
        lb.stop()
        web.stop()
