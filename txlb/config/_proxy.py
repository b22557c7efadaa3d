# -*- test-case-name: tests.test_proxyproto -*-
"""
Reading a service's PROXY protocol keys: C{accept_proxy} (the header in,
TCP and HTTP services) and C{proxy_protocol} (the header out, TCP
services).  See L{txlb.net.proxyproto}.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from txlb.config._model import AcceptProxyConfig
from txlb.config._table import _describe, _Invalid, _oneOf, _positiveDuration, _string, _Table

_DEFAULT = AcceptProxyConfig()


def _network(value: Any) -> str:
    text = _string(value)
    try:
        ipaddress.ip_network(text)
    except ValueError:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _Invalid(f"{text!r} is not an IP network like 10.0.0.0/8 or an address like 10.0.0.5")
        raise _Invalid(f"{text!r} has host bits set: write {network} (or {text.partition('/')[0]} for one address)")
    return text


def _networks(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f'must be an array of networks like ["10.0.0.0/8"], not {_describe(value)}')
    if not value:
        raise _Invalid("is empty, so no connection could come in: list the balancers' networks, "
                       "or write accept_proxy = true to take a header from any source")
    out, items = [], []
    for i, item in enumerate(value):
        try:
            out.append(_network(item))
        except _Invalid as e:
            items.append((i, str(e)))
    if items:
        raise _Invalid(items=items)
    return tuple(out)


def readProxy(t: _Table, protocol: str) -> dict[str, Any]:
    """
    The C{accept_proxy} and C{proxy_protocol} fields of a service table:
    C{accept_proxy = true} (any source), C{false}, or a table
    C{{ from = [networks], timeout = "5s" }}.
    """
    accept = None
    if "accept_proxy" in t.data:
        value = t.data["accept_proxy"]
        if protocol == "udp":
            t.seen.add("accept_proxy")
            t.error("accept_proxy", "does not apply to UDP services (a PROXY header starts a stream)")
        elif isinstance(value, bool):
            t.seen.add("accept_proxy")
            accept = _DEFAULT if value else None
        elif isinstance(value, dict):
            table = t.table("accept_proxy", "accept_proxy")
            accept = AcceptProxyConfig(
                trusted=table.get("from", _networks, ()),
                timeout=table.get("timeout", _positiveDuration, _DEFAULT.timeout),
            )
            table.finish()
        else:
            t.seen.add("accept_proxy")
            t.error("accept_proxy", f'must be true, false or a table {{ from = ["10.0.0.0/8"] }}, '
                                    f"not {_describe(value)}")
    out = None
    if "proxy_protocol" in t.data:
        if protocol == "tcp":
            out = t.get("proxy_protocol", _oneOf("v1", "v2"), None)
        else:
            t.seen.add("proxy_protocol")
            t.error("proxy_protocol", (
                "applies to TCP services only: an HTTP service's backend connections carry many "
                "clients' requests, each named in X-Forwarded-For"
            ) if protocol == "http" else "does not apply to UDP services")
    return dict(accept_proxy=accept, proxy_protocol=out)


def describeProxy(service) -> list[str]:
    """The C{--check} summary's lines for a service's PROXY protocol keys."""
    lines = []
    accept = service.accept_proxy
    if accept is not None:
        sources = ", ".join(accept.trusted) if accept.trusted else "any source"
        lines.append(f"PROXY header (v1 or v2) read first from {sources}, within {accept.timeout:g}s")
    if service.proxy_protocol is not None:
        lines.append(f"PROXY {service.proxy_protocol} header sent first to each backend connection")
    return lines
