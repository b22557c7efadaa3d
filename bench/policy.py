#!/usr/bin/env python3
"""
What traffic policy costs, measured in one run on 127.0.0.1:

(a) CPU-µs per request of HTTP keep-alive through txlb with policy on
    against the same service with none: two header rules (one on
    requests with C{${client_ip}}, one on responses), and C{allow} and a
    C{rate_limit} (C{store = "memory"}, too generous to refuse anything)
    when this txlb's config accepts them (found out with C{--check}; the
    report says which were on).  Target: at most 15% more CPU.
(b) MiB/s of gzip level 6 through txlb (C{compress}) against nginx
    C{gzip on} as a proxy of the same backend, for the same compressible
    body (C{--body-kib} of JSON lines, with C{Content-Length}).  MiB/s
    counts the body before compression (requests/s × its size).
    Target: at least 0.7 × nginx.

One nginx process holds the backends (C{GET /} a 13-byte body,
C{GET /body.json} the JSON); wrk drives every target, and the CPU time
of each proxy's own processes (user+system from C{/proc/PID/stat}) is
read around each run.  For (a) the three txlb processes run side by side
and take turns, C{--cycles} short runs each in a rotating order, so that
each cycle compares them under the same load from whatever else shares
the machine: the median of the per-cycle ratios is the figure to read.
For (b) the two proxies are started in turn, C{--repeat} rounds of
C{--duration} seconds.  Every run is bounded in time, every loop in
count.

    python3 bench/policy.py
    python3 bench/policy.py --cycles 20 --repeat 5 --json policy.json
    python3 bench/policy.py --parts headers          # (a) only
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/http.py is named like the standard library's http package: keep
# this directory off the import path so that urllib finds the real one.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import textwrap
import urllib.request
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def _load(name: str, file: str):
    """A sibling bench module, loaded by path (this directory is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_lab = _load("_lab", "_lab.py")
_http = _load("_bench_http", "http.py")  # wrk's output parser
parseWrk = _http.parseWrk


class Lab(_lab.Lab):
    prefix = "txlb-bench-policy-"


def jsonLines(size: int, seed: int = 7) -> bytes:
    """C{size} bytes of JSON lines that compress about as an API's answers do (4 to 5 times)."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < size:
        line = json.dumps({"id": rng.randrange(10**6), "name": f"user-{rng.randrange(10**5)}",
                           "score": round(rng.random(), 4), "tags": rng.sample(["a", "b", "c", "d", "e"], 2)})
        out.append(line.encode() + b"\n")
        total += len(out[-1])
    return b"".join(out)[:size]


# ---- processes ---------------------------------------------------------------


def backends(lab: Lab, body: bytes) -> int:
    """One nginx process: the backend every target forwards to."""
    port = _lab.freePort()
    d = lab.dir
    (d / "www").mkdir(exist_ok=True)
    (d / "www" / "body.json").write_bytes(body)
    conf = d / "backend.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        error_log {d / 'backend.err'} crit;
        pid {d / 'backend.pid'};
        events {{ worker_connections 8192; }}
        http {{
            access_log off;
            sendfile on;
            gzip off;
            types {{ application/json json; }}
            client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
            uwsgi_temp_path {d}; scgi_temp_path {d};
            server {{
                listen 127.0.0.1:{port} reuseport backlog=4096;
                keepalive_requests 1000000;
                location = / {{ return 200 "hello, world\\n"; }}
                location = /body.json {{ root {d / 'www'}; }}
            }}
        }}
        """))
    lab.start(["nginx", "-p", str(d), "-c", str(conf)], "backend", port)
    return port


