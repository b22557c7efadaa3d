#!/usr/bin/env python3
"""
HTTP/2 from clients: requests/s and CPU time per request through txlb,
beside HAProxy doing the same job and the backend spoken to directly, with
txlb's HTTP/1.1 keep-alive path measured in the same run for comparison.

Everything runs on 127.0.0.1 and is started and stopped here:

- backends: the three nginx virtual servers of C{bench/http.py} (HTTP/1.1,
  C{GET /} answers 13 bytes), and for C{direct} one more nginx server
  speaking h2c (prior knowledge) with the same answer.
- targets: C{txlb} (one HTTP service, HTTP/2 by prior knowledge, a
  C{round_robin} pool of the backends, no access log), C{haproxy}
  (C{bind ... proto h2}, the same backends, HTTP/1.1 to them with
  connection reuse, one thread), C{direct} (the h2c nginx server); and,
  not by default, each balancer on two cores as it would be deployed on a
  two-core machine: C{txlb-w2} (C{[txlb] workers = 2}) and C{haproxy-t2}
  (C{nbthread 2}).
- load: C{h2load} for C{--duration} seconds per run, bounded by a timeout.

Workloads:

    h2-1        HTTP/2, 4 connections, 1 stream at a time on each
    h2-100      HTTP/2, 4 connections, 100 concurrent streams on each
    h1          HTTP/1.1 keep-alive (h2load --h1), 50 connections: txlb's
                HTTP/1.1 path, the yardstick for what HTTP/2 costs
    h1-4        the same over 4 connections, as h2-1 has: each request then
                costs a turn of the reactor of its own, as in h2-1

CPU time per request is user+system of the balancer's process tree (from
C{/proc/PID/stat}, before and after each run) over the requests that
succeeded.  The machine is shared and noisy: read the ratios.

    python3 bench/http2.py
    python3 bench/http2.py --duration 5 --repeat 3 --json http2.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    """A sibling module of this file, loaded by path (bench/ is kept off sys.path)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_lab = _load("_lab")
_http = _load("http")

WORKLOADS = {
    "h2-1": ["-c", "4", "-m", "1"],
    "h2-100": ["-c", "4", "-m", "100"],
    "h1": ["--h1", "-c", "50", "-m", "1"],
    "h1-4": ["--h1", "-c", "4", "-m", "1"],
}


class Lab(_lab.Lab):
    prefix = "txlb-bench-http2-"


