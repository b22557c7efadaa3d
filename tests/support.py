"""
Helpers for the integration tests: free loopback ports, real backends in
threads, and txlb itself started as C{twistd} in a subprocess.

Waiting here is always for a condition (a port accepting, an event in the
log) with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent


#: Ports L{freePort} handed out already in this test process.
_handedOut: set[int] = set()


def freePort() -> int:
    """
    A TCP port free on 127.0.0.1 now, and not one this process was given
    before: the kernel may offer a port again as soon as it was closed, so
    two ports asked for in a row (one config's services) could be the same.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handedOut:
            _handedOut.add(port)
            return port


def waitFor(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition"):
    """Poll C{condition} until it returns something true, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def twistdCommand(*args: str) -> list[str]:
    """C{twistd} from this interpreter's environment."""
    script = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    return [sys.executable, "-c", script, *args]


def sourceEnv() -> dict[str, str]:
    """
    The environment for a subprocess that must run this source tree's txlb
    (and find its twisted/plugins) whatever the working directory.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Backend:
    """
    A real TCP server on 127.0.0.1 run in a thread.

    C{handler(sock, backend)} serves one connection; the default sends the
    backend's name and a newline, then echoes until EOF.
    """

    def __init__(self, name: str, handler: Optional[Callable[[socket.socket, "Backend"], None]] = None):
        self.name = name
        self.handler = handler or nameThenEcho
        self.connections = 0
        self.lock = threading.Lock()
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with backend.lock:
                    backend.connections += 1
                try:
                    backend.handler(self.request, backend)
                except OSError:
                    pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def nameThenEcho(sock: socket.socket, backend: Backend) -> None:
    sock.sendall(backend.name.encode() + b"\n")
    while True:
        data = sock.recv(65536)
        if not data:
            break
        sock.sendall(data)


def httpRequests(sock: socket.socket):
    """
    Each request head (without its blank line) read from C{sock}, for
    backends of HTTP tests; request bodies are not expected.
    """
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        yield head


def httpAnswer(sock: socket.socket, status: int, body: bytes) -> None:
    """Send one HTTP/1.1 response with a Content-Length body."""
    sock.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))


def recvLine(sock: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        out += chunk
    return out


def recvAll(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class Txlb:
    """
    C{twistd -n txlb --config FILE} in a subprocess, its JSON events
    collected from stdout.
    """

    def __init__(self, config: str, directory: Optional[Path] = None):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="txlb-test-"))
        self.configPath = self.dir / "txlb.toml"
        self.configPath.write_text(config)
        self.logPath = self.dir / "txlb.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self, listening: int = 1) -> "Txlb":
        """Start and wait until C{listening} services are listening."""
        self._log = open(self.logPath, "wb")
        self.process = subprocess.Popen(
            twistdCommand("-n", "--pidfile=", "txlb", "--config", str(self.configPath)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env=sourceEnv(),
        )
        waitFor(
            lambda: self.process.poll() is not None
            or len(self.events("listening")) >= listening,
            what="txlb to listen",
        )
        if self.process.poll() is not None:
            raise AssertionError(f"txlb exited {self.process.returncode}:\n{self.logPath.read_text()}")
        return self

    def events(self, kind: Optional[str] = None) -> list[dict]:
        out = []
        for line in self.logPath.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if kind is None or event.get("event") == kind:
                out.append(event)
        return out

    def requestEvent(self, requestId: str) -> dict:
        """The C{request} event of C{requestId}, once it has been written."""

        def find():
            for e in self.events("request"):
                if e["requestId"] == requestId:
                    return e
            return None

        return waitFor(find, what=f"the request event of {requestId}")

    def rss(self) -> int:
        """Resident memory of the txlb process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()
        return self.process.returncode if self.process else 0

    def __enter__(self) -> "Txlb":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def poolToml(name: str, backends: Iterable[Backend], algorithm: str = "round_robin", extra: str = "") -> str:
    servers = ",\n".join(
        f'  {{ name = "{b.name}", address = "{b.address}" }}' for b in backends
    )
    return f'[pools.{name}]\nalgorithm = "{algorithm}"\nservers = [\n{servers}\n]\n{extra}\n'


def tcpServiceToml(name: str, port: int, pool: str, extra: str = "") -> str:
    return (
        f'[[services]]\nname = "{name}"\nprotocol = "tcp"\n'
        f'listen = "tcp:{port}:interface=127.0.0.1"\npool = "{pool}"\n{extra}\n'
    )


def freeUDPPort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UDPBackend:
    """
    A UDP server on 127.0.0.1 run in a thread: answers each datagram with
    the backend's name, C{:}, and the datagram.  C{clients} counts the
    datagrams from each client address (txlb's flow sockets).  With
    C{tcp}, it also accepts TCP connections on the same port number, for a
    C{kind = "tcp"} health check; L{closeTCP} makes that check fail.
    """

    def __init__(self, name: str, tcp: bool = False) -> None:
        self.name = name
        self.clients: dict[tuple, int] = {}
        self.lock = threading.Lock()
        self.tcp: Optional[_Server] = None
        for _ in range(50):  # a port number free for both UDP and TCP
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
            if not tcp:
                break
            try:
                self.tcp = _Server(("127.0.0.1", self.port), socketserver.BaseRequestHandler)
                break
            except OSError:
                self.sock.close()
        else:
            raise AssertionError("no port number free for both UDP and TCP")
        self.address = f"127.0.0.1:{self.port}"
        if self.tcp is not None:
            threading.Thread(target=self.tcp.serve_forever, daemon=True).start()
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        prefix = self.name.encode() + b":"
        self.sock.settimeout(0.2)
        while self.running:
            try:
                data, address = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.clients[address] = self.clients.get(address, 0) + 1
            self.sock.sendto(prefix + data, address)

    @property
    def datagrams(self) -> int:
        with self.lock:
            return sum(self.clients.values())

    def closeTCP(self) -> None:
        if self.tcp is not None:
            self.tcp.shutdown()
            self.tcp.server_close()
            self.tcp = None

    def stop(self) -> None:
        self.running = False
        self.closeTCP()
        self.thread.join(5)
        self.sock.close()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


class DocExample:
    """
    A plugin example shown in a doc page: the doc must show the very file
    the tests install, and the tests it shows must pass.  Blocks are marked
    in the doc with C{<!-- NAME -->} before and C{<!-- end of NAME -->} after.
    """

    def __init__(self, doc: Path, example: Path) -> None:
        self.doc = doc
        self.example = example

    def block(self, marker: str) -> str:
        import re

        match = re.search(
            rf"<!-- {re.escape(marker)}[^>]*-->\n```python\n(.*?)```\n<!-- end of {re.escape(marker)} -->",
            self.doc.read_text(),
            re.S,
        )
        assert match, f"no {marker!r} block in {self.doc.name}"
        return match.group(1)

    def load(self):
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"{self.example.stem}_example", self.example)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def tests(self, name: str) -> list[tuple[str, Callable]]:
        """The doc's test functions, run with the example's C{name} in scope."""
        namespace = {name: getattr(self.load(), name)}
        exec(compile(self.block("the example tests"), str(self.doc), "exec"), namespace)
        return sorted((n, f) for n, f in namespace.items() if n.startswith("test_"))

    def checkShownVerbatim(self) -> None:
        assert self.block("the example plugin") == self.example.read_text()

    def checkNamespaceDirectories(self) -> None:
        """twisted/ and twisted/plugins/ must stay namespace directories."""
        site = self.example.parent.parent.parent
        assert not (site / "twisted" / "__init__.py").exists()
        assert not (site / "twisted" / "plugins" / "__init__.py").exists()


class RedisServer:
    """A throwaway C{redis-server} on 127.0.0.1, persisting nothing."""

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or freePort()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while self.command("PING") != "PONG":
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError("redis-server did not start")
            time.sleep(0.02)

    @property
    def address(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def command(self, *args: str) -> str:
        """Run one command with redis-cli; its output, stripped."""
        try:
            out = subprocess.run(
                ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=5,
            )
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        """Die at once, as a crashed server does."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def tcpPair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection, both non-blocking."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    for s in (outer, inner):
        s.setblocking(False)
    return outer, inner


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
needsHAProxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (run-tests installs it)")


class HAProxy:
    """
    C{haproxy -f cfg -db} in a subprocess, loopback only: a real peer
    (PROXY protocol sender and receiver, HTTP/2 client and server).
    C{sections} follow a C{defaults} of C{mode tcp}; a section may say
    C{mode http}.
    """

    def __init__(self, directory: Path, sections: str, ports: list[int]) -> None:
        self.cfg = directory / "haproxy.cfg"
        self.cfg.write_text(
            "global\n  maxconn 200\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
            + sections
        )
        self.log = open(directory / "haproxy.log", "wb")
        self.process = subprocess.Popen([HAPROXY, "-f", str(self.cfg), "-db"], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        for port in ports:
            waitFor(lambda: self.process.poll() is not None or accepts(port), what=f"haproxy on {port}")
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited: {(directory / 'haproxy.log').read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.log.close()


def accepts(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:C{port}."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
