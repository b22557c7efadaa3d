"""
Tests for L{txlb.config}: the config file as an operator writes it.

Bad configs assert the exact key path and line of each problem, since that
is what an operator uses to find the mistake; good configs assert the typed
objects and defaults the rest of txlb reads.
"""

from __future__ import annotations

import os
import math
import textwrap
from types import MappingProxyType
from typing import Mapping, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txlb.balance.schedulers import DEFAULT_ALGORITHM, schedulerFactories
from txlb.balance.schedulers.rotation import roundRobin
from txlb.config import (
    PLANNED,
    CacheConfig,
    Config,
    ConfigError,
    DemoServer,
    LogConfig,
    PoolConfig,
    ProcessConfig,
    Problem,
    ServerConfig,
    ServiceConfig,
    Timeouts,
    load,
    parse,
    parseDuration,
    parseSize,
)
from txlb.interfaces import SchedulerOptionsError


def toml(text: str) -> str:
    """Dedent a config written inline in a test; line 1 is its first line."""
    return textwrap.dedent(text).lstrip("\n")


def problems(text: str, algorithms: Optional[Mapping] = None, healthKinds=None) -> list[tuple[int, str, str]]:
    """
    Parse C{text}, which must not validate; its problems as C{(line, path,
    message)}, in the order reported.
    """
    with pytest.raises(ConfigError) as info:
        parse(toml(text), "txlb.toml", algorithms, healthKinds)
    return [(p.line, p.path, p.message) for p in info.value.problems]


def problem(text: str, algorithms: Optional[Mapping] = None) -> tuple[int, str, str]:
    """The one problem of C{text}."""
    found = problems(text, algorithms)
    assert len(found) == 1, found
    return found[0]


POOL = """
[pools.api]
servers = [{ name = "s1", address = "127.0.0.1:9001" }]
"""


def service(extra: str = "", listen: str = '"tcp:8080"', pool: str = "api", name: str = "web") -> str:
    """A valid TCP service, lines 1-4 of what it adds, with C{extra} after."""
    return f'[[services]]\nname = "{name}"\nlisten = {listen}\npool = "{pool}"\n{extra}'


# Good configs.


def test_empty_config_has_every_default():
    config = parse("", "empty.toml")
    assert config == Config(path="empty.toml")
    assert config.txlb == ProcessConfig(shutdown_timeout=30.0, workers=1)
    assert config.log == LogConfig(format="json", path="-", access=True)
    assert dict(config.pools) == {} and config.services == () and config.demo == ()


def test_full_config():
    config = parse(
        toml(
            """
            [txlb]
            shutdown_timeout = "10s"
            workers = 1

            [log]
            format = "text"
            path = "txlb.log"
            access = false

            [pools.api]
            algorithm = "round_robin"
            servers = [
              { name = "server-1", address = "127.0.0.1:9001" },
              { name = "server-2", address = "[::1]:9002", weight = 2 },
              { name = "server-3", address = "tcp:host=backend.internal:port=9003" },
              { name = "server-4", address = "unix:/run/app.sock" },
            ]
            connect_timeout = "250ms"
            retries = 0
            hash_key = "client_ip"

            [[services]]
            name = "db"
            protocol = "tcp"
            listen = ["tcp:6432", "tcp:6433:interface=127.0.0.1"]
            pool = "api"
            timeouts = { idle = "5m" }

            [demo]
            servers = [{ name = "server-1", listen = "tcp:9001:interface=127.0.0.1" }]
            """
        ),
        "site.toml",
        schedulerFactories(),
    )
    assert config.path == "site.toml"
    assert config.txlb == ProcessConfig(shutdown_timeout=10.0, workers=1)
    assert config.log == LogConfig(format="text", path=os.path.join(os.getcwd(), "txlb.log"), access=False)
    assert list(config.pools) == ["api"]
    assert config.pools["api"] == PoolConfig(
        name="api",
        algorithm="round_robin",
        servers=(
            ServerConfig("server-1", "tcp:host=127.0.0.1:port=9001", 1),
            ServerConfig("server-2", r"tcp:host=\:\:1:port=9002", 2),
            ServerConfig("server-3", "tcp:host=backend.internal:port=9003", 1),
            ServerConfig("server-4", "unix:/run/app.sock", 1),
        ),
        connect_timeout=0.25,
        retries=0,
        hash_key="client_ip",
    )
    assert config.services == (
        ServiceConfig(
            name="db",
            protocol="tcp",
            listen=("tcp:6432", "tcp:6433:interface=127.0.0.1"),
            pool="api",
            timeouts=Timeouts(idle=300.0),
        ),
    )
    assert config.demo == (DemoServer("server-1", "tcp:9001:interface=127.0.0.1"),)


def test_pool_and_service_defaults():
    config = parse(toml(POOL + service()))
    pool = config.pools["api"]
    assert pool.algorithm == DEFAULT_ALGORITHM
    assert (pool.connect_timeout, pool.retries, pool.hash_key) == (2.0, 2, "client_ip")
    assert dict(pool.options) == {}
    assert pool.servers[0].weight == 1
    (web,) = config.services
    assert web.protocol == "tcp"
    assert web.listen == ("tcp:8080",)
    assert web.timeouts.idle == 600.0


