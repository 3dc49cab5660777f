"""Where a scorer pool's transformers model runs inside a Serve replica: on the GPU only when
Ray assigned the replica one. Ray 2.60 no longer hides the GPUs from a 0-GPU actor, so torch's
own view would put such a pool on GPU 0, unaccounted. Ray's call is faked: no cluster."""
from __future__ import annotations

import pytest


@pytest.fixture
def pools():
    from services import pools

    return pools


@pytest.mark.parametrize("device,gpu_ids,want", [
    (None, [], "cpu"), ("auto", [], "cpu"),          # no GPU assigned: CPU, whatever torch sees
    (None, [0], "cuda"), ("auto", ["1"], "cuda"),    # num_gpus > 0 (whole or fraction)
    ("cpu", [0], "cpu"), ("cuda", [], "cuda"),       # an explicit device is kept
])
def test_replica_device_follows_the_gpus_ray_assigned(pools, device, gpu_ids, want):
    assert pools.replica_device(device, lambda: gpu_ids) == want


def test_auto_is_never_asked_of_ray_for_an_explicit_device(pools):
    def never():
        raise AssertionError("ray.get_gpu_ids called for an explicit device")

    assert pools.replica_device("cpu", never) == "cpu"


def test_outside_a_ray_worker_the_backend_keeps_its_own_choice(pools, monkeypatch):
    monkeypatch.setattr(pools.ray, "is_initialized", lambda: False)
    assert pools.replica_device(None) == "auto"


@pytest.mark.parametrize("gpu_ids,share,want,capped", [([], None, "cpu", []), ([0], 0.25, "cuda", [0.25, 0.25]),
                                                    ([0], 1.0, "cuda", [])])
def test_a_scorer_pool_passes_the_replicas_device_down_and_holds_to_its_gpu_share(
        pools, monkeypatch, gpu_ids, share, want, capped):
    """A replica given part of a GPU (num_gpus 0.25) is held to that share of its memory
    before the model loads; one given a whole GPU, or none, is not capped."""
    import torch

    from arbitrage_common.backends import scorers

    seen, fractions = [], []
    monkeypatch.setattr(scorers, "load_step_scorer",
                        lambda path, **kw: seen.append((kw["device"], list(fractions))))
    monkeypatch.setattr(pools.ray, "is_initialized", lambda: True)  # as in a replica
    monkeypatch.setattr(pools.ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(pools, "_assigned_gpu_share", lambda: share)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GPUs visible to the process
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, device=None: fractions.append(f) if device is None else None)  # "cuda": the current
    pools._load_scorer({"path": "/m"})
    pools._load_scorer({"path": "/m", "device": "auto"})
    assert [device for device, _ in seen] == [want, want] and fractions == capped
    if capped:
        assert seen[0][1] == [share]  # capped before the model loaded


@pytest.mark.parametrize("device,share", [("cpu", 0.25), ("cuda", None), ("cuda", 0.0), ("cuda", 2.0)])
def test_no_cap_off_a_gpu_or_without_a_part_of_one(pools, device, share):
    def never(fraction, device):
        raise AssertionError("capped")

    assert pools.cap_gpu_share(device, share, never) is False


def test_a_driver_with_ray_running_has_no_assigned_share(pools, monkeypatch):
    """A script (or a test) that builds a pool by hand while Ray runs in its process is no
    worker: Ray asserts when such a process asks for its assigned resources."""
    import types

    asked = []
    context = types.SimpleNamespace(worker=types.SimpleNamespace(mode=pools.ray.SCRIPT_MODE),
                                    get_assigned_resources=lambda: asked.append(1) or {"GPU": 0.25})
    monkeypatch.setattr(pools.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(pools.ray, "get_runtime_context", lambda: context)
    assert pools._assigned_gpu_share() is None and asked == []
    context.worker.mode = pools.ray.WORKER_MODE
    assert pools._assigned_gpu_share() == 0.25


def test_the_cap_is_set_on_the_replicas_own_device(pools):
    capped = []
    assert pools.cap_gpu_share("cuda:1", 0.5, lambda fraction, device: capped.append((fraction, device)))
    assert capped == [(0.5, 1)]  # an index: torch refuses a device without one ("cuda")
