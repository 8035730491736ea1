#!/usr/bin/env bash
# Regime b of issue 15 (60 prompts x 3 answers, every answer voted; chatapp/learning/regimes.py) trained
# on the SmolVLM-256M-sized model on a GPU machine, with the run's own cost estimate (learning/cost.py)
# beside its wall time. bench/device_checks.sh runs it on the device machine.
#   bash bench/gpu_regime_b.sh [OUT_DIR]     (writes OUT_DIR/summary.json, train.log, gpu.txt)
# The store is built with the demo model (its answers are what the votes judge); the SmolVLM-sized model
# has random weights, so the gate's verdict means nothing here: the figures are time and memory.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu-regime-b}
PY=${PY:-.venv/bin/python}
MODEL=bench/cache/smolvlm-256m-random
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU (nvidia-smi: none)"; } | tee "$OUT/gpu.txt"
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$OUT" "$MODEL" <<'PY'
import sys
from pathlib import Path
from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random
from chatapp.feedback.store import Store
from chatapp.learning import regimes
from chatapp.serving.engine import Engine

out, model = Path(sys.argv[1]), Path(sys.argv[2])
build_smolvlm_sized_random(model)
demo = Engine.load("demo")
print(regimes.build(regimes.REGIMES["b"], Store(out / "data"), demo.model, demo.processor, seed=21))
PY
# batch 8 fits an H200 easily (~1.4 GB of activations per image row in fp32 on a CPU; less in bf16).
# --budget: the device call's 10-minute limit; regime b's full run (500 prompts with the crossed ones) was
# estimated at 318 min on an H200 from units measured there (docs/learning.md), and the smallest cut of it
# did not fit 4 minutes either: the run refuses, and its recorded estimate is the figure.
"$PY" -m chatapp train --data-dir "$OUT/data" --model "$MODEL" --batch-size 8 --publish never \
    --budget "${BUDGET_MIN:-6}" \
    2> >(tee "$OUT/train.log" >&2) | tee "$OUT/result.json"
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$OUT" <<'PY'
import json, sys
from datetime import datetime
from pathlib import Path
from chatapp.feedback.store import Store

out = Path(sys.argv[1])
run = Store(out / "data").runs(limit=1)[0]
took = (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])).total_seconds() / 60
summary = {"regime": "b", "model": "smolvlm-256m-sized", "gpu": (out / "gpu.txt").read_text().strip(),
           "status": run["status"], "reason": run["reason"] or run["error"], "estimate_min": run["estimate"].get("minutes"),
           "actual_min": took, "estimate": run["estimate"]}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: v for k, v in summary.items() if k != "estimate"}, indent=1))
PY
