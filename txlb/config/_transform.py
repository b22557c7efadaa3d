# -*- test-case-name: tests.test_config_transform -*-
"""
Reading what an HTTP service and its routes say about the shape of
requests and responses: C{headers} (set, add, remove), C{redirect} and
C{compress}.  Every value is checked here, with its key path, so that
what the proxy compiles from the records cannot fail and cannot write a
header block that parses two ways.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from txlb.config._rules import CompressConfig, HeaderOps, HeaderRules, RedirectConfig
from txlb.config._table import _describe, _integer, _Invalid, _oneOf, _Table, parseSize
from txlb.http import compress as _compress
from txlb.http.compress import DEFAULT_TYPES
from txlb.policy.headers import RuleError, Template, checkName
from txlb.policy.redirect import DEFAULT_STATUS, STATUSES


def readHeaderRules(t: Optional[_Table]) -> Optional[HeaderRules]:
    """A C{headers = { request = {...}, response = {...} }} table."""
    if t is None:
        return None
    rules = HeaderRules(
        request=_readOps(t.table("request", "header_ops"), "request"),
        response=_readOps(t.table("response", "header_ops"), "response"),
    )
    t.finish()
    return rules


def _readOps(t: Optional[_Table], side: str) -> Optional[HeaderOps]:
    if t is None:
        return None
    ops = HeaderOps(set=_fields(t, "set", side), add=_fields(t, "add", side), remove=_removed(t, side))
    t.finish()
    return ops


def _fields(t: _Table, key: str, side: str) -> tuple[tuple[str, str], ...]:
    """C{set} or C{add}: header names to values, each checked at its own key path."""
    t.seen.add(key)
    value = t.data.get(key)
    if value is None:
        return ()
    if not isinstance(value, dict):
        t.error(key, f'must be a table of header name to value, like {{ "X-Env" = "prod" }}, not {_describe(value)}')
        return ()
    out = []
    names: dict[bytes, str] = {}
    for name, v in value.items():
        where = f"{key}.{name}"
        try:
            lower = checkName(name, side, key)
            if not isinstance(v, str):
                raise RuleError(f"must be a string, not {_describe(v)}")
            Template(v)
        except RuleError as e:
            t.error(where, str(e))
            continue
        if key == "set" and lower in names:
            t.error(where, f"{names[lower]!r} is set already (header names are not case-sensitive)")
            continue
        names[lower] = name
        out.append((name, v))
    return tuple(out)


def _removed(t: _Table, side: str) -> tuple[str, ...]:
    t.seen.add("remove")
    value = t.data.get("remove")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        t.error("remove", f'must be an array of header names, like ["Server"], not {_describe(value)}')
        return ()
    out = []
    for i, name in enumerate(items):
        where = "remove" if isinstance(value, str) else f"remove[{i}]"
        try:
            if not isinstance(name, str):
                raise RuleError(f"must be a header name, not {_describe(name)}")
            checkName(name, side, "remove")
        except RuleError as e:
            t.error(where, str(e))
            continue
        out.append(name)
    return tuple(out)


def routeHeaders(r: _Table, matches: Callable[[Any], Mapping[str, str]]
                 ) -> tuple[Mapping[str, str], Optional[HeaderRules]]:
    """
    A route's C{headers}: its entries with string values are conditions
    the request must meet (read by C{matches}), its C{request} and
    C{response} tables are header rules, as a service's C{headers} are.
    """
    r.seen.add("headers")
    value = r.data.get("headers")
    if value is None:
        return MappingProxyType({}), None
    if not isinstance(value, dict):
        r.error("headers", 'must be a table: header name to value to match, and request or response rules')
        return MappingProxyType({}), None
    rules = {k: v for k, v in value.items() if k in ("request", "response") and isinstance(v, dict)}
    conditions = {k: v for k, v in value.items() if k not in rules}
    matched: Mapping[str, str] = MappingProxyType({})
    if conditions:
        try:
            matched = matches(conditions)
        except _Invalid as e:
            r.error("headers", str(e))
    if not rules:
        return matched, None
    return matched, readHeaderRules(_Table(r.ctx, r.keyPath("headers"), rules, "route_headers"))


_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"|\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(r":[0-9]{1,5}")
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


def _redirectHost(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_describe(value)}")
    host, port = value, ""
    colon = value.rfind(":")
    if colon > value.rfind("]"):
        host, port = value[:colon], value[colon:]
    if not _HOST.fullmatch(host) or (port and not _PORT.fullmatch(port)):
        raise _Invalid(f"{value!r} is not a host name, with an optional :port (like \"new.example.com\")")
    return value


def _redirectPath(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_describe(value)}")
    if not _PATH.fullmatch(value):
        raise _Invalid(f"{value!r} is not a path: it starts with '/', and has no spaces, '?' or '#'")
    return value


def _status(value: Any) -> int:
    if value not in STATUSES or isinstance(value, bool):
        raise _Invalid(f"must be one of {', '.join(map(str, STATUSES))}, not {value!r}")
    return value


def readRedirect(t: Optional[_Table], routePrefix: Optional[str]) -> Optional[RedirectConfig]:
    """
    A route's C{redirect}.  Its C{path_prefix} takes the place of the
    route's own, so the two must agree on a closing C{/}.
    """
    if t is None:
        return None
    redirect = RedirectConfig(
        status=t.get("status", _status, DEFAULT_STATUS),
        scheme=t.get("scheme", _oneOf("http", "https"), None),
        host=t.get("host", _redirectHost, None),
        path_prefix=t.get("path_prefix", _redirectPath, None),
    )
    prefix = redirect.path_prefix
    if not any(k in t.data for k in ("scheme", "host", "path_prefix")):
        t.ctx.error(t.path, "says nothing to change: give it a scheme, a host or a path_prefix")
    elif prefix is not None and routePrefix is not None and prefix.endswith("/") != routePrefix.endswith("/"):
        t.error("path_prefix", f"replaces the route's path_prefix {routePrefix!r}: end both with '/', "
                               "or neither, so that the rest of the path joins as it did")
    elif prefix is not None and routePrefix is None and prefix.endswith("/"):
        t.error("path_prefix", "goes before the whole path, which starts with '/': leave out the closing '/'")
    t.finish()
    return redirect


_MEDIA = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/(?:\*|[!#$%&'*+.^_`|~0-9A-Za-z-]+)")


def _mediaTypes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid('must be a non-empty array of media types, like ["text/*", "application/json"]')
    problems = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _MEDIA.fullmatch(item):
            problems.append((i, f"{item!r} is not a media type (type/subtype, or type/*)"))
    if problems:
        raise _Invalid(items=problems)
    return tuple(item.lower() for item in value)


def readCompress(t: Optional[_Table]) -> Optional[CompressConfig]:
    """A service's or route's C{compress} table."""
    if t is None:
        return None
    compress = CompressConfig(
        types=t.get("types", _mediaTypes, DEFAULT_TYPES),
        min_size=t.get("min_size", parseSize, 1024),
        level=t.get("level", _integer(1, 9), 6),
    )
    t.finish()
    return compress


def _describeOps(side: str, ops: Optional[HeaderOps]) -> list[str]:
    if ops is None:
        return []
    parts = []
    if ops.remove:
        parts.append("remove " + ", ".join(ops.remove))
    if ops.set:
        parts.append("set " + ", ".join(n for n, _ in ops.set))
    if ops.add:
        parts.append("add " + ", ".join(n for n, _ in ops.add))
    return [f"{side} headers: {'; '.join(parts)}"] if parts else []


def _describeRules(rules: Optional[HeaderRules]) -> list[str]:
    if rules is None:
        return []
    return _describeOps("request", rules.request) + _describeOps("response", rules.response)


def _describeCompress(compress: Optional[CompressConfig]) -> list[str]:
    if compress is None:
        return []
    return [f"compress: {_compress.CODINGS} level {compress.level}, {', '.join(compress.types)}, "
            f"from {compress.min_size} bytes"]


def describeTransforms(service) -> list[str]:
    """
    Lines for C{--check}'s summary: a service's header rules and
    compression, then each route's that has its own, and its redirects.
    """
    lines = _describeRules(service.header_rules) + _describeCompress(service.compress)
    for i, route in enumerate(service.routes):
        own = _describeRules(route.header_rules) + _describeCompress(route.compress)
        r = route.redirect
        if r is not None:
            changes = [f"{key} {value}" for key, value in
                       (("scheme", r.scheme), ("host", r.host), ("path_prefix", r.path_prefix)) if value]
            own.insert(0, f"redirect {r.status}: {', '.join(changes)} (the rest of the URL kept)")
        lines += [f"routes[{i}] {line}" for line in own]
    return lines
