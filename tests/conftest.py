"""
Fixtures shared by the test modules.
"""

from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture
def events():
    """Every event logged during the test, as Twisted's event dicts."""
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)
