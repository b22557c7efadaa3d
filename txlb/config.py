# -*- test-case-name: tests.test_config -*-
"""
The config file: TOML in, validated and frozen objects out.

Validation reports every problem at once, in file order, one line each, as
C{FILE:LINE: KEY.PATH: what is wrong}, and never raises anything but
L{ConfigError}: an operator fixes the whole file in one pass, and no
traceback ever stands in for a message.  Each section is read by a small function over a L{_Table},
which remembers the keys it was asked for: whatever is left is an unknown
key (with the closest known one suggested), or a key that a later version
of txlb supports (L{PLANNED}), which is said plainly rather than ignored.
A later feature adds its keys by adding C{table.get(...)} lines and fields.
"""

from __future__ import annotations

import difflib
import ipaddress
import socket
import os
import re
import tomllib
from types import MappingProxyType
from typing import Any, Callable, Collection, Mapping, Optional, Sequence, TypeVar

import attrs

from txlb._tomlpos import keyLines, lineOf
from txlb.endpoints import EndpointError, checkClient, checkServer, sameSocket, serverAddress
from txlb.interfaces import SchedulerOptionsError

T = TypeVar("T")

#: Scheduler factories by the name C{algorithm =} uses, as
#: L{txlb.schedulers.schedulerFactories} gives them: called with a pool's
#: C{options}, they raise L{SchedulerOptionsError} when those do not suit.
Algorithms = Mapping[str, Callable[[Mapping[str, Any]], Any]]


# The objects the rest of txlb reads.  Durations are in seconds, as floats;
# addresses are endpoint strings (a server's host:port already turned into
# one), so that nothing downstream parses config text again.


@attrs.frozen
class ServerConfig:
    """One entry of a pool's C{servers}."""

    name: str
    address: str
    weight: int = 1


@attrs.frozen
class HealthConfig:
    """
    A pool's C{health} table: active checks.  C{kind = "none"} runs none
    and keeps every server in rotation.
    """

    kind: str = "none"
    path: str = "/health"
    method: str = "GET"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    expect_status: tuple[int, ...] = (200,)
    expect_json: Mapping[str, tuple[Any, ...]] = MappingProxyType({})
    options: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class PassiveConfig:
    """A pool's C{passive} table: ejection on failures of live traffic."""

    consecutive_failures: int = 5
    eject_for: float = 30.0


@attrs.frozen
class AdminConfig:
    """The C{[admin]} table: the admin API, status page and metrics."""

    listen: str = "tcp:8081:interface=127.0.0.1"
    token_file: Optional[str] = None


@attrs.frozen
class BackendTLSConfig:
    """
    A pool's C{tls}: TLS to every server of the pool.  Without
    C{server_name}, each server's own host name is verified.
    """

    verify: bool = True
    ca: Optional[str] = None
    server_name: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None


@attrs.frozen
class PoolConfig:
    """
    A C{[pools.NAME]} table.  C{options} is read-only, so that a scheduler
    cannot change the config it was built from.
    """

    name: str
    algorithm: str
    servers: tuple[ServerConfig, ...]
    connect_timeout: float = 2.0
    retries: int = 2
    hash_key: str = "client_ip"
    options: Mapping[str, Any] = MappingProxyType({})
    health: HealthConfig = HealthConfig()
    passive: Optional[PassiveConfig] = None
    max_connections: int = 0
    queue_timeout: float = 5.0
    slow_start: float = 0.0
    tls: Optional[BackendTLSConfig] = None


@attrs.frozen
class Timeouts:
    """A service's C{timeouts}; C{0} means none.  TCP services use C{idle} only."""

    client: float = 60.0
    backend: float = 30.0
    idle: float = 600.0


@attrs.frozen
class RouteConfig:
    """One C{[[services.routes]]} table: every condition given must hold."""

    pool: str
    host: Optional[str] = None
    path_prefix: Optional[str] = None
    methods: tuple[str, ...] = ()
    headers: Mapping[str, str] = MappingProxyType({})


@attrs.frozen
class Limits:
    """An HTTP service's C{limits}; C{max_body = 0} means unlimited."""

    max_header_bytes: int = 32 * 1024
    max_body: int = 0


@attrs.frozen
class CacheConfig:
    """An HTTP service's C{cache}: the store's bounds in bytes."""

    max_size: int = 64 * 1024 * 1024
    max_object: int = 1024 * 1024


@attrs.frozen
class TLSConfig:
    """A service's C{tls}: terminate TLS on its listeners."""

    certificates: tuple[tuple[str, str], ...]
    min_version: str = "1.2"


