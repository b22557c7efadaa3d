"""
UDP services end to end: C{twistd txlb} in a subprocess on loopback, UDP
echo backends in threads (L{tests.support.UDPBackend}), DNS resolvers on
C{twisted.names} in subprocesses, and clients on plain sockets.  Each
client socket is one flow (its own address and port).  Every wait is for
a condition, with a deadline.
"""

from __future__ import annotations

import json
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from twisted.names import dns

from tests.support import Txlb, UDPBackend, freePort, freeUDPPort, sourceEnv, waitFor

#: Seconds a client waits for one answer.
ANSWER_TIMEOUT = 5.0


def config(port: int, backends, *, admin: int = 0, algorithm: str = "round_robin", health: str = "",
           idle: str = "30s", extra: str = "", poolExtra: str = "") -> str:
    servers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in backends)
    text = (
        f'{extra}\n[pools.echo]\nalgorithm = "{algorithm}"\nservers = [{servers}]\n{health}\n{poolExtra}\n'
        + udpService("echo", port, idle)
    )
    if admin:
        text += f'\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
    return text


def udpService(name: str, port: int, idle: str = "30s") -> str:
    return (
        f'[[services]]\nname = "{name}"\nprotocol = "udp"\nlisten = "udp:{port}:interface=127.0.0.1"\n'
        f'pool = "echo"\ntimeouts = {{ idle = "{idle}" }}\n'
    )


def client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(ANSWER_TIMEOUT)
    return sock


def ask(sock: socket.socket, port: int, data: bytes) -> tuple[str, bytes]:
    """Send C{data} through txlb; the answering backend's name and what it echoed."""
    sock.sendto(data, ("127.0.0.1", port))
    answer, source = sock.recvfrom(65535)
    assert source == ("127.0.0.1", port), "answers come from the service's address"
    name, _, echoed = answer.partition(b":")
    return name.decode(), echoed


