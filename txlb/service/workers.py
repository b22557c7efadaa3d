# -*- test-case-name: tests.test_workers -*-
"""
Worker processes (C{[txlb] workers = N}, N > 1): the master's side.

The twistd process is the master.  It loads the config, binds the
services' listening sockets, runs the health checks, the admin API, the
cluster and DNS features, and starts N worker processes
(C{python -m txlb.service.worker}, see L{txlb.service.worker}) that serve the traffic.

Sockets.  For a TCP endpoint the master binds N sockets to the same
address with C{SO_REUSEPORT}, one per worker slot, so that the kernel
spreads new connections evenly over the workers (a single shared socket
lets whichever worker wakes first take a whole burst).  A worker inherits
its slot's socket as a file descriptor and accepts on it; the master keeps
its own copy open and never accepts, so connections waiting in a socket's
queue survive a worker's restart.  A unix socket is bound once and shared
by every worker.  A UDP endpoint is bound as a TCP one is, N datagram
sockets with C{SO_REUSEPORT}: the kernel picks a socket by hashing the
client's address and port, so every datagram of a flow reaches the same
worker, which alone holds the flow and its server.

State.  The master's pools are the one source of truth for servers:
health, drain, weight, ejection, servers added and removed.  Whenever they
change (an event about a server, an admin change, a reload, and a check
every second that catches anything else) the master sends every worker the
state of every pool (L{poolState}); a worker that starts gets it before it
accepts anything.  A worker's passive failure detection is sent back to
the master, which ejects the server for everyone.

Figures.  The admin API asks every worker for the parts it needs and adds
them up (L{txlb.observe.aggregate}): C{/metrics}, C{/api/stats}, C{/api/decisions},
and the servers' in-flight counts and totals that C{/api/pools} shows.

Life.  A worker that dies is started again (C{worker_exited}, then
C{worker_started}).  On C{SIGTERM} the master tells every worker to stop:
each drains its connections up to C{shutdown_timeout} and exits, and the
master exits after them.  A reload that changes only servers is sent as
state; any other is applied by starting a new worker for each slot and
stopping the old one once the new one accepts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from prometheus_client.core import Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError, ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogPublisher

from txlb.balance.pool import Pool
from txlb.control.channel import CONTROL_FD, POOL_EVENTS, ControlChannel
from txlb.net.endpoints import isUDP, listenParts, parseUDPListen
from txlb.observe.aggregate import MergedMetrics, applyServerFigures, mergeDecisions, mergeExpositions

_log = Logger(namespace="txlb.service.workers")

#: Seconds the master waits for a worker's figures before answering without them.
SNAPSHOT_TIMEOUT = 5.0
#: Seconds past C{shutdown_timeout} before a worker that does not exit is killed.
KILL_GRACE = 5.0
#: A worker that dies sooner than this after starting is restarted with a
#: growing delay (up to L{MAX_BACKOFF}), so a worker that cannot start
#: does not spin.
STABLE_AFTER = 5.0
MAX_BACKOFF = 10.0
#: Seconds between the checks that every worker has the master's state.
RESYNC = 1.0


def poolState(pool: Pool) -> list[list]:
    """
    What a worker needs of the master's C{pool}: for each server,
    C{[name, address, weight, health, draining, removing, ejected]}.
    """
    return [
        [s.name, s.address, s.configuredWeight, s.health.value, s.draining, s.removing, bool(s.ejectedUntil)]
        for s in list(pool)
    ]


# Sockets.


class SharedListener:
    """
    The master's sockets for one listen endpoint, bound but not listening:
    one per worker slot (TCP, C{SO_REUSEPORT}) or one for all (unix).  A
    worker calls C{listen()} on its slot's socket when the master says so,
    so that nothing connects before a worker can accept; once listening, a
    socket stays so while the master holds it, through worker restarts.
    Stands where a listening port stands in the service's C{ports}.
    """

    def __init__(self, listen: str, sockets: list[socket.socket], backlog: int) -> None:
        self.listen = listen
        self.sockets = sockets
        self.backlog = backlog

    def socketFor(self, slot: int) -> tuple[int, int]:
        """The file descriptor and address family of C{slot}'s socket."""
        skt = self.sockets[slot % len(self.sockets)]
        return skt.fileno(), skt.family

    def stopListening(self) -> Deferred:
        for skt in self.sockets:
            skt.close()
        return succeed(None)


