"""
The C{request} event's fixed-field line (txlb.http.requestlog): the same
JSON, key for key and in the same order, as the fields the publisher's
road would encode, whatever a client put in its path.
"""

from __future__ import annotations

import io
import json

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogPublisher, Logger

from txlb.config import LogConfig
from txlb.http.requestlog import FIELDS, REQUEST, logRequest
from txlb.observe import logs
from txlb.observe.logs import accessTo, makeObserver

TIME = "2026-12-07T10:00:00.250+00:00"


def record(**given) -> tuple:
    values = dict(requestId="0a1b2c-7", service="web", pool="blue", selectedServer="s1", method=b"GET",
                  path=b"/a/b?c=d", status=200, seconds=0.0123456, bytesSent=13, client="127.0.0.1",
                  protocol="HTTP/1.1", cache=None, reason="round_robin", extra=None)
    values.update(given)
    return tuple(values.values())


def parsed(line: str) -> dict:
    assert line.endswith("}\n") and line.count("\n") == 1
    return json.loads(line)


def expected(rec: tuple) -> dict:
    return {"time": TIME, "level": "info", "event": "request", **REQUEST.fields(rec)}


def test_a_line_is_the_fields_in_their_order():
    rec = record()
    line = parsed(REQUEST.line(TIME, rec, "}\n"))
    assert list(line) == ["time", "level", "event", *FIELDS]
    assert line["path"] == "/a/b" and line["method"] == "GET" and line["responseTimeMs"] == 12.346
    assert line == expected(rec)


def test_values_that_are_absent_are_null_and_extra_fields_come_last():
    rec = record(pool=None, selectedServer=None, status=None, cache="MISS",
                 extra={"error": 'no "server"', "spliced": 10})
    line = parsed(REQUEST.line(TIME, rec, ',"worker":2}\n'))
    assert line["pool"] is None and line["selectedServer"] is None and line["status"] is None
    assert list(line)[-3:] == ["error", "spliced", "worker"]
    assert line == expected(rec) | {"worker": 2}


@given(path=st.binary(max_size=40), client=st.text(max_size=12), service=st.text(min_size=1, max_size=8),
       method=st.binary(min_size=1, max_size=8), seconds=st.floats(min_value=0, max_value=1e4))
def test_any_path_name_or_time_gives_valid_json_equal_to_the_fields(path, client, service, method, seconds):
    rec = record(path=path, client=client, service=service, method=method, seconds=seconds)
    raw = REQUEST.line(TIME, rec, "}\n")
    assert raw.isascii()
    line = parsed(raw)
    want = expected(rec)
    assert abs(line.pop("responseTimeMs") - want.pop("responseTimeMs")) < 0.0015
    assert line == want


def test_names_stay_bounded_however_many_clients_come(monkeypatch):
    monkeypatch.setattr(logs, "NAMES_LIMIT", 50)
    for n in range(500):
        line = parsed(REQUEST.line(TIME, record(client=f"10.0.{n // 256}.{n % 256}"), "}\n"))
        assert line["client"] == f"10.0.{n // 256}.{n % 256}"
        assert len(logs.names) <= 50
    assert logs.names[None] == "null"


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


class _Exchange:
    """What logRequest reads of an exchange."""

    requestId = "abc-1"
    pool = _Named("blue")
    server = _Named("s1")
    method = b"POST"
    target = b"/up?x=1"
    status = 502
    bytesSent = 0
    protocol = None
    version = "1.1"
    cacheResult = None
    reason = "least_connections"
    error = "connection refused"
    spliced = 0
    encoding = None
    refused = None

    def __init__(self) -> None:
        import time

        self.started = time.monotonic()


def test_straight_to_the_log_and_through_the_publisher_the_lines_agree():
    clock = Clock()
    clock.running = True
    direct = io.StringIO()
    observer = makeObserver(LogConfig(), stdout=direct, clock=clock)
    accessTo(observer)
    try:
        logRequest(Logger(), _Exchange(), "web", "127.0.0.2")
        assert direct.getvalue() == ""  # a record in the batch, not yet a line
        clock.advance(1)
    finally:
        accessTo(None)
    published = io.StringIO()
    logRequest(Logger(observer=LogPublisher(makeObserver(LogConfig(), stdout=published))),
               _Exchange(), "web", "127.0.0.2")
    a, b = parsed(direct.getvalue()), parsed(published.getvalue())
    assert a.pop("time")[:16] == b.pop("time")[:16]
    assert a.pop("responseTimeMs") < 1000 and b.pop("responseTimeMs") < 1000
    assert list(a) == list(b) and a == b
    assert a["path"] == "/up" and a["protocol"] == "HTTP/1.1" and a["error"] == "connection refused"
    assert "spliced" not in a


def test_text_format_shows_the_same_fields():
    out = io.StringIO()
    logRequest(Logger(observer=LogPublisher(makeObserver(LogConfig(format="text"), stdout=out))),
               _Exchange(), "web", "127.0.0.2")
    text = out.getvalue()
    assert " info  request " in text and "method=POST" in text and "path=/up " in text

