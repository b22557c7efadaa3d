# -*- test-case-name: tests.test_tomlpos -*-
"""
Where each key of a TOML document is written, so that config errors can
name the line as well as the key path.

L{tomllib} gives values but no positions.  This is a small, lenient scanner
run only on text that L{tomllib} has already accepted: it follows tables,
arrays of tables, dotted keys, inline tables and arrays, and records the
first line of every key path in the same notation the validator uses
(C{pools.api.servers[1].address}, C{services[0].listen[1]}).
"""

from __future__ import annotations

import re
import tomllib
from typing import Iterator

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^\s,\]\}#]+(?: [0-9:.+\-Z]+)?")


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    """
    Yield C{(kind, value, line)}: kinds are punctuation (C{[ ] { } , = .}),
    C{nl}, C{str} (a quoted string: one-line ones with their quotes, as keys
    need decoding; multi-line ones are only values) and C{word} (a bare key or
    a scalar).  A string's line is the line it starts on.
    """
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            yield "nl", c, line
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "[]{},=.":
            yield c, c, line
            i += 1
        elif c in "\"'":
            start = line
            triple = text.startswith(c * 3, i)
            quote = c * 3 if triple else c
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                if text[j] == "\\" and c == '"':
                    j += 1
                j += 1
            value = text[i + len(quote) : j]
            line += value.count("\n")
            end = j + len(quote)
            if triple:
                while end < n and text[end] == c:  # """a"""" ends on the last quotes
                    end += 1
            # Keys are always one-line strings; keep them quoted, for _unquote.
            yield "str", value if triple else text[i:end], start
            i = end
        else:
            m = _BARE.match(text, i) or _SCALAR.match(text, i)
            if m is None:
                i += 1
                continue
            yield "word", m.group(), line
            i = m.end()


def _unquote(kind: str, text: str) -> str:
    """
    A key as L{tomllib} spells it: quoted keys decoded (escapes included) by
    L{tomllib} itself, so that paths match the parsed document's.
    """
    if kind != "str":
        return text
    try:
        return tomllib.loads(f"k = {text}")["k"]
    except (tomllib.TOMLDecodeError, KeyError):
        return text.strip("\"'")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.toks = list(_tokens(text))
        self.i = 0
        self.lines: dict[str, int] = {}
        #: How many elements each array of tables has so far, by its full
        #: path (C{services}, C{services[1].routes}): a nested array restarts
        #: for each element of its parent because its path differs.
        self.tableCounts: dict[str, int] = {}

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i] if self.i < len(self.toks) else ("eof", "", 0)

    def take(self) -> tuple[str, str, int]:
        tok = self.peek()
        self.i += 1
        return tok

    def skipNewlines(self) -> None:
        while self.peek()[0] == "nl":
            self.i += 1

    def record(self, path: str, line: int) -> None:
        self.lines.setdefault(path, line)

    def keys(self) -> list[str]:
        kind, text, _ = self.take()
        parts = [_unquote(kind, text)]
        while self.peek()[0] == ".":
            self.take()
            kind, text, _ = self.take()
            parts.append(_unquote(kind, text))
        return parts

    def run(self) -> dict[str, int]:
        prefix = ""
        atLineStart = True
        while self.peek()[0] != "eof":
            kind, _, line = self.peek()
            if kind == "nl":
                self.take()
                atLineStart = True
                continue
            if kind == "[" and atLineStart:
                self.take()
                double = self.peek()[0] == "["
                if double:
                    self.take()
                path = self.header(self.keys(), double, line)
                self.take()
                if double:
                    self.take()
                prefix = path + "."
            elif kind in ("word", "str"):
                self.keyValue(prefix, line)
            else:
                self.take()
            atLineStart = False
        return self.lines

    def header(self, keys: list[str], double: bool, line: int) -> str:
        """
        The full path a C{[table]} or C{[[array]]} header opens, every
        ancestor recorded (C{[pools.api]} is where C{pools} is first
        written too).  C{[services.timeouts]} after C{[[services]]} means
        the latest service's: the current indices are inserted.
        """
        path = ""
        for depth, key in enumerate(keys):
            path = f"{path}.{key}" if path else key
            count = self.tableCounts.get(path)
            last = depth == len(keys) - 1
            if last and double:
                self.tableCounts[path] = (count or 0) + 1
                self.record(path, line)
                path = f"{path}[{count or 0}]"
            elif count:
                self.record(path, line)
                path = f"{path}[{count - 1}]"
            self.record(path, line)
        return path

    def keyValue(self, prefix: str, line: int) -> None:
        keys = self.keys()
        for depth in range(1, len(keys) + 1):
            self.record(prefix + ".".join(keys[:depth]), line)
        path = prefix + ".".join(keys)
        if self.peek()[0] == "=":
            self.take()
            self.value(path)

    def value(self, path: str) -> None:
        self.skipNewlines()
        kind, _, line = self.take()
        self.record(path, line)
        if kind == "{":
            while True:
                self.skipNewlines()
                k = self.peek()[0]
                if k in ("}", "eof"):
                    self.take()
                    return
                if k == ",":
                    self.take()
                    continue
                self.keyValue(path + ".", self.peek()[2])
        elif kind == "[":
            index = 0
            while True:
                self.skipNewlines()
                k = self.peek()[0]
                if k in ("]", "eof"):
                    self.take()
                    return
                if k == ",":
                    self.take()
                    continue
                self.value(f"{path}[{index}]")
                index += 1
        else:
            # A scalar the tokenizer split (1.5, a date and time): swallow the rest.
            while self.peek()[0] in ("word", ".") and self.peek()[2] == line:
                self.take()


def keyLines(text: str) -> dict[str, int]:
    """
    Map every key path in C{text} to the line (from 1) where it is written.
    Never raises: a construct it does not follow just leaves paths out.
    """
    scanner = _Scanner(text)
    try:
        return scanner.run()
    except (IndexError, ValueError):
        return scanner.lines


def lineOf(lines: dict[str, int], path: str) -> int | None:
    """
    The line of C{path}, or of its nearest written ancestor (a missing key
    is reported on its table's line).
    """
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            return None
        path = path[:cut]
    return None
