"""
C{[log] path} and SIGUSR1, as logrotate uses them: the file is renamed,
the signal sent, and new events land in a new file of the old name.  On a
real C{twistd txlb} process.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess

from tests.support import Backend, connect, freePort, poolToml, recvLine, sourceEnv, tcpServiceToml, twistdCommand, waitFor
from txlb.config import LogConfig
from txlb.observe.logs import LogFile, makeObserver


def events(path, kind: str) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if event.get("event") == kind:
            out.append(event)
    return out


def test_log_file_reopens_under_its_name(tmp_path):
    path = tmp_path / "a.log"
    observer = makeObserver(LogConfig(path=str(path)))
    assert isinstance(observer.stream, LogFile)
    observer.stream.write("one\n")
    path.rename(tmp_path / "a.log.1")
    observer.stream.write("two\n")
    assert observer.reopen()
    observer.stream.write("three\n")
    observer.stream.close()
    assert (tmp_path / "a.log.1").read_text() == "one\ntwo\n"
    assert path.read_text() == "three\n"


def test_reopen_is_a_no_op_on_stdout():
    assert makeObserver(LogConfig(), stdout=io.StringIO()).reopen() is False


def test_sigusr1_reopens_the_log_file(tmp_path):
    backend = Backend("db-1")
    port = freePort()
    log = tmp_path / "txlb.log"
    (tmp_path / "txlb.toml").write_text(
        f'[log]\npath = "{log}"\n' + poolToml("db", [backend]) + tcpServiceToml("db", port, "db")
    )
    with open(tmp_path / "stdout", "wb") as out:
        process = subprocess.Popen(
            twistdCommand("-n", "--pidfile=", "txlb", "--config", str(tmp_path / "txlb.toml")),
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=sourceEnv(),
        )
    try:
        waitFor(lambda: process.poll() is not None or events(log, "listening"), what="txlb to listen")
        assert process.poll() is None, (tmp_path / "stdout").read_text()

        with connect(port) as sock:
            assert recvLine(sock) == b"db-1\n"
        waitFor(lambda: events(log, "connection"), what="the first connection event")

        rotated = tmp_path / "txlb.log.1"
        log.rename(rotated)
        process.send_signal(signal.SIGUSR1)
        [reopened] = waitFor(lambda: events(log, "log_reopened"), what="a new log file")
        assert reopened["path"] == str(log)

        with connect(port) as sock:
            assert recvLine(sock) == b"db-1\n"
        waitFor(lambda: events(log, "connection"), what="the second connection event in the new file")
        assert len(events(rotated, "connection")) == 1
        assert len(events(log, "connection")) == 1
        assert events(rotated, "listening") and not events(log, "listening")
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        backend.stop()
