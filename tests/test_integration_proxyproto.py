"""
The PROXY protocol end to end: C{twistd txlb} in a subprocess with
C{accept_proxy} and C{proxy_protocol} services, headers written by hand
and by HAProxy (C{send-proxy}, C{send-proxy-v2}) in front of txlb, and
HAProxy (C{accept-proxy}) behind txlb reading txlb's own headers.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import urllib.request

import pytest
import trustme

from tests.support import HAPROXY, Backend, HAProxy, Txlb, freePort, httpRequests, needsHAProxy, recvAll, waitFor


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


def httpBackend(name: str) -> Backend:
    """Answers each request with JSON: its name and the X-Forwarded-For it got."""

    def serve(sock, backend):
        for head in httpRequests(sock):
            lines = head.split(b"\r\n")[1:]
            xff = [line.split(b":", 1)[1].strip().decode() for line in lines
                   if line.lower().startswith(b"x-forwarded-for:")]
            forwarded = [line.split(b":", 1)[1].strip().decode() for line in lines
                         if line.lower().startswith(b"forwarded:")]
            answer = {"server": name, "xff": xff}
            if forwarded:
                answer["forwarded"] = forwarded
            body = json.dumps(answer).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return Backend(name, serve)


class Capture:
    """A TCP backend that keeps what each connection sent until EOF, and answers nothing."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lock = threading.Lock()

        def serve(sock, backend):
            data = recvAll(sock)
            with self.lock:
                self.received.append(data)

        self.backend = Backend("raw", serve)

    def stop(self) -> None:
        self.backend.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """
    One txlb with every service these tests need, its backends, and (when
    installed) one HAProxy: two frontends that send PROXY headers to
    txlb, and one listener that reads them from txlb.
    """
    directory = tmp_path_factory.mktemp("proxyproto")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(directory / "site.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "site.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    webs = [httpBackend(f"web-{i}") for i in (1, 2, 3)]
    final = httpBackend("behind-haproxy")
    echo = Backend("echo")
    echoes = [Backend(f"echo-{i}") for i in (1, 2)]
    raw = Capture()
    ports = {name: freePort() for name in (
        "web", "strict", "tls", "tcp", "out1", "out2", "chain", "sticky", "admin", "hp1", "hp2", "hpIn")}
    echoServers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in echoes)
    servers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in webs)
    config = f"""
[admin]
listen = "tcp:{ports['admin']}:interface=127.0.0.1"

[pools.web]
algorithm = "ip_hash"
servers = [{servers}]

[pools.echo]
servers = [{{ name = "echo", address = "{echo.address}" }}]

[pools.echoes]
algorithm = "round_robin"
servers = [{echoServers}]

[pools.raw]
servers = [{{ name = "raw", address = "{raw.backend.address}" }}]

[pools.haproxy]
servers = [{{ name = "haproxy", address = "127.0.0.1:{ports['hpIn']}" }}]

[[services]]
name = "web"
protocol = "http"
listen = "tcp:{ports['web']}:interface=127.0.0.1"
pool = "web"
accept_proxy = {{ from = ["127.0.0.1/32"] }}

[[services]]
name = "strict"
protocol = "http"
listen = "tcp:{ports['strict']}:interface=127.0.0.1"
pool = "web"
accept_proxy = {{ from = ["127.0.0.2"], timeout = "1s" }}

[[services]]
name = "tls"
protocol = "http"
listen = "tcp:{ports['tls']}:interface=127.0.0.1"
pool = "web"
accept_proxy = true
tls = {{ certificates = [{{ cert = "site.pem", key = "site.key" }}] }}
forwarded = true

[[services]]
name = "tcp"
protocol = "tcp"
listen = "tcp:{ports['tcp']}:interface=127.0.0.1"
pool = "echo"
accept_proxy = true

[[services]]
name = "out1"
protocol = "tcp"
listen = "tcp:{ports['out1']}:interface=127.0.0.1"
pool = "raw"
accept_proxy = true
proxy_protocol = "v1"

[[services]]
name = "out2"
protocol = "tcp"
listen = "tcp:{ports['out2']}:interface=127.0.0.1"
pool = "raw"
proxy_protocol = "v2"

[[services]]
name = "sticky"
protocol = "tcp"
listen = "tcp:{ports['sticky']}:interface=127.0.0.1"
pool = "echoes"
accept_proxy = true
sticky = {{ mode = "ip" }}

[[services]]
name = "chain"
protocol = "tcp"
listen = "tcp:{ports['chain']}:interface=127.0.0.1"
pool = "haproxy"
accept_proxy = true
proxy_protocol = "v2"
"""
    lb = Txlb(config, directory).start(listening=9)
    haproxy = None
    if HAPROXY is not None:
        haproxy = HAProxy(directory, f"""
frontend sendV1
  bind 127.0.0.1:{ports['hp1']}
  default_backend txlbV1
backend txlbV1
  server txlb 127.0.0.1:{ports['web']} send-proxy

frontend sendV2
  bind 127.0.0.1:{ports['hp2']}
  default_backend txlbV2
backend txlbV2
  server txlb 127.0.0.1:{ports['web']} send-proxy-v2 proxy-v2-options crc32c

frontend readsTxlb
  mode http
  bind 127.0.0.1:{ports['hpIn']} accept-proxy
  option forwardfor
  timeout http-request 10s
  default_backend final
backend final
  mode http
  server final {final.address}
""", [ports["hp1"], ports["hp2"], ports["hpIn"]])
    yield dict(lb=lb, ports=ports, ca=ca, raw=raw, haproxy=haproxy)
    lb.stop()
    if haproxy is not None:
        haproxy.stop()
    for b in (*webs, final, echo, *echoes):
        b.stop()
    raw.stop()


