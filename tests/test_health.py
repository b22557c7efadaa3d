"""
Active health checks: the rise/fall machine, the timing of checks on a
L{Clock}, the built-in C{http} and C{tcp} kinds on L{StringTransport}, and
the plugin registry.  Nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import random
from collections import Counter
from types import MappingProxyType

import pytest
from hypothesis import given, strategies as st
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from txlb.balance.pool import Pool, Server, ServerState
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.config import HealthConfig
from txlb.health import (
    BUILTINS,
    JITTER,
    MAX_BODY,
    HealthChecks,
    RiseFall,
    healthCheckFactories,
    httpCheck,
    tcpCheck,
)
from txlb.health._checks import excerpt, hostHeader, jsonMismatch
from txlb.health.testing import CheckHarness, verifyHealthCheckFactory
from txlb.interfaces import (
    CheckResult,
    HealthCheckOptionsError,
    IHealthCheck,
    IHealthCheckFactory,
)
from txlb.net.endpoints import EndpointCache

UP, DOWN, CHECKING = ServerState.UP, ServerState.DOWN, ServerState.CHECKING


# The rise/fall machine.


def test_fall_after_consecutive_failures_with_the_last_detail():
    m = RiseFall(rise=2, fall=3)
    assert m.observe(UP, False, "HTTP 500") is None
    assert m.observe(UP, False, "HTTP 502") is None
    assert m.observe(UP, False, 'HTTP 503 {"status": "unhealthy", "database": "timeout"}') == (
        DOWN,
        '3 consecutive failures: HTTP 503 {"status": "unhealthy", "database": "timeout"}',
    )


def test_a_pass_resets_the_failures():
    m = RiseFall(rise=2, fall=3)
    for ok in (False, False, True, False, False):
        assert m.observe(UP, ok, "x") is None
    assert m.observe(UP, False, "x") == (DOWN, "3 consecutive failures: x")


def test_rise_after_consecutive_passes_and_a_failure_resets_them():
    m = RiseFall(rise=2, fall=3)
    assert m.observe(DOWN, True) is None
    assert m.observe(DOWN, False, "x") is None
    assert m.observe(DOWN, True) is None
    assert m.observe(DOWN, True) == (UP, "2 consecutive passes")


def test_rise_of_one_and_fall_of_one():
    m = RiseFall(rise=1, fall=1)
    assert m.observe(UP, False, "refused") == (DOWN, "1 consecutive failure: refused")
    assert m.observe(DOWN, True) == (UP, "1 consecutive pass")


def test_checking_server_joins_after_rise_or_is_reported_down_after_fall():
    m = RiseFall(rise=2, fall=2)
    assert m.observe(CHECKING, True) is None
    assert m.observe(CHECKING, True) == (UP, "2 consecutive passes")
    m = RiseFall(rise=2, fall=2)
    assert m.observe(CHECKING, False, "x") is None
    assert m.observe(CHECKING, False, "x") == (DOWN, "2 consecutive failures: x")


def test_no_move_reported_twice():
    m = RiseFall(rise=1, fall=1)
    assert m.observe(UP, True) is None
    assert m.observe(DOWN, False) is None


@given(st.integers(1, 5), st.integers(1, 5), st.lists(st.booleans(), max_size=60))
def test_machine_agrees_with_a_direct_reading_of_the_history(rise, fall, results):
    """
    Feeding results in order, the server is UP exactly when the last move
    the definition allows was up: it goes down at the fall-th failure of a
    run and up at the rise-th pass of a run.
    """
    m = RiseFall(rise, fall)
    state = UP
    for i, ok in enumerate(results):
        move = m.observe(state, ok, "d")
        run = 0
        for earlier in reversed(results[: i + 1]):
            if earlier != ok:
                break
            run += 1
        if ok:
            expected = UP if state is not UP and run >= rise else None
        else:
            expected = DOWN if state is not DOWN and run >= fall else None
        assert (move[0] if move else None) is expected
        if move:
            state = move[0]


# The service, on a Clock, with a check the test answers by hand.


@implementer(IHealthCheck)
class ManualCheck:
    """Every check waits for the test to answer it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Deferred, float]] = []
        self.cancelled: list[str] = []
        self.clock: Clock | None = None

    def check(self, server, endpoint, config) -> Deferred:
        d = Deferred(lambda _: self.cancelled.append(server.name))
        self.calls.append((server.name, d, self.clock.seconds()))
        return d

    def pending(self, name: str) -> list[Deferred]:
        return [d for n, d, _ in self.calls if n == name and not d.called]

    def answer(self, name: str, ok: bool, detail: str = "") -> None:
        (d,) = self.pending(name)
        d.callback(CheckResult(ok, detail))


