"""The shipped AppConfig presets (configs/presets/*.yaml) and the checks that need no weights.

Import-light on purpose (pydantic, yaml and json only: no torch, Ray or vLLM), because
``services.app.build_app`` calls :func:`check_model_paths` before anything heavy is imported,
and ``arbitrage config check`` runs anywhere.

Model paths are local checkpoint directories (safetensors, ``config.json``, tokenizer). A
Hugging Face hub id is *not* downloaded at serving time: with ``base_dir: /models`` the path
``meta-llama/Llama-3.1-8B-Instruct`` means the directory ``/models/meta-llama/Llama-3.1-8B-Instruct``
and fails the check when that directory is not there. Serving replicas never reach a hub.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .backends.checkpoints import CheckpointError, check_checkpoint_dir
from .backends.value_head_prm import HEAD_KEYS, is_value_head_prm, value_head_problem  # torch-free
from .config import SCORER_ROLES, AppConfig, PoolSpec
from .paths import presets_dir, project_home

REPO_ROOT = project_home()  # the checkout, $ARBITRAGE_HOME, or an install's share/arbitrage-serve
PRESETS_DIR = presets_dir()

# A causal LM used as a PRM carries its calibration in this file (the name is
# arbitrage_common.backends.lm_verifier.VERIFIER_FILE; not imported: that module needs torch).
LM_VERIFIER_FILE = "verifier.json"
# vLLM methods that need a checkpoint quantized ahead of time (others, e.g. bitsandbytes or
# fp8, can quantize full-precision weights while loading).
PREQUANTIZED_METHODS = frozenset({"awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors"})
# Tokens per character of the longest prompt when we guess whether it fits max_model_len.
PROMPT_TOKENS_PER_CHAR = 0.25


@dataclass(frozen=True)
class Finding:
    """What a check found: the config field (dotted) and what is wrong there."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ModelPathError(CheckpointError):
    """Pools name model paths that cannot be served; ``problems`` lists every one."""

    def __init__(self, problems: list[Finding]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} model path(s) cannot be served:\n{lines}\n"
                         "(model paths are local checkpoint directories; nothing is downloaded at serving time)")

    def __reduce__(self):  # Ray pickles errors raised where the app is built: keep the findings
        return (type(self), (self.problems,))


# -- presets ------------------------------------------------------------------------------
def list_presets(directory: str | Path | None = None) -> list[Path]:
    """Every preset file, sorted by name."""
    d = Path(directory) if directory is not None else PRESETS_DIR
    return sorted(d.glob("*.yaml")) if d.is_dir() else []


def preset_path(name: str, directory: str | Path | None = None) -> Path:
    """The file of preset ``name`` (its file name without .yaml); ValueError lists the known ones."""
    d = Path(directory) if directory is not None else PRESETS_DIR
    path = d / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in list_presets(d)) or "none"
        raise ValueError(f"preset {name!r}: no {path} (known: {known})")
    return path


# -- model paths --------------------------------------------------------------------------
def _kind_problem(role: str, checkpoint: Path, config: dict, spec: PoolSpec) -> str | None:
    """Why this (existing) checkpoint cannot serve ``role``, or None. Only what config.json
    declares (and, for a value-head PRM, the safetensors headers) is judged; a checkpoint that
    declares no architecture passes."""
    archs = [str(a) for a in config.get("architectures") or []]
    if role in SCORER_ROLES:
        if (checkpoint / LM_VERIFIER_FILE).is_file():
            return None
        if is_value_head_prm(checkpoint):
            # A body plus v_head.summary (Skywork's PRM): served by the value-head scorer when the
            # head is really there (safetensors headers only), refused when merely claimed.
            problem = value_head_problem(checkpoint)
            if problem is None:
                return None
            return (f"architectures {archs} is not a one-label *ForSequenceClassification scorer, and as a "
                    f"value-head PRM it has {problem} (see docs/PRESETS.md, the PRM)")
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            # e.g. a causal LM: the transformers scorer would load the body and a randomly
            # initialised head.
            return (f"architectures {archs} is not a one-label *ForSequenceClassification scorer (nor a causal "
                    f"LM with {LM_VERIFIER_FILE}, nor a value-head PRM with {' and '.join(HEAD_KEYS)}); "
                    f"loading it as a scorer would use a random head (see docs/PRESETS.md, the PRM)")
        labels = config.get("id2label")
        if isinstance(labels, dict) and len(labels) != 1:
            return f"has {len(labels)} labels; scorers read one logit (train with num_labels=1)"
        return None
    if archs and not any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return f"architectures {archs} is not a causal LM; generator pools continue text"
    engine = spec.model.engine
    if engine is not None and engine.quantization in PREQUANTIZED_METHODS and "quantization_config" not in config:
        return (f"model.engine.quantization is {engine.quantization!r}, which needs a checkpoint quantized ahead "
                f"of time, and config.json has no quantization_config")
    return None


def _pool_path_problem(role: str, spec: PoolSpec, path: Path, relative_note: str = "") -> Finding | None:
    where = f"pools.{role}.model.path"
    try:
        check_checkpoint_dir(path)
    except CheckpointError as exc:  # its message starts with the path
        return Finding(where, f"{exc}{relative_note}")
    config = json.loads((path / "config.json").read_text())  # valid JSON: checked above
    reason = (_kind_problem(role, path, config, spec) if isinstance(config, dict)
              else "config.json is not a JSON object")
    return Finding(where, f"{path}: {reason}") if reason else None


