# -*- test-case-name: tests.test_cluster -*-
"""
Several txlb nodes run as one (SPEC section 2, C{[cluster]}), coordinated
through Redis and nothing else: txlb never runs a consensus protocol of its
own.

Three things go through Redis:

  - B{membership}: every node writes a heartbeat record (node, address,
    version, time) every C{heartbeat}, expiring after C{failover_after}.
    The records that exist are the live nodes: C{/api/cluster} lists them and
    the DNS responder answers with their addresses.

  - B{the leader lease} (C{active-passive}): one key, set if absent with an
    expiry of C{failover_after}, renewed on each heartbeat only while it still
    holds this process's value (a Lua script, so the check and the renewal
    are one step).  The holder listens on the service ports; the others keep
    only their admin API.  When the lease expires a passive node takes it,
    runs C{on_active}, opens its listeners and logs C{failover}.

    I{Fencing}: a renewal counts from the moment it was sent, and Redis
    expires the key no earlier than that plus C{failover_after}.  An active
    node that has not renewed by a margin before that time closes its
    listeners, so it has stopped serving before any other node can hold the
    lease: two actives never overlap, whatever the network did.

  - B{admin changes} (C{active-active}): every node serves; a drain, enable,
    weight change, add or delete made through one node's admin API is
    published on a channel and applied by the others.

The decisions are in L{Cluster}, which talks to an L{IClusterStore};
L{RedisStore} is that store on Redis (L{RedisConnection} moves the bytes).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from txlb import __version__
from txlb.balance.pool import Pool, Server
from txlb.net.endpoints import connectFailure

if TYPE_CHECKING:  # records only: the config's readers are a layer above this one
    from txlb.config import ClusterConfig

_log = Logger(namespace="txlb.control.cluster")

#: Every key and channel txlb uses starts with this.
PREFIX = "txlb:cluster:"


class IClusterStore(Interface):
    """
    Where the nodes of a cluster meet.  Every method returns a L{Deferred}
    that fails when the store cannot be reached.
    """

    def heartbeat(node: str, record: str, ttl: float) -> Deferred:
        """Write C{node}'s record, to expire after C{ttl} seconds."""

    def leave(node: str) -> Deferred:
        """Remove C{node}'s record now (a clean shutdown)."""

    def members() -> Deferred:
        """The live records, as a list of strings."""

    def claim(value: str, ttl: float) -> Deferred:
        """
        Take the lease if nobody holds it, or renew it if C{value} holds it,
        for C{ttl} seconds.  Fires with C{(ours, holder)}: whether C{value}
        holds it now, and the value that does (L{None} if none).
        """

    def release(value: str) -> Deferred:
        """Give the lease up if C{value} holds it."""

    def publish(message: str) -> Deferred:
        """Send C{message} to every subscriber."""

    def subscribe(callback: Callable[[str], None]) -> None:
        """Call C{callback} with every published message from now on."""


_HEARTBEAT = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

_LEAVE = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

# Node names are the members of a set; a member whose record has expired is
# dropped from the set as it is found.
_MEMBERS = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local record = redis.call('GET', ARGV[1] .. name)
  if record then
    table.insert(out, record)
  else
    redis.call('SREM', KEYS[1], name)
  end