def nginxGzip(lab: Lab, backend: int, level: int) -> tuple[subprocess.Popen, int]:
    """nginx, one worker, as a keep-alive proxy of the backend with C{gzip on}."""
    port = _lab.freePort()
    d = lab.dir
    conf = d / "nginx-gzip.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        daemon off;
        error_log {d / 'nginx-gzip.err'} crit;
        pid {d / 'nginx-gzip.pid'};
        events {{ worker_connections 8192; }}
        http {{
            access_log off;
            client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
            uwsgi_temp_path {d}; scgi_temp_path {d};
            upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
            server {{
                listen 127.0.0.1:{port} backlog=4096;
                keepalive_requests 1000000;
                gzip on;
                gzip_comp_level {level};
                gzip_types application/json;
                gzip_proxied any;
                gzip_min_length 1024;
                location / {{
                    proxy_pass http://backend;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                }}
            }}
        }}
        """))
    return lab.start(["nginx", "-p", str(d), "-c", str(conf)], "nginx-gzip", port), port


def txlbConfig(port: int, backend: int, policy: str) -> str:
    return textwrap.dedent(f"""
        [log]
        access = false

        [pools.bench]
        algorithm = "round_robin"
        servers = [{{ name = "server-1", address = "127.0.0.1:{backend}" }}]
        health = {{ kind = "none" }}

        [[services]]
        name = "bench"
        protocol = "http"
        listen = ["tcp:{port}:interface=127.0.0.1"]
        pool = "bench"
        """) + policy


#: Two header rules: one on requests (with a variable), one on responses.
HEADER_RULES = ('headers = { request = { set = { "X-Client" = "${client_ip}" } }, '
                'response = { set = { "Strict-Transport-Security" = "max-age=31536000" } } }\n')
ACCESS = 'allow = ["127.0.0.0/8", "::1"]\ndeny = ["10.9.0.0/16"]\n'
RATE_LIMIT = 'rate_limit = { rate = "1000000/s", burst = 1000000, key = "ip", store = "memory" }\n'


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return out


def accepted(lab: Lab, policy: str, name: str) -> tuple[bool, str]:
    """Whether C{--check} accepts a service with C{policy}; its output's first line otherwise."""
    config = lab.dir / f"check-{name}.toml"
    config.write_text(txlbConfig(_lab.freePort(), 1, policy))
    out = subprocess.run(_lab.twistd("txlb", "--config", str(config), "--check"), capture_output=True,
                         text=True, env=env(), cwd=lab.dir, timeout=60)
    text = (out.stdout + out.stderr).strip().splitlines()
    return out.returncode == 0, (text[0] if text else f"exit {out.returncode}")


def startTxlb(lab: Lab, name: str, backend: int, policy: str) -> tuple[subprocess.Popen, int]:
    port = _lab.freePort()
    config = lab.dir / f"{name}.toml"
    config.write_text(txlbConfig(port, backend, policy))
    return lab.start(_lab.twistd("txlb", "--config", str(config)), name, port, env=env()), port


# ---- load --------------------------------------------------------------------


def wrk(port: int, path: str, connections: int, seconds: float, headers: tuple[str, ...] = ()) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{port}{path}")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 40).stdout
    except subprocess.TimeoutExpired:
        return dict(done=0, seconds=seconds, req_s=0.0, mib_s=0.0, errors=1, firstError="wrk did not finish")
    return parseWrk(out)


def measure(proc: subprocess.Popen, port: int, path: str, connections: int, opts,
            headers: tuple[str, ...] = (), seconds: Optional[float] = None, warmup: Optional[float] = None) -> dict:
    """A warm-up, then one run (--duration seconds) with the proxy's CPU time around it."""
    warmup = opts.warmup if warmup is None else warmup
    if warmup > 0:
        wrk(port, path, connections, warmup, headers)
    before = _lab.cpuSeconds(proc.pid)
    r = wrk(port, path, connections, opts.duration if seconds is None else seconds, headers)
    r["cpu_s"] = _lab.cpuSeconds(proc.pid) - before
    r["cpu_us_per_req"] = r["cpu_s"] / r["done"] * 1e6 if r["done"] else None
    r["rss_mib"] = _lab.rssMiB(proc.pid)
    return r


def decoded(port: int, path: str) -> tuple[Optional[str], bytes]:
    """One request accepting gzip: its C{Content-Encoding} and the body decoded."""
    asked = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(asked, timeout=10) as answer:
        encoding, raw = answer.headers.get("Content-Encoding"), answer.read()
    return encoding, gzip.decompress(raw) if encoding == "gzip" else raw


# ---- the two parts -----------------------------------------------------------


def partHeaders(lab: Lab, backend: int, opts, results: dict, notes: list[str]) -> None:
    policy, parts = HEADER_RULES, ["two header rules"]
    for name, text, label in (("access", ACCESS, "allow + deny"), ("rate", RATE_LIMIT, "rate_limit (memory)")):
        ok, why = accepted(lab, text, name)
        if ok:
            policy += text
            parts.append(label)
        else:
            notes.append(f"## (a) {label} left out: this txlb's --check refuses it: {why}")
    notes.append(f"## (a) txlb+policy: {', '.join(parts)}; txlb+headers: the two header rules alone")
    targets = [("txlb", ""), ("txlb+headers", HEADER_RULES)]
    if policy != HEADER_RULES:
        targets.append(("txlb+policy", policy))
    # Every target runs for the whole part; short runs take turns, in an
    # order that rotates, so that each cycle compares the targets under
    # the same load from whatever else shares the machine.
    running = []
    try:
        for target, text in targets:
            proc, port = startTxlb(lab, target, backend, text)
            running.append((target, proc, port))
            if opts.warmup > 0:
                wrk(port, "/", 50, opts.warmup)
        for cycle in range(opts.cycles):
            turn = cycle % len(running)
            for target, proc, port in running[turn:] + running[:turn]:
                r = measure(proc, port, "/", 50, opts, seconds=opts.cycle_seconds, warmup=0)
                results.setdefault(target, []).append(r)
                print(f"# cycle {cycle + 1} {target}: {r['req_s']:.0f} req/s, "
                      f"{r['cpu_us_per_req'] or 0:.1f} cpu-us/req, {r['errors']} errors", file=sys.stderr, flush=True)
    finally:
        for _, proc, _ in running:
            lab.stop(proc)


def partRewrite(opts, results: dict, notes: list[str]) -> None:
    """
    (a) in one process: what the two header rules add to writing one
    request head and one response head (the only per-request work they
    do), with the variables a request's values need.  Steadier than (a)
    under load, and it says how much of (a)'s difference is theirs.
    """
    import timeit

    sys.path.insert(0, str(ROOT))
    from txlb.config import parse
    from txlb.http.headers import requestHead, responseHead
    from txlb.policy.headers import compileRules, variables

    config = parse(txlbConfig(8080, 9001, HEADER_RULES), "bench.toml")
    policy = compileRules(config.services[0].header_rules)
    request = [(b"Host", b"127.0.0.1:8080"), (b"User-Agent", b"wrk"), (b"Accept", b"*/*")]
    response = [(b"Server", b"nginx"), (b"Date", b"Mon, 07 Dec 2026 13:00:00 GMT"),
                (b"Content-Type", b"text/plain"), (b"Content-Length", b"13"), (b"Connection", b"keep-alive")]

    def heads(rules) -> None:
        values = () if rules is None else variables("127.0.0.1", "5f3a-17", "bench", "server-1")
        requestHead(b"GET", b"/", request, client="127.0.0.1", host=b"127.0.0.1:8080", proto=b"http",
                    requestId="5f3a-17", framing=None, rules=None if rules is None else rules.request,
                    values=values)
        responseHead(200, b"OK", response, requestId="5f3a-17", framing=b"Content-Length: 13", close=False,
                     rules=None if rules is None else rules.response)

    # Short timings taking turns, the fastest of each kept: what is left
    # when nothing else got in the way.
    number, best = 5000, {"heads": float("inf"), "heads+rules": float("inf")}
    for _ in range(20):
        for name, rules in (("heads", None), ("heads+rules", policy)):
            best[name] = min(best[name], timeit.timeit(lambda: heads(rules), number=number) / number * 1e6)
    for name, us in best.items():
        results[name] = [{"us": us, "errors": 0}]


def partGzip(lab: Lab, backend: int, body: bytes, opts, results: dict, notes: list[str]) -> None:
    accept = ("Accept-Encoding: gzip",)
    compress = (f'compress = {{ types = ["application/json"], min_size = "1KiB", level = {opts.level} }}\n')
    for rnd in range(opts.repeat):
        for target in ("nginx-gzip", "txlb-gzip"):
            if target == "nginx-gzip":
                proc, port = nginxGzip(lab, backend, opts.level)
            else:
                proc, port = startTxlb(lab, f"{target}-{rnd}", backend, compress)
            try:
                encoding, plain = decoded(port, "/body.json")
                if encoding != "gzip" or plain != body:
                    raise RuntimeError(f"{target} did not answer the body gzip-encoded and intact "
                                       f"(Content-Encoding {encoding!r}, {len(plain)} bytes decoded)")
                r = measure(proc, port, "/body.json", opts.gzip_connections, opts, accept)
            finally:
                lab.stop(proc)
            r["body_mib_s"] = r["req_s"] * len(body) / MiB
            results.setdefault(target, []).append(r)
            print(f"# round {rnd + 1} {target}: {r['body_mib_s']:.1f} MiB/s of body, "
                  f"{r['cpu_us_per_req'] or 0:.0f} cpu-us/req, {r['errors']} errors", file=sys.stderr, flush=True)


def report(results: dict, notes: list[str], body: bytes, opts) -> str:
    med = _lab.median

    def f(x, spec):
        return format(x, spec) if x is not None else "-"

    lines = [f"# txlb policy benchmark, medians; (b): {opts.duration:g}s per run, {opts.repeat} round(s)", ""]
    lines += notes
    if "txlb" in results:
        off = med(results["txlb"], "cpu_us_per_req")
        lines += ["", f"(a) HTTP keep-alive, GET / (13 bytes), 50 connections; {opts.cycles} cycles of "
                      f"{opts.cycle_seconds:g}s per target, taking turns",
                  f"{'target':12} {'req/s':>8} {'cpu-us/req':>10} {'p99 ms':>7} {'errors':>6}"]
        ruled = [t for t in ("txlb", "txlb+headers", "txlb+policy") if t in results]
        for target in ruled:
            rs = results[target]
            lines.append(f"{target:12} {f(med(rs, 'req_s'), '8.0f'):>8} {f(med(rs, 'cpu_us_per_req'), '10.1f'):>10} "
                         f"{f(med(rs, 'p99_ms'), '7.2f'):>7} {sum(r['errors'] for r in rs):6d}")
        for target in ruled[1:]:
            on = med(results[target], "cpu_us_per_req")
            if off and on:
                lines.append(f"{target} overhead: {on - off:+.1f} cpu-us/req = {100 * (on / off - 1):+.1f}% "
                             f"(target <= +15% for everything on)")
            # The same, cycle by cycle: each cycle's targets ran one after the other.
            pairs = [(a["cpu_us_per_req"], b["cpu_us_per_req"]) for a, b in zip(results["txlb"], results[target])
                     if a.get("cpu_us_per_req") and b.get("cpu_us_per_req")]
            if len(pairs) > 1:
                ratios = [b / a for a, b in pairs]
                lines.append("  by cycle: " + ", ".join(f"{100 * (r - 1):+.0f}%" for r in ratios)
                             + f"; median {100 * (statistics.median(ratios) - 1):+.1f}%")
    if "heads" in results:
        bare, ruled = results["heads"][0]["us"], results["heads+rules"][0]["us"]
        lines.append(f"in one process: a request and a response head {bare:.2f} us, with the two rules "
                     f"{ruled:.2f} us: {ruled - bare:+.2f} us per request"
                     + (f" = {100 * (ruled - bare) / off:+.1f}% of txlb's cpu-us/req above" if off else ""))
    if "txlb-gzip" in results:
        ng, tx = med(results["nginx-gzip"], "body_mib_s"), med(results["txlb-gzip"], "body_mib_s")
        wire = len(gzip.compress(body, opts.level))
        lines += ["", f"(b) gzip level {opts.level}, GET /body.json ({len(body) // 1024} KiB of JSON, "
                      f"{len(body) / wire:.1f}x smaller gzipped), {opts.gzip_connections} connections",
                  f"{'target':12} {'req/s':>8} {'MiB/s':>8} {'cpu-us/req':>10} {'rss MiB':>7} {'errors':>6}"]
        for target in ("nginx-gzip", "txlb-gzip"):
            rs = results[target]
            lines.append(f"{target:12} {f(med(rs, 'req_s'), '8.1f'):>8} {f(med(rs, 'body_mib_s'), '8.1f'):>8} "
                         f"{f(med(rs, 'cpu_us_per_req'), '10.0f'):>10} {f(med(rs, 'rss_mib'), '7.1f'):>7} "
                         f"{sum(r['errors'] for r in rs):6d}")
        if ng and tx:
            lines.append(f"txlb / nginx: {tx / ng:.2f}x MiB/s (target >= 0.7x)")
        ngCpu, txCpu = med(results["nginx-gzip"], "cpu_us_per_req"), med(results["txlb-gzip"], "cpu_us_per_req")
        if ngCpu and txCpu:
            lines.append(f"txlb / nginx: {txCpu / ngCpu:.2f}x CPU per response (both compress with zlib)")
    problems = [f"{t} round {i + 1}: {r['errors']} errors; {r.get('firstError', '')}"
                for t, rs in results.items() for i, r in enumerate(rs) if r["errors"]]
    if problems:
        lines += ["", "## errors (anything but none is a bug)", *problems]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds of load before each run")
    ap.add_argument("--repeat", type=int, default=3, help="(b): rounds, alternating the targets (default 3)")
    ap.add_argument("--cycles", type=int, default=10, help="(a): runs of each target, taking turns (default 10)")
    ap.add_argument("--cycle-seconds", type=float, default=2.0, help="(a): seconds per run (default 2)")
    ap.add_argument("--parts", default="headers,gzip", help="comma-separated: headers, gzip (default both)")
    ap.add_argument("--body-kib", type=int, default=256, help="the compressible body's size (default 256)")
    ap.add_argument("--level", type=int, default=6, help="gzip level for both (default 6)")
    ap.add_argument("--gzip-connections", type=int, default=4, help="wrk connections for (b) (default 4)")
    ap.add_argument("--json", default="", help="write every run's figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs)")
    opts = ap.parse_args(argv)
    parts = {p for p in opts.parts.split(",") if p}
    if (parts - {"headers", "gzip"} or not 1 <= opts.repeat <= 20 or not 0 < opts.duration <= 120
            or not 1 <= opts.cycles <= 50 or not 0 < opts.cycle_seconds <= 30):
        ap.error("--parts takes headers and gzip; --repeat 1..20; --duration up to 120 s; --cycles 1..50 "
                 "of up to 30 s")
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            ap.error(f"needs {tool}")
    body = jsonLines(opts.body_kib * 1024)
    lab = Lab(opts.keep)
    results: dict = {}
    notes: list[str] = []
    try:
        backend = backends(lab, body)
        if "headers" in parts:
            partRewrite(opts, results, notes)
            partHeaders(lab, backend, opts, results, notes)
        if "gzip" in parts:
            partGzip(lab, backend, body, opts, results, notes)
    finally:
        with contextlib.suppress(Exception):
            lab.close()
    print(report(results, notes, body, opts))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"duration": opts.duration, "repeat": opts.repeat,
                                               "results": results}, indent=2))
    return 1 if any(r["errors"] for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
