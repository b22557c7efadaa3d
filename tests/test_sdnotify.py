"""
systemd notifications (L{txlb.control.sdnotify}): the notifier on its own, the
service on a memory reactor, and a real C{twistd txlb} talking to a
notification socket this test binds, as systemd would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from tests.support import ROOT, Backend, freePort, poolToml, sourceEnv, tcpServiceToml, twistdCommand, waitFor
from txlb.control.sdnotify import Notifier, SystemdService, monotonicUsec, notifyAddress, watchdogInterval


# The notifier.


def test_abstract_namespace_address():
    assert notifyAddress("@txlb/notify") == b"\0txlb/notify"
    assert notifyAddress("/run/systemd/notify") == "/run/systemd/notify"


def test_nothing_is_sent_without_notify_socket():
    def noSocket(*args):
        raise AssertionError("no socket may be made")

    notifier = Notifier({}, socketFactory=noSocket)
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.stopping() is False


def test_one_datagram_per_message_to_an_abstract_socket():
    name = f"txlb-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(b"\0" + name.encode())
        systemd.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        before = monotonicUsec()
        assert notifier.ready()
        assert notifier.reloading()
        assert notifier.watchdog()
        notifier.close()
        assert systemd.recv(4096) == b"READY=1\nSTATUS=serving"
        reloading = systemd.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1"
        key, usec = reloading[1].split("=")
        assert key == "MONOTONIC_USEC" and before <= int(usec) <= monotonicUsec()
        assert systemd.recv(4096) == b"WATCHDOG=1"


def test_a_socket_that_is_gone_is_not_an_error(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert watchdogInterval({"WATCHDOG_USEC": "4000000"}, 42) == 2.0
    assert watchdogInterval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "42"}, 42) == 2.0
    assert watchdogInterval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdogInterval({}, 42) is None
    assert watchdogInterval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdogInterval({"WATCHDOG_USEC": "soon"}, 42) is None


# The service, on a memory reactor.


class _Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__({"NOTIFY_SOCKET": "@unused"})
        self.sent: list[tuple[str, ...]] = []

    def send(self, *fields: str) -> bool:
        self.sent.append(fields)
        return True


class _Workers:
    def __init__(self) -> None:
        self.ready: Deferred = Deferred()

    def whenReady(self) -> Deferred:
        return self.ready


class _Owner:
    def __init__(self, workers=None, ports=None) -> None:
        self.ports = ports or {}
        self.adminPort = None
        self.workers = workers
        self.listening = True


def _service(owner, environ=None):
    reactor = MemoryReactorClock()
    recorder = _Recorder()
    service = SystemdService(owner, reactor, environ=environ or {}, notifier=recorder, pid=42)
    service.startService()
    return service, reactor, recorder


def _kinds(recorder) -> list[str]:
    return [fields[0] for fields in recorder.sent]


def test_ready_waits_for_every_worker():
    workers = _Workers()
    service, reactor, recorder = _service(_Owner(workers))
    reactor.run()
    assert _kinds(recorder) == []
    workers.ready.callback(None)
    assert _kinds(recorder) == ["READY=1"]


def test_ready_waits_for_an_endpoint_that_listens_later():
    late: Deferred = Deferred()
    service, reactor, recorder = _service(_Owner(ports={"unix:x": late}))
    reactor.run()
    assert _kinds(recorder) == []
    port = object()
    late.callback(port)
    assert _kinds(recorder) == ["READY=1"]
    # The port's own Deferred still has the port for the service.
    assert late.result is port


def test_reload_then_stopping():
    service, reactor, recorder = _service(_Owner())
    reactor.run()
    service.reloading()
    service.reloaded()
    for _ in range(2):
        service.stopping()
    service.stopService()
    assert _kinds(recorder) == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert recorder.sent[1][1].startswith("MONOTONIC_USEC=")
    # Sent before twistd stops the service tree.
    assert reactor.triggers["before"]["shutdown"]


def test_watchdog_every_half_of_watchdog_usec():
    service, reactor, recorder = _service(_Owner(), {"WATCHDOG_USEC": "2000000"})
    assert service.interval == 1.0
    reactor.run()
    reactor.advance(1.0)
    reactor.advance(1.0)
    assert _kinds(recorder).count("WATCHDOG=1") == 3
    service.stopService()
    reactor.advance(5.0)
    assert _kinds(recorder).count("WATCHDOG=1") == 3


def test_no_watchdog_for_another_process():
    service, reactor, recorder = _service(_Owner(), {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    reactor.run()
    reactor.advance(5.0)
    assert "WATCHDOG=1" not in _kinds(recorder)


# A real txlb, and this test as systemd.


class _Systemd:
    """The notification socket, bound in a directory of the test's."""

    def __init__(self, directory) -> None:
        self.path = str(directory / "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        try:
            data = self.socket.recv(4096)
        except socket.timeout:
            return self.messages
        self.messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        return self.messages

    def waitFor(self, key: str, after: int = 0) -> int:
        """The index of the first message with C{key} from index C{after} on."""
        def found():
            for i, m in enumerate(self.poll()[after:], after):
                if key in m:
                    return i + 1
            return None

        return waitFor(found, what=f"{key} from txlb") - 1

    def close(self) -> None:
        self.socket.close()


def _start(tmp_path, config: str, systemd: _Systemd, **env):
    path = tmp_path / "txlb.toml"
    path.write_text(config)
    log = open(tmp_path / "txlb.log", "wb")
    environ = dict(sourceEnv(), NOTIFY_SOCKET=systemd.path, **env)
    process = subprocess.Popen(
        twistdCommand("-n", "--pidfile=", "txlb", "--config", str(path)),
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=environ,
    )
    return process, log


def _stop(process, log):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()


def test_txlb_tells_systemd(tmp_path):
    backend = Backend("one")
    port = freePort()
    systemd = _Systemd(tmp_path)
    config = poolToml("p", [backend]) + tcpServiceToml("web", port, "p")
    process, log = _start(tmp_path, config, systemd, WATCHDOG_USEC="200000")
    try:
        ready = systemd.waitFor("READY")
        # Ready means listening.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert client.makefile("rb").readline() == b"one\n"
        watchdog = systemd.waitFor("WATCHDOG", ready + 1)
        assert watchdog > ready
        before = monotonicUsec()
        process.send_signal(signal.SIGHUP)
        reloading = systemd.waitFor("RELOADING", ready + 1)
        assert before <= int(systemd.messages[reloading]["MONOTONIC_USEC"]) <= monotonicUsec()
        readyAgain = systemd.waitFor("READY", reloading + 1)
        process.send_signal(signal.SIGTERM)
        stopping = systemd.waitFor("STOPPING", readyAgain + 1)
        assert process.wait(15) == 0
        kinds = [k for m in systemd.messages for k in m if k in ("READY", "RELOADING", "STOPPING")]
        assert kinds == ["READY", "RELOADING", "READY", "STOPPING"]
        assert ready < reloading < readyAgain < stopping
    finally:
        _stop(process, log)
        systemd.close()
        backend.stop()


def test_ready_in_workers_mode_once_every_worker_accepts(tmp_path):
    backend = Backend("one")
    port = freePort()
    systemd = _Systemd(tmp_path)
    config = "[txlb]\nworkers = 2\n" + poolToml("p", [backend]) + tcpServiceToml("web", port, "p")
    process, log = _start(tmp_path, config, systemd)
    try:
        systemd.waitFor("READY")
        # (That READY waits for the workers is test_ready_waits_for_every_worker's.)
        waitFor(lambda: (tmp_path / "txlb.log").read_text().count('"event":"worker_started"') == 2,
                what="both workers in the log")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert client.makefile("rb").readline() == b"one\n"
        process.send_signal(signal.SIGTERM)
        systemd.waitFor("STOPPING")
        assert process.wait(30) == 0
        assert [k for m in systemd.messages for k in m if k in ("READY", "STOPPING")] == ["READY", "STOPPING"]
    finally:
        _stop(process, log)
        systemd.close()
        backend.stop()


# Socket activation: this test opens the socket and passes it as systemd does.

#: Run by the child: fd C{argv[1]} becomes fd 3 (systemd's first), LISTEN_FDS,
#: LISTEN_FDNAMES and LISTEN_PID (this very process, which then becomes
#: twistd) are set.
_ACTIVATE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); "
    "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='txlb.socket', LISTEN_PID=str(os.getpid())); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _activated(tmp_path, listener: socket.socket, *args: str, **kwargs):
    fd = listener.fileno()
    command = [sys.executable, "-c", _ACTIVATE, str(fd), *twistdCommand(*args)]
    return subprocess.Popen(command, pass_fds=[fd], cwd=tmp_path, env=sourceEnv(), **kwargs)


