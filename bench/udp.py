#!/usr/bin/env python3
"""
UDP datagrams per second through txlb, beside nginx's stream UDP proxy and
the same load sent to the backends directly, in one run.

Everything runs on 127.0.0.1 and is started here: the backends (UDP echo
servers, one process each), nginx (one worker, the C{stream} module loaded
with C{load_module}; left out, with a message, when nginx or the module is
missing), txlb with a generated config, and the load itself.

The load: C{--clients} processes, each with C{--flows} sockets of its own
(a flow each: its own source port) connected to the target.  Each socket
keeps at most C{--window} datagrams outstanding: a new one is sent only
when an answer comes back, so the rate is paced by the answers and the
proxy's socket buffers never overflow because of the load generator alone.
A run stops at C{--datagrams} answered or C{--duration} seconds, whichever
comes first.  When a socket gets no answer for C{--timeout} seconds, what
it had outstanding is counted lost and its window is refilled; at the end,
what is still outstanding after C{--timeout} is lost too.

Workloads (each bounded by the count and the time above):

    small    64-byte datagrams (a DNS query's size), window 8       (datagrams/s)
    large    1400-byte datagrams (about an Ethernet MTU), window 4  (datagrams/s)
    newflow  64 bytes, each from a new socket: a flow per datagram,
             as DNS clients that pick a new source port per query   (datagrams/s)

For newflow the proxies listen on a second port set up for it: nginx
ends a session at its first answer (C{proxy_responses 1}), txlb's flows
there have a 250 ms idle timeout (and C{max_flows} 15 000); each client
sends from 1000 loopback addresses in turn, so that no source address and
port comes back while its last flow may still live.

The machine this runs on is shared and noisy: read the ratios and the
proxy's CPU time per datagram (user+system from C{/proc/PID/stat}, of the
proxy's whole process tree), not the absolute figures.

    python3 bench/udp.py
    python3 bench/udp.py --duration 5 --repeat 3 --json udp.json
    python3 bench/udp.py --targets direct,txlb --workloads small --clients 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lab import Lab as _Lab  # noqa: E402
from _lab import cpuSeconds, median, rssMiB, twistd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_FORK = multiprocessing.get_context("fork")

#: workload -> (datagram size in bytes, datagrams outstanding per flow by
#: default, a new flow per datagram).  Large datagrams get a smaller
#: window: 16 flows of 8 would overflow a proxy's listening socket at its
#: default receive buffer (about 208 KiB on Linux, each datagram taking
#: about 2.3 KiB of it), and what is measured would be losses.
WORKLOADS = {"small": (64, 8, False), "large": (1400, 4, False), "newflow": (64, 1, True)}


# ---- the backends ---------------------------------------------------------


def _echo(sock: socket.socket) -> None:
    """A UDP echo server: every datagram goes back to where it came from."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, address = recvfrom(65535)
        try:
            sendto(data, address)
        except OSError:
            pass  # a full buffer or a client gone: the datagram is lost, as on a network


