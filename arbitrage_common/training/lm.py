"""Train a bundled causal LM (draft or target) on the synthetic task from scratch."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..synthetic import STEP_DELIMITER, generate_problem, solution_text
from ..tokenizer import build_char_tokenizer
from .loop_utils import ResumableState, Stopwatch, lr_at, seed_everything, train_step, write_model_card
from .shapes import SHAPES, Shape


def lm_training_batch(tokenizer, seed: int, step: int, batch_size: int):
    """Deterministic batch ``step`` of the training stream (disjoint from eval seeds,
    which are integers; this stream is keyed by a string)."""
    rng = random.Random(f"lm-train-{seed}-{step}")
    problems = [generate_problem(rng) for _ in range(batch_size)]
    rows, masks = [], []
    for p in problems:
        prompt_ids = tokenizer(p.prompt + STEP_DELIMITER).input_ids  # with BOS
        sol_ids = tokenizer(solution_text(p), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + sol_ids)
        masks.append(len(prompt_ids))
    width = max(map(len, rows))
    ids = torch.full((batch_size, width), tokenizer.pad_token_id)
    labels = torch.full((batch_size, width), -100)
    attn = torch.zeros((batch_size, width), dtype=torch.long)
    for i, (row, n_prompt) in enumerate(zip(rows, masks)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, n_prompt: len(row)] = torch.tensor(row[n_prompt:])  # loss on the solution only
        attn[i, : len(row)] = 1
    return ids, attn, labels


def train_lm(role: str, out_dir: str, steps: int, seed: int = 0, lr: float = 2e-3,
             batch_size: int = 32, threads: int = 1, save_every: int = 100,
             shape: Shape | None = None, stop_after: int | None = None, export_every: int | None = None) -> Path:
    """Train ``steps`` steps of a cosine schedule; ``stop_after`` ends early at that step of the
    same schedule (reproducible early stopping); ``export_every`` writes HF snapshots to
    ``<out>/ckpt/snapshots/step-N`` for picking a stopping point. Resumes from ``<out>/ckpt``
    only with the same role, seed, lr, steps and batch size (ValueError naming the flags)."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    shape = shape or SHAPES[role]
    out = Path(out_dir)
    seed_everything(seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(shape.llama_config(len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    # What defines the run; a resume must match (--stop-after, --threads, --export-every may change:
    # --stop-after moves the stop along the same schedule, which --steps sets).
    state = ResumableState(out, {"--role": role, "--seed": seed, "--lr": lr, "--steps": steps,
                                 "--batch-size": batch_size, "shape": shape.as_dict()})
    start, elapsed = state.load(model, optimizer)
    clock = Stopwatch(elapsed)
    model.train()
    end = min(stop_after or steps, steps)
    if start > end:
        raise ValueError(f"{state.path}: resume state is at step {start}, past the requested stop at step {end}; "
                         f"remove {state.path.parent} to retrain")
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        ids, attn, labels = lm_training_batch(tokenizer, seed, step, batch_size)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        train_step(model, optimizer, loss, step, state, clock, end, save_every)
        if export_every and (step + 1) % export_every == 0:
            snap = out / "ckpt" / "snapshots" / f"step-{step + 1}"
            model.save_pretrained(str(snap), safe_serialization=True)
            tokenizer.save_pretrained(str(snap))
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    meta = {"role": role, "architecture": "LlamaForCausalLM", "shape": shape.as_dict(),
            "params": sum(p.numel() for p in model.parameters()), "seed": seed,
            "train_stream": f"random.Random('lm-train-{seed}-<step>'), 32 problems per step",
            "schedule_steps": steps, "trained_steps": end, "batch_size": batch_size, "lr_peak": lr, "threads": threads,
            "train_time_s": round(clock.elapsed, 1), "torch": torch.__version__}
    write_model_card(out, f"Bundled {role} LM", meta,
                     f"arbitrage train lm --role {role} --steps {steps} --seed {seed} --lr {lr} "
                     f"--batch-size {batch_size} --threads {threads}"
                     + (f" --stop-after {end}" if end < steps else "") + f" --out {out_dir}")
    return out
