"""
Active health checks end to end: real backends on loopback whose health the
test flips, and a small Twisted program in a subprocess that runs a real
L{Pool} and L{HealthChecks} on the real reactor and prints, as JSON lines,
every event and the pool's state every few milliseconds.

(The checks are wired into C{twistd txlb} elsewhere; this proves the checks
themselves, with real sockets and real time.)  Every wait is for a condition,
with a deadline.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.support import ROOT, Backend, freePort, sourceEnv, waitFor
from txlb.health import JITTER

PLUGIN_EXAMPLE = ROOT / "tests" / "health_plugin_example"

PROGRAM = r'''
import json, sys, time
from types import MappingProxyType

from twisted.internet import reactor, stdio
from twisted.internet.task import LoopingCall
from twisted.logger import globalLogPublisher
from twisted.protocols.basic import LineReceiver

from txlb.balance.pool import Pool, Server
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.config import HealthConfig
from txlb.health import HealthChecks, healthCheckFactories
from txlb.net.endpoints import EndpointCache, serverAddress

spec = json.loads(sys.argv[1])


def emit(record):
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def observe(event):
    if "event" in event:
        emit({k: v for k, v in event.items() if not k.startswith("log_")} | {"t": event["log_time"]})


globalLogPublisher.addObserver(observe)
health = dict(spec["health"])
health["expect_status"] = tuple(health.get("expect_status", (200,)))
health["expect_json"] = MappingProxyType({k: tuple(v) for k, v in health.get("expect_json", {}).items()})
health["options"] = MappingProxyType(health.get("options", {}))
config = HealthConfig(**health)
servers = [Server(s["name"], serverAddress(s["address"])) for s in spec["servers"]]
pool = Pool("p", "round_robin", RoundRobin(), servers, reactor)
checks = HealthChecks(pool, config, EndpointCache(reactor), reactor, healthCheckFactories())
checks.startService()


def state():
    emit({
        "event": "pool", "t": time.time(),
        "states": {s.name: s.state.value for s in pool},
        "eligible": sorted(s.name for s in pool.eligible()),
    })


class Commands(LineReceiver):
    delimiter = b"\n"

    def lineReceived(self, line):
        command = json.loads(line)
        if "add" in command:
            pool.add(Server(command["add"]["name"], serverAddress(command["add"]["address"])))
        elif "remove" in command:
            pool.remove(pool.server(command["remove"]))

    def connectionLost(self, reason):
        checks.stopService()
        emit({"event": "stopped", "timers": len(reactor.getDelayedCalls())})
        reactor.stop()


stdio.StandardIO(Commands())
LoopingCall(state).start(0.02)
emit({"event": "ready", "kinds": sorted(healthCheckFactories())})
reactor.run()
'''


class Checked:
    """The program above, running; its lines collected by a thread."""

    def __init__(self, tmp: Path, servers, env: Optional[dict] = None, **health) -> None:
        script = tmp / "checked.py"
        script.write_text(PROGRAM)
        spec = {"servers": [{"name": n, "address": a} for n, a in servers], "health": health}
        self.lines: list[dict] = []
        self.process = subprocess.Popen(
            [sys.executable, str(script), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env or sourceEnv(), cwd=tmp,
        )
        self.other: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        waitFor(lambda: self.events("ready") or self.process.poll() is not None, what="the program")
        if not self.events("ready"):
            self.reader.join(5)
            raise AssertionError(b"".join(self.other).decode())

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.other.append(line)

    def events(self, kind: str, **match) -> list[dict]:
        return [
            e for e in list(self.lines)
            if e.get("event") == kind and all(e.get(k) == v for k, v in match.items())
        ]

    def waitEvent(self, kind: str, timeout: float = 10.0, after: float = 0.0, **match) -> dict:
        return waitFor(
            lambda: [e for e in self.events(kind, **match) if e["t"] >= after],
            timeout=timeout, what=f"{kind} {match}",
        )[0]

    def state(self) -> dict:
        pools = self.events("pool")
        return pools[-1] if pools else {}

    def send(self, command: dict) -> None:
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        self.process.stdin.flush()

    def stop(self) -> dict:
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the program did not stop")
        self.reader.join(5)
        return self.events("stopped")[0]


class HealthyBackend(Backend):
    """An HTTP backend whose C{/health} answer the test sets."""

    def __init__(self, name: str, status: int = 200, body: bytes = b'{"status": "ok"}') -> None:
        self.status, self.body = status, body
        self.checks = 0
        super().__init__(name, answerHealth)


def answerHealth(sock: socket.socket, backend: HealthyBackend) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = sock.recv(4096)
        if not chunk:
            return
        request += chunk
    assert request.startswith(b"GET /health HTTP/1.1\r\n") and b"\r\nConnection: close\r\n" in request
    backend.checks += 1
    status, body = backend.status, backend.body
    sock.sendall(
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n".encode() + body
    )


@pytest.fixture
def programs():
    started: list[Checked] = []
    yield started
    for p in started:
        if p.process.poll() is None:
            p.process.kill()
            p.process.wait()


@pytest.fixture
def backends():
    made: list[Backend] = []
    yield made
    for b in made:
        b.stop()


INTERVAL = 0.2
SLACK = 0.3  # scheduling and a loaded test machine


def test_a_failing_health_endpoint_leaves_rotation_in_time_and_comes_back(tmp_path, programs, backends):
    one, two = HealthyBackend("server-1"), HealthyBackend("server-2")
    backends += [one, two]
    rise, fall = 2, 3
    p = Checked(tmp_path, [("server-1", one.address), ("server-2", two.address)],
                kind="http", interval=INTERVAL, timeout=0.15, rise=rise, fall=fall)
    programs.append(p)
    waitFor(lambda: one.checks >= 2 and two.checks >= 2, what="checks to run")
    assert p.state()["eligible"] == ["server-1", "server-2"]

    two.status, two.body = 503, b'{"status": "unhealthy", "database": "timeout"}'
    flipped = time.time()
    down = p.waitEvent("server_state", server="server-2", health="unhealthy")
    assert down["action"] == "removed_from_rotation" and down["pool"] == "p"
    assert down["reason"] == '3 consecutive failures: HTTP 503 {"status": "unhealthy", "database": "timeout"}'
    assert down["t"] - flipped <= (fall + 1) * INTERVAL * (1 + JITTER) + SLACK
    waitFor(lambda: [s for s in p.events("pool") if s["t"] > down["t"]], what="a state after")
    after = [s for s in p.events("pool") if s["t"] > down["t"]]
    assert all(s["eligible"] == ["server-1"] and s["states"]["server-2"] == "down" for s in after)

    two.status, two.body = 200, b'{"status": "ok"}'
    healed = time.time()
    up = p.waitEvent("server_state", server="server-2", health="healthy")
    assert (up["action"], up["reason"]) == ("added_to_rotation", "2 consecutive passes")
    assert up["t"] - healed <= (rise + 1) * INTERVAL * (1 + JITTER) + SLACK
    waitFor(lambda: p.state()["t"] > up["t"] and p.state()["eligible"] == ["server-1", "server-2"])
    assert not p.events("server_state", server="server-1")

    stopped = p.stop()
    assert stopped["timers"] <= 1  # the state printer's own timer only


def test_expect_json_keeps_out_a_server_that_is_only_healthy(tmp_path, programs, backends):
    ready = HealthyBackend("ready", body=b'{"status": "ready"}')
    healthy = HealthyBackend("healthy", body=b'{"status": "healthy"}')
    backends += [ready, healthy]
    p = Checked(tmp_path, [("ready", ready.address), ("healthy", healthy.address)],
                kind="http", interval=0.1, timeout=0.1, rise=1, fall=2,
                expect_json={"status": ["ready"]})
    programs.append(p)
    down = p.waitEvent("server_state", server="healthy")
    assert down["reason"] == (
        '2 consecutive failures: HTTP 200 status = "healthy", expected one of ["ready"]: {"status": "healthy"}'
    )
    waitFor(lambda: ready.checks >= 4)
    assert p.state()["eligible"] == ["ready"]
    assert not p.events("server_state", server="ready")
    p.stop()


def test_servers_added_at_run_time_join_only_after_passing(tmp_path, programs, backends):
    base, good, bad = HealthyBackend("base"), HealthyBackend("good"), HealthyBackend("bad", status=500)
    backends += [base, good, bad]
    p = Checked(tmp_path, [("base", base.address)], kind="http", interval=0.1, timeout=0.1, rise=2, fall=2)
    programs.append(p)
    p.send({"add": {"name": "bad", "address": bad.address}})
    p.send({"add": {"name": "good", "address": good.address}})
    added = p.waitEvent("server_added", server="good")
    assert (added["healthCheck"], added["action"]) == ("passed", "added_to_load_balancer_pool")
    # Before it passed twice, it was checking and out of rotation.
    before = [s for s in p.events("pool") if "good" in s["states"] and s["t"] < added["t"]]
    assert before and all(s["states"]["good"] == "checking" and "good" not in s["eligible"] for s in before)
    p.waitEvent("server_state", server="bad", health="unhealthy")
    waitFor(lambda: bad.checks >= 5, what="more checks of bad")
    assert not p.events("server_added", server="bad")
    assert all("bad" not in s["eligible"] for s in p.events("pool"))
    # A removed server is not checked any more.
    p.send({"remove": "bad"})
    waitFor(lambda: "bad" not in p.state().get("states", {"bad": 1}), what="bad removed")
    checked, baseChecked = bad.checks, base.checks
    waitFor(lambda: base.checks >= baseChecked + 5, what="five more rounds")
    assert bad.checks <= checked + 1  # at most one that was under way
    p.stop()


def listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s


def test_tcp_check_follows_a_port_that_closes_and_opens(tmp_path, programs):
    port = freePort()
    sock = listener(port)
    try:
        p = Checked(tmp_path, [("db-1", f"127.0.0.1:{port}")], kind="tcp", interval=0.1, timeout=0.1, rise=2, fall=2)
        programs.append(p)
        sock.close()
        down = p.waitEvent("server_state", server="db-1", health="unhealthy")
        assert down["reason"] == "2 consecutive failures: connection refused"
        sock = listener(port)
        up = p.waitEvent("server_state", server="db-1", health="healthy")
        assert up["reason"] == "2 consecutive passes"
        p.stop()
    finally:
        sock.close()


def test_a_server_that_never_answers_times_out(tmp_path, programs):
    port = freePort()
    sock = listener(port)  # accepts (the kernel does), never answers
    try:
        p = Checked(tmp_path, [("slow", f"127.0.0.1:{port}")], kind="http", interval=0.1, timeout=0.05, rise=1, fall=3)
        programs.append(p)
        down = p.waitEvent("server_state", server="slow")
        assert down["reason"] == "3 consecutive failures: no answer within 50ms"
        stopped = p.stop()
        assert stopped["timers"] <= 1
    finally:
        sock.close()


def test_plugin_kind_from_a_separate_directory(tmp_path, programs, backends):
    """
    The example plugin of docs/health.md, copied to a directory of its own
    and put on PYTHONPATH, is found by its kind and its options reach it.
    """
    site = tmp_path / "site"
    shutil.copytree(PLUGIN_EXAMPLE, site)
    assert not (site / "twisted" / "__init__.py").exists()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()
    env = sourceEnv()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"

    def redisLike(answer: bytes):
        def handle(sock: socket.socket, backend: Backend) -> None:
            if sock.recv(64) == b"PING\r\n":
                sock.sendall(answer)
        return handle

    pong = Backend("pong", redisLike(b"+PONG\r\n"))
    loading = Backend("loading", redisLike(b"-LOADING Redis is loading the dataset in memory\r\n"))
    backends += [pong, loading]
    p = Checked(tmp_path, [("pong", pong.address), ("loading", loading.address)], env=env,
                kind="send_expect", interval=0.1, timeout=0.1, rise=1, fall=2,
                options={"send": "PING\r\n", "expect": "+PONG"})
    programs.append(p)
    assert p.events("ready")[0]["kinds"] == ["grpc", "http", "send_expect", "tcp"]
    down = p.waitEvent("server_state", server="loading")
    assert down["reason"] == "2 consecutive failures: answered '-LOADING Redis is loading the dataset in memory'"
    waitFor(lambda: pong.connections >= 3)
    assert p.state()["eligible"] == ["pong"]
    p.stop()


THOUSAND = r'''
import json, statistics, sys, time
from twisted.internet import protocol, reactor
from twisted.internet.task import LoopingCall
from txlb.balance.pool import Pool, Server
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.config import HealthConfig
from txlb.health import HealthChecks, healthCheckFactories
from txlb.net.endpoints import EndpointCache

n, interval, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])


class Answer(protocol.Protocol):
    def dataReceived(self, data):
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.loseConnection()


port = reactor.listenTCP(0, protocol.Factory.forProtocol(Answer), backlog=4096, interface="127.0.0.1")
address = f"tcp:host=127.0.0.1:port={port.getHost().port}"
pool = Pool("p", "round_robin", RoundRobin(), [Server(f"s{i}", address) for i in range(n)], reactor)
config = HealthConfig(kind="http", interval=interval, timeout=interval, rise=1, fall=1)
checks = HealthChecks(pool, config, EndpointCache(reactor), reactor, healthCheckFactories())
checks.startService()
lags, last, worst = [], [time.monotonic()], [0.0]


def tick():
    now = time.monotonic()
    worst[0] = max(worst[0], now - last[0] - 0.01)
    last[0] = now


def second():
    lags.append(worst[0])
    worst[0] = 0.0


def done():
    checks.stopService()
    print(json.dumps({
        "medianWorstLagMs": statistics.median(lags) * 1000, "passed": checks.passed,
        "failed": checks.failed, "up": len(pool.eligible()),
    }), flush=True)
    reactor.stop()


LoopingCall(tick).start(0.01)
LoopingCall(second).start(1.0, now=False)
reactor.callLater(seconds, done)
reactor.run()
'''


def test_a_thousand_servers_do_not_stall_the_reactor(tmp_path):
    """
    A thousand servers checked every second by one process (which also
    answers the checks): every check passes in time, and a 10 ms timer in
    the same reactor is, in a typical second, never badly late.  (Spread
    checks keep it within a few tens of milliseconds on an idle machine;
    the bound leaves room for a busy one and still catches a stall.  The
    spread itself is proven exactly on a Clock in test_health.)
    """
    script = tmp_path / "thousand.py"
    script.write_text(THOUSAND)
    out = subprocess.run(
        [sys.executable, str(script), "1000", "1.0", "4.5"],
        capture_output=True, env=sourceEnv(), timeout=60, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr.decode()
    summary = json.loads(out.stdout.splitlines()[-1])
    assert summary["failed"] == 0 and summary["up"] == 1000, summary
    assert summary["passed"] >= 3500, summary
    assert summary["medianWorstLagMs"] < 150, summary


def selfSigned(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certPath, keyPath = directory / "backend.pem", directory / "backend.key"
    certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyPath.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return certPath, keyPath


class TLSBackend(HealthyBackend):
    """A HealthyBackend behind TLS; C{handshakes} counts completed ones."""

    def __init__(self, name: str, cert: Path, key: Path) -> None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.handshakes = 0

        def handle(sock: socket.socket, backend: "TLSBackend") -> None:
            try:
                tls = context.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                return
            backend.handshakes += 1
            answerHealth(tls, backend)

        HealthyBackend.__init__(self, name)
        self.handler = handle


def test_tls_checks(tmp_path, programs, backends):
    """
    tcp with tls = true passes on a completed handshake and fails on a
    server that does not speak TLS or whose certificate is not trusted;
    http with tls = true is an HTTPS check.
    """
    cert, key = selfSigned(tmp_path)
    secure, plain = TLSBackend("secure", cert, key), Backend("plain")  # says its name: not TLS
    backends += [secure, plain]
    servers = [("secure", secure.address), ("plain", plain.address)]
    timing = dict(interval=0.1, timeout=0.1, rise=1, fall=2)

    p = Checked(tmp_path, servers, kind="tcp", options={"tls": True, "ca": str(cert)}, **timing)
    programs.append(p)
    down = p.waitEvent("server_state", server="plain")
    assert down["reason"].startswith("2 consecutive failures: ")
    assert "TLS" in down["reason"], down["reason"]
    waitFor(lambda: secure.handshakes >= 3, what="handshakes")
    assert not p.events("server_state", server="secure")
    p.stop()

    p = Checked(tmp_path, servers[:1], kind="tcp", options={"tls": True}, **timing)  # the system's CAs
    programs.append(p)
    down = p.waitEvent("server_state", server="secure")
    assert down["reason"] == "2 consecutive failures: TLS failed: certificate verify failed", down["reason"]
    p.stop()

    p = Checked(tmp_path, servers[:1], kind="tcp", options={"tls": True, "verify": False}, **timing)
    programs.append(p)
    seen = secure.handshakes
    waitFor(lambda: secure.handshakes >= seen + 3, what="handshakes")
    assert not p.events("server_state")
    p.stop()

    p = Checked(tmp_path, servers[:1], kind="http", options={"tls": True, "ca": str(cert), "server_name": "localhost"},
                **timing)
    programs.append(p)
    waitFor(lambda: secure.checks >= 2, what="HTTPS checks")
    secure.status = 500
    down = p.waitEvent("server_state", server="secure")
    assert down["reason"].startswith("2 consecutive failures: HTTP 500"), down["reason"]
    p.stop()