def freeUDPPort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int, alive, timeout: float = 20.0) -> bool:
    """Whether something on C{port} echoes a datagram within C{timeout} (while C{alive()})."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.2)
        while time.monotonic() < deadline and alive():
            try:
                s.sendto(b"probe", ("127.0.0.1", port))
                while True:
                    data, source = s.recvfrom(65535)
                    if data == b"probe":
                        return True
            except OSError:
                time.sleep(0.05)  # refused (nothing bound yet) or no answer yet: ask again
    return False


class Lab(_Lab):
    """The shared lab, with UDP echo backends and targets ready when they answer."""

    prefix = "txlb-bench-udp-"

    def startBackends(self, n: int) -> list[int]:
        ports = []
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
            p = _FORK.Process(target=_echo, args=(sock,), daemon=True)
            p.start()
            sock.close()
            self.backendProcesses.append(p)
        return ports

    def startUDP(self, argv: list[str], name: str, port: int, env=None) -> subprocess.Popen:
        """C{argv} in a process group of its own, once C{port} echoes a probe."""
        with open(self.dir / f"{name}.log", "wb") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, env=env,
                                 start_new_session=True)
        self.procs.append(p)
        self.waitUDP(p, name, port)
        return p

    def waitUDP(self, p: subprocess.Popen, name: str, port: int) -> None:
        """Until C{port} echoes a probe; C{p} is stopped if it never does."""
        if not answers(port, lambda: p.poll() is None):
            self.stop(p)
            raise RuntimeError(f"{name} did not relay UDP on 127.0.0.1:{port}:\n{self.logTail(name)}")


# ---- the load -------------------------------------------------------------


#: Source addresses each client of newflow cycles through.
SOURCE_ADDRESSES = 1000


def _client(ports: list[int], index: int, flows: int, window: int, count: int, size: int, fresh: bool,
            go, deadline: float, timeout: float, results) -> None:
    """
    One client process: C{flows} connected sockets, each with at most
    C{window} datagrams outstanding, until C{count} are answered or lost,
    or C{deadline} seconds after C{go}.  With C{fresh}, a socket is closed
    once its datagram is answered (or lost) and a new one, with a new
    source port, sends the next: every datagram is a flow of its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    payload = b"x" * size
    poller = select.epoll()
    socks: list[socket.socket] = []
    byFd: dict[int, int] = {}

    opened = 0

    def open_(i: int) -> socket.socket:
        nonlocal opened
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if fresh:
            # A new source port alone would come back within a second or
            # so (the kernel draws from about 28 000), while the flow it
            # started may still live: a new source address too, from
            # 127.0.0.0/8 (all of it is loopback), makes each a new flow.
            k = opened % SOURCE_ADDRESSES
            s.bind((f"127.{1 + index}.{k // 250}.{k % 250 + 1}", 0))
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(("127.0.0.1", 0))
        opened += 1
        s.connect(("127.0.0.1", ports[(index * flows + i) % len(ports)]))
        s.setblocking(False)
        poller.register(s.fileno(), select.EPOLLIN)
        byFd[s.fileno()] = i
        return s

    def renew(i: int) -> None:
        old = socks[i]
        poller.unregister(old.fileno())
        del byFd[old.fileno()]
        old.close()
        socks[i] = open_(i)

    for i in range(flows):
        socks.append(open_(i))
    outstanding = [0] * flows
    sent = received = lost = errors = wrong = 0
    firstError = ""
    go.wait()
    started = time.monotonic()
    end = started + deadline

    def fill(i: int) -> None:
        nonlocal sent, errors, firstError
        send = socks[i].send
        while outstanding[i] < window and sent < count:
            try:
                send(payload)
            except OSError as e:  # a full buffer, or refused: counted, the flow waits for its answers
                errors += 1
                firstError = firstError or f"{type(e).__name__}: {e}"
                return
            outstanding[i] += 1
            sent += 1

    for i in range(flows):
        fill(i)
    lastAnswer = [time.monotonic()] * flows
    while received + lost < count:
        now = time.monotonic()
        if now >= end:
            break
        events = poller.poll(min(timeout / 4, end - now))
        now = time.monotonic()
        for fd, _ in events:
            i = byFd.get(fd)
            if i is None:
                continue  # closed by an earlier event of this batch
            recv = socks[i].recv
            while True:
                try:
                    data = recv(65535)
                except BlockingIOError:
                    break
                except OSError as e:
                    errors += 1
                    firstError = firstError or f"{type(e).__name__}: {e}"
                    break
                if len(data) != size:
                    wrong += 1
                received += 1
                if outstanding[i]:
                    outstanding[i] -= 1
            lastAnswer[i] = now
            if fresh and not outstanding[i]:
                renew(i)
            fill(i)
        for i in range(flows):
            if outstanding[i] and now - lastAnswer[i] >= timeout:
                # Nothing came back on this flow for a while: what it has out there is lost.
                lost += outstanding[i]
                outstanding[i] = 0
                lastAnswer[i] = now
                if fresh:
                    renew(i)
                fill(i)
    elapsed = time.monotonic() - started
    # Answers still on their way are waited for, once, for --timeout.
    waitUntil = time.monotonic() + timeout
    while sum(outstanding) and time.monotonic() < waitUntil:
        for fd, _ in poller.poll(max(0.0, waitUntil - time.monotonic())):
            i = byFd[fd]
            with contextlib.suppress(OSError):
                while True:
                    socks[i].recv(65535)
                    outstanding[i] -= 1
    lost += max(0, sum(outstanding))
    for s in socks:
        s.close()
    poller.close()
    results.send(dict(sent=sent, received=received, lost=lost, errors=errors, wrong=wrong,
                      seconds=elapsed, firstError=firstError))
    results.close()


