# -*- test-case-name: tests.test_endpoints -*-
"""
Addresses as Twisted endpoint strings, checked with Twisted's own parsers.

An operator writes every listen and connect address as an endpoint string
(C{tcp:8080:interface=127.0.0.1}, C{tcp:host=10.0.0.5:port=9001},
C{unix:/run/app.sock}); a server address may also be the familiar
C{host:port}, which is turned into the equivalent C{tcp:} string here so
that the rest of txlb only ever sees endpoint strings.
"""

from __future__ import annotations

import re
import socket
from typing import Optional

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer


class EndpointError(ValueError):
    """An address that Twisted cannot parse; the message says why."""


class _NoReactor:
    """
    Stands in for the reactor while an endpoint string is only parsed: the
    parsers store it and do no I/O.
    """


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)")
_BARE_V6 = re.compile(r"[0-9A-Fa-f:.]+")  # an IPv6 address and port, unbracketed
_ENDPOINT_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9+_-]*:")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def serverAddress(text: str) -> str:
    """
    Normalise a server's address: C{host:port} or C{[v6]:port} become a
    C{tcp:} endpoint string; an endpoint string is checked and kept.

    @raise EndpointError: neither form parses.
    """
    stripped = text.strip()
    m = _HOST_PORT.fullmatch(stripped)
    if m is not None and not _isEndpointType(stripped):
        port = int(m.group("port"))
        if not 0 < port < 65536:
            raise EndpointError(f"port {port} is out of range (1-65535) in {text!r}")
        host = m.group("v6") or m.group("host")
        return f"tcp:host={_escape(host)}:port={port}"
    if _BARE_V6.fullmatch(stripped) and stripped.count(":") >= 3:
        raise EndpointError(
            f"{text!r} is not a valid address; write an IPv6 address in brackets, like [::1]:9001"
        )
    if ":" not in stripped:
        raise EndpointError(f"{text!r} is not a valid address (no port); expected {_CLIENT_EXPECTED}")
    checkClient(stripped)
    return stripped


def _isEndpointType(text: str) -> bool:
    m = _ENDPOINT_TYPE.match(text)
    return m is not None and m.group()[:-1].lower() in _CLIENT_TYPES


#: Client endpoint types a C{host:port} address could be confused with: a
#: C{name:port} whose name is one of these is read as an endpoint string.
_CLIENT_EXPECTED = "host:port or a client endpoint like tcp:host=H:port=P"

_CLIENT_TYPES = frozenset({"tcp", "ssl", "unix", "tls"})


def checkClient(text: str) -> IStreamClientEndpoint:
    """
    @raise EndpointError: C{text} is not a client endpoint string.
    """
    expected = _CLIENT_EXPECTED
    try:
        endpoint = clientFromString(_NoReactor(), text)
    except Exception as e:
        raise EndpointError(_explain(text, e, expected))
    _checkPort(text, 1, expected)
    return endpoint


def checkServer(text: str) -> IStreamServerEndpoint:
    """
    @raise EndpointError: C{text} is not a server (listening) endpoint string.
    """
    expected = "a listening endpoint like tcp:8080:interface=127.0.0.1"
    prefix, _, inner = text.strip().partition(":")
    if prefix.lower() == "haproxy":
        # Twisted's PROXY reader would build the protocol with the
        # balancer's address, and trust any source: refused, not half-supported.
        raise EndpointError(
            f"{text!r}: the haproxy: prefix is not supported; listen on {inner!r} and set the "
            "service's accept_proxy = true (or accept_proxy = { from = [...] }) to read PROXY headers"
        )
    if text.strip().isdigit():
        raise EndpointError(f"{text!r} is not a valid address; write tcp:{text.strip()} for TCP port {text.strip()}")
    try:
        endpoint = serverFromString(_NoReactor(), text)
    except (IndexError, KeyError) as e:
        if text.strip().lower().startswith("systemd:"):
            raise EndpointError(_explainSystemd(text, e))
        raise EndpointError(_explain(text, e, expected))
    except Exception as e:
        raise EndpointError(_explain(text, e, expected))
    _checkPort(text, 0, expected)
    return endpoint


