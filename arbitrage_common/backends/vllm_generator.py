"""Step generation on a vLLM v1 engine (``AsyncLLM``), natively async.

``VLLMStepGenerator.generate(prefixes, options)`` has the result semantics of the
transformers backend (``HFStepGenerator.generate_batch``): per prefix the step text
without the delimiter, stripped; the generated token count (delimiter and EOS tokens
included, as there); the finish reason ``"delimiter" | "eos" | "length" | "context"``; and
the wall seconds of the whole call. ``options`` is one for all prefixes or one per prefix
(``interfaces.row_options``). Each row is checked against the context on its own: a prefix
of ``max_model_len`` tokens or more returns ``("", 0, "context")`` without reaching the
engine, and a budget past the room left is capped to it (the row then ends ``"length"``).
Every prefix is its own engine request, so concurrent calls from many coroutines (a Ray
Serve replica's requests) batch together inside the engine's continuous-batching
scheduler, and steps of one request share prompt blocks through prefix caching.

Errors: every engine failure is raised as ``EngineRequestError`` naming the model;
``EngineDeadError`` (a subclass) when the engine process died. A request in flight when
that happens fails at once (vLLM's output handler propagates the death), later ones fail
before reaching the engine, and ``check_health`` raises from then on.

Cancellation: when the awaiting task is cancelled (``asyncio.wait_for`` timeout, a Ray
Serve ``response.cancel()``, a client disconnect), every request of the call is aborted in
the engine (``engine.abort(request_id)``) and ``CancelledError`` is re-raised, so no
cancelled step keeps decoding.

vLLM is imported only inside the class: importing this module needs no vllm.

Process model (what a caller must do):

- The engine runs in a child process (its model too, unless "mp" starts workers). A script that
  builds one at top level needs ``if __name__ == "__main__":``.
- On CPU the KV cache is sized by ``kv_cache_memory_bytes`` (default here 256 MiB when
  neither it nor ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is set). Without either, vLLM reserves
  ``gpu_memory_utilization`` (0.92) of *all* host memory and fails on a shared machine.
- ``VLLM_CPU_OMP_THREADS_BIND`` (default ``auto``) pins OpenMP threads to cores; on a small
  shared machine set it to ``nobind`` (or to a core list such as ``0-1``) so several engines
  do not fight for the same cores.

Scorer pools (PRM, router) and vLLM's pooling runner
----------------------------------------------------
vLLM serves reward and classifier models with ``runner="pooling"`` (``AsyncLLM.encode`` /
``LLM.reward`` / ``LLM.classify``): continuous batching and prefix caching for the scorer too.
It fits a scorer when (a) vLLM has a pooling implementation of the architecture (e.g.
``Qwen2ForProcessRewardModel``, ``*ForSequenceClassification`` of supported decoders, or a
causal LM converted with ``--convert classify``/``reward``), and (b) the score is a pure
function of one pooled output (last-token logit -> sigmoid for our router; per-step-token
rewards for a PRM). It does not fit when the model needs custom heads or code vLLM lacks
(``trust_remote_code`` value heads such as Skywork-o1-Open-PRM's ``Qwen2ForPrmModel`` value
head are not a registered vLLM architecture in 0.32), or for the bundled tiny scorers, where
a transformers forward of a small (6-layer) classifier costs less than a vLLM engine process.

Which backend the scorer pools use: transformers everywhere today (the config refuses
others for router and PRM; docs/VLLM.md has the table). The GPU presets' router (a one-label
``Qwen2ForSequenceClassification``) is the candidate for the pooling runner, being called on
every step; Skywork's PRM stays on transformers (its value head is remote code).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..interfaces import Generation, GenerationOptions, row_options
from ..steps import STEP_DELIMITER
from .checkpoints import check_checkpoint_dir

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
CPU_DEFAULT_BLOCK_SIZE = 32


def looks_local(model: str | Path) -> bool:
    """True when ``model`` names a local directory rather than a hub id ("org/name").

    Local: an absolute path, one starting with ``.`` or ``~``, more than two path parts, a
    path that exists, or one whose parent folder exists (``models/draft`` in this repo).
    """
    s = str(model)
    if s.startswith(("/", ".", "~")) or len(Path(s).parts) != 2:
        return True
    p = Path(s).expanduser()
    return p.exists() or p.parent.is_dir()


# ---- CPU head-size compatibility ------------------------------------------------------
#
# vLLM's CPU attention kernels take head sizes 32, 64, 80, 96, 112, 128, ... only. A Llama
# whose head_dim is another size (the bundled target: hidden 160 / 4 heads = 40) is served
# through an exactly equivalent copy with zero-padded heads:
#   q, k, v rows of each head padded with zeros to the new size; o_proj columns likewise;
#   q scaled by sqrt(new / old) so that q.k * new**-0.5 equals the original q.k * old**-0.5;
#   rotary embedding kept on the first `old` dims (partial_rotary_factor = old / new), so the
#   original dims see the same frequencies and the zero dims stay zero.
# Outputs match the original model up to float rounding.

PADDABLE_ARCHITECTURES = ("LlamaForCausalLM",)


def cpu_supported_head_sizes() -> list[int]:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return sorted(CPUAttentionBackend.get_supported_head_sizes())


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def padded_head_dim(model_dir: str | Path, supported: Sequence[int]) -> int | None:
    """The head size to pad ``model_dir`` to, or None when it is supported as it is."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hd = _head_dim(config)
    if hd in supported:
        return None
    bigger = [s for s in supported if s > hd]
    arch = (config.get("architectures") or ["?"])[0]
    if not bigger or arch not in PADDABLE_ARCHITECTURES:
        raise EngineStartError(f"{model_dir}: head_dim {hd} ({arch}) is not supported by vLLM's CPU attention "
                               f"(sizes {supported}) and cannot be padded")
    return bigger[0]


