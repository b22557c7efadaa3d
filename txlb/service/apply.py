# -*- test-case-name: tests.test_reload -*-
"""
Applying a config change to the running service tree (C{SIGHUP},
C{POST /api/reload}).

L{Reloads.reload} reads the file again; what changed is data
(L{txlb.control.reload}); L{Reloads.apply} makes it so in two steps.  First
everything that can fail is done aside (certificates, the admin token,
schedulers, health-check kinds, new ports): when one fails nothing
changed and the running config stays.  Then the change is committed, which
cannot fail: pools first (services point at them), then services, then
listeners and the admin API.
"""

from __future__ import annotations

from typing import Optional

import attrs

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure

from txlb.balance.pool import Pool, Server
from txlb.config import Config, ConfigError, ServerConfig, load
from txlb.control.admin import readToken
from txlb.control.reload import ConfigDiff, ServerDiff, describe, diffConfigs, diffServers, serversOnly
from txlb.http.frontend import HTTPProxyFactory
from txlb.net.endpoints import sameSocket
from txlb.net.tls import filesDigest
from txlb.service.build import buildPool, poolSettings, serverTLS, warnUnverified
from txlb.service.ports import ListenError, listenNow, newEntry, stopListening
from txlb.udp import UDPBalancer

_log = Logger(namespace="txlb")


