#!/usr/bin/env python3
"""
HTTP requests/s and CPU time per request through txlb's HTTP proxy, beside
the same load sent to a backend directly and, as a reference, through
Twisted's own C{ReverseProxyResource}.

Everything runs on 127.0.0.1 and is started and stopped here:

- backends: three virtual servers in one nginx process when nginx is
  installed (the fastest thing available: it leaves the CPU to the proxy),
  else one small asyncio process each (C{--backend python}).  Each answers
  C{GET /} with a 13-byte body, C{GET /big} with 10 MiB, and sends
  C{X-Backend: server-N}.
- targets: C{direct} (wrk at the first backend: the physical limit),
  C{txlb} (a generated config: one HTTP service, one C{round_robin} pool of
  the backends, no health checks, C{[log] access = false}), C{txlb+access}
  (the same with access events on, written as JSON lines to a file, as in
  real use) and C{twisted-webproxy} (C{ReverseProxyResource} to the first
  backend, run by twistd from a generated C{.tac} file).
- load: wrk when installed (C{--duration} seconds per run), else Python
  clients in their own processes, each bounded by C{--requests} and by
  C{--duration}.

Workloads:

    keepalive   GET / (13-byte body), 50 keep-alive connections      (req/s)
    close       GET / with Connection: close, 20 connections       (req/s)
    bulk        GET /big (10 MiB), 4 connections                     (MiB/s)

The machine this runs on is shared and noisy: read the ratios to C{direct}
and the proxy's CPU time per request (user+system of the proxy's process
tree from C{/proc/PID/stat}, before and after the run), not the absolute
figures.

    python3 bench/http.py
    python3 bench/http.py --duration 5 --repeat 3 --json http.json
    python3 bench/http.py --targets direct,txlb --workloads keepalive --access-log on
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's http package: keep its
# directory off the import path so that nothing imported here finds it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SMALL_BODY = b"hello, world\n"  # 13 bytes, as lbbench's backends
BIG_MIB = 10
_FORK = multiprocessing.get_context("fork")
_BIG = memoryview(b"x" * (BIG_MIB * MiB))  # the Python backends' /big, shared by their connections

#: workload -> (connections, path, extra request header or None)
WORKLOADS = {
    "keepalive": (50, "/", None),
    "close": (20, "/", "Connection: close"),
    "bulk": (4, "/big", None),
}
#: The Python client's connections (processes) per workload, when wrk is missing.
PY_CLIENTS = {"keepalive": 8, "close": 8, "bulk": 4}


# ---- the backends -----------------------------------------------------------


def nginxBackends(lab: "Lab", n: int) -> list[int]:
    """n virtual servers in one single-worker nginx process."""
    ports = [_freePort() for _ in range(n)]
    www = lab.dir / "www"
    www.mkdir(exist_ok=True)
    (www / "big").write_bytes(b"x" * (BIG_MIB * MiB))
    body = SMALL_BODY.decode().replace("\n", "\\n")
    servers = "".join(textwrap.dedent(f"""
        server {{
            listen 127.0.0.1:{port} reuseport backlog=4096;
            keepalive_requests 1000000;
            add_header X-Backend server-{i + 1} always;
            location = / {{ return 200 "{body}"; }}
            location = /health {{ return 200 "ok\\n"; }}
            location = /big {{ root {www}; }}
        }}""") for i, port in enumerate(ports))
    d = lab.dir
    conf = d / "backends.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        error_log {d / 'backends.err'} crit;
        pid {d / 'backends.pid'};
        events {{ worker_connections 8192; }}
        http {{
            access_log off;
            sendfile on;
            client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
            uwsgi_temp_path {d}; scgi_temp_path {d};
        """) + servers + "\n}\n")
    lab.start(["nginx", "-p", str(d), "-c", str(conf)], "backends", ports[0])
    for port in ports[1:]:
        if not _waitPort(port, lambda: True):
            raise RuntimeError(f"nginx backend did not listen on 127.0.0.1:{port}")
    return ports


