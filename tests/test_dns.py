"""
The health-aware DNS responder: its answers as data (L{Responder.respond}),
then over UDP on 127.0.0.1 with C{twisted.names}' client and with C{dig}.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from twisted.names import dns
from twisted.names.client import Resolver
from twisted.names.error import DNSQueryRefusedError

from txlb.control.dns import DNSService, Responder, parseListen
from tests.support import freePort
from tests.test_cluster import resolve, spin


def query(name: bytes, kind: int = dns.A, cls: int = dns.IN) -> dns.Message:
    m = dns.Message(id=7, recDes=1)
    m.queries = [dns.Query(name, kind, cls)]
    return m


def answers(response: dns.Message) -> list[str]:
    return [r.payload.dottedQuad() if r.type == dns.A else r.payload._address for r in response.answers]


def test_parse_listen():
    assert parseListen("udp:5353:interface=127.0.0.1") == (5353, "127.0.0.1")
    assert parseListen("udp:port=53") == (53, "")
    assert parseListen(r"udp:53:interface=\:\:1") == (53, "::1")
    with pytest.raises(ValueError):
        parseListen("tcp:53")


def test_answers_a_records_with_the_ttl():
    r = Responder("app.example.com", 7, lambda: ["127.0.0.2", "127.0.0.3", "::1"])
    response = r.respond(query(b"app.example.com"))
    assert (response.id, response.answer, response.auth, response.rCode) == (7, 1, 1, dns.OK)
    assert answers(response) == ["127.0.0.2", "127.0.0.3"]
    assert {a.ttl for a in response.answers} == {7}
    assert {a.payload.ttl for a in response.answers} == {7}


def test_aaaa_gets_the_ipv6_addresses():
    r = Responder("app.example.com", 5, lambda: ["127.0.0.2", "::1", "fd00::5"])
    response = r.respond(query(b"app.example.com", dns.AAAA))
    assert [a.type for a in response.answers] == [dns.AAAA, dns.AAAA]
    assert sorted(a.payload._address for a in response.answers) == sorted(
        [dns.Record_AAAA("::1")._address, dns.Record_AAAA("fd00::5")._address]
    )


def test_order_rotates_per_query():
    r = Responder("app.example.com", 5, lambda: ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    firsts = [answers(r.respond(query(b"app.example.com")))[0] for _ in range(6)]
    assert firsts == ["127.0.0.2", "127.0.0.3", "127.0.0.4"] * 2
    assert sorted(answers(r.respond(query(b"app.example.com")))) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def test_names_match_case_insensitively():
    r = Responder("App.Example.com.", 5, lambda: ["127.0.0.2"])
    response = r.respond(query(b"aPP.example.COM"))
    assert answers(response) == ["127.0.0.2"]
    assert response.answers[0].name == dns.Name(b"aPP.example.COM")


def test_other_names_are_refused():
    r = Responder("app.example.com", 5, lambda: ["127.0.0.2"])
    for name in (b"example.com", b"www.app.example.com", b"other.org"):
        response = r.respond(query(name))
        assert (response.rCode, response.answers, response.auth) == (dns.EREFUSED, [], 0)
    assert r.respond(query(b"app.example.com", cls=dns.CH)).rCode == dns.EREFUSED


def test_other_types_get_an_empty_answer():
    r = Responder("app.example.com", 5, lambda: ["127.0.0.2"])
    response = r.respond(query(b"app.example.com", dns.MX))
    assert (response.rCode, response.answers, response.auth) == (dns.OK, [], 1)


def test_no_live_node_is_an_empty_answer():
    r = Responder("app.example.com", 5, lambda: [])
    response = r.respond(query(b"app.example.com"))
    assert (response.rCode, response.answers) == (dns.OK, [])


def test_other_opcodes_are_not_implemented():
    m = query(b"app.example.com")
    m.opCode = dns.OP_NOTIFY
    assert Responder("app.example.com", 5, lambda: []).respond(m).rCode == dns.ENOTIMP


@pytest.fixture
def live():
    """A responder on a real UDP port of 127.0.0.1, its nodes changeable."""
    from twisted.internet import reactor

    nodes = ["127.0.0.2", "127.0.0.3"]
    port = freePort()
    service = DNSService(f"udp:{port}:interface=127.0.0.1", Responder("app.example.com", 9, lambda: nodes), reactor)
    service.privilegedStartService()
    service.startService()
    yield port, nodes
    resolve(service.stopService())


def test_twisted_names_client(live):
    port, nodes = live
    client = Resolver(servers=[("127.0.0.1", port)])
    answers_, _, _ = resolve(client.lookupAddress("APP.example.com", timeout=[2]))
    assert sorted(a.payload.dottedQuad() for a in answers_) == ["127.0.0.2", "127.0.0.3"]
    assert {a.ttl for a in answers_} == {9}
    nodes.remove("127.0.0.3")
    answers_, _, _ = resolve(client.lookupAddress("app.example.com", timeout=[2]))
    assert [a.payload.dottedQuad() for a in answers_] == ["127.0.0.2"]
    with pytest.raises(DNSQueryRefusedError):
        resolve(client.lookupAddress("other.example.com", timeout=[2]))


def dig(port: int, *args: str) -> str:
    process = subprocess.Popen(
        ["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=3", *args],
        stdout=subprocess.PIPE, text=True,
    )
    spin(lambda: process.poll() is not None, timeout=10, what="dig")
    return process.stdout.read()


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (dnsutils)")
def test_dig(live):
    port, nodes = live
    out = dig(port, "+noall", "+answer", "app.example.com", "A")
    records = sorted(line.split() for line in out.splitlines() if line.strip())
    assert records == [
        ["app.example.com.", "9", "IN", "A", "127.0.0.2"],
        ["app.example.com.", "9", "IN", "A", "127.0.0.3"],
    ]
    # dig's own EDNS and cookie options are understood.
    assert "status: NOERROR" in dig(port, "+edns=0", "+cookie", "app.example.com")
    assert "flags: qr aa" in dig(port, "app.example.com")
    assert "status: REFUSED" in dig(port, "www.example.org")