_ACTIVATED_CONFIG = (
    '[[services]]\nname = "web"\nprotocol = "tcp"\nlisten = "systemd:domain=INET:index=0"\npool = "p"\n'
)


def test_check_outside_a_unit_names_the_key_and_line(tmp_path):
    path = tmp_path / "txlb.toml"
    path.write_text(poolToml("p", []) + _ACTIVATED_CONFIG)
    env = {k: v for k, v in sourceEnv().items() if not k.startswith("LISTEN_")}
    result = subprocess.run(twistdCommand("-n", "txlb", "--check", "--config", str(path)),
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = path.read_text().splitlines().index('listen = "systemd:domain=INET:index=0"') + 1
    assert f"txlb.toml:{line}: services[0].listen: 'systemd:domain=INET:index=0' takes a socket that " \
           "systemd opened, but systemd passed no socket at that index to this process" in result.stderr


def test_socket_activation(tmp_path):
    backend = Backend("one")
    path = tmp_path / "txlb.toml"
    path.write_text(poolToml("p", [backend]) + _ACTIVATED_CONFIG)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        check = _activated(tmp_path, listener, "-n", "txlb", "--check", "--config", str(path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = check.communicate(timeout=60)
        assert check.returncode == 0, err
        assert "service web (tcp) on systemd:domain=INET:index=0" in out
        log = open(tmp_path / "txlb.log", "wb")
        process = _activated(tmp_path, listener, "-n", "--pidfile=", "txlb", "--config", str(path),
                             stdout=log, stderr=subprocess.STDOUT)
    # Only txlb holds the socket now.
    try:
        waitFor(lambda: process.poll() is not None or '"event":"listening"' in (tmp_path / "txlb.log").read_text(),
                what="txlb to listen")
        assert process.poll() is None, (tmp_path / "txlb.log").read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert client.makefile("rb").readline() == b"one\n"
    finally:
        _stop(process, log)
        backend.stop()


# The sample unit.

UNIT = ROOT / "contrib" / "systemd" / "txlb.service"


def _unitKeys(path) -> dict[str, dict[str, list[str]]]:
    """C{{section: {key: [values]}}} of a systemd unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{raw!r} outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_sample_unit_runs_txlb_as_a_notify_service():
    service = _unitKeys(UNIT)["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Type"] == "notify"
    assert one["ExecReload"].endswith("kill -HUP $MAINPID")
    assert one["Restart"] == "on-failure"
    assert one["DynamicUser"] == "yes"
    assert "CAP_NET_BIND_SERVICE" in one["AmbientCapabilities"].split()
    assert one["ProtectSystem"] == "strict"
    assert one["NoNewPrivileges"] == "yes"
    assert float(one["WatchdogSec"].rstrip("s")) > 0
    # In the foreground, so that systemd's main process is txlb's.
    start = one["ExecStart"].split()
    assert "-n" in start and "txlb" in start


def test_sample_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    twistd = shutil.which("twistd", path=os.path.dirname(sys.executable)) or shutil.which("twistd")
    if twistd is None:
        pytest.skip("no twistd executable to point ExecStart at")
    for unit in ("txlb.service", "txlb.socket"):
        # The commands where this host has them.
        text = (UNIT.parent / unit).read_text().replace("/usr/bin/twistd", twistd)
        (tmp_path / unit).write_text(text)
    result = subprocess.run([analyze, "verify", str(tmp_path / "txlb.service"), str(tmp_path / "txlb.socket")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
