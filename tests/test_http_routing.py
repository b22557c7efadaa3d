"""
Routing (L{txlb.http.routing}): routes in order, first match wins, the
service's pool otherwise.
"""

from __future__ import annotations

from hypothesis import given, strategies as st

from txlb.http.routing import Route, Router, hostOf


def test_no_routes_is_the_default_pool():
    assert Router("web").pool(b"a", b"/x", b"GET", []) == "web"


def test_first_match_wins_and_default_otherwise():
    router = Router("web", [Route("api", path_prefix="/api/"), Route("all-get", methods=frozenset({b"GET"}))])
    assert router.pool(b"a", b"/api/x", b"GET", []) == "api"
    assert router.pool(b"a", b"/other", b"GET", []) == "all-get"
    assert router.pool(b"a", b"/other", b"POST", []) == "web"


def test_path_prefix_ignores_the_query_and_is_a_prefix_not_a_substring():
    router = Router("web", [Route("api", path_prefix="/api/")])
    assert router.pool(b"a", b"/api/?x=1", b"GET", []) == "api"
    assert router.pool(b"a", b"/apix", b"GET", []) == "web"
    assert router.pool(b"a", b"/x?next=/api/", b"GET", []) == "web"
    assert router.pool(b"a", b"/v1/api/", b"GET", []) == "web"


def test_host_exact_and_glob_without_case_or_port():
    router = Router("web", [Route("shop", host="shop.*"), Route("any-example", host="*.example.com"),
                            Route("exact", host="Exact.Host")])
    assert router.pool(b"SHOP.example.org:8080", b"/", b"GET", []) == "shop"
    assert router.pool(b"www.example.com", b"/", b"GET", []) == "any-example"
    assert router.pool(b"example.com", b"/", b"GET", []) == "web"
    assert router.pool(b"exact.host", b"/", b"GET", []) == "exact"
    assert router.pool(b"exact.host.evil", b"/", b"GET", []) == "web"
    assert router.pool(b"myshop.example", b"/", b"GET", []) == "web"
    assert router.pool(None, b"/", b"GET", []) == "web"


def test_headers_must_all_match_exactly_with_names_without_case():
    router = Router("web", [Route("blue", headers={b"x-tenant": b"blue", b"x-env": b"prod"})])
    assert router.pool(b"a", b"/", b"GET", [(b"X-Tenant", b"blue"), (b"X-ENV", b"prod")]) == "blue"
    assert router.pool(b"a", b"/", b"GET", [(b"X-Tenant", b"blue")]) == "web"
    assert router.pool(b"a", b"/", b"GET", [(b"X-Tenant", b"Blue"), (b"X-Env", b"prod")]) == "web"
    assert router.pool(b"a", b"/", b"GET", [(b"X-Tenant", b"green"), (b"X-Tenant", b"blue"),
                                            (b"X-Env", b"prod")]) == "blue"


def test_every_condition_of_a_route_must_hold():
    router = Router("web", [Route("r", host="h", path_prefix="/p", methods=frozenset({b"POST"}),
                                  headers={b"x": b"1"})])
    good = (b"h", b"/p/1", b"POST", [(b"X", b"1")])
    assert router.pool(*good) == "r"
    for i, bad in enumerate([b"other", b"/q", b"GET", [(b"X", b"2")]]):
        args = list(good)
        args[i] = bad
        assert router.pool(*args) == "web"


def test_methods_are_case_sensitive():
    router = Router("web", [Route("r", methods=frozenset({b"GET"}))])
    assert router.pool(b"a", b"/", b"get", []) == "web"


def test_host_of():
    assert hostOf(b"Example.COM:8080") == b"example.com"
    assert hostOf(b"[::1]:8080") == b"[::1]"
    assert hostOf(b"[::1]") == b"[::1]"
    assert hostOf(b"") == b"" and hostOf(None) == b""


LABEL = st.text("abcdefghij0123456789-", min_size=1, max_size=8)


@given(st.lists(LABEL, min_size=1, max_size=4), st.integers(1, 65535), st.booleans())
def test_exact_host_route_matches_any_port_and_case(labels, port, upper):
    host = ".".join(labels)
    router = Router("web", [Route("r", host=host)])
    sent = (host.upper() if upper else host).encode() + b":%d" % port
    assert router.pool(sent, b"/", b"GET", []) == "r"
    assert router.pool(b"x" + sent, b"/", b"GET", []) == "web"


@given(st.lists(st.tuples(st.sampled_from(["/a", "/a/b", "/b", "/"]), st.sampled_from(["p0", "p1", "p2"])),
                max_size=5),
       st.sampled_from([b"/a", b"/a/b/c", b"/b?x", b"/c", b"/"]))
def test_the_first_matching_route_wins(routes, path):
    router = Router("default", [Route(pool, path_prefix=prefix) for prefix, pool in routes])
    bare = path.split(b"?")[0]
    expected = next((pool for prefix, pool in routes if bare.startswith(prefix.encode())), "default")
    assert router.pool(b"h", path, b"GET", []) == expected