@implementer(IHealthCheckFactory)
class ManualFactory:
    name = "manual"
    description = "answered by the test"

    def __init__(self) -> None:
        self.check = ManualCheck()
        self.options = None

    def __call__(self, options):
        self.options = options
        return self.check


def setUp(n=3, rise=2, fall=3, interval=1.0, timeout=0.5, seed=1, **options):
    clock = Clock()
    servers = [Server(f"s{i}", f"tcp:host=127.0.0.1:port={9000 + i}") for i in range(n)]
    pool = Pool("p", "round_robin", RoundRobin(), servers, clock)
    factory = ManualFactory()
    factory.check.clock = clock
    config = HealthConfig(
        kind="manual", interval=interval, timeout=timeout, rise=rise, fall=fall,
        options=MappingProxyType(options),
    )
    checks = HealthChecks(
        pool, config, EndpointCache(MemoryReactorClock()), clock,
        {"manual": factory}, random.Random(seed),
    )
    return checks, pool, servers, clock, factory.check, factory


@pytest.fixture
def events():
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []

    def observer(event):
        if "event" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def test_health_checks_provide_their_interfaces():
    for factory in BUILTINS:
        assert verifyObject(IHealthCheckFactory, factory)
        assert verifyObject(IHealthCheck, factory({}))
        verifyHealthCheckFactory(factory)


def test_verify_health_check_factory_catches_a_bad_factory():
    @implementer(IHealthCheckFactory)
    class NoName:
        name = ""
        description = "x"

        def __call__(self, options):
            return tcpCheck(options)

    with pytest.raises(AssertionError, match="name must be"):
        verifyHealthCheckFactory(NoName())

    @implementer(IHealthCheckFactory)
    class NotACheck(NoName):
        name = "x"

        def __call__(self, options):
            return object()

    with pytest.raises(Exception, match="IHealthCheck|not provide"):
        verifyHealthCheckFactory(NotACheck())


def test_options_reach_the_factory_and_pool_is_marked_checked():
    checks, pool, _, _, _, factory = setUp(depth=3)
    assert factory.options == {"depth": 3}
    assert not pool.checked
    checks.startService()
    assert pool.checked
    pool.add(Server("late", "tcp:host=127.0.0.1:port=9100"))
    assert pool.server("late").health is CHECKING


def test_kind_none_runs_nothing():
    clock = Clock()
    pool = Pool("p", "round_robin", RoundRobin(), [Server("a", "tcp:host=h:port=1")], clock)
    checks = HealthChecks(pool, HealthConfig(), EndpointCache(MemoryReactorClock()), clock, {})
    checks.startService()
    assert not pool.checked and not clock.getDelayedCalls()
    pool.add(Server("b", "tcp:host=h:port=2"))
    assert pool.server("b").health is UP and not clock.getDelayedCalls()
    checks.stopService()


def test_first_checks_are_spread_within_one_interval():
    checks, _, _, clock, check, _ = setUp(n=50, interval=2.0)
    checks.startService()
    assert check.calls == []
    firsts = sorted(call.getTime() for call in clock.getDelayedCalls())
    assert len(firsts) == 50
    assert all(0 <= t <= 2.0 for t in firsts)
    # Not in lockstep: spread over the interval, not bunched.
    assert firsts[-1] - firsts[0] > 1.5 and len(set(firsts)) == 50
    clock.advance(2.0)
    assert sorted(n for n, _, _ in check.calls) == sorted(f"s{i}" for i in range(50))


def test_later_checks_come_every_interval_within_the_jitter():
    checks, _, _, clock, check, _ = setUp(n=1, interval=1.0)
    checks.startService()
    starts = []
    for _ in range(40):
        clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        starts.append(clock.seconds())
        check.answer("s0", True)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(1 - JITTER - 1e-9 <= g <= 1 + JITTER + 1e-9 for g in gaps)
    assert max(gaps) - min(gaps) > JITTER  # there is jitter
    assert 0 <= starts[0] <= 1.0