class _BackendProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 server: GET only, no request bodies."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.abort()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            close = any(l.lower().replace(b" ", b"") == b"connection:close" for l in lines[1:])
            path = parts[1] if len(parts) == 3 else b""
            body = _BIG if path == b"/big" else SMALL_BODY if path == b"/" else None
            status = b"200 OK" if body is not None else b"404 Not Found"
            body = b"" if body is None else body
            head = (b"HTTP/1.1 %s\r\nContent-Length: %d\r\nX-Backend: %s\r\n%s\r\n"
                    % (status, len(body), self.name, b"Connection: close\r\n" if close else b""))
            if len(body) < 65536:
                self.transport.write(head + body)  # one segment: no Nagle/delayed-ACK stall
            else:
                self.transport.write(head)
                self.transport.write(body)
            if close:
                self.transport.close()
                return


def _serveBackend(sock: socket.socket, name: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _BackendProtocol(name.encode()), sock=sock)
        await server.serve_forever()

    asyncio.run(serve())


def pythonBackends(lab: "Lab", n: int) -> list[int]:
    ports = []
    for i in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        ports.append(sock.getsockname()[1])
        p = _FORK.Process(target=_serveBackend, args=(sock, f"server-{i + 1}"), daemon=True)
        p.start()
        sock.close()
        lab.backendProcesses.append(p)
    return ports


# ---- processes and CPU time: the shared lab ----------------------------------


def _loadLab():
    """bench/_lab.py, loaded by path: this directory is kept off sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_lab", Path(__file__).with_name("_lab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_lab = _loadLab()
_cpuSeconds, _freePort, _median = _lab.cpuSeconds, _lab.freePort, _lab.median
_rssMiB, _twistd, _waitPort = _lab.rssMiB, _lab.twistd, _lab.waitPort


class Lab(_lab.Lab):
    prefix = "txlb-bench-http-"


# ---- targets: each returns (process or None, port, log name or None) ------


def targetDirect(lab: Lab, backends: list[int], opts):
    return None, backends[0], None


def targetWebproxy(lab: Lab, backends: list[int], opts):
    port = _freePort()
    tac = lab.dir / "webproxy.tac"
    tac.write_text(textwrap.dedent(f"""
        from twisted.application import internet, service
        from twisted.web import proxy, server

        application = service.Application("webproxy")
        site = server.Site(proxy.ReverseProxyResource("127.0.0.1", {backends[0]}, b""))
        internet.TCPServer({port}, site, interface="127.0.0.1").setServiceParent(application)
        """))
    return lab.start(_twistd("-y", str(tac)), "twisted-webproxy", port), port, "twisted-webproxy"


def txlbConfig(port: int, backends: list[int], access: bool, logPath: str) -> str:
    servers = ",\n".join(
        f'  {{ name = "server-{i + 1}", address = "127.0.0.1:{p}" }}' for i, p in enumerate(backends)
    )
    log = f'[log]\naccess = {"true" if access else "false"}\nformat = "json"\npath = "{logPath}"\n\n'
    return (
        log
        + f'[pools.bench]\nalgorithm = "round_robin"\nservers = [\n{servers}\n]\n\n'
        + '[pools.bench.health]\nkind = "none"\n\n'
        + '[[services]]\nname = "bench"\nprotocol = "http"\n'
        + f'listen = ["tcp:{port}:interface=127.0.0.1"]\npool = "bench"\n'
    )


def _targetTxlb(access: bool):
    def start(lab: Lab, backends: list[int], opts):
        name = "txlb+access" if access else "txlb"
        port = _freePort()
        events = lab.dir / f"{name}.events"
        config = lab.dir / f"{name}.toml"
        config.write_text(txlbConfig(port, backends, access, str(events)))
        if opts.txlb:
            argv = shlex.split(opts.txlb.format(config=config, port=port))
        else:
            argv = _twistd("txlb", "--config", str(config))
        env = dict(os.environ)
        # This checkout first, so its twisted/plugins/txlb_plugin.py is found
        # whether or not txlb is installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return lab.start(argv, name, port, env=env), port, name
    return start


TARGETS = {
    "direct": targetDirect,
    "txlb": _targetTxlb(False),
    "txlb+access": _targetTxlb(True),
    "twisted-webproxy": targetWebproxy,
}


# ---- load: wrk ---------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_SIZES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def parseWrk(out: str) -> dict:
    r: dict = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    r["done"] = int(m.group(1)) if m else 0
    seconds = float(m.group(2)) * _UNITS.get(m.group(3), 1.0) / 1000 if m else 0.0
    nbytes = float(m.group(4)) * _SIZES.get(m.group(5), 1) if m else 0.0
    r["seconds"] = seconds
    r["req_s"] = r["done"] / seconds if seconds else 0.0
    r["mib_s"] = nbytes / MiB / seconds if seconds else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s)\b", out)
        r[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else None
    socketErrors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        socketErrors = sum(int(x) for x in m.groups())
        r["socketErrors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    r["errors"] = socketErrors + r["non2xx"]
    r["firstError"] = ""
    if r["errors"]:
        r["firstError"] = " ".join(
            line.strip() for line in out.splitlines() if "errors" in line or "Non-2xx" in line
        )
    return r


def runWrk(workload: str, port: int, seconds: float, opts) -> dict:
    connections, path, header = WORKLOADS[workload]
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", f"{opts.timeout:g}s",
            "--latency"]
    if header:
        argv += ["-H", header]
    argv.append(f"http://127.0.0.1:{port}{path}")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + opts.timeout + 30).stdout
    except subprocess.TimeoutExpired:
        return dict(done=0, seconds=seconds, req_s=0.0, mib_s=0.0, p50_ms=None, p99_ms=None,
                    non2xx=0, errors=1, firstError="wrk did not finish in time")
    return parseWrk(out)


# ---- load: Python clients (when wrk is missing) ------------------------------


def _readResponse(sock: socket.socket, buffer: bytearray) -> tuple[int, int, bool]:
    """One response from C{sock}: (status, body bytes, server closes)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF inside a response head")
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end]).split(b"\r\n")
    del buffer[:end + 4]
    status = int(head[0].split(b" ")[1])
    length, close = None, False
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
        elif name == b"transfer-encoding":
            raise ConnectionError("chunked responses are not expected here")
    if length is None:
        raise ConnectionError("a response without Content-Length")
    got = min(length, len(buffer))
    del buffer[:got]
    remaining = length - got
    view = memoryview(bytearray(1 << 20))
    while remaining:
        n = sock.recv_into(view, min(remaining, len(view)))
        if not n:
            raise ConnectionError(f"EOF with {remaining} body bytes still expected")
        remaining -= n
    return status, length, close


