"""One entry point for scorer checkpoints (PRM and router), whatever their kind."""
from __future__ import annotations

from pathlib import Path

from .lm_verifier import VERIFIER_FILE
from .value_head_prm import is_value_head_prm
from .verifier_router import ROUTER_HEAD_FILE


def is_lm_verifier(model_dir: str | Path) -> bool:
    """A causal LM with a verifier calibration (``verifier.json``) rather than a classifier head."""
    return (Path(model_dir) / VERIFIER_FILE).is_file()


def load_step_scorer(model_dir: str | Path, threads: int | None = None, annotate_history: bool | None = None,
                     device: str | None = None, trust_remote_code: bool = False, prefix_cache_mb: int | None = None,
                     lean_load: bool = True):
    """The blocking scorer a checkpoint directory describes (``score_batch(items) -> floats``).

    Every kind truncates an input longer than its model's context (``steps.fit_scorer_input``).
    ``prefix_cache_mb`` bounds the causal-LM scorers' per-session prefix cache (0: off; None:
    the backend's default); the classifier scorers and a value-head PRM have no such cache and
    ignore it.
    ``lean_load=False``: the causal-LM scorers load through transformers even where they need not
    (``llama_checkpoint``); the classifier scorers always do."""
    cache = {} if prefix_cache_mb is None else {"prefix_cache_bytes": int(prefix_cache_mb) * 2**20}
    if (Path(model_dir) / ROUTER_HEAD_FILE).is_file():  # checked first: it holds a verifier.json too
        if annotate_history:
            raise ValueError(f"{model_dir}: a verifier-head router reads unannotated history "
                             f"(annotate_history must be off)")
        from .verifier_router import VerifierRouterScorer

        return VerifierRouterScorer(model_dir, threads=threads, device=device, trust_remote_code=trust_remote_code,
                                    lean_load=lean_load, **cache)
    if is_lm_verifier(model_dir):
        if annotate_history:
            raise ValueError(f"{model_dir}: an LM verifier reads unannotated history (annotate_history must be off)")
        from .lm_verifier import LMVerifierScorer

        return LMVerifierScorer(model_dir, threads=threads, device=device, trust_remote_code=trust_remote_code,
                                lean_load=lean_load, **cache)
    if is_value_head_prm(model_dir):  # Skywork-style body + v_head: a sequence classifier would get a random head
        if annotate_history:
            raise ValueError(f"{model_dir}: a value-head PRM reads unannotated history (annotate_history must be off)")
        if trust_remote_code:  # its auto_map names Skywork's classes, which this scorer replaces
            raise ValueError(f"{model_dir}: a value-head PRM loads without the checkpoint's code "
                             f"(trust_remote_code must be off)")
        from .value_head_prm import ValueHeadPRMScorer

        return ValueHeadPRMScorer(model_dir, threads=threads, device=device)
    from .hf_scorer import HFStepScorer

    return HFStepScorer(model_dir, threads=threads, annotate_history=annotate_history, device=device,
                        trust_remote_code=trust_remote_code)