def request(port: int, header: bytes = b"", source: str = "127.0.0.1", chunks: int = 0, wrap=None) -> dict:
    """One GET through C{port} (after C{header}); the backend's JSON answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if chunks:
            for i in range(0, len(header), chunks):
                sock.sendall(header[i:i + chunks])
        elif header:
            sock.sendall(header)
        if wrap is not None:
            sock = wrap(sock)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = recvAll(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    return json.loads(body)


def closedWithoutAnswer(port: int, data: bytes, source: str = "127.0.0.1") -> bool:
    """Whether txlb closes a connection that sends C{data} (and a request) without answering."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    with sock:
        try:
            sock.sendall(data + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return recvAll(sock) == b""
        except ConnectionResetError:
            return True


def refusals(env, service: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{env['ports']['admin']}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("txlb_refused_total{") and f'service="{service}"' in line \
                and 'reason="proxy_header"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# Headers written by hand.


def test_v1_by_hand_names_the_client_in_x_forwarded_for_and_the_event(env):
    port = env["ports"]["web"]
    answer = request(port, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 %d\r\n" % port)
    assert answer["xff"] == ["203.0.113.7"]
    events = waitFor(lambda: [e for e in env["lb"].events("request")
                              if e["service"] == "web" and e["client"] == "203.0.113.7"], what="request event")
    assert events[0]["selectedServer"] == answer["server"]


def test_v2_sent_one_byte_at_a_time(env):
    port = env["ports"]["web"]
    answer = request(port, v2("198.51.100.20", "127.0.0.1", 40001, port), chunks=1)
    assert answer["xff"] == ["198.51.100.20"]


def test_ip_hash_follows_the_header_client(env):
    port = env["ports"]["web"]
    picks = {}
    for i in range(1, 25):
        client = f"203.0.113.{i}"
        first = request(port, b"PROXY TCP4 %s 127.0.0.1 40000 %d\r\n" % (client.encode(), port))
        again = request(port, v2(client, "127.0.0.1", 40001, port))
        assert first["server"] == again["server"] and first["xff"] == again["xff"] == [client]
        picks[client] = first["server"]
    # Every connection came from 127.0.0.1, yet the clients spread: the hash is on the header's client.
    assert len(set(picks.values())) >= 2


@pytest.mark.parametrize("data", [
    b"",                                                     # no header at all
    b"PROXY TCP4 203.0.113.7 127.0.0.1 40000\r\n",           # a field missing
    b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 99999\r\n",     # a port out of range
    V2_SIGNATURE + b"\x21\x11\x00\x04\x00\x00\x00\x00",      # a v2 address block too short
])
def test_missing_or_malformed_header_is_closed_and_counted(env, data):
    before = refusals(env, "web")
    assert closedWithoutAnswer(env["ports"]["web"], data)
    waitFor(lambda: refusals(env, "web") > before, what="the refusal counted")
    assert env["lb"].events("proxy_refused")


def test_untrusted_source_is_closed_and_trusted_one_served(env):
    port = env["ports"]["strict"]
    before = refusals(env, "strict")
    header = b"PROXY TCP4 203.0.113.50 127.0.0.1 40000 %d\r\n" % port
    assert closedWithoutAnswer(port, header, source="127.0.0.1")
    waitFor(lambda: refusals(env, "strict") > before, what="the refusal counted")
    assert request(port, header, source="127.0.0.2")["xff"] == ["203.0.113.50"]


def test_header_that_never_comes_times_out(env):
    port = env["ports"]["strict"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
    with sock:
        sock.sendall(b"PROXY TCP4 ")
        try:  # closed (reset) by txlb after accept_proxy.timeout = 1s, well within the recv timeout
            assert recvAll(sock) == b""
        except ConnectionResetError:
            pass
    waitFor(lambda: any("within 1s" in e["reason"] for e in env["lb"].events("proxy_refused")), what="the event")


def test_tls_after_the_header(env):
    port = env["ports"]["tls"]
    context = ssl.create_default_context(cadata=env["ca"].cert_pem.bytes().decode())

    answer = request(port, b"PROXY TCP4 192.0.2.77 127.0.0.1 40000 %d\r\n" % port,
                     wrap=lambda sock: context.wrap_socket(sock, server_hostname="localhost"))
    assert answer["xff"] == ["192.0.2.77"]
    assert answer["forwarded"] == ['for=192.0.2.77;proto=https;host="x"']


def test_tcp_service_is_spliced_after_the_header_and_gets_what_followed_it(env):
    port = env["ports"]["tcp"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 %d\r\nsent with the header|" % port)
        sock.shutdown(socket.SHUT_WR)
        answer = recvAll(sock)
    assert answer == b"echo\nsent with the header|"
    event = waitFor(lambda: [e for e in env["lb"].events("connection") if e["service"] == "tcp"], what="event")[0]
    assert event["client"] == "192.0.2.9" and event["splice"] is True
    assert event["bytesIn"] == len(b"sent with the header|")


# txlb's own headers, read by a strict parser here.


def strictHeader(data: bytes) -> tuple[dict, bytes]:
    """A strict reading of one PROXY header (v1 or v2), independent of txlb's parser."""
    if data.startswith(b"PROXY "):
        line, sep, rest = data.partition(b"\r\n")
        assert sep and len(line) + 2 <= 107
        proto, src, dst, sport, dport = line.decode("ascii").split(" ")[1:]
        assert proto == "TCP4"
        socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst)
        assert str(int(sport)) == sport and str(int(dport)) == dport
        return dict(version=1, src=src, dst=dst, sport=int(sport), dport=int(dport)), rest
    assert data[:12] == V2_SIGNATURE
    assert data[12] == 0x21 and data[13] == 0x11  # version 2, PROXY, over TCP/IPv4
    (length,) = struct.unpack("!H", data[14:16])
    assert length == 12
    block = data[16:28]
    sport, dport = struct.unpack("!HH", block[8:12])
    return dict(version=2, src=socket.inet_ntoa(block[:4]), dst=socket.inet_ntoa(block[4:8]),
                sport=sport, dport=dport), data[28:]


def test_proxy_protocol_v1_names_the_client_learnt_from_accept_proxy(env):
    port = env["ports"]["out1"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.30 127.0.0.1 41234 %d\r\npayload-1" % port)
        sock.shutdown(socket.SHUT_WR)
        recvAll(sock)
    got = waitFor(lambda: [r for r in env["raw"].received if r.endswith(b"payload-1")], what="the backend")[0]
    header, rest = strictHeader(got)
    assert header == dict(version=1, src="192.0.2.30", dst="127.0.0.1", sport=41234, dport=port)
    assert rest == b"payload-1"


def test_proxy_protocol_v2_names_the_socket_client(env):
    port = env["ports"]["out2"]
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.6", 0)) as sock:
        sourcePort = sock.getsockname()[1]
        sock.sendall(b"payload-2")
        sock.shutdown(socket.SHUT_WR)
        recvAll(sock)
    got = waitFor(lambda: [r for r in env["raw"].received if r.endswith(b"payload-2")], what="the backend")[0]
    header, rest = strictHeader(got)
    assert header == dict(version=2, src="127.0.0.6", dst="127.0.0.1", sport=sourcePort, dport=port)
    assert rest == b"payload-2"
    event = waitFor(lambda: [e for e in env["lb"].events("connection") if e["service"] == "out2"], what="event")[0]
    assert event["splice"] is True and event["bytesIn"] == len(b"payload-2")


# HAProxy in front of txlb, and behind it.


@needsHAProxy
@pytest.mark.parametrize("frontend", ["hp1", "hp2"])
def test_haproxy_send_proxy_in_front(env, frontend):
    """HAProxy's send-proxy (v1) and send-proxy-v2 name each source; ip_hash follows it."""
    port = env["ports"][frontend]
    picks = {}
    for i in range(10, 22):
        source = f"127.0.0.{i}"
        answers = [request(port, source=source) for _ in range(2)]
        assert [a["xff"] for a in answers] == [[source], [source]]
        assert answers[0]["server"] == answers[1]["server"]
        picks[source] = answers[0]["server"]
    assert len(set(picks.values())) >= 2


@needsHAProxy
def test_haproxy_accept_proxy_behind_reads_txlbs_v2_header(env):
    """
    client -(PROXY v1 by hand)-> txlb tcp service -(txlb's PROXY v2)->
    HAProxy accept-proxy, option forwardfor -> backend: the backend sees
    the client of the first header.
    """
    port = env["ports"]["chain"]
    answer = request(port, b"PROXY TCP4 192.0.2.99 127.0.0.1 40000 %d\r\n" % port)
    assert answer == {"server": "behind-haproxy", "xff": ["192.0.2.99"]}


def test_sticky_ip_follows_the_header_client(env):
    """A round-robin pool, sticky by client address: each header client keeps its server."""
    port = env["ports"]["sticky"]

    def server(client: str) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 %s 127.0.0.1 40000 %d\r\n" % (client.encode(), port))
            sock.shutdown(socket.SHUT_WR)
            return recvAll(sock)

    picks = {}
    for i in (1, 2, 3, 4):
        client = f"198.51.100.{i}"
        answers = {server(client) for _ in range(3)}
        assert len(answers) == 1, (client, answers)
        picks[client] = answers.pop()
    assert set(picks.values()) == {b"echo-1\n", b"echo-2\n"}


# Reload and workers.


def webConfig(port: int, backend: Backend, extra: str = "", top: str = "") -> str:
    return (
        f'{top}[pools.web]\nservers = [{{ name = "{backend.name}", address = "{backend.address}" }}]\n'
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'pool = "web"\n{extra}'
    )


def test_a_reload_turns_accept_proxy_on_for_new_connections(tmp_path):
    import signal

    backend = httpBackend("w")
    port = freePort()
    lb = Txlb(webConfig(port, backend), tmp_path).start()
    try:
        assert request(port)["xff"] == ["127.0.0.1"]
        lb.configPath.write_text(webConfig(port, backend, "accept_proxy = true\n"))
        lb.process.send_signal(signal.SIGHUP)
        (event,) = waitFor(lambda: lb.events("config_reloaded"), what="config_reloaded")
        assert any("accept_proxy" in change for change in event["changes"]), event
        assert request(port, b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n")["xff"] == ["192.0.2.1"]
        assert closedWithoutAnswer(port, b"")
    finally:
        lb.stop()
        backend.stop()


def test_workers_read_the_header(tmp_path):
    backend = httpBackend("w")
    port = freePort()
    lb = Txlb(webConfig(port, backend, 'accept_proxy = { from = ["127.0.0.0/8"] }\n', top="[txlb]\nworkers = 2\n"),
              tmp_path)
    try:
        lb.start()
        waitFor(lambda: len({e["worker"] for e in lb.events("worker_started")}) == 2, what="two workers")
        for i in range(1, 9):
            header = v2(f"192.0.2.{i}", "127.0.0.1", 1000 + i, port)
            assert request(port, header)["xff"] == [f"192.0.2.{i}"]
        assert closedWithoutAnswer(port, b"GET")
    finally:
        lb.stop()
        backend.stop()


def test_http2_streams_get_the_header_client(env):
    """HTTP/2 by prior knowledge after the PROXY header: each stream's request names the header's client."""
    import h2.config
    import h2.connection
    import h2.events

    port = env["ports"]["web"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(v2("203.0.113.222", "127.0.0.1", 40000, port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for stream in (1, 3):
            conn.send_headers(stream, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                       (":authority", "x")], end_stream=True)
        sock.sendall(conn.data_to_send())
        bodies: dict[int, bytes] = {1: b"", 3: b""}
        ended: set[int] = set()
        for _ in range(200):
            if ended == {1, 3}:
                break
            data = sock.recv(65536)
            assert data, "closed before both answers"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
            sock.sendall(conn.data_to_send())
    assert [json.loads(bodies[s])["xff"] for s in (1, 3)] == [["203.0.113.222"]] * 2


def test_allow_and_deny_judge_the_header_client(tmp_path):
    """The policy's allow/deny sees the PROXY client on TCP (the transport's getPeer) and HTTP services."""
    web, echo = httpBackend("w"), Backend("echo")
    httpPort, tcpPort = freePort(), freePort()
    config = (
        f'[pools.web]\nservers = [{{ name = "w", address = "{web.address}" }}]\n'
        f'[pools.echo]\nservers = [{{ name = "echo", address = "{echo.address}" }}]\n'
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{httpPort}:interface=127.0.0.1"\n'
        'pool = "web"\naccept_proxy = true\ndeny = ["203.0.113.0/24"]\n'
        f'[[services]]\nname = "tcp"\nprotocol = "tcp"\nlisten = "tcp:{tcpPort}:interface=127.0.0.1"\n'
        'pool = "echo"\naccept_proxy = true\ndeny = ["203.0.113.0/24"]\n'
    )
    lb = Txlb(config, tmp_path).start(listening=2)

    def tcpAnswer(client: str) -> bytes:
        with socket.create_connection(("127.0.0.1", tcpPort), timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 %s 127.0.0.1 1 2\r\n" % client.encode())
            sock.shutdown(socket.SHUT_WR)
            try:
                return recvAll(sock)
            except ConnectionResetError:
                return b""

    def httpStatus(client: str) -> bytes:
        with socket.create_connection(("127.0.0.1", httpPort), timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 %s 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                         % client.encode())
            return recvAll(sock).split(b"\r\n", 1)[0]

    try:
        # Every connection comes from 127.0.0.1, which no rule names: only the header's client can be denied.
        assert tcpAnswer("192.0.2.1") == b"echo\n"
        assert tcpAnswer("203.0.113.5") == b""
        assert httpStatus("192.0.2.1") == b"HTTP/1.1 200 OK"
        assert httpStatus("203.0.113.5") == b"HTTP/1.1 403 Forbidden"
    finally:
        lb.stop()
        web.stop()
        echo.stop()