@attrs.frozen
class ServiceConfig:
    """One C{[[services]]} table."""

    name: str
    protocol: str
    listen: tuple[str, ...]
    pool: str
    timeouts: Timeouts = Timeouts()
    routes: tuple[RouteConfig, ...] = ()
    limits: Limits = Limits()
    forwarded: bool = False
    tls: Optional[TLSConfig] = None
    sticky: Optional[StickyConfig] = None
    cache: Optional[CacheConfig] = None


@attrs.frozen
class LogConfig:
    """The C{[log]} table."""

    format: str = "json"
    path: str = "-"
    access: bool = True


@attrs.frozen
class ProcessConfig:
    """The C{[txlb]} table."""

    shutdown_timeout: float = 30.0
    workers: int = 1


@attrs.frozen
class DemoServer:
    """One of C{[demo] servers}: a backend txlb runs itself, for trying it out."""

    name: str
    listen: str


@attrs.frozen
class Config:
    """
    A whole validated config file.  C{pools} keeps the file's order, so
    summaries and the admin API list pools as the operator wrote them.
    """

    path: str
    txlb: ProcessConfig = ProcessConfig()
    log: LogConfig = LogConfig()
    pools: Mapping[str, PoolConfig] = MappingProxyType({})
    services: tuple[ServiceConfig, ...] = ()
    demo: tuple[DemoServer, ...] = ()
    admin: Optional[AdminConfig] = None
    sessions: "SessionsConfig" = attrs.field(factory=lambda: SessionsConfig())
    cluster: "ClusterConfig" = attrs.field(factory=lambda: ClusterConfig())
    dns: Optional["DNSConfig"] = None


@attrs.frozen
class StickyConfig:
    """
    A service's C{sticky}: C{cookie} (txlb's own cookie names the server),
    C{ip} (the client address) or C{key} (the application's session id,
    C{cookie:NAME} or C{header:NAME}).
    """

    mode: str
    cookie: str = "LB_SERVER"
    key: Optional[str] = None


@attrs.frozen
class SessionsConfig:
    """C{[sessions]}: where C{ip} and C{key} affinities are kept."""

    store: str = "memory"
    redis: str = "tcp:host=127.0.0.1:port=6379"
    ttl: float = 3600.0
    max_entries: int = 100_000


@attrs.frozen
class ClusterConfig:
    """C{[cluster]}: txlb's own high availability."""

    mode: str = "standalone"
    node: str = attrs.field(factory=lambda: socket.gethostname())
    redis: str = "tcp:host=127.0.0.1:port=6379"
    heartbeat: float = 1.0
    failover_after: float = 3.0
    address: str = "127.0.0.1"
    on_active: str = ""


@attrs.frozen
class DNSConfig:
    """C{[dns]}: an authoritative answer for C{name} with the live nodes."""

    listen: str
    name: str
    ttl: int = 5


# Errors.


@attrs.frozen
class Problem:
    """
    One thing wrong with the file: the key path as the validator names it
    (C{pools.api.servers[1].address}; empty for the file as a whole), what
    is wrong, and the line it is written on when that is known.
    """

    path: str
    message: str
    line: Optional[int] = None

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """
    The config does not validate.  C{str()} gives one line per problem.
    """

    def __init__(self, source: str, problems: Collection[Problem]) -> None:
        super().__init__(source, tuple(problems))
        self.source = source
        self.problems = tuple(problems)

    def lines(self) -> list[str]:
        return [p.format(self.source) for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())


#: Keys that belong to features of txlb still to come, by table kind.  They
#: are refused with this explanation rather than as unknown keys.
PLANNED: Mapping[str, Mapping[str, str]] = {
    "": {
    },
    "pool": {
    },
    "service": {
        "proxy_protocol": "the PROXY protocol",
    },
}


class _Invalid(ValueError):
    """
    A converter's complaint about one value.  C{items} holds complaints
    about elements of an array, by index, so that each is reported at its
    own key path (C{listen[1]}) and line.
    """

    def __init__(self, message: str = "", items: Sequence[tuple[int, str]] = ()) -> None:
        super().__init__(message)
        self.items = tuple(items)


class _Context:
    #: Installed health-check kinds (plugins included), when known; a
    #: mapping of kind to factory also has each kind's options checked.
    healthKinds: Optional[Collection[str]] = None
    #: Where relative file names in the config are found: its directory.
    baseDir: str = "."

    def __init__(self, lines: Mapping[str, int]) -> None:
        self.lines = lines
        self.problems: list[Problem] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message, lineOf(dict(self.lines), path)))


_REQUIRED: Any = object()


