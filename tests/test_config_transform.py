"""
The config's C{headers}, C{redirect} and C{compress} (L{txlb.config._transform}):
what a good file gives, every bad value reported at its key path and
line, and the lines C{--check}'s summary prints.
"""

from __future__ import annotations

from tests.test_config import problems, toml
from txlb.config import (
    CompressConfig,
    HeaderOps,
    HeaderRules,
    RedirectConfig,
    describeTransforms,
    parse,
)
from txlb.http.compress import CODINGS, DEFAULT_TYPES
from txlb.tap import summary

POOL = '[pools.api]\nservers = [{ name = "a", address = "127.0.0.1:9001" }]\n'


def web(extra: str = "", routes: str = "") -> str:
    return (POOL + '[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:8080"\npool = "api"\n'
            + extra + "\n" + routes)


def test_a_service_and_its_routes():
    config = parse(web(
        'headers = { request = { set = { "X-Env" = "prod" }, remove = ["X-Debug"] }, '
        'response = { add = { "X-Served-By" = "${server}" }, remove = "Server" } }\n'
        'compress = { types = ["Text/*", "application/json"], min_size = "2KiB", level = 4 }\n',
        '[[services.routes]]\nhost = "old.example.com"\nredirect = { host = "new.example.com", status = 301 }\n'
        '[[services.routes]]\npath_prefix = "/old/"\nredirect = { scheme = "https", path_prefix = "/new/" }\n'
        '[[services.routes]]\npath_prefix = "/x/"\npool = "api"\ncompress = { level = 1 }\n'
        'headers = { "X-Tenant" = "blue", request = { add = { "X-Route" = "x" } } }\n'))
    [service] = config.services
    assert service.header_rules == HeaderRules(
        request=HeaderOps(set=(("X-Env", "prod"),), remove=("X-Debug",)),
        response=HeaderOps(add=(("X-Served-By", "${server}"),), remove=("Server",)))
    assert service.compress == CompressConfig(("text/*", "application/json"), 2048, 4)
    old, moved, x = service.routes
    assert (old.pool, old.redirect) == (None, RedirectConfig(301, host="new.example.com"))
    assert moved.redirect == RedirectConfig(302, scheme="https", path_prefix="/new/")
    assert x.pool == "api" and x.headers == {"X-Tenant": "blue"}
    assert x.header_rules == HeaderRules(request=HeaderOps(add=(("X-Route", "x"),)))
    assert x.compress == CompressConfig(DEFAULT_TYPES, 1024, 1)
    assert old.header_rules is None and old.compress is None
    assert describeTransforms(service) == [
        "request headers: remove X-Debug; set X-Env",
        "response headers: remove Server; add X-Served-By",
        f"compress: {CODINGS} level 4, text/*, application/json, from 2048 bytes",
        "routes[0] redirect 301: host new.example.com (the rest of the URL kept)",
        "routes[1] redirect 302: scheme https, path_prefix /new/ (the rest of the URL kept)",
        "routes[2] request headers: add X-Route",
        f"routes[2] compress: {CODINGS} level 1, {', '.join(DEFAULT_TYPES)}, from 1024 bytes",
    ]
    lines = summary(config)
    assert lines[1:3] == ["  request headers: remove X-Debug; set X-Env",
                          "  response headers: remove Server; add X-Served-By"]


def test_smuggling_values_and_names_are_refused_where_written():
    assert problems(web(
        'headers.request.set = { "X-A" = "a\\r\\nX-B: b", "Transfer-Encoding" = "chunked", "X Y" = "1", '
        '"X-V" = "${host}", "X-N" = 1 }\n'
        'headers.request.add = { Host = "evil" }\n'
        'headers.request.remove = ["Content-Length", "Connection", 7]\n'
        'headers.response.set = { "Content-Encoding" = "br", "X-Nul" = "\\u0000" }\n'
        'headers.response.bogus = {}\n')) == [
        (8, "services[0].headers.request.set.X-A",
         "the value holds '\\r': only printable ASCII, spaces and tabs may be sent"),
        (8, "services[0].headers.request.set.Transfer-Encoding",
         "Transfer-Encoding frames the message or belongs to one connection: txlb writes it itself"),
        (8, "services[0].headers.request.set.X Y",
         "'X Y' is not a header name (a token: letters, digits and !#$%&'*+.^_`|~-)"),
        (8, "services[0].headers.request.set.X-V",
         "unknown variable ${host}; known: ${client_ip}, ${request_id}, ${service}, ${server}"),
        (8, "services[0].headers.request.set.X-N", "must be a string, not an integer"),
        (9, "services[0].headers.request.add.Host",
         "a request has exactly one Host: it can be set, not added or removed"),
        (10, "services[0].headers.request.remove[0]",
         "Content-Length frames the message or belongs to one connection: txlb writes it itself"),
        (10, "services[0].headers.request.remove[1]",
         "Connection frames the message or belongs to one connection: txlb writes it itself"),
        (10, "services[0].headers.request.remove[2]", "must be a header name, not an integer"),
        (11, "services[0].headers.response.set.Content-Encoding",
         "Content-Encoding describes the body as sent: use compress, not a header rule"),
        (11, "services[0].headers.response.set.X-Nul",
         "the value holds '\\x00': only printable ASCII, spaces and tabs may be sent"),
        (12, "services[0].headers.response.bogus", "unknown key"),
    ]