def bindShared(reactor, listen: str, count: int) -> SharedListener:
    """
    Bind C{listen}'s sockets for C{count} workers (not listening yet).

    @raise CannotListenError: the address cannot be bound.
    @raise ValueError: not a TCP, UDP or unix endpoint (the config refuses those).
    """
    if isUDP(listen):
        return _bindUDP(listen, count)
    endpoint = serverFromString(reactor, listen)
    sockets: list[socket.socket] = []
    try:
        parts = listenParts(listen)
        if isinstance(endpoint, TCP4ServerEndpoint) and parts is not None:
            _, number, interface, backlog = parts
            family = socket.AF_INET6 if ":" in interface else socket.AF_INET
            for _ in range(count):
                skt = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(skt)
                skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    skt.bind((interface, number))
                except OSError as e:
                    raise CannotListenError(interface, number, e)
                number = skt.getsockname()[1]  # port 0: the others share the first one's
        elif isinstance(endpoint, UNIXServerEndpoint) and parts is not None:
            _, path, mode, backlog = parts
            skt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(skt)
            try:
                skt.bind(path)
            except OSError as e:
                raise CannotListenError(None, path, e)
            os.chmod(path, mode)
        else:
            raise ValueError(f"{listen!r}: worker processes share only tcp: and unix: sockets")
    except BaseException:
        for skt in sockets:
            skt.close()
        raise
    for skt in sockets:
        skt.setblocking(False)
    return SharedListener(listen, sockets, backlog)


def _bindUDP(listen: str, count: int) -> SharedListener:
    """C{count} datagram sockets bound to C{listen}'s address with C{SO_REUSEPORT}."""
    number, interface = parseUDPListen(listen)
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            skt = socket.socket(family, socket.SOCK_DGRAM)
            sockets.append(skt)
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                skt.bind((interface, number))
            except OSError as e:
                raise CannotListenError(interface, number, e)
            number = skt.getsockname()[1]  # port 0: the others share the first one's
            skt.setblocking(False)
    except BaseException:
        for skt in sockets:
            skt.close()
        raise
    return SharedListener(listen, sockets, 0)


# Workers.


class _WorkerProcess(ProcessProtocol):
    """One worker process, seen from the master."""

    def __init__(self, workers: "Workers", slot: int) -> None:
        self.workers = workers
        self.slot = slot
        self.pid: Optional[int] = None
        #: Has the master's state and waits for the word to listen.
        self.prepared = False
        self.ready = False
        self.stopping = False
        self.started = workers.reactor.seconds()
        #: The worker this one takes over from (a reload): stopped once this one is ready.
        self.replaces: Optional["_WorkerProcess"] = None
        self.ended: Deferred = Deferred()
        self.channel = ControlChannel(self._write, self._handle, self.kill)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.writeToChild(0, data)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == CONTROL_FD:
            self.channel.dataReceived(data)

    def childConnectionLost(self, fd: int) -> None:
        if fd == CONTROL_FD:
            self.channel.connectionLost()

    def processEnded(self, reason) -> None:
        self.channel.connectionLost()
        self.workers._ended(self, reason)
        self.ended.callback(None)

    def _handle(self, message: dict) -> Any:
        op = message.get("op")
        if op == "prepared":
            self.prepared = True
            self.workers._prepared(self)
        elif op == "ready":
            self.ready = True
            self.workers._ready(self)
        elif op == "ejected":
            self.workers.ejected(message.get("pool"), message.get("server"), message.get("reason", ""))
        elif op == "drained":
            self.workers.refresh()
        return None

    def stop(self) -> None:
        """Ask the worker to drain and exit."""
        if not self.stopping:
            self.stopping = True
            self.channel.notify({"op": "stop"})

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass  # already gone


