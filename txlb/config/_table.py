# -*- test-case-name: tests.test_config -*-
"""
Reading one TOML table: values converted and checked, problems recorded
against their key path, unknown keys reported with the closest known one.
"""

from __future__ import annotations

import difflib
import re
from types import MappingProxyType
from typing import Any, Callable, Collection, Mapping, Optional, Sequence, TypeVar

from txlb.config._model import Problem
from txlb.config._tomlpos import lineOf
from txlb.net.endpoints import EndpointError, checkClient, checkServer, serverAddress

T = TypeVar("T")


#: Keys that belong to features of txlb still to come, by table kind.  They
#: are refused with this explanation rather than as unknown keys.
PLANNED: Mapping[str, Mapping[str, str]] = {
    "": {
    },
    "pool": {
    },
    "service": {
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

