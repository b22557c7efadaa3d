# -*- test-case-name: tests.test_dns -*-
"""
Health-aware DNS for the balancers themselves (SPEC section 2, C{[dns]}):
an authoritative responder, on C{twisted.names}, for one name.

It answers C{A} and C{AAAA} queries for C{dns.name} with the addresses of
the nodes that serve now (from the cluster's heartbeats; in active-passive
mode only the active node), each with TTL C{dns.ttl}, the order rotated on
every query so that clients that take the first address spread out.  The
name is matched case-insensitively.  Every other name is answered
C{REFUSED}: this server is authoritative for one name and recursive for
none.  A query for the name and another type gets an empty answer.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable, Sequence

from twisted.application.service import Service
from twisted.names import dns
from twisted.logger import Logger

_log = Logger(namespace="txlb.control.dns")

_UDP = re.compile(r"udp:(?:port=)?(\d+)(?::interface=(.+))?")


def parseListen(listen: str) -> tuple[int, str]:
    """C{udp:PORT:interface=ADDR} as C{(port, interface)}."""
    m = _UDP.fullmatch(listen)
    if m is None:
        raise ValueError(f"{listen!r} is not a UDP listen address")
    return int(m.group(1)), (m.group(2) or "").replace("\\:", ":")


def _normal(name: bytes | str) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower()


class Responder:
    """
    The answers, as data: L{respond} turns a query L{dns.Message} into its
    response.  Also the controller of a L{dns.DNSDatagramProtocol}.

    @param addresses: returns the addresses to give out now.
    """

    def __init__(self, name: str, ttl: int, addresses: Callable[[], Sequence[str]]) -> None:
        self.name = _normal(name)
        self.ttl = ttl
        self.addresses = addresses
        self._turn = 0

    def respond(self, query: dns.Message) -> dns.Message:
        response = dns.Message(id=query.id, answer=1, opCode=query.opCode, recDes=query.recDes)
        response.queries = list(query.queries)
        if query.opCode != dns.OP_QUERY:
            response.rCode = dns.ENOTIMP
            return response
        if len(query.queries) != 1:
            response.rCode = dns.EFORMAT
            return response
        question = query.queries[0]
        if _normal(question.name.name) != self.name or question.cls not in (dns.IN, dns.ANY):
            response.rCode = dns.EREFUSED
            return response
        response.auth = 1
        wanted = {dns.A: 4, dns.AAAA: 6, dns.ANY: None}
        if question.type not in wanted:
            return response
        version = wanted[question.type]
        found = []
        for text in self.addresses():
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if version is None or address.version == version:
                found.append(address)
        if found:
            turn = self._turn % len(found)
            self._turn += 1
            found = found[turn:] + found[:turn]
        for address in found:
            if address.version == 4:
                kind, payload = dns.A, dns.Record_A(str(address), self.ttl)
            else:
                kind, payload = dns.AAAA, dns.Record_AAAA(str(address), self.ttl)
            response.answers.append(
                dns.RRHeader(question.name.name, kind, dns.IN, self.ttl, payload, auth=True)
            )
        return response

    def messageReceived(self, message: dns.Message, protocol, address) -> None:
        if message.answer:
            return
        protocol.writeMessage(self.respond(message), address)


class DNSService(Service):
    """
    The responder listening on UDP.  It binds in
    L{privilegedStartService}, as port 53 needs privileges.
    """

    def __init__(self, listen: str, responder: Responder, reactor) -> None:
        self.listen = listen
        self.responder = responder
        self.reactor = reactor
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        port, interface = parseListen(self.listen)
        protocol = dns.DNSDatagramProtocol(self.responder, reactor=self.reactor)
        protocol.noisy = False
        self.port = self.reactor.listenUDP(port, protocol, interface=interface)

    def startService(self) -> None:
        super().startService()
        _log.info("DNS for {name} on {listen}", event="listening", service="dns",
                  listen=self.listen, name=self.responder.name)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
