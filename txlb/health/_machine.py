# -*- test-case-name: tests.test_health -*-
"""
Rise and fall: how consecutive check results move a server.

A pure core: it takes the server's current health and one result and says
whether the server moves, and why.  No clock, no I/O, no pool.
"""

from __future__ import annotations

from typing import Optional

import attrs

from txlb.balance.pool import ServerState


@attrs.define
class RiseFall:
    """
    The run of results for one server.

    A server that is C{UP} goes C{DOWN} after C{fall} failures in a row; one
    that is C{DOWN} comes C{UP} after C{rise} passes in a row.  A
    C{CHECKING} server (added at run time, never seen healthy) comes C{UP}
    after C{rise} passes, or is reported C{DOWN} after C{fall} failures.

    The current health is an argument rather than remembered here, so that
    a verdict set by someone else (an operator, a test) is respected.
    """

    rise: int
    fall: int
    passes: int = 0
    failures: int = 0

    def observe(
        self, current: ServerState, ok: bool, detail: str = ""
    ) -> Optional[tuple[ServerState, str]]:
        """
        Count one result.

        @return: C{(new health, reason)} when this result moves the server,
            else L{None}.  The reason reads C{"3 consecutive failures:
            HTTP 503 ..."} or C{"2 consecutive passes"}.
        """
        if ok:
            self.failures = 0
            self.passes += 1
            if current is not ServerState.UP and self.passes >= self.rise:
                return ServerState.UP, _plural(self.passes, "consecutive pass", "consecutive passes")
            return None
        self.passes = 0
        self.failures += 1
        if current is not ServerState.DOWN and self.failures >= self.fall:
            reason = _plural(self.failures, "consecutive failure", "consecutive failures")
            return ServerState.DOWN, f"{reason}: {detail}" if detail else reason
        return None


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"
