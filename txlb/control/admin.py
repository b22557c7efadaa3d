# -*- test-case-name: tests.test_admin -*-
"""
The admin API (SPEC section 3): JSON over HTTP, on loopback unless the
operator says otherwise, with a bearer token required when one is set.

It only reads and calls L{txlb.balance.pool.Pool}: the pool owns every state
change and logs it, so what the API does and what traffic sees never
disagree.  Changes made here live until the process ends or the config is
reloaded: write them in the config file to keep them.

The same listener serves what L{txlb.observe.metrics.Metrics} counts
(C{/metrics}, C{/api/stats}, C{/api/decisions}) and the status page at
C{/}: one self-contained HTML file (C{txlb/control/status.html}) that reads the
JSON API from the browser.  The page itself holds no data, so it is served
without the token; everything it fetches needs it.
"""

from __future__ import annotations

import hmac
import json
import re
from importlib.resources import files
from typing import Any, Callable, Mapping, NamedTuple, Optional

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from txlb.balance.pool import Pool, Server
from txlb.net.endpoints import EndpointError, serverAddress

from txlb.observe.metrics import CONTENT_TYPE_LATEST, OPENMETRICS_CONTENT_TYPE, Metrics, wantsOpenMetrics

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TCP_ADDRESS = re.compile(r"tcp:host=(?P<host>(?:[^:\\]|\\.)+):port=(?P<port>\d+)")


#: Decisions C{/api/decisions} returns without C{?limit=}.
DEFAULT_DECISIONS = 50


class Raw(NamedTuple):
    """A non-JSON answer: the status page, the Prometheus exposition."""

    contentType: bytes
    data: bytes


_statusPage: Optional[bytes] = None


def statusPage() -> bytes:
    """The status page's HTML, read once from the package."""
    global _statusPage
    if _statusPage is None:
        _statusPage = files("txlb.control").joinpath("status.html").read_bytes()
    return _statusPage


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def displayAddress(address: str) -> str:
    """C{tcp:host=H:port=P} as the C{H:P} an operator wrote."""
    m = _TCP_ADDRESS.fullmatch(address)
    if m is None:
        return address
    host = m.group("host").replace("\\:", ":")
    return f"[{host}]:{m.group('port')}" if ":" in host else f"{host}:{m.group('port')}"


def serverJson(pool: Pool, server: Server) -> dict[str, Any]:
    return {
        "name": server.name,
        "address": displayAddress(server.address),
        "weight": server.configuredWeight,
        "effectiveWeight": server.weight,
        "state": server.state.value,
        "activeConnections": server.active,
        "totalRequests": server.total,
        "averageResponseTimeMs": round(server.responseTime * 1000, 3),
        "bandwidthBps": round(pool.bandwidth(server), 1),
    }


def poolJson(pool: Pool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "algorithm": pool.algorithm,
        "servers": [serverJson(pool, s) for s in pool],
    }


