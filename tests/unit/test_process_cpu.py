"""services.process_cpu: a process's role from its command line, and CPU between snapshots."""
from services.process_cpu import _cpu_seconds, cpu_by_role, inherit_roles, role_of

SITE = "/srv/venv/lib/python3.11/site-packages/ray"


def test_roles_of_serve_replicas_proxy_controller_and_rays_own_processes():
    assert role_of("ray::ServeReplica:arbitrage:draft", "arbitrage") == "draft"
    assert role_of("ray::ServeReplica:arbitrage:coordinator.handle_request", "arbitrage") == "coordinator"
    assert role_of("ray::ServeReplica:slow:draft", "arbitrage") == "other"  # another application's
    assert role_of("ray::ServeReplica:arbitrage", "arbitrage") == "other"  # no deployment in the title
    assert role_of("ray::ProxyActor", "arbitrage") == "proxy"
    assert role_of("ray::ServeController.listen_for_change", "arbitrage") == "serve_controller"
    assert role_of("ray::IDLE", "arbitrage") == "ray"
    assert role_of("ray::DashboardAgent", "arbitrage") == "ray"
    assert role_of(f"{SITE}/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", "arbitrage") == "ray"
    assert role_of(f"/srv/venv/bin/python -u {SITE}/_private/log_monitor.py --session-dir=/tmp", "arbitrage") == "ray"
    assert role_of("/usr/bin/python3 -m pytest tests --ray-dir /x/ray/y", "arbitrage") == "other"
    assert role_of("", "arbitrage") == "other"


def test_cpu_seconds_read_user_plus_system_after_a_name_with_spaces_and_parentheses():
    fields = ["S", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "250", "50", "7", "8"]
    assert _cpu_seconds("42 (ray::ServeReplica:a (x) y) " + " ".join(fields), 100) == 3.0  # (250 + 50) / 100


def test_cpu_by_role_sums_each_roles_processes_and_counts_a_new_one_from_zero():
    before = {1: ("draft", 10.0), 2: ("ray", 5.0), 3: ("ray", 1.0), 9: ("target", 4.0)}
    after = {1: ("draft", 12.5), 2: ("ray", 5.5), 3: ("ray", 1.25), 4: ("draft", 0.5), 5: ("proxy", 0.0)}
    assert cpu_by_role(before, after) == {"draft": 3.0, "ray": 0.75}  # 9 ended: its time is lost


def test_a_process_of_no_role_takes_its_nearest_ancestors():
    roles = {1: "other", 10: "ray", 20: "draft", 21: "other", 22: "other", 30: "target", 31: "other",
             40: "other", 50: "other", 51: "other"}
    parents = {1: 0, 10: 1, 20: 10, 21: 20, 22: 21, 30: 10, 31: 30, 40: 1, 50: 51, 51: 50}
    got = inherit_roles(roles, parents)
    assert got[21] == got[22] == "draft"  # a vLLM pool's engine core and its worker
    assert got[31] == "target"
    assert got[40] == got[1] == "other"  # no ancestor with a role
    assert got[50] == got[51] == "other"  # a cycle (pids reused between reads) ends
    assert {pid: got[pid] for pid in (10, 20, 30)} == {10: "ray", 20: "draft", 30: "target"}
