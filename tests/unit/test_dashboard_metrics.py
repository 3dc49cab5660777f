"""The Grafana dashboard (k8s/monitoring/grafana-dashboard.json) queries only metrics that exist,
with labels they carry, and counts what an operator needs during an overload: every metric is
one this code exports (services/) or one of Ray Serve's, checked against the installed ray
package; errors the proxy answers itself (queue full, dead or missing coordinator) are charted;
the error ratio leaves client-caused statuses out, and divides by the requests accepted (a
client's mistake, a 404 or 401, in neither part); the proxy latency holds API calls only."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "monitoring" / "grafana-dashboard.json"

# Ray Serve's own metrics the dashboard reads (their names as Ray registers them; the kind
# decides the Prometheus suffixes). Checked against the installed ray's source below.
RAY_SERVE_METRICS = {
    "serve_num_http_requests": "Counter", "serve_num_grpc_requests": "Counter",
    "serve_num_http_error_requests": "Counter", "serve_num_grpc_error_requests": "Counter",
    "serve_http_request_latency_ms": "Histogram", "serve_grpc_request_latency_ms": "Histogram",
    "serve_deployment_replica_healthy": "Gauge", "serve_autoscaling_target_replicas": "Gauge",
    "serve_deployment_queued_queries": "Gauge", "serve_replica_processing_queries": "Gauge",
}
_METRIC = re.compile(r"\b(ray_[a-zA-Z0-9_:]+)")
_SELECTOR = re.compile(r"\b(ray_[a-zA-Z0-9_:]+)\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_BY = re.compile(r"\bby \(([^)]*)\) \((?:rate\()?(ray_[a-zA-Z0-9_:]+)")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _variable(name: str) -> dict:
    (variable,) = [v for v in _dashboard()["templating"]["list"] if v["name"] == name]
    return variable


def _panel(title_start: str) -> dict:
    (panel,) = [p for p in _dashboard()["panels"] if p["title"].startswith(title_start)]
    return panel


def _queries() -> list[str]:
    d = _dashboard()
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])] + \
        [v["query"] for v in d["templating"]["list"] if v.get("type") == "query"]


def _prometheus_names(kind: str, name: str) -> set[str]:
    """What Ray's Prometheus export calls a metric: a ``ray_`` prefix; counters end in
    ``_total`` (the OpenTelemetry exporter, Ray's default, adds it where missing); histograms
    as buckets, count and sum."""
    name = f"ray_{name}"
    if kind == "Counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    if kind == "Histogram":
        return {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return {name}


def _exported_by_services() -> set[str]:
    pattern = re.compile(r'\b(Counter|Gauge|Histogram)\(\s*"(arbitrage_[a-z0-9_]+)"')
    names: set[str] = set()
    for path in (ROOT / "services").glob("*.py"):
        for kind, name in pattern.findall(path.read_text()):
            names |= _prometheus_names(kind, name)
    # Gauges and counters built from their tables: the load controller's, the rows a coordinator
    # holds back, a vLLM pool's engine.
    from services.engine_metrics import ENGINE_GAUGES, PREEMPTIONS
    from services.load_metrics import LOAD_GAUGES, ROWS_WAITING

    tables = (*LOAD_GAUGES.values(), ROWS_WAITING, *ENGINE_GAUGES.values())
    return names | {f"ray_{name}" for name, _ in tables} | _prometheus_names("Counter", PREEMPTIONS[0])


def _ray_serve_source_metrics() -> dict[str, set[str]]:
    """Metric name -> kinds, as the installed ray's Serve registers them (``{protocol_name}``
    expanded to http and grpc)."""
    import ray
    pattern = re.compile(r'\b(Counter|Gauge|Histogram)\(\s*(?:name=)?f?"(serve_[a-z_{}]+)"')
    found: dict[str, set[str]] = {}
    for path in (Path(ray.__file__).parent / "serve").rglob("*.py"):
        if "tests" in path.parts:
            continue
        for kind, name in pattern.findall(path.read_text()):
            for protocol in ("http", "grpc"):
                found.setdefault(name.replace("{protocol_name}", protocol), set()).add(kind)
    return found


def _ingress_tag_keys() -> dict[str, set[str]]:
    """The proxies' request metrics and their labels, from Ray's own class (no cluster)."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.request_ingress_metrics import RequestIngressMetrics

    out = {}
    for protocol in (RequestProtocol.HTTP, RequestProtocol.GRPC):
        m = RequestIngressMetrics(protocol, source="proxy", node_id="n", node_ip_address="ip")
        for metric in (m.request_counter, m.request_error_counter, m.processing_latency_tracker):
            out[metric._name] = set(metric._tag_keys)
    return out


