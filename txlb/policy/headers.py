# -*- test-case-name: tests.test_policy_headers -*-
"""
Header rules: C{set}, C{add} and C{remove} on the request a backend gets
and on the response a client gets, written in the config on a service and
on its routes.

A side's rules are compiled once, when the config is read, into a
L{SideRules}: the lower-case names whose fields go (removed, or replaced
by a C{set}) and the lines to append, each value already a finished line
or a template with its C{${...}} variables found.  The proxy's one-pass
head writers (L{txlb.http.headers.requestHead} and C{responseHead}) drop
those names in the pass they already make and append the lines: nothing
is parsed per request, and a service without rules pays nothing.

Rules cannot smuggle: values are checked for control characters, names
must be tokens, and the headers that frame a message or belong to one
connection cannot be named at all, since txlb writes those itself.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

from txlb.http.headers import HOP_BY_HOP

#: What a value may name, in the order L{SideRules.lines} is given them.
VARIABLES = ("client_ip", "request_id", "service", "server")

#: Names no rule may touch: txlb writes the framing and the
#: connection-level headers itself, for what it actually sends.
FRAMING = HOP_BY_HOP | {b"content-length"}

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A field value: visible ASCII, space and tab (RFC 9110 5.5, without
#: obs-text), so that whatever parser reads it next reads the same thing.
_VALUE = re.compile(r"[\t\x20-\x7e]*")
_VARIABLE = re.compile(r"\$\{([^}]*)\}|\$\$")


class RuleError(ValueError):
    """A rule that cannot be used; the message says why."""


def checkName(name: str, side: str, op: str) -> bytes:
    """
    The lower-case bytes of a header name a rule may use on C{side}
    (C{request} or C{response}) for C{op} (C{set}, C{add}, C{remove}).

    @raise RuleError: it is not a token, or txlb owns that header.
    """
    if not _TOKEN.fullmatch(name):
        raise RuleError(f"{name!r} is not a header name (a token: letters, digits and !#$%&'*+.^_`|~-)")
    lower = name.lower().encode("ascii")
    if lower in FRAMING:
        raise RuleError(f"{name} frames the message or belongs to one connection: txlb writes it itself")
    if side == "request" and lower == b"host" and op != "set":
        raise RuleError("a request has exactly one Host: it can be set, not added or removed")
    if side == "response" and lower == b"content-encoding":
        raise RuleError("Content-Encoding describes the body as sent: use compress, not a header rule")
    return lower


class Template:
    """
    A header value with C{${variable}}s, split once into literal bytes
    and the indexes of L{VARIABLES}; C{$$} is a literal C{$}.
    """

    __slots__ = ("parts", "constant")

    def __init__(self, text: str) -> None:
        if not _VALUE.fullmatch(text):
            bad = next(c for c in text if not _VALUE.fullmatch(c))
            raise RuleError(f"the value holds {bad!r}: only printable ASCII, spaces and tabs may be sent")
        parts: list[bytes | int] = []
        at = 0
        for m in _VARIABLE.finditer(text):
            if m.start() > at:
                parts.append(text[at:m.start()].encode("ascii"))
            if m.group(0) == "$$":
                parts.append(b"$")
            elif m.group(1) in VARIABLES:
                parts.append(VARIABLES.index(m.group(1)))
            else:
                raise RuleError(f"unknown variable ${{{m.group(1)}}}; known: "
                                + ", ".join(f"${{{v}}}" for v in VARIABLES))
            at = m.end()
        if at < len(text):
            parts.append(text[at:].encode("ascii"))
        merged: list[bytes | int] = []
        for part in parts:
            if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += part
            else:
                merged.append(part)
        self.parts = tuple(merged)
        self.constant = all(isinstance(p, bytes) for p in merged)

    def render(self, values: Sequence[bytes]) -> bytes:
        parts = self.parts
        if len(parts) == 1:  # the usual value: one literal, or one variable
            part = parts[0]
            return part if part.__class__ is bytes else values[part]
        return b"".join([p if p.__class__ is bytes else values[p] for p in parts])


class SideRules:
    """
    One side's rules, compiled: C{drop} are the lower-case names whose
    fields go, L{lines} the C{b"Name: value"} lines that follow.
    """

    __slots__ = ("drop", "_static", "_templates", "_plans")

    def __init__(self, drop: frozenset[bytes], lines: Sequence[tuple[bytes, Template]]) -> None:
        self.drop = drop
        self._plans: dict[frozenset[bytes], tuple[frozenset[bytes], frozenset[bytes]]] = {}
        if all(t.constant for _, t in lines):
            self._static = [name + b": " + t.render(()) for name, t in lines]
            self._templates = None
        else:
            self._static = None
            self._templates = tuple((name + b": ", t) for name, t in lines)

    def plan(self, sifted: frozenset[bytes], own: frozenset[bytes]) -> tuple[frozenset[bytes], frozenset[bytes]]:
        """
        For a head writer that sifts the incoming fields by C{sifted} and
        then writes its own lines, named C{own}: C{(sifted | drop, drop &
        own)}, the names to sift with these rules and those of its own
        lines they take out.  Worked out once per writer, not per request
        (a writer passes the same C{own} with the same C{sifted}).
        """
        plan = self._plans.get(sifted)
        if plan is None:
            plan = self._plans[sifted] = (sifted | self.drop, self.drop & own)
        return plan

    @property
    def dynamic(self) -> bool:
        """Some value needs the request's variables."""
        return self._templates is not None

    def lines(self, values: Sequence[bytes]) -> list[bytes]:
        """
        The lines to append, with C{values} (bytes, in L{VARIABLES}'
        order) filled in.  A new list each call: the caller may extend it.
        """
        if self._templates is None:
            return list(self._static)
        return [prefix + t.render(values) for prefix, t in self._templates]


