"""
A daemonized txlb (C{twistd txlb} without C{-n}) loses no event: they go
where C{[log] path} says, or to twistd's C{--logfile} when it is C{-}, and
C{SIGUSR1} after a rename starts a new file, workers included.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from tests.support import Backend, freePort, poolToml, sourceEnv, tcpServiceToml, twistdCommand, waitFor
from txlb.tap import logPath


def _events(path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _kinds(path) -> list[str]:
    return [e.get("event") for e in _events(path)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _connect(port: int) -> None:
    """One connection through the TCP service: a C{connection} event once both sides close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        assert client.makefile("rb").readline() == b"one\n"


class _Daemon:
    def __init__(self, tmp_path, config: str, *twistdArgs: str) -> None:
        self.dir = tmp_path
        self.config = tmp_path / "txlb.toml"
        self.config.write_text(config)
        self.pidfile = tmp_path / "txlb.pid"
        self.pid = None
        result = subprocess.run(
            twistdCommand(f"--pidfile={self.pidfile}", *twistdArgs, "txlb", "--config", str(self.config)),
            cwd=tmp_path, env=sourceEnv(), capture_output=True, text=True, timeout=60,
        )
        # twistd returns once the daemon is on its own.
        assert result.returncode == 0, result.stdout + result.stderr
        self.pid = int(waitFor(lambda: self.pidfile.exists() and self.pidfile.read_text().strip(),
                               what="the pidfile"))

    def stop(self) -> None:
        if self.pid is not None and _alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            waitFor(lambda: not _alive(self.pid), timeout=30, what="the daemon to exit")


def _config(port: int, backend: Backend, workers: int, log: str = "") -> str:
    head = f"[txlb]\nworkers = {workers}\n" if workers > 1 else ""
    return head + log + poolToml("p", [backend]) + tcpServiceToml("tcp", port, "p")


def _rotate(daemon: _Daemon, path, port: int, workers: int) -> None:
    """Rename C{path}, SIGUSR1, and see new events (the workers' too) in a new file of that name."""
    rotated = path.with_name(path.name + ".1")
    path.rename(rotated)
    os.kill(daemon.pid, signal.SIGUSR1)
    waitFor(lambda: "log_reopened" in _kinds(path), what="log_reopened in the new file")
    # Connections until every worker has written one into the new file
    # (the kernel spreads them; each worker got the signal from the master).
    def writers() -> int:
        return len({e.get("worker") for e in _events(path) if e.get("event") == "connection"})

    for _ in range(100):
        _connect(port)
        if writers() >= workers:
            break
    waitFor(lambda: writers() >= workers, what="a connection event from every worker in the new file")
    before = len(_events(rotated))
    daemon.stop()
    kinds = _kinds(path)
    assert "shutdown" in kinds
    # twistd's last words too.
    assert any(e.get("message") == "Server Shut Down." for e in _events(path))
    # Nothing went on into the renamed file.
    assert len(_events(rotated)) == before


@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_logs_to_twistds_logfile_when_path_is_stdout(tmp_path, workers):
    backend = Backend("one")
    port = freePort()
    logfile = tmp_path / "twistd-events.log"
    daemon = _Daemon(tmp_path, _config(port, backend, workers), f"--logfile={logfile}")
    try:
        waitFor(lambda: "listening" in _kinds(logfile), what="listening in --logfile")
        if workers > 1:
            waitFor(lambda: _kinds(logfile).count("worker_started") == workers, what="the workers")
        _connect(port)
        waitFor(lambda: "connection" in _kinds(logfile), what="a connection event in --logfile")
        _rotate(daemon, logfile, port, workers)
    finally:
        daemon.stop()
        backend.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_logs_where_log_path_says(tmp_path, workers):
    backend = Backend("one")
    port = freePort()
    events = tmp_path / "events.log"
    logfile = tmp_path / "twistd-events.log"
    config = _config(port, backend, workers, f'[log]\npath = "{events}"\n')
    daemon = _Daemon(tmp_path, config, f"--logfile={logfile}")
    try:
        waitFor(lambda: "listening" in _kinds(events), what="listening in [log] path")
        if workers > 1:
            waitFor(lambda: _kinds(events).count("worker_started") == workers, what="the workers")
        _connect(port)
        waitFor(lambda: "connection" in _kinds(events), what="a connection event in [log] path")
        _rotate(daemon, events, port, workers)
        # [log] path wins over --logfile.
        assert not _events(logfile)
    finally:
        daemon.stop()
        backend.stop()


def test_daemon_without_logfile_writes_twistd_log(tmp_path):
    backend = Backend("one")
    port = freePort()
    daemon = _Daemon(tmp_path, _config(port, backend, 1))
    try:
        waitFor(lambda: "listening" in _kinds(tmp_path / "twistd.log"), what="listening in twistd.log")
    finally:
        daemon.stop()
        backend.stop()


def test_log_path_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    daemon = {"nodaemon": False, "logfile": None}
    foreground = {"nodaemon": True, "logfile": None}
    assert logPath("/var/log/txlb.log", daemon) == "/var/log/txlb.log"
    assert logPath("-", None) == "-"
    assert logPath("-", foreground) == "-"
    assert logPath("-", dict(foreground, logfile="-")) == "-"
    assert logPath("-", dict(foreground, logfile="fg.log")) == str(tmp_path / "fg.log")
    assert logPath("-", daemon) == str(tmp_path / "twistd.log")
    assert logPath("-", dict(daemon, logfile="d.log")) == str(tmp_path / "d.log")