end
return out
"""

# Set-if-absent or renew-if-ours, as one compare-and-set step.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1]}
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, holder}
end
return {0, holder}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@implementer(IClusterStore)
class RedisStore:
    """
    L{IClusterStore} on Redis.

    @param execute: runs one Redis command (C{execute("GET", key)}) and
        returns a L{Deferred} of its reply.
    @param subscriber: called with C{(channel, callback)} to receive what is
        published on C{channel}.
    """

    def __init__(
        self,
        execute: Callable[..., Deferred],
        subscriber: Optional[Callable[[str, Callable[[str], None]], None]] = None,
        prefix: str = PREFIX,
    ) -> None:
        self.execute = execute
        self.subscriber = subscriber
        self.prefix = prefix
        self.channel = prefix + "changes"

    def _eval(self, script: str, keys: list[str], *args: Any) -> Deferred:
        return self.execute("EVAL", script, len(keys), *keys, *args)

    def heartbeat(self, node: str, record: str, ttl: float) -> Deferred:
        keys = [self.prefix + "node:" + node, self.prefix + "nodes"]
        return self._eval(_HEARTBEAT, keys, node, record, max(1, round(ttl * 1000)))

    def leave(self, node: str) -> Deferred:
        return self._eval(_LEAVE, [self.prefix + "node:" + node, self.prefix + "nodes"], node)

    def members(self) -> Deferred:
        d = self._eval(_MEMBERS, [self.prefix + "nodes"], self.prefix + "node:")
        return d.addCallback(lambda records: [_text(r) for r in records or ()])

    def claim(self, value: str, ttl: float) -> Deferred:
        d = self._eval(_CLAIM, [self.prefix + "leader"], value, max(1, round(ttl * 1000)))
        return d.addCallback(lambda reply: (int(reply[0]) == 1, _text(reply[1]) or None))

    def release(self, value: str) -> Deferred:
        return self._eval(_RELEASE, [self.prefix + "leader"], value)

    def publish(self, message: str) -> Deferred:
        return self.execute("PUBLISH", self.channel, message)

    def subscribe(self, callback: Callable[[str], None]) -> None:
        if self.subscriber is not None:
            self.subscriber(self.channel, lambda message: callback(_text(message)))


class _Factory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], Any]) -> None:
        self.build = build

    def buildProtocol(self, addr):
        protocol = self.build()
        protocol.factory = self
        return protocol


class RedisConnection(Service):
    """
    Two connections to Redis at a client endpoint string, kept up (and
    re-established with backoff) while the service runs: one for commands
    and one subscribed to channels, as Redis wants subscribers apart.

    @param timeout: how long a command may wait for its reply, so that a
        Redis that hangs looks like one that is down.
    """

    def __init__(self, reactor, address: str, timeout: float = 1.0) -> None:
        import txredisapi  # an optional dependency: txlb[redis]

        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        self._channels: dict[str, Callable[[Any], None]] = {}
        retry = backoffPolicy(initialDelay=0.1, maxDelay=2.0)
        endpoint = clientFromString(reactor, address)

        connection = self

        class Subscriber(txredisapi.SubscriberProtocol):
            def connectionMade(self):
                d = super().connectionMade()
                if connection._channels:
                    self.subscribe(list(connection._channels))
                return d

            def messageReceived(self, pattern, channel, message):
                callback = connection._channels.get(_text(channel))
                if callback is not None:
                    callback(message)

        self._commands = ClientService(
            endpoint, _Factory(lambda: txredisapi.RedisProtocol(convertNumbers=False)),
            retryPolicy=retry, clock=reactor,
        )
        self._subscriber = ClientService(endpoint, _Factory(Subscriber), retryPolicy=retry, clock=reactor)

    def execute(self, *args: Any) -> Deferred:
        d = self._commands.whenConnected(failAfterFailures=1)
        d.addCallback(lambda protocol: protocol.execute_command(*args))
        d.addTimeout(self.timeout, self.reactor)
        return d

    def subscribe(self, channel: str, callback: Callable[[Any], None]) -> None:
        """Call C{callback} with each message on C{channel}, across reconnections."""
        self._channels[channel] = callback
        if self._subscriber.running:
            self._subscriber.whenConnected().addCallback(lambda p: p.subscribe(channel))
        elif self.running:
            self._subscriber.startService()

    def startService(self) -> None:
        super().startService()
        self._commands.startService()
        if self._channels:
            self._subscriber.startService()

    def stopService(self) -> Deferred:
        super().stopService()
        stops = [self._commands.stopService()]
        if self._subscriber.running:
            stops.append(self._subscriber.stopService())
        return defer.gatherResults(stops)


class IListeners(Interface):
    """What an active-passive node opens when it becomes active."""

    def openListeners() -> Optional[Deferred]:
        """Listen on the service ports."""

    def closeListeners() -> Optional[Deferred]:
        """Stop listening on the service ports (open connections may finish)."""


class _Command(ProcessProtocol):
    """C{on_active} running: its output is dropped, its exit logged."""

    def __init__(self, command: str, done: Deferred) -> None:
        self.command = command
        self.done = done

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        _log.info(
            "on_active {command!r} exited with {exitCode}",
            event="on_active", command=self.command, exitCode=code,
        )
        self.done.callback(code)


def spawnCommand(reactor, command: str) -> Deferred:
    """
    Run C{command} with C{/bin/sh -c}, without blocking; fires with its exit
    code (L{None} if it died of a signal).
    """
    done: Deferred = Deferred()
    reactor.spawnProcess(
        _Command(command, done), "/bin/sh", ["/bin/sh", "-c", command],
        env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"},
    )
    return done


def applyChange(pools: Mapping[str, Pool], change: Mapping[str, Any]) -> bool:
    """
    Apply an admin change published by another node to C{pools}.  Returns
    whether it applied; a change naming what this node does not have (its
    config differs, or the server is already gone) is skipped.
    """
    op = change.get("op")
    pool = pools.get(change.get("pool"))
    if pool is None:
        return False
    name = change.get("server")
    try:
        server = pool.server(name)
    except KeyError:
        server = None
    if op == "add":
        if server is not None:
            return False
        pool.add(Server(name, change["address"], int(change.get("weight", 1))))
        return True
    if server is None:
        return False
    if op == "drain":
        pool.drain(server)
    elif op == "enable":
        if server.removing:
            return False
        pool.enable(server)
    elif op == "weight":
        pool.setWeight(server, int(change["weight"]))
    elif op == "delete":
        pool.delete(server)
    else:
        return False
    return True


class Cluster(Service):
    """
    This node's part in the cluster: its heartbeat, its view of the others,
    the lease in C{active-passive} mode and admin changes in
    C{active-active} mode.

    @param listeners: an L{IListeners}; used in C{active-passive} mode only.
    @param pools: returns the live pools (they may be replaced on reload).
    @param runCommand: runs C{on_active}; returns a L{Deferred} that fires
        when it exits.  Defaults to L{spawnCommand} on C{clock}.

    @ivar active: whether this node serves traffic now.
    @ivar leader: the node holding the lease, as last seen (C{active-passive}).
    @ivar nodes: the live nodes' records, as last read.
    """

    def __init__(
        self,
        config: ClusterConfig,
        store: IClusterStore,
        clock,
        listeners: Optional[IListeners] = None,
        pools: Callable[[], Mapping[str, Pool]] = dict,
        runCommand: Optional[Callable[[str], Deferred]] = None,
        version: str = __version__,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.listeners = listeners
        self.pools = pools
        self.runCommand = runCommand or (lambda command: spawnCommand(clock, command))
        self.version = version
        self.passiveMode = config.mode == "active-passive"
        self.active = not self.passiveMode
        self.leader: Optional[str] = None
        self.nodes: list[dict[str, Any]] = []
        self._viewAt: Optional[float] = None
        # Another process, even of the same node name, never passes for us.
        self._token = secrets.token_hex(8)
        self._lease = f"{config.node} {self._token}"
        self._holding = False
        self._promoting = False
        self._fence = None
        self._reachable = True
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    # The margin by which a lease is given up before Redis would expire it:
    # renewals (one every heartbeat) keep landing well before the deadline.
    @property
    def _margin(self) -> float:
        return (self.config.failover_after - self.config.heartbeat) / 2

    def startService(self) -> None:
        super().startService()
        if self.config.mode == "active-active":
            self.store.subscribe(self._messageReceived)
        self._loop.start(self.config.heartbeat, now=True)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self._cancelFence()
        steps = [self.store.leave(self.config.node)]
        if self._holding:
            self._holding = False
            steps.append(self.store.release(self._lease))
        d = defer.gatherResults([s.addErrback(lambda f: None) for s in steps])
        return d.addCallback(lambda _: None)

    # The heartbeat.

    def record(self) -> dict[str, Any]:
        return {
            "node": self.config.node,
            "address": self.config.address,
            "version": self.version,
            "time": self.clock.seconds(),
            "mode": self.config.mode,
        }

    def _tick(self) -> None:
        beat = self.store.heartbeat(self.config.node, json.dumps(self.record()), self.config.failover_after)
        beat.addCallbacks(self._reached, self._unreachable)
        if self.passiveMode:
            self._claim()
        self.store.members().addCallbacks(self._gotMembers, lambda f: None)

    def _reached(self, _=None) -> None:
        if not self._reachable:
            self._reachable = True
            _log.info("Redis is reachable again", event="cluster_redis", reachable=True)

    def _unreachable(self, failure: Failure) -> None:
        if self._reachable:
            self._reachable = False
            _log.warn(
                "cannot reach Redis at {redis}: {error}",
                event="cluster_redis", reachable=False, redis=self.config.redis,
                error=connectFailure(failure),  # without Twisted's "An error occurred while connecting:"
            )

    def _gotMembers(self, records: list[str]) -> None:
        nodes = []
        for raw in records:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("node"), str):
                nodes.append(record)
        self.nodes = sorted(nodes, key=lambda r: r["node"])
        self._viewAt = self.clock.seconds()

    def fresh(self) -> bool:
        """Whether the view of the other nodes is recent enough to trust."""
        return self._viewAt is not None and self.clock.seconds() - self._viewAt <= self.config.failover_after

    def liveNodes(self) -> list[dict[str, Any]]:
        """
        The live nodes, each marked C{active} (serving).  Without a recent
        view of Redis, only this node is known to be alive.
        """
        nodes = self.nodes if self.fresh() else [self.record()]
        out = []
        for record in nodes:
            mine = record["node"] == self.config.node
            if self.passiveMode:
                active = self.active if mine else record["node"] == self.leader and self.fresh()
            else:
                active = True
            out.append({**record, "active": bool(active)})
        return out

    def addresses(self) -> list[str]:
        """The addresses DNS gives out: the nodes that serve."""
        return [n["address"] for n in self.liveNodes() if n["active"] and n.get("address")]

    def status(self) -> dict[str, Any]:
        """C{GET /api/cluster}."""
        return {
            "mode": self.config.mode,
            "node": self.config.node,
            "active": self.active,
            "leader": self.leader if self.passiveMode else None,
            "nodes": self.liveNodes(),
        }

    # The lease (active-passive).

    def _claim(self) -> None:
        sent = self.clock.seconds()
        d = self.store.claim(self._lease, self.config.failover_after)
        d.addCallbacks(self._claimed, self._claimFailed, callbackArgs=(sent,))

    def _claimed(self, result: tuple[bool, Optional[str]], sent: float) -> None:
        ours, holder = result
        previous = self.leader
        self.leader = holder.split(" ", 1)[0] if holder else None
        if not self.running:
            return
        if not ours:
            self._holding = False
            if self.active or self._promoting:
                self._stopServing(f"the lease is held by {self.leader}")
            return
        self._holding = True
        deadline = sent + self.config.failover_after - self._margin
        if deadline <= self.clock.seconds():
            # The answer came too late to count: the next renewal will.
            return
        self._armFence(deadline)
        if not self.active and not self._promoting:
            self._promote(previous if previous != self.config.node else None)

    def _claimFailed(self, failure: Failure) -> None:
        self._unreachable(failure)

    def _armFence(self, deadline: float) -> None:
        self._cancelFence()
        self._fence = self.clock.callLater(deadline - self.clock.seconds(), self._fenced)

    def _cancelFence(self) -> None:
        if self._fence is not None and self._fence.active():
            self._fence.cancel()
        self._fence = None

    def _fenced(self) -> None:
        self._fence = None
        self._holding = False
        self._stopServing("the lease could not be renewed before it would expire")

    def _stopServing(self, reason: str) -> None:
        self._cancelFence()
        wasServing = self.active or self._promoting
        self.active = False
        self._promoting = False
        if wasServing:
            _log.warn(
                "node {node} stops serving: {reason}",
                event="cluster_passive", node=self.config.node, reason=reason,
            )
            if self.listeners is not None:
                maybeDeferred(self.listeners.closeListeners).addErrback(
                    lambda f: _log.failure("closing the listeners", f, event="cluster_error")
                )

    def _promote(self, previous: Optional[str]) -> None:
        """
        The lease is ours: claim the address (C{on_active}, awaited so that
        listeners can bind to it, for at most C{failover_after}), then listen.
        """
        self._promoting = True
        if self.config.on_active:
            d = self.runCommand(self.config.on_active)
            bound: Deferred = Deferred()
            call = self.clock.callLater(self.config.failover_after, lambda: bound.called or bound.callback(None))

            def exited(result):
                if call.active():
                    call.cancel()
                if not bound.called:
                    bound.callback(None)

            d.addBoth(exited)
            d = bound
        else:
            d = defer.succeed(None)
        d.addCallback(lambda _: self._open(previous))

    def _open(self, previous: Optional[str]):
        if not self._promoting:
            return None  # fenced or lost meanwhile
        d = maybeDeferred(self.listeners.openListeners) if self.listeners is not None else defer.succeed(None)

        def opened(_):
            if not self._promoting:
                return
            self._promoting = False
            self.active = True
            _log.info(
                "node {node} is active", event="cluster_active", node=self.config.node,
                previous=previous,
            )
            if previous is not None:
                _log.info(
                    "failover from {failedLoadBalancer} to {newActiveLoadBalancer}: {failoverStatus}",
                    event="failover", failedLoadBalancer=previous,
                    newActiveLoadBalancer=self.config.node, failoverStatus="completed",
                )

        def failed(f: Failure):
            self._promoting = False
            self._cancelFence()
            _log.failure("node {node} cannot open its listeners; it gives the lease up", f,
                         event="cluster_error", node=self.config.node)
            if previous is not None:
                _log.error(
                    "failover from {failedLoadBalancer} to {newActiveLoadBalancer}: {failoverStatus}",
                    event="failover", failedLoadBalancer=previous,
                    newActiveLoadBalancer=self.config.node, failoverStatus="failed",
                    error=f.getErrorMessage(),
                )
            self._holding = False
            self.store.release(self._lease).addErrback(lambda _: None)
            if self.listeners is not None:
                maybeDeferred(self.listeners.closeListeners).addErrback(lambda _: None)

        return d.addCallbacks(opened, failed)

    # Admin changes (active-active).

    def publishChange(self, change: Mapping[str, Any]) -> None:
        """
        Tell the other nodes about an admin change made here.  Only
        C{active-active} nodes share them; a Redis that cannot be reached
        loses the change for the others (logged).
        """
        if self.config.mode != "active-active" or not self.running:
            return
        message = json.dumps({"origin": self._token, "node": self.config.node, **change})

        def lost(f: Failure) -> None:
            _log.warn(
                "admin change not shared with the other nodes: {error}",
                event="cluster_change_lost", change=dict(change), error=connectFailure(f),
            )

        self.store.publish(message).addErrback(lost)

    def _messageReceived(self, message: str) -> None:
        try:
            change = json.loads(message)
        except ValueError:
            return
        if not isinstance(change, dict) or change.get("origin") == self._token:
            return
        try:
            applied = applyChange(self.pools(), change)
        except Exception:
            _log.failure("cannot apply {change}", change=change, event="cluster_error")
            return
        _log.info(
            "{op} {pool}/{server} from node {origin}",
            event="cluster_change", op=change.get("op"), pool=change.get("pool"),
            server=change.get("server"), origin=change.get("node"), applied=applied,
        )


class Standalone:
    """What C{GET /api/cluster} says of a node that is in no cluster."""

    def __init__(self, config: ClusterConfig, clock, version: str = __version__) -> None:
        self.config = config
        self.clock = clock
        self.version = version

    def status(self) -> dict[str, Any]:
        me = {"node": self.config.node, "address": self.config.address, "version": self.version,
              "time": self.clock.seconds(), "mode": "standalone", "active": True}
        return {"mode": "standalone", "node": self.config.node, "active": True, "leader": None, "nodes": [me]}

    def addresses(self) -> list[str]:
        return [self.config.address]

    def publishChange(self, change: Mapping[str, Any]) -> None:
        pass


class ClusterService(Service):
    """
    A non-standalone node's cluster part: its Redis connection and its
    L{Cluster}, stopped in that order reversed so that the lease is given up
    before the connection closes.
    """

    def __init__(self, config: ClusterConfig, reactor, listeners: Optional[IListeners],
                 pools: Callable[[], Mapping[str, Pool]]) -> None:
        self.connection = RedisConnection(reactor, config.redis, timeout=min(1.0, config.heartbeat))
        self.store = RedisStore(self.connection.execute, self.connection.subscribe)
        self.cluster = Cluster(config, self.store, reactor, listeners, pools)
        self._stopped: Optional[Deferred] = None

    def startService(self) -> None:
        super().startService()
        self.connection.startService()
        self.cluster.startService()

    def stopService(self) -> Deferred:
        """
        Leave the cluster.  Calling it again (as a parent does after an
        early call) waits for the same leaving.
        """
        if self._stopped is None:
            super().stopService()
            d = self._stopped = self.cluster.stopService()
            d.addCallback(lambda _: self.connection.stopService())
            d.addCallback(lambda _: None)
        done: Deferred = Deferred()
        self._stopped.addBoth(lambda result: (done.callback(None), result)[1])
        return done
