#!/usr/bin/env python3
"""
Memory per idle client connection: how much txlb's resident memory grows
for each connection a client opens, uses once and leaves open.

Everything runs on 127.0.0.1 and is started and stopped here: one backend
process (asyncio: HTTP/1.1 keep-alive answers, or a line echo for TCP),
txlb (one HTTP and one TCP service, long idle timeouts), and the clients in
this process.  For each kind, C{--connections} clients connect, each sends
one request and reads its answer (so every connection has been through the
whole path: parser, scheduler, backend), then all stay open while txlb's
RSS is read from /proc.  The figure is the RSS growth divided by the
connections held; for TCP each client connection also holds its backend
connection in txlb (and, once bytes have moved, a kernel pipe pair).

    python3 bench/idle.py
    python3 bench/idle.py --connections 2000 --kinds http --json idle.json

The file descriptor limit is raised as far as this user may; a run that
cannot get enough descriptors says so and uses fewer connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lab import Lab, freePort, rssMiB, twistd  # noqa: E402

#: Descriptors txlb needs per connection: an HTTP client's socket (backend
#: connections are shared); a TCP client's, its backend's, and two pipes
#: (four descriptors) once the connection splices.
_FDS_PER_CONNECTION = {"http": 1, "tcp": 6}


def _raiseLimit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(limit, soft), max(limit, hard)))
            return max(limit, soft)
        except (ValueError, OSError):
            continue
    return soft


def _backend(httpPort: int, tcpPort: int, limit: int) -> None:
    _raiseLimit(limit)

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(line)
        except ConnectionError:
            pass
        writer.close()

    async def main() -> None:
        a = await asyncio.start_server(http, "127.0.0.1", httpPort, backlog=4096)
        b = await asyncio.start_server(echo, "127.0.0.1", tcpPort, backlog=4096)
        async with a, b:
            await asyncio.Event().wait()

    asyncio.run(main())


_CONFIG = """
[log]
access = false

[pools.web]
algorithm = "round_robin"
servers = [{{ name = "web-1", address = "127.0.0.1:{httpBackend}" }}]
[pools.web.health]
kind = "none"

[pools.echo]
algorithm = "round_robin"
servers = [{{ name = "echo-1", address = "127.0.0.1:{tcpBackend}" }}]
[pools.echo.health]
kind = "none"

[[services]]
name = "http"
protocol = "http"
listen = ["tcp:{httpPort}:interface=127.0.0.1:backlog=4096"]
pool = "web"
timeouts = {{ idle = "1h", client = "1h" }}

[[services]]
name = "tcp"
protocol = "tcp"
listen = ["tcp:{tcpPort}:interface=127.0.0.1:backlog=4096"]
pool = "echo"
timeouts = {{ idle = "1h" }}
"""


async def _hold(port: int, kind: str, n: int, batch: int = 200) -> tuple[list, int]:
    """Open C{n} connections, each used once; returns them and the failures."""
    held: list = []
    failures = 0
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n" if kind == "http" else b"ping\n"

    async def one() -> None:
        nonlocal failures
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            writer.write(request)
            if kind == "http":
                await asyncio.wait_for(reader.readuntil(b"hello\n"), 10)
            else:
                await asyncio.wait_for(reader.readline(), 10)
            held.append(writer)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            failures += 1

    for start in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, n - start))))
    return held, failures


def measure(kind: str, port: int, pid: int, n: int) -> dict:
    async def run() -> dict:
        before = rssMiB(pid)
        started = time.monotonic()
        held, failures = await _hold(port, kind, n)
        opened = time.monotonic() - started
        after = rssMiB(pid)
        for writer in held:
            writer.close()
        grown = (after - before) * 1024
        return {
            "kind": kind,
            "connections": len(held),
            "failures": failures,
            "rss_before_mib": round(before, 1),
            "rss_after_mib": round(after, 1),
            "kib_per_connection": round(grown / len(held), 2) if held else None,
            "open_seconds": round(opened, 2),
        }

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--kinds", default="http,tcp")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    kinds = args.kinds.split(",")
    wanted = args.connections * max(_FDS_PER_CONNECTION[k] for k in kinds) + 1024
    limit = _raiseLimit(wanted)
    counts = {}
    for kind in kinds:
        counts[kind] = min(args.connections, max(1, (limit - 1024) // _FDS_PER_CONNECTION[kind]))
        if counts[kind] < args.connections:
            print(f"file descriptor limit {limit}: measuring {counts[kind]} {kind} connections", file=sys.stderr)

    lab = Lab(args.keep)
    results = []
    try:
        httpBackend, tcpBackend, httpPort, tcpPort = (freePort() for _ in range(4))
        backend = multiprocessing.Process(target=_backend, args=(httpBackend, tcpBackend, wanted), daemon=True)
        backend.start()
        lab.backendProcesses.append(backend)
        config = lab.dir / "idle.toml"
        config.write_text(_CONFIG.format(httpBackend=httpBackend, tcpBackend=tcpBackend,
                                         httpPort=httpPort, tcpPort=tcpPort))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
        for kind in kinds:
            # A fresh txlb per kind, so that one kind's freed memory does not
            # flatter the next.
            proc = lab.start(twistd("txlb", "--config", str(config)), f"txlb-{kind}", httpPort, env=env)
            port = httpPort if kind == "http" else tcpPort
            measure(kind, port, proc.pid, 50)  # warm up: imports, first buffers
            results.append(measure(kind, port, proc.pid, counts[kind]))
            lab.stop(proc)
    finally:
        lab.close()

    print(f"{'kind':6} {'held':>7} {'failed':>7} {'rss before':>11} {'rss after':>10} {'KiB/conn':>9}")
    for r in results:
        print(f"{r['kind']:6} {r['connections']:7d} {r['failures']:7d} {r['rss_before_mib']:10.1f}M "
              f"{r['rss_after_mib']:9.1f}M {r['kib_per_connection'] or 0:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
