# -*- test-case-name: tests.test_health -*-
"""
Reading a check kind's C{options} table: the names a kind takes, and each
value's type.  Every built-in kind reads its options with these, so that
they all refuse a wrong option in the same words, which C{--check} shows
after the option's key.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from txlb.interfaces import HealthCheckOptionsError


def checkOptions(kind: str, options: Mapping[str, object], allowed: frozenset = frozenset()) -> None:
    """
    @raise HealthCheckOptionsError: C{options} names one that the C{kind}
        check does not take (the message lists those it does).
    """
    unknown = set(options) - allowed
    if unknown:
        raise HealthCheckOptionsError(
            f"unknown option {', '.join(sorted(unknown))} for the {kind} check"
            + (f" (it takes {', '.join(sorted(allowed))})" if allowed else " (it takes none)")
        )


def option(options: Mapping[str, object], name: str, default: Any, valid: Callable[[Any], bool], must: str) -> Any:
    """
    The option C{name}, or C{default} when it is not given.

    @raise HealthCheckOptionsError: "C{name} must be C{must}" when C{valid}
        refuses the value given.
    """
    if name not in options:
        return default
    value = options[name]
    if not valid(value):
        raise HealthCheckOptionsError(f"{name} must be {must}")
    return value


def isBool(value: object) -> bool:
    return isinstance(value, bool)


def isString(value: object) -> bool:
    return isinstance(value, str)


def isHostName(value: object) -> bool:
    """A non-empty string without spaces or control characters."""
    return isinstance(value, str) and bool(value) and not re.search(r"[\s\x00-\x1f]", value)
