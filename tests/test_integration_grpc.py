"""
gRPC end to end: grpcio servers (generic handlers on raw bytes, so no
protoc) behind twistd txlb, whose pools say protocol = "h2"; grpcio clients
and plain HTTP/1.1 clients in front.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from concurrent import futures

import grpc
import h11
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support import Backend, Txlb, freePort, httpAnswer, httpRequests, waitFor


class GRPCServer:
    """
    A grpcio server on loopback: C{/pkg.Echo/Unary} answers C{NAME:request};
    C{/pkg.Echo/Stream} sends C{count} messages, the first at once and the
    others after L{release} (so a test can act in between); the standard
    health service says SERVING until told otherwise.
    """

    def __init__(self, name: str, service: str = "pkg.Echo", credentials=None) -> None:
        self.name = name
        self.release = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
        }),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()
        self.streamed = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _unary(self, request: bytes, context) -> bytes:
        context.set_trailing_metadata((("x-served-by", self.name),))
        return self.name.encode() + b":" + request

    def _stream(self, request: bytes, context):
        count = int(request)
        yield b"%s:0" % self.name.encode()
        self.streamed.set()
        if not self.release.wait(30):
            return
        for i in range(1, count):
            yield b"%s:%d" % (self.name.encode(), i)

    def serving(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set("", status)

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0).wait(10)


def _servers(servers) -> str:
    return ", ".join(f'{{ name = "{s.name}", address = "{s.address}" }}' for s in servers)


def _config(port: int, echo, other, health: str = "") -> str:
    return (
        f'[pools.echo]\nalgorithm = "round_robin"\nprotocol = "h2"\nservers = [{_servers(echo)}]\n'
        f'retries = 1\n{health}\n'
        f'[pools.other]\nprotocol = "h2"\nservers = [{_servers(other)}]\n\n'
        f'[[services]]\nname = "grpc"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'pool = "other"\n'
        f'[[services.routes]]\npath_prefix = "/pkg.Echo/"\npool = "echo"\n'
    )


def _events(txlb: Txlb, count: int) -> list[dict]:
    """The first C{count} request events, once they are written."""
    return waitFor(lambda: (lambda found: found if len(found) >= count else None)(txlb.events("request")),
                   what=f"{count} request events")[:count]


def _healthToml(interval: str) -> str:
    """A grpc health check every C{interval}, one answer enough to go up or down."""
    return f'[pools.echo.health]\nkind = "grpc"\ninterval = "{interval}"\ntimeout = "{interval}"\nrise = 1\nfall = 1\n'


def _health(txlb: Txlb, server: str, health: str) -> list[dict]:
    """The C{server_state} events that made C{server} C{health}, once there is one."""
    return waitFor(lambda: [e for e in txlb.events("server_state") if e["server"] == server and e["health"] == health],
                   what=f"{server} to be {health}")


def _get(port: int) -> bytes:
    """A plain HTTP/1.1 GET through txlb: the whole answer, read until txlb closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: grpc.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _identity(data: bytes) -> bytes:
    return data


def _call(channel, method: str, request: bytes, timeout: float = 10.0):
    unary = channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
    return unary.with_call(request, timeout=timeout)


@pytest.fixture
def servers():
    made = []

    def make(name: str, service: str = "pkg.Echo", credentials=None) -> GRPCServer:
        server = GRPCServer(name, service, credentials)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def _h11Call(port: int, path: str, message: bytes, te: bool = True):
    """A gRPC call by hand over HTTP/1.1: C{(status, headers, body, trailers)}."""
    client = h11.Connection(h11.CLIENT)
    body = struct.pack("!BL", 0, len(message)) + message
    headers = [("Host", "grpc.test"), ("Content-Type", "application/grpc"), ("Content-Length", str(len(body)))]
    if te:
        headers.append(("TE", "trailers"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(client.send(h11.Request(method="POST", target=path, headers=headers))
                     + client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))
        response, data, trailers = None, b"", []
        for _ in range(1000):
            event = client.next_event()
            if event is h11.NEED_DATA:
                chunk = sock.recv(65536)
                client.receive_data(chunk)
                if not chunk:
                    break
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(n.decode(), v.decode()) for n, v in event.headers]
                break
    return response.status_code, {n.decode(): v.decode() for n, v in response.headers}, data, dict(trailers)


