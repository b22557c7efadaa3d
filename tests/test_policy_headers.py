"""
Header rules (L{txlb.policy.headers}): the checks that keep them from
smuggling, templates, how a service's and a route's rules combine, and
what the proxy's head writers do with them (on their own, with generated
rules, and through the proxy on a memory reactor).
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, strategies as st

from tests.test_http_frontend import Harness, head
from txlb.config import HeaderOps, HeaderRules
from txlb.http.headers import requestHead, responseHead
from txlb.http.routing import Route, Router
from txlb.policy.headers import FRAMING, RuleError, Template, checkName, compileRules, compileSide, variables

# Names and values.


@pytest.mark.parametrize("name", sorted(n.decode() for n in FRAMING) + ["Content-Length", "TRANSFER-ENCODING"])
@pytest.mark.parametrize("side", ["request", "response"])
@pytest.mark.parametrize("op", ["set", "add", "remove"])
def test_framing_and_hop_by_hop_headers_cannot_be_named(name, side, op):
    with pytest.raises(RuleError, match="txlb writes it itself"):
        checkName(name, side, op)


@pytest.mark.parametrize("name", ["Bad Name", "X:Y", "", "X\r\nY", "Ä"])
def test_names_must_be_tokens(name):
    with pytest.raises(RuleError, match="not a header name"):
        checkName(name, "request", "set")


def test_host_can_be_set_on_requests_but_not_added_or_removed():
    assert checkName("Host", "request", "set") == b"host"
    for op in ("add", "remove"):
        with pytest.raises(RuleError, match="exactly one Host"):
            checkName("host", "request", op)
    assert checkName("Host", "response", "add") == b"host"


def test_content_encoding_is_compress_business():
    with pytest.raises(RuleError, match="use compress"):
        checkName("Content-Encoding", "response", "remove")
    assert checkName("Content-Encoding", "request", "remove") == b"content-encoding"


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\x00b", "\x7f", "\x01", "é", "a\r\nX-Injected: 1"])
def test_values_with_control_or_non_ascii_characters_are_refused(bad):
    with pytest.raises(RuleError, match="only printable ASCII"):
        Template(bad)


def test_templates():
    t = Template("for ${client_ip} id=${request_id} via ${service}/${server} costs $$5")
    assert not t.constant
    assert t.render([b"10.0.0.1", b"r-1", b"web", b"s1"]) == b"for 10.0.0.1 id=r-1 via web/s1 costs $5"
    assert Template("plain\tvalue").constant and Template("plain\tvalue").render(()) == b"plain\tvalue"
    assert Template("").render(()) == b""
    with pytest.raises(RuleError, match=r"unknown variable \$\{host\}.*\$\{client_ip\}"):
        Template("${host}")


def test_variables_are_safe_to_send():
    assert variables("10.0.0.1", "r-1", "web", "s1") == (b"10.0.0.1", b"r-1", b"web", b"s1")
    assert variables("::1", "r-1", "web", None)[3] == b""
    client = variables("odd\r\npeer", "r", "web", None)[0]
    assert b"\r" not in client and b"\n" not in client


# Combining rules.


def ops(set=(), add=(), remove=()):
    return HeaderOps(set=tuple(set), add=tuple(add), remove=tuple(remove))


def test_nothing_to_do_compiles_to_none():
    assert compileRules() is None
    assert compileRules(None, HeaderRules()) is None
    assert compileRules(HeaderRules(request=ops())) is None
    policy = compileRules(HeaderRules(response=ops(remove=["Server"])))
    assert policy.request is None and policy.response.drop == {b"server"}


def test_within_one_table_remove_then_set_then_add():
    side = compileSide([ops(set=[("X-A", "1")], add=[("X-A", "2"), ("X-B", "3")], remove=["X-A", "X-C"])])
    assert side.drop == {b"x-a", b"x-c"}
    assert side.lines(()) == [b"X-A: 1", b"X-A: 2", b"X-B: 3"]


def test_a_later_table_works_on_what_the_earlier_left():
    service = ops(set=[("X-Env", "prod"), ("X-Keep", "k")], add=[("X-Tag", "a")])
    route = ops(set=[("x-env", "staging")], remove=["X-Tag"], add=[("X-Route", "r")])
    side = compileSide([service, route])
    assert side.lines(()) == [b"X-Keep: k", b"x-env: staging", b"X-Route: r"]
    assert side.drop == {b"x-env", b"x-keep", b"x-tag"}


def test_lines_are_a_fresh_list_each_time():
    side = compileSide([ops(set=[("X-A", "1")])])
    side.lines(()).append(b"junk")
    assert side.lines(()) == [b"X-A: 1"]


# The head writers.


def parseRequest(data: bytes) -> tuple[h11.Request, list[tuple[bytes, bytes]]]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return event, list(event.headers)


def parseResponse(data: bytes) -> list[tuple[bytes, bytes]]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Response), event
    return list(event.headers)


def forward(headers, rules, host=b"a.example", values=(b"10.0.0.1", b"rid-1", b"web", b"s1")) -> bytes:
    return requestHead(b"GET", b"/p", headers, client="10.0.0.1", host=host, proto=b"http", requestId="rid-1",
                       framing=None, rules=rules, values=values)


def test_request_rules_apply_after_txlb_own_headers():
    rules = compileSide([ops(set=[("X-Forwarded-Proto", "https"), ("Host", "backend.internal"),
                                  ("X-Who", "${client_ip} ${server}")],
                             add=[("Accept", "text/plain")], remove=["X-Debug", "X-Forwarded-For"])])
    data = forward([(b"Host", b"a.example"), (b"X-Debug", b"1"), (b"Accept", b"*/*"),
                    (b"X-Forwarded-For", b"1.1.1.1")], rules)
    _, fields = parseRequest(data)
    assert (b"host", b"backend.internal") in fields and [n for n, _ in fields].count(b"host") == 1
    assert (b"x-forwarded-proto", b"https") in fields and (b"x-forwarded-proto", b"http") not in fields
    assert b"x-forwarded-for" not in dict(fields) and b"x-debug" not in dict(fields)
    assert [v for n, v in fields if n == b"accept"] == [b"*/*", b"text/plain"]
    assert (b"x-who", b"10.0.0.1 s1") in fields
    assert (b"x-forwarded-host", b"a.example") in fields and (b"x-request-id", b"rid-1") in fields


def test_a_set_host_stands_in_for_the_blank_one_of_an_http10_request():
    rules = compileSide([ops(set=[("Host", "backend.internal")])])
    _, fields = parseRequest(forward([], rules, host=None))
    assert [v for n, v in fields if n == b"host"] == [b"backend.internal"]


def test_response_rules_apply_after_txlb_own_headers():
    rules = compileSide([ops(set=[("Strict-Transport-Security", "max-age=1")], remove=["Server", "X-Cache"],
                             add=[("X-Served-By", "${server}")])])
    data = responseHead(200, b"OK", [(b"Server", b"app/1"), (b"Content-Type", b"text/plain")], requestId="rid-1",
                        framing=b"Content-Length: 0", close=False, extra=(b"X-Cache: HIT",), rules=rules,
                        values=variables("10.0.0.1", "rid-1", "web", "s2"))
    fields = parseResponse(data)
    assert b"server" not in dict(fields) and b"x-cache" not in dict(fields)
    assert (b"strict-transport-security", b"max-age=1") in fields and (b"x-served-by", b"s2") in fields
    assert (b"x-request-id", b"rid-1") in fields and (b"content-length", b"0") in fields



def test_rules_that_take_out_txlb_own_lines_do_so_on_every_head_they_write():
    """The sift set and own names are worked out once per head writer: each writer gets its own."""
    rules = compileSide([ops(set=[("X-Request-ID", "mine")], remove=["Forwarded", "X-Forwarded-Host"])])
    for forwarded in (False, True, False, True):
        data = requestHead(b"GET", b"/p", [(b"Host", b"a.example"), (b"Forwarded", b"for=1.1.1.1")],
                           client="10.0.0.1", host=b"a.example", proto=b"http", requestId="rid-1", framing=None,
                           forwarded=forwarded, rules=rules)
        _, fields = parseRequest(data)
        assert [v for n, v in fields if n == b"x-request-id"] == [b"mine"]
        assert b"forwarded" not in dict(fields) and b"x-forwarded-host" not in dict(fields)
        assert dict(fields)[b"x-forwarded-for"] == b"10.0.0.1"
        fields = parseResponse(responseHead(200, b"OK", [(b"X-Request-ID", b"theirs")], requestId="rid-1",
                                            framing=b"Content-Length: 0", close=False, extra=(b"Forwarded: x",),
                                            rules=rules))
        assert [v for n, v in fields if n == b"x-request-id"] == [b"mine"] and b"forwarded" not in dict(fields)


TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~", min_size=1,
                max_size=8).filter(lambda n: n.lower().encode() not in FRAMING and n.lower() != "host")
VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=12).map(
    lambda v: v.replace("$", "$$").strip())
OPS = st.builds(ops, set=st.lists(st.tuples(TOKEN, VALUE), max_size=3, unique_by=lambda p: p[0].lower()),
                add=st.lists(st.tuples(TOKEN, VALUE), max_size=3), remove=st.lists(TOKEN, max_size=3))
CLIENT_HEADERS = st.lists(st.tuples(TOKEN.map(str.encode), VALUE.map(str.encode)), max_size=6)


@given(st.lists(OPS, min_size=1, max_size=2), CLIENT_HEADERS)
def test_any_valid_rules_give_a_head_that_parses_one_way_with_one_host(tables, headers):
    rules = compileSide(tables)
    data = forward([(b"Host", b"a.example"), *headers], rules)
    _, fields = parseRequest(data)
    names = [n for n, _ in fields]
    assert names.count(b"host") == 1
    assert not {b"transfer-encoding", b"content-length", b"connection"} & set(names)
    if rules is not None:
        expected = [line.split(b": ", 1)[0].lower() for line in rules.lines(())]
        # What the rules dropped is there only as the rules wrote it.
        for name in rules.drop:
            assert names.count(name) == expected.count(name)


# Through the proxy.

OK = b"HTTP/1.1 200 OK\r\nServer: app\r\nContent-Length: 2\r\n\r\nok"


def policyRouter(service: HeaderRules, route: HeaderRules) -> Router:
    return Router("p", [Route("p", path_prefix="/r/", rules=compileRules(service, route))],
                  rules=compileRules(service))


def test_the_proxy_applies_the_service_rules_and_a_route_s_after_them():
    service = HeaderRules(request=ops(set=[("X-Env", "prod")], remove=["X-Debug"]),
                          response=ops(remove=["Server"], add=[("X-Via", "${service} ${server}")]))
    route = HeaderRules(request=ops(set=[("X-Env", "route")]), response=ops(add=[("X-Route", "r")]))
    h = Harness(servers=1)
    h.service.update(router=policyRouter(service, route))
    frontend, client = h.accept()
    frontend.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\nX-Debug: 1\r\n\r\n")
    backend, server = h.answer()
    _, sent = head(server.value())
    assert sent[b"x-env"] == [b"prod"] and b"x-debug" not in sent
    backend.dataReceived(OK)
    _, got = head(client.value())
    assert b"server" not in got and got[b"x-via"] == [b"web s0"] and b"x-route" not in got
    client.clear()
    server.clear()
    frontend.dataReceived(b"GET /r/x HTTP/1.1\r\nHost: a\r\n\r\n")
    _, sent = head(server.value())
    assert sent[b"x-env"] == [b"route"]
    backend.dataReceived(OK)
    _, got = head(client.value())
    assert got[b"x-route"] == [b"r"] and got[b"x-via"] == [b"web s0"]


def test_a_reload_changes_the_rules_of_the_next_request():
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(OK)
    assert b"x-env" not in head(server.value())[1]
    h.service.update(router=Router("p", rules=compileRules(HeaderRules(request=ops(set=[("X-Env", "new")])))))
    server.clear()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head(server.value())[1][b"x-env"] == [b"new"]
