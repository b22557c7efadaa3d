# -*- test-case-name: tests.test_logs -*-
"""
The C{[log]} section: txlb's events as JSON lines (or readable text).

txlb logs with L{twisted.logger}; an event that matters to operators has an
C{event} key (C{connection}, C{server_state}, ...) and its fields as keys.
The JSON observer writes each event as one object per line, with only those
fields plus C{time}, C{level} and, for everything else Twisted logs, a
C{message}; so C{jq} and log shippers read it without parsing prose.

With C{path} set to a file, C{SIGUSR1} makes txlb close and reopen it
(L{reopenOnSignal}), as logrotate's C{postrotate} expects: rename the file,
send the signal, and new events go to a new file of the old name.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, IO, Any, Callable, Optional

from twisted.logger import ILogObserver, LogLevel, Logger, formatEvent

from zope.interface import implementer

if TYPE_CHECKING:  # records only: the config's readers are a layer above this one
    from txlb.config import LogConfig


_log = Logger(namespace="txlb")


#: Keys of an event dict that are not written as fields.  C{why} is the
#: message of a legacy C{log.err} (already in its C{message}) but a field
#: of txlb's own events (C{connect_failed}), which keep it.
_SKIPPED = frozenset({"format", "message", "time", "system", "isError", "why", "failure"})
_EVENT_SKIPPED = _SKIPPED - {"why"}
#: C{THOUSANDTHS[n]}: C{n} (0-999) as three digits, for milliseconds.
THOUSANDTHS = tuple(f"{n:03d}" for n in range(1000))

_second = [-1, ""]


def _timestamp(when: float) -> str:
    """ISO 8601 in UTC to the millisecond; the date part is made once a second."""
    second = int(when)
    if second != _second[0]:
        _second[0] = second
        _second[1] = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{THOUSANDTHS[int((when - second) * 1000)]}+00:00"


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    line = event.get("log_line")
    if line is not None:
        return dict(line)
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": _timestamp(event.get("log_time", 0)),
        "level": level.name if level is not None else "info",
    }
    skipped = _EVENT_SKIPPED
    if "event" not in event:
        out["event"] = "log"
        out["message"] = formatEvent(event)
        out["system"] = event.get("log_namespace", event.get("log_system", "-"))
        skipped = _SKIPPED
    for key, value in event.items():
        if key not in skipped and not key.startswith("log_"):
            out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = failure.getErrorMessage()
        out["traceback"] = failure.getTraceback()
    return out


def _makeEncoder() -> Callable[[Any], str]:
    """
    Compact JSON, anything unknown as C{str}.  C{JSONEncoder.encode} builds
    its C encoder anew for every call; this builds it once (a quarter of
    the cost of a request event's line) and keeps the standard encoder for
    what the fast one refuses (a value that contains itself).
    """
    standard = json.JSONEncoder(default=str, separators=(",", ":")).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return standard
    chunks = make(None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)

    def encode(value: Any) -> str:
        try:
            return "".join(chunks(value, 0))
        except (RecursionError, ValueError):
            return standard(value)

    return encode


_encode = _makeEncoder()
#: C{encode(value)}: C{value} as compact JSON, as in txlb's lines.
encode = _encode


def jsonLine(event: dict[str, Any]) -> str:
    line = event.get("log_line")
    return _encode(line if line is not None else _fields(event)) + "\n"


def emit(logger: Logger, event: str, fields: dict[str, Any]) -> None:
    """
    Log the operator's event C{event} with C{fields} at level info, as
    C{logger.info(event, event=event, **fields)} would, for events logged
    once per connection or flow.  C{fields} becomes the event: the caller
    gives it up.

    When txlb's own JSON observer is the process's log (L{accessTo}), the
    fields go straight to it, to be made into lines in a batch when it
    next flushes: no event dict, no publisher, no observer that would only
    ignore them.  Otherwise (text format, or a test watching the global
    publisher) the line's fields are put together once, kept in the event
    as C{log_line} for the observer to encode as they are, and the event
    goes to the logger's observer, which other observers see as an
    ordinary event.
    """
    now = time.time()
    direct = _direct
    if direct is not None:
        direct.access(now, None, (event, fields))
        return
    _publish(logger, now, event, fields)


def _publish(logger: Logger, now: float, event: str, fields: dict[str, Any]) -> None:
    line = {"time": _timestamp(now), "level": "info", "event": event}
    line.update(fields)
    record = fields
    record["event"] = event
    record["log_logger"] = logger
    record["log_level"] = LogLevel.info
    record["log_namespace"] = logger.namespace
    record["log_source"] = None
    record["log_format"] = event
    record["log_time"] = now
    record["log_line"] = line
    logger.observer(record)


class FixedEvent:
    """
    An event logged for every request, whose fields always come in the
    same order: as a tuple (a I{record}) rather than a dict, and written
    with a template made once rather than by the JSON encoder, which would
    encode every key and every value anew for every line.  The event's
    maker knows which of its values are names (few, and repeated: encoded
    once, L{names}) and which are text from clients (escaped each time,
    L{text}).  A subclass says how a record becomes a line (L{line}) and,
    for the publisher's road, its fields (L{fields}).
    """

    #: The C{event} field.
    event = ""

    def line(self, stamp: str, record: tuple, end: str) -> str:
        """
        The whole line, from C{{"time":"STAMP","level":"info","event":} on,
        ending with C{end}: the closing brace and the newline, after the
        constant fields if there are any (L{accessTo}).
        """
        raise NotImplementedError()

    def fields(self, record: tuple) -> dict[str, Any]:
        """The fields as L{emit} takes them, in the line's order."""
        raise NotImplementedError()


def emitFixed(logger: Logger, kind: FixedEvent, record: tuple) -> None:
    """
    Log C{kind}'s event made of C{record}: straight to txlb's observer as
    the record (see L{emit}), else as the ordinary event of its fields.
    """
    now = time.time()
    direct = _direct
    if direct is not None:
        direct.access(now, kind, record)
        return
    _publish(logger, now, kind.event, kind.fields(record))


#: C{names[value]}: C{value}'s JSON text, for values that repeat (service,
#: pool and server names, methods, statuses, clients' addresses, L{None}),
#: made at the first sight by L{learn}.  A plain dict, so that looking up
#: is the interpreter's fastest subscript; a L{KeyError} says to L{learn}.
names: dict[Any, str] = {None: "null"}
#: How many values L{names} holds at most: values of many kinds (clients'
#: addresses) cannot make it grow without bound.
NAMES_LIMIT = 4096


def learn(values: tuple) -> None:
    """
    Put C{values} in L{names}, bytes as their Latin-1 text; not booleans
    or floats, which would meet the integers they equal.
    """
    if len(names) + len(values) > NAMES_LIMIT:
        names.clear()
        names[None] = "null"
    for value in values:
        if value not in names:
            names[value] = _encode(value.decode("latin-1") if isinstance(value, bytes) else value)


#: C{text(s)}: the string C{s} as JSON text (quoted, escaped, ASCII), for
#: strings that do not repeat (paths).
text: Callable[[str], str] = json.encoder.encode_basestring_ascii


#: The observer L{emit} writes to directly, if any.
_direct: "Optional[TxlbLogObserver]" = None


def accessTo(observer: "Optional[TxlbLogObserver]", **constant: Any) -> None:
    """
    Make C{observer} the one that L{emit}'s events go to, bypassing the
    global log publisher (L{None}: through the publisher again).  Only for
    the observer that is the process's log, and only when it writes JSON:
    the lines are then the same as by the publisher.  C{constant} fields
    (a worker's number) end every such line.
    """
    global _direct
    if observer is not None and observer.formatter is not jsonLine:
        observer = None
    if observer is not None:
        observer.constant = constant
    _direct = observer


def textLine(event: dict[str, Any]) -> str:
    fields = _fields(event)
    head = f"{fields.pop('time')} {fields.pop('level'):5} {fields.pop('event')}"
    message = fields.pop("message", None)
    fields.pop("system", None)
    # Twisted's own messages already say everything in their text.
    rest = "" if message else " ".join(f"{k}={v}" for k, v in fields.items())
    return " ".join(x for x in (head, message, rest) if x) + "\n"


class LogFile:
    """
    A log file, appended to line by line, that can be reopened under its
    name after logrotate has renamed it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = self._open()

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        """
        Open C{path} again and close the old file.  If it cannot be opened
        (a directory gone, permissions), keep writing to the old one.
        """
        try:
            new = self._open()
        except OSError:
            return
        old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        self._file.close()


#: Flushed at once.
_URGENT = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})
#: What is written: info and above (Twisted's own debug chatter is not).
_SHOWN = frozenset({LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical})


#: Access events made into lines together at most: a batch formatted while
#: its events are still in the processor's caches costs less than the
#: hundreds a 50 ms flush would otherwise gather under load.
BATCH_LINES = 64


@implementer(ILogObserver)
class _BufferedWriter:
    """
    Formats events onto a stream and flushes it at most every C{delay}
    seconds (at once for warnings and errors, and with no clock): a write
    system call per access event would cost more than the request itself.
    Access events given to L{access} wait as their fields and become lines
    all together, before the next other event or at the flush, so lines
    keep the order of their events.
    """

    def __init__(self, stream, formatter: Callable[[dict], str], clock=None, delay: float = 0.05) -> None:
        self.stream = stream
        self.formatter = formatter
        self.clock = clock
        self.delay = delay
        self._pending = None
        #: Access events not written yet: C{(time, kind, record)}, a
        #: L{FixedEvent}'s record, or (kind L{None}) C{(event, fields)}.
        self.batch: list[tuple[float, Optional[FixedEvent], tuple]] = []
        #: Fields that end every access line (L{accessTo}).
        self.constant: dict[str, Any] = {}

    def __call__(self, event: dict) -> None:
        if self.batch:
            self._writeBatch()
        self.stream.write(self.formatter(event))
        self._later(event.get("log_level") in _URGENT)

    def access(self, when: float, kind: Optional[FixedEvent], record: tuple) -> None:
        batch = self.batch
        batch.append((when, kind, record))
        if len(batch) >= BATCH_LINES:
            self._writeBatch()
        if self._pending is None:
            self._later(False)

    def _later(self, urgent: bool) -> None:
        # A reactor that does not run (yet, or any more: twistd's last
        # words) would never call the flush: write at once.
        if urgent or self.clock is None or not getattr(self.clock, "running", True):
            self.flush()
        elif self._pending is None:
            self._pending = self.clock.callLater(self.delay, self.flush)

    def _writeBatch(self) -> None:
        # Each line is its fields encoded as they are, the fixed fields put
        # in front by hand: no dict is made for it.
        batch, self.batch = self.batch, []
        encode, timestamp = _encode, _timestamp
        end = "}\n" if not self.constant else "," + _encode(self.constant)[1:] + "\n"
        lines = []
        for when, kind, record in batch:
            if kind is not None:
                lines.append(kind.line(timestamp(when), record, end))
                continue
            event, fields = record
            body = encode(fields)
            lines.append(f'{{"time":"{timestamp(when)}","level":"info","event":{encode(event)}'
                         f'{"," if len(body) > 2 else ""}{body[1:-1]}{end}')
        self.stream.write("".join(lines))

    def flush(self) -> None:
        if self._pending is not None:
            if self._pending.active():
                self._pending.cancel()
            self._pending = None
        if self.batch:
            self._writeBatch()
        self.stream.flush()


@implementer(ILogObserver)
class TxlbLogObserver:
    """
    The observer L{makeObserver} returns: info and above, formatted, to
    C{stream} (a L{LogFile} when C{[log] path} is a file).  The level test
    is a set lookup rather than Twisted's per-namespace
    L{LogLevelFilterPredicate}, which walks the namespace for every event.
    """

    def __init__(self, stream, formatter: Callable[[dict], str], clock=None) -> None:
        self.writer = _BufferedWriter(stream, formatter, clock)
        self.stream = stream
        self.formatter = formatter
        #: L{emit}'s way in, when this is the process's log (L{accessTo}).
        self.access = self.writer.access

    @property
    def constant(self) -> dict[str, Any]:
        return self.writer.constant

    @constant.setter
    def constant(self, fields: dict[str, Any]) -> None:
        self.writer.constant = fields

    def __call__(self, event: dict) -> None:
        if event.get("log_level", LogLevel.info) in _SHOWN:
            self.writer(event)

    def flush(self) -> None:
        self.writer.flush()

    def reopen(self) -> bool:
        """Reopen the log file; C{False} when logging to a stream."""
        if isinstance(self.stream, LogFile):
            self.flush()
            self.stream.reopen()
            return True
        return False


def makeObserver(config: LogConfig, stdout: IO[str] = None, clock=None) -> TxlbLogObserver:
    """
    The observer for C{config}: JSON lines or text, to stdout or a file
    (appended to), at level info and above; with a C{clock}, writes are
    flushed in batches.
    """
    formatter: Callable[[dict], str] = jsonLine if config.format == "json" else textLine
    if config.path == "-":
        stream = stdout if stdout is not None else sys.stdout
    else:
        stream = LogFile(config.path)
    return TxlbLogObserver(stream, formatter, clock)


def reopenOnSignal(observer: TxlbLogObserver, reactor, signum: int = signal.SIGUSR1) -> None:
    """
    Reopen C{observer}'s file when C{signum} arrives.  The reopening runs in
    the reactor, never inside the signal handler, so a line being written
    is never cut in two.  Logs C{log_reopened} into the new file.
    """

    def reopen() -> None:
        if observer.reopen():
            _log.info("log file reopened", event="log_reopened", path=observer.stream.path)

    signal.signal(signum, lambda *_: reactor.callFromThread(reopen))
