"""k8s/components/network-policy: built on top of every committed overlay, each NetworkPolicy
selects Pods the overlay makes (the Ray Pods with the labels KubeRay 1.7 gives them, the HA
Redis), every Ray Pod is selected (so isolated: default deny of ingress), and each port a rule
opens resolves, on every Pod it selects, to the port the config uses (read from the rendered
RayService: serveConfigV2, rayStartParams, gcsFaultToleranceOptions). docs/KUBERAY.md, "Network
policy"."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from test_k8s_manifests import K8S, _validate_core, kustomize, overlays

COMPONENT = K8S / "components" / "network-policy"
INSTANCE = "app.kubernetes.io/instance"
# What docs/KUBERAY.md tells users to write, the patch of the clients' rule included.
USER_PATCH = {"target": {"kind": "NetworkPolicy", "name": ".*-serve-clients"},
              "patch": "- op: replace\n  path: /spec/ingress/0/from\n  value:\n"
                       "  - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ingress-nginx}}\n"}
OPERATOR_POD = {"app.kubernetes.io/name": "kuberay-operator"}  # KubeRay's Helm chart's Pod label


def with_component(tmp_path: Path, overlay: Path, **extra) -> list[dict]:
    """A user's kustomization: one rendered overlay plus the component (as the docs show it)."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
         "resources": [os.path.relpath(overlay, tmp_path)], "components": [os.path.relpath(COMPONENT, tmp_path)],
         **extra}))
    return kustomize(tmp_path)


class Pod:
    def __init__(self, name: str, labels: dict[str, str], ports: dict[str, int], ray: bool, kuberay: bool = True):
        # ray: a Ray node of the RayService; kuberay: a Pod KubeRay makes for it (the cleanup Job's too)
        self.name, self.labels, self.ports, self.ray, self.kuberay = name, labels, ports, ray, kuberay


def kuberay_labels(template_labels: dict, group_labels: dict, node_type: str, group: str, cluster: str) -> dict:
    """KubeRay 1.7 ``common/pod.go`` ``labelPod``: its own labels, then the template's and the
    group's ``labels`` over them, except node-type, group and cluster, which it keeps."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    labels |= {**template_labels, **group_labels}
    return labels | {"ray.io/node-type": node_type, "ray.io/group": group, "ray.io/cluster": cluster}


def _ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
            if "name" in p}


def pods(docs: list[dict]) -> list[Pod]:
    """The Pods the built objects lead to: the RayService's Ray Pods as KubeRay labels them (its
    RayCluster's name has a generated suffix), the GCS-FT Redis cleanup Job's Pod (the head's,
    relabelled), and every Deployment's."""
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    cluster, name = service["spec"]["rayClusterConfig"], service["metadata"]["name"] + "-x7k2q"
    head = cluster["headGroupSpec"]
    out = [Pod("head", kuberay_labels(head["template"]["metadata"]["labels"], head.get("labels", {}), "head",
                                      "headgroup", name), _ports(head["template"]), True)]
    out += [Pod(g["groupName"], kuberay_labels(g["template"]["metadata"]["labels"], g.get("labels", {}), "worker",
                                               g["groupName"], name), _ports(g["template"]), True)
            for g in cluster["workerGroupSpecs"]]
    if "gcsFaultToleranceOptions" in cluster:
        out.append(Pod("redis-cleanup", out[0].labels | {"ray.io/node-type": "redis-cleanup"}, {}, False))
    out += [Pod(d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"], _ports(d["spec"]["template"]),
                False, False) for d in docs if d["kind"] == "Deployment"]
    return out


def matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is modelled here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def config_ports(service: dict) -> dict[str, int]:
    """The numbers each named port must have, from the rendered config rather than constants."""
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    cluster = service["spec"]["rayClusterConfig"]
    ports = {"serve": serve["http_options"]["port"], "serve-grpc": serve["grpc_options"]["port"],
             "metrics": int(cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"]),
             # KubeRay's default dashboard port unless rayStartParams sets another
             "dashboard": int(cluster["headGroupSpec"]["rayStartParams"].get("dashboard-port", 8265))}
    assert all(int(g["rayStartParams"]["metrics-export-port"]) == ports["metrics"]
               for g in cluster["workerGroupSpecs"])
    if "gcsFaultToleranceOptions" in cluster:
        ports["redis"] = urlparse(cluster["gcsFaultToleranceOptions"]["redisAddress"]).port
    return ports


@pytest.mark.parametrize("overlay", overlays(), ids=lambda p: p.name)
def test_every_policy_selects_the_overlays_pods_and_opens_the_configs_ports(tmp_path, overlay):
    docs = with_component(tmp_path, overlay, patches=[USER_PATCH])
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    name, ha = service["metadata"]["name"], overlay.name.endswith("-ha")
    assert service["metadata"]["labels"][INSTANCE] == name
    assert set(policies) == {f"{name}-ray-cluster", f"{name}-kuberay-operator", f"{name}-prometheus",
                             f"{name}-serve-clients", "arbitrage-redis"}
    every = pods(docs)
    ray = [p for p in every if p.ray]
    want = config_ports(service)
    for policy in policies.values():
        _validate_core(policy)
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
        selected = [p for p in every if matches(spec["podSelector"], p.labels)]
        if policy["metadata"]["name"] == "arbitrage-redis":
            # selects nothing without the ha component, the Redis alone with it
            assert [p.name for p in selected] == (["arbitrage-redis"] if ha else [])
        else:
            assert selected and all(p.kuberay for p in selected), policy["metadata"]["name"]
            assert all(p.labels[INSTANCE] == name for p in selected)
        # each named port resolves on every Pod the policy selects, to the config's number (the
        # cleanup Job's Pod, selected too as it carries the head's labels, serves nothing)
        for rule in spec["ingress"]:
            for port in rule.get("ports", []):
                assert isinstance(port["port"], str) and port["protocol"] == "TCP"
                for pod in selected:
                    if pod.name == "redis-cleanup":
                        continue
                    assert pod.ports.get(port["port"]) == want[port["port"]], (policy["metadata"]["name"], pod.name)
    # default deny: every Ray Pod is selected by some policy
    assert all(any(matches(p["spec"]["podSelector"], pod.labels) for p in policies.values()) for pod in ray)

    def sources(policy: str) -> list[dict]:
        return [peer for rule in policies[policy]["spec"]["ingress"] for peer in rule["from"]]

    # (a) every Ray Pod of the RayService from every other, all ports
    intra = policies[f"{name}-ray-cluster"]["spec"]
    assert [p.name for p in every if p.ray and matches(intra["podSelector"], p.labels)] == [p.name for p in ray]
    (peer,) = sources(f"{name}-ray-cluster")
    assert set(peer) == {"podSelector"} and "ports" not in intra["ingress"][0]
    assert [p.name for p in ray if matches(peer["podSelector"], p.labels)] == [p.name for p in ray]
    # (b) the operator's Pods, into the head only, on the dashboard and the head's proxy
    op = policies[f"{name}-kuberay-operator"]["spec"]
    assert [p.name for p in every if matches(op["podSelector"], p.labels)] == ["head"]  # not redis-cleanup
    (peer,) = sources(f"{name}-kuberay-operator")
    assert set(peer) == {"namespaceSelector", "podSelector"} and matches(peer["podSelector"], OPERATOR_POD)
    assert {p["port"] for p in op["ingress"][0]["ports"]} == {"dashboard", "serve"}
    # (c) one namespace, metrics only, (d) clients on the two Serve ports only, as patched
    assert {p["port"] for p in policies[f"{name}-prometheus"]["spec"]["ingress"][0]["ports"]} == {"metrics"}
    assert all(set(peer) == {"namespaceSelector"} for peer in sources(f"{name}-prometheus"))
    clients = policies[f"{name}-serve-clients"]["spec"]
    assert {p["port"] for p in clients["ingress"][0]["ports"]} == {"serve", "serve-grpc"}
    assert sources(f"{name}-serve-clients") == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    # (e) into Redis: the head and KubeRay's cleanup Job only, never a worker
    (peer,) = sources("arbitrage-redis")
    assert set(peer) == {"podSelector"}
    assert [p.name for p in every if matches(peer["podSelector"], p.labels)] == \
        (["head", "redis-cleanup"] if ha else ["head"])


def test_the_unpatched_clients_rule_admits_only_labelled_pods_of_the_namespace(tmp_path):
    docs = with_component(tmp_path, K8S / "overlays" / "cpu-demo")
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-serve-clients")]
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"arbitrage-serve.io/client":
                                                                                     "true"}}}]


def test_a_users_namespace_reaches_every_policy(tmp_path):
    docs = with_component(tmp_path, K8S / "overlays" / "llama-1b-8b-ha", namespace="serving")
    assert {d["metadata"].get("namespace") for d in docs} == {"serving"}


def test_two_rayservices_in_one_namespace_keep_their_own_policies(tmp_path):
    names = []
    for overlay in ("llama-1b-8b", "qwen-math-1.5b-7b"):
        (tmp_path / overlay).mkdir()
        names.append({d["metadata"]["name"] for d in with_component(tmp_path / overlay, K8S / "overlays" / overlay)
                      if d["kind"] == "NetworkPolicy"} - {"arbitrage-redis"})
    assert len(names[0]) == 4 and not names[0] & names[1]
