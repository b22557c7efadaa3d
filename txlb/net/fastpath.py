# -*- test-case-name: tests.test_fastpath -*-
"""
The one module of txlb that touches Twisted's private names.

txlb's fast path needs three things Twisted has no public API for:

  - which descriptors the reactor itself is reading (C{reactor._reads}) and
    how it ends a descriptor whose read failed
    (C{reactor._disconnectSelectable}), for L{txlb.net.readloop};
  - whether a TCP transport still holds bytes it has not written
    (C{_tempDataBuffer}, C{dataBuffer}, C{offset}) and whether its writing
    side was shut (C{_writeDisconnected}), for L{txlb.net.wire}'s direct
    writes and for splicing a response body only once its head is out.

Each is checked once, when first needed (L{enabled}); if any is missing,
as a future Twisted may make it, txlb logs one C{fast_path_disabled}
warning and takes the public road instead: the reactor reads every
socket, every write goes through C{transport.write}, and response bodies
are copied rather than spliced.  The same road is taken on purpose when
the environment variable C{TXLB_FAST_PATH} is C{0}, which is how the tests
prove that it works.  What the fast path saves is measured in
C{bench/http.py}.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet import abstract
from twisted.logger import Logger

__all__ = ["ENVIRONMENT", "buffered", "enabled", "endOfRead", "readingSet", "reset", "writeShut"]

_log = Logger(namespace="txlb.net.fastpath")

#: Set to C{0} to take the public road whatever Twisted offers.
ENVIRONMENT = "TXLB_FAST_PATH"

#: Attributes every Twisted file descriptor must have (on the class).
_DESCRIPTOR = ("dataBuffer", "offset", "_writeDisconnected")

_verdict: Optional[bool] = None


def missing() -> Optional[str]:
    """
    What the fast path needs and this Twisted lacks, in words, or L{None}
    when all is there.  (What it needs of a reactor is asked of each
    reactor: L{readingSet}.)
    """
    if os.environ.get(ENVIRONMENT, "1").strip() == "0":
        return f"{ENVIRONMENT}=0 is set"
    absent = [name for name in _DESCRIPTOR if not hasattr(abstract.FileDescriptor, name)]
    try:
        probe = abstract.FileDescriptor(reactor=_Reactorless())
    except Exception as e:  # a constructor that wants more than a reactor
        return f"Twisted's FileDescriptor could not be made ({e})"
    if not isinstance(getattr(probe, "_tempDataBuffer", None), list):
        absent.append("_tempDataBuffer")
    if absent:
        return "this Twisted has no " + ", ".join(absent)
    return None


def enabled() -> bool:
    """Whether the fast path is on: decided once per process, with one warning when off."""
    global _verdict
    if _verdict is None:
        why = missing()
        _verdict = why is None
        if why is not None:
            _log.warn("txlb's fast path is off: {why}; sockets are read and written through "
                      "Twisted's public API", event="fast_path_disabled", why=why)
    return _verdict


def reset() -> None:
    """Decide again on the next L{enabled} (for tests)."""
    global _verdict
    _verdict = None


class _Reactorless:
    """Enough of a reactor for a FileDescriptor that is never used."""

    def __bool__(self) -> bool:
        return True


# The private names, each used in one place.


def readingSet(reactor: Any) -> Any:
    """
    The descriptors (or their numbers) C{reactor} is reading now, or
    L{None} when its reading cannot be taken over: the fast path is off,
    or C{reactor} is not one whose internals are known (then it reads).
    """
    if not enabled() or not hasattr(reactor, "_disconnectSelectable"):
        return None
    return getattr(reactor, "_reads", None)


def endOfRead(reactor: Any, descriptor: Any, why: Any) -> None:
    """End C{descriptor} as the reactor does when its C{doRead} returns C{why}."""
    reactor._disconnectSelectable(descriptor, why, True)


def buffered(transport: Any) -> bool:
    """Twisted still holds bytes to write on this plain TCP C{transport}."""
    return bool(transport._tempDataBuffer or transport.offset != len(transport.dataBuffer))


def writeShut(transport: Any) -> bool:
    """C{transport}'s writing side was shut (C{loseWriteConnection})."""
    return bool(transport._writeDisconnected)
