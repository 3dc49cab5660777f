#!/usr/bin/env bash
# Remakes every bundled checkpoint, in dependency order, on CPU (about 2 h on 2 cores).
# Each step is resumable: rerun the script after an interruption and it continues (a step
# rerun with other arguments is refused, naming them; remove <out>/ckpt to start it fresh).
# `router data` writes runs/<name>.meta.json beside each dataset: how it was made.
# Seeds are fixed; results match up to float nondeterminism across thread counts.
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/arbitrage
$A train lm --role target --out models/target --steps 1000 --seed 0 --lr 0.002 --threads 1
$A train lm --role draft --out models/draft --steps 1000 --stop-after 750 --seed 0 --lr 0.003 --threads 1
# The PRM is an LM verifier (the target LM + a calibration of its min token log-prob); the
# classifier PRM (`arbitrage train prm`) reached only 0.85 AUROC on this task.
$A train verifier --lm models/target --draft models/draft --target models/target --problems 3000 \
  --seed 0 --out models/prm
# Oracle labels on both mixes, with the paper's label 1[PRM(target) - PRM(draft) > 0].
$A router data --n 2000 --seed 0 --mix math,olympiad --prm models/prm --out runs/router_data_verifier.jsonl
# The router keeps the PRM's LM frozen and fits a logistic head to the oracle's labels (minutes).
$A router train --kind verifier-head --data runs/router_data_verifier.jsonl --init models/prm --out models/router --seed 0
# The regime map's other cells (docs/PAYOFF.md). The independent PRM: its own LM body (1/5 of the
# target's parameters) trained on the task, then a classifier on checker labels of draft and
# target steps on both mixes; its router is fine-tuned from it with the paper's label 1[adv > 0].
$A train lm --role prm --out runs/prm-lm --steps 1000 --seed 0 --lr 0.003 --threads 1
$A train prm --init runs/prm-lm --draft models/draft --target models/target --problems 2000 --steps 800 \
  --lr 0.001 --mix math,olympiad --seed 0 --threads 1 --out models/prm-independent
$A router data --n 2000 --seed 0 --mix math,olympiad --prm models/prm-independent --out runs/router_data_independent.jsonl
$A router train --kind classifier --data runs/router_data_independent.jsonl --init models/prm-independent \
  --out models/router-independent --steps 800 --lr 0.0005 --no-balance --seed 0 --threads 1
# The self-verifier's classifier router (the regime map's third cell).
$A router train --kind classifier --data runs/router_data_verifier.jsonl --init models/prm --out models/router-classifier \
  --steps 300 --seed 0 --threads 1