def test_the_interval_counts_from_the_start_of_the_previous_check():
    checks, _, _, clock, check, _ = setUp(n=1, interval=1.0, timeout=0.9)
    checks.startService()
    clock.advance(1.0)
    (_, _, started) = check.calls[0]
    clock.advance(0.4)
    check.answer("s0", True)
    (next_,) = clock.getDelayedCalls()
    assert 1 - JITTER <= next_.getTime() - started <= 1 + JITTER


def test_a_hanging_check_is_never_stacked_and_times_out_as_a_failure():
    checks, pool, servers, clock, check, _ = setUp(n=1, fall=2, interval=1.0, timeout=0.5)
    checks.startService()
    clock.advance(1.0)
    assert len(check.calls) == 1
    clock.advance(0.49)
    assert len(check.pending("s0")) == 1 and clock.getDelayedCalls()  # the timeout only
    clock.advance(0.01)
    assert check.cancelled == ["s0"]
    assert checks.failed == 1 and servers[0].health is UP
    # Many intervals of hanging checks: one at a time, each cancelled.
    for _ in range(10):
        clock.advance(0.25)
        assert len(check.pending("s0")) <= 1
    assert len(check.calls) == len(check.cancelled) + len(check.pending("s0"))
    assert servers[0].health is DOWN


def test_timeout_reason_names_the_timeout(events):
    checks, _, servers, clock, check, _ = setUp(n=1, fall=1, interval=1.0, timeout=0.25)
    checks.startService()
    clock.advance(1.0)
    clock.advance(0.25)
    assert servers[0].health is DOWN
    (event,) = [e for e in events if e["event"] == "server_state"]
    assert event["reason"] == "1 consecutive failure: no answer within 250ms"
    assert (event["health"], event["action"]) == ("unhealthy", "removed_from_rotation")


def test_fall_then_rise_through_the_pool_with_events(events):
    checks, pool, servers, clock, check, _ = setUp(n=2, rise=2, fall=3, interval=1.0)
    checks.startService()

    def round_(ok_s0, detail=""):
        clock.advance(1.1)
        check.answer("s0", ok_s0, detail)
        if check.pending("s1"):
            check.answer("s1", True)

    body = 'HTTP 503 {"status": "unhealthy", "database": "timeout"}'
    round_(False, body)
    round_(False, body)
    assert servers[0].health is UP and servers[0] in pool.eligible()
    round_(False, body)
    assert servers[0].health is DOWN and pool.eligible() == [servers[1]]
    round_(True)
    assert servers[0].health is DOWN
    round_(True)
    assert servers[0].health is UP and servers[0] in pool.eligible()
    states = [e for e in events if e["event"] == "server_state"]
    assert [(e["server"], e["health"], e["action"], e["reason"]) for e in states] == [
        ("s0", "unhealthy", "removed_from_rotation", f"3 consecutive failures: {body}"),
        ("s0", "healthy", "added_to_rotation", "2 consecutive passes"),
    ]
    assert checks.passed > 0 and checks.failed == 3


def test_an_error_from_a_check_counts_as_a_failure_with_its_message():
    checks, _, servers, clock, check, _ = setUp(n=1, fall=1)
    checks.startService()
    clock.advance(1.0)
    (d,) = check.pending("s0")
    d.errback(Failure(error.ConnectionRefusedError()))
    assert servers[0].health is DOWN


def test_a_check_that_raises_counts_as_a_failure():
    checks, _, servers, clock, check, _ = setUp(n=1, fall=1)
    check.check = lambda *a: 1 / 0
    checks.startService()
    clock.advance(1.0)
    assert servers[0].health is DOWN and checks.failed == 1
    assert clock.getDelayedCalls()  # and checks go on


def test_synchronous_results_do_not_recurse():
    checks, _, servers, clock, check, _ = setUp(n=1, fall=1, interval=1.0, timeout=1.0)
    check.check = lambda *a: succeed(CheckResult(True, "ok"))
    checks.startService()
    clock.pump([0.5] * 20)
    assert 8 <= checks.passed <= 11


