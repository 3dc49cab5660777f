"""A Serve YAML's replica fields change in place: the app's args hold stand-ins, and the
coordinator learns the real ones from its user_config (``reconfigure``), then after every
change: merge lanes per pool, the pools readiness lets scale to zero, and the target bound the
load controller waits on. Real Coordinator over fake pools, no Ray."""
from __future__ import annotations

import asyncio
import logging

import pytest
from fake_pools import FakePool, PoolRecord

from arbitrage_common import config as C
from services.coordinator import Coordinator


def _config(target_max: int, draft_replicas: int) -> C.AppConfig:
    data = C.default_config().model_dump(mode="json")
    data["pools"]["target"]["autoscaling_config"] = {"min_replicas": 0, "max_replicas": target_max}
    data["pools"]["draft"]["num_replicas"] = draft_replicas
    return C.AppConfig.model_validate(data)


def _coordinator_user_config(app: dict) -> dict:
    (deployment,) = [d for d in app["deployments"] if d["name"] == "coordinator"]
    return deployment["user_config"]


def _lanes(coord: Coordinator) -> dict[str, int]:
    return {role: merged.lanes for role, merged in coord.pools.merged.items()}


def test_the_coordinator_takes_its_replica_bounds_from_user_config_and_follows_a_change():
    app = C.serve_application(_config(target_max=3, draft_replicas=2))
    record = PoolRecord()
    coord = Coordinator(app["args"], *(FakePool(role, record) for role in ("draft", "target", "router", "prm")))
    # The args alone: stand-ins (one replica each).
    assert _lanes(coord) == {"draft": 1, "target": 1, "router": 1, "prm": 1}
    assert coord.health.scale_to_zero == frozenset() and coord._target_max_replicas is None

    asyncio.run(coord.reconfigure(_coordinator_user_config(app)))  # what Serve does before the first request
    assert _lanes(coord) == {"draft": 8, "target": 12, "router": 1, "prm": 1}  # 4 lanes per replica
    assert coord.health.scale_to_zero == {"target"} and coord._target_max_replicas == 3
    assert coord.cfg.pools.target.autoscaling_config.max_replicas == 3

    changed = C.serve_application(_config(target_max=1, draft_replicas=1))
    assert changed["args"] == app["args"]  # so Serve restarts no replica
    asyncio.run(coord.reconfigure(_coordinator_user_config(changed)))
    assert _lanes(coord) == {"draft": 1, "target": 1, "router": 1, "prm": 1}
    assert coord._target_max_replicas == 1 and coord.cfg.pools.draft.num_replicas == 1
    asyncio.run(coord.reconfigure(_coordinator_user_config(app)))
    asyncio.run(coord.reconfigure({}))  # no scaling: the args' own (here the stand-ins)
    assert _lanes(coord) == {"draft": 1, "target": 1, "router": 1, "prm": 1} and coord._target_max_replicas is None


BAD_SCALING = [
    ({"target": {"num_replica": 2}}, "scaling.target: num_replica: not a replica field"),
    ({"target": {"max_ongoing_requests": 40}}, "scaling.target: max_ongoing_requests: not a replica field"),
    ({"target": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas"),
    ({"tagret": {"num_replicas": 2}}, "scaling.tagret: not a configured deployment"),
    ({"draft": None}, "scaling.draft: expected a mapping"),
    ([1, 2], "scaling: expected a mapping"),
]


@pytest.mark.parametrize(("scaling", "named"), BAD_SCALING)
def test_a_bad_scaling_is_logged_naming_the_field_and_the_last_good_one_kept(scaling, named, caplog):
    """Failing the update would stop the replica (maybe the only coordinator): it keeps serving
    with the scaling it had; `arbitrage config check` refuses the same YAML beforehand."""
    app = C.serve_application(_config(target_max=3, draft_replicas=2))
    record = PoolRecord()
    coord = Coordinator(app["args"], *(FakePool(role, record) for role in ("draft", "target", "router", "prm")))
    asyncio.run(coord.reconfigure(_coordinator_user_config(app)))
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        asyncio.run(coord.reconfigure({"scaling": scaling}))
    assert _lanes(coord) == {"draft": 8, "target": 12, "router": 1, "prm": 1}  # unchanged
    assert any(named in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR), caplog.text


@pytest.mark.parametrize(("scaling", "named"), BAD_SCALING)
def test_config_check_refuses_a_bad_scaling_naming_the_field(scaling, named, tmp_path):
    import yaml

    from arbitrage_common.cli.config_cmd import check_file

    rendered = C.render_serve_config(_config(target_max=3, draft_replicas=2))
    for deployment in rendered["applications"][0]["deployments"]:
        if deployment["name"] == "coordinator":
            deployment["user_config"]["scaling"] = scaling
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(rendered))
    result = check_file(tmp_path / "bad.yaml")
    assert not result["ok"] and any(named in e for e in result["errors"]), result


def test_config_check_warns_when_a_hand_edited_serve_yaml_resizes_a_pool_behind_the_coordinators_back(tmp_path):
    import yaml

    from arbitrage_common.cli.config_cmd import check_file

    rendered = C.render_serve_config(_config(target_max=3, draft_replicas=2))
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(rendered))
    assert check_file(tmp_path / "ok.yaml")["warnings"] == []
    for deployment in rendered["applications"][0]["deployments"]:
        if deployment["name"] == "draft":
            deployment["num_replicas"] = 5  # Serve would run 5; the coordinator's lanes assume 2
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(rendered))
    result = check_file(tmp_path / "edited.yaml")
    assert result["ok"] and [w.split(":")[0] for w in result["warnings"]] == ["applications[0].deployments[draft]"]


def test_config_check_asks_to_render_again_a_serve_yaml_from_before_the_scaling_left_the_args(tmp_path):
    import yaml

    from arbitrage_common.cli.config_cmd import check_file

    rendered = C.render_serve_config(_config(target_max=3, draft_replicas=2))
    app = rendered["applications"][0]
    app["args"] = C.application_config(app).model_dump(mode="json")  # the real values in args, as before
    app["deployments"] = [{"name": d["name"], "user_config": d["user_config"]} for d in app["deployments"]
                          if d["name"] != "coordinator"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(rendered))
    result = check_file(tmp_path / "old.yaml")
    assert result["ok"] and len(result["warnings"]) == 1 and "render again" in result["warnings"][0], result
