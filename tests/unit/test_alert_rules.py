"""The alert rules (k8s/monitoring/alerts.yaml, a Prometheus Operator PrometheusRule): the file
is one kube-prometheus-stack loads, every rule is complete and its PromQL parses
(promql-parser, the dev extra); every metric an alert reads is one this code exports
(services/) or one of Ray Serve's, checked against the installed ray, with the labels it
carries and the status / reason values the code sets; the error ratio excludes what the
dashboard's does, the overload alert counts the same 503 refusals on every source; every
ratio divides by the requests accepted (client mistakes such as 404, 401, 422 left out); the
thresholds fit what they compare with; descriptions point at doc sections that exist. Pure
file checks: no cluster, no network."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc
import promql_parser
import yaml
from test_dashboard_metrics import (
    HTTP_ONLY_REFUSALS,
    OTHER_ANSWERS,
    PROXY_ANSWERS,
    RAY_SERVE_METRICS,
    _accepted,
    _api_error_codes,
    _exported_by_services,
    _ingress_tag_keys,
    _panel,
    _prometheus_names,
    _ray_serve_source_metrics,
    _selects,
)

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
# ArbitrageAutoscalingAtMax, rendered per config with its bounds (arbitrage_common.kuberay.render).
RENDERED_ALERTS = sorted((ROOT / "k8s" / "overlays").glob("*/monitoring/autoscaling-alerts.yaml"))
SEVERITIES = {"warning", "critical"}
# Ray Serve's metrics the alerts read beyond the dashboard's ones.
ALERT_RAY_SERVE_METRICS = {**RAY_SERVE_METRICS, "serve_autoscaling_desired_replicas": "Gauge"}
# Labels the Prometheus Operator puts on every series of a PodMonitor's targets (the
# podmonitor's relabelings add theirs, read below).
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}
_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}
_COMPARISONS = {">", "<", ">=", "<=", "==", "!="}


# -- reading the rules -------------------------------------------------------------------------
def _doc() -> dict:
    return yaml.safe_load(ALERTS.read_text())


def _rules() -> list[dict]:
    """alerts.yaml's rules, then those rendered per config."""
    docs = [_doc()] + [yaml.safe_load(path.read_text()) for path in RENDERED_ALERTS]
    return [rule for doc in docs for group in doc["spec"]["groups"] for rule in group["rules"]]


def _rule(name: str) -> dict:
    (rule,) = [r for r in _rules() if r["alert"] == name]
    return rule


def _rendered_rule(cfg) -> dict:
    from arbitrage_common.kuberay.render import autoscaling_at_max_rule

    (rule,) = autoscaling_at_max_rule(cfg)["spec"]["groups"][0]["rules"]
    return rule


def _nodes(expr) -> list:
    found: list = []
    promql_parser.walk(expr, found.append)
    return found


def _selectors(expr) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) of every vector selector, in the order they appear."""
    return [(n.name, [(m.name, _OPS[str(m.op)], m.value) for m in n.matchers.matchers])
            for n in _nodes(expr) if isinstance(n, promql_parser.VectorSelector)]


def _threshold(rule: dict) -> tuple[str, float]:
    """The comparison at the top of a rule's expr and the number it compares with."""
    expr = promql_parser.parse(rule["expr"])
    assert isinstance(expr, promql_parser.BinaryExpr) and str(expr.op) in _COMPARISONS, rule["alert"]
    assert isinstance(expr.rhs, promql_parser.NumberLiteral), rule["alert"]
    return str(expr.op), expr.rhs.val


# -- what the code exports -----------------------------------------------------------------------
def _serve_tags() -> set[str]:
    """The labels Serve adds to every metric a replica exports (ray.serve.metrics)."""
    from ray.serve.metrics import APPLICATION_TAG, DEPLOYMENT_TAG, REPLICA_TAG

    return {DEPLOYMENT_TAG, REPLICA_TAG, APPLICATION_TAG}