def test_added_server_is_checked_until_rise_then_joins(events):
    checks, pool, _, clock, check, _ = setUp(n=1, rise=2, interval=1.0)
    checks.startService()
    late = Server("late", "tcp:host=127.0.0.1:port=9100")
    pool.add(late)
    assert late in checks.checking and late not in pool.eligible()
    clock.advance(1.0)
    check.answer("late", True)
    assert late.health is CHECKING
    clock.advance(1.1)
    check.answer("late", True)
    assert late.health is UP and late in pool.eligible()
    added = [e for e in events if e["event"] == "server_added"]
    assert [(e["server"], e["healthCheck"], e["action"]) for e in added] == [
        ("late", "passed", "added_to_load_balancer_pool")
    ]


def test_added_server_that_fails_never_joins_and_is_reported_down(events):
    checks, pool, _, clock, check, _ = setUp(n=1, rise=2, fall=2, interval=1.0)
    checks.startService()
    late = Server("late", "tcp:host=127.0.0.1:port=9100")
    pool.add(late)
    for _ in range(6):
        clock.advance(1.1)
        check.answer("late", False, "HTTP 503")
        assert late not in pool.eligible()
    assert late.health is DOWN
    assert not [e for e in events if e["event"] == "server_added"]
    assert [e["reason"] for e in events if e["event"] == "server_state" and e["server"] == "late"] == [
        "2 consecutive failures: HTTP 503"
    ]


def test_removed_server_checker_stops_and_its_check_is_cancelled():
    checks, pool, servers, clock, check, _ = setUp(n=2, interval=1.0)
    checks.startService()
    clock.advance(1.0)
    assert check.pending("s1")
    pool.remove(servers[1])
    assert check.cancelled == ["s1"] and servers[1] not in checks.checking
    calls = len([c for c in check.calls if c[0] == "s1"])
    for _ in range(5):
        clock.advance(1.0)
        if check.pending("s0"):
            check.answer("s0", True)
    assert len([c for c in check.calls if c[0] == "s1"]) == calls
    assert servers[1].health is UP  # the cancelled check moved nothing


def test_stop_service_stops_timers_and_cancels_checks_in_flight():
    checks, pool, servers, clock, check, _ = setUp(n=20, interval=1.0, timeout=1.0)
    checks.startService()
    clock.advance(0.5)
    inFlight = {n for n, d, _ in check.calls if not d.called}
    assert inFlight and len(inFlight) < 20
    assert checks.stopService() is None
    assert set(check.cancelled) == inFlight
    assert clock.getDelayedCalls() == []
    assert not checks.checking
    clock.advance(10)
    assert len(check.calls) == len(inFlight)
    assert all(s.health is UP for s in servers)  # cancellation is not a failure
    pool.add(Server("late", "tcp:host=127.0.0.1:port=9100"))
    assert clock.getDelayedCalls() == []


def test_restart_after_stop_checks_again():
    checks, pool, servers, clock, check, _ = setUp(n=2, interval=1.0)
    checks.startService()
    checks.stopService()
    checks.startService()
    clock.advance(1.0)
    assert sorted(n for n, _, _ in check.calls) == ["s0", "s1"]


def test_a_thousand_servers_are_spread_and_cheap_to_schedule():
    """
    A thousand servers: starting schedules one timer each and runs no check
    at once; over one interval no slice of a tenth of it holds much more
    than a tenth of the checks.
    """
    checks, _, _, clock, check, _ = setUp(n=1000, interval=1.0, timeout=1.0, seed=7)
    checks.startService()
    assert check.calls == [] and len(clock.getDelayedCalls()) == 1000
    clock.pump([0.01] * 100)
    assert len(check.calls) == 1000 and not check.cancelled
    buckets = Counter(min(int(t * 10), 9) for _, _, t in check.calls)
    assert max(buckets.values()) < 150
    # The next round is spread as well.
    for name, d, _ in list(check.calls):
        d.callback(CheckResult(True, "ok"))
    nexts = sorted(c.getTime() for c in clock.getDelayedCalls())
    assert len(nexts) == 1000 and nexts[-1] - nexts[0] > 1.0


# The http check, on StringTransport.


def httpConfig(**kw) -> HealthConfig:
    kw.setdefault("kind", "http")
    if "expect_json" in kw:
        kw["expect_json"] = MappingProxyType({k: tuple(v) for k, v in kw["expect_json"].items()})
    return HealthConfig(**kw)


