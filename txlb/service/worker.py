# -*- test-case-name: tests.test_workers -*-
"""
A worker process (C{[txlb] workers > 1}): C{python -m txlb.service.worker}.

The master (L{txlb.service.workers}) starts it with the config file's path, its
number, and the listening sockets it is to accept on as inherited file
descriptors.  It builds the services of the config file as a single txlb
would (L{txlb.service.TxlbService} in its C{worker} role: no health checks,
no admin API, no cluster), waits for the master's first pool state, then
accepts on the inherited sockets.

What it hears from the master, on its standard input (L{txlb.control.channel}):

  - C{state}: the servers of the pools as the master has them (health,
    drain, weight, servers added and removed): applied with L{applyState};
  - C{snapshot}: a request for its figures (metrics, stats, server
    counters, decisions), which the master adds up for the admin API;
  - C{purge}: forget cached responses;
  - C{stop}: stop accepting, drain (up to C{shutdown_timeout}) and exit 0.

What it tells the master, on file descriptor 3: C{ready}, and the events
the master must decide on: C{ejected} (passive failure detection found a
server failing) and C{drained}.  It exits when its standard input closes
(the master is gone).  The events its pools log about servers are the
master's to log; every other event it writes itself, tagged C{worker}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Iterable, Optional

import attrs

from twisted.internet.protocol import Protocol
from twisted.logger import Logger, globalLogBeginner

from txlb.balance.pool import Pool, Server, ServerState
from txlb.control.channel import CONTROL_FD, POOL_EVENTS, ControlChannel
from txlb.observe.aggregate import serverFigures, statsPart
from txlb.observe.logs import LogFile, TxlbLogObserver, accessTo, jsonLine, textLine

_log = Logger(namespace="txlb.service.worker")

_PIPE_BUF = 4096


def applyState(pool: Pool, entries: Iterable[list]) -> None:
    """
    Make C{pool}'s servers what the master says: C{entries} as
    L{txlb.service.workers.poolState} makes them, C{[name, address, weight, health,
    draining, removing, ejected]}.  A server the master has ejected is taken
    as down here until the master says otherwise; live counters stay.
    """
    seen = set()
    for name, address, weight, health, draining, removing, ejected in entries:
        seen.add(name)
        try:
            server: Optional[Server] = pool.server(name)
        except KeyError:
            server = None
        if server is not None and server.address != address:
            pool.remove(server)
            server = None
        if server is None:
            server = Server(name, address, weight)
            pool.add(server)
        if server.configuredWeight != weight:
            pool.setWeight(server, weight)
        wanted = ServerState.DOWN if ejected else ServerState.lookupByValue(health)
        if server.health is not wanted:
            pool.setHealth(server, wanted, "master")
        if removing and not server.removing:
            pool.delete(server)
        elif draining and not server.draining:
            pool.drain(server)
        elif not draining and server.draining:
            pool.enable(server)
    for server in list(pool):
        if server.name not in seen:
            pool.remove(server)


class _Lines:
    """
    A stream that writes whole lines only, in writes of at most
    C{PIPE_BUF} bytes where it can: the master and every worker write to
    the same log, and a line cut in two by a buffer boundary would
    interleave with another process's.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._parts: list[str] = []

    def write(self, text: str) -> None:
        self._parts.append(text)

    def flush(self) -> None:
        if not self._parts:
            return
        data = "".join(self._parts).encode("utf-8")
        self._parts = []
        while data:
            cut = len(data)
            if cut > _PIPE_BUF:
                cut = data.rfind(b"\n", 0, _PIPE_BUF) + 1 or data.find(b"\n", _PIPE_BUF) + 1 or len(data)
            chunk, data = data[:cut], data[cut:]
            while chunk:
                try:
                    chunk = chunk[os.write(self.fd, chunk):]
                except InterruptedError:
                    continue
                except OSError:
                    return  # the log is gone; nothing to tell it with

    def close(self) -> None:
        self.flush()
        os.close(self.fd)


class _LineFile(LogFile):
    """C{[log] path} for a worker: appended to (O_APPEND) in whole lines."""

    def _open(self):
        return _Lines(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))


def workerObserver(config, clock) -> TxlbLogObserver:
    """The log observer of a worker: the C{[log]} destination, in whole lines."""
    formatter = jsonLine if config.format == "json" else textLine
    stream = _Lines(1) if config.path == "-" else _LineFile(config.path)
    return TxlbLogObserver(stream, formatter, clock)


