#!/usr/bin/env python3
"""
TCP throughput and connection rate through txlb, beside the same load sent
to the backends directly.

Everything runs on 127.0.0.1 and is started here: the backends (one
asyncio process each, answering a one-line protocol), Twisted's own
C{portforward} as a reference proxy, txlb with a generated config, and the
load itself (blocking clients, each in its own process, so neither the
backends nor the clients share a GIL with anything).

The backend protocol, one command line per connection::

    PING           -> "PONG <backend name>\\n"
    GET <bytes>    -> that many bytes
    PUT <bytes>    -> reads that many bytes, then "OK\\n"

Workloads (each bounded by a count and by --duration):

    download   GET 10 MiB per connection, 4 parallel clients      (MiB/s)
    upload     PUT 10 MiB per connection, 4 parallel clients      (MiB/s)
    connect    connect, PING, read PONG, close; 8 parallel clients (conn/s)

The machine this runs on is shared and noisy: read the ratios to C{direct}
and the proxy's CPU time (user+system from C{/proc/PID/stat}, per MiB and
per connection), not the absolute figures.

    python3 bench/tcp.py
    python3 bench/tcp.py --duration 5 --repeat 3 --json tcp.json
    python3 bench/tcp.py --targets direct,txlb --workloads connect
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from _lab import Lab as _Lab
from _lab import cpuSeconds as _cpuSeconds
from _lab import freePort as _freePort
from _lab import median as _median
from _lab import rssMiB as _rssMiB
from _lab import twistd as _twistd

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
CHUNK = 256 * 1024
_PAYLOAD = memoryview(b"x" * (16 * MiB))
_FORK = multiprocessing.get_context("fork")

#: workload -> what it counts
WORKLOADS = {
    "download": "MiB/s",
    "upload": "MiB/s",
    "connect": "conn/s",
}


# ---- the backends ---------------------------------------------------------


class _BackendProtocol(asyncio.Protocol):
    """One connection to a backend: a command line, then its answer."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.buffer = b""
        self.sink: Optional[int] = None
        self.toSend = 0
        self.paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self._absorb(len(data))
            return
        self.buffer += data
        line, newline, rest = self.buffer.partition(b"\n")
        if not newline:
            if len(self.buffer) > 1024:
                self.transport.abort()
            return
        self.buffer = b""
        command, _, argument = line.partition(b" ")
        if command == b"PING":
            self.transport.write(b"PONG " + self.name + b"\n")
        elif command == b"GET":
            self.toSend = int(argument)
            self._pump()
        elif command == b"PUT":
            self.sink = int(argument)
            self._absorb(len(rest))
        else:
            self.transport.abort()

    def _absorb(self, n: int) -> None:
        self.sink -= n
        if self.sink <= 0:
            self.sink = None
            self.transport.write(b"OK\n")

    def _pump(self) -> None:
        while self.toSend > 0 and not self.paused:
            n = min(CHUNK, self.toSend)
            self.transport.write(_PAYLOAD[:n])
            self.toSend -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def eof_received(self) -> bool:
        return False  # the client is done: close


def _serveBackend(sock: socket.socket, name: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _BackendProtocol(name.encode()), sock=sock)
        await server.serve_forever()

    asyncio.run(serve())


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


# ---- the clients ----------------------------------------------------------


def _recvExactly(sock: socket.socket, n: int, buffer: memoryview) -> None:
    while n > 0:
        got = sock.recv_into(buffer, min(n, len(buffer)))
        if not got:
            raise ConnectionError(f"EOF with {n} bytes still expected")
        n -= got