def test_config_objects_are_frozen():
    config = parse(toml(POOL + service()))
    with pytest.raises(AttributeError):
        config.services = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.pools["other"] = config.pools["api"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.pools["api"].servers[0].weight = 5  # type: ignore[misc]


def test_options_reach_the_factory_and_are_read_only():
    seen = []

    def factory(options):
        seen.append(dict(options))

    config = parse(
        toml('[pools.api]\nalgorithm = "mine"\noptions = { vnodes = 160, salt = "x" }\n'),
        algorithms={"mine": factory},
    )
    assert seen == [{"vnodes": 160, "salt": "x"}]
    assert isinstance(config.pools["api"].options, MappingProxyType)
    assert dict(config.pools["api"].options) == {"vnodes": 160, "salt": "x"}


def test_algorithm_not_checked_without_algorithms():
    """C{algorithms=None} is for tools that read a config without plugins."""
    config = parse(toml('[pools.api]\nalgorithm = "from_a_plugin"\noptions = { a = 1 }\n'))
    assert config.pools["api"].algorithm == "from_a_plugin"


def test_the_built_in_round_robin_is_accepted():
    config = parse(toml('[pools.api]\nalgorithm = "round_robin"\n'), algorithms=schedulerFactories())
    assert config.pools["api"].algorithm == "round_robin"


def test_listen_may_be_one_string_or_an_array():
    one = parse(toml(POOL + service(listen='"tcp:8080"')))
    many = parse(toml(POOL + service(listen='["tcp:8080", "unix:/run/txlb.sock"]')))
    assert one.services[0].listen == ("tcp:8080",)
    assert many.services[0].listen == ("tcp:8080", "unix:/run/txlb.sock")


def test_weight_zero_is_allowed():
    config = parse(toml('[pools.api]\nservers = [{ name = "a", address = "h:1", weight = 0 }]\n'))
    assert config.pools["api"].servers[0].weight == 0


def test_pools_keep_file_order():
    config = parse(toml("[pools.b]\n[pools.a]\n[pools.c]\n"))
    assert list(config.pools) == ["b", "a", "c"]


# Syntax errors.


@pytest.mark.parametrize(
    "text, line",
    [
        ('a = 1\nb = \n', 2),
        ('[pools.api]\nretries = 1\nretries = 2\n', 3),
        ('[pools.api]\n[pools.api]\n', 2),
        ('name = "unterminated\n', 1),
        ('[pools\n', 1),
        ('\n\nservers = [1,\n', 3),
    ],
)
def test_syntax_error_gives_line_and_toml_message(text, line):
    with pytest.raises(ConfigError) as info:
        parse(text, "bad.toml")
    (p,) = info.value.problems
    assert p.path == ""
    assert p.line == line
    assert p.message.startswith("not valid TOML: ")
    (out,) = info.value.lines()
    assert out.startswith(f"bad.toml:{line}: not valid TOML: ")
    assert "Traceback" not in out and "\n" not in out


def test_syntax_error_keeps_the_column():
    with pytest.raises(ConfigError) as info:
        parse("a = 1\nb = \n")
    assert str(info.value) == "<config>:2: not valid TOML: Invalid value (column 5)"


# Unknown and planned keys.


@pytest.mark.parametrize(
    "text, line, path, hint",
    [
        ("servics = []\n", 1, "servics", "services"),
        ("[txlb]\nshutdown_timout = \"1s\"\n", 2, "txlb.shutdown_timout", "shutdown_timeout"),
        ("[log]\n\nacess = true\n", 3, "log.acess", "access"),
        ("[pools.api]\nretry = 2\n", 2, "pools.api.retry", "retries"),
        ("[pools.api]\nalgoritm = \"x\"\n", 2, "pools.api.algoritm", "algorithm"),
        (
            '[pools.api]\nservers = [\n  { name = "a", address = "h:1" },\n  { name = "b", adress = "h:2", address = "h:2" },\n]\n',
            4,
            "pools.api.servers[1].adress",
            "address",
        ),
        (POOL + service('timeouts = { idel = "1s" }\n'), 7, "services[0].timeouts.idel", "idle"),
        (POOL + service('prtocol = "tcp"\n'), 7, "services[0].prtocol", "protocol"),
        ('[demo]\nservers = [{ name = "a", listen = "tcp:1", listne = "tcp:1" }]\n', 2, "demo.servers[0].listne", "listen"),
        ("[demo]\nserver = []\n", 2, "demo.server", "servers"),
    ],
)
def test_unknown_key_at_every_level(text, line, path, hint):
    assert problem(text) == (line, path, f"unknown key (did you mean {hint!r}?)")


def test_unknown_key_in_a_service_is_on_its_line():
    text = POOL + service('bogus = 1\n')
    assert problem(text) == (7, "services[0].bogus", "unknown key")


def test_unknown_key_without_a_close_match_has_no_hint():
    assert problem("[pools.api]\nzzzzzz = 1\n") == (2, "pools.api.zzzzzz", "unknown key")


def test_unknown_top_level_table():
    assert problems("a = 1\n[frontend]\nx = 1\n") == [(1, "a", "unknown key"), (2, "frontend", "unknown key")]
    assert problems("[frontend]\nx = 1\n") == [(1, "frontend", "unknown key")]


def test_planned_keys_are_refused_plainly(monkeypatch):
    import txlb.config._table

    monkeypatch.setattr(txlb.config._table, "PLANNED", {"service": {"frobnicate": "the frobnicator"}})
    assert problem(POOL + service("frobnicate = 1\n")) == (
        7,
        "services[0].frobnicate",
        "not supported by this version of txlb yet (the frobnicator); remove it",
    )


def test_every_planned_key_is_refused_not_unknown():
    """Whatever PLANNED lists gets the planned message, at every table kind."""
    where = {"": "", "pool": "[pools.api]\n", "service": POOL + service()}
    for kind, keys in PLANNED.items():
        for key in keys:
            text = toml(where[kind]) + f"{key} = {{}}\n"
            ((_, path, message),) = problems(text)
            assert path.endswith(key) and "not supported by this version of txlb yet" in message


def test_planned_key_is_suggested_for_a_typo():
    assert problem("[pools.api]\nhelth = {}\n") == (
        2,
        "pools.api.helth",
        "unknown key (did you mean 'health'?)",
    )


def test_workers():
    assert parse("[txlb]\nworkers = 4\n").txlb.workers == 4


def test_workers_share_only_tcp_and_unix_sockets(tmp_path):
    from tests.test_integration_health import selfSigned

    cert, key = selfSigned(tmp_path)
    ssl = f"ssl:8443:privateKey={key}:certKey={cert}"
    text = (
        "[txlb]\nworkers = 2\n[pools.p]\nservers = []\n"
        '[[services]]\nname = "s"\nprotocol = "tcp"\npool = "p"\n'
        f'listen = ["tcp:8080", "unix:/tmp/txlb-test.sock", "{ssl}"]\n'
    )
    line, path, message = problem(text)
    assert (line, path) == (9, "services[0].listen[2]")
    assert message.startswith(f"{ssl!r}: with [txlb] workers > 1")


def test_health_checks():
    [pool] = parse(
        '[pools.api]\n[pools.api.health]\nkind = "http"\npath = "/ready"\ninterval = "5s"\ntimeout = "2s"\n'
        'rise = 1\nfall = 4\nexpect_status = [200, 204]\nexpect_json = { status = ["ok", "ready"], up = true }\n'
    ).pools.values()
    h = pool.health
    assert (h.kind, h.path, h.method, h.interval, h.timeout, h.rise, h.fall) == ("http", "/ready", "GET", 5.0, 2.0, 1, 4)
    assert h.expect_status == (200, 204)
    assert dict(h.expect_json) == {"status": ("ok", "ready"), "up": (True,)}
    assert parse("[pools.api]\n").pools["api"].health.kind == "none"


@pytest.mark.parametrize(
    "body, path, message",
    [
        ('kind = "htp"', "pools.api.health.kind", "unknown health check kind 'htp' (did you mean 'http'?)"),
        ('timeout = "5s"\ninterval = "1s"', "pools.api.health.timeout", "must not be longer than interval"),
        ("expect_status = [999]", "pools.api.health.expect_status", "999 is not an HTTP status code"),
        ("rise = 0", "pools.api.health.rise", "must be between 1 and 100, not 0"),
        ('path = "health"', "pools.api.health.path", "'health' must start with '/'"),
        ("intervall = 1", "pools.api.health.intervall", "unknown key (did you mean 'interval'?)"),
    ],
)
def test_bad_health_checks(body, path, message):
    found = problems("[pools.api]\n[pools.api.health]\n" + body + "\n", healthKinds=("mycheck",))
    assert [(p, m.split("; installed")[0]) for _, p, m in found] == [(path, message)]


def test_plugin_health_kinds_are_checked_when_known():
    parse('[pools.api]\nhealth = { kind = "mycheck" }\n', healthKinds=("mycheck",))
    parse('[pools.api]\nhealth = { kind = "anything" }\n')  # not checked without the list


def test_limits_and_slow_start():
    [pool] = parse('[pools.api]\nmax_connections = 10\nqueue_timeout = "2s"\nslow_start = "30s"\n').pools.values()
    assert (pool.max_connections, pool.queue_timeout, pool.slow_start) == (10, 2.0, 30.0)
    assert problem("[pools.api]\nmax_connections = -1\n")[1] == "pools.api.max_connections"


def test_passive():
    [pool] = parse('[pools.api]\npassive = { consecutive_failures = 3, eject_for = "10s" }\n').pools.values()
    assert (pool.passive.consecutive_failures, pool.passive.eject_for) == (3, 10.0)
    assert parse("[pools.api]\n").pools["api"].passive is None


def test_admin_defaults_to_loopback_and_needs_a_token_elsewhere():
    assert parse("[admin]\n").admin.listen == "tcp:8081:interface=127.0.0.1"
    assert parse("").admin is None
    assert problem('[admin]\nlisten = "tcp:8081"\n')[:2] == (2, "admin.listen")
    assert problem('[admin]\ntoken_file = "no-such.token"\n')[1] == "admin.token_file"


def test_admin_token_file_is_relative_to_the_config(tmp_path):
    (tmp_path / "admin.token").write_text("s3cret\n")
    path = tmp_path / "txlb.toml"
    path.write_text('[admin]\nlisten = "tcp:8081"\ntoken_file = "admin.token"\n')
    assert load(str(path)).admin.token_file == str(tmp_path / "admin.token")
    (tmp_path / "admin.token").write_text("")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.problems[0].path == "admin.token_file"
    assert "is empty" in info.value.problems[0].message


def test_admin_on_ipv6_loopback_needs_no_token():
    parse("[admin]\nlisten = 'tcp:8081:interface=\\:\\:1'\n")


def test_http_service_with_routes_limits_and_forwarded():
    config = parse(
        toml(
            POOL
            + '[pools.other]\nservers = [{ name = "o1", address = "127.0.0.1:9101" }]\n'
            + service(
                'protocol = "http"\nforwarded = true\n'
                'limits = { max_header_bytes = "16KiB", max_body = "10MiB" }\n'
                'timeouts = { client = "5s", backend = "7s", idle = "9s" }\n'
                '[[services.routes]]\nhost = "shop.*"\npath_prefix = "/api/"\n'
                'methods = ["get", "POST"]\nheaders = { "X-Tenant" = "blue" }\npool = "other"\n'
            )
        )
    )
    [svc] = config.services
    assert svc.protocol == "http" and svc.forwarded
    assert (svc.limits.max_header_bytes, svc.limits.max_body) == (16 * 1024, 10 * 1024 * 1024)
    assert (svc.timeouts.client, svc.timeouts.backend, svc.timeouts.idle) == (5.0, 7.0, 9.0)
    [route] = svc.routes
    assert (route.pool, route.host, route.path_prefix, route.methods) == ("other", "shop.*", "/api/", ("GET", "POST"))
    assert dict(route.headers) == {"X-Tenant": "blue"}


def test_http_defaults():
    [svc] = parse(toml(POOL + service('protocol = "http"\n'))).services
    assert (svc.timeouts.client, svc.timeouts.backend, svc.timeouts.idle) == (60.0, 30.0, 75.0)
    assert (svc.limits.max_header_bytes, svc.limits.max_body, svc.forwarded, svc.routes) == (32768, 0, False, ())


@pytest.mark.parametrize(
    "extra, path, message",
    [
        ('[[services.routes]]\npool = "nope"\n', "services[0].routes[0].pool", "no pool named 'nope'"),
        ('[[services.routes]]\npool = "api"\npath_prefix = "api"\n', "services[0].routes[0].path_prefix",
         "'api' must start with '/'"),
        ('[[services.routes]]\npool = "api"\nmethods = ["G ET"]\n', "services[0].routes[0].methods",
         "'G ET' is not a method name"),
        ('[[services.routes]]\npool = "api"\nheaders = { "X A" = "b" }\n', "services[0].routes[0].headers",
         "'X A' is not a header name"),
        ('[[services.routes]]\npool = "api"\nhots = "a"\n', "services[0].routes[0].hots",
         "unknown key (did you mean 'host'?)"),
        ('limits = { max_header_bytes = "10" }\n', "services[0].limits.max_header_bytes", "must be at least 1KiB"),
    ],
)
def test_bad_http_service_keys(extra, path, message):
    found = problems(POOL + service('protocol = "http"\n' + extra))
    assert [(p, m) for _, p, m in found] == [(path, message)]


@pytest.mark.parametrize("key, value", [("routes", "[]"), ("forwarded", "true"), ("cache", "{}"),
                                        ("rate_limit", '{ rate = "1/s" }')])
def test_http_keys_on_a_tcp_service(key, value):
    [(_, path, message)] = problems(POOL + service(f"{key} = {value}\n"))
    assert path == f"services[0].{key}"
    assert message == 'applies to HTTP services only (protocol = "http")'


def test_http_service_cache():
    [svc] = parse(toml(POOL + service('protocol = "http"\ncache = { max_size = "10MiB", max_object = "64KiB" }\n'))).services
    assert svc.cache == CacheConfig(max_size=10 * 1024 * 1024, max_object=64 * 1024)


def test_http_service_cache_defaults_and_absence():
    [svc] = parse(toml(POOL + service('protocol = "http"\ncache = {}\n'))).services
    assert (svc.cache.max_size, svc.cache.max_object) == (64 * 1024 * 1024, 1024 * 1024)
    [svc] = parse(toml(POOL + service('protocol = "http"\n'))).services
    assert svc.cache is None


@pytest.mark.parametrize(
    "value, path, message",
    [
        ('{ max_size = "lots" }', "services[0].cache.max_size", "'lots' is not a size"),
        ('{ max_size = "0" }', "services[0].cache.max_size", "must be more than 0"),
        ('{ max_size = "1MiB", max_object = "2MiB" }', "services[0].cache.max_object",
         "must not be larger than max_size"),
        ('{ max_sise = "1MiB" }', "services[0].cache.max_sise", "unknown key (did you mean 'max_size'?)"),
        ('"64MiB"', "services[0].cache", "must be a table"),
    ],
)
def test_bad_http_service_cache(value, path, message):
    [(_, where, text)] = problems(POOL + service(f'protocol = "http"\ncache = {value}\n'))
    assert where == path and message in text


def test_tcp_service_refuses_http_timeouts():
    found = problems(POOL + service('timeouts = { client = "60s", backend = "30s", idle = "1m" }\n'))
    message = 'applies to HTTP services; a TCP service has only "idle"'
    assert found == [
        (7, "services[0].timeouts.client", message),
        (7, "services[0].timeouts.backend", message),
    ]


def test_timeouts_as_a_table_section():
    text = POOL + service('[services.timeouts]\nidle = "0"\nclient = "1s"\n')
    assert problem(text) == (
        9,
        "services[0].timeouts.client",
        'applies to HTTP services; a TCP service has only "idle"',
    )
    config = parse(toml(POOL + service('[services.timeouts]\nidle = "0"\n')))
    assert config.services[0].timeouts.idle == 0.0


# Types.


@pytest.mark.parametrize(
    "text, line, path, message",
    [
        ("txlb = 1\n", 1, "txlb", "must be a table, not an integer"),
        ("log = []\n", 1, "log", "must be a table, not an array"),
        ("pools = \"api\"\n", 1, "pools", "must be a table, not a string"),
        ("[pools]\napi = 3\n", 2, "pools.api", "must be a table, not an integer"),
        ("[pools.api]\nservers = 3\n", 2, "pools.api.servers", "must be an array of tables, not an integer"),
        ('[pools.api]\nservers = ["h:1"]\n', 2, "pools.api.servers[0]", "must be a table, not a string"),
        ("[pools.api]\nretries = \"2\"\n", 2, "pools.api.retries", "must be an integer, not a string"),
        ("[pools.api]\nretries = true\n", 2, "pools.api.retries", "must be an integer, not a boolean"),
        ("[pools.api]\nretries = 1.5\n", 2, "pools.api.retries", "must be an integer, not a number"),
        ("[pools.api]\nretries = -1\n", 2, "pools.api.retries", "must be between 0 and 100, not -1"),
        ("[pools.api]\nalgorithm = 3\n", 2, "pools.api.algorithm", "must be a string, not an integer"),
        ("[pools.api]\noptions = 3\n", 2, "pools.api.options", "must be a table, not an integer"),
        ('[pools.api]\nservers = [{ name = "a", address = "h:1", weight = 1001 }]\n', 2,
         "pools.api.servers[0].weight", "must be between 0 and 1000, not 1001"),
        ('[pools.api]\nservers = [{ name = 7, address = "h:1" }]\n', 2,
         "pools.api.servers[0].name", "must be a string, not an integer"),
        ('[pools.api]\nservers = [{ name = "a b", address = "h:1" }]\n', 2,
         "pools.api.servers[0].name", "'a b' is not a valid name (letters, digits, '_', '.', '-')"),
        ('[pools.api]\nservers = [\n  { address = "h:1" },\n]\n', 3,
         "pools.api.servers[0].name", "is required"),
        ('[pools."my pool"]\n', 1, "pools.my pool", "'my pool' is not a valid name (letters, digits, '_', '.', '-')"),
        ("[txlb]\nworkers = 0\n", 2, "txlb.workers", "must be between 1 and 64, not 0"),
        ('[log]\nformat = "xml"\n', 2, "log.format", "must be one of 'json', 'text', not 'xml'"),
        ('[log]\naccess = "yes"\n', 2, "log.access", "must be true or false, not a string"),
        ("[log]\npath = 1\n", 2, "log.path", "must be a string, not an integer"),
        ("services = {}\n", 1, "services", "must be an array of tables, not a table"),
        ("services = [1]\n", 1, "services[0]", "must be a table, not an integer"),
        ("[demo]\nservers = [{ name = \"a\" }]\n", 2, "demo.servers[0].listen", "is required"),
    ],
)
def test_wrong_types(text, line, path, message):
    assert problem(text) == (line, path, message)


def test_a_service_needs_name_listen_and_pool():
    found = problems(POOL + '\n[[services]]\nprotocol = "tcp"\n')
    assert found == [
        (4, "services[0].pool", "is required"),
        (4, "services[0].name", "is required"),
        (4, "services[0].listen", "is required"),
    ]


def test_protocol_must_be_tcp_http_or_udp():
    assert problem(POOL + service('protocol = "sctp"\n')) == (
        7,
        "services[0].protocol",
        "must be one of 'tcp', 'http', 'udp', not 'sctp'",
    )


# UDP services.


def udpService(extra: str = "", listen: str = '"udp:5353:interface=127.0.0.1"', pool: str = "api") -> str:
    """A valid UDP service, lines 1-5 of what it adds (listen on line 3), with C{extra} after."""
    return service('protocol = "udp"\n' + extra, listen=listen, pool=pool, name="dns")


def test_a_udp_service_has_its_defaults():
    config = parse(toml(POOL + udpService()))
    [dns] = config.services
    assert dns.protocol == "udp"
    assert dns.listen == ("udp:5353:interface=127.0.0.1",)
    assert dns.timeouts.idle == 60.0
    assert dns.limits.max_flows == 10_000
    assert dns.tls is None and dns.sticky is None


def test_a_udp_service_takes_idle_and_max_flows():
    config = parse(toml(POOL + udpService('timeouts = { idle = "5s" }\nlimits = { max_flows = 50 }\n')))
    [dns] = config.services
    assert (dns.timeouts.idle, dns.limits.max_flows) == (5.0, 50)


def test_udp_keys_that_do_not_apply_are_refused():
    found = problems(POOL + udpService(
        'timeouts = { idle = "0", backend = "1s" }\n'
        "limits = { max_flows = 0, max_body = 10 }\n"
        'sticky = { mode = "ip" }\n'
        "forwarded = true\n"
        'tls = { certificates = [{ cert = "a.pem", key = "a.key" }] }\n'
    ))
    assert [(line, path) for line, path, _ in found] == [
        (8, "services[0].timeouts.backend"),
        (8, "services[0].timeouts.idle"),
        (9, "services[0].limits.max_body"),
        (9, "services[0].limits.max_flows"),
        (10, "services[0].sticky"),
        (11, "services[0].forwarded"),
        (12, "services[0].tls"),
    ]
    messages = dict((path, message) for _, path, message in found)
    assert "ip_hash" in messages["services[0].sticky"]
    assert messages["services[0].timeouts.idle"] == "must be longer than 0"
    assert messages["services[0].limits.max_flows"] == "must be between 1 and 1000000, not 0"


def test_max_flows_is_for_udp_services_only():
    found = problem(POOL + service('protocol = "http"\nlimits = { max_flows = 5 }\n'))
    assert found == (8, "services[0].limits.max_flows", 'applies to UDP services only (protocol = "udp")')


@pytest.mark.parametrize("listen, why", [
    ('"udp:5353:interfce=127.0.0.1"', "unknown parameter 'interfce'"),
    ('"udp:99999"', "'99999' is not a port 0-65535"),
    ('"udp:53:interface=localhost"', "interface 'localhost' is not an IP address"),
    ('"tcp:53"', "is not a UDP address"),
    ('"udp:53:extra"', "unexpected 'extra'"),
])
def test_udp_listen_addresses_are_read_strictly(listen, why):
    line, path, message = problem(POOL + udpService(listen=listen))
    assert (line, path) == (5, "services[0].listen")
    assert why in message


def test_a_udp_address_on_a_tcp_service_says_what_it_needs():
    assert problem(POOL + service(listen='"udp:53"')) == (
        5, "services[0].listen", "'udp:53' is a UDP address: it needs protocol = \"udp\"",
    )


def test_a_udp_pool_needs_ip_addresses_and_no_tls():
    pools = """
[pools.api]
servers = [{ name = "s1", address = "127.0.0.1:53" }, { name = "s2", address = "dns.example:53" }]
tls = { verify = false }
"""
    found = problems(pools + udpService())
    assert [(line, path) for line, path, _ in found] == [(7, "services[0].pool"), (7, "services[0].pool")]
    assert "remove the pool's tls" in found[0][2]
    assert found[1][2].startswith("pool 'api', server 's2': 'dns.example' is not an IP address")


def test_udp_and_tcp_may_share_a_port_number_but_udp_sockets_collide():
    text = POOL + udpService(listen='"udp:5353"') + service(listen='"tcp:5353"', name="t")
    assert len(parse(toml(text)).services) == 2
    found = problem(POOL + udpService(listen='"udp:5353"') + udpService(listen='"udp:5353:interface=127.0.0.1"')
                    .replace('name = "dns"', 'name = "dns2"'))
    assert found[1] == "services[1].listen"
    assert "is already used by services[0].listen" in found[2]


def test_workers_serve_udp_services():
    config = parse(toml("[txlb]\nworkers = 2\n" + POOL + udpService()))
    assert config.txlb.workers == 2


# Durations and sizes.


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        (" 2s ", 2.0),
    ],
)
def test_durations(text, seconds):
    assert parseDuration(text) == seconds


