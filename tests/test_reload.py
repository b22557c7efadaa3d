"""
Reloading the config: the diff of two configs (pure), then a
L{txlb.service.TxlbService} reloading its file on a memory reactor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from txlb.balance.pool import ServerState
from txlb.balance.schedulers import schedulerFactories
from txlb.config import ServerConfig, parse
from txlb.control.reload import ConfigDiff, PoolDiff, ServerDiff, describe, diffConfigs, diffServers
from txlb.health import healthCheckFactories
from txlb.http.frontend import HTTPProxyFactory
from txlb.service import TxlbService
from txlb.tcp import TCPBalancerFactory

ALGORITHMS = schedulerFactories()
HEALTH = healthCheckFactories()


def config(text: str, path: str = "txlb.toml"):
    return parse(text, path, ALGORITHMS, HEALTH)


BASE = """
[pools.api]
algorithm = "round_robin"
servers = [
  { name = "a", address = "127.0.0.1:9001" },
  { name = "b", address = "127.0.0.1:9002" },
]

[[services]]
name = "web"
protocol = "http"
listen = "tcp:8080:interface=127.0.0.1"
pool = "api"
"""


# The diff of two configs.


def test_same_config_no_diff():
    assert diffConfigs(config(BASE), config(BASE)) == ConfigDiff()
    assert not diffConfigs(config(BASE), config(BASE))
    assert describe(ConfigDiff()) == []


def test_pool_settings_scheduler_and_health():
    new = config(BASE.replace('algorithm = "round_robin"', 'algorithm = "least_connections"\nretries = 5\n'
                              'health = { kind = "tcp" }'))
    diff = diffConfigs(config(BASE), new)
    assert diff.poolsChanged == (PoolDiff("api", scheduler=True, health=True, settings=("retries",)),)
    assert diff.servicesChanged == () and diff.listenAdded == ()
    assert describe(diff) == [
        "pool api: new scheduler (algorithm or options)",
        "pool api: health checks restarted",
        "pool api: retries changed",
    ]


def test_servers_alone_are_no_config_diff():
    """Servers are compared with the running pool (diffServers), not here."""
    new = config(BASE.replace('{ name = "b", address = "127.0.0.1:9002" },', ""))
    assert diffConfigs(config(BASE), new) == ConfigDiff()


def test_pools_and_services_added_and_removed():
    extra = """
