"""A PRM shipped as a causal-LM body plus a value head (Skywork-o1-Open-PRM's layout).

The checkpoint holds a Qwen2 body (``model.*``; ``lm_head.weight`` is not used) and
``v_head.summary.{weight,bias}``, a ``Linear(hidden, 1)`` applied to every token's last
hidden state. Skywork's inference code (github.com/SkyworkAI/skywork-o1-prm-inference,
``model_utils/io_utils.py``) builds ``BOS + problem + "\\n"``, then every step's tokens
followed by the id of ``"\\n"``, and reads ``sigmoid(value)`` at each of those step tokens.

Our steps are paragraphs (``"\\n\\n"``); Skywork's are lines. The response is therefore fed
as Skywork's code would see ``"\\n".join(steps)``: every line of every step ends with the
step token, and the candidate's reward is read at the step token after its last line.

Detection (:func:`is_value_head_prm`, :func:`value_head_problem`) reads ``config.json`` and
safetensors headers only, so ``arbitrage_common.presets`` can use it without torch; torch,
transformers and safetensors are imported when a scorer is built.
"""
from __future__ import annotations

import json
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

from ..interfaces import ScoreItem
from .checkpoints import CheckpointError, check_checkpoint_dir, load_or_explain, pick_device
from .fit import fit_item, model_context, plain_tokens

ARCHITECTURE = "Qwen2ForPrmModel"  # Skywork's config.json (the model class of its remote code)
HEAD_WEIGHT = "v_head.summary.weight"
HEAD_BIAS = "v_head.summary.bias"
HEAD_KEYS = (HEAD_WEIGHT, HEAD_BIAS)
STEP_TOKEN = "\n"  # Skywork's step token; its id is the last id of encode("\n")
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 2**20  # a real header is kilobytes; refuse to read garbage lengths


