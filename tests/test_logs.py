"""
The JSON-lines and text observers.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher

from txlb.config import LogConfig
from txlb.observe.logs import makeObserver


def emit(config: LogConfig, **kwargs) -> str:
    out = io.StringIO()
    publisher = LogPublisher(makeObserver(config, stdout=out))
    log = Logger(namespace="test", observer=publisher)
    log.info(kwargs.pop("format", "x"), **kwargs)
    return out.getvalue()


def test_event_is_one_json_object_with_its_fields_only():
    text = emit(LogConfig(), event="connection", service="web", bytesIn=12)
    assert text.endswith("\n") and text.count("\n") == 1
    record = json.loads(text)
    assert record["event"] == "connection"
    assert record["service"] == "web" and record["bytesIn"] == 12
    assert record["level"] == "info" and record["time"].endswith("+00:00")
    assert not [k for k in record if k.startswith("log_")]
    assert "message" not in record


def test_an_events_why_is_one_of_its_fields():
    record = json.loads(emit(LogConfig(), format="connect to {server} failed: {why}", event="connect_failed",
                             server="s1", why="TLS with s1 failed: certificate verify failed"))
    assert record["why"] == "TLS with s1 failed: certificate verify failed" and "message" not in record


def test_plain_messages_become_log_events():
    record = json.loads(emit(LogConfig(), format="hello {who}", who="world"))
    assert record["event"] == "log"
    assert record["message"] == "hello world"
    assert record["system"] == "test"


def test_text_format_is_one_readable_line():
    line = emit(LogConfig(format="text"), event="connection", service="web")
    assert line.count("\n") == 1
    assert " info  connection " in line and "service=web" in line


def test_debug_events_are_filtered():
    out = io.StringIO()
    log = Logger(observer=LogPublisher(makeObserver(LogConfig(), stdout=out)))
    log.debug("noise", event="noise")
    assert out.getvalue() == ""


def test_file_path_is_appended_to(tmp_path):
    path = tmp_path / "txlb.log"
    path.write_text("earlier\n")
    observer = makeObserver(LogConfig(path=str(path)))
    Logger(observer=LogPublisher(observer)).info("x", event="one")
    lines = path.read_text().splitlines()
    assert lines[0] == "earlier" and json.loads(lines[1])["event"] == "one"


class CountingStream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_events_are_flushed_in_batches_but_warnings_at_once():
    from twisted.internet.task import Clock

    clock = Clock()
    out = CountingStream()
    log = Logger(observer=LogPublisher(makeObserver(LogConfig(), stdout=out, clock=clock)))
    for i in range(100):
        log.info("x", event="request", n=i)
    assert out.flushes == 0 and out.getvalue().count("\n") == 100
    clock.advance(0.05)
    assert out.flushes == 1
    log.warn("trouble", event="tls_unverified")
    assert out.flushes == 2


def test_access_events_become_lines_a_bounded_batch_at_a_time_flushed_by_the_clock():
    """
    Access events wait as fields for at most BATCH_LINES of them (formatted
    while still in the caches), then become lines; the stream is flushed by
    the clock as before.
    """
    from twisted.internet.task import Clock

    from txlb.observe.logs import BATCH_LINES, accessTo, emit as emitEvent

    clock = Clock()
    clock.running = True
    out = CountingStream()
    observer = makeObserver(LogConfig(), stdout=out, clock=clock)
    accessTo(observer)
    try:
        for i in range(BATCH_LINES - 1):
            emitEvent(Logger(), "request", {"n": i})
        assert out.getvalue() == ""
        emitEvent(Logger(), "request", {"n": BATCH_LINES - 1})
        emitEvent(Logger(), "request", {"n": BATCH_LINES})
        assert [json.loads(line)["n"] for line in out.getvalue().splitlines()] == list(range(BATCH_LINES))
        assert out.flushes == 0
        clock.advance(0.05)
        assert out.flushes == 1 and out.getvalue().count("\n") == BATCH_LINES + 1
    finally:
        accessTo(None)


def test_timestamps_keep_milliseconds_across_seconds():
    from txlb.observe.logs import _timestamp

    assert _timestamp(0.5) == "1970-01-01T00:00:00.500+00:00"
    assert _timestamp(1.25) == "1970-01-01T00:00:01.250+00:00"
    assert _timestamp(1.999) == "1970-01-01T00:00:01.999+00:00"


def test_emit_writes_what_info_would():
    """The per-request shortcut gives the same line as Logger.info."""
    from txlb.observe.logs import emit as emitEvent

    fields = dict(service="web", path="/a\"b", status=200, cache=None)
    for config in (LogConfig(), LogConfig(format="text")):
        viaInfo = emit(config, event="request", **fields)
        out = io.StringIO()
        emitEvent(Logger(namespace="test", observer=LogPublisher(makeObserver(config, stdout=out))),
                  "request", dict(fields))
        if config.format == "json":
            a, b = json.loads(viaInfo), json.loads(out.getvalue())
            assert a.pop("time")[:16] == b.pop("time")[:16]
            assert a == b
        else:
            assert viaInfo.split(" ", 1)[1] == out.getvalue().split(" ", 1)[1]


def test_emit_gives_other_observers_an_ordinary_event():
    from txlb.observe.logs import emit as emitEvent

    seen = []
    emitEvent(Logger(namespace="txlb.http", observer=seen.append), "request", {"status": 503})
    (event,) = seen
    assert event["event"] == "request" and event["status"] == 503
    assert event["log_namespace"] == "txlb.http" and event["log_format"] == "request"


def test_lines_encode_like_the_standard_encoder():
    import pytest

    from txlb.observe.logs import _encode

    value = {"a": 1.5, "b": None, "c": "é\n\"", "d": [1, "x"], "f": True}
    assert _encode(value) == json.dumps(value, separators=(",", ":"))
    assert _encode({"x": frozenset()}) == '{"x":"frozenset()"}'
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError):  # as the standard encoder says it
        _encode({"x": loop})


def test_access_events_straight_to_the_process_log_are_the_same_lines_in_order():
    """
    With txlb's observer as the process's log (accessTo), emit skips the
    publisher: the lines are those of the publisher's road, made at the
    flush, and an event logged in between keeps its place.
    """
    from twisted.internet.task import Clock

    from txlb.observe.logs import accessTo, emit as emitEvent

    clock = Clock()
    clock.running = True
    out = CountingStream()
    observer = makeObserver(LogConfig(), stdout=out, clock=clock)
    publisher = LogPublisher(observer)
    seen: list = []
    publisher.addObserver(seen.append)
    log = Logger(namespace="txlb.http", observer=publisher)
    accessTo(observer, worker=2)
    try:
        emitEvent(log, "request", {"service": "web", "path": '/a"b', "status": 200, "cache": None})
        emitEvent(log, "request", {"service": "web", "status": 404})
        assert out.getvalue() == "" and seen == []  # not through the publisher, not yet a line
        log.info("x", event="server_state", server="a")
        emitEvent(log, "connection", {"service": "db"})
        assert out.flushes == 0
        clock.advance(0.05)
        assert out.flushes == 1
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [line["event"] for line in lines] == ["request", "request", "server_state", "connection"]
        assert list(lines[0]) == ["time", "level", "event", "service", "path", "status", "cache", "worker"]
        assert lines[0]["path"] == '/a"b' and lines[0]["worker"] == 2 and lines[3]["level"] == "info"
        assert [e["event"] for e in seen] == ["server_state"]
    finally:
        accessTo(None)
    emitEvent(log, "request", {"status": 1})
    assert [e["event"] for e in seen] == ["server_state", "request"]


def test_text_logs_keep_the_publishers_road():
    from txlb.observe import logs

    logs.accessTo(makeObserver(LogConfig(format="text"), stdout=io.StringIO()))
    assert logs._direct is None