def _explainSystemd(text: str, error: Exception) -> str:
    """
    A C{systemd:} endpoint names a socket systemd passed this process
    (C{LISTEN_FDS} and C{LISTEN_FDNAMES}, for C{LISTEN_PID}); Twisted's
    parser says only "list index out of range" when there is none.
    """
    if isinstance(error, KeyError):
        which = f"no socket named {error.args[0]!r}"
    else:
        which = "no socket at that index"
    return (f"{text!r} takes a socket that systemd opened, but systemd passed {which} to this process "
            f"(outside a unit it passes none: LISTEN_FDS is set for a service started through a .socket "
            f"unit); run txlb from its socket-activated unit, or listen on an address of its own like tcp:8080")


def _checkPort(text: str, low: int, expected: str) -> None:
    """
    Twisted's parsers take any integer as a port; the mistake would only
    show when txlb listens or connects, long after the config check.
    """
    try:
        port = _portOf(text, client=low > 0)
    except EndpointError:
        return
    if isinstance(port, int) and not low <= port <= 65535:
        raise EndpointError(
            f"{text!r} is not a valid address (port {port} is out of range {low}-65535); "
            f"expected {expected}"
        )


_TYPE_ERRORS = (
    (re.compile(r"missing \d+ required positional arguments?: (.*)"), "missing {}"),
    (re.compile(r"got an unexpected keyword argument (.*)"), "unknown parameter {}"),
    (re.compile(r"got multiple values for argument (.*)"), "{} given twice"),
)


def _explain(text: str, error: Exception, expected: str) -> str:
    """
    Twisted's parsers complain in Python's words (a C{TypeError} from the
    endpoint's constructor); say it in an operator's.
    """
    detail = str(error.args[0]) if error.args else type(error).__name__
    m = re.fullmatch(r"invalid literal for int\(\) with base 10: (.*)", detail)
    if m is not None:
        detail = f"{m.group(1)} is not a number"
    m = re.fullmatch(r"Unknown endpoint type: (.*)", detail)
    if m is not None:
        detail = f"unknown endpoint type {m.group(1)}"
    if isinstance(error, TypeError):
        for pattern, template in _TYPE_ERRORS:
            m = pattern.search(detail)
            if m is not None:
                detail = template.format(m.group(1).replace(" and ", ", "))
                break
        if "::" in text.replace("\\:", ""):
            detail += r"; write the colons of an IPv6 address as \:, like interface=\:\:1"
    return f"{text!r} is not a valid address ({detail}); expected {expected}"


_WILDCARDS = frozenset({"", "0.0.0.0", "::"})

_UDP_EXPECTED = "a UDP listening address like udp:5353:interface=127.0.0.1"


def _splitEndpoint(text: str) -> list[str]:
    """
    The fields of an endpoint string, as Twisted writes them: separated by
    C{:}, with C{\\} escaping the next character (C{interface=\\:\\:1}).
    Each field keeps its escapes, so that a C{=} in a value stays a value.
    """
    fields, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise EndpointError(f"{text!r} ends with a lone \\; expected {_UDP_EXPECTED}")
    fields.append("".join(current))
    return fields


#: A C{key=value} field: the key ends at the first C{=} not escaped.
_KEY_VALUE = re.compile(r"((?:[^=\\]|\\.)*)=(.*)")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _parts(text: str) -> tuple[str, list[str], dict[str, str]]:
    """
    An endpoint string as its type, positional and keyword values,
    unescaped: how Twisted's parsers read it, for the few values txlb needs
    back (a port, an interface) once Twisted has accepted the string.
    Reading them off the endpoint object would mean its private attributes.
    """
    fields = _splitEndpoint(text.strip())
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for field in fields[1:]:
        m = _KEY_VALUE.match(field)
        if m is not None:
            kwargs[_unescape(m.group(1))] = _unescape(m.group(2))
        else:
            args.append(_unescape(field))
    return fields[0].lower(), args, kwargs


