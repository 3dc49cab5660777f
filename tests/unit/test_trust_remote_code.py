"""``ModelSpec.trust_remote_code``: off by default, rendered with the config, and handed by the
pools to every backend (fake backends record what they are given; no Ray, no weights)."""
import pytest

from arbitrage_common import config as C


def test_off_by_default_and_rendered():
    assert C.ModelSpec(path="m").trust_remote_code is False
    assert C.ModelSpec(path="m", trust_remote_code=True).trust_remote_code is True
    with pytest.raises(ValueError):
        C.ModelSpec(path="m", trust_remote_code="maybe")
    cfg = C.default_config()
    models = [pool["model"] for pool in C.render_serve_config(cfg)["applications"][0]["args"]["pools"].values()
              if pool]
    assert models and all(m["trust_remote_code"] is False for m in models)


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return object()


@pytest.fixture
def pools():
    from services import pools

    return pools


@pytest.mark.parametrize("trust", [None, False, True])
def test_pools_hand_it_to_every_backend(trust, pools, monkeypatch):
    from arbitrage_common.backends import hf_generator, scorers, vllm_generator

    hf, vllm, scorer = _Recorder(), _Recorder(), _Recorder()
    monkeypatch.setattr(hf_generator, "HFStepGenerator", hf)
    monkeypatch.setattr(vllm_generator, "VLLMStepGenerator", vllm)
    monkeypatch.setattr(scorers, "load_step_scorer", scorer)
    model = {"path": "/m"} if trust is None else {"path": "/m", "trust_remote_code": trust}
    pools._load_generator(model)
    pools._load_generator({**model, "backend": "vllm"})
    pools._load_scorer(model)
    want = bool(trust)
    assert [c["trust_remote_code"] for c in hf.calls + vllm.calls + scorer.calls] == [want] * 3