class _Table:
    """
    One TOML table being read: hands out values by key, converted, and
    reports problems against the right key path.
    """

    def __init__(self, ctx: _Context, path: str, data: Mapping[str, Any], kind: str) -> None:
        self.ctx = ctx
        self.path = path
        self.data = data
        self.kind = kind
        self.seen: set[str] = set()

    def keyPath(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.ctx.error(self.keyPath(key), message)

    def get(self, key: str, convert: Callable[[Any], T], default: T = _REQUIRED) -> T:
        """
        The converted value of C{key}, or C{default} when it is absent or
        invalid (the problem is recorded; the result is then never used).
        """
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.error(key, "is required")
                return None  # type: ignore[return-value]
            return default
        try:
            return convert(self.data[key])
        except _Invalid as e:
            if e.items:
                for index, message in e.items:
                    self.error(f"{key}[{index}]", message)
            else:
                self.error(key, str(e))
            return default if default is not _REQUIRED else None  # type: ignore[return-value]

    def table(self, key: str, kind: str) -> Optional["_Table"]:
        self.seen.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(key, f"must be a table, not {_describe(value)}")
            return None
        return _Table(self.ctx, self.keyPath(key), value, kind)

    def tables(self, key: str, kind: str) -> list["_Table"]:
        """An array of tables (C{[[services]]} or C{servers = [{...}]})."""
        self.seen.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.error(key, f"must be an array of tables, not {_describe(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            path = f"{self.keyPath(key)}[{i}]"
            if isinstance(item, dict):
                out.append(_Table(self.ctx, path, item, kind))
            else:
                self.ctx.error(path, f"must be a table, not {_describe(item)}")
        return out

    def finish(self) -> None:
        """Report every key nobody asked for."""
        planned = PLANNED.get(self.kind, {})
        known = sorted(self.seen | set(planned))
        for key in self.data:
            if key in self.seen:
                continue
            if key in planned:
                self.error(
                    key, f"not supported by this version of txlb yet ({planned[key]}); remove it"
                )
                continue
            self.error(key, f"unknown key{_didYouMean(key, known)}")


def _didYouMean(name: str, known: Collection[str]) -> str:
    """C{" (did you mean 'x'?)"} for the closest of C{known}, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


# Converters: a value in, the typed value out, or _Invalid.


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_describe(value)}")
    return value


def _name(value: Any) -> str:
    value = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise _Invalid(f"{value!r} is not a valid name (letters, digits, '_', '.', '-')")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, not {_describe(value)}")
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"must be an integer, not {_describe(value)}")
        if not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}, not {value}")
        return value

    return convert


def _oneOf(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        value = _string(value)
        if value not in choices:
            raise _Invalid(f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value

    return convert


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parseDuration(value: Any) -> float:
    """
    C{"250ms"}, C{"2s"}, C{"5m"}, C{"1h"} or C{"0"}, in seconds.  A bare
    number is refused: C{timeout = 30} could mean seconds or milliseconds,
    and the operator should say which.

    @raise ValueError: C{value} is not a duration.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise _Invalid(f'needs a unit: write "{value}s" for seconds, "{value}ms" for milliseconds')
    text = _string(value).strip()
    if text == "0":
        return 0.0
    m = _DURATION.fullmatch(text)
    if m is None:
        raise _Invalid(f'{text!r} is not a duration (write it like "250ms", "2s", "5m" or "1h")')
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _positiveDuration(value: Any) -> float:
    seconds = parseDuration(value)
    if seconds <= 0:
        raise _Invalid("must be longer than 0")
    return seconds


_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
               "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parseSize(value: Any) -> int:
    """
    C{"64KiB"}, C{"10MiB"}, C{"0"} or a plain number of bytes.

    @raise ValueError: C{value} is not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _Invalid(f"must not be negative, not {value}")
        return value
    text = _string(value).strip()
    m = _SIZE.fullmatch(text)
    if m is None:
        raise _Invalid(f'{text!r} is not a size (write it like "64KiB" or "10MiB")')
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def _listenEndpoint(value: Any) -> str:
    text = _string(value)
    try:
        checkServer(text)
    except EndpointError as e:
        raise _Invalid(str(e))
    return text


def _connectAddress(value: Any) -> str:
    try:
        return serverAddress(_string(value))
    except EndpointError as e:
        raise _Invalid(str(e))


def _connectEndpoint(value: Any) -> str:
    text = _string(value)
    try:
        checkClient(text)
    except EndpointError as e:
        raise _Invalid(str(e))
    return text


def _stringList(convert: Callable[[Any], str]) -> Callable[[Any], tuple[str, ...]]:
    """One string or an array of them; each item checked by C{convert}."""

    def convertAll(value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise _Invalid("must be a string or a non-empty array of strings")
        out: list[str] = []
        problems: list[tuple[int, str]] = []
        for i, item in enumerate(items):
            try:
                out.append(convert(item))
            except _Invalid as e:
                problems.append((i, str(e)))
        if problems:
            if isinstance(value, str):
                raise _Invalid(problems[0][1])
            raise _Invalid(items=problems)
        return tuple(out)

    return convertAll


_HASH_KEY = re.compile(r"client_ip|path|(header|cookie|query):[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _hashKey(value: Any) -> str:
    text = _string(value)
    if not _HASH_KEY.fullmatch(text):
        raise _Invalid(
            f"{text!r} is not a hash key (client_ip, path, header:NAME, cookie:NAME or query:NAME)"
        )
    return text


def _freeTable(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table, not {_describe(value)}")
    return MappingProxyType(dict(value))


# The sections.


def _readProcess(t: _Table) -> ProcessConfig:
    workers = t.get("workers", _integer(1, 64), 1)
    if workers != 1:
        t.error("workers", "more than one worker process is not supported by this version of txlb yet; use 1")
    process = ProcessConfig(
        shutdown_timeout=t.get("shutdown_timeout", parseDuration, 30.0),
        workers=workers,
    )
    t.finish()
    return process


def _readLog(t: _Table) -> LogConfig:
    log = LogConfig(
        format=t.get("format", _oneOf("json", "text"), "json"),
        path=_logPath(t),
        access=t.get("access", _boolean, True),
    )
    t.finish()
    return log


def _logPath(t: _Table) -> str:
    """C{-} for standard output, else a file relative to the config file."""
    path = t.get("path", _string, "-")
    return path if path == "-" else os.path.join(t.ctx.baseDir, path)


def _readServers(pool: _Table) -> tuple[ServerConfig, ...]:
    servers: list[ServerConfig] = []
    names: set[str] = set()
    for t in pool.tables("servers", "server"):
        name = t.get("name", _name)
        if name is not None and name in names:
            t.error("name", f"another server of this pool is already called {name!r}")
        names.add(name)
        servers.append(
            ServerConfig(
                name=name,
                address=t.get("address", _connectAddress),
                weight=t.get("weight", _integer(0, 1000), 1),
            )
        )
        t.finish()
    return tuple(servers)


def _readPool(t: _Table, name: str, algorithms: Optional[Algorithms]) -> PoolConfig:
    from txlb.schedulers import DEFAULT_ALGORITHM

    algorithm = t.get("algorithm", _string, None)
    options = t.get("options", _freeTable, MappingProxyType({}))
    # A mistyped algorithm is reported once: its default is not then
    # checked against options that were meant for something else.
    if "algorithm" not in t.data:
        algorithm = DEFAULT_ALGORITHM
    if algorithms is not None and algorithm is not None:
        factory = algorithms.get(algorithm)
        if factory is None:
            t.error(
                "algorithm",
                f"unknown algorithm {algorithm!r}{_didYouMean(algorithm, algorithms)}; "
                f"installed: {', '.join(sorted(algorithms))}",
            )
        else:
            try:
                factory(options)
            except SchedulerOptionsError as e:
                t.error("options", str(e))
            except Exception as e:  # a plugin's bug, but the operator must hear of it
                t.error("options", f"the {algorithm} scheduler failed on them: {e!r}")
    pool = PoolConfig(
        name=name,
        algorithm=algorithm,
        servers=_readServers(t),
        connect_timeout=t.get("connect_timeout", _positiveDuration, 2.0),
        retries=t.get("retries", _integer(0, 100), 2),
        hash_key=t.get("hash_key", _hashKey, "client_ip"),
        options=options,
        max_connections=t.get("max_connections", _integer(0, 1_000_000), 0),
        queue_timeout=t.get("queue_timeout", parseDuration, 5.0),
        slow_start=t.get("slow_start", parseDuration, 0.0),
        tls=_readBackendTLS(t.table("tls", "pool_tls")),
        health=_readHealth(t.table("health", "health")),
        passive=_readPassive(t.table("passive", "passive")),
    )
    t.finish()
    return pool


_BUILTIN_HEALTH = ("none", "http", "tcp")


def _statusList(value: Any) -> tuple[int, ...]:
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, list) or not items:
        raise _Invalid("must be an array of HTTP status codes, like [200, 204]")
    for code in items:
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise _Invalid(f"{code!r} is not an HTTP status code")
    return tuple(items)


def _expectJson(value: Any) -> Mapping[str, tuple[Any, ...]]:
    if not isinstance(value, dict) or not value:
        raise _Invalid('must be a table of field to accepted values, like { status = ["ok"] }')
    out = {}
    for field, accepted in value.items():
        accepted = accepted if isinstance(accepted, list) else [accepted]
        if not accepted or any(isinstance(a, (dict, list)) for a in accepted):
            raise _Invalid(f"the values for {field!r} must be strings, numbers or booleans")
        out[field] = tuple(accepted)
    return MappingProxyType(out)


def _readHealth(t: Optional[_Table]) -> HealthConfig:
    if t is None:
        return HealthConfig()
    kind = t.get("kind", _string, "none")
    known = t.ctx.healthKinds
    if kind not in _BUILTIN_HEALTH and known is not None and kind not in known:
        installed = sorted(set(known) | set(_BUILTIN_HEALTH))
        t.error("kind", f"unknown health check kind {kind!r}{_didYouMean(kind, installed)}; "
                        f"installed: {', '.join(installed)}")
    health = HealthConfig(
        kind=kind,
        path=t.get("path", _pathPrefix, "/health"),
        method=t.get("method", _oneOf("GET", "HEAD", "OPTIONS"), "GET"),
        interval=t.get("interval", _positiveDuration, 2.0),
        timeout=t.get("timeout", _positiveDuration, 1.0),
        rise=t.get("rise", _integer(1, 100), 2),
        fall=t.get("fall", _integer(1, 100), 3),
        expect_status=t.get("expect_status", _statusList, (200,)),
        expect_json=t.get("expect_json", _expectJson, MappingProxyType({})),
        options=t.get("options", _freeTable, MappingProxyType({})),
    )
    if health.timeout > health.interval:
        t.error("timeout", "must not be longer than interval")
    factory = known.get(kind) if isinstance(known, Mapping) else None
    if factory is not None:
        try:
            factory(health.options)
        except ValueError as e:  # HealthCheckOptionsError, or a plugin's own
            t.error("options", str(e))
    t.finish()
    return health


def _readPassive(t: Optional[_Table]) -> Optional[PassiveConfig]:
    if t is None:
        return None
    passive = PassiveConfig(
        consecutive_failures=t.get("consecutive_failures", _integer(1, 10000), 5),
        eject_for=t.get("eject_for", _positiveDuration, 30.0),
    )
    t.finish()
    return passive


def _file(t: _Table, key: str, default: Optional[str] = None) -> Optional[str]:
    """A file name, relative to the config file, that must be readable."""
    name = t.get(key, _string, default)
    if name is None:
        return None
    path = os.path.join(t.ctx.baseDir, name)
    if not os.access(path, os.R_OK):
        t.error(key, f"cannot read {path}")
    return path


def _readTLS(t: Optional[_Table]) -> Optional[TLSConfig]:
    from txlb.tls import CertificateError, checkCertificate

    if t is None:
        return None
    pairs = []
    for c in t.tables("certificates", "certificate"):
        cert, key = _file(c, "cert"), _file(c, "key")
        c.finish()
        if cert and key and not _hasProblems(c):
            try:
                checkCertificate(cert, key)
            except CertificateError as e:
                c.error("cert", str(e))
        pairs.append((cert, key))
    if "certificates" in t.data and not pairs:
        t.error("certificates", "needs at least one { cert = ..., key = ... }")
    elif "certificates" not in t.data:
        t.error("certificates", 'is required: [{ cert = "site.pem", key = "site.key" }]')
    tls = TLSConfig(certificates=tuple(pairs), min_version=t.get("min_version", _oneOf("1.2", "1.3"), "1.2"))
    t.finish()
    return tls


def _hasProblems(t: _Table) -> bool:
    """Whether a problem was already found in this table."""
    return any(p.path.startswith(t.path) for p in t.ctx.problems)


def _readBackendTLS(t: Optional[_Table]) -> Optional[BackendTLSConfig]:
    from txlb.tls import CertificateError, checkCertificate

    if t is None:
        return None
    tls = BackendTLSConfig(
        verify=t.get("verify", _boolean, True),
        ca=_file(t, "ca"),
        server_name=t.get("server_name", _string, None),
        cert=_file(t, "cert"),
        key=_file(t, "key"),
    )
    if (tls.cert is None) != (tls.key is None):
        t.error("cert" if tls.cert is None else "key", "cert and key go together (mutual TLS)")
    elif tls.cert and tls.key and not _hasProblems(t):
        try:
            checkCertificate(tls.cert, tls.key)
        except CertificateError as e:
            t.error("cert", str(e))
    t.finish()
    return tls


_STICKY_KEY = re.compile(r"(cookie|header):[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _readSticky(t: Optional[_Table], protocol: str) -> Optional[StickyConfig]:
    if t is None:
        return None
    modes = ("cookie", "ip", "key") if protocol == "http" else ("ip",)
    mode = t.get("mode", _oneOf(*modes))
    cookie = t.get("cookie", _headerToken, "LB_SERVER")
    key = t.get("key", _string, None)
    if mode == "key":
        if key is None:
            t.error("key", 'is required in key mode: "cookie:SESSIONID" or "header:X-Session"')
        elif not _STICKY_KEY.fullmatch(key):
            t.error("key", f'{key!r} is not "cookie:NAME" or "header:NAME"')
    elif key is not None:
        t.error("key", 'applies to mode = "key" only')
    t.finish()
    return StickyConfig(mode=mode, cookie=cookie, key=key)


def _headerToken(value: Any) -> str:
    text = _string(value)
    if not _TOKEN.fullmatch(text):
        raise _Invalid(f"{text!r} is not a valid cookie name")
    return text


def _readSessions(t: _Table) -> SessionsConfig:
    sessions = SessionsConfig(
        store=t.get("store", _oneOf("memory", "redis"), "memory"),
        redis=t.get("redis", _connectAddress, "tcp:host=127.0.0.1:port=6379"),
        ttl=t.get("ttl", _positiveDuration, 3600.0),
        max_entries=t.get("max_entries", _integer(1, 100_000_000), 100_000),
    )
    t.finish()
    return sessions


def _readCluster(t: _Table) -> ClusterConfig:
    defaults = ClusterConfig()
    cluster = ClusterConfig(
        mode=t.get("mode", _oneOf("standalone", "active-passive", "active-active"), "standalone"),
        node=t.get("node", _name, defaults.node),
        redis=t.get("redis", _connectAddress, defaults.redis),
        heartbeat=t.get("heartbeat", _positiveDuration, 1.0),
        failover_after=t.get("failover_after", _positiveDuration, 3.0),
        address=t.get("address", _string, "127.0.0.1"),
        on_active=t.get("on_active", _string, ""),
    )
    if cluster.failover_after <= cluster.heartbeat:
        t.error("failover_after", "must be longer than heartbeat (several heartbeats, typically 3)")
    try:
        ipaddress.ip_address(cluster.address)
    except ValueError:
        t.error("address", f"{cluster.address!r} is not an IP address")
    t.finish()
    return cluster


_UDP = re.compile(r"udp:(?:port=)?(\d+)(?::interface=(.+))?")


def _udpListen(value: Any) -> str:
    text = _string(value)
    m = _UDP.fullmatch(text)
    if m is None or not 0 < int(m.group(1)) < 65536:
        raise _Invalid(f'{text!r} is not a UDP listen address (write it like "udp:5353:interface=127.0.0.1")')
    return text


def _readDNS(t: _Table) -> DNSConfig:
    dns = DNSConfig(
        listen=t.get("listen", _udpListen, "udp:5353:interface=127.0.0.1"),
        name=t.get("name", _string),
        ttl=t.get("ttl", _integer(0, 86400), 5),
    )
    t.finish()
    return dns


def _readAdmin(t: _Table) -> AdminConfig:
    tokenFile = t.get("token_file", _string, None)
    if tokenFile is not None:
        # Relative to the config file, as an operator reading it expects.
        tokenFile = os.path.join(t.ctx.baseDir, tokenFile)
        try:
            with open(tokenFile, encoding="utf-8") as f:
                if not f.readline().strip():
                    t.error("token_file", f"{tokenFile} is empty: write the token on its first line")
        except (OSError, UnicodeDecodeError) as e:
            t.error("token_file", f"cannot read {tokenFile}: {getattr(e, 'strerror', None) or e}")
    admin = AdminConfig(
        listen=t.get("listen", _listenEndpoint, "tcp:8081:interface=127.0.0.1"),
        token_file=tokenFile,
    )
    if admin.listen is not None and admin.token_file is None and not _loopbackOnly(admin.listen):
        t.error("listen", "the admin API listens beyond loopback: set token_file, or listen on "
                          "127.0.0.1 (tcp:8081:interface=127.0.0.1)")
    t.finish()
    return admin


def _loopbackOnly(listen: str) -> bool:
    """Whether a listening endpoint is reachable from this host only."""
    endpoint = checkServer(listen)
    if listen.startswith("unix:"):
        return True
    interface = getattr(endpoint, "_interface", "")
    return interface.startswith("127.") or interface in ("::1", "localhost")


def _readTimeouts(t: Optional[_Table], protocol: str) -> Timeouts:
    if t is None:
        return Timeouts(idle=600.0 if protocol == "tcp" else 75.0)
    if protocol == "tcp":
        for key in ("client", "backend"):
            if key in t.data:
                t.seen.add(key)
                t.error(key, 'applies to HTTP services; a TCP service has only "idle"')
        timeouts = Timeouts(idle=t.get("idle", parseDuration, 600.0))
    else:
        timeouts = Timeouts(
            client=t.get("client", parseDuration, 60.0),
            backend=t.get("backend", parseDuration, 30.0),
            idle=t.get("idle", parseDuration, 75.0),
        )
    t.finish()
    return timeouts


def _poolName(t: _Table, pools: Mapping[str, Any]) -> Optional[str]:
    """The C{pool} of a service or route, which must exist."""
    pool = t.get("pool", _name)
    if pool is not None and pool not in pools:
        t.error("pool", f"no pool named {pool!r}{_didYouMean(pool, pools)}")
        return None
    return pool


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _methods(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(m, str) for m in items):
        raise _Invalid('must be an array of method names, like ["GET", "POST"]')
    for m in items:
        if not _TOKEN.fullmatch(m):
            raise _Invalid(f"{m!r} is not a method name")
    return tuple(m.upper() for m in items)


def _pathPrefix(value: Any) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise _Invalid(f"{text!r} must start with '/'")
    return text


def _headerMatches(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid('must be a table of header name to value, like {{ "X-Tenant" = "blue" }}')
    for name, v in value.items():
        if not _TOKEN.fullmatch(name):
            raise _Invalid(f"{name!r} is not a header name")
        if not isinstance(v, str):
            raise _Invalid(f"the value for {name!r} must be a string")
    return MappingProxyType(dict(value))


def _readRoutes(t: _Table, pools: Mapping[str, Any]) -> tuple[RouteConfig, ...]:
    routes = []
    for r in t.tables("routes", "route"):
        routes.append(
            RouteConfig(
                pool=_poolName(r, pools),
                host=r.get("host", _string, None),
                path_prefix=r.get("path_prefix", _pathPrefix, None),
                methods=r.get("methods", _methods, ()),
                headers=r.get("headers", _headerMatches, MappingProxyType({})),
            )
        )
        r.finish()
    return tuple(routes)


def _readLimits(t: Optional[_Table]) -> Limits:
    if t is None:
        return Limits()
    limits = Limits(
        max_header_bytes=t.get("max_header_bytes", parseSize, 32 * 1024),
        max_body=t.get("max_body", parseSize, 0),
    )
    if limits.max_header_bytes < 1024:
        t.error("max_header_bytes", "must be at least 1KiB")
    t.finish()
    return limits


def _readCache(t: Optional[_Table]) -> Optional[CacheConfig]:
    if t is None:
        return None
    cache = CacheConfig(
        max_size=t.get("max_size", parseSize, 64 * 1024 * 1024),
        max_object=t.get("max_object", parseSize, 1024 * 1024),
    )
    if not cache.max_size:
        t.error("max_size", "must be more than 0 (leave cache out to cache nothing)")
    elif cache.max_object > cache.max_size:
        t.error("max_object", "must not be larger than max_size")
    t.finish()
    return cache


#: Keys of a service that only mean something for HTTP.
_HTTP_ONLY = ("routes", "limits", "forwarded", "cache")


def _readService(t: _Table, pools: Mapping[str, Any]) -> ServiceConfig:
    protocol = t.get("protocol", _oneOf("tcp", "http"), "tcp")
    pool = _poolName(t, pools)
    if protocol == "tcp":
        for key in _HTTP_ONLY:
            if key in t.data:
                t.seen.add(key)
                t.error(key, 'applies to HTTP services only (protocol = "http")')
    if protocol == "tcp" and pool in pools and pools[pool].hash_key != "client_ip":
        t.error(
            "pool",
            f"pool {pool!r} has hash_key = {pools[pool].hash_key!r}, but a TCP service"
            ' can only hash on the client address: use hash_key = "client_ip"',
        )
    service = ServiceConfig(
        name=t.get("name", _name),
        protocol=protocol,
        listen=t.get("listen", _stringList(_listenEndpoint)),
        pool=pool,
        timeouts=_readTimeouts(t.table("timeouts", "timeouts"), protocol),
        tls=_readTLS(t.table("tls", "tls")),
        sticky=_readSticky(t.table("sticky", "sticky"), protocol),
    )
    if protocol == "http":
        service = attrs.evolve(
            service,
            routes=_readRoutes(t, pools),
            limits=_readLimits(t.table("limits", "limits")),
            forwarded=t.get("forwarded", _boolean, False),
            cache=_readCache(t.table("cache", "cache")),
        )
    t.finish()
    return service


def _readDemo(t: _Table) -> tuple[DemoServer, ...]:
    servers: list[DemoServer] = []
    names: set[str] = set()
    for s in t.tables("servers", "demo_server"):
        name = s.get("name", _name)
        if name is not None and name in names:
            s.error("name", f"another demo server is already called {name!r}")
        names.add(name)
        servers.append(DemoServer(name=name, listen=s.get("listen", _listenEndpoint)))
        s.finish()
    t.finish()
    return tuple(servers)


def _readConfig(root: _Table, path: str, algorithms: Optional[Algorithms]) -> Config:
    ctx = root.ctx
    txlbTable = root.table("txlb", "txlb")
    process = _readProcess(txlbTable) if txlbTable else ProcessConfig()
    logTable = root.table("log", "log")
    log = _readLog(logTable) if logTable else LogConfig()
    pools: dict[str, PoolConfig] = {}
    poolsTable = root.table("pools", "pools")
    if poolsTable is not None:
        for name in poolsTable.data:
            poolTable = poolsTable.table(name, "pool")
            if poolTable is None:
                continue
            try:
                _name(name)
            except _Invalid as e:
                poolsTable.error(name, str(e))
            pools[name] = _readPool(poolTable, name, algorithms)
        poolsTable.finish()
    services: list[ServiceConfig] = []
    names: set[str] = set()
    listens: list[tuple[str, str]] = []  # (endpoint, key path), in file order

    def claim(listen: str, where: str) -> None:
        for other, otherWhere in listens:
            if sameSocket(listen, other):
                also = f" ({other!r})" if other != listen else ""
                ctx.error(where, f"{listen!r} is already used by {otherWhere}{also}")
                return
        listens.append((listen, where))

    for t in root.tables("services", "service"):
        service = _readService(t, pools)
        if service.name is not None and service.name in names:
            t.error("name", f"another service is already called {service.name!r}")
        names.add(service.name)
        listen = service.listen or ()
        for j, endpoint in enumerate(listen):
            claim(endpoint, f"{t.path}.listen[{j}]" if isinstance(t.data["listen"], list) else f"{t.path}.listen")
        services.append(service)
    adminTable = root.table("admin", "admin")
    admin = _readAdmin(adminTable) if adminTable else None
    if admin is not None and admin.listen is not None:
        claim(admin.listen, "admin.listen")
    sessionsTable = root.table("sessions", "sessions")
    sessions = _readSessions(sessionsTable) if sessionsTable else SessionsConfig()
    clusterTable = root.table("cluster", "cluster")
    cluster = _readCluster(clusterTable) if clusterTable else ClusterConfig()
    dnsTable = root.table("dns", "dns")
    dns = _readDNS(dnsTable) if dnsTable else None
    if dns is not None and cluster.mode == "standalone":
        dnsTable.error("name", '[dns] answers with the cluster\'s nodes: set [cluster] mode')
    demoTable = root.table("demo", "demo")
    demo = _readDemo(demoTable) if demoTable else ()
    for i, server in enumerate(demo):
        if server.listen is not None:
            claim(server.listen, f"demo.servers[{i}].listen")
    root.finish()
    return Config(path, process, log, MappingProxyType(pools), tuple(services), demo, admin,
                  sessions, cluster, dns)


def parse(
    text: str,
    source: str = "<config>",
    algorithms: Optional[Algorithms] = None,
    healthKinds: Optional[Collection[str]] = None,
) -> Config:
    """
    Validate TOML text.

    @param algorithms: the installed scheduler factories by name; when
        given, C{algorithm} names and C{options} are checked against them.
    @raise ConfigError: with every problem found.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [_syntaxProblem(str(e), text)])
    ctx = _Context(keyLines(text))
    ctx.healthKinds = healthKinds
    ctx.baseDir = os.path.dirname(os.path.abspath(source)) if not source.startswith("<") else os.getcwd()
    config = _readConfig(_Table(ctx, "", data, ""), source, algorithms)
    if ctx.problems:
        # In file order, as an operator reads the file; problems without a
        # line (none expected) last.  sorted() is stable: one key's
        # problems keep the order they were found in.
        raise ConfigError(
            source, sorted(ctx.problems, key=lambda p: p.line if p.line else len(text) + 1)
        )
    return config


_TOML_WHERE = re.compile(r" \(at line (\d+), column (\d+)\)$| \(at end of document\)$")


def _syntaxProblem(message: str, text: str) -> Problem:
    """
    tomllib's message ends with C{(at line L, column C)}; the line goes
    where every other problem has it, the column stays in the message.
    """
    m = _TOML_WHERE.search(message)
    if m is None:
        return Problem("", f"not valid TOML: {message}")
    if m.group(1) is None:
        return Problem("", f"not valid TOML: {message[: m.start()]} (at the end of the file)",
                       text.count("\n") + (0 if text.endswith("\n") else 1) or 1)
    return Problem("", f"not valid TOML: {message[: m.start()]} (column {m.group(2)})",
                   int(m.group(1)))


def load(
    path: str,
    algorithms: Optional[Algorithms] = None,
    healthKinds: Optional[Collection[str]] = None,
) -> Config:
    """
    Read and validate a config file.

    @raise ConfigError: the file cannot be read or does not validate.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, [Problem("", f"cannot read the config file: {e}")])
    return parse(text, path, algorithms, healthKinds)