def _client(workload: str, port: int, count: int, go, deadline: float, timeout: float, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, path, header = WORKLOADS[workload]
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               + (header + "\r\n" if header else "") + "\r\n").encode()
    done = errors = non2xx = nbytes = 0
    latencies: list[float] = []
    firstError = ""
    sock = None
    buffer = bytearray()
    go.wait()
    end = time.monotonic() + deadline
    while done + errors < count and time.monotonic() < end:
        started = time.monotonic()
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer.clear()
            sock.sendall(request)
            status, length, close = _readResponse(sock, buffer)
        except (OSError, ValueError, IndexError) as e:
            errors += 1
            firstError = firstError or f"{type(e).__name__}: {e}"
            if sock is not None:
                sock.close()
                sock = None
            continue
        latencies.append(time.monotonic() - started)
        done += 1
        nbytes += length
        if not 200 <= status < 400:
            non2xx += 1
            firstError = firstError or f"status {status}"
        if close or header:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    results.send(dict(done=done, errors=errors, non2xx=non2xx, bytes=nbytes, latencies=latencies,
                      firstError=firstError))
    results.close()


def runPython(workload: str, port: int, seconds: float, opts) -> dict:
    clients = PY_CLIENTS[workload]
    go = _FORK.Event()
    workers = []
    for i in range(clients):
        share = opts.requests // clients + (i < opts.requests % clients)
        receive, send = _FORK.Pipe(duplex=False)
        p = _FORK.Process(target=_client, daemon=True,
                          args=(workload, port, share, go, seconds, opts.timeout, send))
        p.start()
        send.close()
        workers.append((p, receive))
    started = time.monotonic()
    go.set()
    limit = started + seconds + opts.timeout * 3 + 10
    outcomes, stalled = [], 0
    for p, receive in workers:
        if receive.poll(max(0.0, limit - time.monotonic())):
            with contextlib.suppress(EOFError):
                outcomes.append(receive.recv())
        else:
            stalled += 1
    elapsed = time.monotonic() - started
    for p, receive in workers:
        p.join(1)
        if p.is_alive():
            p.kill()
            p.join(5)
        receive.close()
    done = sum(o["done"] for o in outcomes)
    latencies = sorted(x for o in outcomes for x in o["latencies"])
    non2xx = sum(o["non2xx"] for o in outcomes)
    r = dict(
        done=done,
        seconds=elapsed,
        req_s=done / elapsed,
        mib_s=sum(o["bytes"] for o in outcomes) / MiB / elapsed,
        non2xx=non2xx,
        errors=sum(o["errors"] for o in outcomes) + non2xx + stalled,
        firstError=next((o["firstError"] for o in outcomes if o["firstError"]), ""),
        p50_ms=None,
        p99_ms=None,
    )
    if stalled:
        r["firstError"] = f"{stalled} client(s) stalled; " + r["firstError"]
    if latencies:
        r["p50_ms"] = latencies[len(latencies) // 2] * 1000
        r["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return r


# ---- one measured run --------------------------------------------------------


def _eventCount(path: Path) -> int:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return sum(1 for line in f if b'"event":"request"' in line)
    return 0


def run(workload: str, port: int, proc: Optional[subprocess.Popen], opts) -> dict:
    """Drive C{port} with C{workload} for --duration; add the proxy's CPU time."""
    load = runWrk if opts.client == "wrk" else runPython
    if opts.warmup > 0:
        load(workload, port, opts.warmup, opts)
    cpuBefore = _cpuSeconds(proc.pid) if proc else 0.0
    r = load(workload, port, opts.duration, opts)
    r["workload"] = workload
    if proc is not None:
        cpu = _cpuSeconds(proc.pid) - cpuBefore
        r["cpu_s"] = cpu
        r["cpu_us_per_req"] = cpu / r["done"] * 1e6 if r["done"] else None
        r["rss_mib"] = _rssMiB(proc.pid)
    return r


def report(results: dict, notes: dict, opts) -> str:
    def f(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))

    lines = [
        f"# txlb HTTP benchmark: {opts.duration:g}s per run, {opts.repeat} round(s), medians; "
        f"load from {opts.client}, backends: {opts.backend}",
        "# ratio = req/s over direct; cpu-us/req = user+system CPU of the proxy's processes per request",
        "",
        f"{'workload':10} {'target':17} {'req/s':>9} {'MiB/s':>8} {'ratio':>6} {'cpu-us/req':>10} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'rss MiB':>7} {'errors':>6}",
    ]
    for workload in opts.workloads:
        base = _median(results.get("direct", {}).get(workload, []), "req_s")
        for target in opts.targets:
            rs = results[target][workload]
            rate = _median(rs, "req_s")
            ratio = rate / base if rate is not None and base else None
            lines.append(
                f"{workload:10} {target:17} {f(rate, '9.0f')} {f(_median(rs, 'mib_s'), '8.1f')} {f(ratio, '6.2f')} "
                f"{f(_median(rs, 'cpu_us_per_req'), '10.1f')} {f(_median(rs, 'p50_ms'), '7.2f')} "
                f"{f(_median(rs, 'p99_ms'), '7.2f')} {f(_median(rs, 'rss_mib'), '7.1f')} "
                f"{sum(r['errors'] for r in rs):6d}"
            )
        lines.append("")
    if "txlb" in opts.targets and "txlb+access" in opts.targets:
        lines.append("## cost of access events: txlb+access minus txlb, per request")
        for workload in opts.workloads:
            off = _median(results["txlb"][workload], "cpu_us_per_req")
            on = _median(results["txlb+access"][workload], "cpu_us_per_req")
            if off and on:
                lines.append(f"{workload:10} {on - off:+.1f} cpu-us/req ({on / off:.2f}x)")
        lines.append("")
    for text in notes.values():
        lines.append(text)
    problems = [
        f"{target} {workload} round {i + 1}: {r['errors']} errors ({r.get('non2xx', 0)} non-2xx/3xx)"
        + (f"; {r['firstError']}" if r.get("firstError") else "")
        for target, workloads in results.items()
        for workload, rs in workloads.items()
        for i, r in enumerate(rs)
        if r["errors"]
    ]
    if problems:
        lines.append("## errors (anything but none is a bug)")
        lines += problems
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported (default 1)")
    ap.add_argument("--json", default="", help="write every run's figures to this file")
    ap.add_argument("--access-log", choices=("off", "on", "both"), default="both",
                    help="txlb's access events: off (target txlb), on (txlb+access) or both (default)")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help="comma-separated, from: " + ",".join(TARGETS) + " (default all; see --access-log)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    ap.add_argument("--backend", choices=("auto", "nginx", "python"), default="auto",
                    help="backend servers: nginx when installed (auto), or asyncio processes")
    ap.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                    help="load generator: wrk when installed (auto), or Python client processes")
    ap.add_argument("--requests", type=int, default=200000,
                    help="requests per run at most, Python clients only (wrk is bounded by --duration)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds of load before each run")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds a request may take (default 5)")
    ap.add_argument("--txlb", default="", help="command for txlb with {config} (and {port}); "
                    "default: this interpreter's twistd -n --pidfile= txlb --config {config}")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs, events)")
    opts = ap.parse_args(argv)
    opts.targets = [t for t in opts.targets.split(",") if t]
    opts.workloads = [w for w in opts.workloads.split(",") if w]
    for name, known in (("target", TARGETS), ("workload", WORKLOADS)):
        unknown = [x for x in getattr(opts, name + "s") if x not in known]
        if unknown:
            ap.error(f"unknown {name}(s): {', '.join(unknown)}")
    if opts.access_log == "off":
        opts.targets = [t for t in opts.targets if t != "txlb+access"]
    elif opts.access_log == "on":
        opts.targets = [t for t in opts.targets if t != "txlb"]
    if opts.backend == "auto":
        opts.backend = "nginx" if shutil.which("nginx") else "python"
    if opts.client == "auto":
        opts.client = "wrk" if shutil.which("wrk") else "python"

    lab = Lab(opts.keep)
    results: dict = {t: {w: [] for w in opts.workloads} for t in opts.targets}
    notes: dict = {}
    try:
        backends = nginxBackends(lab, 3) if opts.backend == "nginx" else pythonBackends(lab, 3)
        for round in range(opts.repeat):
            for target in opts.targets:
                proc, port, logName = TARGETS[target](lab, backends, opts)
                try:
                    for workload in opts.workloads:
                        r = run(workload, port, proc, opts)
                        results[target][workload].append(r)
                        print(f"# round {round + 1} {target} {workload}: {r['req_s']:.0f} req/s"
                              + (f", {r['cpu_us_per_req']:.1f} cpu-us/req" if r.get("cpu_us_per_req") else "")
                              + (f", {r['errors']} errors" if r["errors"] else ""),
                              file=sys.stderr, flush=True)
                        if proc is not None and proc.poll() is not None:
                            raise RuntimeError(f"{target} exited with {proc.returncode} during {workload}:\n"
                                               + lab.logTail(logName))
                finally:
                    if proc is not None:
                        lab.stop(proc)
                if logName:
                    text = lab.logTail(logName, 1 << 20)
                    tracebacks = text.count("Traceback")
                    if tracebacks:
                        m = re.search(r"^\s*([\w.]+(?:Error|Exception|Lost|Done)\b.*)$",
                                      text[text.index("Traceback"):], re.MULTILINE)
                        last = m.group(1) if m else ""
                        notes[f"{target}-tb"] = (f"## {target} logged {tracebacks} traceback(s) in round {round + 1} "
                                                 f"(see its log with --keep); the first: {last[:300]}\n")
                if target == "txlb+access":
                    events = _eventCount(lab.dir / "txlb+access.events")
                    served = sum(results[target][w][-1]["done"] for w in opts.workloads)
                    notes[target] = (f"## txlb+access round {round + 1}: {events} request events written, "
                                     f"{served} requests counted by the client (warm-up requests and "
                                     "requests cut at the end of a run are logged too)\n")
                    with contextlib.suppress(OSError):
                        (lab.dir / "txlb+access.events").unlink()
    finally:
        lab.close()
    print(report(results, notes, opts))
    if opts.json:
        Path(opts.json).write_text(json.dumps(
            {"duration": opts.duration, "repeat": opts.repeat, "client": opts.client, "backend": opts.backend,
             "results": results}, indent=2))
    return 1 if any(r["errors"] for ws in results.values() for rs in ws.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