[pools.db]
servers = [{ name = "d", address = "127.0.0.1:5432" }]
[[services]]
name = "pg"
protocol = "tcp"
listen = "tcp:6432:interface=127.0.0.1"
pool = "db"
"""
    diff = diffConfigs(config(BASE), config(BASE + extra))
    assert (diff.poolsAdded, diff.servicesAdded, diff.listenAdded) == (("db",), ("pg",), ("tcp:6432:interface=127.0.0.1",))
    back = diffConfigs(config(BASE + extra), config(BASE))
    assert (back.poolsRemoved, back.servicesRemoved, back.listenRemoved) == (("db",), ("pg",), ("tcp:6432:interface=127.0.0.1",))
    assert "service pg removed" in describe(back) and "no longer listening on tcp:6432:interface=127.0.0.1" in describe(back)


def test_service_listen_and_settings():
    new = config(BASE.replace("tcp:8080:", "tcp:8081:") + 'timeouts = { backend = "5s" }\n'
                 '[[services.routes]]\npath_prefix = "/x/"\npool = "api"\n')
    diff = diffConfigs(config(BASE), new)
    [service] = diff.servicesChanged
    assert service.settings == ("timeouts", "routes") and not service.rebuild
    assert service.listenAdded == ("tcp:8081:interface=127.0.0.1",)
    assert service.listenRemoved == ("tcp:8080:interface=127.0.0.1",)
    assert diff.listenAdded == ("tcp:8081:interface=127.0.0.1",)
    assert diff.listenRemoved == ("tcp:8080:interface=127.0.0.1",)


def test_protocol_change_rebuilds():
    new = config(BASE.replace('protocol = "http"', 'protocol = "tcp"'))
    [service] = diffConfigs(config(BASE), new).servicesChanged
    assert service.rebuild and service.settings[0] == "protocol"  # and TCP's default timeouts


def test_restart_only_sections():
    new = config('[log]\nformat = "text"\n[txlb]\nshutdown_timeout = "1s"\n' + BASE)
    diff = diffConfigs(config(BASE), new)
    assert diff.restartNeeded == ("log",)
    assert describe(diff) == ["log: changed, applied at the next restart"]


def test_diff_servers():
    live = [ServerConfig("a", "tcp:host=h:port=1"), ServerConfig("b", "tcp:host=h:port=2", 3),
            ServerConfig("api-added", "tcp:host=h:port=3"), ServerConfig("going", "tcp:host=h:port=4")]
    wanted = [ServerConfig("a", "tcp:host=h:port=9"), ServerConfig("b", "tcp:host=h:port=2", 1),
              ServerConfig("c", "tcp:host=h:port=5")]
    diff = diffServers(live, {"going"}, wanted)
    assert diff == ServerDiff(
        added=(ServerConfig("c", "tcp:host=h:port=5"),),
        removed=("api-added",),
        reweighted=(("b", 1),),
        moved=(ServerConfig("a", "tcp:host=h:port=9"),),
    )
    assert diffServers(live, {"going"}, wanted + [ServerConfig("going", "tcp:host=h:port=4")]).restored == ("going",)
    assert not diffServers(wanted, (), wanted)
    assert describe(ConfigDiff(), [("api", diff)]) == [
        "pool api: server c added",
        "pool api: server api-added removed (after draining)",
        "pool api: server a moved to tcp:host=h:port=9",
        "pool api: server b weight 1",
    ]


# Applying a reload on a memory reactor.


class _Port:
    def __init__(self, reactor: "Reactor", port: int, factory) -> None:
        self.reactor, self.port, self.factory = reactor, port, factory

    def stopListening(self) -> None:
        self.reactor.listening.pop(self.port, None)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", self.port)


class Reactor(MemoryReactorClock):
    """Ports that close, and ports that are taken."""

    def __init__(self) -> None:
        super().__init__()
        self.listening: dict[int, object] = {}
        self.taken: set[int] = set()

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.taken or port in self.listening:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.listening[port] = factory
        return _Port(self, port, factory)

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if port in self.taken or port in self.listening:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.listening[port] = protocol
        udpPort = _UDPPort(self, port, protocol)
        protocol.makeConnection(udpPort)
        return udpPort


class _UDPPort(_Port):
    """A listening UDP port: what its protocol sends to clients, recorded."""

    def __init__(self, reactor: "Reactor", port: int, protocol) -> None:
        super().__init__(reactor, port, protocol)
        self.sent: list[tuple[bytes, tuple]] = []

    def getHandle(self):
        return self

    def sendto(self, data: bytes, address: tuple) -> int:
        self.sent.append((data, address))
        return len(data)

    def stopListening(self) -> None:
        super().stopListening()
        self.factory.doStop()


@pytest.fixture
def events():
    seen: list[dict] = []

    def observe(event: dict) -> None:
        if "event" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


class Running:
    def __init__(self, directory: Path, text: str) -> None:
        self.path = directory / "txlb.toml"
        self.path.write_text(text)
        self.reactor = Reactor()
        self.service = TxlbService(config(text, str(self.path)), ALGORITHMS, self.reactor, HEALTH)
        self.service.privilegedStartService()
        self.service.startService()

    def reload(self, text: str):
        self.path.write_text(text)
        results = []
        self.service.reload().addCallback(results.append)
        [result] = results
        return result

    def connect(self, port: int):
        protocol = self.reactor.listening[port].buildProtocol(IPv4Address("TCP", "127.0.0.5", 4000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


@pytest.fixture
def running(tmp_path):
    r = Running(tmp_path, BASE)
    yield r
    r.service.stopService()


def test_adding_a_server_keeps_the_others_state_and_counters(running, events):
    pool = running.service.pools["api"]
    a = pool.server("a")
    a.total, a.active = 7, 1
    result = running.reload(BASE.replace('{ name = "b"', '{ name = "c", address = "127.0.0.1:9003" },\n  { name = "b"'))
    assert result.ok and result.changes == ("pool api: server c added",)
    assert running.service.pools["api"] is pool and pool.server("a") is a
    assert (a.total, a.active) == (7, 1)
    assert pool.server("c").state is ServerState.UP  # no health checks: at once
    [event] = [e for e in events if e["event"] == "config_reloaded"]
    assert event["path"] == str(running.path) and event["errors"] == []
    assert event["changes"] == ["pool api: server c added"]


def test_a_removed_server_drains_first(running):
    pool = running.service.pools["api"]
    b = pool.server("b")
    b.active = 1
    result = running.reload(BASE.replace('{ name = "b", address = "127.0.0.1:9002" },', ""))
    assert result.changes == ("pool api: server b removed (after draining)",)
    assert b.state is ServerState.DRAINING and pool.server("b") is b
    pool.release(b)
    with pytest.raises(KeyError):
        pool.server("b")


def test_the_file_replaces_what_the_admin_api_changed(running):
    pool = running.service.pools["api"]
    pool.setWeight(pool.server("a"), 9)
    from txlb.balance.pool import Server

    pool.add(Server("extra", "tcp:host=127.0.0.1:port=9009"))
    result = running.reload(BASE)
    assert set(result.changes) == {"pool api: server a weight 1", "pool api: server extra removed (after draining)"}
    assert pool.server("a").configuredWeight == 1
    assert [s.name for s in pool] == ["a", "b"]


def test_a_new_algorithm_keeps_the_servers(running):
    pool = running.service.pools["api"]
    before = list(pool)
    old = pool.scheduler
    running.reload(BASE.replace('"round_robin"', '"least_connections"'))
    assert pool.algorithm == "least_connections" and pool.scheduler is not old
    assert list(pool) == before
    assert pool.pick(_context()).server in before


def _context():
    from txlb.interfaces import PickContext

    return PickContext("127.0.0.5")


def test_health_settings_restart_the_checks(running):
    before = running.service.healthChecks["api"]
    running.reload(BASE.replace('algorithm = "round_robin"', 'algorithm = "round_robin"\nhealth = { kind = "tcp" }'))
    after = running.service.healthChecks["api"]
    assert after is not before and after.running and not before.running
    assert before not in running.service.pools["api"]._watchers
    assert after.checking == frozenset(running.service.pools["api"])
    assert running.service.pools["api"].checked


def test_routes_and_timeouts_update_the_running_http_service(running):
    factory = running.service.balancers["web"].factory
    assert isinstance(factory, HTTPProxyFactory)
    protocol, _ = running.connect(8080)  # a connection open across the reload
    text = BASE + 'timeouts = { backend = "5s" }\n[[services.routes]]\npath_prefix = "/db/"\npool = "db"\n' \
        '[pools.db]\nservers = [{ name = "d", address = "127.0.0.1:5432" }]\n'
    result = running.reload(text)
    assert result.ok, result.errors
    assert running.service.balancers["web"].factory is factory
    assert factory.service.backendTimeout == 5.0
    assert factory.service.router.pool(b"h", b"/db/x", b"GET", []) == "db"
    assert "db" in running.service.pools and "db" in running.service.healthChecks
    assert protocol.service is factory.service and factory.open.open == {protocol}


def test_listen_change_opens_the_new_port_then_closes_the_old(running, events):
    assert set(running.reactor.listening) == {8080}
    result = running.reload(BASE.replace("tcp:8080:", "tcp:8082:"))
    assert result.ok
    assert set(running.reactor.listening) == {8082}
    assert running.reactor.listening[8082] is running.service.entries["tcp:8082:interface=127.0.0.1"]
    assert [e["listen"] for e in events if e["event"] == "listening"] == ["tcp:8082:interface=127.0.0.1"]
    assert [e["listen"] for e in events if e["event"] == "stopped_listening"] == ["tcp:8080:interface=127.0.0.1"]
    protocol, _ = running.connect(8082)
    assert protocol.factory is running.service.balancers["web"].factory


def test_a_port_that_cannot_be_opened_refuses_the_whole_reload(running, events):
    running.reactor.taken.add(8083)
    text = BASE.replace("tcp:8080:", "tcp:8083:").replace('"round_robin"', '"least_connections"')
    result = running.reload(text)
    assert not result.ok and "cannot listen on 'tcp:8083:interface=127.0.0.1'" in result.errors[0]
    assert set(running.reactor.listening) == {8080}
    assert running.service.pools["api"].algorithm == "round_robin"
    assert [e["event"] for e in events if e["event"].startswith("config_")] == ["config_rejected"]


def test_an_invalid_file_changes_nothing(running, events):
    before = running.service.config
    result = running.reload(BASE.replace('pool = "api"', 'pool = "apii"') + "bogus = 1\n")
    assert not result.ok and len(result.errors) == 2
    assert result.errors[0].startswith(f"{running.path}:")
    assert running.service.config is before
    [event] = [e for e in events if e["event"] == "config_rejected"]
    assert event["errors"] == list(result.errors) and event["path"] == str(running.path)


@pytest.mark.parametrize("protocol, listen", [("tcp", "tcp:8080:interface=127.0.0.1"), ("udp", "udp:8080:interface=127.0.0.1")])
def test_a_tcp_or_udp_service_on_an_h2_pool_is_refused_and_the_old_config_stays(running, events, protocol, listen):
    before = running.service.config
    factory = running.service.balancers["web"].factory
    text = (BASE.replace('algorithm = "round_robin"', 'algorithm = "round_robin"\nprotocol = "h2"')
            .replace('protocol = "http"', f'protocol = "{protocol}"').replace("tcp:8080:interface=127.0.0.1", listen))
    result = running.reload(text)
    assert not result.ok
    [error] = result.errors
    assert error.startswith(f"{running.path}:14: services[0].pool: pool 'api' has protocol = \"h2\", which only"
                            f" HTTP services speak to servers: a {protocol.upper()} service")
    assert running.service.config is before and running.service.balancers["web"].factory is factory
    assert set(running.reactor.listening) == {8080}


def test_a_service_changing_protocol_gets_a_new_balancer(running):
    old = running.service.balancers["web"].factory
    protocol, transport = running.connect(8080)
    running.reload(BASE.replace('protocol = "http"', 'protocol = "tcp"'))
    new = running.service.balancers["web"].factory
    assert new is not old
    assert isinstance(new, TCPBalancerFactory)
    assert transport.disconnecting  # idle keep-alive connection of the old one closed
    assert running.service.entries["tcp:8080:interface=127.0.0.1"].factory is new


def test_services_added_and_removed(running):
    extra = '[[services]]\nname = "raw"\nprotocol = "tcp"\nlisten = "tcp:7000:interface=127.0.0.1"\npool = "api"\n'
    running.reload(BASE + extra)
    assert set(running.reactor.listening) == {8080, 7000}
    assert "raw" in running.service.metrics.services
    running.reload(BASE)
    assert set(running.reactor.listening) == {8080}
    assert "raw" not in running.service.balancers and "raw" not in running.service.metrics.services


def test_closed_listeners_stay_closed_across_a_reload(running):
    """A passive cluster node does not listen: a reload keeps it so."""
    running.service.closeListeners()
    assert running.reactor.listening == {}
    running.reload(BASE.replace("tcp:8080:", "tcp:8084:"))
    assert running.reactor.listening == {}
    running.service.openListeners()
    assert set(running.reactor.listening) == {8084}


def test_certificates_are_read_again_for_new_connections(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("site.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "site.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "site.key"))
    text = BASE + 'tls = { certificates = [{ cert = "site.pem", key = "site.key" }] }\n'
    r = Running(tmp_path, text)
    entry = r.service.entries["tcp:8080:interface=127.0.0.1"]
    before = entry.factory
    assert r.reactor.listening[8080] is entry
    renewed = ca.issue_cert("site.test", "www.site.test")
    renewed.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "site.pem"))
    renewed.private_key_pem.write_to_path(str(tmp_path / "site.key"))
    assert r.reload(text).ok
    assert entry.factory is not before and r.reactor.listening[8080] is entry
    assert entry.factory.wrappedFactory is before.wrappedFactory  # the same HTTP service
    assert r.service.balancers["web"].entry is entry.factory
    (tmp_path / "site.key").write_text("not a key")
    result = r.reload(text)
    assert not result.ok and "services[0].tls" in result.errors[0]
    assert r.service.balancers["web"].entry is entry.factory


def test_admin_listen_moves(tmp_path):
    text = BASE + '[admin]\nlisten = "tcp:8181:interface=127.0.0.1"\n'
    r = Running(tmp_path, text)
    assert set(r.reactor.listening) == {8080, 8181}
    site = r.reactor.listening[8181]
    assert r.reload(text.replace("8181", "8182")).ok
    assert set(r.reactor.listening) == {8080, 8182} and r.reactor.listening[8182] is site
    assert r.reload(BASE).ok
    assert set(r.reactor.listening) == {8080}


UDP = """
[[services]]
name = "dns"
protocol = "udp"
listen = "udp:5300:interface=127.0.0.1"
pool = "api"
timeouts = { idle = "30s" }
"""


class _FlowSocket:
    def __init__(self, family, address, flow) -> None:
        self.address, self.flow, self.sent, self.closed = address, flow, [], False

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True


def test_udp_services_are_added_changed_and_removed_in_place(running, events):
    result = running.reload(BASE + UDP)
    assert result.ok and "service dns added" in result.changes
    listener = running.reactor.listening[5300]
    assert listener is running.service.entries["udp:5300:interface=127.0.0.1"]
    balancer = running.service.balancers["dns"].factory
    assert listener.balancer is balancer
    assert running.service.metrics.services["dns"].protocol == "udp"
    sockets = []
    balancer.openSocket = lambda *args: sockets.append(_FlowSocket(*args)) or sockets[-1]
    listener.datagramReceived(b"q", ("127.0.0.9", 4000))
    [flow] = sockets
    assert flow.address == ("127.0.0.1", 9001) and flow.sent == [b"q"]

    # New settings apply in place: the flow keeps its server and socket.
    result = running.reload(BASE + UDP.replace('"30s"', '"5s"') + "limits = { max_flows = 7 }\n")
    assert result.ok
    assert running.service.balancers["dns"].factory is balancer
    assert (balancer.idleTimeout, balancer.maxFlows) == (5.0, 7)
    listener.datagramReceived(b"q2", ("127.0.0.9", 4000))
    assert flow.sent == [b"q", b"q2"] and not flow.closed

    # Removed: the port closes and the flow ends, its server released.
    result = running.reload(BASE)
    assert result.ok and "service dns removed" in result.changes
    assert 5300 not in running.reactor.listening
    assert flow.closed
    assert running.service.pools["api"].server("a").active == 0
    [ended] = [e for e in events if e["event"] == "udp_flow"]
    assert ended["ended"] == "shutdown"