def test_http11_clients_reach_grpc_servers_over_h2c_with_trailers(servers):
    echo = [servers("e1"), servers("e2")]
    other = [servers("o1", "pkg.Other")]
    port = freePort()
    with Txlb(_config(port, echo, other)) as txlb:
        answers = []
        for i in range(4):
            status, headers, data, trailers = _h11Call(port, "/pkg.Echo/Unary", b"m%d" % i)
            assert status == 200 and headers["content-type"] == "application/grpc"
            assert headers["transfer-encoding"] == "chunked"
            answers.append(data[5:])
            assert trailers["grpc-status"] == "0"
            assert trailers["x-served-by"] == data[5:7].decode()
        assert sorted(answers) == [b"e1:m0", b"e1:m2", b"e2:m1", b"e2:m3"]  # round robin, one stream each
        # Without TE: trailers the trailers are dropped; the body comes whole.
        status, headers, data, trailers = _h11Call(port, "/pkg.Echo/Unary", b"x", te=False)
        assert status == 200 and data[5:] in (b"e1:x", b"e2:x") and trailers == {}
        # Another service path goes to the default pool; the server does not know it there.
        status, headers, data, trailers = _h11Call(port, "/pkg.Echo2/Unary", b"x")
        assert status == 200 and headers.get("grpc-status", trailers.get("grpc-status")) == "12"  # UNIMPLEMENTED
        events = _events(txlb, 6)
        assert {e["selectedServer"] for e in events} == {"e1", "e2", "o1"}
        assert all(e["status"] == 200 and e["pool"] in ("echo", "other") for e in events)


def test_no_server_up_is_grpc_unavailable_over_http11(servers):
    echo = [servers("e1")]
    port = freePort()
    echo[0].stop()
    with Txlb(_config(port, echo, [servers("o1")])) as txlb:
        status, headers, data, trailers = _h11Call(port, "/pkg.Echo/Unary", b"x")
        assert status == 200 and headers["grpc-status"] == "14" and data == b""
        [event] = _events(txlb, 1)
        assert event["status"] == 502 and event["pool"] == "echo"


def test_grpc_health_check_takes_a_not_serving_server_out(servers):
    echo = [servers("e1"), servers("e2")]
    port = freePort()
    with Txlb(_config(port, echo, [servers("o1", "pkg.Other")], _healthToml("100ms"))) as txlb:
        echo[1].serving(False)
        assert "NOT_SERVING" in _health(txlb, "e2", "unhealthy")[0]["reason"]
        for i in range(4):
            status, _, data, trailers = _h11Call(port, "/pkg.Echo/Unary", b"%d" % i)
            assert data[5:] == b"e1:%d" % i and trailers["grpc-status"] == "0"
        echo[1].serving(True)
        _health(txlb, "e2", "healthy")


# gRPC clients (HTTP/2 on the client side too).

def test_grpc_unary_and_server_streaming_calls_are_balanced(servers):
    echo = [servers("e1"), servers("e2")]
    port = freePort()
    with Txlb(_config(port, echo, [servers("o1", "pkg.Other")])) as txlb:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answers = [_call(channel, "/pkg.Echo/Unary", b"m%d" % i)[0] for i in range(4)]
            assert sorted(answers) == [b"e1:m0", b"e1:m2", b"e2:m1", b"e2:m3"]  # each stream picked on its own
            reply, call = _call(channel, "/pkg.Echo/Unary", b"t")
            assert dict(call.trailing_metadata())["x-served-by"] == reply[:2].decode()
            for server in echo:
                server.release.set()
            stream = channel.unary_stream("/pkg.Echo/Stream", request_serializer=_identity,
                                          response_deserializer=_identity)
            replies = list(stream(b"5", timeout=10))
            assert len(replies) == 5 and len({r.split(b":")[0] for r in replies}) == 1
        events = _events(txlb, 6)
        assert all(e["status"] == 200 and e["protocol"] == "HTTP/2" for e in events)