@pytest.mark.parametrize(
    "value",
    ["", "2", "s", "-1s", "2 s", "2S", "1d", "2sec", "1h30m", ".5s", "5.s", "1e3s", "inf", "0ms0"],
)
def test_bad_durations(value):
    with pytest.raises(ValueError) as info:
        parseDuration(value)
    assert str(info.value) == (
        f'{value.strip()!r} is not a duration (write it like "250ms", "2s", "5m" or "1h")'
    )


@pytest.mark.parametrize("value, hint", [(30, '"30s"'), (1.5, '"1.5s"')])
def test_a_bare_number_is_not_a_duration(value, hint):
    with pytest.raises(ValueError, match=f"needs a unit: write {hint} for seconds"):
        parseDuration(value)


@pytest.mark.parametrize("value", [True, None, [], {}])
def test_a_duration_must_be_a_string(value):
    with pytest.raises(ValueError, match="must be a string"):
        parseDuration(value)


def test_duration_errors_carry_the_key_path():
    assert problem('[txlb]\nshutdown_timeout = 30\n') == (
        2,
        "txlb.shutdown_timeout",
        'needs a unit: write "30s" for seconds, "30ms" for milliseconds',
    )
    assert problem('[pools.api]\nconnect_timeout = "2 seconds"\n') == (
        2,
        "pools.api.connect_timeout",
        "'2 seconds' is not a duration (write it like \"250ms\", \"2s\", \"5m\" or \"1h\")",
    )