def pad_head_dim(src: str | Path, dst: str | Path, new_head_dim: int) -> Path:
    """Write to ``dst`` a copy of the Llama checkpoint ``src`` with heads zero-padded to
    ``new_head_dim`` (see the comment above); tokenizer and generation files are copied."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    old = _head_dim(config)
    n_q, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    rope = dict(config.get("rope_parameters") or {})
    if not rope:  # transformers < 5 layout
        rope = {"rope_theta": config.get("rope_theta", 10000.0), "rope_type": "default"}
        rope.update(config.get("rope_scaling") or {})
    rotary = int(old * float(rope.get("partial_rotary_factor", 1.0)))
    factor = rotary / new_head_dim
    if int(new_head_dim * factor) != rotary:  # float rounding: int() must land on `rotary`
        factor = (rotary + 0.5) / new_head_dim
    rope["partial_rotary_factor"] = factor
    config.update(head_dim=new_head_dim, rope_parameters=rope)
    config.pop("rope_scaling", None)
    config.pop("rope_theta", None)
    q_scale = (new_head_dim / old) ** 0.5

    def pad_rows(w: torch.Tensor, heads: int, scale: float = 1.0) -> torch.Tensor:
        rest = w.shape[1:]
        w = w.reshape(heads, old, *rest) * scale
        out = w.new_zeros(heads, new_head_dim, *rest)
        out[:, :old] = w
        return out.reshape(heads * new_head_dim, *rest)

    def pad_cols(w: torch.Tensor, heads: int) -> torch.Tensor:
        w = w.reshape(w.shape[0], heads, old)
        out = w.new_zeros(w.shape[0], heads, new_head_dim)
        out[:, :, :old] = w
        return out.reshape(w.shape[0], heads * new_head_dim)

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = pad_rows(w, n_q, q_scale)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias",
                            "self_attn.v_proj.weight", "self_attn.v_proj.bias")):
            w = pad_rows(w, n_kv)
        elif name.endswith("self_attn.o_proj.weight"):
            w = pad_cols(w, n_q)
        out[name] = w.contiguous()
    tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json" and not f.name.endswith(".index.json"):
            shutil.copy2(f, tmp / f.name)
    (tmp / "PADDED_FROM.json").write_text(json.dumps({"source": str(src.resolve()), "head_dim": old,
                                                      "padded_head_dim": new_head_dim}, indent=2))
    # Replicas on one host may pad the same checkpoint at once (same fingerprint, same bytes):
    # the first finished copy stays, since another replica may already be loading it.
    if not (dst / "config.json").is_file():
        if dst.exists():  # an unfinished copy, never renamed into place
            shutil.rmtree(dst)
        with contextlib.suppress(OSError):  # another copy landed between the check and the rename
            tmp.rename(dst)
    if tmp.exists():
        shutil.rmtree(tmp)
    if not (dst / "config.json").is_file():
        raise OSError(f"{dst}: the padded copy of {src} did not land")
    return dst


def _fingerprint(model_dir: Path, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cpu_compatible_dir(model_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """``model_dir`` itself when vLLM's CPU attention takes its head size, else a cached padded
    copy (under ``cache_dir``, default $ARBITRAGE_VLLM_CACHE or ~/.cache/arbitrage-serve/vllm)."""
    model_dir = Path(model_dir)
    new = padded_head_dim(model_dir, cpu_supported_head_sizes())
    if new is None:
        return model_dir
    root = Path(cache_dir or os.environ.get("ARBITRAGE_VLLM_CACHE") or Path.home() / ".cache/arbitrage-serve/vllm")
    dst = root / f"{model_dir.name}-hd{new}-{_fingerprint(model_dir, str(new))}"
    if not (dst / "config.json").is_file():
        pad_head_dim(model_dir, dst, new)
    return dst


# Seeds vLLM can hold: its GPU model runner (Model Runner V2, vLLM 0.32's default where Triton
# exists) keeps request seeds in an int64 tensor, so a seed of 2**63 or more raises
# OverflowError inside execute_model and kills the engine core with every request on it.
ENGINE_SEED_MASK = 2**63 - 1


def engine_seed(seed: int | None) -> int:
    """The seed a sampled request gives vLLM: the client's seed (None: 0, as the transformers
    backend; ``row_options`` already gave row i of a one-options call seed + i) reduced to its
    low 63 bits, so in [0, 2**63). Never negative: vLLM reads -1 as "unseeded", and a request's
    seed must repeat. Seeds equal in their low 63 bits sample alike (e.g. -1 and 2**63 - 1)."""
    return (seed or 0) & ENGINE_SEED_MASK


class EngineStartError(RuntimeError):
    """The engine did not start (bad config, out of memory, unsupported model); names the model."""


# vLLM's own message for most start failures is "Engine core initialization failed. See root
# cause above.": say where "above" is and what it usually says.
ENGINE_START_HINT = (
    "the root cause is logged just before this error by vLLM's engine-core process: in a Serve replica, in the "
    "replica's Ray worker log (Ray dashboard, or `ray logs`), elsewhere on this process's stderr. Usual causes: "
    "the KV cache cannot hold max_model_len tokens in gpu_memory_utilization of the GPU's memory less the weights "
    "(lower max_model_len or raise gpu_memory_utilization); other tenants on a shared GPU (at start vLLM needs "
    "gpu_memory_utilization of the GPU's total memory free: give the pool its own GPU or lower it); on CPU, "
    "kv_cache_memory_bytes / VLLM_CPU_KVCACHE_SPACE")


def engine_start_message(model: str, exc: BaseException) -> str:
    """The ``EngineStartError`` message for an engine that failed to start: the model, vLLM's
    error, and where its cause is logged with the usual causes (``ENGINE_START_HINT``)."""
    return f"{model}: vLLM engine failed to start ({type(exc).__name__}: {exc}); {ENGINE_START_HINT}"


class EngineRequestError(RuntimeError):
    """The engine finished a request without a usable result (aborted or errored)."""


class EngineDeadError(EngineRequestError):
    """The engine process died: every request of this generator fails until it is replaced
    (a Ray Serve replica's health check raises, so Serve replaces the replica)."""


# EngineSpec (arbitrage_common.config) field -> VLLMStepGenerator keyword; the rest go to engine_kwargs.
_SPEC_KEYWORDS = ("max_model_len", "dtype", "tensor_parallel_size", "gpu_memory_utilization",
                  "kv_cache_memory_bytes", "max_num_seqs", "enable_prefix_caching", "enforce_eager", "block_size",
                  "distributed_executor_backend")


def generator_kwargs(engine: dict[str, Any] | None) -> dict[str, Any]:
    """``VLLMStepGenerator`` keywords from a pool's ``model.engine`` (an ``EngineSpec`` dump;
    None: EngineSpec's defaults). Validated here, so a bad field fails naming it."""
    from ..config import EngineSpec

    spec = EngineSpec.model_validate(engine or {})
    kwargs = {name: getattr(spec, name) for name in _SPEC_KEYWORDS}
    extra = {"quantization": spec.quantization} if spec.quantization else {}
    return {**kwargs, "engine_kwargs": extra}


class _ClosedEngine:
    errored = True
    dead_error = EngineDeadError("generator is shut down")

    async def check_health(self) -> None:
        raise self.dead_error

    async def abort(self, request_id) -> None:
        pass


class EngineStats:
    """What vLLM's scheduler reports each step, kept for the pool's metrics and ``info()``:
    prefix-cache counters (requests, token queries, hits) and preempted requests since start,
    the most requests run in one step, and the engine's state at its last step (requests
    running and waiting, the share of KV-cache blocks in use)."""

    def __init__(self) -> None:
        self.queries = self.hits = self.requests = self.preempted = 0
        self.max_running = self.running = self.waiting = 0
        self.kv_cache_usage = self.peak_kv_cache_usage = 0.0
        self._lock = threading.Lock()

    def add(self, requests: int, queries: int, hits: int, running: int = 0, waiting: int = 0,
            kv_cache_usage: float = 0.0, preempted: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.queries += queries
            self.hits += hits
            self.preempted += preempted
            self.running, self.waiting, self.kv_cache_usage = running, waiting, kv_cache_usage
            self.max_running = max(self.max_running, running)
            self.peak_kv_cache_usage = max(self.peak_kv_cache_usage, kv_cache_usage)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            rate = self.hits / self.queries if self.queries else 0.0
            return {"prefix_cache_requests": self.requests, "prefix_cache_queries": self.queries,
                    "prefix_cache_hits": self.hits, "prefix_cache_hit_rate": rate,
                    "max_running_requests": self.max_running, "running_requests": self.running,
                    "waiting_requests": self.waiting, "kv_cache_usage": self.kv_cache_usage,
                    "peak_kv_cache_usage": self.peak_kv_cache_usage, "preempted_requests": self.preempted}


def _stat_logger_factory(stats: EngineStats):
    """A vLLM StatLoggerFactory feeding ``stats`` (vLLM's stat logger API is not stable:
    anything unexpected is ignored rather than breaking generation)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is None:  # a step that carried only outputs
                return
            cache = getattr(scheduler_stats, "prefix_cache_stats", None)
            stats.add(getattr(cache, "requests", 0), getattr(cache, "queries", 0), getattr(cache, "hits", 0),
                      getattr(scheduler_stats, "num_running_reqs", 0), getattr(scheduler_stats, "num_waiting_reqs", 0),
                      float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0),
                      getattr(iteration_stats, "num_preempted_reqs", 0))

        def log_engine_initialized(self):
            pass

    return _Logger


def _executor_as_given(args: dict[str, Any], on_cpu: bool) -> dict[str, Any]:
    """``args`` with "uni" as vLLM's executor class on CPU: its CPU platform rewrites the name
    "uni" to "mp" (an in-process ``LLM`` could not set up OpenMP), but an ``AsyncLLM`` engine
    core is a process of its own, started after the platform set its environment."""
    if not (on_cpu and args.get("distributed_executor_backend") == "uni"):
        return args
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return {**args, "distributed_executor_backend": UniProcExecutor}


class VLLMStepGenerator:
    """An async ``Generator`` over one ``vllm.v1.engine.async_llm.AsyncLLM`` engine.

    Args:
        model: local checkpoint directory (checked with ``check_checkpoint_dir`` before the
            engine starts, so a missing one fails here, naming the path) or a hub id.
        max_model_len: prompt + generated tokens per request.
        dtype: weights/activations dtype ("float32" for the bundled models; "bfloat16"/"auto"
            on GPUs).
        enforce_eager: no CUDA graphs / torch.compile. None: True on CPU (start-up time
            dominates there), False elsewhere.
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes (steps of one request).
        gpu_memory_utilization: fraction of accelerator memory for weights + KV cache
            (None: vLLM's default). Several engines on one GPU must split it.
        tensor_parallel_size: GPUs per engine (Ray Serve placement bundles supply them).
        kv_cache_memory_bytes: explicit KV cache size (None: on CPU 256 MiB unless
            VLLM_CPU_KVCACHE_SPACE is set; on GPUs from gpu_memory_utilization).
        max_num_seqs: most sequences decoded in one engine step (None: vLLM's default).
        block_size: KV cache block (tokens); prefix caching reuses whole blocks only. None: 32
            on CPU (vLLM's CPU default, 128, would leave short step prefixes uncached; the CPU
            kernels need a multiple of 32), vLLM's default elsewhere.
        delimiter: the step delimiter (a stop string).
        local: force the local-path check on (True) or off (False); None guesses (see
            ``looks_local``).
        pad_heads: on CPU, serve a zero-padded equivalent copy when the head size is one
            vLLM's CPU attention lacks (``cpu_compatible_dir``). None/True: when needed;
            False: never (the engine then fails on such a model).
        distributed_executor_backend: "uni" (the model runs in the engine-core process) or "mp"
            (in worker processes of its own). None: "uni" on CPU with one worker, where vLLM's
            CPU build would pick "mp", whose worker spins between steps (measured in
            docs/VLLM.md); vLLM's default elsewhere.
        engine_kwargs: further ``AsyncEngineArgs`` fields (e.g. ``quantization``).
    """

    def __init__(self, model: str | Path, *, max_model_len: int = 512, dtype: str = "float32",
                 enforce_eager: bool | None = None, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 kv_cache_memory_bytes: int | None = None, max_num_seqs: int | None = None,
                 block_size: int | None = None, distributed_executor_backend: str | None = None,
                 seed: int = 0, delimiter: str = STEP_DELIMITER, trust_remote_code: bool = False,
                 log_stats: bool = False, local: bool | None = None, pad_heads: bool | None = None,
                 engine_kwargs: dict[str, Any] | None = None):
        if local is None:
            local = looks_local(model)
        model_str = str(model)
        if local:  # before importing vllm: a missing dir fails fast, naming the path
            model_str = str(check_checkpoint_dir(Path(model_str).expanduser()).resolve())
        self.model = model_str
        self.delimiter = delimiter
        self.engine_stats = EngineStats()

        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        self._SamplingParams = SamplingParams
        self._final_only = RequestOutputKind.FINAL_ONLY
        on_cpu = current_platform.is_cpu()
        self.device = "cpu" if on_cpu else str(current_platform.device_type)
        self.served_dir = model_str
        if local and on_cpu and pad_heads is not False:
            self.served_dir = str(cpu_compatible_dir(model_str))
        if enforce_eager is None:
            enforce_eager = on_cpu
        if kv_cache_memory_bytes is None and on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES
        args: dict[str, Any] = {
            "model": self.served_dir, "dtype": dtype, "max_model_len": max_model_len,
            "enforce_eager": enforce_eager, "enable_prefix_caching": enable_prefix_caching,
            "tensor_parallel_size": tensor_parallel_size, "seed": seed,
            "trust_remote_code": trust_remote_code, "disable_log_stats": not log_stats,
        }
        if gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if max_num_seqs is not None:
            args["max_num_seqs"] = max_num_seqs
        if block_size is None and on_cpu:
            block_size = CPU_DEFAULT_BLOCK_SIZE
        if on_cpu and block_size % CPU_DEFAULT_BLOCK_SIZE:  # vLLM would fail at engine start, 20 s on, unnamed
            raise ValueError(f"model.engine.block_size: vLLM's CPU attention needs a multiple of "
                             f"{CPU_DEFAULT_BLOCK_SIZE}, got {block_size}")
        if on_cpu and gpu_memory_utilization is not None and kv_cache_memory_bytes is not None:
            logger.warning("model.engine.gpu_memory_utilization %s is ignored on CPU: the KV cache is "
                           "kv_cache_memory_bytes (%d)", gpu_memory_utilization, kv_cache_memory_bytes)
        if block_size is not None:
            args["block_size"] = block_size
        if distributed_executor_backend is None and on_cpu and tensor_parallel_size == 1:
            distributed_executor_backend = "uni"
        if distributed_executor_backend is not None:
            args["distributed_executor_backend"] = distributed_executor_backend
        args.update(engine_kwargs or {})
        self.engine_args = args
        try:
            self.engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**_executor_as_given(args, on_cpu)), stat_loggers=[_stat_logger_factory(self.engine_stats)])
        except Exception as exc:  # config/load errors come from the engine process in many types
            raise EngineStartError(engine_start_message(model_str, exc)) from exc
        # Prompts go to the engine as token ids from its own tokenizer: the context check
        # here counts exactly what the engine will see.
        self.tokenizer = self.engine.tokenizer
        self.context = int(getattr(getattr(self.engine, "model_config", None), "max_model_len", None) or max_model_len)
        self._ids = itertools.count()
        self._tag = uuid.uuid4().hex[:8]
        self._closed = False
        self.aborted = 0  # engine requests aborted by cancellation (for tests and info())

    # ---- generation -------------------------------------------------------------------

    def count_tokens(self, prefix: str) -> int:
        """The tokens the engine gets for ``prefix`` (special tokens included)."""
        return len(self._encode(prefix))

    def _encode(self, prefix: str) -> list[int]:
        if self.tokenizer is None:
            raise EngineRequestError(f"{self.model}: the engine has no tokenizer (skip_tokenizer_init)")
        return list(self.tokenizer.encode(prefix, add_special_tokens=True))

    def _sampling_params(self, options: GenerationOptions, max_tokens: int):
        # Special tokens decode as text, as in the transformers backend's detokenizer
        # (``backends.detokenize``; an EOS that ends the step is never decoded).
        kw: dict[str, Any] = {"max_tokens": max_tokens, "stop": [self.delimiter],
                              "output_kind": self._final_only, "skip_special_tokens": False,
                              "spaces_between_special_tokens": False}
        if options.temperature > 0:
            kw.update(temperature=options.temperature, seed=engine_seed(options.seed))
        else:
            kw.update(temperature=0.0)
        return self._SamplingParams(**kw)

    def _finish(self, out) -> tuple[str, int, str]:
        if not out.outputs:
            raise EngineRequestError(f"{self.model}: request {out.request_id} returned no output")
        c = out.outputs[0]
        if c.finish_reason == "length":
            reason = "length"
        elif c.finish_reason == "stop":
            reason = "delimiter" if isinstance(c.stop_reason, str) else "eos"
        else:  # "abort" or anything new: never passed off as a step
            raise EngineRequestError(f"{self.model}: request {out.request_id} finished with {c.finish_reason!r}")
        return c.text.strip(), len(c.token_ids), reason

    async def _one(self, prefix: str, ids: list[int], params, request_id: str):
        final = None
        try:
            prompt = {"prompt_token_ids": ids, "prompt": prefix}
            async for out in self.engine.generate(prompt, params, request_id=request_id):
                final = out
        except asyncio.CancelledError:
            # vLLM aborts on cancellation too; doing it here keeps the guarantee explicit and
            # version-proof (aborting a finished or unknown id is a no-op).
            await asyncio.shield(self._abort(request_id))
            raise
        if final is None:
            raise EngineRequestError(f"{self.model}: request {request_id} produced no output")
        return final

    async def _abort(self, request_id: str) -> None:
        self.aborted += 1
        try:
            await self.engine.abort(request_id)
        except Exception as exc:  # noqa: BLE001 - a dead engine has nothing left to abort
            logger.debug("abort of %s failed: %s", request_id, exc)

    async def generate(self, prefixes: Sequence[str],
                       options: GenerationOptions | Sequence[GenerationOptions]) -> list[Generation]:
        """Continue each prefix up to the delimiter, EOS, its token budget or the context.

        All prefixes that fit run as concurrent engine requests. If one fails, the others are
        aborted and the error propagates (no partial batch is returned).
        """
        if self._closed:
            raise EngineDeadError(f"{self.model}: generator is shut down")
        if not prefixes:
            return []
        rows = row_options(options, len(prefixes))
        start = time.perf_counter()
        base = f"step-{self._tag}-{next(self._ids)}"
        results: list[tuple[str, int, str]] = [("", 0, "length")] * len(prefixes)
        run, planned = [], []
        for i, (prefix, opts) in enumerate(zip(prefixes, rows)):
            ids = self._encode(prefix)
            room = self.context - len(ids)
            if room <= 0:  # vLLM would reject the request; the step loop ends it cleanly instead
                results[i] = ("", 0, "context")
            elif opts.max_new_tokens >= 1:
                run.append(i)
                try:  # every row's params before any request starts: a refused one leaves none running
                    params = self._sampling_params(opts, min(opts.max_new_tokens, room))
                except Exception as exc:  # vLLM's own validation: this call's error
                    raise self._request_error(exc) from exc
                planned.append((prefix, ids, params, f"{base}-{i}"))
        tasks = [asyncio.ensure_future(self._one(*row)) for row in planned]
        try:
            outs = await asyncio.gather(*tasks)
        except BaseException as exc:
            for t in tasks:
                t.cancel()  # each cancelled task aborts its own engine request
            await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
            if isinstance(exc, Exception) and (err := self._request_error(exc)) is not exc:
                raise err from exc
            raise
        for i, out in zip(run, outs):
            results[i] = self._finish(out)
        seconds = time.perf_counter() - start
        return [Generation(text, n, reason, seconds) for text, n, reason in results]

    def _request_error(self, exc: Exception) -> EngineRequestError:
        """Our own error type for any engine failure: it names the model, says plainly when the
        engine is dead, and crosses process boundaries (Ray) without needing vllm to unpickle."""
        if isinstance(exc, EngineRequestError):
            return exc
        if self._closed or self.engine.errored:
            return EngineDeadError(f"{self.model}: vLLM engine is dead ({type(exc).__name__}: its process exited or "
                                   f"failed); the replica's health check fails and Ray Serve replaces it")
        return EngineRequestError(f"{self.model}: {type(exc).__name__}: {exc}")

    # ---- lifecycle --------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raise when the engine is dead (cheap: a flag check, no request)."""
        if self._closed:
            raise EngineDeadError(f"{self.model}: generator is shut down")
        if self.engine.errored:
            raise EngineDeadError(f"{self.model}: vLLM engine is dead (its process exited or failed)")
        await self.engine.check_health()

    def engine_pids(self) -> list[int]:
        """Process ids of the engine core process(es) (vLLM internals: [] if they moved)."""
        try:
            return [p.pid for p in self.engine.engine_core.resources.engine_manager.processes]
        except AttributeError:
            return []

    def unfinished_requests(self) -> int:
        """Engine requests started and not yet finished or aborted (vLLM internals: -1 if moved)."""
        try:
            return int(self.engine.output_processor.get_num_unfinished_requests())
        except AttributeError:
            return -1

    def stats(self) -> dict[str, float]:
        """``EngineStats.snapshot``: counters since start (prefix-cache requests, token queries,
        token hits, hit rate; preempted requests; the most requests the scheduler ran in one step,
        > 1: requests were batched; the peak KV-cache share in use) and the engine at its last
        step (requests running and waiting, KV-cache share in use), all 0 when no request is left
        or the engine is dead (its requests are not removed then, and no step runs them)."""
        stats = self.engine_stats.snapshot()
        if self._closed or self.engine.errored or not self.unfinished_requests():
            # The engine core reports only with a step's outputs, and a request that ends at the
            # step delimiter (a stop string, matched here) is aborted after its last step: the
            # last report still counts it, and no step follows once the engine is idle.
            stats.update(running_requests=0, waiting_requests=0, kv_cache_usage=0.0)
        return stats

    async def reset_prefix_cache(self) -> bool:
        """False when the engine could not empty it (a request still held blocks)."""
        return bool(await self.engine.reset_prefix_cache())

    def shutdown(self) -> None:
        """Stop the engine processes (idempotent)."""
        if not self._closed:
            self._closed = True
            self.engine.shutdown()
            # AsyncLLM.__del__ shuts down again; let that happen now, not at interpreter exit
            # (where it raises "'NoneType' object is not callable").
            self.engine = _ClosedEngine()
