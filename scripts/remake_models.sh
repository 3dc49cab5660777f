#!/usr/bin/env bash
# Remakes every bundled checkpoint, in dependency order, on CPU (about 1.2 h on 2 cores).
# Each step is resumable: rerun the script after an interruption and it continues.
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
$A router data --n 3000 --seed 0 --out runs/router_data.jsonl
# The router keeps the PRM's LM frozen and fits a logistic head to the oracle's labels (minutes).
# The classifier kind (`--kind classifier --steps 300 --ablation-steps 100`) is the other option.
$A router train --kind verifier-head --data runs/router_data.jsonl --init models/prm --out models/router --seed 0
