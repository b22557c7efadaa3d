# -*- test-case-name: tests.test_logs -*-
"""
The C{[log]} section: txlb's events as JSON lines (or readable text).

txlb logs with L{twisted.logger}; an event that matters to operators has an
C{event} key (C{connection}, C{server_state}, ...) and its fields as keys.
The JSON observer writes each event as one object per line, with only those
fields plus C{time}, C{level} and, for everything else Twisted logs, a
C{message}; so C{jq} and log shippers read it without parsing prose.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Callable

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    FilteringLogObserver,
    LogLevelFilterPredicate,
    formatEvent,
)

from txlb.config import LogConfig


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "level": getattr(event.get("log_level"), "name", "info"),
    }
    if "event" not in event:
        out["event"] = "log"
        out["message"] = formatEvent(event)
        out["system"] = event.get("log_namespace", event.get("log_system", "-"))
    for key, value in event.items():
        if not key.startswith("log_") and key not in ("format", "message", "time", "system", "isError", "why", "failure"):
            out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = failure.getErrorMessage()
        out["traceback"] = failure.getTraceback()
    return out


def jsonLine(event: dict[str, Any]) -> str:
    return json.dumps(_fields(event), default=str, separators=(",", ":")) + "\n"


def textLine(event: dict[str, Any]) -> str:
    fields = _fields(event)
    head = f"{fields.pop('time')} {fields.pop('level'):5} {fields.pop('event')}"
    message = fields.pop("message", None)
    fields.pop("system", None)
    # Twisted's own messages already say everything in their text.
    rest = "" if message else " ".join(f"{k}={v}" for k, v in fields.items())
    return " ".join(x for x in (head, message, rest) if x) + "\n"


def makeObserver(config: LogConfig, stdout: IO[str] = None) -> ILogObserver:
    """
    The observer for C{config}: JSON lines or text, to stdout or a file
    (appended to), at level info and above.
    """
    formatter: Callable[[dict], str] = jsonLine if config.format == "json" else textLine
    if config.path == "-":
        stream = stdout if stdout is not None else sys.stdout
    else:
        stream = open(config.path, "a", encoding="utf-8", buffering=1)
    return FilteringLogObserver(
        FileLogObserver(stream, formatter),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
    )
