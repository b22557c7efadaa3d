"""
L{txlb.service.settleHeap}: the start-up heap is frozen once the reactor
runs, and the collector runs less often from then on.
"""

from __future__ import annotations

import subprocess
import sys

from tests.test_reload import BASE, Running
from txlb.service import settleHeap


def test_scheduled_when_the_reactor_runs(tmp_path) -> None:
    running = Running(tmp_path, BASE)
    try:
        assert settleHeap in [hook[0] for hook in running.reactor.whenRunningHooks]
    finally:
        running.service.stopService()


def test_freezes_the_start_up_heap() -> None:
    # In a process of its own: the test process's collector stays as it is.
    code = (
        "import gc; from txlb.service import settleHeap\n"
        "assert gc.get_freeze_count() == 0\n"
        "settleHeap()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "from txlb.service.tree import GC_THRESHOLDS\n"
        "assert gc.get_threshold() == GC_THRESHOLDS != (700, 10, 10), gc.get_threshold()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