# ---- targets: each returns (process or None, {kind: ports to load}) ------
#
# A proxy target listens twice: "relay" for the workloads whose flows live
# long, "perflow" for newflow, set up as a DNS service would be: a flow
# ends soon after its answer (nginx: proxy_responses 1; txlb, which has
# no such setting: a 250 ms idle timeout, longer than any answer here).


def targetDirect(lab: Lab, backends: list[int], opts) -> tuple[None, dict[str, list[int]]]:
    return None, {"relay": backends, "perflow": backends}


def nginxStream() -> tuple[Optional[str], str]:
    """
    How to give nginx its stream module: C{("", why)} when it has it built
    in, C{(path, why)} of the dynamic module to load, C{(None, why)} when
    there is none.
    """
    nginx = shutil.which("nginx")
    if nginx is None:
        return None, "nginx is not installed (Debian: apt-get install nginx libnginx-mod-stream)"
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    if re.search(r"--with-stream(\s|$)", built):
        return "", "built in"
    m = re.search(r"--modules-path=(\S+)", built)
    for d in filter(None, [m and m.group(1), "/usr/lib/nginx/modules", "/usr/share/nginx/modules",
                           "/usr/local/nginx/modules"]):
        path = Path(d) / "ngx_stream_module.so"
        if path.exists():
            return str(path), "loaded"
    return None, "nginx has no stream module (Debian: apt-get install libnginx-mod-stream)"


