# -*- test-case-name: tests.test_sdnotify -*-
"""
Telling systemd how txlb is doing (C{Type=notify}), without libsystemd.

systemd passes the address of its notification socket in C{NOTIFY_SOCKET}
(a path, or a name in the abstract namespace when it starts with C{@}); a
service sends it datagrams of C{KEY=VALUE} lines (C{sd_notify(3)}):

    - C{READY=1} once every service listens: systemd starts the units
      ordered after txlb only then, and C{systemctl start} returns then;
    - C{RELOADING=1} with C{MONOTONIC_USEC} (the C{CLOCK_MONOTONIC} time
      in microseconds) as a reload starts, and C{READY=1} once it is done,
      applied or rejected: C{systemctl reload} waits for it;
    - C{STOPPING=1} as soon as txlb begins to stop (before it drains);
    - C{WATCHDOG=1} every half of C{WATCHDOG_USEC} when the unit sets
      C{WatchdogSec=}: a txlb whose reactor no longer turns stops sending
      it, and systemd restarts it.

Without C{NOTIFY_SOCKET} nothing is sent: the same txlb runs anywhere.
The protocol is one datagram per message, so it is written here directly
rather than through a dependency.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger(namespace="txlb.control.sdnotify")

__all__ = ["Notifier", "SystemdService", "monotonicUsec", "notifyAddress", "watchdogInterval"]


def notifyAddress(value: str) -> str | bytes:
    """
    The C{AF_UNIX} address of C{NOTIFY_SOCKET}'s value: a path as it is,
    C{@name} as the abstract-namespace name (a leading NUL byte).
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    return value


def monotonicUsec() -> int:
    """C{CLOCK_MONOTONIC} in microseconds, the clock systemd reads C{MONOTONIC_USEC} with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdogInterval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """
    Seconds between two C{WATCHDOG=1}: half of C{WATCHDOG_USEC}, when it is
    set (and C{WATCHDOG_PID}, when set, is C{pid}: the watchdog is this
    process's, not its parent's); else C{None}.
    """
    value = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(value)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """
    Sends messages to C{NOTIFY_SOCKET} (read from C{environ} once), one
    datagram each; does nothing when it is not set.  A message that cannot
    be sent (systemd gone, the socket full) is dropped: telling systemd
    must never stop txlb.
    """

    def __init__(self, environ: Optional[Mapping[str, str]] = None,
                 socketFactory: Callable[..., socket.socket] = socket.socket) -> None:
        environ = os.environ if environ is None else environ
        value = environ.get("NOTIFY_SOCKET", "")
        self.address: Optional[str | bytes] = notifyAddress(value) if value else None
        self._socketFactory = socketFactory
        self._socket: Optional[socket.socket] = None
        #: Whether the last message failed: a failure is logged once, not every watchdog tick.
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send C{fields} (C{"READY=1"}, ...) as one message; C{True} when it was sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = self._socketFactory(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(fields).encode("utf-8"), self.address)
        except OSError as e:
            if not self._failing:
                self._failing = True
                _log.warn("cannot notify systemd: {error}", event="sd_notify_failed", error=str(e))
            return False
        self._failing = False
        return True

    def ready(self) -> bool:
        return self.send("READY=1", "STATUS=serving")

    def reloading(self, usec: Optional[int] = None) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonicUsec() if usec is None else usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _listening(owner) -> Deferred:
    """
    Fires once every listener of C{owner} (a L{txlb.service.TxlbService})
    accepts: its ports (some endpoints answer later than the call) and
    admin port, and in a master, every worker process.
    """
    waits = [p for p in list(owner.ports.values()) + [owner.adminPort] if isinstance(p, Deferred)]
    # A copy of each: the port's own Deferred keeps its result for the service.
    copies = []
    for d in waits:
        copy: Deferred = Deferred()
        d.addBoth(lambda result, copy=copy: (copy.callback(None), result)[1])
        copies.append(copy)
    if owner.workers is not None and owner.listening:
        copies.append(owner.workers.whenReady())
    return gatherResults(copies) if copies else succeed(None)


class SystemdService(Service):
    """
    systemd's side of a master or single txlb process: C{READY=1} once
    everything listens, C{STOPPING=1} as the shutdown begins, the
    watchdog while it runs; L{reloading} and L{reloaded} around a reload.

    @param owner: the L{txlb.service.TxlbService}.
    """

    name = "systemd"

    def __init__(self, owner, reactor, environ: Optional[Mapping[str, str]] = None,
                 notifier: Optional[Notifier] = None, pid: Optional[int] = None) -> None:
        environ = os.environ if environ is None else environ
        self.owner = owner
        self.reactor = reactor
        self.notifier = notifier if notifier is not None else Notifier(environ)
        self.interval = watchdogInterval(environ, os.getpid() if pid is None else pid)
        self.watchdog: Optional[LoopingCall] = None
        if self.interval is not None and self.notifier.enabled:
            self.watchdog = LoopingCall(self.notifier.watchdog)
            self.watchdog.clock = reactor
        self.isReady = False
        self._stoppingSent = False

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._running)
        # Before twistd stops the service tree (its trigger is added after
        # the tree has started), so that systemd knows before the drain.
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stopping)

    def _running(self) -> None:
        if self.watchdog is not None and not self.watchdog.running:
            self.watchdog.start(self.interval, now=True)
        _listening(self.owner).addCallback(lambda _: self._ready())

    def _ready(self) -> None:
        if self.running and not self._stoppingSent:
            self.isReady = True
            self.notifier.ready()

    def reloading(self) -> None:
        if self.running and not self._stoppingSent:
            self.notifier.reloading()

    def reloaded(self) -> None:
        if self.running and not self._stoppingSent:
            self.notifier.ready()

    def stopping(self) -> None:
        if not self._stoppingSent:
            self._stoppingSent = True
            self.notifier.stopping()

    def stopService(self):
        self.stopping()
        if self.watchdog is not None and self.watchdog.running:
            self.watchdog.stop()
        return super().stopService()
