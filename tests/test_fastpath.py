"""
L{txlb.net.fastpath}: Twisted's private names are checked before they are
used, and without them (or with C{TXLB_FAST_PATH=0}) txlb takes Twisted's
public road: the reactor reads, C{transport.write} writes, bodies are
copied.  C{run-tests} also runs the whole integration suite that way.
"""

from __future__ import annotations

import ast
import hashlib
import socket
from pathlib import Path

import pytest
import twisted
from twisted.internet import abstract, tcp

import txlb

from tests.support import Backend, Txlb, freePort, httpAnswer, httpRequests, waitFor
from tests.test_wire import pair  # noqa: F401 (a fixture)
from txlb.net import fastpath, readloop, wire


@pytest.fixture(autouse=True)
def decideAfresh(monkeypatch):
    monkeypatch.delenv(fastpath.ENVIRONMENT, raising=False)
    fastpath.reset()
    yield
    fastpath.reset()


def test_this_twisted_has_what_the_fast_path_needs(events):
    assert fastpath.missing() is None
    assert fastpath.enabled()
    assert not [e for e in events if e.get("event") == "fast_path_disabled"]


@pytest.mark.parametrize("name", ["dataBuffer", "offset", "_writeDisconnected"])
def test_a_twisted_without_an_attribute_turns_it_off(monkeypatch, events, name):
    monkeypatch.delattr(abstract.FileDescriptor, name)
    assert name in fastpath.missing()
    assert not fastpath.enabled()
    assert not fastpath.enabled()  # decided once, warned once
    [warning] = [e for e in events if e.get("event") == "fast_path_disabled"]
    assert warning["log_level"].name == "warn" and name in warning["why"]


def test_a_twisted_whose_descriptors_hold_no_temporary_buffer_turns_it_off(monkeypatch):
    init = abstract.FileDescriptor.__init__

    def without(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self._tempDataBuffer

    monkeypatch.setattr(abstract.FileDescriptor, "__init__", without)
    assert "_tempDataBuffer" in fastpath.missing()


def test_a_reactor_of_unknown_internals_keeps_its_own_reading():
    class Reactor:
        _reads: dict = {}

    assert fastpath.readingSet(Reactor()) is None  # no _disconnectSelectable
    Reactor._disconnectSelectable = lambda *a: None
    assert fastpath.readingSet(Reactor()) == {}


def test_switched_off_by_the_environment_the_public_road_is_taken(monkeypatch, pair, events):
    monkeypatch.setenv(fastpath.ENVIRONMENT, "0")
    transport, peer, _ = pair
    assert not fastpath.enabled()
    # The reactor keeps reading the transport...
    assert not readloop.adopt(transport)
    assert type(transport) is tcp.Server
    # ...every write goes through Twisted's buffer...
    wire.sendNow(transport, b"hello")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(10)
    transport.doWrite()
    peer.setblocking(True)
    assert peer.recv(10) == b"hello"
    # ...and a transport may always hold bytes, so nothing is spliced past them.
    assert wire.buffered(transport)
    assert not wire.backlogged(transport)
    transport.producerPaused = True  # what Twisted sets when its buffer is full
    assert wire.backlogged(transport)
    [warning] = [e for e in events if e.get("event") == "fast_path_disabled"]
    assert "TXLB_FAST_PATH=0" in warning["why"]


def test_a_proxy_on_the_public_road_answers_and_copies_large_bodies(monkeypatch):
    """
    Under twistd with the fast path off: one warning, keep-alive answers,
    and a body large enough to be spliced on the fast path copied whole.
    """
    monkeypatch.setenv(fastpath.ENVIRONMENT, "0")
    body = bytes(range(256)) * 4096  # 1 MiB

    def serve(sock: socket.socket, backend: Backend) -> None:
        for head in httpRequests(sock):
            httpAnswer(sock, 200, body if head.split()[1] == b"/big" else backend.name.encode())

    backend = Backend("b1", serve)
    port = freePort()
    config = (
        f'[pools.web]\nservers = [{{ name = "b1", address = "{backend.address}" }}]\n'
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "web"\n'
    )
    try:
        with Txlb(config) as txlb:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                for target in ("/", "/big", "/"):
                    client.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    status, length, received = _response(client)
                    assert status == 200
                    assert received == (body if target == "/big" else b"b1")
            # Access lines are written at the log's next flush.
            big = waitFor(lambda: [e for e in txlb.events("request") if e.get("path") == "/big"],
                          what="the request event of /big")
            assert not big[0].get("spliced")
            assert [e["event"] for e in txlb.events()].count("fast_path_disabled") == 1
    finally:
        backend.stop()


def _response(sock: socket.socket) -> tuple[int, int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before the head"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    while len(rest) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed inside the body"
        rest += chunk
    assert len(rest) == length, hashlib.sha256(rest).hexdigest()
    return status, length, rest


def _privateNames(tree: ast.AST) -> set[str]:
    """The C{_names} (not dunders) that C{tree} reads or defines as attributes, methods or classes."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found.add(node.name)
    return {n for n in found if n.startswith("_") and not n.startswith("__")}


def _twistedPrivateNames() -> set[str]:
    names: set[str] = set()
    for path in Path(twisted.__file__).parent.rglob("*.py"):
        if "test" not in path.parts:
            names |= _privateNames(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
    return names


def test_no_twisted_private_name_outside_the_fenced_module():
    """
    Outside L{txlb.net.fastpath}, txlb neither imports a private Twisted
    module or name, nor reaches for a private attribute that this Twisted
    has and txlb does not define itself (by attribute, C{getattr} string or
    C{hasattr}).  Names txlb defines on its own classes are its own
    business, whatever Twisted calls something.
    """
    package = Path(txlb.__file__).parent
    trees = {path: ast.parse(path.read_text()) for path in package.rglob("*.py")}
    own: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                own.add(node.name)
    twistedOnly = _twistedPrivateNames() - own
    found = []
    for path, tree in trees.items():
        if path.name == "fastpath.py":
            continue
        for node in ast.walk(tree):
            where = f"{path.relative_to(package.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if any(part.startswith("_") for part in node.module.split(".")) or private:
                    found.append(f"{where}: from {node.module} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Attribute) and node.attr in twistedOnly:
                found.append(f"{where}: .{node.attr}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and node.args[1].value in twistedOnly):
                found.append(f"{where}: {node.func.id}(..., {node.args[1].value!r})")
    assert found == []


def test_the_private_name_check_sees_the_fenced_module():
    """The check above is real: the fenced module does use names it would flag."""
    tree = ast.parse(Path(fastpath.__file__).read_text())
    assert {"_disconnectSelectable", "_tempDataBuffer"} <= _privateNames(tree) & _twistedPrivateNames()