class Connection(CheckHarness):
    """The harness plugin authors get, with the built-in kinds' defaults."""

    def __init__(self, kind=httpCheck, config=None, address="tcp:host=10.0.0.5:port=8080", options=None):
        super().__init__(kind(options or {}), config or httpConfig(), address)

    def receive(self, data: bytes, close: bool = False):
        super().receive(data)
        if close:
            self.close()
        return self


def response(status: int, body: bytes = b"", headers: str = "", reason: str = "X") -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body
    )


def test_http_sends_one_request_with_host_and_connection_close():
    c = Connection(config=httpConfig(path="/ready?deep=1", method="GET")).connect()
    assert c.sent() == (
        b"GET /ready?deep=1 HTTP/1.1\r\nHost: 10.0.0.5:8080\r\nUser-Agent: txlb-health-check\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n"
    )
    assert c.results == []


def test_http_host_option_and_other_addresses():
    c = Connection(options={"host": "api.internal"}).connect()
    assert b"\r\nHost: api.internal\r\n" in c.transport.value()
    assert hostHeader("tcp:host=\\:\\:1:port=9001") == "[::1]:9001"
    assert hostHeader("unix:/run/app.sock") == "localhost"
    with pytest.raises(HealthCheckOptionsError, match="host must be"):
        httpCheck({"host": "a b"})
    with pytest.raises(HealthCheckOptionsError, match="unknown option port"):
        httpCheck({"port": 1})
    with pytest.raises(HealthCheckOptionsError, match="unknown option x for the tcp check"):
        tcpCheck({"x": 1})


def test_http_pass_on_expected_status_and_connection_closed():
    c = Connection(config=httpConfig(expect_status=(200, 204))).connect()
    c.receive(response(204))
    assert c.result == CheckResult(True, "HTTP 204")
    assert c.transport.disconnecting


def test_http_status_mismatch_quotes_the_body():
    c = Connection().connect()
    c.receive(response(503, b'{"status": "unhealthy",\n "database": "timeout"}'))
    assert c.result == CheckResult(False, 'HTTP 503 {"status": "unhealthy", "database": "timeout"}')


def test_http_status_mismatch_without_body():
    c = Connection().connect().receive(response(500))
    assert c.result == CheckResult(False, "HTTP 500")


def test_http_response_split_across_reads():
    data = response(200, b'{"status": "ready"}')
    c = Connection(config=httpConfig(expect_json={"status": ["ready"]})).connect()
    for i in range(len(data)):
        assert c.results == []
        c.receive(data[i : i + 1])
    assert c.result == CheckResult(True, "HTTP 200")


def test_http_chunked_and_close_delimited_bodies():
    c = Connection(config=httpConfig(expect_json={"status": ["ok"]})).connect()
    c.receive(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"sta\r\n")
    c.receive(b'b\r\ntus": "ok"}\r\n0\r\n\r\n')
    assert c.result == CheckResult(True, "HTTP 200")
    c = Connection(config=httpConfig(expect_json={"status": ["ok"]})).connect()
    c.receive(b'HTTP/1.0 200 OK\r\n\r\n{"status": "ok"}', close=True)
    assert c.result == CheckResult(True, "HTTP 200")


def test_expect_json_match_any_accepted_value_and_several_fields():
    config = httpConfig(expect_json={"status": ["healthy", "ready", "ok"], "db": [True]})
    c = Connection(config=config).connect()
    c.receive(response(200, b'{"status": "ok", "db": true, "extra": 1}'))
    assert c.result.ok


def test_expect_json_keeps_out_a_healthy_server_when_ready_is_required():
    c = Connection(config=httpConfig(expect_json={"status": ["ready"]})).connect()
    c.receive(response(200, b'{"status": "healthy"}'))
    assert c.result == CheckResult(
        False, 'HTTP 200 status = "healthy", expected one of ["ready"]: {"status": "healthy"}'
    )


