# -*- test-case-name: tests.test_policy_access -*-
"""
Who may come in: C{allow} and C{deny} lists of networks, on HTTP services
and routes and on TCP and UDP services.

A list is compiled once (at start and at each reload) into a set of
prefixes per prefix length and address family, so a lookup is one
integer conversion and one set membership test per distinct prefix
length in the list, however many networks it holds.  Answers are cached
per client address (bounded), so a client that sends many requests costs
one dict lookup each.

C{deny} is checked first; without C{allow} everyone not denied may come
in.  A client that is not an IP address (a unix socket peer) belongs to no
network: it is refused when there is an C{allow} list, and let in
otherwise.  An IPv4-mapped IPv6 address (C{::ffff:192.0.2.7}, what a dual
stack socket reports) is taken as the IPv4 address it carries.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence

#: The reason a refusal is counted and logged under.
DENY = "deny"

#: Client addresses whose answer is remembered, per list.
CACHE_SIZE = 4096


def parseNetwork(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    A network as the config writes it: C{"10.0.0.0/8"}, C{"2001:db8::/32"}
    or a single address (C{"192.0.2.7"}: a /32, or /128).

    @raise ValueError: with a message an operator can act on.
    """
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a network (write it like \"10.0.0.0/8\", \"2001:db8::/32\" "
                         "or a single address)") from None
    raise ValueError(f"{text!r} has bits set past its prefix length: did you mean {str(loose)!r}?")


class NetworkSet:
    """
    Networks of both families, as C{{prefix length: set of prefixes}}
    per family: a client address is in the set when its first C{n} bits
    are among the prefixes of length C{n}, for some C{n} present.
    """

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        self.networks = tuple(networks)
        for net in self.networks:
            table, bits = (v4, 32) if net.version == 4 else (v6, 128)
            table.setdefault(net.prefixlen, set()).add(int(net.network_address) >> (bits - net.prefixlen))
        # Shortest prefixes first: the broad ones are the likeliest to match.
        self._v4 = tuple((32 - n, frozenset(s)) for n, s in sorted(v4.items()))
        self._v6 = tuple((128 - n, frozenset(s)) for n, s in sorted(v6.items()))

    def __len__(self) -> int:
        return len(self.networks)

    def contains(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        value = int(address)
        for shift, prefixes in (self._v4 if address.version == 4 else self._v6):
            if value >> shift in prefixes:
                return True
        return False


def clientAddress(client: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IP address of a client as txlb names it, or L{None} when it is not one."""
    try:
        address = ipaddress.ip_address(client)  # a scoped one too: fe80::1%eth0
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AccessList:
    """
    One service's or route's C{allow} and C{deny}, compiled.

    @ivar allow: the networks let in, or L{None}: everyone (not denied).
    @ivar deny: the networks refused, before C{allow} is consulted.
    """

    def __init__(self, allow: Optional[Sequence[str]], deny: Sequence[str] = ()) -> None:
        self.allow = None if allow is None else NetworkSet(map(parseNetwork, allow))
        self.deny = NetworkSet(map(parseNetwork, deny))
        self._cache: dict[str, bool] = {}

    @classmethod
    def fromConfig(cls, config) -> Optional["AccessList"]:
        """From a L{txlb.config.AccessConfig}, or L{None} for none."""
        if config is None:
            return None
        return cls(config.allow, config.deny)

    def allows(self, client: str) -> bool:
        """Whether C{client} (an address as txlb names it) may come in."""
        answer = self._cache.get(client)
        if answer is None:
            answer = self._decide(client)
            cache = self._cache
            if len(cache) >= CACHE_SIZE:
                cache.clear()  # cheaper than LRU bookkeeping on every hit
            cache[client] = answer
        return answer

    def _decide(self, client: str) -> bool:
        address = clientAddress(client)
        if address is None:
            return self.allow is None
        if self.deny.contains(address):
            return False
        return self.allow is None or self.allow.contains(address)

    def describe(self) -> str:
        """One line for C{--check}'s summary and the status page."""
        parts = []
        if self.deny:
            parts.append("deny " + ", ".join(map(str, self.deny.networks)))
        if self.allow is not None:
            parts.append("allow only " + ", ".join(map(str, self.allow.networks)))
        return "; ".join(parts) if parts else "everyone"