def _recvLine(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError(f"EOF after {data!r}")
        data += chunk
    return data


def _client(workload: str, ports: list[int], index: int, count: int, size: int,
            go, deadline: float, timeout: float, results) -> None:
    """
    One client process: waits for C{go}, then repeats C{workload} until it
    has done C{count} or C{deadline} (seconds after C{go}) has passed.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    buffer = memoryview(bytearray(MiB))
    done = errors = nbytes = 0
    latencies: list[float] = []
    backends: dict[str, int] = {}
    firstError = ""
    go.wait()
    end = time.monotonic() + deadline
    while done + errors < count and time.monotonic() < end:
        port = ports[(index + done + errors) % len(ports)]
        head = _HEADERS.get(port, b"")  # a PROXY header, in the same write as the command
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                if workload == "download":
                    sock.sendall(head + b"GET %d\n" % size)
                    _recvExactly(sock, size, buffer)
                    nbytes += size
                elif workload == "upload":
                    sock.sendall(head + b"PUT %d\n" % size)
                    sock.sendall(_PAYLOAD[:size])
                    if _recvLine(sock) != b"OK\n":
                        raise ConnectionError("no OK after the upload")
                    nbytes += size
                else:
                    sock.sendall(head + b"PING\n")
                    answer = _recvLine(sock)
                    if not answer.startswith(b"PONG "):
                        raise ConnectionError(f"unexpected answer {answer!r}")
                    name = answer[5:-1].decode()
                    backends[name] = backends.get(name, 0) + 1
        except OSError as e:
            errors += 1
            firstError = firstError or f"{type(e).__name__}: {e}"
            continue
        latencies.append(time.monotonic() - started)
        done += 1
    results.send(dict(done=done, errors=errors, bytes=nbytes, latencies=latencies,
                      backends=backends, firstError=firstError))
    results.close()


# ---- processes and CPU time -----------------------------------------------


class Lab(_Lab):
    """The shared lab, with this benchmark's line-protocol backends."""

    prefix = "txlb-bench-tcp-"

    def startBackends(self, n: int) -> list[int]:
        ports = []
        for i in range(n):
            sock = _listen()
            ports.append(sock.getsockname()[1])
            p = _FORK.Process(target=_serveBackend, args=(sock, f"server-{i + 1}"), daemon=True)
            p.start()
            sock.close()
            self.backendProcesses.append(p)
        return ports


# ---- targets: each returns (process or None, ports to load) ---------------


def targetDirect(lab: Lab, backends: list[int], opts) -> tuple[None, list[int]]:
    return None, backends


def targetPortforward(lab: Lab, backends: list[int], opts) -> tuple[subprocess.Popen, list[int]]:
    port = _freePort()
    argv = _twistd("portforward", "--port", f"tcp:{port}:interface=127.0.0.1",
                   "--host", "127.0.0.1", "--dest_port", str(backends[0]))
    return lab.start(argv, "twisted-portforward", port), [port]


def txlbConfig(port: int, backends: list[int], extra: str = "") -> str:
    servers = ",\n".join(
        f'  {{ name = "server-{i + 1}", address = "127.0.0.1:{p}" }}' for i, p in enumerate(backends)
    )
    return (
        "[log]\naccess = false\n\n"
        f'[pools.bench]\nalgorithm = "round_robin"\nservers = [\n{servers}\n]\n\n'
        f'[[services]]\nname = "bench"\nprotocol = "tcp"\n'
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\npool = "bench"\n{extra}'
    )


#: What clients send first on a port, by port: a target's PROXY header.
_HEADERS: dict[int, bytes] = {}


def targetTxlbProxy(lab: Lab, backends: list[int], opts) -> tuple[subprocess.Popen, list[int]]:
    """txlb with C{accept_proxy}: each client connection starts with a PROXY v1 header."""
    return targetTxlb(lab, backends, opts, extra="accept_proxy = true\n")


def targetTxlb(lab: Lab, backends: list[int], opts, extra: str = "") -> tuple[subprocess.Popen, list[int]]:
    port = _freePort()
    if extra:
        _HEADERS[port] = b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 %d\r\n" % port
    config = lab.dir / "txlb.toml"
    config.write_text(txlbConfig(port, backends, extra))
    if opts.txlb:
        argv = shlex.split(opts.txlb.format(config=config, port=port))
    else:
        argv = _twistd("txlb", "--config", str(config))
    env = dict(os.environ)
    # This checkout first, so its twisted/plugins/txlb_plugin.py is found
    # whether or not txlb is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return lab.start(argv, "txlb", port, env=env), [port]


TARGETS = {
    "direct": targetDirect,
    "twisted-portforward": targetPortforward,
    "txlb": targetTxlb,
    "txlb-proxy": targetTxlbProxy,
}


# ---- one measured run -----------------------------------------------------


def run(workload: str, ports: list[int], proc: Optional[subprocess.Popen], opts) -> dict:
    """
    Drive C{ports} with C{workload} until its count or --duration is
    reached; return throughput, errors and the proxy's CPU time.
    """
    if workload == "connect":
        clients, count, size = opts.connect_clients, opts.connections, 0
    else:
        clients, count, size = opts.bulk_clients, opts.transfers, opts.transfer_mib * MiB
    go = _FORK.Event()
    workers = []
    for i in range(clients):
        share = count // clients + (i < count % clients)
        receive, send = _FORK.Pipe(duplex=False)
        p = _FORK.Process(target=_client, daemon=True,
                          args=(workload, ports, i, share, size, go, opts.duration, opts.timeout, send))
        p.start()
        send.close()
        workers.append((p, receive))
    cpuBefore = _cpuSeconds(proc.pid) if proc else 0.0
    started = time.monotonic()
    go.set()
    # A client ends at most one operation (bounded by --timeout per socket
    # call) after --duration; past that it is stalled and is killed.
    limit = started + opts.duration + opts.timeout * 3 + 10
    outcomes, stalled = [], 0
    for p, receive in workers:
        if receive.poll(max(0.0, limit - time.monotonic())):
            with contextlib.suppress(EOFError):
                outcomes.append(receive.recv())
        else:
            stalled += 1
    elapsed = time.monotonic() - started
    cpu = (_cpuSeconds(proc.pid) - cpuBefore) if proc else None
    for p, receive in workers:
        p.join(1)
        if p.is_alive():
            p.kill()
            p.join(5)
        receive.close()

    done = sum(o["done"] for o in outcomes)
    nbytes = sum(o["bytes"] for o in outcomes)
    latencies = sorted(x for o in outcomes for x in o["latencies"])
    backends: dict[str, int] = {}
    for o in outcomes:
        for name, n in o["backends"].items():
            backends[name] = backends.get(name, 0) + n
    result = dict(
        workload=workload,
        clients=clients,
        seconds=round(elapsed, 3),
        done=done,
        errors=sum(o["errors"] for o in outcomes) + stalled,
        stalledClients=stalled,
        firstError=next((o["firstError"] for o in outcomes if o["firstError"]), ""),
        mib=nbytes / MiB,
        backends=backends,
    )
    if workload == "connect":
        result["conn_s"] = done / elapsed
        if latencies:
            result["p50_ms"] = latencies[len(latencies) // 2] * 1000
            result["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    else:
        result["mib_s"] = nbytes / MiB / elapsed
    if cpu is not None:
        result["cpu_s"] = cpu
        if workload == "connect" and done:
            result["cpu_us_per_conn"] = cpu / done * 1e6
        elif nbytes:
            result["cpu_us_per_mib"] = cpu / (nbytes / MiB) * 1e6
        result["rss_mib"] = _rssMiB(proc.pid)
    return result


def report(results: dict, opts) -> str:
    def f(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))

    lines = [
        f"# txlb TCP benchmark: {opts.duration:g}s cap per run, {opts.repeat} round(s), medians; "
        "ratio = target / direct",
        "# cpu-us: user+system CPU of the proxy process, per MiB moved or per connection",
        "",
    ]
    titles = {
        "download": f"download (backend -> client): {opts.transfer_mib} MiB per connection, "
                    f"{opts.bulk_clients} parallel clients",
        "upload": f"upload (client -> backend): {opts.transfer_mib} MiB per connection, "
                  f"{opts.bulk_clients} parallel clients",
        "connect": f"connect: connect, send a line, read the answer, close; "
                   f"{opts.connect_clients} parallel clients",
    }
    for workload in opts.workloads:
        rate, unit, cpuKey, cpuUnit = (
            ("conn_s", "conn/s", "cpu_us_per_conn", "cpu-us/conn") if workload == "connect"
            else ("mib_s", "MiB/s", "cpu_us_per_mib", "cpu-us/MiB")
        )
        lines.append(f"## {titles[workload]}")
        header = f"{'target':20} {unit:>9} {'ratio':>6} {cpuUnit:>12}"
        if workload == "connect":
            header += f" {'p50 ms':>7} {'p99 ms':>7}"
        lines.append(header + f" {'rss MiB':>8} {'errors':>6}")
        base = _median(results.get("direct", {}).get(workload, []), rate)
        for target in opts.targets:
            rs = results[target][workload]
            value = _median(rs, rate)
            ratio = value / base if value is not None and base else None
            line = f"{target:20} {f(value, '9.1f')} {f(ratio, '6.2f')} {f(_median(rs, cpuKey), '12.1f')}"
            if workload == "connect":
                line += f" {f(_median(rs, 'p50_ms'), '7.2f')} {f(_median(rs, 'p99_ms'), '7.2f')}"
            errors = sum(r["errors"] for r in rs)
            line += f" {f(_median(rs, 'rss_mib'), '8.1f')} {errors:6d}"
            lines.append(line)
        lines.append("")
    problems = [
        f"{target} {workload} round {i + 1}: {r['errors']} errors"
        + (f", {r['stalledClients']} client(s) stalled" if r["stalledClients"] else "")
        + (f"; first: {r['firstError']}" if r["firstError"] else "")
        for target, workloads in results.items()
        for workload, rs in workloads.items()
        for i, r in enumerate(rs)
        if r["errors"]
    ]
    spread = {
        target: workloads["connect"][0]["backends"]
        for target, workloads in results.items()
        if workloads.get("connect")
    }
    if spread:
        lines.append("## backends answering the connect workload (first round)")
        lines += [f"{t:20} {json.dumps(s, sort_keys=True)}" for t, s in spread.items()]
        lines.append("")
    if problems:
        lines.append("## errors (anything but none is a bug)")
        lines += problems
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run at most (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported (default 1)")
    ap.add_argument("--json", default="", help="write every run's figures to this file")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ",".join(TARGETS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    ap.add_argument("--backends", type=int, default=2, help="backend processes (default 2)")
    ap.add_argument("--bulk-clients", type=int, default=4, help="parallel clients for download/upload (default 4)")
    ap.add_argument("--transfer-mib", type=int, default=10, help="MiB per download/upload connection (default 10)")
    ap.add_argument("--transfers", type=int, default=2000, help="transfers per run at most (default 2000)")
    ap.add_argument("--connect-clients", type=int, default=8, help="parallel clients for connect (default 8)")
    ap.add_argument("--connections", type=int, default=20000, help="connections per run at most (default 20000)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds a socket call may block (default 10)")
    ap.add_argument("--txlb", default="", help="command for txlb with {config} (and {port}); "
                    "default: this interpreter's twistd -n --pidfile= txlb --config {config}")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs)")
    opts = ap.parse_args(argv)
    opts.targets = [t for t in opts.targets.split(",") if t]
    opts.workloads = [w for w in opts.workloads.split(",") if w]
    for name, known in (("target", TARGETS), ("workload", WORKLOADS)):
        unknown = [x for x in getattr(opts, name + "s") if x not in known]
        if unknown:
            ap.error(f"unknown {name}(s): {', '.join(unknown)}")
    if opts.transfer_mib * MiB > len(_PAYLOAD):
        ap.error(f"--transfer-mib is at most {len(_PAYLOAD) // MiB}")

    lab = Lab(opts.keep)
    results = {t: {w: [] for w in opts.workloads} for t in opts.targets}
    try:
        backends = lab.startBackends(opts.backends)
        for round in range(opts.repeat):
            for target in opts.targets:
                proc, ports = TARGETS[target](lab, backends, opts)
                try:
                    for workload in opts.workloads:
                        r = run(workload, ports, proc, opts)
                        results[target][workload].append(r)
                        print(f"# round {round + 1} {target} {workload}: "
                              + (f"{r['conn_s']:.0f} conn/s" if workload == "connect" else f"{r['mib_s']:.1f} MiB/s")
                              + (f", {r['errors']} errors" if r["errors"] else ""),
                              file=sys.stderr, flush=True)
                        if proc is not None and proc.poll() is not None:
                            raise RuntimeError(f"{target} exited with {proc.returncode} during {workload}")
                finally:
                    if proc is not None:
                        lab.stop(proc)
    finally:
        lab.close()
    print(report(results, opts))
    if opts.json:
        Path(opts.json).write_text(json.dumps(
            {"duration": opts.duration, "repeat": opts.repeat, "results": results}, indent=2))
    return 1 if any(r["errors"] for ws in results.values() for rs in ws.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