def adminPost(port: int, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def adminGet(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def backends():
    made = [UDPBackend("b0", tcp=True), UDPBackend("b1", tcp=True)]
    yield made
    for b in made:
        b.stop()


def test_flows_are_spread_and_each_stays_on_its_server(backends):
    port = freeUDPPort()
    with Txlb(config(port, backends)) as txlb:
        clients = [client() for _ in range(6)]
        seen: dict[int, set] = {}
        for round in range(5):
            for i, sock in enumerate(clients):
                name, echoed = ask(sock, port, b"c%d-r%d" % (i, round))
                assert echoed == b"c%d-r%d" % (i, round)
                seen.setdefault(i, set()).add(name)
        assert all(len(names) == 1 for names in seen.values()), seen
        first = [next(iter(seen[i])) for i in range(len(clients))]
        assert first == ["b0", "b1"] * 3, "round robin, one pick per flow"
        # Each flow is one socket of txlb's on its backend, 5 datagrams each.
        for b in backends:
            assert sorted(b.clients.values()) == [5, 5, 5]
        for sock in clients:
            sock.close()
        assert txlb.events("udp_flow") == []  # still within their idle time


def test_an_idle_flow_ends_with_its_event(backends):
    port = freeUDPPort()
    with Txlb(config(port, backends, idle="500ms")) as txlb:
        sock = client()
        for i in range(3):
            ask(sock, port, b"x" * (10 + i))
        started = time.monotonic()
        [event] = waitFor(lambda: txlb.events("udp_flow"), what="the udp_flow event")
        assert time.monotonic() - started < 5
        assert event["service"] == "echo"
        assert event["pool"] == "echo"
        assert event["selectedServer"] == "b0"
        assert event["client"] == "127.0.0.1"
        assert event["clientPort"] == sock.getsockname()[1]
        assert (event["datagramsIn"], event["datagramsOut"]) == (3, 3)
        assert event["bytesIn"] == 10 + 11 + 12
        assert event["bytesOut"] == event["bytesIn"] + 3 * len("b0:")
        assert event["ended"] == "idle"
        assert event["durationMs"] >= 500
        # The same client address afterwards is a new flow: picked again.
        assert ask(sock, port, b"again")[0] == "b1"
        sock.close()


def test_a_server_whose_health_fails_loses_its_flows_to_the_other(backends):
    port = freeUDPPort()
    health = '[pools.echo.health]\nkind = "tcp"\ninterval = "200ms"\ntimeout = "200ms"\nrise = 1\nfall = 1\n'
    with Txlb(config(port, backends, health=health)) as txlb:
        a, b = client(), client()
        nameA = ask(a, port, b"a1")[0]
        nameB = ask(b, port, b"b1")[0]
        assert {nameA, nameB} == {"b0", "b1"}
        down = next(x for x in backends if x.name == nameA)
        down.closeTCP()
        waitFor(lambda: any(e["server"] == nameA and e["health"] == "unhealthy"
                            for e in txlb.events("server_state")), what=f"{nameA} marked unhealthy")
        # The pinned flow moves at its next datagram; the other flow stays.
        assert ask(a, port, b"a2")[0] == nameB
        assert ask(b, port, b"b2")[0] == nameB
        # New flows go to the healthy server only.
        for _ in range(4):
            with client() as c:
                assert ask(c, port, b"new")[0] == nameB
        [ended] = waitFor(lambda: [e for e in txlb.events("udp_flow") if e["ended"] == "server_down"],
                          what="the moved flow's event")
        assert ended["selectedServer"] == nameA
        assert ended["clientPort"] == a.getsockname()[1]
        a.close()
        b.close()


def test_a_drained_server_keeps_its_flows_and_takes_no_new_ones(backends):
    port, admin = freeUDPPort(), freePort()
    with Txlb(config(port, backends, admin=admin, idle="1s"), ) as txlb:
        waitFor(lambda: len(txlb.events("listening")) >= 2, what="the admin API")
        a = client()
        assert ask(a, port, b"a1")[0] == "b0"
        adminPost(admin, "/api/pools/echo/servers/b0/drain")
        assert ask(a, port, b"a2")[0] == "b0"  # the flow keeps its server
        for _ in range(4):
            with client() as c:
                assert ask(c, port, b"new")[0] == "b1"
        pools = json.loads(adminGet(admin, "/api/pools"))
        text = json.dumps(pools)
        assert "draining" in text
        a.close()
        waitFor(lambda: txlb.events("server_drained"), what="b0 drained once its flow went idle")
        # The flow's access line may follow the drain's by up to a flush (txlb.observe.logs).
        [event] = waitFor(lambda: [e for e in txlb.events("udp_flow") if e["selectedServer"] == "b0"],
                          what="the drained server's flow event")
        assert event["datagramsIn"] == 2


def test_ten_thousand_datagrams_at_a_steady_rate_none_lost(backends):
    port, admin = freeUDPPort(), freePort()
    total, flows, rate, window = 10_000, 4, 2_500.0, 32
    with Txlb(config(port, backends, admin=admin, extra="[log]\naccess = false\n")) as txlb:
        waitFor(lambda: len(txlb.events("listening")) >= 2, what="the admin API")
        socks = [client() for _ in range(flows)]
        for s in socks:
            s.setblocking(False)
        target = ("127.0.0.1", port)
        sent = [0] * flows
        received: list[set] = [set() for _ in range(flows)]
        started = time.monotonic()
        deadline = started + 60
        perFlow = total // flows
        while time.monotonic() < deadline:
            due = int((time.monotonic() - started) * rate)  # the steady rate: datagrams due by now
            for i, s in enumerate(socks):
                while (sent[i] < perFlow and sum(sent) < due
                       and sent[i] - len(received[i]) < window):
                    s.sendto(b"%d-%d" % (i, sent[i]), target)
                    sent[i] += 1
            readable, _, _ = select.select(socks, [], [], 0.005)
            for s in readable:
                i = socks.index(s)
                while True:
                    try:
                        data = s.recv(65535)
                    except BlockingIOError:
                        break
                    received[i].add(data)
            if all(len(r) == perFlow for r in received):
                break
        elapsed = time.monotonic() - started
        got = sum(len(r) for r in received)
        assert got == total, f"{total - got} datagrams lost ({sum(sent)} sent in {elapsed:.1f}s)"
        for i, r in enumerate(received):
            names = {d.split(b":")[0] for d in r}
            assert len(names) == 1, "every datagram of a flow reaches one server"
            assert {d.split(b":", 1)[1] for d in r} == {b"%d-%d" % (i, n) for n in range(perFlow)}
        assert elapsed >= total / rate * 0.9, "the rate was bounded"
        metrics = adminGet(admin, "/metrics")
        inbound = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("txlb_udp_datagrams_total{") and 'direction="in"' in line)
        assert inbound == total
        assert 'txlb_udp_dropped_total{reason="send",service="echo"} 0.0' in metrics
        for s in socks:
            s.close()


RESOLVER = r"""
import sys
from twisted.internet import defer, reactor
from twisted.names import common, dns, error, server

class One(common.ResolverBase):
    def __init__(self, address):
        common.ResolverBase.__init__(self)
        self.address = address

    def _lookup(self, name, cls, type, timeout):
        if name.lower() == b"svc.test" and type == dns.A:
            rr = dns.RRHeader(name, dns.A, dns.IN, 5, dns.Record_A(self.address, 5), auth=True)
            return defer.succeed(([rr], [], []))
        return defer.fail(error.DomainError(name))

factory = server.DNSServerFactory(authorities=[One(sys.argv[1])])
factory.noisy = False
protocol = dns.DNSDatagramProtocol(factory)
protocol.noisy = False
port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


class Resolver:
    """A twisted.names server answering C{svc.test A} with C{address}, in a subprocess."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.answer = address
        self.process = subprocess.Popen([sys.executable, "-c", RESOLVER, address], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=sourceEnv())
        ready, _, _ = select.select([self.process.stdout], [], [], 20)
        assert ready, "the resolver did not start"
        self.port = int(self.process.stdout.readline())
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


def query(port: int, name: bytes, id: int) -> dns.Message:
    message = dns.Message(id=id, recDes=0)
    message.queries = [dns.Query(name, dns.A, dns.IN)]
    with client() as sock:
        sock.sendto(message.toStr(), ("127.0.0.1", port))
        data, _ = sock.recvfrom(65535)
    answer = dns.Message()
    answer.fromStr(data)
    return answer


def test_dns_queries_are_balanced_over_two_resolvers():
    resolvers = [Resolver("r1", "192.0.2.1"), Resolver("r2", "192.0.2.2")]
    try:
        port = freeUDPPort()
        with Txlb(config(port, resolvers, idle="2s")) as txlb:
            answers = []
            for i in range(6):
                message = query(port, b"svc.test", 1000 + i)
                assert message.id == 1000 + i and message.answer
                [record] = message.answers
                answers.append(record.payload.dottedQuad())
            assert answers == ["192.0.2.1", "192.0.2.2"] * 3
            missing = query(port, b"other.test", 7)
            assert missing.rCode == dns.ENAME
            events = waitFor(lambda: len(txlb.events("udp_flow")) == 7 and txlb.events("udp_flow"),
                             what="seven flows ended")
            assert sorted(e["selectedServer"] for e in events) == ["r1"] * 4 + ["r2"] * 3
            assert all((e["datagramsIn"], e["datagramsOut"]) == (1, 1) for e in events)
    finally:
        for r in resolvers:
            r.stop()


def udpStats(admin: int, service: str = "echo") -> dict:
    """The C{udp} part of C{service} in C{/api/stats} (and how many workers answered), or {} while unreachable."""
    try:
        stats = json.loads(adminGet(admin, "/api/stats?history=0"))
    except OSError:
        return {}
    [entry] = [s for s in stats["services"] if s["name"] == service]
    return {**entry["udp"], "workers": stats.get("workers"), "activeConnections": entry["activeConnections"]}


def test_two_workers_serve_udp_and_keep_each_flow_on_one_server(backends):
    port, admin = freeUDPPort(), freePort()
    with Txlb(config(port, backends, admin=admin, idle="1s", extra="[txlb]\nworkers = 2\n")) as txlb:
        waitFor(lambda: len(txlb.events("worker_started")) == 2, what="two workers")
        clients = [client() for _ in range(16)]
        names: dict[int, set] = {}
        sent = 0
        for round in range(4):
            for i, sock in enumerate(clients):
                name, echoed = ask(sock, port, b"%d-%d" % (i, round))
                assert echoed == b"%d-%d" % (i, round)
                names.setdefault(i, set()).add(name)
                sent += len(echoed)
        assert all(len(n) == 1 for n in names.values()), names
        # The master's /api/stats adds up both workers' figures, by server.
        seen = waitFor(lambda: (s := udpStats(admin)).get("workers") == 2 and s, what="both workers' figures")
        assert (seen["datagramsIn"], seen["datagramsOut"]) == (64, 64)
        assert (seen["bytesIn"], seen["bytesOut"]) == (sent, sent + 64 * len("b0:"))
        assert seen["flows"] == seen["activeConnections"] <= 16  # those not yet idle
        flowsOf = {b.name: sum(1 for n in names.values() if n == {b.name}) for b in backends}
        assert {s["server"]: s["datagramsIn"] for s in seen["servers"]} == {n: 4 * k for n, k in flowsOf.items() if k}
        events = waitFor(lambda: len(txlb.events("udp_flow")) == 16 and txlb.events("udp_flow"),
                         what="every flow's event")
        ended = waitFor(lambda: (s := udpStats(admin)).get("workers") == 2 and s["flows"] == 0 and s,
                        what="no live flows in either worker")
        assert (ended["datagramsIn"], ended["datagramsOut"], ended["bytesIn"]) == (64, 64, sent)
        assert {e["worker"] for e in events} == {0, 1}, "the kernel spread the flows over both workers"
        byPort = {e["clientPort"]: e for e in events}
        for i, sock in enumerate(clients):
            event = byPort[sock.getsockname()[1]]
            assert event["datagramsIn"] == 4, "all of a flow's datagrams reached one worker"
            assert {event["selectedServer"]} == names[i]
            sock.close()


def test_a_reload_adds_and_removes_udp_services(backends):
    first, second = freeUDPPort(), freeUDPPort()
    text = config(first, backends[:1])
    with Txlb(text) as txlb:
        with client() as c:
            assert ask(c, first, b"1")[0] == "b0"
        txlb.configPath.write_text(text + udpService("echo2", second))
        txlb.process.send_signal(signal.SIGHUP)
        waitFor(lambda: txlb.events("config_reloaded"), what="the reload")
        with client() as c:
            assert ask(c, second, b"2")[0] == "b0"
        txlb.configPath.write_text(text.split("[[services]]")[0] + udpService("echo2", second))
        txlb.process.send_signal(signal.SIGHUP)
        waitFor(lambda: len(txlb.events("config_reloaded")) == 2, what="the second reload")
        assert [e["listen"] for e in txlb.events("stopped_listening")] == [f"udp:{first}:interface=127.0.0.1"]
        with client() as c:
            c.settimeout(0.5)
            with pytest.raises(OSError):  # refused (ICMP) or no answer: nothing listens there now
                ask(c, first, b"3")
            c.settimeout(ANSWER_TIMEOUT)
            assert ask(c, second, b"4")[0] == "b0"


def _nginxStream() -> tuple[str | None, str]:
    """nginx and the C{load_module} line its stream module needs (C{""} when built in), or L{None}."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        return None, ""
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    if "--with-stream " in built + " ":
        return nginx, ""
    module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    return (nginx, f"load_module {module};") if module.exists() else (None, "")


NGINX, _LOAD_STREAM = _nginxStream()


@pytest.mark.skipif(NGINX is None, reason="nginx with its stream module is not installed (libnginx-mod-stream)")
def test_nginx_stream_in_front_of_txlb_gets_every_answer(backends, tmp_path):
    """
    nginx's UDP proxy (a real peer) talks to txlb from connected sockets,
    which drop any answer not from the address they sent to: every answer
    arriving proves txlb answers each flow from the service's address.
    Each nginx session is a flow of txlb's, spread over both servers.
    """
    port, front = freeUDPPort(), freeUDPPort()
    (tmp_path / "nginx.conf").write_text(
        f"{_LOAD_STREAM}\nworker_processes 1;\ndaemon off;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log info;\nevents {{ worker_connections 64; }}\n"
        f"stream {{\n  server {{\n    listen 127.0.0.1:{front} udp;\n    proxy_pass 127.0.0.1:{port};\n"
        f"    proxy_responses 1;\n    proxy_timeout 5s;\n  }}\n}}\n"
    )
    with Txlb(config(port, backends)) as txlb:
        nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            names = []
            for i in range(8):
                sock = client()
                deadline = time.monotonic() + 15
                while True:  # until nginx listens: a datagram to a closed port is lost, not refused
                    sock.sendto(b"q%d" % i, ("127.0.0.1", front))
                    ready, _, _ = select.select([sock], [], [], 0.5)
                    if ready or time.monotonic() > deadline:
                        break
                answer, source = sock.recvfrom(65535)
                assert source == ("127.0.0.1", front)
                name, _, echoed = answer.partition(b":")
                assert echoed == b"q%d" % i
                names.append(name.decode())
                sock.close()
            assert sorted(set(names)) == ["b0", "b1"]
        finally:
            nginx.terminate()
            nginx.wait(10)
        assert txlb.process.poll() is None
