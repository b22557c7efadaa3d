"""
Fixtures shared by the test modules.
"""

from __future__ import annotations

import socket

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture
def events():
    """Every event logged during the test, as Twisted's event dicts."""
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.fixture
def fullListener():
    """
    A listener whose accept queue is full (a backlog of 0 and one connection
    nobody accepts): the kernel drops further handshakes, so a connect to
    it stays pending.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        filler = socket.create_connection(s.getsockname(), timeout=5)
        yield s
        filler.close()
