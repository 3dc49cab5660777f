"""`arbitrage bench`: the threshold sweep of a synthetic mix, in-process on the bundled models
(or any PRM and router checkpoint), through the one evaluation stack (``stack``)."""
from __future__ import annotations

from pathlib import Path

from .runners import InProcessRunner
from .stack import run_sweep, write_outputs
from .tasks import SyntheticTask


def load_backends(models_dir: str | Path, threads: int = 1, prm: str | Path | None = None,
                  router: str | Path | None = None) -> dict:
    """The four in-process backends: ``<models_dir>/{draft,target,prm,router}``, or the PRM and
    router checkpoints given."""
    from ..backends.hf_generator import HFStepGenerator
    from ..backends.scorers import load_step_scorer

    root = Path(models_dir)
    return {"draft": HFStepGenerator(root / "draft", threads=threads),
            "target": HFStepGenerator(root / "target", threads=threads),
            "prm": load_step_scorer(prm or root / "prm", threads=threads),
            "router": load_step_scorer(router or root / "router", threads=threads)}


def prm_kind(prm_dir: Path) -> str:
    """An LM verifier as RSD's PRM is the target checking the draft (the SpecReason family)."""
    from ..backends.scorers import is_lm_verifier

    return "self-verifier (target self-verification)" if is_lm_verifier(prm_dir) else "independent"


def run_bench(n: int, seed: int, out_dir: str | Path, models_dir: str | Path = "models",
              grid: dict | None = None, confirm_n: int | None = None, show_progress: bool = True,
              mix: str = "math", prm: str | None = None, router: str | None = None) -> dict:
    backends = load_backends(models_dir, prm=prm, router=router)
    result, points, _ = run_sweep(SyntheticTask(n, seed, mix), InProcessRunner(backends), grid, confirm_n,
                                  show_progress)
    prm_dir = Path(prm or Path(models_dir) / "prm")
    result["models"] = {"dir": str(models_dir), "prm": str(prm_dir), "prm_kind": prm_kind(prm_dir),
                        "router": str(router or Path(models_dir) / "router")}
    write_outputs(points, Path(out_dir), result)
    return result
