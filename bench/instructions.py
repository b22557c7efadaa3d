#!/usr/bin/env python3
"""
Instructions per HTTP keep-alive request through txlb, counted by
valgrind's callgrind: a figure that does not move with what else the
machine is doing, for comparing two settings of txlb (by default access
events off and on) where CPU time on a shared machine is too noisy.

Each setting runs txlb under twistd inside callgrind with instrumentation
off; once txlb answers, C{--warmup} requests are sent, instrumentation is
switched on (C{callgrind_control -i on}), C{--requests} requests are sent
on C{--connections} keep-alive connections, and the counts are dumped.
Instructions of the whole process are counted, the access log's batched
JSON formatting and writes included; the kernel's work for the system
calls is not (it is the same for both settings but for the log file's
writes).  The backend is a small asyncio server in its own process, not
counted.

With C{--streams N} the requests are HTTP/2 instead (prior knowledge, sent
by C{h2load} with N concurrent streams on each connection), for what an
HTTP/2 request costs.

    python3 bench/instructions.py
    python3 bench/instructions.py --requests 3000 --settings off,on --json instructions.json
    python3 bench/instructions.py --settings off --streams 100 --connections 2 --requests 4000

Needs valgrind (Debian's package), and h2load (C{nghttp2-client}) for
C{--streams}; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_BACKEND = r"""
import asyncio, sys
BODY = b"hello, world\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s" % (len(BODY), BODY)
async def serve(reader, writer):
    buffered = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        buffered += data
        count = buffered.count(b"\r\n\r\n")
        if count:
            buffered = buffered[buffered.rindex(b"\r\n\r\n") + 4:]
            writer.write(ANSWER * count)
            await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

#: What each setting changes in the generated config.
SETTINGS = {
    "off": {"access": "false"},
    "on": {"access": "true"},
}


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(directory: Path, port: int, backend: int, setting: str) -> Path:
    path = directory / f"txlb-{setting}.toml"
    path.write_text(
        f'[log]\naccess = {SETTINGS[setting]["access"]}\nformat = "json"\n'
        f'path = "{directory / ("events-" + setting + ".log")}"\n\n'
        f'[pools.web]\nalgorithm = "round_robin"\nhealth = {{ kind = "none" }}\n'
        f'servers = [{{ name = "b1", address = "tcp:127.0.0.1:{backend}" }}]\n\n'
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "web"\n'
    )
    return path


def requests(port: int, count: int, connections: int, deadline: float) -> int:
    """Send C{count} GETs over C{connections} keep-alive connections, one at a time on each; answers read."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    done = 0
    try:
        while done < count and time.monotonic() < deadline:
            for s in socks:
                s.sendall(request)
            for s in socks:
                data = b""
                while not (b"\r\n\r\n" in data and data.endswith(b"hello, world\n")):
                    chunk = s.recv(65536)
                    if not chunk:
                        raise RuntimeError("txlb closed the connection")
                    data += chunk
            done += connections
    finally:
        for s in socks:
            s.close()
    return done


def h2Requests(port: int, count: int, connections: int, streams: int, deadline: float) -> int:
    """C{count} HTTP/2 GETs by h2load: C{streams} at a time on each of C{connections}; the ones that succeeded."""
    argv = ["h2load", "-n", str(count), "-c", str(connections), "-m", str(streams), f"http://127.0.0.1:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic())).stdout
    match = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    if match is None:
        raise RuntimeError("unreadable h2load output: " + out[-300:])
    return int(match.group(1))


def waitListening(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("txlb exited while starting under callgrind")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)  # polling a start-up, not timing a measurement
    raise RuntimeError("txlb did not listen in time")


def totalInstructions(path: Path) -> int:
    for line in path.read_text().splitlines():
        match = re.match(r"(?:summary|totals):\s+(\d+)", line)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"no totals in {path}")


def measure(directory: Path, backend: int, setting: str, opts) -> dict:
    port = freePort()
    out = directory / f"callgrind-{setting}.out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    twistd = Path(sys.executable).with_name("twistd")
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        str(twistd) if twistd.exists() else "twistd", "-n", "--pidfile=", "txlb",
        "--config", str(config(directory, port, backend, setting)),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waitListening(port, process, opts.timeout)
        deadline = time.monotonic() + opts.timeout
        if opts.streams:
            def send(count: int) -> int:
                return h2Requests(port, count, opts.connections, opts.streams, deadline)
        else:
            def send(count: int) -> int:
                return requests(port, count, opts.connections, deadline)
        send(opts.warmup)
        subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True)
        sent = send(opts.requests)
        # The events of the last requests are written at the next batch
        # flush (50 ms, slower under callgrind): that work is theirs.
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # The dump asked for above (counted from "-i on" to "-d"), not the one at exit.
    [dump] = [d for d in directory.glob(f"{out.name}.*") if d.suffix == ".1"]
    total = totalInstructions(dump)
    return {"setting": setting, "requests": sent, "instructions": total, "per_request": total / max(sent, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per setting (default 2000)")
    ap.add_argument("--warmup", type=int, default=200, help="requests before counting starts (default 200)")
    ap.add_argument("--connections", type=int, default=10, help="keep-alive connections (default 10)")
    ap.add_argument("--settings", default="off,on", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--streams", type=int, default=0,
                    help="HTTP/2 by h2load, this many concurrent streams per connection (default 0: HTTP/1.1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per setting (default 300)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--keep", help="keep the configs, event logs and callgrind dumps in this directory")
    opts = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench/instructions.py needs valgrind (apt-get install valgrind)")
    if opts.streams and shutil.which("h2load") is None:
        sys.exit("bench/instructions.py --streams needs h2load (apt-get install nghttp2-client)")
    settings = opts.settings.split(",")
    with tempfile.TemporaryDirectory(prefix="txlb-instructions-") as tmp:
        directory = Path(opts.keep or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        backendPort = freePort()
        backend = subprocess.Popen([sys.executable, "-c", _BACKEND, str(backendPort)], stdout=subprocess.PIPE)
        try:
            backend.stdout.readline()
            results = [measure(directory, backendPort, s, opts) for s in settings]
        finally:
            backend.terminate()
            backend.wait()
    what = f"HTTP/2 request ({opts.streams} streams per connection)" if opts.streams else "keep-alive request"
    print(f"# instructions per {what} through txlb under callgrind "
          f"({opts.requests} requests, {opts.connections} connections)")
    base = results[0]["per_request"]
    for r in results:
        print(f"{r['setting']:<8} {r['per_request']:>12,.0f} instr/req  {r['per_request'] / base:5.2f}x  "
              f"({r['requests']} requests)")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