def compileSide(tables: Iterable[Optional[object]]) -> Optional[SideRules]:
    """
    Compile the C{set}/C{add}/C{remove} records (L{txlb.config.HeaderOps},
    or L{None}) of one side, applied in order, into one L{SideRules};
    L{None} when there is nothing to do.

    Within one table C{remove} comes first, then C{set}, then C{add}; a
    later table (a route's, after its service's) works on what the earlier
    left, so that its C{set} replaces and its C{remove} removes even what
    the earlier table added.
    """
    drop: set[bytes] = set()
    appended: list[tuple[bytes, bytes, Template]] = []  # (lower, name, value)
    touched = False
    for ops in tables:
        if ops is None:
            continue
        for name in ops.remove:
            lower = name.lower().encode("ascii")
            drop.add(lower)
            appended = [a for a in appended if a[0] != lower]
            touched = True
        for name, value in ops.set:
            lower = name.lower().encode("ascii")
            drop.add(lower)
            appended = [a for a in appended if a[0] != lower]
            appended.append((lower, name.encode("ascii"), Template(value)))
            touched = True
        for name, value in ops.add:
            appended.append((name.lower().encode("ascii"), name.encode("ascii"), Template(value)))
            touched = True
    if not touched:
        return None
    return SideRules(frozenset(drop), [(name, t) for _, name, t in appended])


class HeaderPolicy:
    """
    The compiled rules for one place (a service, or a route with its
    service's rules before its own): L{request} and L{response} are
    L{SideRules} or L{None}.
    """

    __slots__ = ("request", "response")

    def __init__(self, request: Optional[SideRules], response: Optional[SideRules]) -> None:
        self.request = request
        self.response = response


def compileRules(*rules: Optional[object]) -> Optional[HeaderPolicy]:
    """
    One L{HeaderPolicy} from L{txlb.config.HeaderRules} records applied in
    order (a service's, then a route's), or L{None} when none says anything.
    """
    present = [r for r in rules if r is not None]
    request = compileSide(r.request for r in present)
    response = compileSide(r.response for r in present)
    if request is None and response is None:
        return None
    return HeaderPolicy(request, response)


def variables(client: str, requestId: str, service: str, server: Optional[str]) -> tuple[bytes, ...]:
    """
    The values of L{VARIABLES} for one request (C{server} empty when none
    was picked).  Service and server names, and request ids, are checked
    where they are made; a client address is an IP address except on odd
    listeners (a unix socket's peer), so it is checked here.
    """
    if not (client.isascii() and client.isprintable()):  # printable ASCII: what _VALUE takes, but tab
        client = "".join(c if _VALUE.fullmatch(c) else "?" for c in client)
    return (client.encode("ascii"), requestId.encode("ascii"), service.encode("ascii"),
            server.encode("ascii") if server else b"")