class AdminResource(Resource):
    """
    The whole API as one leaf: routes are few and fixed, so a small
    dispatcher reads better than a tree of resources.

    @param token: the bearer token, or L{None} when none is configured.
    """

    isLeaf = True

    #: This node's L{txlb.control.cluster.Cluster} (or L{txlb.control.cluster.Standalone}):
    #: answers C{GET /api/cluster} and shares admin changes with the other
    #: nodes of an active-active cluster.
    cluster = None

    def __init__(self, pools: Mapping[str, Pool], token: Optional[str] = None, metrics: Optional[Metrics] = None,
                 reload: Optional[Callable[[], Deferred]] = None, workers=None) -> None:
        super().__init__()
        self.pools = pools
        self.token = token
        self.metrics = metrics
        #: Reloads the config file (what C{SIGHUP} does): a L{Deferred}
        #: firing with a L{txlb.service.Reloaded}.
        self.reload = reload
        #: A master's worker processes (L{txlb.service.workers.Workers}), or
        #: L{None}: they serve the traffic, so the figures are theirs,
        #: added up, and changes to servers are sent to them.
        self.workers = workers

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        method = request.method.decode("ascii")
        try:
            segments = [s for s in request.path.decode("utf-8").split("/") if s]
        except UnicodeDecodeError:
            return self._answer(request, 400, {"error": "the path is not UTF-8"})
        if self.workers is not None and segments[:2] in (["api", "pools"], ["api", "stats"]):
            # The servers' live figures are the workers': fetch them first
            # (after the token is checked: an anonymous caller costs nothing).
            try:
                self._authorize(request)
            except ApiError as e:
                return self._answer(request, e.status, {"error": e.message})
            gone: list = []
            request.notifyFinish().addErrback(gone.append)
            d = self.workers.refresh()
            d.addBoth(lambda _: None if gone else self._respond(request, method, segments, late=True))
            return NOT_DONE_YET
        return self._respond(request, method, segments)

    def _respond(self, request: Request, method: str, segments: list[str], late: bool = False):
        try:
            status, body = self._dispatch(request, method, segments)
        except ApiError as e:
            status, body = e.status, {"error": e.message}
        if self.workers is not None and method not in ("GET", "HEAD") and status < 400:
            if isinstance(body, Deferred):
                self.workers.changed()
            else:
                # Answer once every worker has the change.
                answer = body
                body = self.workers.pushNow().addCallback(lambda _: answer)
        if isinstance(body, Deferred):
            gone: list = []
            request.notifyFinish().addErrback(gone.append)
            body.addCallback(self._later, request, status, gone)
            return NOT_DONE_YET
        data = self._answer(request, status, body)
        if late:
            request.write(data)
            request.finish()
            return None
        return data

    @staticmethod
    def _answer(request: Request, status: int, body) -> bytes:
        request.setResponseCode(status)
        if isinstance(body, Raw):
            request.setHeader(b"content-type", body.contentType)
            return body.data
        return json.dumps(body).encode() + b"\n"

    def _later(self, result, request: Request, status: int, gone: list) -> None:
        """An answer that had to wait: a reload, or the workers' figures."""
        if hasattr(result, "errors"):
            self._reloaded(result, request, gone)
            return
        if not gone:
            request.write(self._answer(request, status, result))
            request.finish()

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.getHeader(b"authorization") or b""
        scheme, _, value = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token.encode()):
            request.setHeader(b"www-authenticate", b'Bearer realm="txlb"')
            raise ApiError(401, "a valid bearer token is required (Authorization: Bearer ...)")

    def _dispatch(self, request: Request, method: str, segments: list[str]):
        if segments == ["health"] and method == "GET":
            return 200, {"status": "healthy"}
        if not segments or segments == ["index.html"]:
            self._allow(method, "GET", "HEAD")
            request.setHeader(b"x-content-type-options", b"nosniff")
            request.setHeader(
                b"content-security-policy",
                b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                b"connect-src 'self'; img-src data:; frame-ancestors 'none'",
            )
            return 200, Raw(b"text/html; charset=utf-8", statusPage())
        self._authorize(request)
        if segments in (["metrics"], ["api", "stats"], ["api", "decisions"]):
            return self._observability(request, method, segments[-1])
        if segments == ["api", "reload"]:
            self._allow(method, "POST")
            if self.reload is None:
                raise ApiError(404, "/api/reload: this admin API has no config file to reload")
            return 200, self.reload()
        if segments == ["api", "cache"]:
            return self._purge(request, method)
        if segments == ["api", "cluster"]:
            self._allow(method, "GET")
            if self.cluster is None:
                raise ApiError(404, "/api/cluster: this admin API has no cluster")
            return 200, self.cluster.status()
        if segments[:2] != ["api", "pools"]:
            raise ApiError(404, f"no such resource: /{'/'.join(segments)}")
        rest = segments[2:]
        if not rest:
            self._allow(method, "GET")
            return 200, [poolJson(p) for p in self.pools.values()]
        pool = self._pool(rest[0])
        if len(rest) == 1:
            self._allow(method, "GET")
            return 200, poolJson(pool)
        if rest[1] != "servers":
            raise ApiError(404, f"no such resource: /{'/'.join(segments)}")
        if len(rest) == 2:
            self._allow(method, "GET", "POST")
            if method == "GET":
                return 200, [serverJson(pool, s) for s in pool]
            return self._addServer(pool, self._body(request))
        server = self._server(pool, rest[2])
        if len(rest) == 3:
            self._allow(method, "GET", "PATCH", "DELETE")
            if method == "GET":
                return 200, serverJson(pool, server)
            if method == "PATCH":
                return self._patch(pool, server, self._body(request))
            pool.delete(server)
            self._share("delete", pool, server)
            return 202, serverJson(pool, server)
        if len(rest) == 4 and rest[3] in ("drain", "enable"):
            self._allow(method, "POST")
            if rest[3] == "drain":
                pool.drain(server)
            else:
                if server.removing:
                    raise ApiError(409, f"server {server.name} is being removed")
                pool.enable(server)
            self._share(rest[3], pool, server)
            return 200, serverJson(pool, server)
        raise ApiError(404, f"no such resource: /{'/'.join(segments)}")

    def _share(self, op: str, pool: Pool, server: Server, **details: Any) -> None:
        """An admin change made here, for the other nodes of the cluster."""
        if self.cluster is not None:
            self.cluster.publishChange({"op": op, "pool": pool.name, "server": server.name, **details})

    def _observability(self, request: Request, method: str, what: str):
        self._allow(method, "GET")
        metrics = self.metrics
        if metrics is None:
            raise ApiError(404, f"/{'api/' if what != 'metrics' else ''}{what}: no metrics are kept here")
        workers = self.workers
        if what == "metrics":
            openmetrics = wantsOpenMetrics((request.getHeader("accept") or ""))
            contentType = (OPENMETRICS_CONTENT_TYPE if openmetrics else CONTENT_TYPE_LATEST).encode("ascii")
            if workers is not None:
                return 200, workers.exposition(openmetrics).addCallback(lambda data: Raw(contentType, data))
            return 200, Raw(contentType, metrics.exposition(openmetrics))
        if what == "stats":
            history = request.args.get(b"history", [b"1"])[-1] not in (b"0", b"false")
            if workers is not None:
                return 200, workers.stats(history)
            return 200, metrics.stats(history=history)
        raw = request.args.get(b"limit", [b"%d" % DEFAULT_DECISIONS])[-1]
        try:
            limit = int(raw)
        except ValueError:
            limit = -1
        if limit < 0:
            raise ApiError(400, f"limit must be a whole number (at most {metrics.decisions.size} are kept)")
        if workers is not None:
            return 200, workers.decisions(limit)
        return 200, metrics.decisions.last(limit)

    def _purge(self, request: Request, method: str):
        """C{DELETE /api/cache?service=S&prefix=P}: forget stored responses."""
        self._allow(method, "DELETE")
        caches = self.metrics.caches() if self.metrics is not None else {}
        service = request.args.get(b"service", [b""])[-1].decode("utf-8")
        prefix = request.args.get(b"prefix", [b""])[-1]
        if prefix and prefix[:1] != b"/":
            raise ApiError(400, "prefix must be a path starting with '/'")
        if service:
            if service not in caches:
                raise ApiError(404, f"no service named {service!r} caches responses")
            caches = {service: caches[service]}
        if self.workers is not None:
            # The master's caches are empty: the workers' hold the responses.
            d = self.workers.purge(service, prefix.decode("utf-8", "replace"))
            return 200, d.addCallback(lambda purged: {"purged": sum(purged.values()), "services": purged})
        purged = {name: cache.purge(prefix or None) for name, cache in caches.items()}
        return 200, {"purged": sum(purged.values()), "services": purged}

    @staticmethod
    def _reloaded(result, request: Request, gone: list) -> None:
        """C{POST /api/reload} answered: 200 and what changed, or 400 and why not."""
        if result.errors:
            status = 400
            body = {"error": "the config file was rejected; the running config stays",
                    "path": result.path, "errors": list(result.errors)}
        else:
            status, body = 200, {"path": result.path, "errors": [], "changes": list(result.changes)}
        if not gone:
            request.setResponseCode(status)
            request.write(json.dumps(body).encode() + b"\n")
            request.finish()

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise ApiError(405, f"method {method} not allowed here; use {' or '.join(allowed)}")

    def _pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise ApiError(404, f"no pool named {name!r}")

    @staticmethod
    def _server(pool: Pool, name: str) -> Server:
        try:
            return pool.server(name)
        except KeyError:
            raise ApiError(404, f"pool {pool.name} has no server named {name!r}")

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError as e:
            raise ApiError(400, f"the body is not JSON: {e}")
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    @staticmethod
    def _weight(body: dict[str, Any], default: Optional[int]) -> int:
        weight = body.get("weight", default)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
            raise ApiError(400, "weight must be an integer from 0 to 1000")
        return weight

    def _addServer(self, pool: Pool, body: dict[str, Any]):
        unknown = set(body) - {"name", "address", "weight"}
        if unknown:
            raise ApiError(400, f"unknown fields: {', '.join(sorted(unknown))}")
        name, address = body.get("name"), body.get("address")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ApiError(400, "name must be letters, digits, '_', '.' or '-'")
        if not isinstance(address, str):
            raise ApiError(400, "address is required: host:port or an endpoint string")
        try:
            address = serverAddress(address)
        except EndpointError as e:
            raise ApiError(400, f"address: {e}")
        weight = self._weight(body, 1)
        try:
            pool.server(name)
        except KeyError:
            pass
        else:
            raise ApiError(409, f"pool {pool.name} already has a server named {name!r}")
        server = Server(name, address, weight)
        pool.add(server)
        self._share("add", pool, server, address=address, weight=weight)
        return 201, serverJson(pool, server)

    def _patch(self, pool: Pool, server: Server, body: dict[str, Any]):
        unknown = set(body) - {"weight"}
        if unknown or "weight" not in body:
            raise ApiError(400, 'only {"weight": N} can be changed')
        pool.setWeight(server, self._weight(body, None))
        self._share("weight", pool, server, weight=server.configuredWeight)
        return 200, serverJson(pool, server)


def adminSite(pools: Mapping[str, Pool], token: Optional[str] = None, metrics: Optional[Metrics] = None,
              reload: Optional[Callable[[], Deferred]] = None, workers=None) -> Site:
    site = Site(AdminResource(pools, token, metrics, reload, workers))
    site.noisy = False
    site.log = lambda request: None
    site.displayTracebacks = False
    return site


def readToken(path: str) -> str:
    """
    The token in C{path} (first line, stripped).

    @raise ValueError: the file is empty or unreadable.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as e:
        raise ValueError(f"cannot read the admin token file {path}: {e.strerror}")
    if not token:
        raise ValueError(f"the admin token file {path} is empty")
    return token
