"""
What the benchmarks share: free ports, processes started and stopped as a
group, and their CPU time and memory read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitPort(port: int, alive: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def treePids(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpuSeconds(pid: int) -> float:
    """user+system CPU time of C{pid} and its descendants, from /proc."""
    total = 0
    for p in treePids(pid):
        with contextlib.suppress(OSError, IndexError):
            fields = (Path("/proc") / str(p) / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rssMiB(pid: int) -> Optional[float]:
    total = 0
    for p in treePids(pid):
        with contextlib.suppress(OSError):
            for line in (Path("/proc") / str(p) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024 if total else None


class Lab:
    """Owns every process it starts, and stops them all."""

    prefix = "txlb-bench-"

    def __init__(self, keep: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.keep = keep
        self.backendProcesses: list = []
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], name: str, port: int, env=None) -> subprocess.Popen:
        with open(self.dir / f"{name}.log", "wb") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env,
                                 start_new_session=True)
        self.procs.append(p)
        if not waitPort(port, lambda: p.poll() is None):
            self.stop(p)
            raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port}:\n{self.logTail(name)}")
        return p

    def logTail(self, name: str, size: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / f"{name}.log").read_text(errors="replace")[-size:]
        return ""

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        for p in self.backendProcesses:
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def twistd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", *args]


def median(results: list[dict], key: str) -> Optional[float]:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None
