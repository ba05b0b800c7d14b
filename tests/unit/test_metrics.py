"""The worker's batched metrics match what direct prometheus_client calls would record."""

from prometheus_client import CollectorRegistry, Histogram

from pgnet_curl import metrics


def samples(histogram_name: str, registry: CollectorRegistry) -> dict:
    return {(s.name, s.labels.get("le")): s.value for f in registry.collect() for s in f.samples
            if s.name.startswith(histogram_name) and not s.name.endswith("_created")}


def test_local_histogram_matches_observe_at_every_bucket_edge():
    values = [0.0, 0.001, 0.0011, 0.005, 0.3, 1, 2.5, 59.9, 60, 61, 1e6]
    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "d", buckets=metrics._LATENCY_BUCKETS_S, registry=direct_registry)
    batched = Histogram("h", "d", buckets=metrics._LATENCY_BUCKETS_S, registry=batched_registry)
    for value in values:
        direct.observe(value)
    local = metrics._LocalHistogram(batched)
    for value in values:
        local.observe(value)
    local.flush()
    local.flush()  # a second flush adds nothing
    assert samples("h", batched_registry) == samples("h", direct_registry)


def test_outcome_and_method_labels_stay_few():
    assert [metrics.outcome(code, False) for code in (101, 200, 302, 404, 503, None)] == [
        "success", "success", "success", "http_4xx", "http_5xx", "error"]
    assert metrics.outcome(None, True) == "timeout"
    assert metrics.method_label("PATCH") == "PATCH"
    assert metrics.method_label("PROPFIND") == "OTHER"


def test_metric_names_lists_every_metric_of_the_module():
    from prometheus_client.metrics import MetricWrapperBase

    # prometheus_client keeps a counter's name without its _total suffix.
    exposed = {value._name + "_total" if value._type == "counter" else value._name
               for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)}
    assert exposed == metrics.METRIC_NAMES


def test_circuit_gauges_are_per_state():
    bound = metrics.DatabaseMetrics("test_db")
    for state in ("closed", "open", "half_open"):
        bound.circuits(state).set(1)
    bound.circuit_opens_total.inc()