def _named(args: list[str], kwargs: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    values = dict(zip(names, args))
    values.update(kwargs)
    return values


def listenParts(text: str) -> Optional[tuple[str, object, str, int]]:
    """
    What a listening endpoint string binds, as Twisted's C{tcp}, C{tcp6}
    and C{unix} parsers read it: C{("tcp", port, interface, backlog)} or
    C{("unix", path, mode, backlog)}; L{None} for other types or a string
    they would refuse.
    """
    try:
        kind, args, kwargs = _parts(text)
        if kind in ("tcp", "tcp6"):
            values = _named(args, kwargs, ("port", "interface", "backlog"))
            interface = values.get("interface", "::" if kind == "tcp6" else "")
            return ("tcp", int(values["port"]), interface, int(values.get("backlog", 50)))
        if kind == "unix":
            values = _named(args, kwargs, ("address", "mode", "backlog"))
            return ("unix", values["address"], int(values.get("mode", "666"), 8), int(values.get("backlog", 50)))
    except (KeyError, ValueError, EndpointError):
        pass
    return None


def connectParts(text: str) -> Optional[tuple[str, int, int, Optional[str]]]:
    """
    C{(host, port, timeout, bindAddress)} of a C{tcp:} client endpoint
    string, as Twisted's parser reads it (C{tcp:H:P} or
    C{tcp:host=H:port=P}, a timeout of 30 seconds unless given); L{None}
    for other types or a string it would refuse.
    """
    try:
        kind, args, kwargs = _parts(text)
        if kind != "tcp":
            return None
        if len(args) == 1 and "host" in kwargs:
            args = [kwargs["host"], *args]
        values = _named(args, kwargs, ("host", "port"))
        return (values["host"], int(values["port"]), int(values.get("timeout", 30)),
                values.get("bindAddress") or None)
    except (KeyError, ValueError, EndpointError):
        return None


def _portOf(text: str, client: bool) -> Optional[int]:
    """The port an endpoint string names (C{tcp}, C{tcp6}, C{ssl}), if it names one."""
    if client:
        parts = connectParts(text) if text.strip()[:4].lower() == "tcp:" else None
        if parts is not None:
            return parts[1]
        kind, args, kwargs = _parts(text)
        if kind != "ssl":
            return None
        values = _named(args, kwargs, ("host", "port"))
    else:
        kind, args, kwargs = _parts(text)
        if kind not in ("tcp", "tcp6", "ssl"):
            return None
        values = _named(args, kwargs, ("port",))
    try:
        return int(values["port"])
    except (KeyError, ValueError):
        return None


def parseUDPListen(text: str) -> tuple[int, str]:
    """
    C{udp:PORT[:interface=ADDR]} (or C{udp:port=PORT:...}) as C{(port,
    interface)}, C{interface} empty for every IPv4 address.  Twisted has no
    UDP server endpoint, so this reads the string by the same conventions
    (fields split on C{:}, C{\\} escapes, C{key=value} or positional), and
    refuses anything else: a mistyped key must not listen somewhere else.

    @raise EndpointError: not such an address.
    """
    fields = _splitEndpoint(text.strip())
    if fields[0].lower() != "udp":
        raise EndpointError(f"{text!r} is not a UDP address; expected {_UDP_EXPECTED}")
    values: dict[str, str] = {}
    for i, field in enumerate(fields[1:]):
        m = _KEY_VALUE.match(field)
        if m is not None:
            key, value = m.group(1), m.group(2)
        else:
            key, value = ("port", field) if i == 0 else ("", field)
        key = _unescape(key)
        if key not in ("port", "interface"):
            what = f"unknown parameter {key!r}" if key else f"unexpected {field!r}"
            if "::" in text.replace("\\:", ""):
                what += r"; write the colons of an IPv6 address as \:, like interface=\:\:1"
            raise EndpointError(f"{text!r} is not a valid address ({what}); expected {_UDP_EXPECTED}")
        if key in values:
            raise EndpointError(f"{text!r} is not a valid address ({key} given twice); expected {_UDP_EXPECTED}")
        values[key] = _unescape(value)
    port = values.get("port")
    if port is None:
        raise EndpointError(f"{text!r} is not a valid address (missing port); expected {_UDP_EXPECTED}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EndpointError(
            f"{text!r} is not a valid address ({port!r} is not a port 0-65535); expected {_UDP_EXPECTED}"
        )
    interface = values.get("interface", "")
    if interface and not (isIPAddress(interface) or isIPv6Address(interface)):
        raise EndpointError(f"{text!r} is not a valid address (interface {interface!r} is not an IP address); "
                            f"expected {_UDP_EXPECTED}")
    return int(port), interface


def isUDP(text: str) -> bool:
    """Whether an endpoint string names a UDP address (C{udp:...})."""
    return text.strip()[:4].lower() == "udp:"


def udpTarget(address: str) -> tuple[str, int]:
    """
    The C{(ip, port)} a UDP service sends a server's datagrams to, from the
    server's address (C{host:port}, already a C{tcp:} endpoint string): a
    literal IP address, as a datagram socket connects without a resolver.

    @raise EndpointError: not a literal IP address and port.
    """
    try:
        endpoint = clientFromString(_NoReactor(), address)
    except Exception as e:
        raise EndpointError(_explain(address, e, _CLIENT_EXPECTED))
    host, port = (connectParts(address) or (None, None))[:2]
    if (type(endpoint) not in (TCP4ClientEndpoint, TCP6ClientEndpoint) or not isinstance(port, int)
            or not (isIPAddress(host) or (isIPv6Address(host) and "%" not in host))):
        raise EndpointError(f"{host or address!r} is not an IP address: a UDP service sends datagrams "
                            "to an IP address and port, like 10.0.0.5:53")
    if not 0 < port < 65536:
        raise EndpointError(f"{address!r}: port {port} is out of range (1-65535)")
    return host, port


def _binding(text: str) -> tuple[str, object, str]:
    """What a listening endpoint binds: C{(kind, port or path, interface)}."""
    if isUDP(text):
        try:
            port, interface = parseUDPListen(text)
        except EndpointError:
            return ("?", text, "")
        return ("udp", port, interface)
    try:
        serverFromString(_NoReactor(), text)
    except Exception:
        return ("?", text, "")
    parts = listenParts(text)
    if parts is None:
        return ("?", text, "")
    kind, where, interface, _ = parts
    return (kind, where, interface if kind == "tcp" else "")


def sameSocket(a: str, b: str) -> bool:
    """
    Whether two listening endpoint strings would bind the same socket, so
    that the second cannot listen: the same port on the same interface, or
    on any interface when either is the wildcard (C{tcp:8080} and
    C{tcp:8080:interface=127.0.0.1} collide); the same unix socket path.
    Port 0 (any free port) never collides.
    """
    kindA, whereA, ifaceA = _binding(a)
    kindB, whereB, ifaceB = _binding(b)
    if kindA != kindB or whereA != whereB:
        return False
    if kindA in ("tcp", "udp"):
        return whereA != 0 and (ifaceA == ifaceB or ifaceA in _WILDCARDS or ifaceB in _WILDCARDS)
    return True


@implementer(IStreamClientEndpoint)
class _Failing:
    """An endpoint whose every connect fails, saying why."""

    def __init__(self, why: str) -> None:
        self.why = why

    def connect(self, factory) -> defer.Deferred:
        return defer.fail(error.ConnectError(string=self.why))


class EndpointCache:
    """
    Client endpoints by address string (and backend TLS settings), parsed
    once and reused for every connection: parsing on each connect would be
    wasted work.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._endpoints: dict[tuple, IStreamClientEndpoint] = {}
        self._plain: dict[tuple, Optional[tuple[int, tuple, float]]] = {}

    def get(self, address: str, tls=None, alpn: tuple[bytes, ...] = ()) -> IStreamClientEndpoint:
        """
        @param tls: a pool's L{txlb.config.BackendTLSConfig}, to speak TLS
            to the server (verified against its C{server_name}, or the
            server's own host name).
        @param alpn: the protocols to offer in TLS's ALPN (C{(b"h2",)} for
            an HTTP/2 pool); nothing on plaintext.
        """
        key = (address, tls) if not alpn or tls is None else (address, tls, alpn)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = clientFromString(self.reactor, address)
            if tls is not None:
                from txlb.net.tls import clientTLS

                try:
                    creator = clientTLS(
                        tls.server_name or hostOf(address), verify=tls.verify, ca=tls.ca, cert=tls.cert,
                        key=tls.key, alpn=alpn,
                    )
                except Exception as e:
                    # The files were checked with the config; one replaced
                    # since by something unreadable fails this connect, and
                    # the next one reads them again.
                    return _Failing(f"the pool's tls: {e}")
                endpoint = wrapClientTLS(creator, endpoint)
            self._endpoints[key] = endpoint
        return endpoint

    def forget(self, tls) -> None:
        """
        Drop the endpoints made with C{tls} (a pool's
        L{txlb.config.BackendTLSConfig}): the files it names were renewed
        in place, and the next connect must read them again.
        """
        for key in [k for k in self._endpoints if len(k) > 1 and k[1] == tls]:
            del self._endpoints[key]

    def plainTCP(self, address: str, tls=None) -> Optional[tuple[int, tuple, float]]:
        """
        C{(family, sockaddr, timeout)} for a plaintext C{tcp:} address with
        a literal IP host and no C{bindAddress}: one a socket can be
        connected to directly, with no name to resolve.  L{None} for
        anything else (TLS, host names, UNIX sockets), which is connected
        through the endpoint from L{get}.
        """
        key = (address, tls)
        try:
            return self._plain[key]
        except KeyError:
            pass
        plain = None
        if tls is None:
            endpoint = self.get(address)
            parts = connectParts(address)
            if type(endpoint) in (TCP4ClientEndpoint, TCP6ClientEndpoint) and parts is not None and parts[3] is None:
                host, port, timeout, _ = parts
                if isIPAddress(host):
                    plain = (socket.AF_INET, (host, port), timeout)
                elif isIPv6Address(host) and "%" not in host:
                    plain = (socket.AF_INET6, (host, port, 0, 0), timeout)
        self._plain[key] = plain
        return plain


def hostOf(address: str) -> str:
    """The host of a C{tcp:host=H:port=P} address (for TLS names), else C{localhost}."""
    m = re.search(r"host=((?:[^:\\]|\\.)+)", address)
    return m.group(1).replace("\\:", ":") if m else "localhost"


def connectFailure(failure: Failure, timeout: Optional[float] = None) -> str:
    """
    Why a connect to a server failed, as txlb's events and reasons say it:
    what the error itself carries (C{Connection refused}, or txlb's own
    C{TLS with s0 failed: certificate verify failed}), without the sentence
    Twisted's connect errors start with (C{An error occurred while
    connecting:}, C{Connection was refused by other side: 111:}) and their
    final full stop, which say nothing an operator needs; C{timed out
    after 2s} for a connect that did not finish within C{timeout} (a
    connect cancelled for another reason, say the client left, is no
    failure to report).
    """
    value = failure.value
    if isinstance(value, error.ConnectError):
        text = value.args[0] if value.args else ""
        if text:
            return str(text)
        if value.osError:
            return str(value.osError)
        return (value.__doc__ or type(value).__name__).strip()
    if isinstance(value, (defer.TimeoutError, defer.CancelledError, error.ConnectingCancelledError)):
        return "timed out" if timeout is None else f"timed out after {timeout:g}s"
    return failure.getErrorMessage() or failure.type.__name__