def _matchers(selector_body: str) -> list[tuple[str, str, str]]:
    return _MATCHER.findall(selector_body)


# Labels Prometheus adds when it scrapes a Pod (the PodMonitor's target labels), not Ray.
SCRAPE_LABELS = {"namespace"}


def _selects(matchers: list[tuple[str, str, str]], labels: dict[str, str]) -> bool:
    """Whether a series with ``labels`` passes PromQL ``matchers`` (regexes are anchored), the
    namespace variable at its All value."""
    for name, op, value in matchers:
        value = value.replace("$namespace", _variable("namespace")["allValue"])
        have = labels.get(name, "")
        ok = {"=": have == value, "!=": have != value, "=~": re.fullmatch(value, have) is not None,
              "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


# -- every name exists ------------------------------------------------------------------------
def test_every_metric_the_dashboard_queries_is_exported_by_services_or_by_ray_serve():
    ours = _exported_by_services()
    assert "ray_arbitrage_requests_total" in ours and "ray_arbitrage_request_ms_bucket" in ours  # the scan works
    ray_names = {n for name, kind in RAY_SERVE_METRICS.items() for n in _prometheus_names(kind, name)}
    queried = {m for q in _queries() for m in _METRIC.findall(q)}
    unknown = queried - ours - ray_names
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"


def test_the_listed_ray_serve_metrics_exist_in_the_installed_ray_with_that_kind():
    found = _ray_serve_source_metrics()
    for name, kind in RAY_SERVE_METRICS.items():
        assert kind in found.get(name, set()), f"{name}: not a {kind} in the installed ray's Serve ({found.get(name)})"


def test_the_labels_queried_on_the_proxy_metrics_are_the_ones_ray_sets():
    tags = _ingress_tag_keys()
    assert set(tags) >= {"serve_num_grpc_error_requests", "serve_http_request_latency_ms"}
    checked = 0
    for query in _queries():
        uses = [(m, {n for n, _, _ in _matchers(body)}) for m, body in _SELECTOR.findall(query)]
        uses += [(m, {label.strip() for label in by.split(",")} - {"le"}) for by, m in _BY.findall(query)]
        for metric, labels in uses:
            base = re.sub(r"_(total|bucket|count|sum)$", "", metric.removeprefix("ray_"))
            if base in tags:
                checked += 1
                extra = labels - tags[base] - SCRAPE_LABELS
                assert not extra, f"{metric}: labels {sorted(extra)} are not Ray's"
    assert checked >= 8


# -- overload and dead replicas show -----------------------------------------------------------
def test_the_requests_panel_charts_the_errors_the_proxies_answer_themselves():
    exprs = [t["expr"] for t in _panel("Requests / s by status")["targets"]]
    assert any("ray_arbitrage_requests_total" in e for e in exprs)
    for metric in ("ray_serve_num_http_error_requests_total", "ray_serve_num_grpc_error_requests_total"):
        (expr,) = [e for e in exprs if metric in e]
        assert expr.startswith("sum by (error_code)"), expr


def _api_error_codes() -> dict[str, tuple[str, int]]:
    """status -> (gRPC code, HTTP status) of every ``ApiError`` the services build."""
    pattern = re.compile(r'ApiError\(\s*"(\w+)",\s*(?:convert\.)?grpc\.StatusCode\.(\w+),\s*(\d+)')
    codes = {}
    for path in (ROOT / "services").glob("*.py"):
        for code, grpc_code, http in pattern.findall(path.read_text()):
            codes[code] = (grpc_code, int(http))
    return codes


def _client_caused(http: int) -> bool:
    return 400 <= http < 500 and http != 408  # 408: Serve's own request timeout


def _accepted(http: int) -> bool:
    """Whether a ratio's denominator counts an answer: the service accepted the request (a
    success, a server-caused failure, a client's cancel: 499). A client's mistake (404, 401,
    405, 413, 400 / 422, ...) is in none: a scanner's 404s would dilute every ratio."""
    return not _client_caused(http) or http == 499


# What Serve's proxies answer on their own (ray/serve/_private/http_util.py, grpc_util.py): a
# timeout, a client gone, a full queue, no replica, a crash (services/proxy_status.py maps the
# last to UNAVAILABLE / 503).
PROXY_ANSWERS = [("DEADLINE_EXCEEDED", 408), ("CANCELLED", 499), ("RESOURCE_EXHAUSTED", 503),
                 ("UNAVAILABLE", 503), ("INTERNAL", 500), ("UNKNOWN", 500)]
# HTTP-only refusals built from variables (no such route, method, model; a body that does not
# parse): client-caused, like the ApiErrors _api_error_codes() finds. status -> (gRPC, HTTP).
HTTP_ONLY_REFUSALS = {"not_found": ("NOT_FOUND", 404), "method_not_allowed": ("UNIMPLEMENTED", 405),
                      "model_not_found": ("NOT_FOUND", 404), "invalid_request": ("INVALID_ARGUMENT", 400)}
# Other codes a series may carry (a client's mistake the services do not build today; gRPC's
# DATA_LOSS, server-caused): the ratios must still class them right.
OTHER_ANSWERS = [("PERMISSION_DENIED", 403), ("FAILED_PRECONDITION", 400), ("OUT_OF_RANGE", 400),
                 ("ALREADY_EXISTS", 409), ("DATA_LOSS", 500)]


def test_the_error_ratio_counts_server_caused_statuses_only():
    codes = _api_error_codes()
    assert {"invalid_argument", "unauthenticated", "payload_too_large", "cancelled", "resource_exhausted",
            "unavailable", "deadline_exceeded", "internal"} <= set(codes)
    codes.update(HTTP_ONLY_REFUSALS)  # client-caused too
    answers = [*codes.values(), *PROXY_ANSWERS, *OTHER_ANSWERS]
    examples = {  # metric -> [(labels of one series, its HTTP status)]
        "ray_arbitrage_requests_total": [({"status": s}, h) for s, (_, h) in codes.items()]
        + [({"status": "ok"}, 200)],
        "ray_serve_num_http_requests_total": [({"status_code": str(h), "route": "/v1/chat/completions"}, h)
                                              for _, h in answers]
        + [({"status_code": "200", "route": "/v1/generate"}, 200)],
        "ray_serve_num_grpc_requests_total": [({"status_code": g, "method": "/arbitrage.v1.ArbitrageService/Generate"}, h)
                                              for g, h in answers]
        + [({"status_code": "OK", "method": "/arbitrage.v1.ArbitrageService/GenerateStream"}, 200)],
    }
    targets = _panel("Error ratio")["targets"]
    assert {m for t in targets for m in _METRIC.findall(t["expr"])} == set(examples)
    for target in targets:
        (num_metric, num), (den_metric, den) = _SELECTOR.findall(target["expr"])
        assert num_metric == den_metric, target["refId"]
        for labels, http in examples[num_metric]:
            series = {"application": "$application", **labels}
            # over the requests accepted: a client's mistake (a scanner's 404s) dilutes nothing
            assert _selects(_matchers(den), series) is _accepted(http), (target["refId"], labels)
            assert _selects(_matchers(num), series) is (http != 200 and not _client_caused(http)), \
                (target["refId"], labels)


def test_a_health_probe_is_no_api_error():
    targets = [*_panel("Error ratio")["targets"], *_panel("Requests / s by status")["targets"]]
    probes = {"http": [{"route": "/healthz", "method": "GET"}, {"route": "/livez", "method": "GET"}],
              "grpc": [{"route": "$application", "method": "/grpc.health.v1.Health/Check"},
                       {"route": "$application", "method": "/grpc.health.v1.Health/Watch"}]}
    checked = 0
    for target in targets:
        for metric, body in _SELECTOR.findall(target["expr"]):
            for protocol, series in probes.items():
                if metric.startswith(f"ray_serve_num_{protocol}_"):
                    checked += 1
                    for probe in series:
                        assert not _selects(_matchers(body), {"application": "$application", **probe}), (metric, probe)
    assert checked == 6


# -- latency -----------------------------------------------------------------------------------
def _http_routes() -> dict[str, str]:
    """path -> 'POST' or 'GET' (GET, HEAD) of every route of the HTTP API."""
    source = (ROOT / "services" / "http_api.py").read_text()
    return {path: "POST" if how == "post" else "GET"
            for how, path in re.findall(r'@api\.(get|post|api_route)\("([^"]+)"', source)}


def _grpc_methods(module, service: str) -> set[str]:
    desc = module.DESCRIPTOR.services_by_name[service]
    return {f"/{desc.full_name}/{m.name}" for m in desc.methods}


def test_the_proxy_latency_holds_the_api_calls_only():
    from grpc_health.v1 import health_pb2

    from protos.arbitrage.v1 import arbitrage_pb2

    routes = _http_routes()
    assert {"/v1/generate", "/healthz", "/livez"} <= set(routes)
    api = _grpc_methods(arbitrage_pb2, "ArbitrageService")
    health = _grpc_methods(health_pb2, "Health") | {"/ray.serve.RayServeAPIService/Healthz"}
    http, grpc_ = _panel("Serve HTTP / gRPC proxy latency")["targets"]
    (body,) = [b for m, b in _SELECTOR.findall(http["expr"]) if m == "ray_serve_http_request_latency_ms_bucket"]
    for path, method in routes.items():  # the generation calls are the POST routes
        assert _selects(_matchers(body), {"application": "$application", "route": path}) is (method == "POST"), path
    (body,) = [b for m, b in _SELECTOR.findall(grpc_["expr"]) if m == "ray_serve_grpc_request_latency_ms_bucket"]
    for method in api | health:
        assert _selects(_matchers(body), {"application": "$application", "method": method}) is (method in api), method


def test_the_coordinators_latency_panel_says_it_is_service_time():
    panel = _panel("Service time")
    assert "ray_arbitrage_request_ms_bucket" in panel["targets"][0]["expr"]
    assert "handler" in panel["title"] and "queue" in panel["description"]


# -- the application variable ------------------------------------------------------------------
def test_the_application_variable_reads_a_metric_serve_exports_from_startup():
    """A request counter has no series before the first request: every panel would be empty."""
    variable = _variable("application")
    assert variable["query"] == 'label_values(ray_serve_deployment_replica_healthy{namespace=~"$namespace"}, application)'


def test_every_selector_picks_one_namespace_and_application_and_all_matches_series_without_a_namespace():
    """Two RayServices of one name in two namespaces would otherwise chart as one; a Prometheus
    outside Kubernetes (`arbitrage serve`'s) has no namespace label, which All must still match."""
    namespace = _variable("namespace")
    assert namespace["includeAll"] and namespace["query"] == "label_values(ray_serve_deployment_replica_healthy, namespace)"
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    selectors = [body for q in exprs for _, body in _SELECTOR.findall(q)]
    assert len(selectors) >= 30
    for body in selectors:
        assert ("namespace", "=~", "$namespace") in _matchers(body) and ("application", "=", "$application") in _matchers(body)
        assert _selects([m for m in _matchers(body) if m[0] == "namespace"], {})
        assert _selects([m for m in _matchers(body) if m[0] == "namespace"], {"namespace": "team-a"})