def directServer(lab: Lab) -> int:
    """One nginx server speaking h2c with the backends' small answer."""
    port = _lab.freePort()
    d = lab.dir / "direct"
    d.mkdir(exist_ok=True)
    body = _http.SMALL_BODY.decode().replace("\n", "\\n")
    conf = d / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        error_log {d / 'err'} crit;
        pid {d / 'pid'};
        events {{ worker_connections 8192; }}
        http {{
            access_log off;
            client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
            uwsgi_temp_path {d}; scgi_temp_path {d};
            http2_max_requests 100000000;
            keepalive_requests 100000000;
            server {{
                listen 127.0.0.1:{port} http2;
                location = / {{ return 200 "{body}"; }}
            }}
        }}
        """))
    lab.start(["nginx", "-p", str(d), "-c", str(conf)], "direct", port)
    return port


def startTxlb(lab: Lab, backends: list[int], workers: int = 1):
    port = _lab.freePort()
    name = "txlb" if workers == 1 else f"txlb-w{workers}"
    config = lab.dir / f"{name}.toml"
    text = _http.txlbConfig(port, backends, False, str(lab.dir / f"{name}.events"))
    if workers > 1:
        text = f"[txlb]\nworkers = {workers}\n\n" + text
    config.write_text(text)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return lab.start(_lab.twistd("txlb", "--config", str(config)), name, port, env=env), port


def startHaproxy(lab: Lab, backends: list[int], threads: int = 1):
    port = _lab.freePort()
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    conf = lab.dir / f"haproxy-{threads}.cfg"
    conf.write_text(textwrap.dedent("""
        global
            maxconn 4000
            nbthread {threads}
        defaults
            mode http
            timeout connect 5s
            timeout client 30s
            timeout server 30s
            http-reuse always
        frontend f
            bind 127.0.0.1:{port} proto h2
            default_backend b
        backend b
            balance roundrobin
        """).format(port=port, threads=threads) + servers + "\n")
    name = "haproxy" if threads == 1 else f"haproxy-t{threads}"
    return lab.start(["haproxy", "-db", "-f", str(conf)], name, port), port


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored")


def runH2load(port: int, workload: str, seconds: float, pid: Optional[int]) -> dict:
    # No warm-up phase: its requests would cost CPU time but not be counted.
    argv = ["h2load", *WORKLOADS[workload], "-t", "1", "-D", f"{seconds:g}", f"http://127.0.0.1:{port}/"]
    before = _lab.cpuSeconds(pid) if pid else None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    except subprocess.TimeoutExpired:
        return dict(error="h2load did not finish in time")
    cpu = _lab.cpuSeconds(pid) - before if pid else None
    finished, requests = _FINISHED.search(out), _REQUESTS.search(out)
    if finished is None or requests is None:
        return dict(error="unreadable h2load output: " + out[-300:])
    succeeded, failed, errored = int(requests.group(4)), int(requests.group(5)), int(requests.group(6))
    result = dict(rps=float(finished.group(3)), requests=succeeded, failed=failed + errored)
    if cpu is not None and succeeded:
        result["cpuUsPerRequest"] = cpu / succeeded * 1e6
    return result


def report(results: dict) -> str:
    lines = [f"{'target':<10} {'workload':<8} {'req/s':>10} {'CPU-us/req':>11} {'failed':>7}"]
    for (target, workload), runs in results.items():
        rps = _lab.median(runs, "rps")
        cpu = _lab.median(runs, "cpuUsPerRequest")
        failed = sum(r.get("failed", 0) for r in runs)
        lines.append(f"{target:<10} {workload:<8} {rps or 0:>10.0f} {cpu if cpu is not None else float('nan'):>11.1f}"
                     f" {failed:>7}")
    lines.append("")

    def value(target, workload, key):
        return _lab.median(results.get((target, workload), []), key)

    for workload in ("h2-1", "h2-100"):
        for mine, theirs, cores in (("txlb", "haproxy", "one core each"), ("txlb-w2", "haproxy-t2", "two each")):
            txlb, haproxy = value(mine, workload, "rps"), value(theirs, workload, "rps")
            if txlb and haproxy:
                lines.append(f"{workload}: {mine} / {theirs} req/s = {txlb / haproxy:.2f} ({cores}; target >= 0.3)")
        tcpu, hcpu = value("txlb", workload, "cpuUsPerRequest"), value("haproxy", workload, "cpuUsPerRequest")
        if tcpu and hcpu:
            lines.append(f"{workload}: txlb / haproxy CPU per request = {tcpu / hcpu:.1f}x")
        h1 = value("txlb", "h1", "cpuUsPerRequest")
        if tcpu and h1:
            lines.append(f"{workload}: txlb HTTP/2 / HTTP/1.1 keep-alive CPU per request = {tcpu / h1:.2f}"
                         " (target <= 1.30)")
        h1few = value("txlb", "h1-4", "cpuUsPerRequest")
        if workload == "h2-1" and tcpu and h1few:
            lines.append(f"{workload}: txlb HTTP/2 / HTTP/1.1 over 4 connections CPU per request = {tcpu / h1few:.2f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per target and workload (median shown)")
    ap.add_argument("--targets", default="txlb,haproxy,direct")
    ap.add_argument("--workloads", default="h2-1,h2-100,h1,h1-4")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the lab directory (configs, logs)")
    opts = ap.parse_args(argv)
    missing = [tool for tool in ("h2load", "nginx") if shutil.which(tool) is None]
    targets = opts.targets.split(",")
    if shutil.which("haproxy") is None and any(t.startswith("haproxy") for t in targets):
        print("haproxy is not installed: leaving it out", file=sys.stderr)
        targets = [t for t in targets if not t.startswith("haproxy")]
    if missing:
        print(f"needs {' and '.join(missing)}", file=sys.stderr)
        return 2
    workloads = opts.workloads.split(",")
    lab = Lab(opts.keep)
    results: dict = {}
    try:
        backends = _http.nginxBackends(lab, 3)
        started = {}
        if "txlb" in targets:
            started["txlb"] = startTxlb(lab, backends)
        if "txlb-w2" in targets:
            started["txlb-w2"] = startTxlb(lab, backends, workers=2)
        if "haproxy" in targets:
            started["haproxy"] = startHaproxy(lab, backends)
        if "haproxy-t2" in targets:
            started["haproxy-t2"] = startHaproxy(lab, backends, threads=2)
        if "direct" in targets:
            started["direct"] = (None, directServer(lab))
        for _ in range(max(1, opts.repeat)):
            for workload in workloads:
                for target in targets:
                    if workload.startswith("h1") and target != "txlb":
                        continue  # the yardstick is txlb's own HTTP/1.1 path
                    proc, port = started[target]
                    result = runH2load(port, workload, opts.duration, proc.pid if proc else None)
                    results.setdefault((target, workload), []).append(result)
                    if "error" in result:
                        print(f"{target} {workload}: {result['error']}", file=sys.stderr)
    finally:
        lab.close()
    print(report(results))
    if opts.json:
        Path(opts.json).write_text(json.dumps({f"{t} {w}": r for (t, w), r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