@pytest.mark.parametrize(
    "body, why",
    [
        (b"OK", "body is not JSON"),
        (b"[1, 2]", "body is not a JSON object"),
        (b'{"other": 1}', "no field 'status'"),
        (b'{"status": 1}', 'status = 1, expected one of ["ok", true]'),
        (b'{"status": "OK"}', 'status = "OK", expected one of ["ok", true]'),
        (b"\xff\xfe", "body is not JSON"),
    ],
)
def test_expect_json_mismatches(body, why):
    assert jsonMismatch(body, {"status": ("ok", True)}) == why
    c = Connection(config=httpConfig(expect_json={"status": ["ok", True]})).connect()
    c.receive(response(200, body))
    assert not c.result.ok and c.result.detail.startswith(f"HTTP 200 {why}")


def test_json_true_is_not_one():
    assert jsonMismatch(b'{"up": 1}', {"up": (True,)}) is not None
    assert jsonMismatch(b'{"up": true}', {"up": (1,)}) is not None
    assert jsonMismatch(b'{"n": 1.0}', {"n": (1,)}) is None


def test_oversized_body_reads_no_more_than_the_limit():
    c = Connection(config=httpConfig(expect_json={"status": ["ok"]})).connect()
    big = b'{"status": "ok", "pad": "' + b"x" * (MAX_BODY * 2) + b'"}'
    c.receive(response(200, big)[: MAX_BODY + 500])
    assert not c.result.ok
    assert c.result.detail.startswith("HTTP 200 body larger than 64 KiB: {")
    assert len(c.result.detail) < 300
    assert len(c.protocol._wrappedProtocol.body) == MAX_BODY
    assert c.transport.disconnecting
    c.receive(b"x" * 1000)  # more after the verdict changes nothing
    assert len(c.results) == 1


def test_oversized_body_is_fine_when_only_the_status_matters():
    c = Connection().connect()
    c.receive(response(200, b"x" * (MAX_BODY + 10)))
    assert c.result == CheckResult(True, "HTTP 200")


def test_head_request_is_judged_on_the_head():
    c = Connection(config=httpConfig(method="HEAD")).connect()
    assert c.transport.value().startswith(b"HEAD /health HTTP/1.1\r\n")
    c.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert c.result == CheckResult(True, "HTTP 200")


def test_interim_100_response_is_skipped():
    c = Connection().connect()
    c.receive(b"HTTP/1.1 100 Continue\r\n\r\n" + response(200))
    assert c.result == CheckResult(True, "HTTP 200")


def test_malformed_or_truncated_responses_fail():
    c = Connection().connect().receive(b"SMTP ready\r\n\r\n")
    assert not c.result.ok and c.result.detail.startswith("malformed response")
    c = Connection().connect().receive(b"HTTP/1.1 200 OK\r\n", close=True)
    assert isinstance(c.result, Failure) and c.result.check(error.ConnectionDone)
    c = Connection().connect().receive(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024))
    assert c.result == CheckResult(False, "response head too large")


def test_connection_refused_fails_the_check():
    c = Connection().refuse()
    assert isinstance(c.result, Failure) and c.result.check(error.ConnectionRefusedError)


def test_cancel_before_connecting_stops_the_attempt():
    c = Connection().cancel()
    assert c.stoppedConnecting
    assert isinstance(c.result, Failure)


def test_cancel_while_connected_aborts_the_connection():
    c = Connection().connect().cancel()
    assert isinstance(c.result, Failure)
    assert c.closed
    c.receive(response(200))  # a late answer is ignored
    assert len(c.results) == 1


def test_excerpt_is_one_short_line():
    assert excerpt(b"a\n  b\r\n\tc") == "a b c"
    long = excerpt(b"y" * 1000)
    assert len(long) == 120 and long.endswith("\u2026")


# The tcp check.


def test_tcp_passes_on_connect_and_closes():
    c = Connection(kind=tcpCheck).connect()
    assert c.result == CheckResult(True, "connected")
    assert c.transport.disconnecting and c.transport.value() == b""


def test_tcp_fails_on_refusal():
    c = Connection(kind=tcpCheck).refuse()
    assert isinstance(c.result, Failure)


# The whole chain: HealthChecks with the real http check on a memory reactor.