def test_connect_timeout_must_be_positive():
    assert problem('[pools.api]\nconnect_timeout = "0"\n') == (
        2,
        "pools.api.connect_timeout",
        "must be longer than 0",
    )


_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@given(
    st.integers(min_value=0, max_value=10**9),
    st.one_of(st.none(), st.integers(min_value=0, max_value=999_999)),
    st.sampled_from(sorted(_UNIT)),
)
def test_duration_property(whole, fraction, unit):
    """Any decimal number with a unit is that many units, in seconds."""
    number = f"{whole}" if fraction is None else f"{whole}.{fraction}"
    assert math.isclose(parseDuration(number + unit), float(number) * _UNIT[unit], rel_tol=1e-12)


@given(st.text(max_size=12))
def test_duration_never_raises_anything_but_valueerror(text):
    try:
        seconds = parseDuration(text)
    except ValueError:
        return
    assert seconds >= 0


@pytest.mark.parametrize(
    "value, size",
    [
        ("64KiB", 64 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("64KB", 64_000),
        ("10MB", 10_000_000),
        ("2GB", 2_000_000_000),
        ("512B", 512),
        ("512", 512),
        ("0", 0),
        ("64 KiB", 64 * 1024),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(value, size):
    assert parseSize(value) == size


@pytest.mark.parametrize("value", ["", "KiB", "1.5MiB", "-1", "10kib", "10 Mi", "1TiB", "0x10"])
def test_bad_sizes(value):
    with pytest.raises(ValueError) as info:
        parseSize(value)
    assert str(info.value) == f'{value!r} is not a size (write it like "64KiB" or "10MiB")'


@pytest.mark.parametrize("value, message", [(-1, "must not be negative, not -1"),
                                            (True, "must be a string, not a boolean"),
                                            (1.5, "must be a string, not a number")])
def test_sizes_refuse_other_values(value, message):
    with pytest.raises(ValueError) as info:
        parseSize(value)
    assert str(info.value) == message


_SIZE_UNIT = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
              "KB": 1000, "MB": 1000**2, "GB": 1000**3}


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(sorted(_SIZE_UNIT)), st.booleans())
def test_size_property(number, unit, space):
    text = f"{number}{' ' if space and unit else ''}{unit}"
    assert parseSize(text) == number * _SIZE_UNIT[unit]


@given(st.one_of(st.text(max_size=10), st.integers(), st.floats(), st.booleans(), st.none()))
def test_size_never_raises_anything_but_valueerror(value):
    try:
        size = parseSize(value)
    except ValueError:
        return
    assert isinstance(size, int) and size >= 0


# Endpoints.


@pytest.mark.parametrize(
    "listen, line, path, message",
    [
        ('"tcp:abc"', 3, "services[0].listen",
         "'tcp:abc' is not a valid address ('abc' is not a number); "
         "expected a listening endpoint like tcp:8080:interface=127.0.0.1"),
        ('"tcp:99999"', 3, "services[0].listen",
         "'tcp:99999' is not a valid address (port 99999 is out of range 0-65535); "
         "expected a listening endpoint like tcp:8080:interface=127.0.0.1"),
        ('"8080"', 3, "services[0].listen",
         "'8080' is not a valid address; write tcp:8080 for TCP port 8080"),
        ('"tcp:8080:bogus=1"', 3, "services[0].listen",
         "'tcp:8080:bogus=1' is not a valid address (unknown parameter 'bogus'); "
         "expected a listening endpoint like tcp:8080:interface=127.0.0.1"),
        ('[]', 3, "services[0].listen", "must be a string or a non-empty array of strings"),
        ('7', 3, "services[0].listen", "must be a string or a non-empty array of strings"),
        ('["tcp:8080",\n  "bad:1"]', 4, "services[0].listen[1]",
         "'bad:1' is not a valid address (unknown endpoint type 'bad'); "
         "expected a listening endpoint like tcp:8080:interface=127.0.0.1"),
        ('["tcp:8080", 5]', 3, "services[0].listen[1]", "must be a string, not an integer"),
    ],
)
def test_bad_listen(listen, line, path, message):
    assert problem(service(listen=listen) + POOL) == (line, path, message)


def test_ipv6_interface_needs_escaped_colons():
    ((_, path, message),) = problems(service(listen='"tcp:8080:interface=::1"') + POOL)
    assert path == "services[0].listen"
    assert r"write the colons of an IPv6 address as \:" in message
    config = parse(toml(service(listen=r'"tcp:8080:interface=\\:\\:1"') + POOL))
    assert config.services[0].listen == (r"tcp:8080:interface=\:\:1",)


@pytest.mark.parametrize(
    "address, message",
    [
        ("h:0", "port 0 is out of range (1-65535) in 'h:0'"),
        ("h:65536", "port 65536 is out of range (1-65535) in 'h:65536'"),
        ("::1:9001", "'::1:9001' is not a valid address; write an IPv6 address in brackets, like [::1]:9001"),
        ("tcp:host=h", "'tcp:host=h' is not a valid address (missing 'port'); "
                       "expected host:port or a client endpoint like tcp:host=H:port=P"),
        ("tcp:host=h:port=0", "'tcp:host=h:port=0' is not a valid address (port 0 is out of range 1-65535); "
                              "expected host:port or a client endpoint like tcp:host=H:port=P"),
        ("h", "'h' is not a valid address (no port); "
              "expected host:port or a client endpoint like tcp:host=H:port=P"),
        ("web:http", "'web:http' is not a valid address (unknown endpoint type 'web'); "
                     "expected host:port or a client endpoint like tcp:host=H:port=P"),
    ],
)
def test_bad_server_address(address, message):
    text = f'[pools.api]\nservers = [\n  {{ name = "a", address = "h:1" }},\n  {{ name = "b", address = "{address}" }},\n]\n'
    assert problem(text) == (4, "pools.api.servers[1].address", message)


@pytest.mark.parametrize(
    "address, endpoint",
    [
        ("10.0.0.5:9001", "tcp:host=10.0.0.5:port=9001"),
        ("backend-1.internal:80", "tcp:host=backend-1.internal:port=80"),
        ("[::1]:9001", r"tcp:host=\:\:1:port=9001"),
        ("[2001:db8::5]:443", r"tcp:host=2001\:db8\:\:5:port=443"),
        ("tcp:host=10.0.0.5:port=9001", "tcp:host=10.0.0.5:port=9001"),
        ("tcp:10.0.0.5:9001", "tcp:10.0.0.5:9001"),
        ("unix:/run/app.sock", "unix:/run/app.sock"),
    ],
)
def test_server_addresses_become_endpoint_strings(address, endpoint):
    config = parse(toml(f'[pools.api]\nservers = [{{ name = "a", address = "{address}" }}]\n'))
    assert config.pools["api"].servers[0].address == endpoint


# Duplicates and references.


def test_duplicate_server_names():
    text = """
    [pools.api]
    servers = [
      { name = "s1", address = "h:1" },
      { name = "s2", address = "h:2" },
      { name = "s1", address = "h:3" },
    ]
    [pools.other]
    servers = [{ name = "s1", address = "h:4" }]
    """
    assert problem(text) == (
        5,
        "pools.api.servers[2].name",
        "another server of this pool is already called 's1'",
    )


def test_duplicate_service_names():
    text = POOL + service() + service(name="web", listen='"tcp:8081"')
    assert problem(text) == (8, "services[1].name", "another service is already called 'web'")


@pytest.mark.parametrize(
    "first, second, message",
    [
        ('"tcp:8080"', '"tcp:8080"', "'tcp:8080' is already used by services[0].listen"),
        ('"tcp:8080"', '"tcp:port=8080:interface=127.0.0.1"',
         "'tcp:port=8080:interface=127.0.0.1' is already used by services[0].listen ('tcp:8080')"),
        ('["tcp:9000", "tcp:8080:interface=127.0.0.1"]', '"tcp:8080:interface=127.0.0.1"',
         "'tcp:8080:interface=127.0.0.1' is already used by services[0].listen[1]"),
        ('"unix:/run/a.sock"', '"unix:/run/a.sock"', "'unix:/run/a.sock' is already used by services[0].listen"),
    ],
)
def test_duplicate_listen_addresses(first, second, message):
    text = POOL + service(listen=first) + service(name="db", listen=second)
    assert problem(text) == (9, "services[1].listen", message)


@pytest.mark.parametrize(
    "first, second",
    [
        ('"tcp:8080:interface=127.0.0.1"', '"tcp:8080:interface=127.0.0.2"'),
        ('"tcp:8080"', '"tcp:8081"'),
        ('"tcp:0"', '"tcp:0"'),
        ('"unix:/run/a.sock"', '"unix:/run/b.sock"'),
    ],
)
def test_listen_addresses_that_do_not_collide(first, second):
    parse(toml(POOL + service(listen=first) + service(name="db", listen=second)))


def test_one_service_listening_twice_on_the_same_port():
    text = POOL + service(listen='["tcp:8080", "tcp:8080"]')
    assert problem(text) == (5, "services[0].listen[1]", "'tcp:8080' is already used by services[0].listen[0]")


def test_demo_server_on_a_service_port():
    text = POOL + service() + '[demo]\nservers = [\n  { name = "a", listen = "tcp:9001" },\n  { name = "b", listen = "tcp:8080" },\n]\n'
    assert problem(text) == (10, "demo.servers[1].listen", "'tcp:8080' is already used by services[0].listen")


def test_service_naming_a_missing_pool():
    assert problem(POOL + service(pool="apii")) == (
        6,
        "services[0].pool",
        "no pool named 'apii' (did you mean 'api'?)",
    )
    assert problem(POOL + service(pool="zzz")) == (6, "services[0].pool", "no pool named 'zzz'")


def test_service_pool_may_be_declared_after_it():
    config = parse(toml(service() + POOL))
    assert config.services[0].pool == "api"


# Algorithms and options.


def test_unknown_algorithm_with_suggestion():
    algorithms = {"round_robin": roundRobin, "least_connections": roundRobin}
    assert problem('[pools.api]\n\nalgorithm = "round-robin"\n', algorithms) == (
        3,
        "pools.api.algorithm",
        "unknown algorithm 'round-robin' (did you mean 'round_robin'?); "
        "installed: least_connections, round_robin",
    )
    assert problem('[pools.api]\nalgorithm = "maglev"\n', algorithms)[2] == (
        "unknown algorithm 'maglev'; installed: least_connections, round_robin"
    )


def test_default_algorithm_is_checked_against_installed_ones():
    assert problem("[pools.api]\n", {"other": roundRobin}) == (
        1,
        "pools.api.algorithm",
        f"unknown algorithm {DEFAULT_ALGORITHM!r}; installed: other",
    )


def test_options_rejected_by_the_factory():
    assert problem('[pools.api]\nalgorithm = "round_robin"\noptions = { vnodes = 10 }\n',
                   {"round_robin": roundRobin}) == (
        3,
        "pools.api.options",
        "round_robin takes no options (got vnodes)",
    )


def test_a_factory_that_crashes_is_reported_not_raised():
    def broken(options):
        raise KeyError("vnodes")

    assert problem('[pools.api]\nalgorithm = "mine"\noptions = {}\n', {"mine": broken}) == (
        3,
        "pools.api.options",
        "the mine scheduler failed on them: KeyError('vnodes')",
    )


def test_options_error_on_options_line():
    def picky(options):
        if "vnodes" not in options:
            raise SchedulerOptionsError('"vnodes" is required')

    text = '[pools.api]\nalgorithm = "ring"\n[pools.api.options]\nweight = 1\n'
    assert problem(text, {"ring": picky}) == (3, "pools.api.options", '"vnodes" is required')


def test_a_mistyped_algorithm_is_reported_once():
    """The default is not then tried with options meant for another one."""
    text = '[pools.api]\nalgorithm = 3\noptions = { vnodes = 10 }\n'
    assert problem(text, {"round_robin": roundRobin}) == (
        2,
        "pools.api.algorithm",
        "must be a string, not an integer",
    )


# Hash keys.


@pytest.mark.parametrize(
    "key", ["client_ip", "path", "header:X-Session", "cookie:SESSIONID", "query:user_id", "header:x.y~z"]
)
def test_hash_key_formats(key):
    config = parse(toml(f'[pools.api]\nhash_key = "{key}"\n'))
    assert config.pools["api"].hash_key == key


@pytest.mark.parametrize(
    "key", ["", "ip", "header:", "header", "cookie:a b", "query:a=b", "header:X:Y", "Client_IP", "path:x"]
)
def test_bad_hash_keys(key):
    assert problem(f'[pools.api]\nhash_key = "{key}"\n') == (
        2,
        "pools.api.hash_key",
        f"{key!r} is not a hash key (client_ip, path, header:NAME, cookie:NAME or query:NAME)",
    )


@pytest.mark.parametrize("key", ["header:X-Session", "cookie:SID", "query:u", "path"])
def test_tcp_service_needs_a_client_ip_pool(key):
    text = f'[pools.api]\nhash_key = "{key}"\n' + service()
    assert problem(text) == (
        6,
        "services[0].pool",
        f"pool 'api' has hash_key = {key!r}, but a TCP service can only hash on the client "
        'address: use hash_key = "client_ip"',
    )


def test_a_hash_keyed_pool_no_tcp_service_uses_is_fine():
    config = parse(toml('[pools.api]\nhash_key = "header:X"\n[pools.db]\n' + service(pool="db")))
    assert config.pools["api"].hash_key == "header:X"


H2POOL = """
[pools.api]
protocol = "h2"
servers = [{ name = "s1", address = "127.0.0.1:9001" }]
"""


def test_a_tcp_service_cannot_use_an_h2_pool():
    assert problem(H2POOL + service()) == (
        7,
        "services[0].pool",
        "pool 'api' has protocol = \"h2\", which only HTTP services speak to servers: a TCP service passes the"
        " client's bytes through as they are (HTTP/2 too); use a pool without protocol = \"h2\"",
    )


def test_a_udp_service_cannot_use_an_h2_pool():
    assert problem(H2POOL + udpService()) == (
        7,
        "services[0].pool",
        "pool 'api' has protocol = \"h2\", which only HTTP services speak to servers: a UDP service sends"
        " datagrams; use a pool without protocol = \"h2\"",
    )


def test_an_http_service_and_its_routes_may_use_an_h2_pool():
    config = parse(toml(H2POOL + service('protocol = "http"\n[[services.routes]]\npath_prefix = "/g/"\npool = "api"\n')))
    assert config.pools["api"].protocol == "h2" and config.services[0].routes[0].pool == "api"


# Several problems; formatting; files.


def test_two_mistakes_are_both_reported_in_file_order():
    text = """
    [[services]]
    name = "web"
    listen = "tcp:8080"
    pool = "apx"

    [pools.api]
    retries = "two"
    servers = [{ name = "s1", address = "127.0.0.1:99999" }]
    """
    with pytest.raises(ConfigError) as info:
        parse(toml(text), "site.toml")
    assert info.value.lines() == [
        "site.toml:4: services[0].pool: no pool named 'apx' (did you mean 'api'?)",
        "site.toml:7: pools.api.retries: must be an integer, not a string",
        "site.toml:8: pools.api.servers[0].address: port 99999 is out of range (1-65535) in '127.0.0.1:99999'",
    ]
    assert str(info.value) == "\n".join(info.value.lines())


def test_problems_are_sorted_even_when_found_out_of_order():
    """[frontend] is checked last (unknown keys of the root) but written first."""
    text = '[frontend]\nmode = "x"\n[pools.api]\nretries = -1\n'
    assert [(line, path) for line, path, _ in problems(text)] == [(1, "frontend"), (4, "pools.api.retries")]


def test_problem_format():
    assert Problem("a.b", "is wrong", 3).format("f.toml") == "f.toml:3: a.b: is wrong"
    assert Problem("a.b", "is wrong").format("f.toml") == "f.toml: a.b: is wrong"
    assert Problem("", "cannot read").format("f.toml") == "f.toml: cannot read"


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "txlb.toml"
    path.write_text(toml(POOL + service()), encoding="utf-8")
    config = load(str(path), schedulerFactories())
    assert config.path == str(path)
    assert config.services[0].pool == "api"


def test_load_reports_a_bad_file_with_its_name(tmp_path):
    path = tmp_path / "txlb.toml"
    path.write_text('[pools.api]\nretries = "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.lines() == [f"{path}:2: pools.api.retries: must be an integer, not a string"]


def test_load_of_a_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    (line,) = info.value.lines()
    assert line.startswith(f"{path}: cannot read the config file: ")
    assert "No such file" in line


def test_load_of_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[log]\npath = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.lines()[0].startswith(f"{path}: cannot read the config file: ")


def test_demo_servers():
    text = """
    [demo]
    servers = [
      { name = "server-1", listen = "tcp:9001:interface=127.0.0.1" },
      { name = "server-1", listen = "tcp:9002:interface=127.0.0.1" },
      { name = "server-3" },
      { name = "server-4" },
    ]
    """
    assert problems(text) == [
        (4, "demo.servers[1].name", "another demo server is already called 'server-1'"),
        (5, "demo.servers[2].listen", "is required"),
        (6, "demo.servers[3].listen", "is required"),
    ]


def test_servers_without_names_are_not_duplicates():
    text = '[pools.api]\nservers = [\n  { address = "h:1" },\n  { address = "h:2" },\n]\n'
    assert problems(text) == [
        (3, "pools.api.servers[0].name", "is required"),
        (4, "pools.api.servers[1].name", "is required"),
    ]


def test_services_without_names_are_not_duplicates():
    text = POOL + '[[services]]\nlisten = "tcp:1"\npool = "api"\n[[services]]\nlisten = "tcp:2"\npool = "api"\n'
    assert problems(text) == [(3, "services[0].name", "is required"), (6, "services[1].name", "is required")]


def test_servers_as_an_array_of_tables():
    text = """
    [pools.api]
    algorithm = "round_robin"

    [[pools.api.servers]]
    name = "api-1"
    address = "10.0.0.5:9001"

    [[pools.api.servers]]
    name = "api-2"
    adress = "10.0.0.6:9001"
    """
    assert problems(text) == [
        (8, "pools.api.servers[1].address", "is required"),
        (10, "pools.api.servers[1].adress", "unknown key (did you mean 'address'?)"),
    ]
    config = parse(toml(text.replace("adress", "address")))
    assert [s.name for s in config.pools["api"].servers] == ["api-1", "api-2"]


def test_syntax_error_in_a_table_header():
    with pytest.raises(ConfigError) as info:
        parse('[log]\nformat = "json"\n\n[pools.api\n', "txlb.toml")
    assert info.value.lines() == [
        "txlb.toml:4: not valid TOML: Expected ']' at the end of a table declaration (column 11)"
    ]


def test_ipv6_listen_in_a_literal_string():
    config = parse(toml(POOL + service(listen="'tcp:8080:interface=\\:\\:1'")))
    assert config.services[0].listen == (r"tcp:8080:interface=\:\:1",)


@st.composite
def _configWithOneUnknownKey(draw) -> tuple[str, str, int]:
    """
    A valid config written in varied styles with C{bogus = 1} added to one
    table; the text, the key path and the line where it went.
    """
    lines: list[str] = []
    targets: list[tuple[str, int]] = []  # (table path, index in lines to insert after)

    def table(path: str) -> None:
        targets.append((path, len(lines)))

    lines.append("[txlb]")
    lines.append('shutdown_timeout = "5s"')
    table("txlb")
    lines.append("[log]")
    table("log")
    poolNames = draw(st.lists(st.sampled_from(["api", "db", "web-1", "x.y"]), min_size=1, max_size=3, unique=True))
    for name in poolNames:
        lines.append(f'[pools."{name}"]' if "." in name else f"[pools.{name}]")
        lines.append('connect_timeout = "1s"')
        table(f"pools.{name}")
        count = draw(st.integers(0, 3))
        if draw(st.booleans()):
            lines.append("servers = [")
            for i in range(count):
                lines.append(f'  {{ name = "s{i}", address = "10.0.0.{i + 1}:80", weight = 1 }},')
                # Goes into the inline table itself, before its "}".
                targets.append((f"pools.{name}.servers[{i}]", -len(lines)))
            lines.append("]")
        else:
            for i in range(count):
                lines.append(f"[[pools.{name}.servers]]" if "." not in name else f'[[pools."{name}".servers]]')
                lines.append(f'name = "s{i}"')
                lines.append(f'address = "[::1]:{9000 + i}"')
                table(f"pools.{name}.servers[{i}]")
    for k in range(draw(st.integers(0, 3))):
        lines.append("[[services]]")
        lines.append(f'name = "svc{k}"')
        lines.append(f'listen = ["tcp:{8000 + k}"]')
        lines.append(f'pool = "{draw(st.sampled_from(poolNames))}"')
        table(f"services[{k}]")
        if draw(st.booleans()):
            lines.append("[services.timeouts]")
            lines.append('idle = "1m"')
            table(f"services[{k}].timeouts")
    path, where = draw(st.sampled_from(targets))
    if where < 0:  # inside an inline server table
        index = -where - 1
        lines[index] = lines[index].replace("weight = 1 },", "weight = 1, bogus = 1 },")
        line = index + 1
    else:
        lines.insert(where, "bogus = 1")
        line = where + 1
    return "\n".join(lines) + "\n", f"{path}.bogus", line


@settings(max_examples=200, deadline=None)
@given(_configWithOneUnknownKey())
def test_an_unknown_key_anywhere_is_found_at_its_path_and_line(case):
    text, path, line = case
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert [(p.line, p.path) for p in info.value.problems] == [(line, path)], text



def test_sticky_sessions_and_cluster():
    config = parse(toml(
        POOL + service('protocol = "http"\nsticky = { mode = "key", key = "cookie:SESSIONID" }\n')
        + '[sessions]\nstore = "redis"\nredis = "127.0.0.1:6390"\nttl = "10m"\n'
        + '[cluster]\nmode = "active-passive"\nnode = "lb-1"\nheartbeat = "500ms"\nfailover_after = "2s"\n'
        + '[dns]\nlisten = "udp:5353:interface=127.0.0.1"\nname = "app.example.com"\nttl = 5\n'
    ))
    [svc] = config.services
    assert (svc.sticky.mode, svc.sticky.key) == ("key", "cookie:SESSIONID")
    assert (config.sessions.store, config.sessions.redis, config.sessions.ttl) == (
        "redis", "tcp:host=127.0.0.1:port=6390", 600.0)
    assert (config.cluster.mode, config.cluster.node, config.cluster.failover_after) == ("active-passive", "lb-1", 2.0)
    assert (config.dns.name, config.dns.ttl) == ("app.example.com", 5)
    assert parse("").cluster.mode == "standalone" and parse("").sessions.store == "memory"


@pytest.mark.parametrize(
    "text, path",
    [
        (POOL + service('sticky = { mode = "cookie" }\n'), "services[0].sticky.mode"),  # TCP: ip only
        (POOL + service('protocol = "http"\nsticky = { mode = "key" }\n'), "services[0].sticky.key"),
        (POOL + service('protocol = "http"\nsticky = { mode = "key", key = "body:x" }\n'), "services[0].sticky.key"),
        ('[cluster]\nmode = "active-passive"\nheartbeat = "5s"\nfailover_after = "1s"\n', "cluster.failover_after"),
        ('[cluster]\nmode = "active-active"\naddress = "lb-1.example"\n', "cluster.address"),
        ('[cluster]\nmode = "active-active"\n[dns]\nlisten = "tcp:53"\nname = "a"\n', "dns.listen"),
        ('[dns]\nname = "a"\n', "dns.name"),
    ],
)
def test_bad_sticky_and_cluster(text, path):
    assert [p for _, p, _ in problems(text)] == [path]


def test_a_udp_service_and_dns_cannot_share_a_socket():
    text = POOL + udpService(listen='"udp:5353"') + (
        '[cluster]\nmode = "active-active"\n[dns]\nlisten = "udp:5353:interface=127.0.0.1"\nname = "lb.example"\n'
    )
    line, path, message = problem(text)
    assert path == "dns.listen"
    assert "is already used by services[0].listen" in message


def test_http2_and_max_concurrent_streams():
    config = parse(toml(POOL + service('protocol = "http"\n')))
    assert config.services[0].http2 is True and config.services[0].limits.max_concurrent_streams == 100
    config = parse(toml(POOL + service('protocol = "http"\nhttp2 = false\nlimits = { max_concurrent_streams = 8 }\n')))
    assert config.services[0].http2 is False and config.services[0].limits.max_concurrent_streams == 8
    found = problems(POOL + service('protocol = "http"\nhttp2 = "yes"\nlimits = { max_concurrent_streams = 0 }\n'))
    assert [(line, path) for line, path, _ in found] == [
        (8, "services[0].http2"), (9, "services[0].limits.max_concurrent_streams")]
    assert "between 1 and 10000" in found[1][2]
    assert problem(POOL + service("http2 = true\n"))[1] == "services[0].http2"  # a TCP service