class Refused(Exception):
    """A reload that validated cannot be applied (a port, a certificate)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors)
        self.errors = errors


@attrs.frozen
class Reloaded:
    """
    What a reload did.  C{errors} is empty when it was applied, else the
    problems (one line each) and nothing changed.
    """

    path: str
    errors: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


class Reloads:
    """The reloads of one service tree, C{tree} (a L{txlb.service.TxlbService}), one at a time."""

    def __init__(self, tree) -> None:
        self.tree = tree
        self._lock = DeferredLock()
        #: What the files each pool's C{tls} names held at the last reload
        #: (L{filesDigest}): certificates renewed in place, under the same
        #: path, leave the config as it was, and only this tells.
        self.tlsFiles: dict[str, bytes] = _tlsFiles(tree.config)
        #: The pools whose TLS files the last L{apply} found renewed.
        self.renewed: tuple[str, ...] = ()

    def reload(self) -> Deferred:
        """
        Read the config file again; when it validates (as at startup,
        plugins included) apply the difference in place, else keep the
        running config.  Logs C{config_reloaded} or C{config_rejected}.

        @return: a L{Deferred} firing with a L{Reloaded} (never failing).
        """
        return self._lock.run(self._notified)

    def _notified(self) -> Reloaded:
        """L{_reload}, with systemd told and the reload metrics set."""
        systemd = self.tree.systemd
        if systemd is not None:
            systemd.reloading()
        try:
            result = self._reload()
        finally:
            if systemd is not None:
                systemd.reloaded()
        self.tree.metrics.reloaded(result.ok, self.tree.reactor.seconds())
        return result

    def _reload(self) -> Reloaded:
        tree = self.tree
        path = tree.config.path
        old = tree.config
        try:
            new = load(path, tree.factories, tree.healthFactories)
            changes = self.apply(new)
        except ConfigError as e:
            return _rejected(path, e.lines())
        except Refused as e:
            return _rejected(path, e.errors)
        except Exception:
            _log.failure("reloading {path}", path=path, event="config_reload_failed")
            return _rejected(path, ["internal error while applying the config (see the log)"])
        _log.info(
            "config {path} reloaded: {count} changes", event="config_reloaded",
            path=path, errors=[], changes=changes, count=len(changes),
        )
        if tree.workers is not None:
            # Servers only (and no certificates to read again, nor pool TLS
            # files renewed) are sent to the workers as state; anything else
            # starts new workers, which read the file again, and stops the
            # old ones once the new accept.
            if serversOnly(old, new) and not any(s.tls is not None for s in new.services) and not self.renewed:
                tree.workers.changed()
            else:
                tree.workers.restartAll()
        return Reloaded(path, (), tuple(changes))

    def apply(self, new: Config) -> list[str]:
        """
        Make the running service what C{new} (validated) says, in place;
        return a line per change.  When something cannot be done,
        L{Refused} is raised and nothing changed.
        """
        diff = diffConfigs(self.tree.config, new)
        prepared = self._prepare(new, diff)
        servers = self._commit(new, diff, prepared)
        self.renewed = prepared["renewed"]
        return describe(diff, servers) + [f"pool {name}: tls files changed" for name in self.renewed]

    def _prepare(self, new: Config, diff: ConfigDiff) -> dict:
        tree = self.tree
        errors: list[str] = []
        tls, schedulers, checks, pools = {}, {}, {}, {}
        for i, service in enumerate(new.services):
            try:
                tls[service.name] = serverTLS(service, tree.metrics)
            except Exception as e:
                errors.append(f"services[{i}].tls: {e}")
        for p in diff.poolsChanged:
            config = new.pools[p.name]
            try:
                if p.scheduler:
                    schedulers[p.name] = tree.factories[config.algorithm](config.options)
                if p.health:
                    checks[p.name] = tree.healthChecksFor(tree.pools[p.name], config)
            except Exception as e:
                errors.append(f"pools.{p.name}: {e}")
        for name in diff.poolsAdded:
            try:
                pools[name] = buildPool(new.pools[name], tree.factories, tree.reactor)
                checks[name] = tree.healthChecksFor(pools[name], new.pools[name])
            except Exception as e:
                errors.append(f"pools.{name}: {e}")
        token = None
        if new.admin is not None and new.admin.token_file:
            try:
                token = readToken(new.admin.token_file)
            except ValueError as e:
                errors.append(f"admin.token_file: {e}")
        if errors:
            raise Refused(errors)
        opened: dict[str, object] = {}
        adminPort = site = None
        try:
            if tree.listening:
                for address in diff.listenAdded:
                    for running in list(tree.ports):
                        if running in diff.listenRemoved and sameSocket(address, running):
                            raise Refused([
                                f"{address!r} is the socket {running!r} listens on, written differently: "
                                "write it the same way, or move it in two reloads"
                            ])
                    entry = tree.entries[address] = tree.entries.get(address) or newEntry(address)
                    opened[address] = tree.listenService(_ownerIn(new, address), address, entry, _lateFailure)
            if new.admin is not None and new.admin.listen != _adminListen(tree.config):
                site = tree.admin or tree.adminSite(token)
                adminPort = listenNow(tree.reactor, "admin", new.admin.listen, site, _lateFailure)
        except (ListenError, Refused) as e:
            for port in opened.values():
                stopListening(port)
            for address in opened:
                tree.entries.pop(address, None)
            raise Refused(e.errors if isinstance(e, Refused) else [str(e.code).removeprefix("txlb: ")])
        tlsFiles = _tlsFiles(new)
        renewed = tuple(name for name, digest in tlsFiles.items()
                        if name in tree.pools and name not in pools and tree.pools[name].tls == new.pools[name].tls
                        and self.tlsFiles.get(name) != digest)
        return dict(tls=tls, schedulers=schedulers, checks=checks, pools=pools, token=token,
                    opened=opened, adminPort=adminPort, adminSite=site, tlsFiles=tlsFiles, renewed=renewed)

    def _commit(self, new: Config, diff: ConfigDiff, prepared: dict) -> list[tuple[str, ServerDiff]]:
        tree = self.tree
        old, tree.config = tree.config, new
        # Pools first: services point at them.
        for name in diff.poolsRemoved:
            tree.stopHealth(name)
        live = {name: prepared["pools"].get(name) or tree.pools[name] for name in new.pools}
        tree.pools.clear()
        tree.pools.update(live)  # in the file's order, for the admin API
        for p in diff.poolsChanged:
            pool, config = tree.pools[p.name], new.pools[p.name]
            pool.configure(**poolSettings(config))
            if pool.tls != config.tls or pool.protocol != config.protocol:
                # Connections made the old way serve no new request.
                tree.connections.retire(pool)
            if pool.tls != config.tls:
                pool.tls = config.tls
                warnUnverified(config)
            pool.protocol = config.protocol
            if p.scheduler:
                pool.setScheduler(config.algorithm, prepared["schedulers"][p.name])
        for name in prepared["renewed"]:
            # The same tls table, new files under its paths: the settings
            # made from the old ones are dropped, and connections made with
            # them serve no new request, as for a changed table.
            tree.endpoints.forget(new.pools[name].tls)
            tree.connections.retire(tree.pools[name])
        self.tlsFiles = prepared["tlsFiles"]
        for name, checks in prepared["checks"].items():
            tree.stopHealth(name)
            tree.startHealth(checks)
        servers = []
        for name, config in new.pools.items():
            if name not in diff.poolsAdded:
                changed = applyServers(tree.pools[name], config.servers)
                if changed.moved:
                    tree.connections.retire(tree.pools[name].server(c.name) for c in changed.moved)
                if changed:
                    servers.append((name, changed))
        # Services.
        tree.sessionsFor(new)
        tree.policies.configure(new)
        for name in diff.servicesRemoved:
            self._retire(tree.balancers.pop(name).factory)
            tree.metrics.services.pop(name, None)
        rebuilt = {s.name for s in diff.servicesChanged if s.rebuild}
        balancers = {}
        for service in new.services:
            current = tree.balancers.get(service.name)
            if current is None or service.name in rebuilt:
                if current is not None:
                    self._retire(current.factory)
                factory = tree.build.make(service)
            else:
                factory = current.factory
                tree.build.update(factory, service)
            tree.addBalancer(service, factory, prepared["tls"][service.name])
            balancers[service.name] = tree.balancers.pop(service.name)
        tree.balancers.clear()
        tree.balancers.update(balancers)
        # Listeners: new ones are open; point every port at its service,
        # then close the ones no longer wanted.
        tree.pointEntries()
        tree.ports.update(prepared["opened"])
        for address in prepared["opened"]:
            _log.info("service {service} listening on {listen}", event="listening",
                      service=tree.serviceOn(address), listen=address)
        for address in diff.listenRemoved:
            tree.entries.pop(address, None)
            port = tree.ports.pop(address, None)
            if port is not None:
                stopListening(port)
                _log.info("no longer listening on {listen}", event="stopped_listening", listen=address)
        # The admin API.
        if prepared["adminPort"] is not None:
            tree.admin = prepared["adminSite"]
            tree.admin.resource.cluster = tree.cluster
            oldPort, tree.adminPort = tree.adminPort, prepared["adminPort"]
            if oldPort is not None:
                stopListening(oldPort)
            _log.info("service {service} listening on {listen}", event="listening",
                      service="admin", listen=new.admin.listen)
        elif new.admin is None and tree.adminPort is not None:
            stopListening(tree.adminPort)
            tree.adminPort = None
            _log.info("no longer listening on {listen}", event="stopped_listening", listen=_adminListen(old))
        if tree.admin is not None:
            tree.admin.resource.token = prepared["token"]
        return servers

    def _retire(self, factory) -> None:
        """
        A service removed or rebuilt: its connections finish on their own
        (HTTP: after the request in hand), and are drained at shutdown.
        """
        if isinstance(factory, (HTTPProxyFactory, UDPBalancer)):
            factory.finish()
        if len(factory.open):
            self.tree.retired.add(factory)


def applyServers(pool: Pool, wanted) -> ServerDiff:
    """Make C{pool}'s servers the file's (see L{diffServers})."""
    live = [ServerConfig(s.name, s.address, s.configuredWeight) for s in pool]
    diff = diffServers(live, {s.name for s in pool if s.removing}, wanted)
    for name in diff.removed:
        pool.delete(pool.server(name))
    for name in diff.restored:
        pool.enable(pool.server(name))
    for config in diff.moved:
        server = pool.server(config.name)
        pool.remove(server)
        server.address = config.address
        pool.add(server)
    for name, weight in diff.reweighted:
        pool.setWeight(pool.server(name), weight)
    for config in diff.added:
        pool.add(Server(config.name, config.address, config.weight))
    return diff


def _tlsFiles(config: Config) -> dict[str, bytes]:
    """L{filesDigest} of each pool's C{tls} that has one, by pool name."""
    return {name: filesDigest(p.tls) for name, p in config.pools.items() if p.tls is not None}


def _rejected(path: str, errors: list[str]) -> Reloaded:
    _log.warn(
        "config {path} rejected, the running config stays: {errors}", event="config_rejected",
        path=path, errors=list(errors),
    )
    return Reloaded(path, tuple(errors))


def _ownerIn(config: Config, address: str) -> str:
    for service in config.services:
        if address in service.listen:
            return service.name
    return ""


def _adminListen(config: Config) -> Optional[str]:
    return config.admin.listen if config.admin is not None else None


def _lateFailure(failure: Failure, name: str, address: str) -> None:
    """A port a reload opened failed later: logged; the rest of the reload stands."""
    _log.failure("service {name}: cannot listen on {listen}", failure, name=name, listen=address,
                 event="listen_failed")