def _literal_tags(node: ast.expr | None, assigned: dict[str, ast.expr]) -> set[str]:
    """The string literals a ``tag_keys=`` argument can hold (a tuple, a name assigned one in the
    same function, either branch of a conditional)."""
    if node is None:
        return set()
    if isinstance(node, ast.Name):
        return _literal_tags(assigned[node.id], assigned)
    if isinstance(node, ast.IfExp):
        return _literal_tags(node.body, assigned) | _literal_tags(node.orelse, assigned)
    return set(ast.literal_eval(node))


def _metric_calls(path: Path, prefix: str) -> dict[str, set[str]]:
    """Metric name -> tag keys of every ``Counter`` / ``Gauge`` / ``Histogram`` call in ``path``
    whose first argument is a string starting with ``prefix``."""
    found: dict[str, set[str]] = {}
    for func in ast.walk(ast.parse(path.read_text())):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        assigned = {t.id: n.value for n in ast.walk(func) if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        for call in ast.walk(func):
            kind = getattr(call, "func", None)
            kind = getattr(kind, "attr", getattr(kind, "id", None))
            if kind in ("Counter", "Gauge", "Histogram") and call.args and isinstance(call.args[0], ast.Constant) \
                    and str(call.args[0].value).startswith(prefix):
                tags = next((k.value for k in call.keywords if k.arg == "tag_keys"), None)
                for name in _prometheus_names(kind, call.args[0].value):
                    found[name] = _literal_tags(tags, assigned)
    return found


def _ours() -> dict[str, set[str]]:
    """Prometheus name -> labels of every metric services/ exports (the load controller's gauges,
    the rows a coordinator holds back and a vLLM pool's engine metrics, from their tables)."""
    from services.engine_metrics import ENGINE_GAUGES, PREEMPTIONS
    from services.load_metrics import LOAD_GAUGES, ROWS_WAITING

    tags: dict[str, set[str]] = {}
    for path in (ROOT / "services").glob("*.py"):
        tags.update(_metric_calls(path, "arbitrage_"))
    tags.update({f"ray_{name}": set() for name, _ in LOAD_GAUGES.values()})
    tags.update({f"ray_{name}": {"role"} for name, _ in (*ENGINE_GAUGES.values(), ROWS_WAITING)})
    tags.update({name: {"role"} for name in _prometheus_names("Counter", PREEMPTIONS[0])})
    return {name: keys | _serve_tags() for name, keys in tags.items()}


def _ray_serve() -> dict[str, set[str]]:
    """Prometheus name -> labels of the Ray Serve metrics the alerts may read: the proxies'
    from Ray's own class, the others from the installed ray's source (those a replica
    registers, in replica.py, also get Serve's replica labels)."""
    import ray

    by_name = _ingress_tag_keys()
    for path in (Path(ray.__file__).parent / "serve" / "_private").glob("*.py"):
        wanted = [n for n in ALERT_RAY_SERVE_METRICS if n not in by_name and f'"{n}"' in path.read_text()]
        if wanted:
            calls = _metric_calls(path, "serve_")
            extra = _serve_tags() if path.name == "replica.py" else set()
            by_name.update({n: calls[f"ray_{n}"] | extra for n in wanted if f"ray_{n}" in calls})
    return {prom: by_name[name] for name, kind in ALERT_RAY_SERVE_METRICS.items() if name in by_name
            for prom in _prometheus_names(kind, name)}


def _target_labels() -> set[str]:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    relabeled = {r["targetLabel"] for e in monitor["spec"]["podMetricsEndpoints"] for r in e.get("relabelings", [])}
    return TARGET_LABELS | relabeled


def _retry_reasons() -> set[str]:
    """What ``services.handles.retry_reason`` returns (the ``reason`` label of pool retries)."""
    tree = ast.parse((ROOT / "services" / "handles.py").read_text())
    (func,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "retry_reason"]
    return {n.value.value for n in ast.walk(func) if isinstance(n, ast.Return)
            and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


# -- the file ----------------------------------------------------------------------------------
def test_the_file_is_a_prometheus_rule_that_kustomize_applies_and_the_stack_selects():
    doc = _doc()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["spec"]["groups"] and all(g["name"] and g["rules"] for g in doc["spec"]["groups"])
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert doc["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    assert "alerts.yaml" in yaml.safe_load((MONITORING / "kustomization.yaml").read_text())["resources"]


def test_the_rendered_rules_are_prometheus_rules_the_stack_selects_in_their_own_kustomization():
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert len(RENDERED_ALERTS) >= 4  # cpu-demo and every preset
    for path in RENDERED_ALERTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
        assert doc["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
        assert [r["alert"] for g in doc["spec"]["groups"] for r in g["rules"]] == ["ArbitrageAutoscalingAtMax"]
        assert yaml.safe_load((path.parent / "kustomization.yaml").read_text())["resources"] == [path.name]


def test_every_rule_is_a_complete_alert_with_a_unique_name():
    shared = [r.get("alert") for group in _doc()["spec"]["groups"] for r in group["rules"]]
    for path in RENDERED_ALERTS:  # each config's rendered rules beside the shared ones
        rendered = yaml.safe_load(path.read_text())["spec"]["groups"]
        names = shared + [r.get("alert") for group in rendered for r in group["rules"]]
        assert len(names) >= 8 and all(names) and len(set(names)) == len(names), (path, names)
    for rule in _rules():
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        notes = rule["annotations"]
        assert notes.get("summary", "").strip() and notes.get("description", "").strip(), rule["alert"]
        assert not re.search(r"https?://", " ".join(notes.values())), f"{rule['alert']}: a URL"


def test_every_expr_parses_as_promql_and_filters_with_a_comparison():
    """An alert fires for each series its expr returns: a comparison (no ``bool``) must filter them."""
    for rule in _rules():
        expr = promql_parser.parse(rule["expr"])  # ValueError where the PromQL does not parse
        assert any(isinstance(n, promql_parser.BinaryExpr) and str(n.op) in _COMPARISONS
                   and not (n.modifier and n.modifier.return_bool) for n in _nodes(expr)), rule["alert"]


def test_the_severities():
    severity = {r["alert"]: r["labels"]["severity"] for r in _rules()}
    assert severity["ArbitrageNoHealthyReplica"] == "critical"
    assert severity["ArbitrageThresholdOffsetAtMax"] == severity["ArbitragePoolReplicaRetries"] == "warning"


# -- every name exists, with its labels and values --------------------------------------------------
def test_every_metric_an_alert_reads_is_exported_by_services_or_by_ray_serve():
    known = _ours() | _ray_serve()
    assert _exported_by_services() <= set(known)  # the scan finds what the dashboard test's does
    assert {"ray_arbitrage_requests_total", "ray_arbitrage_threshold_offset",
            "ray_serve_num_http_requests_total", "ray_serve_autoscaling_desired_replicas"} <= set(known)
    for rule in _rules():
        for metric, _ in _selectors(promql_parser.parse(rule["expr"])):
            assert metric in known, f"{rule['alert']}: {metric} is exported by nothing"


def test_the_listed_ray_serve_metrics_exist_in_the_installed_ray_with_that_kind():
    found = _ray_serve_source_metrics()
    for name, kind in ALERT_RAY_SERVE_METRICS.items():
        assert kind in found.get(name, set()), f"{name}: not a {kind} in the installed ray's Serve ({found.get(name)})"


def test_every_label_an_alert_matches_or_groups_by_is_one_the_metric_carries():
    known, target = _ours() | _ray_serve(), _target_labels()
    checked = 0
    for rule in _rules():
        expr = promql_parser.parse(rule["expr"])
        for metric, matchers in _selectors(expr):
            for label, _, _ in matchers:
                checked += 1
                assert label in known[metric], f"{rule['alert']}: {metric} has no label {label!r}"
        for node in _nodes(expr):
            if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
                labels, under = set(node.modifier.labels), _selectors(node)
            elif isinstance(node, promql_parser.BinaryExpr) and node.modifier and node.modifier.matching:
                labels, under = set(node.modifier.matching.labels), _selectors(node)
            else:
                continue
            for metric, _ in under:
                checked += 1
                carried = known[metric] | target | ({"le"} if metric.endswith("_bucket") else set())
                assert labels <= carried, f"{rule['alert']}: {metric} has no {sorted(labels - carried)}"
    assert checked >= 30


def test_the_status_and_reason_values_matched_are_ones_the_code_sets():
    statuses = set(_api_error_codes()) | {"ok"}
    grpc_codes = {c.name for c in grpc.StatusCode}
    http = {str(h) for _, h in [*_api_error_codes().values(), *PROXY_ANSWERS, ("OK", 200)]}
    checked = 0
    for rule in _rules():
        for metric, matchers in _selectors(promql_parser.parse(rule["expr"])):
            for label, op, value in matchers:
                if label == "status" or (label == "status_code" and "grpc" in metric) or label == "reason":
                    assert re.fullmatch(r"\w+(\|\w+)*", value), f"{rule['alert']}: {label}{op}{value!r}: a plain list"
                    real = {"status": statuses, "status_code": grpc_codes, "reason": _retry_reasons()}[label]
                    assert set(value.split("|")) <= real, f"{rule['alert']}: {label} {sorted(set(value.split('|')) - real)}"
                elif label == "status_code":  # HTTP: each alternative matches a status the service answers
                    for alternative in value.split("|"):
                        assert any(re.fullmatch(alternative, h) for h in http), f"{rule['alert']}: {alternative!r}"
                else:
                    continue
                checked += 1
    assert checked >= 7


# -- what the alerts count ---------------------------------------------------------------------------
DASHBOARD_VARIABLES = {"namespace", "application"}  # the alerts group by these labels instead


def _without_dashboard_variables(selectors):
    return sorted((metric, sorted(m for m in matchers if m[0] not in DASHBOARD_VARIABLES))
                  for metric, matchers in selectors)


def test_the_server_error_ratio_leaves_out_what_the_dashboards_error_ratio_does():
    """The same selectors, source by source, as the panel (whose statuses
    test_dashboard_metrics.py checks), less the dashboard's namespace and application variables."""
    panel = [s for t in _panel("Error ratio")["targets"]
             for s in _selectors(promql_parser.parse(t["expr"].replace("$__rate_interval", "5m")))]
    alert = _selectors(promql_parser.parse(_rule("ArbitrageServerErrorRatioHigh")["expr"]))
    unique = [s for i, s in enumerate(alert) if s not in alert[:i]]  # (a guard repeats its denominator)
    assert _without_dashboard_variables(unique) == _without_dashboard_variables(panel)


def test_the_overload_alert_counts_the_same_503_refusals_on_every_source():
    codes = _api_error_codes()
    refused = {status for status, (_, http) in codes.items() if http == 503}
    assert refused == {"resource_exhausted", "unavailable"}
    answers = [*codes.values(), *PROXY_ANSWERS, ("OK", 200), ("INVALID_ARGUMENT", 422)]
    examples = {  # metric -> [(labels of one series, counted as refused?, accepted?)]
        "ray_arbitrage_requests_total": [({"status": s}, s in refused, _accepted(h))
                                         for s, (_, h) in [*codes.items(), ("ok", ("OK", 200))]],
        "ray_serve_num_http_requests_total": [({"application": "app", "route": "/v1/generate", "status_code": str(h)},
                                               h == 503, _accepted(h)) for _, h in answers],
        "ray_serve_num_grpc_requests_total": [({"application": "app", "method": "/arbitrage.v1.ArbitrageService/Generate",
                                                "status_code": g}, h == 503, _accepted(h)) for g, h in answers],
    }
    selectors = _selectors(promql_parser.parse(_rule("ArbitrageOverloaded")["expr"]))
    assert {m for m, _ in selectors} == set(examples)
    for metric, series in examples.items():
        (num, den, guard) = [matchers for m, matchers in selectors if m == metric]
        assert guard == den
        for labels, is_refused, accepted in series:
            assert _selects(den, labels) is accepted, (metric, labels)  # a client's 422 dilutes nothing
            assert _selects(num, labels) is is_refused, (metric, labels)


def test_the_abandoned_alert_counts_client_cancels_on_every_source_and_the_error_ratio_does_not():
    codes = _api_error_codes()
    assert codes["cancelled"] == ("CANCELLED", 499)  # what Serve's proxies count for a cancel, too
    answers = [*codes.values(), *PROXY_ANSWERS, ("OK", 200)]
    examples = {  # metric -> [(labels of one series, counted as abandoned?, accepted?)]
        "ray_arbitrage_requests_total": [({"status": s}, s == "cancelled", _accepted(h))
                                         for s, (_, h) in [*codes.items(), ("ok", ("OK", 200))]],
        "ray_serve_num_http_requests_total": [({"application": "app", "route": "/v1/chat/completions",
                                                "status_code": str(h)}, h == 499, _accepted(h)) for _, h in answers],
        "ray_serve_num_grpc_requests_total": [({"application": "app", "method": "/arbitrage.v1.ArbitrageService/GenerateStream",
                                                "status_code": g}, g == "CANCELLED", _accepted(h)) for g, h in answers],
    }
    abandoned = _selectors(promql_parser.parse(_rule("ArbitrageRequestsAbandoned")["expr"]))
    errors = _selectors(promql_parser.parse(_rule("ArbitrageServerErrorRatioHigh")["expr"]))
    assert {m for m, _ in abandoned} == set(examples)
    for metric, series in examples.items():
        (num, den, guard) = [matchers for m, matchers in abandoned if m == metric]
        (error_num, _, _) = [matchers for m, matchers in errors if m == metric]
        assert guard == den
        for labels, is_abandoned, accepted in series:
            assert _selects(den, labels) is accepted, (metric, labels)  # cancels in it, client mistakes not
            assert _selects(num, labels) is is_abandoned, (metric, labels)
            assert not (is_abandoned and _selects(error_num, labels)), (metric, labels)


# What every ratio divides by, source by source: the requests the service accepted (a success,
# a client's cancel, every server-caused failure), and never a client's mistake.
ACCEPTED = {
    "ray_arbitrage_requests_total": {"ok", "cancelled", "resource_exhausted", "unavailable", "deadline_exceeded",
                                     "internal"},
    "ray_serve_num_http_requests_total": {"200", "499", "408", "500", "503", "504"},
    "ray_serve_num_grpc_requests_total": {"OK", "CANCELLED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                                          "INTERNAL", "UNKNOWN", "DATA_LOSS"},
}
CLIENT_MISTAKES = {
    "ray_arbitrage_requests_total": {"not_found", "unauthenticated", "invalid_argument", "payload_too_large",
                                     "method_not_allowed", "model_not_found", "invalid_request"},
    "ray_serve_num_http_requests_total": {"404", "401", "405", "413", "422", "400", "403", "409"},
    "ray_serve_num_grpc_requests_total": {"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND",
                                          "UNIMPLEMENTED", "FAILED_PRECONDITION", "OUT_OF_RANGE", "ALREADY_EXISTS"},
}


def _every_answer() -> dict[str, list[tuple[dict[str, str], str, int]]]:
    """metric -> [(labels of one series, its status value, its HTTP status)] for every answer a
    source counts: the services' ApiErrors and HTTP-only refusals, the proxies' own answers,
    other client mistakes (and DATA_LOSS) a series may carry, and a success."""
    codes = {**_api_error_codes(), **HTTP_ONLY_REFUSALS}
    answers = [*codes.values(), *PROXY_ANSWERS, *OTHER_ANSWERS, ("OK", 200)]
    http = {"application": "app", "route": "/v1/generate"}
    grpc_ = {"application": "app", "method": "/arbitrage.v1.ArbitrageService/Generate"}
    return {
        "ray_arbitrage_requests_total": [({"status": s}, s, h) for s, (_, h) in [*codes.items(), ("ok", ("OK", 200))]],
        "ray_serve_num_http_requests_total": [({**http, "status_code": str(h)}, str(h), h) for _, h in answers],
        "ray_serve_num_grpc_requests_total": [({**grpc_, "status_code": g}, g, h) for g, h in answers],
    }


def test_every_ratio_divides_by_the_requests_accepted_and_leaves_client_mistakes_out():
    """A scanner probing random paths (404s at 50/s), a bad API key (401), a body too large
    (413) or invalid (422, 400): refused for the client's own mistake, counted in no ratio's
    denominator (nor its guard), where they would hide a real 5xx burst. Successes, client
    cancels (the abandoned alert's numerator) and every server-caused status are in all."""
    examples = _every_answer()
    for metric, series in examples.items():
        seen = {value for _, value, _ in series}
        assert seen == ACCEPTED[metric] | CLIENT_MISTAKES[metric], (metric, sorted(seen))
        assert not ACCEPTED[metric] & CLIENT_MISTAKES[metric], metric
        for _, value, http in series:  # the lists above agree with the HTTP classes
            assert (value in ACCEPTED[metric]) is _accepted(http), (metric, value, http)
    for name in RATIO_ALERTS:
        selectors = _selectors(promql_parser.parse(_rule(name)["expr"]))
        assert {m for m, _ in selectors} == set(examples), name
        for metric, series in examples.items():
            (num, den, guard) = [matchers for m, matchers in selectors if m == metric]
            assert guard == den, (name, metric)
            for labels, value, _ in series:
                assert _selects(den, labels) is (value in ACCEPTED[metric]), (name, metric, value)
                assert not _selects(num, labels) or _selects(den, labels), (name, metric, value)  # num within den


# Serve's proxies count their own routes under application="": KubeRay's readiness probe alone
# makes them, and they answer 503 while no ingress replica runs.
SERVE_OWN_SERIES = [{"application": "", "route": "/-/healthz", "status_code": "503"},
                    {"application": "", "route": "/-/routes", "status_code": "503"}]


def test_every_proxy_selector_leaves_out_serves_own_routes():
    checked = 0
    for rule in _rules():
        for metric, matchers in _selectors(promql_parser.parse(rule["expr"])):
            if re.match(r"ray_serve_(num_)?(http|grpc)_", metric):
                checked += 1
                assert ("application", "!=", "") in matchers, f'{rule["alert"]}: {metric} lacks application!=""'
                assert not any(_selects(matchers, series) for series in SERVE_OWN_SERIES), (rule["alert"], metric)
    assert checked >= 18  # three ratio alerts, two proxies, numerator, denominator and guard


RATIO_ALERTS = ("ArbitrageServerErrorRatioHigh", "ArbitrageOverloaded", "ArbitrageRequestsAbandoned")
MIN_REQUESTS_PER_S = 0.1  # below it (6 a minute) one failed request would be a ratio of 20 % or more


def test_every_ratio_is_guarded_by_a_minimum_of_its_own_traffic():
    """A ratio alert fires only where its source carried at least 6 requests a minute: at less,
    one failure in the window is a ratio of 20 % and would page. Each source is guarded by its
    own denominator, so a dead coordinator (no coordinator traffic) still fires on the proxies'."""
    for name in RATIO_ALERTS:
        guards = [n for n in _nodes(promql_parser.parse(_rule(name)["expr"]))
                  if isinstance(n, promql_parser.BinaryExpr) and str(n.op) == "and"]
        assert len(guards) == 3, name  # coordinator, HTTP proxy, gRPC proxy
        for guard in guards:
            ratio, floor = guard.lhs, guard.rhs
            assert isinstance(ratio, promql_parser.BinaryExpr) and str(ratio.op) == "/", name
            assert isinstance(floor, promql_parser.BinaryExpr) and str(floor.op) == ">=", name
            assert isinstance(floor.rhs, promql_parser.NumberLiteral) and floor.rhs.val == MIN_REQUESTS_PER_S, name
            assert _selectors(floor.lhs) == _selectors(ratio.rhs), name
            assert sorted(guard.modifier.matching.labels) == ["application", "namespace"], name


def test_the_latency_slo_lies_inside_the_histograms_buckets_and_the_summary_names_it():
    """Above the last finite bucket bound histogram_quantile cannot go: the alert would never fire."""
    rule = _rule("ArbitrageLatencyP95High")
    tree = ast.parse((ROOT / "services" / "coordinator.py").read_text())
    (bounds,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "_LATENCY_MS" for t in n.targets)]
    op, slo = _threshold(rule)
    assert op == ">" and bounds[0] <= slo < bounds[-1], (slo, bounds)
    assert [m for m, _ in _selectors(promql_parser.parse(rule["expr"]))] == ["ray_arbitrage_request_ms_bucket"]
    assert f"{slo:.0f} ms" in rule["annotations"]["summary"]


def test_the_offset_alert_fires_at_each_replicas_own_max_offset():
    """The coordinator exports its max_offset beside the offset (so a config's own bound
    counts, not the default): the rule fires when the offset reaches it, and the controller
    clamps the offset to exactly that value."""
    from arbitrage_common.config import LoadControlSpec
    from arbitrage_common.threshold_control import LoadController
    from services.load_metrics import LOAD_GAUGES, LoadGauges

    rule = _rule("ArbitrageThresholdOffsetAtMax")
    assert _threshold(rule) == (">=", 0.0)
    assert [m for m, _ in _selectors(promql_parser.parse(rule["expr"]))] == \
        [f"ray_{LOAD_GAUGES['offset'][0]}", f"ray_{LOAD_GAUGES['max_offset'][0]}"]
    controller = LoadController(LoadControlSpec(enabled=True, max_offset=0.12, latency_budget_ms=1.0))
    for second in range(1, 400):  # target calls far over budget: the offset climbs to its bound
        controller.observe_latency(1000.0, float(second))
        controller.update(float(second), can_scale=False)
    values: dict[str, float] = {}

    class Gauge:
        def __init__(self, name: str, description: str) -> None:
            self.name = name

        def set(self, value: float) -> None:
            values[self.name] = value

    LoadGauges(Gauge).export(controller.snapshot())
    assert values[LOAD_GAUGES["offset"][0]] - values[LOAD_GAUGES["max_offset"][0]] >= 0
    assert values[LOAD_GAUGES["max_offset"][0]] == 0.12


def _evaluate_at_max(expr: str, series: dict[tuple[str, str], float]) -> set[str]:
    """Deployments the rendered rule returns for gauge values ``series`` ((application,
    deployment) -> ray_serve_autoscaling_target_replicas): its terms are ``max by (...)
    (selector) >= N`` joined by ``or``; evaluated here as Prometheus would."""
    def terms(node):
        if isinstance(node, promql_parser.BinaryExpr) and str(node.op) == "or":
            return terms(node.lhs) + terms(node.rhs)
        return [node]

    firing = set()
    for term in terms(promql_parser.parse(expr)):
        assert str(term.op) == ">=" and isinstance(term.lhs, promql_parser.AggregateExpr)
        ((metric, matchers),) = _selectors(term.lhs)
        assert metric == "ray_serve_autoscaling_target_replicas"
        for (application, deployment), value in series.items():
            if _selects(matchers, {"application": application, "deployment": deployment}) and value >= term.rhs.val:
                firing.add(deployment)
    return firing


def _serve_controller(cfg, deployment: str, wanted: list[tuple[float, float]], seconds: float):
    """Scrapes (every 15 s) of Serve's desired and target replicas gauges while its policy asks
    for ``wanted`` ((from second, replicas), ...) replicas: Ray's own delay logic on its 0.1 s
    control loop, then the bounds, as autoscaling_state does; a gauge reads its last value."""
    from ray.serve.autoscaling_policy import _apply_delay_logic
    from ray.serve.config import AutoscalingConfig

    spec = dict(cfg.pools.configured())[deployment].autoscaling_config
    config = AutoscalingConfig(min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
                               upscale_delay_s=spec.upscale_delay_s, downscale_delay_s=spec.downscale_delay_s)
    target, state, scrapes = spec.min_replicas, {}, []
    for tick in range(int(seconds * 10)):
        now = tick / 10
        raw = [n for start, n in wanted if now >= start][-1]
        desired, state = _apply_delay_logic(raw, target, config, state, _now=now)
        target = min(max(desired, spec.min_replicas), spec.max_replicas)
        if tick % 150 == 0:
            scrapes.append((now, desired, target))
    return scrapes


def test_the_at_max_alert_fires_on_a_pool_held_at_its_max_and_not_after_its_load_falls():
    """The target pool's policy asks for 12 replicas (max 8) for 30 minutes, then for 2. The
    rendered rule holds on every scrape from the upscale on, then stops after the downscale
    delay; the old rule (desired above target) held on almost none, so `for: 15m` never ran out."""
    from arbitrage_common.kuberay.targets import target_config

    cfg = target_config("llama-1b-8b")
    rule = _rendered_rule(cfg)
    spec = cfg.pools.target.autoscaling_config
    assert spec.max_replicas == 8
    scrapes = _serve_controller(cfg, "target", [(0, 12), (1800, 2)], seconds=2400)
    fires = [(now, "target" in _evaluate_at_max(rule["expr"], {(cfg.name, "target"): target}))
             for now, _, target in scrapes]
    held = [now for now, firing in fires if firing]
    assert held[0] <= 30 and all(firing for now, firing in fires if held[0] <= now < 1800)
    assert not any(firing for now, firing in fires if now > 1800 + spec.downscale_delay_s + 15)
    old = [desired > target for now, desired, target in scrapes if 30 <= now < 1800]
    assert sum(old) / len(old) < 0.1  # the gauge shows the policy's ask for one tick per upscale delay
    assert _evaluate_at_max(rule["expr"], {("another-app", "target"): 8}) == set()  # its own application only


def test_the_no_healthy_replica_alert_spares_a_pool_scaled_to_zero():
    expr = promql_parser.parse(_rule("ArbitrageNoHealthyReplica")["expr"])
    assert isinstance(expr, promql_parser.BinaryExpr) and str(expr.op) == "unless"
    assert [m for m, _ in _selectors(expr.lhs)] == ["ray_serve_deployment_replica_healthy"]
    assert [m for m, _ in _selectors(expr.rhs)] == ["ray_serve_autoscaling_target_replicas"]
    assert str(expr.rhs.op) == "==" and expr.rhs.rhs.val == 0


# -- docs -----------------------------------------------------------------------------------------
def test_descriptions_point_at_doc_sections_that_exist():
    kuberay = (ROOT / "docs" / "KUBERAY.md").read_text()
    serving = (ROOT / "docs" / "SERVING.md").read_text()
    sections = dict(re.findall(r"^## (\d+)\. (.+)$", kuberay, re.MULTILINE))
    headings = set(re.findall(r"^#+ (.+)$", serving, re.MULTILINE))
    for rule in _rules():
        text = " ".join(rule["annotations"].values())
        assert "docs/KUBERAY.md §" in text or "docs/SERVING.md" in text, f"{rule['alert']}: no doc reference"
        for number, title in re.findall(r"§(\d+) \(([^)]+)\)", text):
            assert sections.get(number) == title, f"{rule['alert']}: KUBERAY.md has no '## {number}. {title}'"
        for title in re.findall(r'docs/SERVING\.md "([^"]+)"', text):
            assert title in headings, f"{rule['alert']}: SERVING.md has no heading {title!r}"


def test_the_kuberay_doc_lists_every_alert():
    kuberay = (ROOT / "docs" / "KUBERAY.md").read_text()
    metrics = kuberay[kuberay.index("## 9. Metrics"):kuberay.index("## 10.")]
    for rule in _rules():
        assert f"`{rule['alert']}`" in metrics, rule["alert"]