def model_path_problems(cfg: AppConfig) -> list[Finding]:
    """Every configured pool whose resolved model path is missing, not a checkpoint, or not
    a checkpoint of the kind the pool serves. Reads config.json and safetensors headers: no weights."""
    problems = []
    for role, spec in cfg.pools.configured():
        relative = "" if Path(spec.model.path).expanduser().is_absolute() else (
            f" ({spec.model.path!r} resolved against "
            f"{'base_dir ' + repr(cfg.base_dir) if cfg.base_dir else 'the working directory'})")
        problem = _pool_path_problem(role, spec, Path(cfg.resolve_path(spec.model.path)), relative)
        if problem:
            problems.append(problem)
    return problems


def check_pool_model(role: str, model: dict) -> None:
    """What a pool replica runs before it loads its model (``model``: the ModelSpec dump with
    the resolved path): ``ModelPathError`` naming the pool and the path on *this* node."""
    spec = PoolSpec(model=model)
    problem = _pool_path_problem(role, spec, Path(spec.model.path))
    if problem:
        raise ModelPathError([problem])


def check_model_paths(cfg: AppConfig) -> None:
    """Raise ``ModelPathError`` naming the pool and the resolved path of every local model
    path that is missing, not a checkpoint, or of the wrong kind for its pool. Loads no weights.

    Call it where the application is built (the paths must exist on that machine: bake the
    models into the image every node runs)."""
    problems = model_path_problems(cfg)
    if problems:
        raise ModelPathError(problems)


# -- resources -------------------------------------------------------------------------------
def _idle_generator_gpus(role: str, spec: PoolSpec) -> Finding | None:
    """A transformers generator pool that reserves GPUs: its generator has no device code and
    decodes on the CPU, so the GPUs would sit idle, held from the pools that could use them."""
    bundles = sum(b.get("GPU", 0) for b in spec.placement_group_bundles or [])
    num_gpus = spec.ray_actor_options.num_gpus or 0
    if not (num_gpus > 0 or bundles > 0):
        return None
    field, gpus = ((f"pools.{role}.ray_actor_options.num_gpus", num_gpus) if num_gpus > 0
                   else (f"pools.{role}.placement_group_bundles", bundles))
    return Finding(field, f"reserves {gpus:g} GPU(s) per replica, but model.backend is 'transformers', whose "
                          f"generator decodes on the CPU only: the GPUs would sit idle. Use model.backend 'vllm' "
                          f"to generate on GPUs, or reserve none")


def resource_problems(cfg: AppConfig) -> tuple[list[Finding], list[Finding]]:
    """(errors, warnings) about GPU settings that are wrong whatever the cluster looks like.

    What depends on the cluster (do the pools' GPU fractions fit its nodes?) is not checked.
    Ray Serve's own validation of the deployment options is run by ``arbitrage config check``.
    """
    errors: list[Finding] = []
    warnings: list[Finding] = []
    longest_prompt = int(cfg.limits.max_prompt_chars * PROMPT_TOKENS_PER_CHAR)
    for role, spec in cfg.pools.configured():
        engine = spec.model.engine
        if spec.model.backend == "transformers" and role not in SCORER_ROLES:
            idle = _idle_generator_gpus(role, spec)
            if idle:
                warnings.append(idle)
        if spec.model.backend != "vllm":
            continue
        base = f"pools.{role}"
        tp = engine.tensor_parallel_size if engine else 1
        if spec.placement_group_bundles:
            gpus = sum(b.get("GPU", 0) for b in spec.placement_group_bundles)
            if gpus < tp:
                errors.append(Finding(f"{base}.placement_group_bundles",
                                      f"{gpus:g} GPU(s) in all bundles, but model.engine.tensor_parallel_size "
                                      f"is {tp} (one GPU per rank)"))
        num_gpus = spec.ray_actor_options.num_gpus
        util = engine.gpu_memory_utilization if engine else None
        # Ray packs fractional replicas onto one GPU; each vLLM engine then takes `util` of
        # that GPU's memory, so together they must not ask for more than all of it.
        fractional = num_gpus is not None and 0 < num_gpus < 1 and not spec.placement_group_bundles
        if fractional and (util is None or util > num_gpus + 1e-9):
            errors.append(Finding(f"{base}.model.engine.gpu_memory_utilization",
                                  f"{'unset (vLLM: 0.92)' if util is None else util} exceeds the pool's "
                                  f"ray_actor_options.num_gpus ({num_gpus:g}): replicas packed onto one GPU "
                                  f"would ask for more memory than it has"))
        if engine is not None and engine.max_model_len < cfg.limits.max_new_tokens + longest_prompt:
            warnings.append(Finding(f"{base}.model.engine.max_model_len",
                                    f"{engine.max_model_len} < limits.max_new_tokens ({cfg.limits.max_new_tokens}) "
                                    f"+ ~{longest_prompt} tokens of the longest prompt: the longest requests end "
                                    f"at the context limit"))
    return errors, warnings