def targetNginx(lab: Lab, backends: list[int], opts) -> tuple[subprocess.Popen, dict[str, list[int]]]:
    """nginx, one worker: two stream servers on UDP ports, round robin over the backends."""
    module, why = nginxStream()
    if module is None:
        raise _Skip(why)
    relay, perflow = freeUDPPort(), freeUDPPort()
    d = lab.dir / "nginx"
    d.mkdir(exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    load = f"load_module {module};" if module else ""
    conf = d / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        {load}
        worker_processes 1;
        worker_rlimit_nofile 20000;
        daemon off;
        error_log {d / 'error.log'} crit;
        pid {d / 'nginx.pid'};
        events {{ worker_connections 16384; }}
        stream {{
            upstream echo {{
        {servers}
            }}
            server {{
                listen 127.0.0.1:{relay} udp;
                proxy_pass echo;
                proxy_timeout 30s;
            }}
            server {{
                listen 127.0.0.1:{perflow} udp;
                proxy_pass echo;
                proxy_timeout 1s;
                proxy_responses 1;
            }}
        }}
        """))
    proc = lab.startUDP(["nginx", "-p", str(d), "-c", str(conf)], "nginx", relay)
    lab.waitUDP(proc, "nginx", perflow)
    return proc, {"relay": [relay], "perflow": [perflow]}


def txlbConfig(relay: int, perflow: int, backends: list[int], workers: int = 1) -> str:
    servers = ",\n".join(f'  {{ name = "server-{i + 1}", address = "127.0.0.1:{p}" }}'
                         for i, p in enumerate(backends))
    head = f"[txlb]\nworkers = {workers}\n\n" if workers > 1 else ""
    return (
        f"{head}[log]\naccess = false\n\n"
        f'[pools.echo]\nalgorithm = "round_robin"\nservers = [\n{servers}\n]\n\n'
        f'[[services]]\nname = "echo"\nprotocol = "udp"\n'
        f'listen = ["udp:{relay}:interface=127.0.0.1"]\npool = "echo"\ntimeouts = {{ idle = "30s" }}\n\n'
        f'[[services]]\nname = "perflow"\nprotocol = "udp"\n'
        f'listen = ["udp:{perflow}:interface=127.0.0.1"]\npool = "echo"\ntimeouts = {{ idle = "250ms" }}\n'
        f"limits = {{ max_flows = {PERFLOW_MAX_FLOWS} }}\n"
    )


#: A flow of newflow lives 250 to 280 ms after its answer: room for more
#: than 50 000 queries a second, within a file limit of 20 000 descriptors.
PERFLOW_MAX_FLOWS = 15_000


def _targetTxlb(workers: int):
    def start(lab: Lab, backends: list[int], opts) -> tuple[subprocess.Popen, dict[str, list[int]]]:
        relay, perflow = freeUDPPort(), freeUDPPort()
        config = lab.dir / f"txlb-w{workers}.toml"
        config.write_text(txlbConfig(relay, perflow, backends, workers))
        if opts.txlb:
            argv = shlex.split(opts.txlb.format(config=config, port=relay))
        else:
            argv = twistd("txlb", "--config", str(config))
        env = dict(os.environ)
        # This checkout first, so its twisted/plugins/txlb_plugin.py is found
        # whether or not txlb is installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        name = f"txlb-w{workers}"
        proc = lab.startUDP(argv, name, relay, env=env)
        lab.waitUDP(proc, name, perflow)
        return proc, {"relay": [relay], "perflow": [perflow]}

    return start


class _Skip(Exception):
    """A target that cannot run here, and why."""


TARGETS = {
    "direct": targetDirect,
    "nginx": targetNginx,
    "txlb": _targetTxlb(1),
    "txlb-w2": _targetTxlb(2),
}
DEFAULT_TARGETS = ("direct", "nginx", "txlb")


# ---- one measured run -----------------------------------------------------


def run(workload: str, ports: dict[str, list[int]], proc: Optional[subprocess.Popen], opts) -> dict:
    """
    Drive C{ports} with C{workload} until its count or --duration is
    reached; return datagrams/s, losses and the proxy's CPU time.
    """
    size, window, fresh = WORKLOADS[workload]
    window = 1 if fresh else (opts.window or window)
    ports = ports["perflow" if fresh else "relay"]
    go = _FORK.Event()
    clients = []
    for i in range(opts.clients):
        share = opts.datagrams // opts.clients + (i < opts.datagrams % opts.clients)
        receive, send = _FORK.Pipe(duplex=False)
        p = _FORK.Process(target=_client, daemon=True,
                          args=(ports, i, opts.flows, window, share, size, fresh, go, opts.duration,
                                opts.timeout, send))
        p.start()
        send.close()
        clients.append((p, receive))
    cpuBefore = cpuSeconds(proc.pid) if proc else 0.0
    started = time.monotonic()
    go.set()
    limit = started + opts.duration + opts.timeout * 3 + 10
    outcomes, stalled = [], 0
    for p, receive in clients:
        if receive.poll(max(0.0, limit - time.monotonic())):
            with contextlib.suppress(EOFError):
                outcomes.append(receive.recv())
        else:
            stalled += 1
    # Read once every client has reported, so over the whole run (the
    # clients' wait for late answers costs an idle proxy nothing).  For
    # newflow, the flows txlb still holds then end after this reading: the
    # last quarter second's share of the teardown is left out.
    cpu = (cpuSeconds(proc.pid) - cpuBefore) if proc else None
    for p, receive in clients:
        p.join(1)
        if p.is_alive():
            p.kill()
            p.join(5)
        receive.close()
    seconds = max((o["seconds"] for o in outcomes), default=0.0)
    received = sum(o["received"] for o in outcomes)
    result = dict(
        workload=workload,
        seconds=round(seconds, 3),
        sent=sum(o["sent"] for o in outcomes),
        received=received,
        lost=sum(o["lost"] for o in outcomes),
        errors=sum(o["errors"] + o["wrong"] for o in outcomes) + stalled,
        stalledClients=stalled,
        firstError=next((o["firstError"] for o in outcomes if o["firstError"]), ""),
        dgram_s=received / seconds if seconds else None,
    )
    if cpu is not None and received:
        result["cpu_s"] = cpu
        result["cpu_us_per_dgram"] = cpu / received * 1e6
        result["rss_mib"] = rssMiB(proc.pid)
    return result


def report(results: dict, notes: dict, opts) -> str:
    def f(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))

    targets = [t for t in opts.targets if t in results]
    lines = [
        f"# txlb UDP benchmark: {opts.clients} clients x {opts.flows} flows, "
        f"{opts.datagrams} datagrams or {opts.duration:g}s per run, {opts.repeat} round(s), medians",
        "# dgram/s: answered datagrams per second (one round trip each); "
        "cpu-us/dgram: user+system CPU of the proxy per round trip",
        "",
    ]
    for workload in opts.workloads:
        size, window, fresh = WORKLOADS[workload]
        lines.append(f"## {workload}: {size}-byte datagrams, echoed, "
                     + ("each from a new socket (a flow per datagram)" if fresh
                        else f"at most {opts.window or window} outstanding per flow"))
        lines.append(f"{'target':10} {'dgram/s':>9} {'/direct':>8} {'/nginx':>7} {'cpu-us/dgram':>13}"
                     f" {'/nginx':>7} {'rss MiB':>8} {'lost':>6} {'errors':>6}")
        base = median(results.get("direct", {}).get(workload, []), "dgram_s")
        ng = results.get("nginx", {}).get(workload, [])
        ngRate, ngCpu = median(ng, "dgram_s"), median(ng, "cpu_us_per_dgram")
        for target in targets:
            rs = results[target][workload]
            rate, cpu = median(rs, "dgram_s"), median(rs, "cpu_us_per_dgram")
            toDirect = rate / base if rate and base else None
            toNginx = rate / ngRate if rate and ngRate else None
            cpuToNginx = cpu / ngCpu if cpu and ngCpu else None
            lines.append(
                f"{target:10} {f(rate, '9.0f')} {f(toDirect, '8.2f')} {f(toNginx, '7.2f')} {f(cpu, '13.1f')}"
                f" {f(cpuToNginx, '7.2f')} {f(median(rs, 'rss_mib'), '8.1f')}"
                f" {sum(r['lost'] for r in rs):6d} {sum(r['errors'] for r in rs):6d}"
            )
        lines.append("")
    if notes:
        lines.append("## left out")
        lines += [f"{t}: {why}" for t, why in notes.items()]
        lines.append("")
    problems = [
        f"{target} {workload} round {i + 1}: {r['lost']} lost, {r['errors']} errors"
        + (f", {r['stalledClients']} client(s) stalled" if r["stalledClients"] else "")
        + (f"; first: {r['firstError']}" if r["firstError"] else "")
        for target, workloads in results.items()
        for workload, rs in workloads.items()
        for i, r in enumerate(rs)
        if r["errors"] or r["lost"]
    ]
    if problems:
        lines.append("## losses and errors (loopback loses nothing unless a buffer overflows)")
        lines += problems
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run at most (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported (default 1)")
    ap.add_argument("--json", default="", help="write every run's figures to this file")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated: " + ",".join(TARGETS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    ap.add_argument("--backends", type=int, default=2, help="echo backend processes (default 2)")
    ap.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--flows", type=int, default=8, help="sockets (flows) per client (default 8)")
    ap.add_argument("--window", type=int, default=0,
                    help="datagrams outstanding per flow at most (default: 8 small, 4 large)")
    ap.add_argument("--datagrams", type=int, default=500_000, help="datagrams per run at most (default 500000)")
    ap.add_argument("--timeout", type=float, default=1.0,
                    help="seconds without an answer after which what is outstanding is lost (default 1)")
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

    lab = Lab(opts.keep)
    results: dict[str, dict[str, list]] = {}
    notes: dict[str, str] = {}
    try:
        backends = lab.startBackends(opts.backends)
        for round in range(opts.repeat):
            for target in opts.targets:
                if target in notes:
                    continue
                try:
                    proc, ports = TARGETS[target](lab, backends, opts)
                except _Skip as e:
                    notes[target] = str(e)
                    print(f"# {target} left out: {e}", file=sys.stderr, flush=True)
                    continue
                try:
                    for workload in opts.workloads:
                        r = run(workload, ports, proc, opts)
                        results.setdefault(target, {w: [] for w in opts.workloads})[workload].append(r)
                        print(f"# round {round + 1} {target} {workload}: {r['dgram_s'] or 0:.0f} dgram/s"
                              + (f", {r['cpu_us_per_dgram']:.1f} cpu-us/dgram" if "cpu_us_per_dgram" in r else "")
                              + (f", {r['lost']} lost" if r["lost"] else "")
                              + (f", {r['errors']} errors" if r["errors"] else ""),
                              file=sys.stderr, flush=True)
                        if proc is not None and proc.poll() is not None:
                            raise RuntimeError(f"{target} exited with {proc.returncode} during {workload}")
                finally:
                    if proc is not None:
                        lab.stop(proc)
    finally:
        lab.close()
    print(report(results, notes, opts))
    if opts.json:
        Path(opts.json).write_text(json.dumps(
            {"duration": opts.duration, "repeat": opts.repeat, "results": results, "left_out": notes}, indent=2))
    return 1 if any(r["errors"] for ws in results.values() for rs in ws.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
