"""services.process_cpu on the real cluster: every replica is found under its role, and the
roles that serve a request spend CPU on it (what `serve bench` prints per request)."""
from serve_helpers import problems

from services.process_cpu import cpu_by_role, process_cpu


def test_replicas_are_found_under_their_roles_and_the_serving_ones_spend_cpu(serve_cluster, stub, main_metadata):
    from ray import serve

    from protos.arbitrage.v1 import arbitrage_pb2 as pb

    app = serve_cluster[0].name
    pids = {role: serve.get_deployment_handle(role, app_name=app).info.remote().result()["pid"]
            for role in ("draft", "target", "router", "prm")}
    before = process_cpu(app)
    assert {role: before[pid][0] for role, pid in pids.items()} == {role: role for role in pids}
    roles = {role for role, _ in before.values()}
    assert {"coordinator", "proxy", "serve_controller", "ray", "bench"} <= roles
    replies = [stub.Generate(pb.GenerateRequest(prompt=p.prompt, policy="arbitrage", max_steps=6),
                             metadata=main_metadata) for p in problems(4, seed=43)]
    assert all(r.steps for r in replies)
    spent = cpu_by_role(before, process_cpu(app))
    assert all(spent.get(role, 0.0) > 0 for role in ("draft", "router", "coordinator")), spent