class Worker:
    """
    The worker's side of the channel, around its L{TxlbService}.
    """

    def __init__(self, service, reactor, number: int) -> None:
        self.service = service
        self.reactor = reactor
        self.number = number
        self.channel: Optional[ControlChannel] = None
        self.prepared = False
        self.serving = False
        self.stopping = False

    def observe(self, event: dict) -> None:
        """The log observer: events about servers go to the master, the rest to the log."""
        name = event.get("event")
        if name in POOL_EVENTS:
            if self.channel is not None:
                if name == "server_ejected":
                    self.channel.notify({"op": "ejected", "pool": event.get("pool"),
                                         "server": event.get("server"), "reason": event.get("reason", "")})
                elif name == "server_drained":
                    self.channel.notify({"op": "drained", "pool": event.get("pool"), "server": event.get("server")})
            return
        event["worker"] = self.number
        line = event.get("log_line")  # an access event's line, made once (txlb.observe.logs.emit)
        if line is not None:
            line["worker"] = self.number
        self.service.logObserver(event)

    def handle(self, message: dict) -> Any:
        op = message.get("op")
        if op == "state":
            self.applyState(message["pools"])
            return None
        if op == "listen":
            self.listen()
            return None
        if op == "snapshot":
            return self.snapshot(message.get("parts", ()), message.get("limit", 50))
        if op == "purge":
            return self.purge(message.get("service") or "", message.get("prefix") or "")
        if op == "stop":
            self.stop()
            return None
        raise ValueError(f"unknown control message {op!r}")

    def applyState(self, pools: dict) -> None:
        for name, entries in pools.items():
            pool = self.service.pools.get(name)
            if pool is not None:
                applyState(pool, entries)
        if not self.prepared:
            self.prepared = True
            self.channel.notify({"op": "prepared"})

    def listen(self) -> None:
        """Accept on the inherited sockets, from now on."""
        if not self.serving and not self.stopping:
            self.serving = True
            self.service.privilegedStartService()
            self.service.startService()
            self.channel.notify({"op": "ready", "pid": os.getpid()})

    def snapshot(self, parts: Iterable[str], limit: int) -> dict:
        service = self.service
        out: dict[str, Any] = {"pid": os.getpid()}
        for part in parts:
            if part == "servers":
                out["servers"] = serverFigures(service.pools, self.reactor.seconds())
            elif part == "metrics":
                out["metrics"] = service.metrics.exposition().decode("utf-8")
            elif part == "stats":
                out["stats"] = statsPart(service.metrics)
            elif part == "decisions":
                out["decisions"] = service.metrics.decisions.last(limit)
        return out

    def purge(self, service: str, prefix: str) -> dict:
        caches = self.service.metrics.caches()
        if service:
            caches = {service: caches[service]} if service in caches else {}
        return {name: cache.purge(prefix.encode("utf-8") or None) for name, cache in caches.items()}

    def stop(self) -> None:
        """Drain and exit (the reactor's shutdown stops the service)."""
        if not self.stopping:
            self.stopping = True
            if self.reactor.running:
                self.reactor.stop()


class _Control(Protocol):
    """The channel's transport: standard input from the master, fd 3 to it."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def connectionMade(self) -> None:
        self.channel = self.worker.channel = ControlChannel(self.transport.write, self.worker.handle,
                                                             self.transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def connectionLost(self, reason) -> None:
        self.channel.connectionLost()
        self.worker.stop()


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m txlb.service.worker",
                                     description="A txlb worker process; started by txlb itself.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--sockets", required=True, help="JSON: {listen: [fd, address family, backlog]}")
    parser.add_argument("--log", required=True, help="JSON: the master's [log] format and path")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    # A terminal's ^C and hangup reach the whole process group: the master
    # decides what they mean, and tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    from txlb.balance.schedulers import schedulerFactories
    from txlb.config import ConfigError, load
    from txlb.health import healthCheckFactories
    from txlb.service import TxlbService

    factories = schedulerFactories()
    healthFactories = healthCheckFactories()
    try:
        config = load(args.config, factories, healthFactories)
    except ConfigError as e:
        for line in e.lines():
            print(f"worker {args.worker}: {line}", file=sys.stderr)
        raise SystemExit(1)
    log = json.loads(args.log)
    # [log] format and path are the master's: they change only on restart.
    config = attrs.evolve(config, log=attrs.evolve(config.log, format=log["format"], path=log["path"]))
    sockets = {listen: tuple(entry) for listen, entry in json.loads(args.sockets).items()}
    observer = workerObserver(config.log, reactor)
    service = TxlbService(config, factories, reactor, healthFactories, role="worker", sockets=sockets,
                          logObserver=observer)
    worker = Worker(service, reactor, args.worker)
    globalLogBeginner.beginLoggingTo([worker.observe], redirectStandardIO=False)
    accessTo(observer, worker=args.worker)  # access events straight to the log, as worker.observe marks them
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(observer.reopen))

    def started() -> None:
        # After the reactor's own handlers, which it installs as it starts.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(worker.stop))

    def stopping():
        worker.stopping = True
        if service.running:
            return service.stopService()

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    StandardIO(_Control(worker), stdin=0, stdout=CONTROL_FD, reactor=reactor)
    reactor.run(installSignalHandlers=True)


if __name__ == "__main__":
    main()
