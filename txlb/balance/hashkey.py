# -*- test-case-name: tests.test_hashkey -*-
"""
The value a hashing scheduler hashes for an HTTP request, from the pool's
C{hash_key}: C{client_ip}, C{path}, C{header:NAME}, C{cookie:NAME} or
C{query:NAME}.  A request that lacks the named part falls back to the
client address, so it is still placed consistently.
"""

from __future__ import annotations

from typing import Optional, Sequence
from urllib.parse import parse_qsl


def hashKeyOf(spec: str, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Optional[str]:
    """
    The key for C{spec}, or L{None} to hash the client address.
    """
    if spec == "client_ip":
        return None
    if spec == "path":
        query = target.find(b"?")
        return (target if query < 0 else target[:query]).decode("latin-1")
    kind, _, name = spec.partition(":")
    if kind == "header":
        wanted = name.lower().encode("latin-1")
        for n, v in headers:
            if n.lower() == wanted:
                return v.decode("latin-1")
        return None
    if kind == "cookie":
        for n, v in headers:
            if n.lower() == b"cookie":
                for part in v.decode("latin-1").split(";"):
                    key, eq, value = part.strip().partition("=")
                    if eq and key == name:
                        return value
        return None
    if kind == "query":
        query = target.find(b"?")
        if query >= 0:
            for key, value in parse_qsl(target[query + 1 :].decode("latin-1"), keep_blank_values=True):
                if key == name:
                    return value
        return None
    raise ValueError(f"unknown hash_key {spec!r}")