def test_http_checks_through_health_checks_move_the_server(events):
    reactor = MemoryReactorClock()
    server = Server("api-1", "tcp:host=127.0.0.1:port=9001")
    pool = Pool("api", "round_robin", RoundRobin(), [server], reactor)
    config = httpConfig(interval=1.0, timeout=0.5, fall=2, rise=1)
    checks = HealthChecks(pool, config, EndpointCache(reactor), reactor, healthCheckFactories(), random.Random(3))
    checks.startService()

    def answer(data):
        reactor.advance(1.1)
        factory = reactor.tcpClients[-1][2]
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        assert transport.value().startswith(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n")
        protocol.dataReceived(data)
        protocol.connectionLost(Failure(error.ConnectionDone()))

    answer(response(503, b"db down"))
    answer(response(503, b"db down"))
    assert server.health is DOWN
    answer(response(200, b"ok"))
    assert server.health is UP
    reasons = [e["reason"] for e in events if e["event"] == "server_state"]
    assert reasons == ["2 consecutive failures: HTTP 503 db down", "1 consecutive pass"]
    checks.stopService()


def test_connection_refused_reason(events):
    reactor = MemoryReactorClock()
    server = Server("api-1", "tcp:host=127.0.0.1:port=9001")
    pool = Pool("api", "round_robin", RoundRobin(), [server], reactor)
    checks = HealthChecks(pool, httpConfig(kind="tcp", fall=1), EndpointCache(reactor), reactor, healthCheckFactories())
    checks.startService()
    reactor.advance(2.0)
    reactor.tcpClients[0][2].clientConnectionFailed(reactor.connectors[0], Failure(error.ConnectionRefusedError()))
    assert [e["reason"] for e in events if e["event"] == "server_state"] == ["1 consecutive failure: connection refused"]


# The registry.


def test_registry_has_the_builtins():
    factories = healthCheckFactories()
    assert factories["http"] is httpCheck and factories["tcp"] is tcpCheck
    assert "none" not in factories


def test_unknown_kind_is_a_key_error():
    clock = Clock()
    pool = Pool("p", "round_robin", RoundRobin(), [], clock)
    with pytest.raises(KeyError):
        HealthChecks(pool, HealthConfig(kind="nope"), EndpointCache(clock), clock, healthCheckFactories())


# docs/health.md: the example plugin it shows is the file the integration
# tests install, and the tests it shows pass.

from tests.support import ROOT, DocExample  # noqa: E402

EXAMPLE = DocExample(
    ROOT / "docs" / "health.md",
    ROOT / "tests" / "health_plugin_example" / "twisted" / "plugins" / "txlb_send_expect.py",
)


def test_doc_shows_the_tested_plugin_verbatim():
    EXAMPLE.checkShownVerbatim()


def test_example_plugin_has_no_package_markers():
    EXAMPLE.checkNamespaceDirectories()


@pytest.mark.parametrize("name, test", EXAMPLE.tests("sendExpect"), ids=lambda v: v if isinstance(v, str) else "")
def test_doc_tests_pass(name, test):
    test()


def test_doc_tests_exist():
    assert len(EXAMPLE.tests("sendExpect")) == 5


def test_example_refuses_bad_options():
    sendExpect = EXAMPLE.load().sendExpect
    with pytest.raises(HealthCheckOptionsError, match="expect must be a non-empty string"):
        sendExpect({"send": "PING\r\n"})
    with pytest.raises(HealthCheckOptionsError, match="unknown option port"):
        sendExpect({"expect": "+PONG", "port": 1})


def test_example_runs_under_health_checks():
    """The plugin's check, driven by HealthChecks on a memory reactor."""
    reactor = MemoryReactorClock()
    server = Server("cache-1", "tcp:host=127.0.0.1:port=6379")
    pool = Pool("cache", "round_robin", RoundRobin(), [server], reactor)
    config = HealthConfig(kind="send_expect", interval=1.0, timeout=0.5, fall=1, rise=1,
                          options=MappingProxyType({"send": "PING\r\n", "expect": "+PONG"}))
    factories = {"send_expect": EXAMPLE.load().sendExpect}
    checks = HealthChecks(pool, config, EndpointCache(reactor), reactor, factories)
    checks.startService()
    reactor.advance(1.0)
    protocol = reactor.tcpClients[-1][2].buildProtocol(None)
    protocol.makeConnection(StringTransport())
    reactor.advance(0.5)  # no answer: timed out, connection aborted
    assert server.health is DOWN and protocol.transport.disconnecting
    reactor.advance(0.6)
    transport = StringTransport()
    protocol = reactor.tcpClients[-1][2].buildProtocol(None)
    protocol.makeConnection(transport)
    assert transport.value() == b"PING\r\n"
    protocol.dataReceived(b"+PONG\r\n")
    assert server.health is UP
    checks.stopService()


def test_a_check_answering_something_else_fails_and_checks_go_on():
    checks, _, servers, clock, check, _ = setUp(n=1, fall=1)
    check.check = lambda *a: succeed(True)
    checks.startService()
    clock.advance(1.0)
    assert servers[0].health is DOWN and checks.failed == 1
    clock.advance(1.1)
    assert checks.failed == 2


def test_an_error_while_judging_is_logged_and_checks_go_on(events):
    checks, pool, servers, clock, check, _ = setUp(n=1, fall=1)
    check.check = lambda *a: succeed(CheckResult(False, "x"))
    pool.setHealth = lambda *a: 1 / 0
    checks.startService()
    clock.advance(1.0)
    assert checks.failed == 1 and clock.getDelayedCalls()
    clock.advance(1.1)
    assert checks.failed == 2


def test_turning_checks_off_brings_every_server_back(events):
    """As a reload from kind http to kind none would: stop one, start the other."""
    checks, pool, servers, clock, check, factory = setUp(n=2, fall=1)
    checks.startService()
    late = Server("late", "tcp:host=127.0.0.1:port=9100")
    pool.add(late)
    clock.advance(1.0)
    check.answer("s0", False, "HTTP 500")
    checks.stopService()
    assert (servers[0].health, late.health) == (DOWN, CHECKING)
    off = HealthChecks(pool, HealthConfig(), EndpointCache(MemoryReactorClock()), clock, {})
    off.startService()
    assert not pool.checked and pool.eligible() == [*servers, late]
    assert [e["reason"] for e in events if e["event"] == "server_state" and e["health"] == "healthy"] == [
        "health checks are off", "health checks are off"
    ]
    assert not clock.getDelayedCalls()


# TLS options of the built-in kinds (the handshakes themselves are tested on
# loopback in test_integration_health).


def test_tls_options_are_checked(tmp_path):
    from txlb.health._tls import tlsOptions

    assert tlsOptions({}) is None
    with pytest.raises(HealthCheckOptionsError, match="tls must be true or false"):
        tcpCheck({"tls": "yes"})
    with pytest.raises(HealthCheckOptionsError, match="ca, verify only apply with tls = true"):
        httpCheck({"verify": False, "ca": "x.pem"})
    with pytest.raises(HealthCheckOptionsError, match="verify must be true or false"):
        tcpCheck({"tls": True, "verify": 1})
    with pytest.raises(HealthCheckOptionsError, match="server_name must be a host name"):
        tcpCheck({"tls": True, "server_name": ""})
    missing = tmp_path / "missing.pem"
    with pytest.raises(HealthCheckOptionsError, match="ca: cannot read a PEM certificate from .*missing.pem"):
        tcpCheck({"tls": True, "ca": str(missing)})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(HealthCheckOptionsError, match="ca: cannot read"):
        httpCheck({"tls": True, "ca": str(garbage)})


def test_tls_connection_creators_are_made_once_per_name():
    from txlb.health._tls import tlsOptions

    tls = tlsOptions({"tls": True, "verify": False})
    reactor = MemoryReactorClock()
    endpoint = clientFromString(reactor, "tcp:host=127.0.0.1:port=1")
    tls.wrap(endpoint, "10.0.0.1")
    first = tls._creators["10.0.0.1"]
    tls.wrap(endpoint, "10.0.0.1")
    assert tls._creators == {"10.0.0.1": first}
    named = tlsOptions({"tls": True, "server_name": "api.internal"})
    named.wrap(endpoint, "10.0.0.1")
    named.wrap(endpoint, "10.0.0.2")
    assert list(named._creators) == ["api.internal"]


def test_tls_tcp_check_waits_for_the_handshake():
    check = tcpCheck({"tls": True, "verify": False})
    h = CheckHarness(check, address="tcp:host=127.0.0.1:port=1")
    h.connect()  # TCP is up, the TLS handshake has only begun
    assert h.result is None
    assert h.sent()  # a ClientHello
    h.close()
    assert h.result == CheckResult(False, "connection closed during the TLS handshake")