# -- detection: files only ------------------------------------------------------------------
def _header(file: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER_BYTES:
            raise ValueError(f"header length {size} is implausible")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise TypeError("header is not a JSON object")
    return header


def _head_candidates(path: Path) -> list[Path]:
    """The safetensors files that may hold the head: the index's, else every one."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return sorted({path / weight_map[k] for k in HEAD_KEYS if k in weight_map})
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # an unreadable index: look at the files themselves
    return sorted(path.glob("*.safetensors"))


def find_value_head(model_dir: str | Path) -> dict[str, tuple[Path, list[int]]]:
    """``{key: (file, shape)}`` for the value-head tensors present in the checkpoint."""
    found: dict[str, tuple[Path, list[int]]] = {}
    for file in _head_candidates(Path(model_dir)):
        try:
            header = _header(file)
        except (OSError, ValueError, TypeError):
            continue  # not readable as safetensors: holds no head we could load
        for key in HEAD_KEYS:
            entry = header.get(key)
            if key not in found and isinstance(entry, dict):
                found[key] = (file, list(entry.get("shape") or []))
    return found


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_value_head_prm(model_dir: str | Path) -> bool:
    """Whether a checkpoint is (or claims to be) a body-plus-value-head PRM: config.json names
    Skywork's architecture, or its safetensors hold a ``v_head.summary`` tensor. Reads files only.

    A claim without a complete head is still True, so that loading fails loudly
    (:class:`ValueHeadPRMScorer` raises) instead of falling back to a randomly initialised head."""
    path = Path(model_dir)
    return ARCHITECTURE in (_config(path).get("architectures") or []) or bool(find_value_head(path))


def value_head_problem(model_dir: str | Path) -> str | None:
    """Why the checkpoint's value head cannot be loaded, or None when both tensors are there
    with the shapes of a ``Linear(hidden_size, 1)``. Reads files only."""
    path = Path(model_dir)
    found = find_value_head(path)
    missing = [k for k in HEAD_KEYS if k not in found]
    if missing:
        return f"no value head in its safetensors (missing {', '.join(missing)})"
    hidden = _config(path).get("hidden_size")
    weight, bias = found[HEAD_WEIGHT][1], found[HEAD_BIAS][1]
    if weight not in ([1, hidden], [hidden]) or bias != [1]:
        return (f"value head shapes {HEAD_WEIGHT} {weight}, {HEAD_BIAS} {bias} are not those of a "
                f"Linear({hidden}, 1) (config.json hidden_size)")
    return None


# -- the scorer -----------------------------------------------------------------------------
def skywork_input_ids(bos_id: int, step_id: int, problem_ids: list[int],
                      line_ids: Sequence[list[int]]) -> list[int]:
    """Skywork's layout: BOS, the problem's ids (``problem + "\\n"``), then each line's ids and
    the step token. The candidate's reward is read at the last position."""
    ids = [bos_id, *problem_ids]
    for line in line_ids:
        ids += [*line, step_id]
    return ids


def item_lines(item: ScoreItem) -> list[str]:
    """The history steps (unannotated) and the candidate, as Skywork's steps (lines).

    Steps are stripped as ``split_steps`` stores them (a raw draft may carry a trailing
    newline that would add an empty step); an empty line inside a step stays an empty
    step, as Skywork's code treats it (the step token alone)."""
    texts = [text for text, _ in item.history] + [item.candidate]
    return [line for text in texts for line in text.strip().split(STEP_TOKEN)]


class ValueHeadPRMScorer:
    """``sigmoid(v_head(h))`` at the step token that ends the candidate, with ``h`` the body's
    last hidden state (the final norm's output), as Skywork's PRM is read."""

    annotate_history = False  # the PRM was trained on plain steps

    def __init__(self, model_dir: str | Path, threads: int | None = None, device: str | None = None,
                 batch_size: int = 32):
        import torch
        from safetensors import safe_open
        from transformers import AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        path = check_checkpoint_dir(model_dir)  # e.g. a download with only pytorch_model.bin
        problem = value_head_problem(path)  # before any weights: a missing head names the path
        if problem:
            raise CheckpointError(f"{path}: {problem}")
        self.device = torch.device(pick_device(device))  # None/"auto": torch's GPU if it sees one (pools pass one)
        # The checkpoint's dtype (bf16 for Skywork) on an accelerator; float32 on the CPU, where
        # bf16 matmuls are slow. The one-row head always runs in float32 (cheap, and exact).
        dtype = torch.float32 if self.device.type == "cpu" else "auto"
        # Never remote code: the config's auto_map names Skywork's classes, which this scorer
        # replaces (scorers.load_step_scorer refuses trust_remote_code for this kind).
        self.tokenizer = load_or_explain(path, lambda p: AutoTokenizer.from_pretrained(p, trust_remote_code=False))
        # AutoModel gives the bare Qwen2 body: the "model." prefix is stripped and lm_head/v_head
        # keys are left unused.
        model, info = load_or_explain(
            path, lambda p: AutoModel.from_pretrained(p, dtype=dtype, output_loading_info=True, use_safetensors=True,
                                                      trust_remote_code=False))
        if info.get("missing_keys"):
            # transformers would initialise them at random and only warn
            raise CheckpointError(f"{path}: body weights missing from the checkpoint: "
                                  f"{sorted(info['missing_keys'])[:5]}")
        self.model = model.to(self.device).eval()
        head = find_value_head(path)
        tensors = {}
        for key in HEAD_KEYS:
            with safe_open(str(head[key][0]), framework="pt") as f:
                tensors[key] = f.get_tensor(key).to(device=self.device, dtype=torch.float32)
        self.head_weight = tensors[HEAD_WEIGHT].reshape(-1)
        self.head_bias = tensors[HEAD_BIAS].reshape(())
        bos = self.tokenizer.bos_token_id
        if bos is None:  # Skywork's code prepends tokenizer.bos_token and would fail the same way
            raise CheckpointError(f"{path}: the tokenizer defines no bos_token (Skywork's input starts with it)")
        self.bos_id = bos
        self.step_id = self.tokenizer.encode(STEP_TOKEN, add_special_tokens=False)[-1]
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)  # masked out anyway
        self.batch_size = batch_size
        self.params = sum(p.numel() for p in self.model.parameters()) + self.head_weight.numel() + 1
        self.context = model_context(self.model)
        self._lock = threading.Lock()

    def fit(self, item: ScoreItem) -> ScoreItem:
        """``item`` cut to the model's context (``steps.fit_scorer_input``)."""
        return fit_item(item, self.context, lambda it: len(self.encode(it)), self._costs, self.tokenizer)

    def _costs(self, item: ScoreItem):
        def step(text: str) -> int:  # each line and its step token, as ``encode`` lays them out
            return sum(plain_tokens(self.tokenizer, line) + 1 for line in text.strip().split(STEP_TOKEN))

        return (plain_tokens(self.tokenizer, item.problem + "\n"), [step(t) for t, _ in item.history],
                step(item.candidate))

    def encode(self, item: ScoreItem) -> list[int]:
        """Token ids of one item, built piece by piece as Skywork's ``prepare_input`` does.

        The BOS goes in by id rather than as text (same ids: special tokens are split out of
        the text before the rest is tokenized), and pieces are encoded without special tokens
        (Qwen2's tokenizer adds none either)."""
        lines = item_lines(item)
        enc = self.tokenizer([item.problem + "\n", *lines], add_special_tokens=False)["input_ids"]
        return skywork_input_ids(self.bos_id, self.step_id, enc[0], enc[1:])

    def score_ids(self, rows: Sequence[list[int]]) -> list[float]:
        """Rewards of pre-built id rows, each read at its last token."""
        import torch

        out: list[float] = []
        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo: lo + self.batch_size]
            width = max(len(r) for r in chunk)
            # Right padding keeps every real token at its own position (no position ids needed)
            # and, under the causal mask, unaffected by the pads after it.
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            ends = torch.tensor([len(r) - 1 for r in chunk], device=self.device)
            with self._lock, torch.inference_mode():
                hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                last = hidden[torch.arange(len(chunk), device=self.device), ends].float()
                out += torch.sigmoid(last @ self.head_weight + self.head_bias).tolist()
        return out

    def score_batch(self, items: Sequence[ScoreItem]) -> list[float]:
        if not items:
            return []
        return self.score_ids([self.encode(self.fit(item)) for item in items])
