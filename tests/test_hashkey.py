from txlb.balance.hashkey import hashKeyOf

HEADERS = [(b"Host", b"a"), (b"X-User", b"alice"), (b"Cookie", b"theme=dark; SESSIONID=abc123")]


def test_client_ip_is_the_default():
    assert hashKeyOf("client_ip", b"/x", HEADERS) is None


def test_path_without_query():
    assert hashKeyOf("path", b"/cart/items?page=2", HEADERS) == "/cart/items"


def test_header_is_case_insensitive():
    assert hashKeyOf("header:x-user", b"/", HEADERS) == "alice"
    assert hashKeyOf("header:X-Missing", b"/", HEADERS) is None


def test_cookie():
    assert hashKeyOf("cookie:SESSIONID", b"/", HEADERS) == "abc123"
    assert hashKeyOf("cookie:session", b"/", HEADERS) is None


def test_query():
    assert hashKeyOf("query:user", b"/p?a=1&user=bob", HEADERS) == "bob"
    assert hashKeyOf("query:user", b"/p", HEADERS) is None
