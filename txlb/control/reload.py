# -*- test-case-name: tests.test_reload -*-
"""
Reloading the config file: what changed between two configs, as data.

L{diffConfigs} compares the running config with a newly validated one and
says what a reload has to do: pools and services to add, remove or change,
listeners to open and close, and what only a restart can apply.
L{diffServers} compares the servers a pool has now (which the admin API
may have changed since the last load) with the servers the file lists.

Both are pure: they take frozen configs and plain records and return
frozen records.  L{txlb.service.TxlbService.reload} applies them, and the
C{config_reloaded} event and C{POST /api/reload} report them with
L{describe}.

The file wins: a server the admin API added that the file does not list is
drained and removed, a weight set through the API goes back to the file's.
A drain (without a delete) is kept: it is an operation on a running
server, like its health, not configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection, Iterable, Sequence

import attrs

if TYPE_CHECKING:  # records only: the config's readers are a layer above this one
    from txlb.config import Config, PoolConfig, ServerConfig, ServiceConfig


#: Pool settings a reload sets in place (the scheduler, health checks and
#: servers have their own entries in L{PoolDiff}).
POOL_SETTINGS = (
    "connect_timeout", "retries", "hash_key", "passive", "max_connections",
    "queue_timeout", "slow_start", "tls", "protocol",
)

#: Service settings a reload applies to new requests and connections.
SERVICE_SETTINGS = ("pool", "timeouts", "routes", "limits", "forwarded", "http2", "tls", "sticky", "header_rules",
                    "compress", "accept_proxy", "proxy_protocol", "access", "rate_limit")


@attrs.frozen
class PoolDiff:
    """
    A pool in both configs whose settings differ.

    @ivar scheduler: C{algorithm} or C{options} changed: a new scheduler,
        the servers keeping their state and counters.
    @ivar health: the C{health} table changed: the pool's checks restart.
    @ivar settings: the names of other changed settings (L{POOL_SETTINGS}).
    """

    name: str
    scheduler: bool = False
    health: bool = False
    settings: tuple[str, ...] = ()


@attrs.frozen
class ServiceDiff:
    """
    A service (by name) in both configs that differs.

    @ivar rebuild: C{protocol} or C{sticky} changed: new connections go to
        a new balancer, open ones finish on the old one.
    @ivar settings: the names of changed settings (L{SERVICE_SETTINGS}).
    """

    name: str
    rebuild: bool = False
    settings: tuple[str, ...] = ()
    listenAdded: tuple[str, ...] = ()
    listenRemoved: tuple[str, ...] = ()


@attrs.frozen
class ConfigDiff:
    """
    Everything that differs between two configs, in file order.

    @ivar listenAdded: listening endpoints (of services) to open.
    @ivar listenRemoved: those to close, once the new ones are open.
    @ivar restartNeeded: the sections whose changes only a restart applies.
    """

    poolsAdded: tuple[str, ...] = ()
    poolsRemoved: tuple[str, ...] = ()
    poolsChanged: tuple[PoolDiff, ...] = ()
    servicesAdded: tuple[str, ...] = ()
    servicesRemoved: tuple[str, ...] = ()
    servicesChanged: tuple[ServiceDiff, ...] = ()
    listenAdded: tuple[str, ...] = ()
    listenRemoved: tuple[str, ...] = ()
    admin: bool = False
    restartNeeded: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self != ConfigDiff()


@attrs.frozen
class ServerDiff:
    """
    What to do to a pool's live servers so that they are the file's.

    @ivar added: servers to add (checked first when the pool has checks).
    @ivar removed: names to drain, then remove.
    @ivar restored: names the admin API is deleting that the file lists:
        the delete is called off.
    @ivar reweighted: C{(name, weight)} for weights that differ.
    @ivar moved: servers whose address changed: they leave and join again
        under the same name, keeping their counters.
    """

    added: tuple[ServerConfig, ...] = ()
    removed: tuple[str, ...] = ()
    restored: tuple[str, ...] = ()
    reweighted: tuple[tuple[str, int], ...] = ()
    moved: tuple[ServerConfig, ...] = ()

    def __bool__(self) -> bool:
        return self != ServerDiff()


def listens(config: Config) -> dict[str, str]:
    """Every service listening endpoint of C{config}, to its service's name."""
    return {listen: s.name for s in config.services for listen in s.listen}


def _changed(old: object, new: object, names: Sequence[str]) -> tuple[str, ...]:
    return tuple(n for n in names if getattr(old, n) != getattr(new, n))


def diffPool(old: PoolConfig, new: PoolConfig) -> PoolDiff:
    """How a pool's settings changed (its servers: see L{diffServers})."""
    return PoolDiff(
        new.name,
        scheduler=(old.algorithm, old.options) != (new.algorithm, new.options),
        health=old.health != new.health,
        settings=_changed(old, new, POOL_SETTINGS),
    )


def diffService(old: ServiceConfig, new: ServiceConfig) -> ServiceDiff:
    return ServiceDiff(
        new.name,
        rebuild=(old.protocol, old.sticky) != (new.protocol, new.sticky),
        settings=_changed(old, new, ("protocol", *SERVICE_SETTINGS)),
        listenAdded=tuple(l for l in new.listen if l not in old.listen),
        listenRemoved=tuple(l for l in old.listen if l not in new.listen),
    )