def test_a_name_set_twice_and_shapes_that_are_not_tables():
    assert problems(web('headers = { request = { set = { "X-A" = "1", "x-a" = "2" }, add = "X" }, reply = {} }\n'
                        )) == [
        (8, "services[0].headers.request.set.x-a", "'X-A' is set already (header names are not case-sensitive)"),
        (8, "services[0].headers.request.add",
         'must be a table of header name to value, like { "X-Env" = "prod" }, not a string'),
        (8, "services[0].headers.reply", "unknown key"),
    ]


def test_redirect_routes():
    assert problems(web(routes=(
        '[[services.routes]]\nhost = "a"\npool = "api"\nredirect = { host = "b" }\n'
        '[[services.routes]]\nhost = "c"\nredirect = { status = 303 }\n'
        '[[services.routes]]\npath_prefix = "/old/"\nredirect = { path_prefix = "/new" }\n'
        '[[services.routes]]\nhost = "d"\nredirect = { path_prefix = "/new/", host = "bad host", scheme = "ftp" }\n'
        '[[services.routes]]\nhost = "e"\nredirect = { path_prefix = "/a?b" }\n'))) == [
        (11, "services[0].routes[0].pool", "a redirect route answers itself and has no pool: remove pool, or redirect"),
        (15, "services[0].routes[1].redirect.status", "must be one of 301, 302, 307, 308, not 303"),
        (15, "services[0].routes[1].redirect", "says nothing to change: give it a scheme, a host or a path_prefix"),
        (18, "services[0].routes[2].redirect.path_prefix",
         "replaces the route's path_prefix '/old/': end both with '/', or neither, so that the rest of the path "
         "joins as it did"),
        (21, "services[0].routes[3].redirect.scheme", "must be one of 'http', 'https', not 'ftp'"),
        (21, "services[0].routes[3].redirect.host",
         "'bad host' is not a host name, with an optional :port (like \"new.example.com\")"),
        (21, "services[0].routes[3].redirect.path_prefix",
         "goes before the whole path, which starts with '/': leave out the closing '/'"),
        (24, "services[0].routes[4].redirect.path_prefix",
         "'/a?b' is not a path: it starts with '/', and has no spaces, '?' or '#'"),
    ]


def test_a_route_without_redirect_still_needs_its_pool_and_its_header_conditions_are_checked():
    assert problems(web(routes='[[services.routes]]\nhost = "a"\nheaders = { "X-T" = 1, response = { set = { '
                               '"Upgrade" = "h2c" } } }\n')) == [
        (9, "services[0].routes[0].pool", "is required"),
        (11, "services[0].routes[0].headers", "the value for 'X-T' must be a string"),
        (11, "services[0].routes[0].headers.response.set.Upgrade",
         "Upgrade frames the message or belongs to one connection: txlb writes it itself"),
    ]


def test_compress_values():
    assert problems(web('compress = { types = ["text", 3, "text/*"], min_size = "big", level = 0, br = true }\n')) == [
        (8, "services[0].compress.types[0]", "'text' is not a media type (type/subtype, or type/*)"),
        (8, "services[0].compress.types[1]", "3 is not a media type (type/subtype, or type/*)"),
        (8, "services[0].compress.min_size", "'big' is not a size (write it like \"64KiB\" or \"10MiB\")"),
        (8, "services[0].compress.level", "must be between 1 and 9, not 0"),
        (8, "services[0].compress.br", "unknown key"),
    ]


def test_tcp_services_refuse_them():
    text = POOL + toml('''
        [[services]]
        name = "db"
        listen = "tcp:6432"
        pool = "api"
        headers = { request = { set = { "X-A" = "1" } } }
        compress = {}
        ''')
    assert [(path, message) for _, path, message in problems(text)] == [
        ("services[0].headers", 'applies to HTTP services only (protocol = "http")'),
        ("services[0].compress", 'applies to HTTP services only (protocol = "http")'),
    ]
