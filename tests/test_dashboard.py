"""
The Grafana dashboard in contrib/grafana names only metrics txlb exports,
with labels they have; and what an SRE expects of /metrics, scraped from a
real C{twistd txlb} with two workers and some traffic: the reload gauges
(kept by the master, through a rejected and an applied reload), the
C{process_*} series once per process, OpenMetrics when C{Accept} asks.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, Backend, Txlb, UDPBackend, freePort, freeUDPPort, httpAnswer, httpRequests, waitFor

DASHBOARD = ROOT / "contrib" / "grafana" / "txlb-dashboard.json"

#: Labels Prometheus adds to every scraped series, not txlb.
TARGET_LABELS = {"instance", "job"}

#: PromQL words that look like metric names in an expression.
_PROMQL = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
    "time", "changes", "label_values", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
    "topk", "bottomk", "abs", "clamp_min", "clamp_max", "delta", "deriv", "offset", "bool",
}


def _expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets (rows' panels too), variables, annotations."""
    out = []

    def walk(panels):
        for panel in panels:
            out.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            out.append(query)
    out.extend(a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr"))
    return out


def _strip(expr: str) -> str:
    """Without string literals, ranges and Grafana's variables: what is left names metrics, labels, functions."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return re.sub(r"\$\w+", "", expr)


def _metricNames(expr: str) -> set[str]:
    stripped = _strip(expr)
    # Label names: inside braces, in by/without (...) and label_values(m, label).
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)
    stripped = re.sub(r"(label_values\(\s*\w+\s*),\s*\w+\s*\)", r"\1)", stripped)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", stripped))
    return {n for n in names if n not in _PROMQL and not n.startswith("__")}


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """C{(metric, label names)} of every C{metric{...}} selector."""
    out = []
    for name, body in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        out.append((name, set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body))))
    return out


def _byLabels(expr: str) -> set[str]:
    out: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        out.update(x.strip() for x in group.split(",") if x.strip())
    return out


def test_expression_parsing():
    expr = ('histogram_quantile(0.99, sum by (le, service) '
            '(rate(txlb_request_duration_seconds_bucket{instance=~"$instance",service=~"$service"}[$__rate_interval])))')
    assert _metricNames(expr) == {"txlb_request_duration_seconds_bucket"}
    assert _selectors(expr) == [("txlb_request_duration_seconds_bucket", {"instance", "service"})]
    assert _byLabels(expr) == {"le", "service"}
    assert _metricNames("label_values(txlb_server_up{x=\"y\"}, pool)") == {"txlb_server_up"}
    assert _metricNames("time() - max(a_b)") == {"a_b"}


def test_dashboard_covers_what_an_operator_looks_at():
    exprs = _expressions(json.loads(DASHBOARD.read_text()))
    text = "\n".join(exprs)
    assert "histogram_quantile(0.99" in text and "txlb_request_duration_seconds_bucket" in text
    assert re.search(r'txlb_requests_total\{[^}]*code=~"5\.\."', text)  # errors
    for name in ("txlb_requests_total", "txlb_server_up", "txlb_active_connections", "txlb_connections_total",
                 "txlb_bytes_total", "txlb_cache_requests_total", "txlb_refused_total", "txlb_udp_datagrams_total",
                 "txlb_config_last_reload_successful", "process_cpu_seconds_total"):
        assert name in text, name


# A real txlb with two workers.


def _httpBackend(sock: socket.socket, backend: Backend) -> None:
    for head in httpRequests(sock):
        status = 500 if b" /fail " in head.split(b"\r\n")[0] + b" " else 200
        httpAnswer(sock, status, backend.name.encode())


def _config(http: int, tcp: int, udp: int, admin: int, backend: Backend, udpBackend: UDPBackend,
            broken: bool = False) -> str:
    return f"""
[txlb]
workers = 2

[admin]
listen = "tcp:{admin}:interface=127.0.0.1"

[pools.web]
servers = [{{ name = "one", address = "{backend.address}" }}]

[pools.dns]
servers = [{{ name = "udp-one", address = "{udpBackend.address}" }}]

[[services]]
name = "web"
protocol = "http"
listen = "tcp:{http}:interface=127.0.0.1"
pool = "web"
cache = {{ max_size = "1MiB", max_object = "64KiB" }}

[[services]]
name = "raw"
protocol = "tcp"
listen = "tcp:{tcp}:interface=127.0.0.1"
pool = "web"

[[services]]
name = "dns"
protocol = "udp"
listen = "udp:{udp}:interface=127.0.0.1"
pool = "dns"
""" + ("\n[[services]]\nname = \"broken\"\n" if broken else "")


def _get(url: str, accept: str = "") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def lb(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dashboard")
    backend = Backend("one", _httpBackend)
    udpBackend = UDPBackend("udp-one")
    ports = dict(http=freePort(), tcp=freePort(), udp=freeUDPPort(), admin=freePort())
    txlb = Txlb(_config(**ports, backend=backend, udpBackend=udpBackend), directory)
    txlb.ports = ports
    txlb.rewrite = lambda broken: txlb.configPath.write_text(
        _config(**ports, backend=backend, udpBackend=udpBackend, broken=broken))
    txlb.start(listening=4)
    waitFor(lambda: len(txlb.events("worker_started")) == 2, what="both workers")
    try:
        yield txlb
    finally:
        txlb.stop()
        backend.stop()
        udpBackend.stop()


def _traffic(lb) -> None:
    for path in ("/", "/", "/fail"):
        _get(f"http://127.0.0.1:{lb.ports['http']}{path}")
    with socket.create_connection(("127.0.0.1", lb.ports["tcp"]), timeout=5) as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        client.recv(100)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"ping", ("127.0.0.1", lb.ports["udp"]))
        assert client.recv(100) == b"udp-one:ping"


def _scrape(lb) -> dict:
    status, headers, body = _get(f"http://127.0.0.1:{lb.ports['admin']}/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _exported(families: dict) -> dict[str, set[str]]:
    """Every series name txlb exports, with the label names its samples have."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
    out: dict[str, set[str]] = {}
    for name, family in families.items():
        for suffix in suffixes.get(family.type, [""]):
            out.setdefault(name + suffix, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_every_dashboard_expression_names_an_exported_metric(lb):
    _traffic(lb)
    waitFor(lambda: any(s.value for s in _scrape(lb)["txlb_requests"].samples), what="requests counted")
    exported = _exported(_scrape(lb))
    for expr in _expressions(json.loads(DASHBOARD.read_text())):
        names = _metricNames(expr)
        assert names, expr
        for name in names:
            assert name in exported, f"{name} (in {expr}) is not on /metrics"
        for name, labels in _selectors(expr):
            if exported[name]:  # a family with samples: its labels are known
                assert labels - TARGET_LABELS <= exported[name] | {"le"}, (expr, exported[name])
        grouped = _byLabels(expr) - TARGET_LABELS - {"le"}
        known = set().union(*(exported[n] for n in names))
        if all(exported[n] for n in names):
            assert grouped <= known, (expr, grouped - known)


def test_process_series_once_per_process(lb):
    families = _scrape(lb)
    starts = {s.labels["worker"]: s.value for s in families["process_start_time_seconds"].samples}
    assert set(starts) == {"master", "0", "1"}
    now = time.time()
    # Not added up: each is a time this hour.
    assert all(now - 3600 < value <= now for value in starts.values())
    assert starts["master"] <= min(starts["0"], starts["1"])
    cpu = {s.labels["worker"] for s in families["process_cpu_seconds"].samples}
    assert cpu == {"master", "0", "1"}
    # The master's own families, once.
    [build] = families["txlb_build_info"].samples
    assert build.labels == {"version": __import__("txlb").__version__}


def test_openmetrics_when_the_scraper_asks(lb):
    url = f"http://127.0.0.1:{lb.ports['admin']}/metrics"
    status, headers, body = _get(url, "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b"process_start_time_seconds{worker=\"master\"}" in body
    status, headers, body = _get(url, "text/plain;version=0.0.4")
    assert headers["Content-Type"].startswith("text/plain")
    assert b"# EOF" not in body


def _reloadGauges(lb) -> tuple[float, float]:
    families = _scrape(lb)
    [ok] = families["txlb_config_last_reload_successful"].samples
    [when] = families["txlb_config_last_reload_success_timestamp_seconds"].samples
    return ok.value, when.value


def test_reload_gauges(lb):
    ok, started = _reloadGauges(lb)
    assert ok == 1
    assert time.time() - 600 < started <= time.time()
    lb.rewrite(broken=True)
    lb.process.send_signal(signal.SIGHUP)
    waitFor(lambda: lb.events("config_rejected"), what="the rejected reload")
    assert _reloadGauges(lb) == (0, started)
    lb.rewrite(broken=False)
    lb.process.send_signal(signal.SIGHUP)
    waitFor(lambda: lb.events("config_reloaded"), what="the applied reload")
    ok, reloaded = _reloadGauges(lb)
    assert ok == 1 and reloaded > started


def test_metrics_reference_lists_every_family(lb):
    """docs/observability.md's table names every family /metrics has, and no other."""
    text = (ROOT / "docs" / "observability.md").read_text()
    section = text.split("## Prometheus metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    exported = {name + ("_total" if family.type == "counter" else "") for name, family in _scrape(lb).items()}
    assert exported - documented == set(), "exported but not documented"
    assert documented - exported == set(), "documented but not exported"
