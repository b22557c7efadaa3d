"""
What /metrics adds for operators, in process: the reload gauges, the
C{process_*} series (kept per process when workers' figures are merged,
never summed) and the OpenMetrics format chosen by C{Accept}.
"""

from __future__ import annotations

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetricsFamilies
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from txlb.observe.aggregate import mergeExpositions
from txlb.observe.metrics import Metrics, wantsOpenMetrics


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(metrics: Metrics, name: str) -> float:
    [sample] = _families(metrics.exposition().decode())[name].samples
    return sample.value


def test_reload_gauges_start_at_start_up_and_follow_reloads():
    clock = Clock()
    clock.advance(1000)
    metrics = Metrics({}, clock)
    assert _value(metrics, "txlb_config_last_reload_successful") == 1
    assert _value(metrics, "txlb_config_last_reload_success_timestamp_seconds") == 1000
    metrics.reloaded(False, 2000)
    assert _value(metrics, "txlb_config_last_reload_successful") == 0
    assert _value(metrics, "txlb_config_last_reload_success_timestamp_seconds") == 1000
    metrics.reloaded(True, 3000)
    assert _value(metrics, "txlb_config_last_reload_successful") == 1
    assert _value(metrics, "txlb_config_last_reload_success_timestamp_seconds") == 3000


def test_process_series_of_this_process():
    families = _families(Metrics({}, Clock()).exposition().decode())
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_max_fds", "process_start_time_seconds", "process_virtual_memory_bytes"):
        assert name in families, name
    [fds] = families["process_open_fds"].samples
    assert fds.value > 0 and fds.labels == {}


def _worker(start: float, cpu: float, requests: int) -> str:
    return (
        "# TYPE process_start_time_seconds gauge\n"
        f"process_start_time_seconds {start}\n"
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {cpu}\n"
        "# TYPE txlb_connections_total counter\n"
        f'txlb_connections_total{{service="web"}} {requests}\n'
        "# TYPE txlb_config_last_reload_successful gauge\n"
        "txlb_config_last_reload_successful 1\n"
    )


def test_merged_process_series_are_per_worker_and_the_rest_summed():
    master = Metrics({}, Clock())
    master.reloaded(False, 5)
    text = mergeExpositions(master.exposition(), [_worker(100.0, 1.5, 3), _worker(200.0, 2.5, 4)],
                            labels=["0", "1"]).decode()
    families = _families(text)
    starts = {s.labels["worker"]: s.value for s in families["process_start_time_seconds"].samples}
    assert starts["0"] == 100.0 and starts["1"] == 200.0 and "master" in starts
    assert len(starts) == 3
    cpu = {s.labels["worker"]: s.value for s in families["process_cpu_seconds"].samples}
    assert cpu["0"] == 1.5 and cpu["1"] == 2.5
    [connections] = families["txlb_connections"].samples
    assert connections.value == 7 and connections.labels == {"service": "web"}
    # Reloads are the master's: its rejected reload, not the workers' 1 + 1.
    [reload] = families["txlb_config_last_reload_successful"].samples
    assert reload.value == 0


def test_merged_exposition_in_openmetrics():
    master = Metrics({}, Clock())
    data = mergeExpositions(master.exposition(), [_worker(100.0, 1.5, 3)], labels=["0"], openmetrics=True)
    assert data.endswith(b"# EOF\n")
    families = {f.name: f for f in openmetricsFamilies(data.decode())}
    assert {s.labels["worker"] for s in families["process_start_time_seconds"].samples} == {"master", "0"}
    assert families["txlb_connections"].type == "counter"


def test_openmetrics_exposition_parses():
    data = Metrics({}, Clock()).exposition(openmetrics=True).decode()
    families = {f.name: f for f in openmetricsFamilies(data)}
    assert "txlb_build_info" in families and "process_open_fds" in families


def test_accept_negotiation():
    assert wantsOpenMetrics("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert wantsOpenMetrics("application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    assert wantsOpenMetrics("text/plain, Application/OpenMetrics-Text")
    assert not wantsOpenMetrics("application/openmetrics-text;q=0")
    assert not wantsOpenMetrics("text/plain;version=0.0.4")
    assert not wantsOpenMetrics("*/*")
    assert not wantsOpenMetrics("")