class Workers(Service):
    """
    The worker processes of a master L{txlb.service.TxlbService}.

    @param owner: the master service: its C{config}, C{pools}, C{ports}
        (the L{SharedListener}s), C{metrics}.
    @param count: how many workers.
    """

    name = "workers"

    def __init__(self, owner, count: int, reactor) -> None:
        self.owner = owner
        self.count = count
        self.reactor = reactor
        self.slots: list[Optional[_WorkerProcess]] = [None] * count
        self.retiring: set[_WorkerProcess] = set()
        self.restarts = [0] * count
        self._failures = [0] * count
        self._restartCalls: dict[int, Any] = {}
        self._pushCall = None
        self._pushed: Optional[dict] = None
        self._resync = LoopingCall(self.push)
        self._resync.clock = reactor
        self.halted = False
        #: The sockets listen (see L{_prepared}).
        self.armed = False
        #: The master's stdout and stderr, inherited by the workers: their
        #: events go where the master's go.
        self.childFDs = {0: "w", 1: 1, 2: 2, CONTROL_FD: "r"}
        #: L{whenReady}'s Deferreds, fired once every slot's worker accepts.
        self._readyWaiters: list[Deferred] = []

    def bind(self, listen: str) -> SharedListener:
        return bindShared(self.reactor, listen, self.count)

    @property
    def live(self) -> list[_WorkerProcess]:
        return [p for p in self.slots if p is not None] + list(self.retiring)

    # Starting and stopping.

    def startService(self) -> None:
        super().startService()
        self.halted = False
        globalLogPublisher.addObserver(self._observe)
        self._resync.start(RESYNC, now=False)
        # Once the reactor runs: it reaps children only from then on.
        self.reactor.callWhenRunning(self.startAll)

    def stopService(self) -> Deferred:
        super().stopService()
        globalLogPublisher.removeObserver(self._observe)
        if self._resync.running:
            self._resync.stop()
        return self.stopAll()

    def startAll(self) -> None:
        """Start a worker in every empty slot (when the services listen)."""
        if not self.running or not self.owner.listening:
            return
        self.halted = False
        for slot in range(self.count):
            if self.slots[slot] is None:
                self.spawn(slot)

    def stopAll(self) -> Deferred:
        """
        Tell every worker to drain and exit; fire when all have exited
        (those still running after C{shutdown_timeout} and a grace are
        killed).  None is restarted until L{startAll}.
        """
        self.halted = True
        self.armed = False
        for call in self._restartCalls.values():
            if call.active():
                call.cancel()
        self._restartCalls.clear()
        live = self.live
        for proc in live:
            proc.stop()
        if not live:
            return succeed(None)
        timeout = self.owner.config.txlb.shutdown_timeout + KILL_GRACE
        kill = self.reactor.callLater(timeout, lambda: [p.kill() for p in live])
        d = DeferredList([p.ended for p in live])
        d.addBoth(lambda _: kill.cancel() if kill.active() else None)
        return d

    def spawn(self, slot: int) -> _WorkerProcess:
        """Start the worker of C{slot} with the sockets of every service listener."""
        proc = _WorkerProcess(self, slot)
        old = self.slots[slot]
        if old is not None:
            self.retiring.add(old)
            proc.replaces = old
        self.slots[slot] = proc
        childFDs = dict(self.childFDs)
        sockets = {}
        fd = CONTROL_FD + 1
        for listen, shared in self.owner.ports.items():
            parentFd, family = shared.socketFor(slot)
            childFDs[fd] = parentFd
            sockets[listen] = [fd, family, shared.backlog]
            fd += 1
        log = self.owner.config.log
        # Where the master writes (twistd's --logfile when daemonized), not only what the file says.
        logPath = getattr(self.owner.logObserver.stream, "path", log.path)
        args = [
            sys.executable, "-m", "txlb.service.worker",
            "--config", os.path.abspath(self.owner.config.path),
            "--worker", str(slot),
            "--sockets", json.dumps(sockets),
            "--log", json.dumps({"format": log.format, "path": logPath}),
        ]
        env = dict(os.environ)
        # Wherever the master found txlb, the worker finds the same one.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.reactor.spawnProcess(proc, sys.executable, args, env=env, childFDs=childFDs)
        # Its first message: the pools as they are now.  It accepts nothing before.
        proc.channel.notify({"op": "state", "pools": self.state()})
        return proc

    def restartAll(self) -> None:
        """
        Replace every worker with a new one (a reload): each old one stops,
        draining, once its successor accepts.
        """
        if self.halted or not self.running:
            return
        for slot in range(self.count):
            self.spawn(slot)

    def _prepared(self, proc: _WorkerProcess) -> None:
        """
        A worker has the state and can accept.  At first start, the sockets
        start listening only when every worker can accept on its own, so
        that the first connections are spread over all of them (a socket
        that listens alone would take them all); later, a worker that
        takes over a slot accepts at once.
        """
        if self.armed:
            proc.channel.notify({"op": "listen"})
            return
        if all(p is not None and p.prepared for p in self.slots):
            self.armed = True
            for p in self.slots:
                p.channel.notify({"op": "listen"})

    def _ready(self, proc: _WorkerProcess) -> None:
        self._failures[proc.slot] = 0
        _log.info("worker {worker} started (pid {pid})", event="worker_started", worker=proc.slot, pid=proc.pid)
        old, proc.replaces = proc.replaces, None
        if old is not None:
            old.stop()
        if self._readyWaiters and self.allReady():
            waiters, self._readyWaiters = self._readyWaiters, []
            for d in waiters:
                d.callback(None)

    def allReady(self) -> bool:
        """Whether every slot has a worker that accepts."""
        return all(p is not None and p.ready for p in self.slots)

    def whenReady(self) -> Deferred:
        """
        Fires once every slot has a worker that accepts (at once if every
        one does now): what C{READY=1} to systemd waits for.
        """
        if self.allReady():
            return succeed(None)
        d: Deferred = Deferred()
        self._readyWaiters.append(d)
        return d

    def _ended(self, proc: _WorkerProcess, reason) -> None:
        if proc in self.retiring:
            self.retiring.discard(proc)
            _log.info("worker {worker} (pid {pid}) stopped", event="worker_stopped", worker=proc.slot, pid=proc.pid)
            return
        if self.slots[proc.slot] is not proc:
            return
        self.slots[proc.slot] = None
        if proc.stopping or self.halted:
            _log.info("worker {worker} (pid {pid}) stopped", event="worker_stopped", worker=proc.slot, pid=proc.pid)
            return
        value = reason.value
        status = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if isinstance(value, ProcessDone):
            status = 0
        lived = self.reactor.seconds() - proc.started
        if lived >= STABLE_AFTER:
            self._failures[proc.slot] = 0
        delay = 0.0 if not self._failures[proc.slot] else min(0.25 * 2 ** self._failures[proc.slot], MAX_BACKOFF)
        self._failures[proc.slot] += 1
        self.restarts[proc.slot] += 1
        _log.warn(
            "worker {worker} (pid {pid}) exited (status {status}, signal {signal}); restarting in {delay}s",
            event="worker_exited", worker=proc.slot, pid=proc.pid, status=status, signal=sig, delay=delay,
        )
        # A new worker that died before it was ready leaves its predecessor
        # serving; its own successor still takes over from that one.
        predecessor = proc.replaces
        self._restartCalls[proc.slot] = self.reactor.callLater(delay, self._restart, proc.slot, predecessor)

    def _restart(self, slot: int, replaces: Optional[_WorkerProcess]) -> None:
        self._restartCalls.pop(slot, None)
        if self.halted or not self.running or self.slots[slot] is not None:
            return
        proc = self.spawn(slot)
        if replaces is not None and replaces.transport is not None and not replaces.stopping:
            proc.replaces = replaces

    def signalAll(self, signum: int) -> None:
        """Pass a signal on to every worker (C{SIGUSR1}: reopen the log file)."""
        for proc in self.live:
            try:
                proc.transport.signalProcess(signum)
            except Exception:
                pass

    # The master's state, to the workers.

    def state(self) -> dict[str, list]:
        return {name: poolState(pool) for name, pool in list(self.owner.pools.items())}

    def changed(self) -> None:
        """Something about servers may have changed: send the state soon (once for many changes)."""
        if self._pushCall is None or not self._pushCall.active():
            self._pushCall = self.reactor.callLater(0, self.push)

    def push(self) -> None:
        """Send every worker the state, if it differs from what was last sent."""
        state = self.state()
        if state == self._pushed:
            return
        self._pushed = state
        for proc in self.live:
            proc.channel.notify({"op": "state", "pools": state})

    def pushNow(self) -> Deferred:
        """
        Send every ready worker the state and fire once each has applied it
        (or has not answered within L{SNAPSHOT_TIMEOUT}): an admin change
        is answered only when every worker acts on it, so that a drained
        server gets no new request after the operator's call returns.
        """
        state = self.state()
        self._pushed = state
        acks = []
        for proc in self.live:
            if proc.ready:
                d = proc.channel.request({"op": "state", "pools": state})
                d.addTimeout(SNAPSHOT_TIMEOUT, self.reactor)
                d.addErrback(lambda f: None)
                acks.append(d)
            else:
                proc.channel.notify({"op": "state", "pools": state})
        return gatherResults(acks)

    def _observe(self, event: dict) -> None:
        if event.get("event") in POOL_EVENTS:
            self.changed()

    def ejected(self, poolName: Any, serverName: Any, reason: str) -> None:
        """A worker's passive detection ejected a server: eject it everywhere."""
        pool = self.owner.pools.get(poolName)
        if pool is None:
            return
        try:
            server = pool.server(serverName)
        except KeyError:
            return
        pool.eject(server, str(reason))

    # The workers' figures, to the admin API.

    def ask(self, parts: list[str], **extra: Any) -> Deferred:
        """Every ready worker's answer to a snapshot of C{parts} (a worker that does not answer is left out)."""
        asks = []
        for proc in self.live:
            if proc.ready:
                d = proc.channel.request({"op": "snapshot", "parts": parts, **extra})
                d.addTimeout(SNAPSHOT_TIMEOUT, self.reactor)
                d.addErrback(lambda f: None)
                asks.append(d)
        d = gatherResults(asks)
        d.addCallback(lambda replies: [r for r in replies if r])
        return d

    def refresh(self) -> Deferred:
        """
        Sum the workers' live server figures into the master's servers (in
        flight, totals, response times, bandwidth), and finish the drains
        of servers no worker has anything in flight on.
        """
        def apply(replies):
            finished = applyServerFigures(self.owner.pools, [r["servers"] for r in replies if "servers" in r],
                                          self.reactor.seconds())
            for pool, server in finished:
                server.active = 1
                pool.release(server)

        return self.ask(["servers"]).addCallback(apply)

    def exposition(self, openmetrics: bool = False) -> Deferred:
        """
        C{/metrics}: the master's and the workers' figures added up (in the
        OpenMetrics format with C{openmetrics}); C{process_*} per process.
        """
        def merge(replies):
            return mergeExpositions(self.owner.metrics.exposition(), [r["metrics"] for r in replies],
                                    self._families(replies), [self._label(r.get("pid")) for r in replies],
                                    openmetrics=openmetrics)

        return self.ask(["metrics"]).addCallback(merge)

    def _label(self, pid: Any) -> str:
        """The C{worker} label of the process C{pid}: its slot (a worker being replaced: C{N-retiring})."""
        for proc in self.live:
            if proc.pid == pid:
                return str(proc.slot) if self.slots[proc.slot] is proc else f"{proc.slot}-retiring"
        return f"pid-{pid}"

    def _families(self, replies: list[dict]) -> list[Metric]:
        up = Metric("txlb_workers", "Worker processes answering now.", "gauge")
        up.add_sample("txlb_workers", {}, len(replies))
        info = Metric("txlb_worker_info", "A worker process answering now: its slot and pid.", "gauge")
        for proc in self.live:
            if proc.ready:
                info.add_sample("txlb_worker_info", {"worker": str(proc.slot), "pid": str(proc.pid)}, 1)
        restarts = Metric("txlb_worker_restarts", "Workers started again after they died, by slot.", "counter")
        for slot, n in enumerate(self.restarts):
            restarts.add_sample("txlb_worker_restarts_total", {"worker": str(slot)}, n)
        return [up, info, restarts]

    def stats(self, history: bool) -> Deferred:
        """C{/api/stats}: the workers' windows merged."""
        def merge(replies):
            merged = MergedMetrics(self.owner.metrics, [r["stats"] for r in replies])
            out = merged.stats(history=history)
            out["workers"] = len(replies)
            return out

        return self.ask(["stats"]).addCallback(merge)

    def decisions(self, limit: int) -> Deferred:
        """C{/api/decisions}: the newest of every worker's."""
        return self.ask(["decisions"], limit=limit).addCallback(
            lambda replies: mergeDecisions([r["decisions"] for r in replies], limit)
        )

    def purge(self, service: str, prefix: str) -> Deferred:
        """C{DELETE /api/cache}: purge in every worker; the counts added up."""
        asks = []
        for proc in self.live:
            if proc.ready:
                d = proc.channel.request({"op": "purge", "service": service, "prefix": prefix})
                d.addTimeout(SNAPSHOT_TIMEOUT, self.reactor)
                d.addErrback(lambda f: {})
                asks.append(d)

        def add(replies):
            total: dict[str, int] = {}
            for reply in replies:
                for name, n in (reply or {}).items():
                    total[name] = total.get(name, 0) + n
            return total

        return gatherResults(asks).addCallback(add)


def forwardSignal(workers: Workers, reactor, signum: int) -> None:
    """Chain C{signum}'s handler so that the workers get the signal too."""
    previous = signal.getsignal(signum)

    def handler(n, frame):
        if callable(previous):
            previous(n, frame)
        reactor.callFromThread(workers.signalAll, n)

    signal.signal(signum, handler)


__all__ = ["SharedListener", "Workers", "bindShared", "forwardSignal", "poolState"]