def diffConfigs(old: Config, new: Config) -> ConfigDiff:
    """
    What a reload from C{old} to C{new} changes.  Servers are compared
    with the running pools by L{diffServers}, not here: the admin API may
    have changed them since C{old} was loaded.
    """
    poolsChanged = []
    for name, pool in new.pools.items():
        if name in old.pools:
            d = diffPool(old.pools[name], pool)
            if d != PoolDiff(name):
                poolsChanged.append(d)
    oldServices = {s.name: s for s in old.services}
    newServices = {s.name: s for s in new.services}
    servicesChanged = []
    for service in new.services:
        if service.name in oldServices:
            d = diffService(oldServices[service.name], service)
            if d != ServiceDiff(service.name):
                servicesChanged.append(d)
    oldListens, newListens = listens(old), listens(new)
    restart = []
    if (old.log.format, old.log.path) != (new.log.format, new.log.path):
        restart.append("log")
    if old.txlb.workers != new.txlb.workers:
        restart.append("txlb.workers")
    for section in ("demo", "sessions", "cluster", "dns"):
        if getattr(old, section) != getattr(new, section):
            restart.append(section)
    return ConfigDiff(
        poolsAdded=tuple(n for n in new.pools if n not in old.pools),
        poolsRemoved=tuple(n for n in old.pools if n not in new.pools),
        poolsChanged=tuple(poolsChanged),
        servicesAdded=tuple(n for n in newServices if n not in oldServices),
        servicesRemoved=tuple(n for n in oldServices if n not in newServices),
        servicesChanged=tuple(servicesChanged),
        listenAdded=tuple(l for l in newListens if l not in oldListens),
        listenRemoved=tuple(l for l in oldListens if l not in newListens),
        admin=old.admin != new.admin,
        restartNeeded=tuple(restart),
    )


def diffServers(
    live: Iterable[ServerConfig], removing: Collection[str], wanted: Iterable[ServerConfig]
) -> ServerDiff:
    """
    What turns a pool's C{live} servers into the C{wanted} ones.

    @param live: every server the pool has now (name, address, the weight
        the operator set), the API's additions included.
    @param removing: the names among C{live} that an admin C{DELETE} is
        draining away.
    """
    now = {s.name: s for s in live}
    want = {s.name: s for s in wanted}
    added, restored, reweighted, moved = [], [], [], []
    for name, server in want.items():
        current = now.get(name)
        if current is None:
            added.append(server)
            continue
        if name in removing:
            restored.append(name)
        if current.address != server.address:
            moved.append(server)
        if current.weight != server.weight:
            reweighted.append((name, server.weight))
    removed = tuple(n for n in now if n not in want and n not in removing)
    return ServerDiff(tuple(added), removed, tuple(restored), tuple(reweighted), tuple(moved))


def describe(diff: ConfigDiff, servers: Sequence[tuple[str, ServerDiff]] = ()) -> list[str]:
    """
    One short line per change, for the C{config_reloaded} event and the
    answer to C{POST /api/reload}; nothing when nothing changed.

    @param servers: C{(pool, ServerDiff)} for the pools whose servers changed.
    """
    lines = [f"pool {n} added" for n in diff.poolsAdded]
    lines += [f"pool {n} removed" for n in diff.poolsRemoved]
    for p in diff.poolsChanged:
        if p.scheduler:
            lines.append(f"pool {p.name}: new scheduler (algorithm or options)")
        if p.health:
            lines.append(f"pool {p.name}: health checks restarted")
        if p.settings:
            lines.append(f"pool {p.name}: {', '.join(p.settings)} changed")
    for pool, s in servers:
        lines += [f"pool {pool}: server {c.name} added" for c in s.added]
        lines += [f"pool {pool}: server {n} removed (after draining)" for n in s.removed]
        lines += [f"pool {pool}: server {n} kept (its removal called off)" for n in s.restored]
        lines += [f"pool {pool}: server {c.name} moved to {c.address}" for c in s.moved]
        lines += [f"pool {pool}: server {n} weight {w}" for n, w in s.reweighted]
    lines += [f"service {n} added" for n in diff.servicesAdded]
    lines += [f"service {n} removed" for n in diff.servicesRemoved]
    for s in diff.servicesChanged:
        if s.settings:
            lines.append(f"service {s.name}: {', '.join(s.settings)} changed")
    lines += [f"listening on {l}" for l in diff.listenAdded]
    lines += [f"no longer listening on {l}" for l in diff.listenRemoved]
    if diff.admin:
        lines.append("admin settings changed")
    lines += [f"{section}: changed, applied at the next restart" for section in diff.restartNeeded]
    return lines


def serversOnly(old: Config, new: Config) -> bool:
    """
    Whether C{new} differs from C{old} in the pools' server lists and
    nothing else: what worker processes (L{txlb.service.workers}) can take as new
    pool state, without being started again.
    """
    def withoutServers(config: Config) -> Config:
        pools = {name: attrs.evolve(p, servers=()) for name, p in config.pools.items()}
        return attrs.evolve(config, pools=pools)

    return old != new and withoutServers(old) == withoutServers(new)