def test_no_server_available_is_unavailable_to_a_grpc_client(servers):
    echo = [servers("e1")]
    port = freePort()
    echo[0].stop()
    with Txlb(_config(port, echo, [servers("o1")])):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _call(channel, "/pkg.Echo/Unary", b"x")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "could not connect" in caught.value.details() or "reached" in caught.value.details()


def test_a_backend_killed_mid_stream_fails_that_call_and_txlb_keeps_serving(servers):
    echo = [servers("e1"), servers("e2")]
    port = freePort()
    with Txlb(_config(port, echo, [servers("o1", "pkg.Other")])):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = channel.unary_stream("/pkg.Echo/Stream", request_serializer=_identity,
                                          response_deserializer=_identity)
            replies = stream(b"5", timeout=20)
            first = next(replies)
            victim = echo[0] if first.startswith(b"e1") else echo[1]
            survivor = echo[1] if victim is echo[0] else echo[0]
            victim.server.stop(0).wait(10)
            with pytest.raises(grpc.RpcError) as caught:
                list(replies)
            assert caught.value.code() != grpc.StatusCode.OK
            for i in range(3):
                reply, _ = _call(channel, "/pkg.Echo/Unary", b"%d" % i)
                assert reply == survivor.name.encode() + b":%d" % i


# h2 over TLS to the servers: ALPN h2, the pool's certificate checks.


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """
    A CA (C{ca.pem}), a server certificate it signed for C{grpc.test}, a
    client certificate it signed for txlb (C{lb.pem}, C{lb.key}), and
    C{other.pem}, a CA that signed nothing here.
    """
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(directory / "other.pem"))
    issued = ca.issue_cert("grpc.test")
    client = ca.issue_cert("txlb.test")
    client.cert_chain_pems[0].write_to_path(str(directory / "lb.pem"))
    client.private_key_pem.write_to_path(str(directory / "lb.key"))
    pair = (issued.private_key_pem.bytes(), b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    return {
        "dir": directory,
        "grpc": grpc.ssl_server_credentials([pair]),
        "mutual": grpc.ssl_server_credentials([pair], root_certificates=ca.cert_pem.bytes(), require_client_auth=True),
        "issued": issued,
    }


def _tlsConfig(port: int, servers, tls: str, health: str = "") -> str:
    return (
        f'[pools.echo]\nalgorithm = "round_robin"\nprotocol = "h2"\nservers = [{_servers(servers)}]\n'
        f'retries = 0\ntls = {{ {tls} }}\n{health}\n'
        f'[[services]]\nname = "grpc"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'pool = "echo"\n'
    )


def test_grpc_reaches_servers_over_tls_with_their_certificates_verified(servers, certificates):
    echo = [servers("e1", credentials=certificates["grpc"]), servers("e2", credentials=certificates["grpc"])]
    port = freePort()
    ca = certificates["dir"] / "ca.pem"
    with Txlb(_tlsConfig(port, echo, f'ca = "{ca}", server_name = "grpc.test"', _healthToml("500ms"))) as txlb:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answers = [_call(channel, "/pkg.Echo/Unary", b"m%d" % i)[0] for i in range(4)]
            assert sorted(answers) == [b"e1:m0", b"e1:m2", b"e2:m1", b"e2:m3"]
            reply, call = _call(channel, "/pkg.Echo/Unary", b"t")
            assert dict(call.trailing_metadata())["x-served-by"] == reply[:2].decode()
        status, headers, data, trailers = _h11Call(port, "/pkg.Echo/Unary", b"h1")
        assert status == 200 and data[5:] in (b"e1:h1", b"e2:h1") and trailers["grpc-status"] == "0"
        # The grpc health check goes over the pool's TLS too: it sees NOT_SERVING.
        echo[1].serving(False)
        assert "NOT_SERVING" in _health(txlb, "e2", "unhealthy")[0]["reason"]
        for i in range(2):
            status, _, data, _ = _h11Call(port, "/pkg.Echo/Unary", b"%d" % i)
            assert data[5:] == b"e1:%d" % i
        assert not txlb.events("connect_failed")


def test_servers_that_require_a_client_certificate_get_the_pools(servers, certificates):
    echo = [servers("e1", credentials=certificates["mutual"])]
    d = certificates["dir"]
    verified = f'ca = "{d / "ca.pem"}", server_name = "grpc.test"'
    for tls, works in [(f'{verified}, cert = "{d / "lb.pem"}", key = "{d / "lb.key"}"', True), (verified, False)]:
        port = freePort()
        with Txlb(_tlsConfig(port, echo, tls)) as txlb:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                if works:
                    assert _call(channel, "/pkg.Echo/Unary", b"m")[0] == b"e1:m"
                else:
                    with pytest.raises(grpc.RpcError) as caught:
                        _call(channel, "/pkg.Echo/Unary", b"m")
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                    [failed] = waitFor(lambda: txlb.events("connect_failed"), what="the connect_failed event")
                    assert "e1 closed the connection right after the TLS handshake (does it want a client" \
                           " certificate? the pool's tls.cert and tls.key)" in failed["why"]


@pytest.mark.parametrize("ca, name, why", [
    ("other.pem", "grpc.test", "certificate verify failed"),
    ("ca.pem", "other.test", "the server's certificate is not for other.test"),
])
def test_a_server_certificate_that_does_not_verify_is_unavailable_and_says_why(servers, certificates, ca, name, why):
    echo = [servers("e1", credentials=certificates["grpc"])]
    port = freePort()
    with Txlb(_tlsConfig(port, echo, f'ca = "{certificates["dir"] / ca}", server_name = "{name}"')) as txlb:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                _call(channel, "/pkg.Echo/Unary", b"x")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # grpc-status 14
        status, headers, data, trailers = _h11Call(port, "/pkg.Echo/Unary", b"x")
        assert status == 200 and headers["grpc-status"] == "14"
        assert _get(port).startswith(b"HTTP/1.1 502 ")
        failed = waitFor(lambda: (lambda found: found if len(found) >= 3 else None)(txlb.events("connect_failed")),
                         what="three connect_failed events")
        assert all(f"TLS with e1 failed: {why}" in e["why"] for e in failed)
        assert [e["status"] for e in _events(txlb, 3)] == [502, 502, 502]


def test_a_tls_server_that_does_not_offer_h2_is_a_clear_error(certificates):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificates["issued"].configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])

    def http11Only(sock: socket.socket, backend: Backend) -> None:
        with context.wrap_socket(sock, server_side=True) as tls:
            for _ in httpRequests(tls):
                httpAnswer(tls, 200, b"HTTP/1.1 only")

    backend = Backend("h1", http11Only)
    port = freePort()
    ca = certificates["dir"] / "ca.pem"
    try:
        with Txlb(_tlsConfig(port, [backend], f'ca = "{ca}", server_name = "grpc.test"')) as txlb:
            assert _get(port).startswith(b"HTTP/1.1 502 ")
            [failed] = waitFor(lambda: txlb.events("connect_failed"), what="the connect_failed event")
            assert "h1 did not agree to h2 in TLS's ALPN (it chose no protocol)" in failed["why"]
            assert 'protocol = "http/1.1"' in failed["why"]
    finally:
        backend.stop()
